//! Devices that run training steps: the `Device` trait and its implementations.
//!
//! - [`host`]: the CPU reference with a memory budget.
//! - [`cuda`]: hand-written CUDA kernels through cudarc and NVRTC.
//!
//! The search sees only [`Device`]; it never learns which one it probes.

pub mod cuda;
pub mod host;
pub mod nvml;
pub mod select;

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Which implementation a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The CPU reference.
    Host,
    /// An NVIDIA GPU.
    Cuda,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Host => "host",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// Identity and memory of a device, as reported in results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceInfo {
    /// Implementation.
    pub kind: DeviceKind,
    /// Index among devices of its kind.
    pub index: u32,
    /// Human-readable name (GPU model, or the host's budget).
    pub name: String,
    /// Memory the device has in all, bytes.
    pub total_bytes: u64,
    /// Memory free for a probe right now, bytes.
    pub free_bytes: u64,
}

/// What a probe that fitted measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean wall time of one training step, seconds (after the first step when there are several).
    pub step_seconds: f64,
    /// Device bytes the probe held, as the device itself counts them.
    pub device_bytes: u64,
    /// Mean loss of the last step.
    pub final_loss: f32,
}

/// Why a probe did not run. Out-of-memory is a type of its own, never inferred from a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// An allocation failed for lack of memory: the batch is too large.
    #[error("out of memory allocating {requested_bytes} bytes ({free_bytes} bytes free)")]
    OutOfMemory {
        /// The allocation that failed.
        requested_bytes: u64,
        /// What the device said was free at the time.
        free_bytes: u64,
    },
    /// Any other failure: a driver error, a kernel fault, a missing library. Stops the search.
    #[error("device fault: {0}")]
    Fault(String),
}

/// A device the search can probe.
pub trait Device: Send {
    /// Identity and current memory.
    fn info(&self) -> DeviceInfo;

    /// Allocates every buffer of `plan` at `batch_size`, generates the synthetic batch and
    /// parameters from `seed` on the device, runs `steps` training steps, frees everything and
    /// reports. A failed allocation is [`DeviceError::OutOfMemory`].
    fn run_steps(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: u32,
        seed: u64,
    ) -> Result<StepReport, DeviceError>;

    /// Runs `steps` training steps like [`Device::run_steps`] and returns every parameter
    /// afterwards, layer by layer (weights, then biases): the cross-device parity check.
    fn trained_parameters(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: u32,
        seed: u64,
    ) -> Result<Vec<f32>, DeviceError>;
}
