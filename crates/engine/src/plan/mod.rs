//! The model plan: layer shapes, every buffer of a training step, the four-part memory model and
//! the prediction of the largest batch a device holds.
//!
//! A device runs a plan's [`program::Program`]: it allocates and frees exactly the buffers the
//! program lists, in its order, so the bytes modelled here are the bytes a probe asks the device
//! for; an [`Allocator`] adds how the device rounds each request.

use serde::{Deserialize, Serialize};

pub mod image;
pub mod program;

pub use image::{
    Convolution, Planes, PoolKind, Pooling, Shortcut, BATCH_NORM_EPS, BATCH_NORM_MOMENTUM,
};
pub use program::{Framework, Moment};

/// How a buffer of values stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Storage {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16: f32's exponent, 8 bits of significand.
    Bf16,
    /// IEEE half: 5 exponent bits, 11 bits of significand, largest finite 65504.
    F16,
}

impl Storage {
    /// Bytes of one value.
    pub fn bytes(self) -> u64 {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 | Storage::F16 => 2,
        }
    }

    /// The code the kernels take for it (`kernels/storage.cuh`).
    pub fn code(self) -> i32 {
        match self {
            Storage::F32 => 0,
            Storage::Bf16 => 1,
            Storage::F16 => 2,
        }
    }
}

/// What one element of a buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// A value (parameter, gradient, state, input, activation, loss).
    Value(Storage),
    /// A `u32` class label.
    Label,
    /// One byte of a dropout mask: whether the value was kept (PyTorch's `bool`).
    Mask,
    /// The place of a pooling window's maximum in its plane (PyTorch's `int64` indices).
    Index,
}

impl Element {
    /// Bytes of one element.
    pub fn bytes(self) -> u64 {
        match self {
            Element::Value(storage) => storage.bytes(),
            Element::Label => 4,
            Element::Mask => 1,
            Element::Index => 8,
        }
    }
}

/// How training stores and computes, in PyTorch Lightning's words for it.
///
/// - `32-true`: everything in f32.
/// - `bf16-mixed` and `16-mixed`, as PyTorch's autocast runs an MLP: f32 master parameters, f32
///   gradients and optimizer state; a half copy of every weight and bias for the products
///   (autocast's weight cache, remade each step); the input batch as the loader delivers it
///   (f32) plus autocast's half copy of it, which the first product reads and backward keeps;
///   products take half operands and accumulate in f32; activations saved for backward, and the
///   gradients between layers, are half; the logits are made f32 for the softmax cross-entropy,
///   and their gradient half again for backward. `16-mixed` also scales the loss as
///   `GradScaler` does: the gradients are checked for inf/NaN before the update, a step that
///   overflowed is skipped and the scale halved, and the scale doubles after
///   [`LOSS_SCALE_GROWTH_INTERVAL`] clean steps.
/// - `bf16-true`: parameters, gradients, optimizer state, the input batch and activations all in
///   bf16 (products still accumulate in f32, and updates are computed in f32 and rounded).
///
/// In every precision the per-sample losses and their mean stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Everything f32.
    #[default]
    #[serde(rename = "32-true")]
    F32True,
    /// Autocast to bfloat16 over f32 master parameters.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// Autocast to IEEE half over f32 master parameters, with dynamic loss scaling.
    #[serde(rename = "16-mixed")]
    F16Mixed,
    /// Everything bfloat16.
    #[serde(rename = "bf16-true")]
    Bf16True,
}

/// `GradScaler`'s first loss scale, 2^16.
pub const LOSS_SCALE_INITIAL: f32 = 65536.0;
/// Clean steps after which `GradScaler` doubles the loss scale.
pub const LOSS_SCALE_GROWTH_INTERVAL: u32 = 2000;

impl Precision {
    /// Every precision, as the job names them.
    pub const ALL: [Precision; 4] = [
        Precision::F32True,
        Precision::Bf16Mixed,
        Precision::F16Mixed,
        Precision::Bf16True,
    ];

