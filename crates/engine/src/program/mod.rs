//! A training step as a program: every buffer it allocates and frees and every kernel it runs,
//! in order, compiled from a plan for one batch size (`plan::compile`: parameters, optimizer
//! state and the batch, the model's forward, the loss, backward and the optimizer's update).
//! The memory model walks the program's allocations ([`Program::peak`]) and every device runs
//! the same program ([`crate::step::Executor`]), so the bytes modelled are the bytes a probe
//! asks for, in the order it asks for them.
//!
//! - [`instr`]: the instruction set: allocations, frees and the kernels of each family.
//! - [`graph`]: the builder modules record their forward on: tensors and their references,
//!   autograd's nodes and what each saves, and backward run as PyTorch's engine runs it.
//! - [`geometry`]: what the kernels are told of a layer (a convolution's, a pooling's, batch
//!   norm's planes, a non-linearity).
//! - [`framework`]: whose step: PyTorch's order of frees and its temporaries, or headroom's
//!   own, every buffer held.
//! - [`peak`]: the most memory a program holds, and when.

pub mod framework;
pub mod geometry;
pub mod graph;
pub mod instr;
pub mod peak;

pub use framework::{Framework, Tracing};
pub use instr::{
    Affine, AttentionGradients, AttentionSaved, BatchStatistics, Instr, LayerAffine, Moment,
    OptimizerState, RowStatistics, RunningStatistics, SavedAs, Scale, Slot,
};
pub use peak::Peak;

/// A compiled training step at one batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// The batch size it trains.
    pub batch_size: u64,
    /// How many slots an executor needs.
    pub slots: usize,
    /// Once per probe, before the first step: persistent buffers and their first values.
    pub setup: Vec<Instr>,
    /// Every training step; it frees whatever it allocates.
    pub step: Vec<Instr>,
    /// Every trained parameter in PyTorch's order (`model.parameters()`), with its length.
    pub parameters: Vec<(Slot, u64)>,
    /// Their gradients, in the same order, alive when the optimizer's moment begins.
    pub gradients: Vec<(Slot, u64)>,
    /// Every frozen parameter in the same order, with its length: filled in setup, read by
    /// the forward, never updated.
    pub frozen: Vec<(Slot, u64)>,
    /// The input batch as the loader delivers it, and its labels.
    pub inputs: (Slot, Slot),
    /// The per-row losses of the last step (a row a sample, or a token) and the one-value
    /// accumulator of their mean.
    pub loss: (Slot, Slot),
    /// How many per-row losses there are.
    pub loss_rows: u64,
    /// Whether the step scales the loss (`16-mixed`).
    pub scales_loss: bool,
}

impl Program {
    /// The step's instructions before `moment` begins (all of them if it never does).
    pub fn until(&self, moment: Moment) -> &[Instr] {
        let end = self
            .step
            .iter()
            .position(|instr| *instr == Instr::Enter(moment))
            .unwrap_or(self.step.len());
        &self.step[..end]
    }
}
