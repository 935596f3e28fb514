//! One training step, written once against the [`Kernels`] a device provides.
//!
//! [`StepBuffers::allocate`] asks the device for every buffer of [`Plan::buffers`], in that
//! order and storage; [`initialise`] fills parameters and the synthetic batch on the device;
//! [`train_step`] runs forward, softmax cross-entropy, backward and the optimizer update in the
//! plan's [`Precision`](crate::plan::Precision) (its doc says what each precision stores and
//! computes).

use crate::plan::{
    Activation, OptimizerKind, Plan, Storage, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL,
};
use crate::synthetic;

/// Momentum coefficient of `sgd_momentum`.
pub const MOMENTUM: f32 = 0.9;
/// Adam's first-moment decay.
pub const ADAM_BETA1: f32 = 0.9;
/// Adam's second-moment decay.
pub const ADAM_BETA2: f32 = 0.999;
/// Adam's denominator guard.
pub const ADAM_EPSILON: f32 = 1e-8;
/// AdamW's decoupled weight decay.
pub const ADAMW_WEIGHT_DECAY: f32 = 0.01;

/// The scalars of one optimizer step; which update applies follows from the [`OptimizerState`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateRule {
    /// Step size.
    pub learning_rate: f32,
    /// Adam's bias corrections `1 / (1 - beta^t)` for the first and second moment.
    pub bias_correction: (f32, f32),
    /// Decoupled weight decay (AdamW), 0 otherwise.
    pub weight_decay: f32,
    /// What each gradient is multiplied by before use: `1 / loss scale` under loss scaling, else 1.
    pub grad_scale: f32,
}

impl UpdateRule {
    /// The rule of `kind` for step `step` (counted from 1).
    pub fn new(kind: OptimizerKind, learning_rate: f32, step: u32) -> UpdateRule {
        let t = step.max(1) as i32;
        UpdateRule {
            learning_rate,
            bias_correction: (
                1.0 / (1.0 - ADAM_BETA1.powi(t)),
                1.0 / (1.0 - ADAM_BETA2.powi(t)),
            ),
            weight_decay: if kind == OptimizerKind::Adamw {
                ADAMW_WEIGHT_DECAY
            } else {
                0.0
            },
            grad_scale: 1.0,
        }
    }
}

/// What an optimizer keeps per parameter buffer. The variant decides the update kernel and its
/// arguments, so the two cannot disagree.
#[derive(Debug)]
pub enum OptimizerState<F> {
    /// Plain SGD keeps nothing.
    Sgd,
    /// Momentum's velocity.
    Momentum {
        /// The running velocity.
        velocity: F,
    },
    /// Adam's (and AdamW's) moments.
    Adam {
        /// First moment.
        m: F,
        /// Second moment.
        v: F,
    },
}

impl<F> OptimizerState<F> {
    /// Zeroed state of `kind` for a buffer of `len` values, stored as `storage`.
    pub fn allocate<A: Allocate<Values = F>>(
        kind: OptimizerKind,
        len: u64,
        storage: Storage,
        alloc: &mut A,
    ) -> Result<Self, A::Error> {
        Ok(match kind {
            OptimizerKind::Sgd => OptimizerState::Sgd,
            OptimizerKind::SgdMomentum => OptimizerState::Momentum {
                velocity: alloc.zeroed(len, storage)?,
            },
            OptimizerKind::Adam | OptimizerKind::Adamw => OptimizerState::Adam {
                m: alloc.zeroed(len, storage)?,
                v: alloc.zeroed(len, storage)?,
            },
        })
    }

    /// The state's buffers, in allocation order.
    pub fn buffers(&self) -> Vec<&F> {
        match self {
            OptimizerState::Sgd => vec![],
            OptimizerState::Momentum { velocity } => vec![velocity],
            OptimizerState::Adam { m, v } => vec![m, v],
        }
    }
}

/// A device buffer of values that knows how it stores them.
pub trait Stored {
    /// How the buffer stores its values.
    fn storage(&self) -> Storage;
}

/// Creates the buffers of a step on one device; every buffer starts zeroed.
pub trait Allocate {
    /// A device buffer of values (f32, bf16 or f16).
    type Values: Stored;
    /// A device buffer of `u32`.
    type U32;
    /// Out-of-memory or a device fault.
    type Error;
    /// A zeroed buffer of `len` values stored as `storage`; a length whose bytes pass `u64` is
    /// out of memory.
    fn zeroed(&mut self, len: u64, storage: Storage) -> Result<Self::Values, Self::Error>;
    /// A zeroed buffer of `len` `u32` values.
    fn u32_zeroed(&mut self, len: u64) -> Result<Self::U32, Self::Error>;
}