    /// Its name in a job.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32True => "32-true",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16Mixed => "16-mixed",
            Precision::Bf16True => "bf16-true",
        }
    }

    /// How parameters, gradients and optimizer state are stored.
    pub fn master(self) -> Storage {
        match self {
            Precision::Bf16True => Storage::Bf16,
            _ => Storage::F32,
        }
    }

    /// How the products' operands, the activations and the gradients between layers are stored.
    pub fn compute(self) -> Storage {
        match self {
            Precision::F32True => Storage::F32,
            Precision::Bf16Mixed | Precision::Bf16True => Storage::Bf16,
            Precision::F16Mixed => Storage::F16,
        }
    }

    /// Whether f32 master parameters are autocast to a half copy each step.
    pub fn is_mixed(self) -> bool {
        matches!(self, Precision::Bf16Mixed | Precision::F16Mixed)
    }

    /// Whether the loss is scaled, as `GradScaler` does for f16.
    pub fn scales_loss(self) -> bool {
        self == Precision::F16Mixed
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

/// One layer with weights and a bias: linear (`outputs x inputs` weights, `outputs` biases) or a
/// convolution (its [`Convolution`]'s filters, one bias per output channel), maybe normalized
/// and maybe pooled after its activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    /// Values of one sample's input.
    pub inputs: u64,
    /// Values of one sample's output, before any pooling.
    pub outputs: u64,
    /// The convolution, when it is one.
    pub conv: Option<Convolution>,
    /// Whether batch norm (training mode, affine) follows the convolution, before the
    /// activation: `nn.Conv2d(bias=False)` then `nn.BatchNorm2d`. Its shift is then the layer's
    /// bias and its scale one more parameter per channel ([`Layer::scales`]).
    pub norm: bool,
    /// The residual block it ends, if any: its shortcut is added to the batch-normalized
    /// output before the activation.
    pub shortcut: Option<Shortcut>,
    /// The pooling after its activation, if any.
    pub pool: Option<Pooling>,
}

impl Layer {
    /// A linear layer from `inputs` to `outputs` values.
    pub fn linear(inputs: u64, outputs: u64) -> Layer {
        Layer {
            inputs,
            outputs,
            conv: None,
            norm: false,
            shortcut: None,
            pool: None,
        }
    }

    /// A convolution, pooled after its activation by `pool` if given.
    pub fn convolution(conv: Convolution, pool: Option<Pooling>) -> Layer {
        Layer {
            inputs: conv.inputs(),
            outputs: conv.outputs(),
            conv: Some(conv),
            norm: false,
            shortcut: None,
            pool,
        }
    }

    /// A convolution without bias, batch norm after it, then `pool` after its activation if
    /// given.
    pub fn normalized(conv: Convolution, pool: Option<Pooling>) -> Layer {
        Layer {
            norm: true,
            ..Layer::convolution(conv, pool)
        }
    }

    /// Number of weights.
    pub fn weights(&self) -> u64 {
        self.conv
            .map_or(self.inputs * self.outputs, |conv| conv.weights())
    }

    /// Number of biases: one per output, or per output channel of a convolution (batch norm's
    /// shift when normalized).
    pub fn biases(&self) -> u64 {
        self.conv.map_or(self.outputs, |conv| conv.out_channels)
    }

    /// Batch norm's scales, one per output channel; 0 without batch norm.
    pub fn scales(&self) -> u64 {
        match self.norm {
            true => self.biases(),
            false => 0,
        }
    }

    /// The layer ending a residual block whose shortcut is `shortcut`: a normalized layer (the
    /// shortcut is added as batch norm normalizes), after the block's first.
    pub fn with_shortcut(self, shortcut: Shortcut) -> Layer {
        Layer {
            shortcut: Some(shortcut),
            ..self
        }
    }

    /// The 1x1 convolution of its shortcut, if it has one.
    pub fn projection(&self) -> Option<Convolution> {
        self.shortcut.and_then(|shortcut| shortcut.projection)
    }

