//! How a training step's memory is counted: how values are stored ([`Storage`], [`Element`])
//! and which storage each precision gives them ([`Precision`]), the four places training uses
//! memory ([`Part`]), one allocation ([`Buffer`]) and how a device rounds it ([`Allocator`]),
//! the moments of a step ([`Moment`]) and the bytes at its peak ([`MemoryBreakdown`]).

use serde::{Deserialize, Serialize};

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
///   [`LOSS_SCALE_GROWTH_INTERVAL`](crate::plan::LOSS_SCALE_GROWTH_INTERVAL) clean steps.
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

/// The part of a training step an instruction belongs to, for saying when memory peaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// Before the first step: parameters, optimizer state, the batch.
    Setup,
    /// The forward pass and the loss.
    Forward,
    /// Backward.
    Backward,
    /// The optimizer's update (and, for PyTorch, `zero_grad`).
    Optimizer,
}

impl std::fmt::Display for Moment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Moment::Setup => "setup before the forward pass",
            Moment::Forward => "forward pass",
            Moment::Backward => "backward pass",
            Moment::Optimizer => "optimizer step",
        })
    }
}
