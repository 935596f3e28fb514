//! What the search probes: the [`Device`] trait, and what a device reports. The devices
//! themselves (the host reference, CUDA) live in the `headroom-devices` crate; the search
//! never learns which one it probes.

use serde::{Deserialize, Serialize};

use crate::plan::{Allocator, Plan};
use crate::step::{self, Kernels, Steps};

/// Which implementation a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The CPU reference.
    Host,
    /// An NVIDIA GPU.
    Cuda,
}

impl DeviceKind {
    /// How this kind of device rounds each allocation.
    pub fn allocator(self) -> Allocator {
        match self {
            DeviceKind::Host => Allocator::Exact,
            DeviceKind::Cuda => Allocator::CudaPages,
        }
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Implementation.
    pub kind: DeviceKind,
    /// Index among devices of its kind.
    pub index: u32,
    /// Human-readable name (GPU model, or the host's budget).
    pub name: String,
    /// A GPU's UUID, `GPU-...` as NVML and DCGM write it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Memory the device has in all, bytes.
    pub total_bytes: u64,
    /// Memory free for a probe right now, bytes.
    pub free_bytes: u64,
}

/// What a probe that fitted measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Median wall time of one training step, seconds (after the first step when there are
    /// several).
    pub step_seconds: f64,
    /// The timed steps' interquartile range relative to their median.
    pub step_seconds_spread: f64,
    /// Steps timed (the warm-up step left out).
    pub timed_steps: u32,
    /// The most device bytes the probe held at once, as the device itself counts them.
    pub device_bytes: u64,
    /// Mean loss of the last step.
    pub final_loss: f32,
}

/// How fast a probe that fitted trained, when its timer gave a usable time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speed {
    /// Median seconds per step.
    pub step_seconds: f64,
    /// The timed steps' interquartile range relative to their median.
    pub spread: f64,
}

impl Speed {
    /// Samples a second at `batch_size`.
    pub fn samples_per_second(&self, batch_size: u64) -> f64 {
        batch_size as f64 / self.step_seconds
    }
}

impl StepReport {
    /// The probe's speed, or `None` when its timer gave no usable time (a GPU's event pair read
    /// as NaN, infinity or nothing): such a probe fitted, but has no say in the knee, and no
    /// number JSON cannot carry reaches an answer.
    pub fn speed(&self) -> Option<Speed> {
        let usable = self.step_seconds.is_finite()
            && self.step_seconds > 0.0
            && self.step_seconds_spread.is_finite();
        usable.then_some(Speed {
            step_seconds: self.step_seconds,
            spread: self.step_seconds_spread,
        })
    }
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
    /// parameters from `seed` on the device, runs the training `steps`, frees everything and
    /// reports. A failed allocation is [`DeviceError::OutOfMemory`].
    fn run_steps(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: Steps,
        seed: u64,
    ) -> Result<StepReport, DeviceError>;
}

/// What a device with real kernels does around each probe and how it counts its memory. Every
/// such device is a [`Device`] through these hooks; the probe itself is [`step::run_probe`].
pub trait Probing: Kernels<Error = DeviceError> + Send {
    /// Identity and current memory.
    fn describe(&self) -> DeviceInfo;

    /// Readies the device for a probe and starts counting its highest memory anew; returns the
    /// bytes this process holds on it beforehand.
    fn begin_probe(&mut self) -> Result<u64, DeviceError>;

    /// The most bytes this process has held on the device since the probe began.
    fn peak_bytes(&mut self) -> Result<u64, DeviceError>;

    /// Runs once the probe's buffers are freed: recovers from a fault, and checks that the
    /// memory held `before` the probe is all that is held again.
    fn end_probe(&mut self, before: u64) -> Result<(), DeviceError>;
}

impl<D: Probing> Device for D {
    fn info(&self) -> DeviceInfo {
        self.describe()
    }

    fn run_steps(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: Steps,
        seed: u64,
    ) -> Result<StepReport, DeviceError> {
        let before = self.begin_probe()?;
        let report =
            step::run_probe(self, plan, batch_size, steps, seed).and_then(|(executor, _, run)| {
                drop(executor);
                Ok(StepReport {
                    step_seconds: run.step_seconds,
                    step_seconds_spread: run.step_seconds_spread,
                    timed_steps: run.timed_steps,
                    device_bytes: self.peak_bytes()?.saturating_sub(before),
                    final_loss: run.final_loss,
                })
            });
        let ended = self.end_probe(before);
        match (report, ended) {
            // The probe's own fault says most; a failed clean-up outranks a fit or an OOM.
            (Err(fault @ DeviceError::Fault(_)), _) => Err(fault),
            (_, Err(cleanup)) => Err(cleanup),
            (report, Ok(())) => report,
        }
    }
}