/// The operations of a training step, as one device implements them (host code or CUDA kernels).
///
/// Matrices are row-major; `rows` is the batch size. Shapes follow the plan's [`crate::plan::Layer`]:
/// `x` is `rows x inputs`, `w` is `outputs x inputs`, `y` is `rows x outputs`. Every operation
/// reads each buffer as its storage says, computes in f32, and rounds what it stores to the
/// storage of the buffer it writes (to nearest, ties to even). The operands of a product share
/// one storage.
pub trait Kernels: Allocate {
    /// Waits until all work queued on the device is done (for timing and fault detection).
    fn synchronize(&mut self) -> Result<(), Self::Error>;
    /// `out[i] = uniform(key, i) * scale`, the synthetic stream of [`synthetic::uniform`].
    fn fill_uniform(
        &mut self,
        out: &mut Self::Values,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), Self::Error>;
    /// Labels of the learnable task of [`synthetic::fill_labels`].
    fn fill_labels(
        &mut self,
        labels: &mut Self::U32,
        inputs: &Self::Values,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), Self::Error>;
    /// `y = x * w^T`.
    fn linear_forward(
        &mut self,
        x: &Self::Values,
        w: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), Self::Error>;
    /// `dw = dy^T * x`.
    fn weight_gradient(
        &mut self,
        dy: &Self::Values,
        x: &Self::Values,
        dw: &mut Self::Values,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), Self::Error>;
    /// `dx = dy * w`.
    fn input_gradient(
        &mut self,
        dy: &Self::Values,
        w: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), Self::Error>;
    /// `pre += bias` per row, then `post = activation(pre)` when `post` is given.
    fn bias_activation(
        &mut self,
        pre: &mut Self::Values,
        bias: &Self::Values,
        post: Option<&mut Self::Values>,
        rows: u64,
        cols: u64,
        activation: Activation,
    ) -> Result<(), Self::Error>;
    /// `pre = grad_post * activation'(pre)`: the gradient replaces the pre-activation in place.
    fn activation_backward(
        &mut self,
        grad_post: &Self::Values,
        pre: &mut Self::Values,
        len: u64,
        activation: Activation,
    ) -> Result<(), Self::Error>;
    /// `db[j] = sum_i dy[i, j]`.
    fn bias_gradient(
        &mut self,
        dy: &Self::Values,
        db: &mut Self::Values,
        rows: u64,
        cols: u64,
    ) -> Result<(), Self::Error>;
    /// Per row: `row_loss = -log softmax(logits)[label]`, and the logits are replaced by the
    /// gradient of the mean loss, `(softmax - onehot) / rows`.
    fn softmax_cross_entropy(
        &mut self,
        logits: &mut Self::Values,
        labels: &Self::U32,
        row_loss: &mut Self::Values,
        rows: u64,
        classes: u64,
    ) -> Result<(), Self::Error>;
    /// The mean of `values`, reduced on the device into `accumulator` (one value) and read back.
    fn mean(
        &mut self,
        values: &Self::Values,
        len: u64,
        accumulator: &mut Self::Values,
    ) -> Result<f32, Self::Error>;
    /// `to = from * scale`, rounded to `to`'s storage (autocast's casts; the loss scale).
    fn convert(
        &mut self,
        from: &Self::Values,
        to: &mut Self::Values,
        len: u64,
        scale: f32,
    ) -> Result<(), Self::Error>;
    /// Whether any of `buffers` (each with its length) holds an infinity or a NaN; `flag` is
    /// the one-value buffer the device gathers the answer in.
    fn any_nonfinite(
        &mut self,
        buffers: &[(&Self::Values, u64)],
        flag: &mut Self::Values,
    ) -> Result<bool, Self::Error>;
    /// One optimizer update of `param` from `grad`; `state` decides which.
    fn optimizer_step(
        &mut self,
        param: &mut Self::Values,
        grad: &Self::Values,
        state: &mut OptimizerState<Self::Values>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), Self::Error>;
}