    /// Lengths of its parameters in PyTorch's order: weights, batch norm's scales if
    /// normalized, biases; then its shortcut's convolution weights, batch norm scales and
    /// biases, if it has one.
    pub fn parameter_lengths(&self) -> Vec<u64> {
        let own = match self.norm {
            true => vec![self.weights(), self.scales(), self.biases()],
            false => vec![self.weights(), self.biases()],
        };
        let projection = self
            .projection()
            .map(|conv| [conv.weights(), conv.out_channels, conv.out_channels]);
        own.into_iter()
            .chain(projection.into_iter().flatten())
            .collect()
    }

    /// Values each output reads (initialisation scales by it).
    pub fn fan_in(&self) -> u64 {
        self.conv.map_or(self.inputs, |conv| conv.fan_in())
    }

    /// Values of one sample's output after the pooling, the next layer's input.
    pub fn pooled(&self) -> u64 {
        self.pool.map_or(self.outputs, |pool| pool.outputs())
    }

    /// Positions each bias is added at: a convolution's output height x width, 1 for a linear
    /// layer.
    pub fn spatial(&self) -> u64 {
        self.conv
            .map_or(1, |conv| conv.out_height() * conv.out_width())
    }
}

/// A job's network and optimizer, reduced to what devices and the memory model need.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Linear layers from input to logits; all but the last are followed by `activation`.
    pub layers: Vec<Layer>,
    /// Non-linearity after each hidden layer.
    pub activation: Activation,
    /// Probability of dropout after each hidden layer's activation, one per hidden layer; 0 is
    /// none (PyTorch's `Dropout(0)` returns its input).
    pub dropout: Vec<f32>,
    /// Update rule.
    pub optimizer: OptimizerKind,
    /// Step size of the update rule.
    pub learning_rate: f32,
    /// How values are stored and computed.
    pub precision: Precision,
    /// Whose step the program follows.
    pub framework: Framework,
    parameter_count: u64,
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

/// Which of the four places training uses memory a buffer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// Weights and biases (and batch norm's running statistics, kept between steps).
    Parameters,
    /// One gradient per parameter.
    Gradients,
    /// Momentum or Adam moments.
    OptimizerState,
    /// The input batch and its labels.
    BatchData,
    /// What forward keeps for backward, the backward scratch and the loss.
    Activations,
}

/// One allocation of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Where the model counts it.
    pub part: Part,
    /// Number of elements.
    pub elements: u64,
    /// What each element is.
    pub element: Element,
}

impl Buffer {
    /// Bytes asked for, or `None` past `u64`.
    pub fn bytes(&self) -> Option<u64> {
        self.elements.checked_mul(self.element.bytes())
    }
}

/// How a device rounds each allocation it is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    /// The exact bytes (the host device's ledger).
    Exact,
    /// The CUDA allocator's pages: 2 MiB pages from 1 MiB up, 512-byte granules below. The
    /// granularity is the driver's documented page size; docs/gpu-runs.md tracks its check on a GPU.
    CudaPages,
    /// PyTorch's CUDA caching allocator as `torch.cuda.memory_allocated` counts it: every block
    /// rounded up to 512 bytes. What it reserves beyond that (segments of 2 MiB and 20 MiB,
    /// fragmentation) is not modelled; docs/gpu-runs.md says how a GPU run checks it.
    PytorchCaching,
}

impl Allocator {
    /// The bytes a request of `bytes` takes on the device.
    pub fn charge(self, bytes: u64) -> Option<u64> {
        match self {
            Allocator::Exact => Some(bytes),
            Allocator::CudaPages if bytes >= 1 << 20 => round_up(bytes, 2 << 20),
            Allocator::CudaPages | Allocator::PytorchCaching => round_up(bytes, 512),
        }
    }
}

fn round_up(value: u64, to: u64) -> Option<u64> {
    Some(value.checked_add(to - 1)? / to * to)
}

/// Device bytes of one training step at its peak, in the four places training uses memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBreakdown {
    /// Weights and biases (and batch norm's running statistics).
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
    /// When in the step the peak falls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_at: Option<Moment>,
}

impl MemoryBreakdown {
    /// The bytes of `part`.
    pub fn part(&self, part: Part) -> u64 {
        match part {
            Part::Parameters => self.parameters,
            Part::Gradients => self.gradients,
            Part::OptimizerState => self.optimizer_state,
            Part::BatchData => self.batch_data,
            Part::Activations => self.activations,
        }
    }

