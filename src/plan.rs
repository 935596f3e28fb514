//! The model plan: layer shapes, parameter count and the four-part memory model.
//!
//! Every device reads the same plan and allocates the same buffers ([`crate::step::StepBuffers`]),
//! so the bytes predicted here are the bytes a probe asks the device for.

use serde::{Deserialize, Serialize};

use crate::job::{Activation, Job, OptimizerKind};

/// Bytes of one element (`f32` parameters, activations and inputs; `u32` labels).
pub const ELEMENT_BYTES: u64 = 4;

/// One linear layer: `outputs x inputs` weights and `outputs` biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    /// Width of the layer's input.
    pub inputs: u64,
    /// Width of the layer's output.
    pub outputs: u64,
}

impl Layer {
    /// Weights plus biases.
    pub fn parameter_count(&self) -> u64 {
        self.inputs * self.outputs + self.outputs
    }
}

/// A job's network and optimizer, reduced to what devices and the memory model need.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Linear layers from input to logits; all but the last are followed by `activation`.
    pub layers: Vec<Layer>,
    /// Non-linearity after each hidden layer.
    pub activation: Activation,
    /// Update rule.
    pub optimizer: OptimizerKind,
    /// Step size of the update rule.
    pub learning_rate: f32,
    parameter_count: u64,
}

/// The plan's byte counts do not fit in `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the model's byte count overflows 64 bits")]
pub struct Overflow;

/// Device bytes of one training step, in the four places training uses memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MemoryBreakdown {
    /// Weights and biases.
    pub parameters: u64,
    /// One gradient per parameter.
    pub gradients: u64,
    /// Momentum or Adam moments.
    pub optimizer_state: u64,
    /// The input batch and its labels.
    pub batch_data: u64,
    /// What forward keeps for backward, the backward buffers and the loss.
    pub activations: u64,
    /// Sum of the above.
    pub total: u64,
}

impl Plan {
    /// Builds the plan of a job; fails only if its byte counts overflow `u64`.
    pub fn new(job: &Job) -> Result<Plan, Overflow> {
        let model = &job.model;
        let features = model
            .input_shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or(Overflow)?;
        let widths: Vec<u64> = std::iter::once(features)
            .chain(model.hidden_layers.iter().copied())
            .chain(std::iter::once(model.num_classes))
            .collect();
        let layers: Vec<Layer> = widths
            .windows(2)
            .map(|w| Layer {
                inputs: w[0],
                outputs: w[1],
            })
            .collect();
        let parameter_count = layers.iter().try_fold(0u64, |acc, layer| {
            layer
                .inputs
                .checked_mul(layer.outputs)
                .and_then(|w| w.checked_add(layer.outputs))
                .and_then(|p| acc.checked_add(p))
        });
        let plan = Plan {
            layers,
            activation: model.activation,
            optimizer: job.optimizer.name,
            learning_rate: job.learning_rate(),
            parameter_count: parameter_count.ok_or(Overflow)?,
        };
        // The fixed part and one sample must be representable; larger batches are checked per use.
        plan.memory(1).ok_or(Overflow)?;
        Ok(plan)
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> u64 {
        self.parameter_count
    }

    /// Width of the flattened input.
    pub fn input_features(&self) -> u64 {
        self.layers[0].inputs
    }

    /// Number of classes (width of the logits).
    pub fn num_classes(&self) -> u64 {
        self.layers[self.layers.len() - 1].outputs
    }

    /// The hidden layers' widths, input side first.
    pub fn hidden_widths(&self) -> impl Iterator<Item = u64> + '_ {
        self.layers[..self.layers.len() - 1]
            .iter()
            .map(|l| l.outputs)
    }

    /// Width of the backward scratch buffer (the widest hidden layer), 0 without hidden layers.
    pub fn scratch_width(&self) -> u64 {
        self.hidden_widths().max().unwrap_or(0)
    }

    /// f32 values per sample kept as activations: pre- and post-activation of every hidden
    /// layer, the logits (overwritten by their gradient), the per-sample loss and the scratch.
    fn activation_values_per_sample(&self) -> u64 {
        2 * self.hidden_widths().sum::<u64>() + self.num_classes() + 1 + self.scratch_width()
    }

    /// Bytes that do not depend on the batch size: parameters, gradients, optimizer state and
    /// the one-value loss accumulator.
    pub fn fixed_bytes(&self) -> u64 {
        self.memory(0).map_or(u64::MAX, |m| m.total)
    }

    /// Bytes each sample of the batch adds.
    pub fn bytes_per_sample(&self) -> u64 {
        self.memory(1)
            .map_or(u64::MAX, |m| m.total - self.fixed_bytes())
    }