/// Parameters, gradients and optimizer state of one linear layer.
pub struct LayerBuffers<F> {
    /// `outputs x inputs` weights.
    pub weight: F,
    /// `outputs` biases.
    pub bias: F,
    /// Gradient of the weights.
    pub weight_grad: F,
    /// Gradient of the biases.
    pub bias_grad: F,
    /// Optimizer state of the weights.
    pub weight_state: OptimizerState<F>,
    /// Optimizer state of the biases.
    pub bias_state: OptimizerState<F>,
    /// Mixed precision: autocast's half copies of the weights and biases, remade each step.
    pub cast: Option<(F, F)>,
}

impl<F> LayerBuffers<F> {
    /// The weights and biases the products use: the half copies when mixed.
    fn operands(&self) -> (&F, &F) {
        match &self.cast {
            Some((weight, bias)) => (weight, bias),
            None => (&self.weight, &self.bias),
        }
    }
}

/// What a hidden layer keeps from forward for backward.
pub struct HiddenBuffers<F> {
    /// Pre-activation; replaced by its gradient during backward.
    pub pre: F,
    /// Post-activation: the next layer's input.
    pub post: F,
}

/// `GradScaler`'s state under `16-mixed`: the loss scale and the clean steps since it changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// What the loss (so every gradient) is multiplied by.
    pub scale: f32,
    /// Steps without overflow since the scale last changed.
    pub clean_steps: u32,
}

/// Every buffer of one training step at one batch size.
pub struct StepBuffers<F, U> {
    /// One entry per linear layer.
    pub layers: Vec<LayerBuffers<F>>,
    /// `rows x features` inputs.
    pub inputs: F,
    /// `rows` labels.
    pub labels: U,
    /// Mixed precision: autocast's half copy of the inputs.
    pub inputs_cast: Option<F>,
    /// One entry per hidden layer.
    pub hidden: Vec<HiddenBuffers<F>>,
    /// `rows x classes` logits, then their gradient.
    pub logits: F,
    /// Mixed precision: the logits in f32 for the loss, then their gradient.
    pub logits_f32: Option<F>,
    /// `rows` per-sample losses.
    pub row_loss: F,
    /// `rows x widest hidden` input gradient of the layer being back-propagated.
    pub scratch: Option<F>,
    /// One value: the mean loss.
    pub loss_sum: F,
    /// Loss scaling: one value, set when a gradient overflowed.
    pub overflow: Option<F>,
    /// Loss scaling: the scale and its clean steps.
    pub loss_scale: Option<LossScale>,
    /// Batch size these buffers hold.
    pub rows: u64,
}

impl<F, U> StepBuffers<F, U> {
    /// Allocates every buffer of a step, in the order, sizes and storage of [`Plan::buffers`].
    /// A batch whose sizes pass `u64` asks for `u64::MAX` elements, which every device refuses
    /// as out of memory.
    pub fn allocate<A>(plan: &Plan, rows: u64, alloc: &mut A) -> Result<Self, A::Error>
    where
        A: Allocate<Values = F, U32 = U>,
    {
        let precision = plan.precision;
        let (master, compute) = (precision.master(), precision.compute());
        let mixed = precision.is_mixed();
        let mut layers = Vec::with_capacity(plan.layers.len());
        for layer in &plan.layers {
            let (weights, biases) = (layer.weights(), layer.outputs);
            layers.push(LayerBuffers {
                weight: alloc.zeroed(weights, master)?,
                bias: alloc.zeroed(biases, master)?,
                weight_grad: alloc.zeroed(weights, master)?,
                bias_grad: alloc.zeroed(biases, master)?,
                weight_state: OptimizerState::allocate(plan.optimizer, weights, master, alloc)?,
                bias_state: OptimizerState::allocate(plan.optimizer, biases, master, alloc)?,
                cast: match mixed {
                    true => Some((
                        alloc.zeroed(weights, compute)?,
                        alloc.zeroed(biases, compute)?,
                    )),
                    false => None,
                },
            });
        }
        let per_row = |width: u64| rows.saturating_mul(width);
        let features = per_row(plan.input_features());
        let inputs = alloc.zeroed(features, master)?;
        let labels = alloc.u32_zeroed(rows)?;
        let inputs_cast = match mixed {
            true => Some(alloc.zeroed(features, compute)?),
            false => None,
        };
        let mut hidden = Vec::new();
        for width in plan.hidden_widths() {
            hidden.push(HiddenBuffers {
                pre: alloc.zeroed(per_row(width), compute)?,
                post: alloc.zeroed(per_row(width), compute)?,
            });
        }
        let classes = per_row(plan.num_classes());
        let logits = alloc.zeroed(classes, compute)?;
        let logits_f32 = match mixed {
            true => Some(alloc.zeroed(classes, Storage::F32)?),
            false => None,
        };
        let row_loss = alloc.zeroed(rows, Storage::F32)?;
        let scratch = match plan.scratch_width() {
            0 => None,
            width => Some(alloc.zeroed(per_row(width), compute)?),
        };
        let loss_sum = alloc.zeroed(1, Storage::F32)?;
        let overflow = match precision.scales_loss() {
            true => Some(alloc.zeroed(1, Storage::F32)?),
            false => None,
        };
        Ok(StepBuffers {
            layers,
            inputs,
            labels,
            inputs_cast,
            hidden,
            logits,
            logits_f32,
            row_loss,
            scratch,
            loss_sum,
            overflow,
            loss_scale: precision.scales_loss().then_some(LossScale {
                scale: LOSS_SCALE_INITIAL,
                clean_steps: 0,
            }),
            rows,
        })
    }
}

