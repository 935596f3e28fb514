//! What the search probes: the [`Device`] trait, and what a device reports. The devices
//! themselves (the host reference, CUDA) live in the `headroom-devices` crate; the search
//! never learns which one it probes.

use serde::{Deserialize, Serialize};

use crate::plan::{Allocator, Plan};
use crate::step::{self, Kernels};

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

/// How long a probe trains: at least `at_least` steps, then more while the timed steps add up
/// to less than `min_timed_seconds` and fewer than [`MAX_TIMED_STEPS`] are timed. A step of a
/// small batch takes microseconds, and one such step timed alone is mostly noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Steps {
    /// Steps run whatever they take (the first is a warm-up when there are several).
    pub at_least: u32,
    /// Keep stepping until the timed steps add up to this many seconds (0: never).
    pub min_timed_seconds: f64,
}

/// The most steps a probe times to reach [`Steps::min_timed_seconds`].
pub const MAX_TIMED_STEPS: usize = 64;

impl Steps {
    /// Exactly `steps` steps, however short.
    pub fn exactly(steps: u32) -> Steps {
        Steps {
            at_least: steps,
            min_timed_seconds: 0.0,
        }
    }

    /// Whether a probe that has run `run` steps, the ones timed taking `timed` seconds each,
    /// runs another.
    pub fn another(&self, run: u32, timed: &[f64]) -> bool {
        run < self.at_least.max(1)
            || (timed.len() < MAX_TIMED_STEPS && timed.iter().sum::<f64>() < self.min_timed_seconds)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_steps_are_timed_until_they_add_up_to_the_floor() {
        let steps = Steps {
            at_least: 2,
            min_timed_seconds: 0.01,
        };
        assert!(steps.another(0, &[]));
        assert!(steps.another(1, &[]), "the warm-up step is not timed");
        assert!(steps.another(2, &[0.004]));
        assert!(steps.another(3, &[0.004, 0.004]));
        assert!(!steps.another(4, &[0.004; 3]));
        assert!(
            !steps.another(65, &[1e-6; MAX_TIMED_STEPS]),
            "at most 64 timed"
        );
        assert!(!steps.another(2, &[0.5]), "a long step is timed once");
    }

    #[test]
    fn exactly_runs_the_steps_asked_for_and_at_least_one() {
        assert!(Steps::exactly(3).another(2, &[1e-9]));
        assert!(!Steps::exactly(3).another(3, &[1e-9, 1e-9]));
        assert!(Steps::exactly(0).another(0, &[]));
        assert!(!Steps::exactly(0).another(1, &[]));
    }

    proptest! {
        /// Whatever the steps take, a probe stops after its own steps and at most 64 more, once
        /// the floor is reached or 64 steps are timed.
        #[test]
        fn a_probe_always_stops(
            at_least in 0u32..100,
            floor in 0.0f64..1.0,
            times in proptest::collection::vec(0.0f64..0.05, 200),
        ) {
            let steps = Steps { at_least, min_timed_seconds: floor };
            let mut timed: Vec<f64> = Vec::new();
            let mut run = 0;
            while steps.another(run, timed.get(1..).unwrap_or_default()) {
                timed.push(times[run as usize % times.len()]);
                run += 1;
            }
            prop_assert!(run as usize <= at_least.max(1) as usize + MAX_TIMED_STEPS);
            prop_assert!(run >= at_least.max(1));
            let after_warm_up = &timed[timed.len().min(1)..];
            prop_assert!(
                after_warm_up.iter().sum::<f64>() >= floor
                    || after_warm_up.len() >= MAX_TIMED_STEPS
            );
        }
    }
}
