//! The model plan: the model as modules, the training around it, the four-part memory model and
//! the prediction of the largest batch a device holds.
//!
//! A device runs a plan's [`Program`]: it allocates and frees exactly the buffers the program
//! lists, in its order, so the bytes modelled here are the bytes a probe asks the device for;
//! an [`Allocator`] adds how the device rounds each request.

use serde::{Deserialize, Serialize};

mod compile;

pub use crate::memory::{
    Allocator, Buffer, Element, MemoryBreakdown, Moment, Part, Precision, Storage,
};
use crate::modules::frozen::Frozen;
use crate::modules::lora::LoraSpec;
use crate::modules::Sequential;
use crate::modules::{Context, LayerError, LayerSpec, LearntCounts, Module, Parameter, Path};
pub use crate::program::{Framework, Program, Tracing};
use compile::{compile, NoProgram};
use std::sync::Arc;

/// `GradScaler`'s first loss scale, 2^16.
pub const LOSS_SCALE_INITIAL: f32 = 65536.0;
/// Clean steps after which `GradScaler` doubles the loss scale.
pub const LOSS_SCALE_GROWTH_INTERVAL: u32 = 2000;

/// Element-wise non-linearity after each hidden layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(x, 0)`.
    #[default]
    Relu,
    /// `x * Phi(x)` in the tanh approximation.
    Gelu,
    /// Hyperbolic tangent.
    Tanh,
}

/// The update rules headroom implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Plain stochastic gradient descent: no state.
    Sgd,
    /// SGD with momentum 0.9: one velocity per parameter.
    SgdMomentum,
    /// Adam: two moments per parameter.
    Adam,
    /// Adam with decoupled weight decay: two moments per parameter.
    Adamw,
}

impl OptimizerKind {
    /// The learning rate used when the job gives none.
    pub fn default_learning_rate(self) -> f64 {
        match self {
            OptimizerKind::Sgd | OptimizerKind::SgdMomentum => 0.01,
            OptimizerKind::Adam | OptimizerKind::Adamw => 0.001,
        }
    }

    /// How many f32 values of state the optimizer keeps per parameter.
    pub fn state_per_parameter(self) -> u64 {
        match self {
            OptimizerKind::Sgd => 0,
            OptimizerKind::SgdMomentum => 1,
            OptimizerKind::Adam | OptimizerKind::Adamw => 2,
        }
    }
}

/// A job's model and training, reduced to what devices and the memory model need.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The layers as the job lists them (what the model is built from).
    layers: Vec<LayerSpec>,
    /// The model, built from `layers`.
    model: Sequential,
    /// The list's own layers, one a spec (the model's, unless LoRA wrapped it whole to freeze
    /// it: then its body's, which run the same).
    listed: Sequential,
    /// One sample's shape.
    input_shape: Vec<u64>,
    /// The vocabulary, when a sample is token ids (`[sequence_length]` of them).
    vocab: Option<u64>,
    /// Classes of the loss.
    classes: u64,
    /// Places per sample the loss is taken at: the product of the logits' leading dimensions.
    loss_positions: u64,
    /// Update rule.
    pub optimizer: OptimizerKind,
    /// Step size of the update rule.
    pub learning_rate: f32,
    /// How values are stored and computed.
    pub precision: Precision,
    /// Whose step the program follows.
    pub framework: Framework,
    /// How backward sums two gradients of one tensor.
    pub tracing: Tracing,
    /// How the parameters are sharded over GPUs (FSDP), if they are.
    pub sharding: Option<Sharding>,
    /// Hugging Face's own step, for a language model read from its config.
    pub hugging_face: Option<HuggingFaceStep>,
    counts: LearntCounts,
}

/// A Hugging Face language model's own training step, `model(input_ids, labels=labels).loss`:
/// its loss is `ForCausalLMLoss` (the logits made f32 in every precision, the labels padded
/// and shifted, the shifted copy saved by `nll_loss`), taken inside the model's forward while
/// its output holds the last hidden state and the key/value cache; the caller keeps the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HuggingFaceStep {
    /// Whether the key/value cache fills in training (`use_cache`, which gradient
    /// checkpointing turns off).
    pub use_cache: bool,
}

/// FSDP2 over `world` GPUs: `fully_shard` on every run of `blocks_per_group` top-level residual
/// blocks (a Hugging Face decoder layer is two), then on the model; the step is one rank's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    /// Ranks the parameters are sharded over.
    pub world: u64,
    /// Top-level residual blocks a `fully_shard` call takes.
    pub blocks_per_group: usize,
    /// Whether those calls let their gathered parameters go after their forward (the root's
    /// keeps them regardless).
    pub reshard_after_forward: bool,
}

impl PartialEq for Plan {
    fn eq(&self, other: &Plan) -> bool {
        (self.layers == other.layers)
            && self.input_shape == other.input_shape
            && self.vocab == other.vocab
            && self.classes == other.classes
            && self.optimizer == other.optimizer
            && self.learning_rate == other.learning_rate
            && self.precision == other.precision
            && self.framework == other.framework
            && self.tracing == other.tracing
            && self.sharding == other.sharding
            && self.hugging_face == other.hugging_face
    }
}

/// How a model is trained: the update rule and its step size, the precision, and whose step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Training {
    /// Update rule.
    pub optimizer: OptimizerKind,
    /// Step size of the update rule.
    pub learning_rate: f32,
    /// How values are stored and computed.
    pub precision: Precision,
    /// Whose step the program follows.
    pub framework: Framework,
}