/// Initialises parameters and generates the synthetic batch on the device from `seed`.
pub fn initialise<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    buffers: &mut StepBuffers<K::Values, K::U32>,
    seed: u64,
) -> Result<(), K::Error> {
    for (i, (layer, bufs)) in plan.layers.iter().zip(&mut buffers.layers).enumerate() {
        let scale = synthetic::init_scale(layer.inputs);
        kernels.fill_uniform(
            &mut bufs.weight,
            layer.weights(),
            synthetic::stream_key(seed, synthetic::weight_stream(i)),
            scale,
        )?;
        kernels.fill_uniform(
            &mut bufs.bias,
            layer.outputs,
            synthetic::stream_key(seed, synthetic::bias_stream(i)),
            scale,
        )?;
    }
    let rows = buffers.rows;
    let features = plan.input_features();
    kernels.fill_uniform(
        &mut buffers.inputs,
        rows * features,
        synthetic::stream_key(seed, synthetic::INPUT_STREAM),
        1.0,
    )?;
    kernels.fill_labels(
        &mut buffers.labels,
        &buffers.inputs,
        rows,
        features,
        plan.num_classes(),
    )
}

/// What became of a step's update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The optimizer updated every parameter.
    Applied,
    /// Loss scaling found an infinity or NaN among the gradients: no parameter changed, and the
    /// scale was halved.
    Skipped,
}

/// Runs one training step (`step` counts from 1) and leaves the per-sample losses in `row_loss`.
pub fn train_step<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    buffers: &mut StepBuffers<K::Values, K::U32>,
    step: u32,
) -> Result<Update, K::Error> {
    forward(kernels, plan, buffers)?;
    loss(kernels, plan, buffers)?;
    backward(kernels, plan, buffers)?;
    update(kernels, plan, buffers, step)
}

/// Every layer's product, bias and activation; the last layer writes the logits. Mixed
/// precision first casts the weights, biases and inputs to half, as autocast does.
fn forward<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    b: &mut StepBuffers<K::Values, K::U32>,
) -> Result<(), K::Error> {
    let rows = b.rows;
    for (layer, params) in plan.layers.iter().zip(&mut b.layers) {
        if let Some((weight, bias)) = &mut params.cast {
            kernels.convert(&params.weight, weight, layer.weights(), 1.0)?;
            kernels.convert(&params.bias, bias, layer.outputs, 1.0)?;
        }
    }
    if let Some(cast) = &mut b.inputs_cast {
        kernels.convert(&b.inputs, cast, rows * plan.input_features(), 1.0)?;
    }
    let last = plan.layers.len() - 1;
    for (i, layer) in plan.layers.iter().enumerate() {
        let (done, rest) = b.hidden.split_at_mut(i.min(last));
        let input = match i {
            0 => b.inputs_cast.as_ref().unwrap_or(&b.inputs),
            _ => &done[i - 1].post,
        };
        let (weight, bias) = b.layers[i].operands();
        let (output, post) = if i < last {
            let out = &mut rest[0];
            (&mut out.pre, Some(&mut out.post))
        } else {
            (&mut b.logits, None)
        };
        kernels.linear_forward(input, weight, output, rows, layer.inputs, layer.outputs)?;
        kernels.bias_activation(output, bias, post, rows, layer.outputs, plan.activation)?;
    }
    Ok(())
}

