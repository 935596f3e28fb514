//! `headroom probe`: single probes at given batch sizes, with throughput and memory.

use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;

use super::output::human;
use super::{fail, job_and_device, EXIT_FAILURE, EXIT_INVALID};
use crate::device::select::DeviceSpec;
use crate::device::DeviceError;
use crate::result::Outcome;
use crate::search::PROBE_SEED;

/// One measured probe of `headroom probe`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// Batch size probed.
    pub batch_size: u64,
    /// `fit` or `oom`.
    pub outcome: Outcome,
    /// Mean seconds per training step.
    pub step_seconds: f64,
    /// Samples per second.
    pub samples_per_second: f64,
    /// Achieved f32 TFLOP/s of the step's matrix products.
    pub tflops: f64,
    /// `tflops` over the peak given with `--peak-tflops`.
    pub peak_share: Option<f64>,
    /// Device bytes the probe held, as the device counts them.
    pub device_bytes: u64,
    /// Bytes the memory model predicts the device takes for this batch size.
    pub modelled_bytes: u64,
}

impl Measurement {
    fn line(&self) -> String {
        format!(
            "batch {:>12}  {:<4} {:>10.5} s/step {:>14.0} samples/s {:>8.2} TFLOP/s {:>7}  held {:>11}  modelled {:>11}",
            self.batch_size,
            self.outcome.to_string(),
            self.step_seconds,
            self.samples_per_second,
            self.tflops,
            self.peak_share.map_or(String::new(), |s| format!("{:.1}%", 100.0 * s)),
            human(self.device_bytes),
            human(self.modelled_bytes),
        )
    }
}

/// Probes each of `batch_sizes` once (at least two steps, the first a warm-up).
pub fn probe_command(
    job_path: &Path,
    device: DeviceSpec,
    host_memory: u64,
    batch_sizes: &[u64],
    peak_tflops: Option<f64>,
    json: bool,
) -> ExitCode {
    let (job, mut opened) = match job_and_device(job_path, device, host_memory) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let plan = job.plan();
    let allocator = opened.device.info().kind.allocator();
    let mut measurements = Vec::new();
    for &batch_size in batch_sizes {
        let Some(modelled_bytes) = plan.device_bytes(batch_size, allocator) else {
            return fail(
                EXIT_INVALID,
                format!("batch size {batch_size} overflows the memory model"),
            );
        };
        let steps = job.search.steps_per_probe.max(2);
        let measurement = match opened.device.run_steps(plan, batch_size, steps, PROBE_SEED) {
            Ok(report) => {
                let tflops = plan.step_flops(batch_size) / report.step_seconds / 1e12;
                Measurement {
                    batch_size,
                    outcome: Outcome::Fit,
                    step_seconds: report.step_seconds,
                    samples_per_second: batch_size as f64 / report.step_seconds,
                    tflops,
                    peak_share: peak_tflops.map(|peak| tflops / peak),
                    device_bytes: report.device_bytes,
                    modelled_bytes,
                }
            }
            Err(DeviceError::OutOfMemory { .. }) => Measurement {
                batch_size,
                outcome: Outcome::Oom,
                step_seconds: 0.0,
                samples_per_second: 0.0,
                tflops: 0.0,
                peak_share: None,
                device_bytes: 0,
                modelled_bytes,
            },
            Err(fault) => {
                return fail(
                    EXIT_FAILURE,
                    format!("probe at batch size {batch_size}: {fault}"),
                )
            }
        };
        if !json {
            println!("{}", measurement.line());
        }
        measurements.push(measurement);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&measurements).expect("measurements serialise")
        );
    }
    ExitCode::SUCCESS
}