/// The plan's byte counts do not fit in `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the model's byte count overflows 64 bits")]
pub struct Overflow;

/// A straight line of the step's memory against the batch size, at one instant of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeakLine {
    /// Bytes that do not depend on the batch size.
    pub fixed_bytes: u64,
    /// Bytes each sample adds.
    pub bytes_per_sample: u64,
}

/// Batch size 1 does not fit: what it needs and what there is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error(
    "the model does not fit even at batch size 1: it needs {batch_one_bytes} bytes \
     ({fixed_bytes} fixed for parameters, gradients and optimizer state), and the device has \
     {free_bytes} bytes free; use a device with more memory, a smaller model, or a leaner optimizer"
)]
pub struct DoesNotFit {
    /// Bytes that do not depend on the batch size.
    pub fixed_bytes: u64,
    /// Bytes of a whole step at batch size 1.
    pub batch_one_bytes: u64,
    /// Free bytes of the device.
    pub free_bytes: u64,
}

/// Why a layer list does not make a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A layer cannot be built, or the model does not end in the logits.
    #[error("{}: {}", .0.field, .0.reason)]
    Layer(LayerError),
    /// The step's byte counts pass `u64`.
    #[error(transparent)]
    Overflow(#[from] Overflow),
}

impl From<LayerError> for PlanError {
    fn from(error: LayerError) -> PlanError {
        PlanError::Layer(error)
    }
}

/// What a model reads: one sample's shape, and the vocabulary when it is token ids.
#[derive(Debug, Clone, Copy)]
pub struct Samples<'a> {
    /// One sample's shape (`[sequence_length]` for token ids).
    pub shape: &'a [u64],
    /// The vocabulary, for token ids.
    pub vocab: Option<u64>,
}

impl Plan {
    /// The plan of the model `layers` (at `path` in the job, `model.layers`) over samples of
    /// `input_shape`, writing `classes` logits, trained as `training` says.
    pub fn new(
        input_shape: &[u64],
        layers: &[LayerSpec],
        classes: u64,
        training: Training,
        path: &str,
    ) -> Result<Plan, PlanError> {
        let samples = Samples {
            shape: input_shape,
            vocab: None,
        };
        Plan::build(samples, layers, None, classes, training, path)
    }

    /// The plan of a model over `sequence_length` token ids below `vocab` (its first layer an
    /// embedding), as [`Plan::new`] otherwise.
    pub fn for_tokens(
        sequence_length: u64,
        vocab: u64,
        layers: &[LayerSpec],
        classes: u64,
        training: Training,
        path: &str,
    ) -> Result<Plan, PlanError> {
        let samples = Samples {
            shape: &[sequence_length],
            vocab: Some(vocab),
        };
        Plan::build(samples, layers, None, classes, training, path)
    }

    /// The loss is taken over the logits' last dimension: one label a sample (`[classes]`), or
    /// one a position (`[positions, classes]`: a token's, over a sequence).
    /// With `lora` (the job's `model.lora`), every parameter of the model is frozen and the
    /// linear layers it targets get adapters.
    pub fn build(
        samples: Samples<'_>,
        layers: &[LayerSpec],
        lora: Option<&LoraSpec>,
        classes: u64,
        training: Training,
        path: &str,
    ) -> Result<Plan, PlanError> {
        let Samples {
            shape: input_shape,
            vocab,
        } = samples;
        let root = Path::new(path);
        let mut cx = Context {
            tokens: vocab,
            lora: lora
                .map(|spec| spec.check(layers, "model.lora"))
                .transpose()?,
            ..Context::default()
        };
        let mut model = Sequential::build(layers, input_shape, &root, &mut cx)?;
        let listed = model.clone();
        if cx.lora.is_some() {
            model = Sequential::of(Arc::new(Frozen::around(model)));
        }
        let Some((&last, leading)) = model.output_shape().split_last() else {
            return Err(root.error("the model ends in no logits").into());
        };
        if last != classes || leading.len() > 1 {
            return Err(root
                .error(format!(
                    "the last layer writes {} per sample, and the loss needs [{classes}] \
                     logits (num_classes), or [positions, {classes}] for one label a position; end \
                     the list with a linear layer of {classes} out_features",
                    crate::modules::check::show(model.output_shape())
                ))
                .into());
        }
        let loss_positions = leading.iter().product();
        let counts = Parameter::counts(&model.parameters()).ok_or(Overflow)?;
        if counts.trainable == 0 {
            return Err(root
                .error(
                    "every parameter is frozen: nothing trains, and PyTorch's backward refuses a \
                     loss that needs no gradient; take at least one layer out of \"frozen\" (a \
                     head tied to a frozen embedding is frozen with it)",
                )
                .into());
        }
        let Training {
            optimizer,
            learning_rate,
            precision,
            framework,
        } = training;
        let plan = Plan {
            layers: layers.to_vec(),
            model,
            listed,
            input_shape: input_shape.to_vec(),
            vocab,
            classes,
            loss_positions,
            optimizer,
            learning_rate,
            precision,
            framework,
            tracing: Tracing::default(),
            sharding: None,
            hugging_face: None,
            counts,
        };
        plan.checked()
    }