/// Softmax cross-entropy: the per-sample losses, and the logits replaced by their gradient.
/// Mixed precision computes it in f32 and casts the gradient back to half, times the loss
/// scale when there is one.
fn loss<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    b: &mut StepBuffers<K::Values, K::U32>,
) -> Result<(), K::Error> {
    let (rows, classes) = (b.rows, plan.num_classes());
    let len = rows * classes;
    match &mut b.logits_f32 {
        Some(wide) => {
            kernels.convert(&b.logits, wide, len, 1.0)?;
            kernels.softmax_cross_entropy(wide, &b.labels, &mut b.row_loss, rows, classes)?;
            let scale = b.loss_scale.map_or(1.0, |s| s.scale);
            kernels.convert(wide, &mut b.logits, len, scale)
        }
        None => {
            kernels.softmax_cross_entropy(&mut b.logits, &b.labels, &mut b.row_loss, rows, classes)
        }
    }
}

/// Gradients from the logits' gradient back to the first layer's weights.
fn backward<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    b: &mut StepBuffers<K::Values, K::U32>,
) -> Result<(), K::Error> {
    let rows = b.rows;
    let last = plan.layers.len() - 1;
    for (i, layer) in plan.layers.iter().enumerate().rev() {
        if i < last {
            // The scratch holds the gradient of this layer's output, from the layer above.
            let grad_post = b.scratch.as_ref().expect("hidden layers have a scratch");
            kernels.activation_backward(
                grad_post,
                &mut b.hidden[i].pre,
                rows * layer.outputs,
                plan.activation,
            )?;
        }
        let grad_out = if i < last {
            &b.hidden[i].pre
        } else {
            &b.logits
        };
        let input = match i {
            0 => b.inputs_cast.as_ref().unwrap_or(&b.inputs),
            _ => &b.hidden[i - 1].post,
        };
        let params = &mut b.layers[i];
        kernels.weight_gradient(
            grad_out,
            input,
            &mut params.weight_grad,
            rows,
            layer.inputs,
            layer.outputs,
        )?;
        kernels.bias_gradient(grad_out, &mut params.bias_grad, rows, layer.outputs)?;
        if i > 0 {
            let grad_in = b.scratch.as_mut().expect("hidden layers have a scratch");
            let (weight, _) = params.operands();
            kernels.input_gradient(grad_out, weight, grad_in, rows, layer.inputs, layer.outputs)?;
        }
    }
    Ok(())
}

/// The optimizer's update of every weight and bias. Under loss scaling, as `GradScaler`: a
/// step whose gradients overflowed is skipped and halves the scale; otherwise the gradients
/// are unscaled in the update, and the scale doubles after enough clean steps.
fn update<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    b: &mut StepBuffers<K::Values, K::U32>,
    step: u32,
) -> Result<Update, K::Error> {
    let mut rule = UpdateRule::new(plan.optimizer, plan.learning_rate, step);
    if let (Some(scaler), Some(flag)) = (&mut b.loss_scale, &mut b.overflow) {
        let gradients: Vec<(&K::Values, u64)> = plan
            .layers
            .iter()
            .zip(&b.layers)
            .flat_map(|(layer, params)| {
                [
                    (&params.weight_grad, layer.weights()),
                    (&params.bias_grad, layer.outputs),
                ]
            })
            .collect();
        if kernels.any_nonfinite(&gradients, flag)? {
            *scaler = LossScale {
                scale: scaler.scale * 0.5,
                clean_steps: 0,
            };
            return Ok(Update::Skipped);
        }
        rule.grad_scale = 1.0 / scaler.scale;
        scaler.clean_steps += 1;
        if scaler.clean_steps == LOSS_SCALE_GROWTH_INTERVAL {
            *scaler = LossScale {
                scale: scaler.scale * 2.0,
                clean_steps: 0,
            };
        }
    }
    for (layer, params) in plan.layers.iter().zip(&mut b.layers) {
        kernels.optimizer_step(
            &mut params.weight,
            &params.weight_grad,
            &mut params.weight_state,
            layer.weights(),
            rule,
        )?;
        kernels.optimizer_step(
            &mut params.bias,
            &params.bias_grad,
            &mut params.bias_state,
            layer.outputs,
            rule,
        )?;
    }
    Ok(Update::Applied)
}