    /// The bytes of `part`, to change.
    pub fn part_mut(&mut self, part: Part) -> &mut u64 {
        match part {
            Part::Parameters => &mut self.parameters,
            Part::Gradients => &mut self.gradients,
            Part::OptimizerState => &mut self.optimizer_state,
            Part::BatchData => &mut self.batch_data,
            Part::Activations => &mut self.activations,
        }
    }
}

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

impl Plan {
    /// The plan of an MLP over `features` inputs; fails only if its byte counts overflow `u64`.
    pub fn new(
        features: u64,
        hidden: &[u64],
        classes: u64,
        activation: Activation,
        training: Training,
    ) -> Result<Plan, Overflow> {
        Plan::convolutional(&[], features, hidden, classes, activation, training)
    }

    /// The plan of `convolutions` (convolution layers, each followed by its batch norm if any,
    /// the activation, then its pooling if any), flattened into an MLP over the last one's
    /// pooled output (`features` without convolutions); fails only if its byte counts overflow
    /// `u64`. The layer walk ([`crate::layers::walk`]) has checked that each convolution reads
    /// what the one before writes.
    pub fn convolutional(
        convolutions: &[Layer],
        features: u64,
        hidden: &[u64],
        classes: u64,
        activation: Activation,
        training: Training,
    ) -> Result<Plan, Overflow> {
        let Training {
            optimizer,
            learning_rate,
            precision,
            framework,
        } = training;
        assert!(
            convolutions
                .iter()
                .filter_map(|layer| layer.shortcut)
                .all(|shortcut| shortcut.from > 0),
            "a residual block starts after the network's first layer (the layer walk refuses one \
             at the start)"
        );
        let mut layers = convolutions.to_vec();
        let flat = layers.last().map_or(features, Layer::pooled);
        let widths: Vec<u64> = std::iter::once(flat)
            .chain(hidden.iter().copied())
            .chain(std::iter::once(classes))
            .collect();
        layers.extend(widths.windows(2).map(|w| Layer::linear(w[0], w[1])));
        let parameter_count = layers.iter().try_fold(0u64, |acc, layer| {
            let weights = match layer.conv {
                Some(conv) => conv.out_channels.checked_mul(conv.fan_in()),
                None => layer.inputs.checked_mul(layer.outputs),
            };
            let projection = layer.projection().map_or(Some(0), |conv| {
                conv.out_channels
                    .checked_mul(conv.fan_in())?
                    .checked_add(2 * conv.out_channels)
            });
            weights
                .and_then(|w| w.checked_add(layer.biases()))
                .and_then(|p| p.checked_add(layer.scales()))
                .and_then(|p| p.checked_add(projection?))
                .and_then(|p| acc.checked_add(p))
        });
        let hidden_layers = layers.len() - 1;
        let plan = Plan {
            layers,
            activation,
            dropout: vec![0.0; hidden_layers],
            optimizer,
            learning_rate,
            precision,
            framework,
            parameter_count: parameter_count.ok_or(Overflow)?,
        };
        // The fixed part and one sample must be representable; larger batches are checked per use.
        plan.memory(1).ok_or(Overflow)?;
        Ok(plan)
    }

    /// The plan with dropout of probability `p[i]` (in `[0, 1)`) after the MLP's hidden layer
    /// `i`'s activation (the linear layers after any convolutions: the programs model dropout
    /// there only); hidden layers past `p`'s end have none.
    pub fn with_dropout(mut self, p: &[f32]) -> Plan {
        let convolutions = self.layers.iter().take_while(|l| l.conv.is_some()).count();
        for (kept, &p) in self.dropout.iter_mut().skip(convolutions).zip(p) {
            *kept = p;
        }
        self
    }