    /// The plan, unless a module refuses its step whatever the batch, or the fixed part and one
    /// sample are not representable (larger batches are checked per use).
    fn checked(self) -> Result<Plan, PlanError> {
        if let Err(NoProgram::Refused(error)) = compile(&self, 1, 0) {
            return Err(error.into());
        }
        self.memory(1).ok_or(Overflow)?;
        Ok(self)
    }

    /// The plan of an MLP over `features` inputs: `Linear -> activation` per hidden width, then
    /// `Linear -> classes`; fails only if its byte counts overflow `u64`.
    pub fn mlp(
        features: u64,
        hidden: &[u64],
        classes: u64,
        activation: Activation,
        training: Training,
    ) -> Result<Plan, PlanError> {
        Plan::new(
            &[features],
            &mlp_layers(hidden, classes, activation, &[]),
            classes,
            training,
            "model",
        )
    }

    /// The same plan with its parameters sharded as `sharding` says; refused when a module's
    /// memory is not modelled under FSDP.
    pub fn sharded(self, sharding: Sharding) -> Result<Plan, PlanError> {
        Plan {
            sharding: Some(sharding),
            ..self
        }
        .checked()
    }

    /// The same plan, its step Hugging Face's model's own ([`HuggingFaceStep`]).
    pub fn with_hugging_face_step(self, step: HuggingFaceStep) -> Plan {
        Plan {
            hugging_face: Some(step),
            ..self
        }
    }

    /// The same plan, its step as PyTorch runs it traced or not.
    pub fn with_tracing(self, tracing: Tracing) -> Plan {
        Plan { tracing, ..self }
    }

    /// The model.
    pub fn model(&self) -> &Sequential {
        &self.model
    }

    /// The list's layers as built, one a spec of [`Plan::layers`] (inside the frozen wrapper
    /// of a LoRA model), in the model's order.
    pub fn listed(&self) -> &Sequential {
        &self.listed
    }

    /// The layers it was built from.
    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    /// Number of learnt parameters, frozen ones too, as PyTorch's `sum(p.numel() for p in
    /// model.parameters())`.
    pub fn parameter_count(&self) -> u64 {
        self.counts.all
    }

    /// Number of parameters it trains: those that are not frozen (`p.requires_grad`).
    pub fn trainable_parameter_count(&self) -> u64 {
        self.counts.trainable
    }

    /// One sample's shape.
    pub fn input_shape(&self) -> &[u64] {
        &self.input_shape
    }

    /// Values (or token ids) of one sample.
    pub fn input_features(&self) -> u64 {
        self.input_shape.iter().product()
    }

    /// The vocabulary, when a sample is token ids.
    pub fn vocab(&self) -> Option<u64> {
        self.vocab
    }

    /// Tokens in a batch of `batch_size` sequences, when a sample is token ids (`None` past
    /// `u64`, or over values).
    pub fn tokens_in(&self, batch_size: u64) -> Option<u64> {
        self.vocab
            .and_then(|_| batch_size.checked_mul(self.input_features()))
    }

    /// Labels per sample: the places the loss is taken at (1, or the sequence's tokens).
    pub fn loss_positions(&self) -> u64 {
        self.loss_positions
    }

    /// Number of classes (width of the logits).
    pub fn num_classes(&self) -> u64 {
        self.classes
    }

    /// The training step at `batch_size` as this plan's framework runs it, its synthetic batch
    /// and first parameters from `seed`; `None` when a buffer's size passes `u64` (a module's
    /// refusal [`Plan::new`] has already reported).
    pub fn program(&self, batch_size: u64, seed: u64) -> Option<Program> {
        compile(self, batch_size, seed).ok()
    }

    /// The breakdown at the step's peak at `batch_size` (exact bytes), or `None` if it
    /// overflows `u64`.
    pub fn memory(&self, batch_size: u64) -> Option<MemoryBreakdown> {
        let peak = self.program(batch_size, 0)?.peak(Allocator::Exact)?;
        Some(MemoryBreakdown {
            peak_at: Some(peak.moment),
            ..peak.memory
        })
    }

    /// Bytes the device takes at the step's peak at `batch_size`, each buffer rounded by
    /// `allocator`.
    pub fn device_bytes(&self, batch_size: u64, allocator: Allocator) -> Option<u64> {
        Some(self.program(batch_size, 0)?.peak(allocator)?.bytes)
    }

    /// The line of the step's peak at `batch_size`: the bytes that do not depend on the batch
    /// and those each sample adds, at the instant that peaks there (a step whose buffers live
    /// at different times peaks at different instants for different batches).
    pub fn peak_line(&self, batch_size: u64) -> PeakLine {
        let at = self
            .program(batch_size, 0)
            .and_then(|program| program.peak(Allocator::Exact))
            .map_or(0, |peak| peak.allocation);
        let bytes_at = |rows: u64| {
            self.program(rows, 0)
                .and_then(|program| program.memory_at(at))
                .map_or(u64::MAX, |memory| memory.total)
        };
        let fixed_bytes = bytes_at(0);
        PeakLine {
            fixed_bytes,
            bytes_per_sample: bytes_at(1).saturating_sub(fixed_bytes),
        }
    }

    /// Bytes that do not depend on the batch size, at the peak of a one-sample step.
    pub fn fixed_bytes(&self) -> u64 {
        self.peak_line(1).fixed_bytes
    }