    /// The exact breakdown at `batch_size`, or `None` if it overflows `u64`.
    pub fn memory(&self, batch_size: u64) -> Option<MemoryBreakdown> {
        let parameters = self.parameter_count.checked_mul(ELEMENT_BYTES)?;
        let gradients = parameters;
        let optimizer_state = parameters.checked_mul(self.optimizer.state_per_parameter())?;
        let input_values = self.input_features().checked_add(1)?; // inputs + the label
        let batch_data = batch_size
            .checked_mul(input_values)?
            .checked_mul(ELEMENT_BYTES)?;
        let activations = batch_size
            .checked_mul(self.activation_values_per_sample())?
            .checked_add(1)? // the mean-loss accumulator
            .checked_mul(ELEMENT_BYTES)?;
        let total = parameters
            .checked_add(gradients)?
            .checked_add(optimizer_state)?
            .checked_add(batch_data)?
            .checked_add(activations)?;
        Some(MemoryBreakdown {
            parameters,
            gradients,
            optimizer_state,
            batch_data,
            activations,
            total,
        })
    }

    /// The largest batch whose step fits in `free_bytes`, or 0 if not even one sample fits.
    pub fn predict_max_batch(&self, free_bytes: u64) -> u64 {
        free_bytes
            .checked_sub(self.fixed_bytes())
            .map_or(0, |room| room / self.bytes_per_sample())
    }

    /// Floating-point operations of one training step at `batch_size` (three GEMMs per layer,
    /// `2*M*N*K` each, less the unneeded input gradient of the first layer).
    pub fn step_flops(&self, batch_size: u64) -> f64 {
        let per_sample: u64 = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let products = if i == 0 { 2 } else { 3 };
                products * 2 * l.inputs * l.outputs
            })
            .sum();
        per_sample as f64 * batch_size as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plan(input: &[u64], hidden: &[u64], classes: u64, optimizer: &str) -> Plan {
        let job = Job::from_json(&format!(
            r#"{{"model": {{"input_shape": {input:?}, "hidden_layers": {hidden:?},
                 "num_classes": {classes}}}, "optimizer": {{"name": "{optimizer}"}}}}"#
        ))
        .unwrap();
        Plan::new(&job).unwrap()
    }

    #[test]
    fn known_parameter_counts() {
        assert_eq!(
            plan(&[1, 28, 28], &[128], 10, "sgd").parameter_count(),
            101_770
        );
        assert_eq!(
            plan(&[3, 32, 32], &[128], 10, "adam").parameter_count(),
            394_634
        );
        assert_eq!(
            plan(&[3, 32, 32], &[1024, 1024, 1024], 10, "adamw").parameter_count(),
            3072 * 1024 + 1024 + 2 * (1024 * 1024 + 1024) + 1024 * 10 + 10
        );
    }

    #[test]
    fn mnist_breakdown_by_hand() {
        let p = plan(&[1, 28, 28], &[128], 10, "sgd");
        let m = p.memory(100).unwrap();
        assert_eq!(m.parameters, 101_770 * 4);
        assert_eq!(m.gradients, 101_770 * 4);
        assert_eq!(m.optimizer_state, 0);
        assert_eq!(m.batch_data, 100 * (784 + 1) * 4);
        // pre + post of the hidden layer, logits, per-sample loss, scratch of width 128; + loss sum
        assert_eq!(m.activations, (100 * (2 * 128 + 10 + 1 + 128) + 1) * 4);
        assert_eq!(
            m.total,
            m.parameters + m.gradients + m.batch_data + m.activations
        );
    }

    #[test]
    fn optimizer_state_is_zero_one_or_two_copies() {
        for (name, copies) in [("sgd", 0), ("sgd_momentum", 1), ("adam", 2), ("adamw", 2)] {
            let m = plan(&[8], &[4], 3, name).memory(1).unwrap();
            assert_eq!(m.optimizer_state, copies * m.parameters, "{name}");
        }
    }

    #[test]
    fn no_hidden_layer_needs_no_scratch() {
        let p = plan(&[8], &[], 3, "sgd");
        assert_eq!(p.parameter_count(), 27);
        assert_eq!(p.memory(2).unwrap().activations, (2 * (3 + 1) + 1) * 4);
    }

    #[test]
    fn absurd_batches_overflow_to_none() {
        let p = plan(&[3, 32, 32], &[128], 10, "adam");
        assert!(p.memory(u64::MAX / 8).is_none());
    }

    proptest! {
        #[test]
        fn memory_is_affine_in_batch(b in 0u64..1 << 30, hidden in proptest::collection::vec(1u64..2048, 0..4)) {
            let p = plan(&[3, 16, 16], &hidden, 10, "adam");
            let m = p.memory(b).unwrap();
            prop_assert_eq!(m.total, p.fixed_bytes() + b * p.bytes_per_sample());
        }

        #[test]
        fn prediction_is_the_largest_batch_that_fits(free in 0u64..1 << 40) {
            let p = plan(&[1, 28, 28], &[128], 10, "sgd_momentum");
            let b = p.predict_max_batch(free);
            if b > 0 {
                prop_assert!(p.memory(b).unwrap().total <= free);
            }
            prop_assert!(p.memory(b + 1).unwrap().total > free);
        }
    }
}