    /// The dropout after hidden layer `i`'s activation, if any.
    pub fn dropout_after(&self, i: usize) -> Option<f32> {
        self.dropout.get(i).copied().filter(|&p| p > 0.0)
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

    /// Width of headroom's backward scratch buffer, which holds the gradient of each hidden
    /// layer's (pooled) output in turn: the widest, 0 without hidden layers.
    pub fn scratch_width(&self) -> u64 {
        self.layers[1..].iter().map(|l| l.inputs).max().unwrap_or(0)
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

    /// Floating-point operations of one training step at `batch_size` (three products per layer,
    /// two operations per multiply-add, a convolution's weights applied at each of its output
    /// positions, less the unneeded input gradient of the first layer).
    pub fn step_flops(&self, batch_size: u64) -> f64 {
        let per_sample: u64 = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let products = if i == 0 { 2 } else { 3 };
                products * 2 * l.weights() * l.spatial()
            })
            .sum();
        per_sample as f64 * batch_size as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plan(input: &[u64], hidden: &[u64], classes: u64, optimizer: OptimizerKind) -> Plan {
        Plan::new(
            input.iter().product(),
            hidden,
            classes,
            Activation::Relu,
            Training {
                optimizer,
                learning_rate: 0.01,
                precision: Precision::F32True,
                framework: Framework::Headroom,
            },
        )
        .unwrap()
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

    #[test]
    fn mnist_breakdown_by_hand() {
        let p = plan(&[1, 28, 28], &[128], 10, OptimizerKind::Sgd);
        let m = p.memory(100).unwrap();
        assert_eq!(m.parameters, 101_770 * 4);
        assert_eq!(m.gradients, 101_770 * 4);
        assert_eq!(m.optimizer_state, 0);
        assert_eq!(m.batch_data, 100 * (784 + 1) * 4);
        // pre + post of the hidden layer, logits, per-sample loss, scratch of width 128; + loss sum
        assert_eq!(m.activations, (100 * (2 * 128 + 10 + 1 + 128) + 1) * 4);
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
        let input = 784 * 4 + 4; // the image and its label
        let conv1 = 2 * 6 * 28 * 28 * 4 + 6 * 14 * 14 * (4 + 8); // pre, post; pooled, places
        let conv2 = 2 * 16 * 10 * 10 * 4 + 16 * 5 * 5 * (4 + 8);
        let mlp = 2 * (120 + 84) * 4 + 10 * 4 + 4; // pre, post; logits; the sample's loss
        let scratch = 6 * 14 * 14 * 4; // the widest gradient between layers: conv2's input
        assert_eq!(
            plan.bytes_per_sample(),
            input + conv1 + conv2 + mlp + scratch
        );
        assert_eq!(plan.bytes_per_sample(), 78_864);
    }

    /// `examples/cifar10-cnn-bn.json` (3x3 convolutions without bias to 32, 64 and 128
    /// channels, each with batch norm and ReLU, max pooled 2x2 after the first two, global
    /// average pooling, a linear layer to 10), f32 under SGD with momentum, in headroom's step:
    /// its fixed bytes and bytes per sample counted by hand.
    #[test]
    fn batch_norm_cnn_bytes_by_hand() {
        let plan = headroom_plan(include_str!("../../../../examples/cifar10-cnn-bn.json"));
        // PyTorch's sum(p.numel()) of the same nn.Sequential.
        assert_eq!(plan.parameter_count(), 94_762);
        let channels = 32 + 64 + 128;
        // Master values, gradients, velocities; running mean and variance, and an int64 step
        // count per batch norm; the saved mean and invstd; the mean loss.
        let fixed = 94_762 * 3 * 4 + (2 * channels * 4 + 3 * 8) + 2 * channels * 4 + 4;
        assert_eq!(plan.fixed_bytes(), fixed);
        let input = 3 * 32 * 32 * 4 + 4; // the image and its label
                                         // The convolution's output, batch norm's, ReLU's; the pooled output (max: and places).
        let conv1 = 3 * 32 * 32 * 32 * 4 + 32 * 16 * 16 * (4 + 8);
        let conv2 = 3 * 64 * 16 * 16 * 4 + 64 * 8 * 8 * (4 + 8);
        let conv3 = 3 * 128 * 8 * 8 * 4 + 128 * 4;
        let logits = 10 * 4 + 4; // and the sample's loss
        let scratch = 32 * 16 * 16 * 4; // the widest gradient between layers: conv2's input
        assert_eq!(
            plan.bytes_per_sample(),
            input + conv1 + conv2 + conv3 + logits + scratch
        );
        assert_eq!(plan.bytes_per_sample(), 881_200);
    }

    /// `examples/resnet18-cifar10.json` (the CIFAR ResNet-18: a 3x3 stem to 64 channels, four
    /// stages of two basic blocks at 64, 128, 256 and 512 channels, the first block of the last
    /// three at stride 2 with a 1x1 projection shortcut; batch norm after every convolution;
    /// global average pooling; a linear layer to 10), f32 under SGD with momentum, in
    /// headroom's step: its fixed bytes and bytes per sample counted by hand.
    #[test]
    fn resnet18_bytes_by_hand() {
        let plan = headroom_plan(include_str!("../../../../examples/resnet18-cifar10.json"));
        assert_eq!(plan.parameter_count(), 11_173_962);
        // Batch norm's channels: the stem, four convolutions a stage, three projections.
        let channels = 64 + 4 * (64 + 128 + 256 + 512) + (128 + 256 + 512);
        let norms = 1 + 16 + 3;
        // Values, gradients, velocities; running statistics and step counts; the saved
        // statistics; the mean loss.
        let fixed = 11_173_962 * 3 * 4 + (2 * channels * 4 + norms * 8) + 2 * channels * 4 + 4;
        assert_eq!(plan.fixed_bytes(), fixed);
        let input = 3 * 32 * 32 * 4 + 4; // the image and its label
                                         // Each convolution's output, batch norm's (a block's sum, at its end) and the
                                         // activation's: the stem and four convolutions a stage.
        let outputs = 64 * 32 * 32 + 4 * (64 * 32 * 32 + 128 * 16 * 16 + 256 * 8 * 8 + 512 * 4 * 4);
        let convolutions = 3 * outputs * 4;
        // A projection's convolution and batch norm outputs, and the gradient of its block's
        // input it carries (an identity's is its block's batch norm output, held anyway).
        let projected = 128 * 16 * 16 + 256 * 8 * 8 + 512 * 4 * 4;
        let carried = 64 * 32 * 32 + 128 * 16 * 16 + 256 * 8 * 8;
        let shortcuts = (2 * projected + carried) * 4;
        let pooled = 512 * 4; // the global average
        let logits = 10 * 4 + 4; // and the sample's loss
        let scratch = 64 * 32 * 32 * 4; // the widest gradient between layers: layer1's input
        assert_eq!(
            plan.bytes_per_sample(),
            input + convolutions + shortcuts + pooled + logits + scratch
        );
        assert_eq!(plan.bytes_per_sample(), 7_878_704);
    }

    /// A ReLU MLP to 10 classes under Adam, headroom's step (its memory is affine in the batch:
    /// every buffer lives for the whole step).
    fn adam_mlp(features: u64, hidden: &[u64], precision: Precision) -> Plan {
        Plan::new(
            features,
            hidden,
            10,
            Activation::Relu,
            Training {
                optimizer: OptimizerKind::Adam,
                learning_rate: 0.001,
                precision,
                framework: Framework::Headroom,
            },
        )
        .unwrap()
    }

    /// Fixed bytes and bytes per sample of 784-128-10 and 3072-128-10 under Adam, by hand.
    /// Fixed: f32 master weights, gradients and two moments are 16 bytes a parameter (bf16-true:
    /// 8), mixed adds a 2-byte weight copy; then the 4-byte mean loss and, for 16-mixed, the
    /// 4-byte overflow flag. Per sample: the input (f32, plus a half copy when mixed; bf16 alone
    /// for bf16-true), a 4-byte label, pre- and post-activation and scratch of width 128 and the
    /// logits in the compute storage, an f32 copy of the logits when mixed, a 4-byte loss.
    #[test]
    fn every_precision_pins_its_memory_by_hand() {
        for (input, parameters) in [([1, 28, 28], 101_770), ([3, 32, 32], 394_634)] {
            let features: u64 = input.iter().product();
            let hidden_and_logits = |value: u64| (3 * 128 + 10) * value;
            let cases = [
                (
                    Precision::F32True,
                    16 * parameters + 4,
                    features * 4 + 4 + hidden_and_logits(4) + 4,
                ),
                (
                    Precision::Bf16Mixed,
                    18 * parameters + 4,
                    features * (4 + 2) + 4 + hidden_and_logits(2) + 10 * 4 + 4,
                ),
                (
                    Precision::F16Mixed,
                    18 * parameters + 8,
                    features * (4 + 2) + 4 + hidden_and_logits(2) + 10 * 4 + 4,
                ),
                (
                    Precision::Bf16True,
                    8 * parameters + 4,
                    features * 2 + 4 + hidden_and_logits(2) + 4,
                ),
            ];
            for (precision, fixed, per_sample) in cases {
                let p = adam_mlp(features, &[128], precision);
                assert_eq!(p.parameter_count(), parameters);
                assert_eq!(p.fixed_bytes(), fixed, "{precision} {input:?}");
                assert_eq!(p.bytes_per_sample(), per_sample, "{precision} {input:?}");
            }
        }
        // The numbers, for the README: MNIST 4720 / 5540 / 5540 / 2364 bytes a sample, CIFAR
        // 13872 / 19268 / 19268 / 6940; an input-heavy MLP holds fewer samples in bf16-mixed.
        let mnist = |precision| adam_mlp(784, &[128], precision).bytes_per_sample();
        assert_eq!(Precision::ALL.map(mnist), [4720, 5540, 5540, 2364]);
    }

    #[test]
    fn the_precision_note_appears_only_when_half_precision_holds_fewer_samples() {
        let cifar = |hidden: &[u64], precision| {
            adam_mlp(3072, hidden, precision).precision_note(64 << 20, Allocator::Exact)
        };
        let note = cifar(&[128], Precision::Bf16Mixed).expect("CIFAR's input outweighs");
        for needle in ["bf16-mixed", "3114 against 4382", "19268 against 13872"] {
            assert!(note.contains(needle), "{needle:?} in {note}");
        }
        assert!(cifar(&[128], Precision::F16Mixed).is_some());
        assert_eq!(cifar(&[128], Precision::F32True), None);
        assert_eq!(cifar(&[128], Precision::Bf16True), None);
        assert_eq!(cifar(&[4096, 4096, 4096], Precision::Bf16Mixed), None);
    }

    /// Mixed precision's parts: the half weight copy counts as parameters, the half input as
    /// batch data, and the loss-scaling flag as activations.
    #[test]
    fn mixed_precision_puts_each_copy_in_its_part() {
        let memory = |precision| adam_mlp(3072, &[128], precision).memory(100).unwrap();
        let full = memory(Precision::F32True);
        let mixed = memory(Precision::F16Mixed);
        assert_eq!(mixed.parameters, full.parameters + 394_634 * 2);
        assert_eq!(mixed.gradients, full.gradients);
        assert_eq!(mixed.optimizer_state, full.optimizer_state);
        assert_eq!(mixed.batch_data, full.batch_data + 100 * 3072 * 2);
        // Half pre/post/scratch/logits, plus f32 logits and the overflow flag.
        assert_eq!(
            mixed.activations,
            full.activations - 100 * (3 * 128 + 10) * 2 + 100 * 10 * 4 + 4
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

    #[test]
    fn no_hidden_layer_needs_no_scratch() {
        let p = plan(&[8], &[], 3, OptimizerKind::Sgd);
        assert_eq!(p.parameter_count(), 27);
        assert_eq!(p.memory(2).unwrap().activations, (2 * (3 + 1) + 1) * 4);
    }

    #[test]
    fn absurd_batches_overflow_to_none() {
        let p = plan(&[3, 32, 32], &[128], 10, OptimizerKind::Adam);
        assert!(p.memory(u64::MAX / 8).is_none());
        assert!(p.device_bytes(u64::MAX / 8, Allocator::CudaPages).is_none());
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
        // The MNIST step at batch 1000: eleven buffers, the four batch-sized ones past 1 MiB.
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
}