/// The mean loss of the last step, reduced on the device.
pub fn mean_loss<K: Kernels>(
    kernels: &mut K,
    buffers: &mut StepBuffers<K::Values, K::U32>,
) -> Result<f32, K::Error> {
    kernels.mean(&buffers.row_loss, buffers.rows, &mut buffers.loss_sum)
}

/// The step buffers of one device's kernels.
pub type DeviceBuffers<K> = StepBuffers<<K as Allocate>::Values, <K as Allocate>::U32>;

/// What [`run_probe`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeRun {
    /// Mean seconds per step, the first (warm-up) step left out when there are several.
    pub step_seconds: f64,
    /// Mean loss of the last step.
    pub final_loss: f32,
}

/// Allocates, initialises and trains `steps` steps at `rows`, returning the buffers still held
/// (so the caller can measure the memory and read parameters before they are freed).
pub fn run_probe<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    rows: u64,
    steps: u32,
    seed: u64,
) -> Result<(DeviceBuffers<K>, ProbeRun), K::Error> {
    let mut buffers = StepBuffers::allocate(plan, rows, kernels)?;
    initialise(kernels, plan, &mut buffers, seed)?;
    kernels.synchronize()?;
    let mut timed = Vec::with_capacity(steps as usize);
    for step in 1..=steps.max(1) {
        let started = std::time::Instant::now();
        train_step(kernels, plan, &mut buffers, step)?;
        kernels.synchronize()?;
        timed.push(started.elapsed().as_secs_f64());
    }
    let measured = if timed.len() > 1 {
        &timed[1..]
    } else {
        &timed[..]
    };
    let step_seconds = measured.iter().sum::<f64>() / measured.len() as f64;
    let final_loss = mean_loss(kernels, &mut buffers)?;
    Ok((
        buffers,
        ProbeRun {
            step_seconds,
            final_loss,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Activation, Buffer, Element, Precision};

    /// Records the length and storage of every allocation instead of allocating.
    #[derive(Default)]
    struct Recorder(Vec<(u64, Element)>);

    impl Stored for Storage {
        fn storage(&self) -> Storage {
            *self
        }
    }

    impl Allocate for Recorder {
        type Values = Storage;
        type U32 = ();
        type Error = ();

        fn zeroed(&mut self, len: u64, storage: Storage) -> Result<Storage, ()> {
            self.0.push((len, Element::Value(storage)));
            Ok(storage)
        }

        fn u32_zeroed(&mut self, len: u64) -> Result<(), ()> {
            self.0.push((len, Element::Label));
            Ok(())
        }
    }

    #[test]
    fn buffers_are_allocated_as_the_plan_lists_them() {
        for (hidden, optimizer) in [
            (vec![], OptimizerKind::Sgd),
            (vec![128], OptimizerKind::SgdMomentum),
            (vec![64, 32, 16], OptimizerKind::Adamw),
        ] {
            for precision in Precision::ALL {
                let plan = Plan::new(
                    784,
                    &hidden,
                    10,
                    Activation::Gelu,
                    optimizer,
                    0.1,
                    precision,
                )
                .unwrap();
                let mut recorder = Recorder::default();
                StepBuffers::<Storage, ()>::allocate(&plan, 77, &mut recorder).unwrap();
                let listed: Vec<(u64, Element)> = plan
                    .buffers(77)
                    .unwrap()
                    .iter()
                    .map(|b: &Buffer| (b.elements, b.element))
                    .collect();
                assert_eq!(recorder.0, listed, "{hidden:?} {optimizer:?} {precision}");
            }
        }
    }

    #[test]
    fn the_update_rule_decays_only_for_adamw() {
        assert_eq!(
            UpdateRule::new(OptimizerKind::Adam, 0.1, 1).weight_decay,
            0.0
        );
        assert_eq!(
            UpdateRule::new(OptimizerKind::Adamw, 0.1, 1).weight_decay,
            ADAMW_WEIGHT_DECAY
        );
        let (c1, c2) = UpdateRule::new(OptimizerKind::Sgd, 0.1, 2).bias_correction;
        assert!((c1 - 1.0 / 0.19).abs() < 1e-5 && (c2 - 1.0 / (1.0 - 0.998_001)).abs() < 1e-1);
    }
}