    /// Bytes each sample adds, at the peak of a one-sample step.
    pub fn bytes_per_sample(&self) -> u64 {
        self.peak_line(1).bytes_per_sample
    }

    /// The largest batch whose step fits in `free_bytes` on a device that rounds like
    /// `allocator`, or 0 if not even one sample fits. A step's peak only grows with the batch,
    /// so the largest is found by doubling, then bisection.
    pub fn predict_max_batch(&self, free_bytes: u64, allocator: Allocator) -> u64 {
        let fits = |batch| {
            self.device_bytes(batch, allocator)
                .is_some_and(|bytes| bytes <= free_bytes)
        };
        if !fits(1) {
            return 0;
        }
        let (mut low, mut high) = (1u64, 2u64);
        while fits(high) {
            low = high;
            match high.checked_mul(2) {
                Some(next) => high = next,
                None => return low,
            }
        }
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if fits(middle) {
                low = middle;
            } else {
                high = middle;
            }
        }
        low
    }

    /// What batch size 1 needs, for a device with `free_bytes` free that cannot hold it.
    pub fn does_not_fit(&self, free_bytes: u64) -> DoesNotFit {
        let line = self.peak_line(1);
        DoesNotFit {
            fixed_bytes: line.fixed_bytes,
            batch_one_bytes: line.fixed_bytes.saturating_add(line.bytes_per_sample),
            free_bytes,
        }
    }

    /// Says so when this plan's half precision holds fewer samples than `32-true` would in
    /// `free_bytes`, since users expect the opposite: mixed precision keeps the f32 input the
    /// loader delivers and adds autocast's half copy of it (and PyTorch's `bf16-true` holds both
    /// while it casts), which for an input-heavy MLP outweighs what half activations save.
    pub fn precision_note(&self, free_bytes: u64, allocator: Allocator) -> Option<String> {
        let full = Plan {
            precision: Precision::F32True,
            ..self.clone()
        };
        let here = self.predict_max_batch(free_bytes, allocator);
        let there = full.predict_max_batch(free_bytes, allocator);
        (self.precision != Precision::F32True && here < there).then(|| {
            let why = if self.precision.is_mixed() {
                "autocast keeps the f32 input batch and adds a half copy of it, which outweighs \
                 the halved activations of this input-heavy model; a wider model gains from half \
                 precision"
            } else {
                "PyTorch holds the loader's f32 batch beside its bf16 cast until the cast is \
                 done, which outweighs the halved activations of this input-heavy model; a \
                 loader that delivers bf16, or a wider model, gains from half precision"
            };
            format!(
                "{} holds fewer samples than 32-true would here (the memory model: {here} against \
                 {there}, {} against {} bytes a sample): {why}",
                self.precision,
                self.peak_line(here.max(1)).bytes_per_sample,
                full.peak_line(there.max(1)).bytes_per_sample,
            )
        })
    }

    /// Floating-point operations of one training step at `batch_size`: two per multiply-add,
    /// the forward's and about twice as many for backward.
    pub fn step_flops(&self, batch_size: u64) -> f64 {
        6.0 * self.model.multiply_adds() as f64 * batch_size as f64
    }
}

