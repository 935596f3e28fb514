//! `headroom probe`: single probes at given batch sizes, with throughput and memory.

use std::path::PathBuf;

use bytesize::ByteSize;
use serde::Serialize;

use super::input::job_and_device;
use super::output::{human, print_line};
use super::CliError;
use headroom_devices::host::DEFAULT_BUDGET_BYTES;
use headroom_devices::select::DeviceSpec;
use headroom_engine::device::DeviceError;
use headroom_engine::result::Outcome;
use headroom_engine::search::PROBE_SEED;
use headroom_engine::step::Steps;

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

/// Arguments of `headroom probe`.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// The job description (JSON); `-` reads standard input.
    job: PathBuf,
    /// Batch sizes to probe, e.g. --batch-size 1024,65536.
    #[arg(long = "batch-size", value_delimiter = ',', required = true)]
    batch_sizes: Vec<u64>,
    /// auto, host, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Memory budget of the host device.
    #[arg(long, default_value_t = ByteSize(DEFAULT_BUDGET_BYTES))]
    host_memory: ByteSize,
    /// The device's f32 peak, to report the share reached.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Print the measurements as JSON.
    #[arg(long)]
    json: bool,
}

/// Probes each batch size once (at least two steps, the first a warm-up, and as many more as
/// the job's `search.min_timed_seconds` asks for).
pub fn run(args: ProbeArgs) -> Result<(), CliError> {
    let (job, mut opened) = job_and_device(&args.job, args.device, args.host_memory.0)?;
    let plan = job.plan();
    let allocator = opened.device.info().kind.allocator();
    let mut measurements = Vec::new();
    for &batch_size in &args.batch_sizes {
        let Some(modelled_bytes) = plan.device_bytes(batch_size, allocator) else {
            return Err(CliError::Argument(format!(
                "batch size {batch_size} overflows the memory model"
            )));
        };
        let steps = Steps {
            at_least: job.search.steps_per_probe.max(2),
            min_timed_seconds: job.search.min_timed_seconds,
        };
        let measurement = match opened.device.run_steps(plan, batch_size, steps, PROBE_SEED) {
            Ok(report) => {
                let speed = report.speed();
                let tflops =
                    speed.map_or(0.0, |s| plan.step_flops(batch_size) / s.step_seconds / 1e12);
                Measurement {
                    batch_size,
                    outcome: Outcome::Fit,
                    step_seconds: speed.map_or(0.0, |s| s.step_seconds),
                    samples_per_second: speed.map_or(0.0, |s| s.samples_per_second(batch_size)),
                    tflops,
                    peak_share: args.peak_tflops.map(|peak| tflops / peak),
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
            Err(source) => return Err(CliError::Probe { batch_size, source }),
        };
        if !args.json {
            print_line(measurement.line())?;
        }
        measurements.push(measurement);
    }
    if args.json {
        print_line(serde_json::to_string_pretty(&measurements).expect("measurements serialise"))?;
    }
    Ok(())
}
