//! Whose step a program follows ([`Framework`]), and whether PyTorch's step runs under a
//! tracer ([`Tracing`]).

use serde::{Deserialize, Serialize};

/// Whose training step the answer describes.
///
/// - `pytorch` follows what PyTorch does for the same model, optimizer and precision, step by
///   step as its autograd and `foreach` optimizers allocate and free: the loader's batch, each
///   layer's output, autocast's copies (kept while backward needs them), what autograd saves,
///   freed after its last use in backward, gradients created in backward and freed by
///   `zero_grad(set_to_none=True)`, and the temporaries of the optimizer's update. Where
///   headroom's kernels need less than PyTorch's (a fused update needs no `sqrt(v)` list; the
///   fused loss needs no separate one-hot gradient) the program still holds PyTorch's buffer for
///   as long as PyTorch holds it, so that a probe's peak is PyTorch's peak.
/// - `headroom` runs the same kernels on buffers allocated once, before the first step, and
///   held: nothing is freed or reused, and PyTorch's own temporaries are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framework {
    /// PyTorch's: its order of allocations and frees, its optimizers' temporaries.
    #[default]
    Pytorch,
    /// headroom's own kernels, every buffer held for the whole step.
    Headroom,
}

impl Framework {
    /// The framework of results stored before jobs named one: headroom's own step.
    pub fn before_profiles() -> Framework {
        Framework::Headroom
    }

    /// Its name in a job.
    pub fn name(self) -> &'static str {
        match self {
            Framework::Pytorch => "pytorch",
            Framework::Headroom => "headroom",
        }
    }
}

impl std::fmt::Display for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether PyTorch's step runs under a dispatch-mode tracer (PyTorch's `MemTracker`, any
/// `TorchDispatchMode`), which changes two things the profile models:
///
/// - Gradients of a tensor read twice (a residual block's input): PyTorch's engine adds the
///   second into the first in place when it holds the first's only reference
///   (`InputBuffer::accumulate`); under a tracer every tensor that passed through Python holds
///   one more reference, so the engine adds them out of place, into a new tensor.
/// - Buffers CUDA's kernels allocate inside an operation (FlashAttention-2's backward
///   accumulators, [`crate::program::graph::Graph::cuda_workspace`]): a tracer sees only the
///   tensors operations return, and a CPU trace runs no CUDA kernel.
///
/// Untraced is what a training run does; traced is what PyTorch's own accounting of the step
/// sees, and what `estimate --traced` models for checking against it
/// (`tests/pytorch/memory_check.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Tracing {
    /// A training run: gradients summed in place, CUDA's workspaces held.
    #[default]
    Untraced,
    /// Under a tracer: gradients summed into a new tensor, no workspace seen.
    Traced,
}