/// The MLP shorthand as a layer list: `Linear -> activation` per hidden width, dropout of
/// `dropout[i]` after hidden layer `i`'s activation where given and not 0, then
/// `Linear -> classes`.
pub fn mlp_layers(
    hidden: &[u64],
    classes: u64,
    activation: Activation,
    dropout: &[f64],
) -> Vec<LayerSpec> {
    use crate::modules::{
        activation as act, dropout::DropoutSpec, linear::LinearSpec, NoArguments,
    };
    let linear = |out_features| {
        LayerSpec::Linear(LinearSpec {
            out_features,
            bias: true,
            tied: false,
        })
    };
    let activation = || match activation {
        Activation::Relu => LayerSpec::Relu(act::InPlaceSpec { inplace: false }),
        Activation::Tanh => LayerSpec::Tanh(NoArguments {}),
        Activation::Gelu => LayerSpec::Gelu(act::GeluSpec {
            approximate: act::Approximation::Tanh,
            implementation: act::GeluImplementation::Fused,
        }),
    };
    let mut layers = Vec::new();
    for (i, &width) in hidden.iter().enumerate() {
        layers.push(linear(width));
        layers.push(activation());
        if let Some(&p) = dropout.get(i).filter(|&&p| p > 0.0) {
            layers.push(LayerSpec::Dropout(DropoutSpec { p }));
        }
    }
    layers.push(linear(classes));
    layers
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn training(optimizer: OptimizerKind, precision: Precision, framework: Framework) -> Training {
        Training {
            optimizer,
            learning_rate: 0.01,
            precision,
            framework,
        }
    }

    fn plan(input: &[u64], hidden: &[u64], classes: u64, optimizer: OptimizerKind) -> Plan {
        let features = input.iter().product();
        let training = training(optimizer, Precision::F32True, Framework::Headroom);
        Plan::mlp(features, hidden, classes, Activation::Relu, training).unwrap()
    }

    #[test]
    fn known_parameter_counts() {
        assert_eq!(
            plan(&[1, 28, 28], &[128], 10, OptimizerKind::Sgd).parameter_count(),
            101_770
        );
        assert_eq!(
            plan(&[3, 32, 32], &[128], 10, OptimizerKind::Adam).parameter_count(),
            394_634
        );
        assert_eq!(
            plan(&[3, 32, 32], &[1024, 1024, 1024], 10, OptimizerKind::Adamw).parameter_count(),
            3072 * 1024 + 1024 + 2 * (1024 * 1024 + 1024) + 1024 * 10 + 10
        );
    }

    /// headroom's own step of 784-128-10 under SGD at batch 100, every buffer held: its parts
    /// counted by hand.
    #[test]
    fn mnist_breakdown_by_hand() {
        let p = plan(&[1, 28, 28], &[128], 10, OptimizerKind::Sgd);
        let m = p.memory(100).unwrap();
        assert_eq!(m.parameters, 101_770 * 4);
        assert_eq!(m.gradients, 101_770 * 4);
        assert_eq!(m.optimizer_state, 0);
        assert_eq!(m.batch_data, 100 * (784 + 1) * 4);
        // Per sample: its loss; the hidden layer's product and relu, and their gradients; the
        // logits, the log-probabilities and the logits' gradient. Then the mean loss.
        assert_eq!(m.activations, (100 * (1 + 4 * 128 + 3 * 10) + 1) * 4);
        assert_eq!(m.peak_at, Some(Moment::Setup));
        assert_eq!(
            m.total,
            m.parameters + m.gradients + m.batch_data + m.activations
        );
    }

    /// The plan of a job file's text, in headroom's step.
    fn headroom_plan(job: &str) -> Plan {
        let mut job: serde_json::Value = serde_json::from_str(job).unwrap();
        job["framework"] = "headroom".into();
        crate::Job::from_json(&job.to_string())
            .unwrap()
            .plan()
            .clone()
    }

    /// `examples/lenet5-mnist.json` (LeNet-5: 5x5 convolutions to 6 and 16 channels, the first
    /// padded, each max pooled 2x2, then 400-120-84-10), f32, in headroom's step, which keeps
    /// every buffer: its bytes per sample counted by hand.
    #[test]
    fn lenet5_bytes_per_sample_by_hand() {
        let plan = headroom_plan(include_str!("../../../../examples/lenet5-mnist.json"));
        assert_eq!(plan.precision, Precision::F32True);
        assert_eq!(plan.parameter_count(), 61_706);
        let input = 784 * 4 + 4 + 4; // the image, its label and its loss
                                     // Forward: each convolution's output and relu's, the pooled output and its int64
                                     // places; the MLP's products and relus, the logits, the log-probabilities.
        let forward = 2 * 6 * 28 * 28 + 6 * 14 * 14 + 2 * 16 * 10 * 10 + 16 * 5 * 5;
        let mlp = 2 * (120 + 84) + 2 * 10;
        let places = (6 * 14 * 14 + 16 * 5 * 5) * 8;
        // Backward: the logits' gradient, then each layer's input gradient down to the first
        // convolution's (whose input, the batch, needs none).
        let backward =
            10 + 2 * 84 + 2 * 120 + 400 + 2 * 16 * 10 * 10 + 6 * 14 * 14 + 2 * 6 * 28 * 28;
        assert_eq!(
            plan.bytes_per_sample(),
            input + (forward + mlp + backward) * 4 + places
        );
        assert_eq!(plan.bytes_per_sample(), 132_608);
    }

    /// A ReLU MLP to 10 classes under Adam, headroom's step (its memory is affine in the batch:
    /// every buffer lives for the whole step).
    fn adam_mlp(features: u64, hidden: &[u64], precision: Precision) -> Plan {
        let training = training(OptimizerKind::Adam, precision, Framework::Headroom);
        Plan::mlp(features, hidden, 10, Activation::Relu, training).unwrap()
    }

    /// Fixed bytes and bytes per sample of 784-128-10 and 3072-128-10 under Adam in headroom's
    /// step, by hand. Fixed: master parameters, gradients and two moments are 16 bytes a
    /// parameter in f32 (bf16-true: 8); mixed adds autocast's 2-byte copy of every weight and
    /// bias and their 2-byte gradients before each is cast to f32; then the 4-byte mean loss
    /// and, for 16-mixed, the 4-byte overflow flag. Per sample: the f32 input (plus its half
    /// copy when mixed or bf16-true, the f32 one kept too), a 4-byte label and a 4-byte loss;
    /// the hidden layer's product and relu and their gradients (width 128), the logits (and, when
    /// mixed, their f32 copy and the half copy of their gradient), the log-probabilities and
    /// the logits' gradient (f32 when mixed).
    #[test]
    fn every_precision_pins_its_memory_by_hand() {
        for (input, parameters) in [([1, 28, 28], 101_770), ([3, 32, 32], 394_634)] {
            let features: u64 = input.iter().product();
            let hidden = |value: u64| 4 * 128 * value;
            let cases = [
                (
                    Precision::F32True,
                    16 * parameters + 4,
                    features * 4 + 8 + hidden(4) + 3 * 10 * 4,
                ),
                (
                    Precision::Bf16Mixed,
                    20 * parameters + 4,
                    features * (4 + 2) + 8 + hidden(2) + 2 * 10 * 2 + 3 * 10 * 4,
                ),
                (
                    Precision::F16Mixed,
                    20 * parameters + 8,
                    features * (4 + 2) + 8 + hidden(2) + 2 * 10 * 2 + 3 * 10 * 4,
                ),
                (
                    Precision::Bf16True,
                    8 * parameters + 4,
                    features * (4 + 2) + 8 + hidden(2) + 3 * 10 * 2,
                ),
            ];
            for (precision, fixed, per_sample) in cases {
                let p = adam_mlp(features, &[128], precision);
                assert_eq!(p.parameter_count(), parameters);
                assert_eq!(p.fixed_bytes(), fixed, "{precision} {input:?}");
                assert_eq!(p.bytes_per_sample(), per_sample, "{precision} {input:?}");
            }
        }
        let mnist = |precision| adam_mlp(784, &[128], precision).bytes_per_sample();
        assert_eq!(Precision::ALL.map(mnist), [5312, 5896, 5896, 5796]);
    }

    #[test]
    fn the_precision_note_appears_only_when_half_precision_holds_fewer_samples() {
        let cifar = |hidden: &[u64], precision| {
            let training = training(OptimizerKind::Adam, precision, Framework::Pytorch);
            Plan::mlp(3072, hidden, 10, Activation::Relu, training)
                .unwrap()
                .precision_note(64 << 20, Allocator::Exact)
        };
        let note = cifar(&[128], Precision::Bf16Mixed).expect("CIFAR's input outweighs");
        for needle in ["bf16-mixed", "holds fewer samples than 32-true"] {
            assert!(note.contains(needle), "{needle:?} in {note}");
        }
        assert!(cifar(&[128], Precision::F16Mixed).is_some());
        assert_eq!(cifar(&[128], Precision::F32True), None);
        assert_eq!(cifar(&[4096, 4096, 4096], Precision::Bf16Mixed), None);
    }

    /// Mixed precision's parts in headroom's step: the half weight copies count as parameters,
    /// the half input as batch data, and the half gradients of the weight copies and the
    /// loss-scaling flag as activations.
    #[test]
    fn mixed_precision_puts_each_copy_in_its_part() {
        let memory = |precision| adam_mlp(3072, &[128], precision).memory(100).unwrap();
        let full = memory(Precision::F32True);
        let mixed = memory(Precision::F16Mixed);
        assert_eq!(mixed.parameters, full.parameters + 394_634 * 2);
        assert_eq!(mixed.gradients, full.gradients);
        assert_eq!(mixed.optimizer_state, full.optimizer_state);
        assert_eq!(mixed.batch_data, full.batch_data + 100 * 3072 * 2);
        // Half products, activations and gradients where f32 ones were; f32 copies of the
        // logits; the weight copies' half gradients; the overflow flag.
        let half = 100 * (4 * 128 + 10) * 2;
        let logits_f32 = 100 * 10 * 4;
        assert_eq!(
            mixed.activations,
            full.activations - 2 * half + half + 100 * 10 * 2 + logits_f32 + 394_634 * 2 + 4
        );
        let bf16 = memory(Precision::Bf16True);
        assert_eq!(bf16.parameters * 2, full.parameters);
        assert_eq!(bf16.optimizer_state * 2, full.optimizer_state);
    }

    #[test]
    fn optimizer_state_is_zero_one_or_two_copies() {
        for (kind, copies) in [
            (OptimizerKind::Sgd, 0),
            (OptimizerKind::SgdMomentum, 1),
            (OptimizerKind::Adam, 2),
            (OptimizerKind::Adamw, 2),
        ] {
            let m = plan(&[8], &[4], 3, kind).memory(1).unwrap();
            assert_eq!(m.optimizer_state, copies * m.parameters, "{kind:?}");
        }
    }

    /// A linear model (no hidden layer), headroom's step: per sample its loss, logits,
    /// log-probabilities and the logits' gradient; the input needs no gradient.
    #[test]
    fn a_linear_model_keeps_only_the_loss_s_buffers() {
        let p = plan(&[8], &[], 3, OptimizerKind::Sgd);
        assert_eq!(p.parameter_count(), 27);
        assert_eq!(p.memory(2).unwrap().activations, (2 * (1 + 3 * 3) + 1) * 4);
    }

    #[test]
    fn absurd_batches_overflow_to_none() {
        let p = plan(&[3, 32, 32], &[128], 10, OptimizerKind::Adam);
        assert!(p.memory(u64::MAX / 8).is_none());
        assert!(p.device_bytes(u64::MAX / 8, Allocator::CudaPages).is_none());
    }

    /// A module's refusal (here rms_norm's composite case, which depends on the precision and
    /// the framework, not the batch) reaches the plan as the layer's error.
    #[test]
    fn a_refused_step_is_a_layer_error() {
        let layers: Vec<LayerSpec> = serde_json::from_value(serde_json::json!([
            {"linear": {"out_features": 8}},
            {"rms_norm": {}},
            {"linear": {"out_features": 3}}
        ]))
        .unwrap();
        let build = |precision, framework| {
            let training = training(OptimizerKind::Sgd, precision, framework);
            Plan::new(&[8], &layers, 3, training, "model.layers")
        };
        match build(Precision::Bf16Mixed, Framework::Pytorch) {
            Err(PlanError::Layer(error)) => {
                assert_eq!(error.field, "model.layers[1]");
                assert!(error.reason.contains("16-bit input"), "{}", error.reason);
            }
            other => panic!("expected the layer's error, got {other:?}"),
        }
        assert!(build(Precision::Bf16Mixed, Framework::Headroom).is_ok());
        assert!(build(Precision::Bf16True, Framework::Pytorch).is_ok());
        assert!(build(Precision::F32True, Framework::Pytorch).is_ok());
    }

    /// A model of a linear layer of 64 over 32 features, relu, and a head of 10, with the
    /// layers `frozen` (by index) frozen, trained with Adam in f32.
    fn fine_tuned(frozen: &[usize]) -> Result<Plan, PlanError> {
        let layers = [
            serde_json::json!({"linear": {"out_features": 64}}),
            serde_json::json!({"relu": {}}),
            serde_json::json!({"linear": {"out_features": 10}}),
        ];
        let list: Vec<serde_json::Value> = layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| match frozen.contains(&i) {
                true => serde_json::json!({"frozen": {"layers": [layer]}}),
                false => layer,
            })
            .collect();
        let layers: Vec<LayerSpec> =
            serde_json::from_value(serde_json::Value::Array(list)).expect("a layer list");
        let training = training(OptimizerKind::Adam, Precision::F32True, Framework::Pytorch);
        Plan::new(&[32], &layers, 10, training, "model.layers")
    }

    /// Freezing the first layer: its 2,112 parameters stay (and count among the model's), and
    /// get no gradient and no Adam moments: at the peak (Adam's update) only the head's 650
    /// have a gradient, two moments and the `sqrt(v)` foreach Adam holds.
    #[test]
    fn a_frozen_layer_has_no_gradient_and_no_optimizer_state() {
        let (trained, backbone) = (fine_tuned(&[]).unwrap(), fine_tuned(&[0]).unwrap());
        assert_eq!(backbone.parameter_count(), 2_112 + 650);
        assert_eq!(backbone.trainable_parameter_count(), 650);
        assert_eq!(trained.trainable_parameter_count(), 2_112 + 650);
        let (all, part) = (trained.memory(8).unwrap(), backbone.memory(8).unwrap());
        assert_eq!(part.parameters, all.parameters);
        assert_eq!(all.gradients, all.parameters);
        assert_eq!(part.gradients, 650 * 4);
        assert_eq!(all.optimizer_state, 3 * all.parameters);
        assert_eq!(part.optimizer_state, 3 * 650 * 4);
    }

    #[test]
    fn a_model_with_nothing_to_train_is_refused() {
        match fine_tuned(&[0, 2]) {
            Err(PlanError::Layer(error)) => {
                assert_eq!(error.field, "model.layers");
                assert!(error.reason.contains("nothing trains"), "{}", error.reason);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn cuda_pages_round_each_buffer() {
        assert_eq!(Allocator::CudaPages.charge(1), Some(512));
        assert_eq!(Allocator::CudaPages.charge(513), Some(1024));
        assert_eq!(Allocator::CudaPages.charge((1 << 20) - 1), Some(1 << 20));
        assert_eq!(Allocator::CudaPages.charge(1 << 20), Some(2 << 20));
        assert_eq!(Allocator::CudaPages.charge((2 << 20) + 1), Some(4 << 20));
        assert_eq!(Allocator::CudaPages.charge(u64::MAX), None);
        assert_eq!(Allocator::Exact.charge(7), Some(7));
        let p = plan(&[1, 28, 28], &[128], 10, OptimizerKind::Sgd);
        let exact = p.device_bytes(1000, Allocator::Exact).unwrap();
        assert_eq!(exact, p.memory(1000).unwrap().total);
        assert!(p.device_bytes(1000, Allocator::CudaPages).unwrap() > exact);
    }

    proptest! {
        #[test]
        fn memory_is_affine_in_batch(b in 0u64..1 << 30, hidden in proptest::collection::vec(1u64..2048, 0..4)) {
            let p = plan(&[3, 16, 16], &hidden, 10, OptimizerKind::Adam);
            let m = p.memory(b).unwrap();
            prop_assert_eq!(m.total, p.fixed_bytes() + b * p.bytes_per_sample());
        }

        #[test]
        fn prediction_is_the_largest_batch_that_fits(
            free in 0u64..1 << 40,
            paged in any::<bool>(),
        ) {
            let allocator = if paged { Allocator::CudaPages } else { Allocator::Exact };
            let p = plan(&[1, 28, 28], &[128], 10, OptimizerKind::SgdMomentum);
            let b = p.predict_max_batch(free, allocator);
            if b > 0 {
                prop_assert!(p.device_bytes(b, allocator).unwrap() <= free);
            }
            prop_assert!(p.device_bytes(b + 1, allocator).unwrap() > free);
        }
    }

    /// The f32 buffers of `elements` values a step of 3 allocates, counted.
    fn f32_buffers(plan: &Plan, elements: u64) -> usize {
        let program = plan.program(3, 0).unwrap();
        let f32 = crate::memory::Element::Value(Storage::F32);
        program
            .step
            .iter()
            .filter(|instr| {
                matches!(instr, crate::program::Instr::Alloc { buffer, .. }
                    if buffer.elements == elements && buffer.element == f32)
            })
            .count()
    }

    #[test]
    fn flash_attention_s_backward_buffers_are_held_untraced_in_16_bit_only() {
        let layers: Vec<LayerSpec> = serde_json::from_value(serde_json::json!([
            {"embedding": {"embedding_dim": 40}},
            {"self_attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 40}},
            {"linear": {"out_features": 7}}
        ]))
        .unwrap();
        let plan = |precision, framework| {
            let training = training(OptimizerKind::Sgd, precision, framework);
            Plan::for_tokens(130, 7, &layers, 7, training, "model").unwrap()
        };
        // FlashAttention-2's f32 `dq` accumulator: 3 x 256 positions x 4 heads x 64.
        let accumulator = 3 * 256 * 4 * 64;
        let mixed = plan(Precision::Bf16Mixed, Framework::Pytorch);
        assert_eq!(f32_buffers(&mixed, accumulator), 1);
        let traced = mixed.clone().with_tracing(Tracing::Traced);
        assert_eq!(f32_buffers(&traced, accumulator), 0);
        for (precision, framework) in [
            (Precision::F32True, Framework::Pytorch),
            (Precision::Bf16Mixed, Framework::Headroom),
        ] {
            assert_eq!(f32_buffers(&plan(precision, framework), accumulator), 0);
        }
    }

    /// 8 features through a linear layer of 16, `layer`, and a head of 3, trained with SGD (for
    /// Hugging Face's composite modules).
    fn between(
        layer: serde_json::Value,
        precision: Precision,
        framework: Framework,
    ) -> Result<Plan, PlanError> {
        let layers: Vec<LayerSpec> = serde_json::from_value(serde_json::json!([
            {"linear": {"out_features": 16}},
            layer,
            {"linear": {"out_features": 3}}
        ]))
        .expect("a layer list");
        let training = Training {
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.1,
            precision,
            framework,
        };
        Plan::new(&[8], &layers, 3, training, "model.layers")
    }

    /// [`between`] with an RMS norm of `norm`'s arguments.
    fn normed(
        norm: serde_json::Value,
        precision: Precision,
        framework: Framework,
    ) -> Result<Plan, PlanError> {
        between(
            serde_json::json!({ "rms_norm": norm }),
            precision,
            framework,
        )
    }

    fn composite() -> serde_json::Value {
        serde_json::json!({"implementation": "composite"})
    }

    /// [`between`] with a GELU of `gelu`'s arguments.
    fn activated(
        gelu: serde_json::Value,
        precision: Precision,
        framework: Framework,
    ) -> Result<Plan, PlanError> {
        between(serde_json::json!({ "gelu": gelu }), precision, framework)
    }

    #[test]
    fn headroom_s_own_step_runs_the_composite_gelu_fused() {
        let composite = serde_json::json!({"approximate": "tanh", "implementation": "composite"});
        let fused = serde_json::json!({"approximate": "tanh"});
        for precision in Precision::ALL {
            let [fused, composite] = [&fused, &composite].map(|gelu| {
                activated(gelu.clone(), precision, Framework::Headroom)
                    .unwrap()
                    .memory(64)
            });
            assert_eq!(fused, composite, "{precision}");
        }
    }

    /// Where the fused GELU saves its input (64 x 16), the composite saves `pow`'s input,
    /// `tanh`'s output and both factors of its last product: three more, f32 in every
    /// precision but bf16-true (its `pow` widened under autocast, `0.5 * x` in bf16).
    #[test]
    fn the_composite_gelu_holds_three_more_tensors_of_its_input_s_size() {
        let composite = serde_json::json!({"approximate": "tanh", "implementation": "composite"});
        let fused = serde_json::json!({"approximate": "tanh"});
        for precision in Precision::ALL {
            let [fused, composite] = [&fused, &composite].map(|gelu| {
                let plan = activated(gelu.clone(), precision, Framework::Pytorch).unwrap();
                plan.memory(64).unwrap().total
            });
            let least = 3 * 64 * 16 * precision.compute().bytes();
            assert!(
                composite >= fused + least,
                "{precision}: {composite} {fused}"
            );
        }
        let exact = serde_json::json!({"implementation": "composite"});
        let refused = activated(exact, Precision::F32True, Framework::Pytorch);
        assert!(refused.is_err(), "the composite of the exact GELU");
    }

    #[test]
    fn headroom_s_own_step_runs_the_composite_norm_fused() {
        for precision in Precision::ALL {
            let fused = normed(serde_json::json!({}), precision, Framework::Headroom).unwrap();
            let composite = normed(composite(), precision, Framework::Headroom).unwrap();
            assert_eq!(fused.memory(64), composite.memory(64), "{precision}");
        }
    }

    /// The composite saves the normalized rows (64 x 16 f32) beside what the fused norm saves,
    /// until its backward.
    #[test]
    fn the_composite_norm_holds_the_normalized_rows_too() {
        let f32 = Precision::F32True;
        let fused = normed(serde_json::json!({}), f32, Framework::Pytorch).unwrap();
        let composite = normed(composite(), f32, Framework::Pytorch).unwrap();
        let (fused, composite) = (fused.memory(64).unwrap(), composite.memory(64).unwrap());
        assert!(
            composite.total >= fused.total + 64 * 16 * 4,
            "{composite:?} {fused:?}"
        );
    }

    #[test]
    fn the_composite_norm_takes_a_16_bit_input_alone_and_refuses_it_against_an_f32_weight() {
        assert!(normed(composite(), Precision::Bf16True, Framework::Pytorch).is_ok());
        match normed(composite(), Precision::Bf16Mixed, Framework::Pytorch) {
            Err(PlanError::Layer(error)) => {
                assert!(error.field.ends_with("implementation"), "{}", error.field);
                assert!(error.reason.contains("16-bit input"), "{}", error.reason);
            }
            other => panic!("expected the norm's refusal, got {other:?}"),
        }
    }
}
