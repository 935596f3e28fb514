//! `headroom doctor`: what this node has (driver, NVML, NVRTC, devices), and whether every kernel
//! agrees with the host reference on every device.

use std::ops::ControlFlow;

use bytesize::ByteSize;
use serde::Serialize;

use super::output::{human, print_line};
use super::CliError;
use headroom_devices::cuda::compile::KernelForm;
use headroom_devices::host::HostDevice;
use headroom_devices::host::DEFAULT_BUDGET_BYTES;
use headroom_devices::parity::{self, Check};
use headroom_devices::transfer::Transfer;
use headroom_devices::{cuda, nvml};
use headroom_engine::catalogue;
use headroom_engine::device::{Device, Probing};
use headroom_engine::job::Job;
use headroom_engine::search::tune;

/// The outcome of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Checked and fine.
    Pass,
    /// Checked and wrong: the doctor exits non-zero.
    Fail,
    /// Not applicable on this node (no GPU, say).
    Skip,
    /// Information only.
    Info,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
            Status::Info => "info",
        }
    }
}

/// One row of the doctor's report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Outcome.
    pub status: Status,
    /// What was checked.
    pub check: String,
    /// What was found.
    pub detail: String,
    /// The row's figures, for scripts (`scripts/gpu-check.sh`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub figures: Option<serde_json::Value>,
}

fn row(status: Status, check: impl Into<String>, detail: impl Into<String>) -> Row {
    Row {
        status,
        check: check.into(),
        detail: detail.into(),
        figures: None,
    }
}

/// The small tune the doctor runs: the MNIST example, capped so it finishes in seconds.
const DOCTOR_JOB: &str = r#"{"model": {"input_shape": [1, 28, 28], "hidden_layers": [128], "num_classes": 10},
    "optimizer": {"name": "sgd"}, "search": {"max": 65536, "strategy": "predict"}}"#;

/// Arguments of `headroom doctor`.
#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Fail (exit 1) unless a GPU was opened and passed every check: for node agents and
    /// prologs that must not go on without one.
    #[arg(long)]
    require_gpu: bool,
    /// Memory budget of the host device.
    #[arg(long, default_value_t = ByteSize(DEFAULT_BUDGET_BYTES))]
    host_memory: ByteSize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Checks this node, prints the report (a table, or JSON) and fails if a row failed.
pub fn run(args: DoctorArgs) -> Result<(), CliError> {
    let (host_memory, json) = (args.host_memory.0, args.json);
    let mut rows = libraries();
    let driver = cuda::driver_available();
    let nvrtc = cuda::compile::nvrtc_available();
    let mut gpu_checked = false;
    if driver && nvrtc {
        let (gpu_rows, tuned) = cuda_devices();
        rows.extend(gpu_rows);
        gpu_checked = tuned;
    } else {
        if nvrtc {
            rows.extend(compile_only());
        }
        rows.push(row(
            Status::Info,
            "kernel checks",
            "no CUDA device: checking the host device against the reference alone",
        ));
    }
    let mut host = HostDevice::new(host_memory);
    rows.extend(device_checks("host", &mut host).0);
    if !gpu_checked {
        rows.push(row(
            if args.require_gpu {
                Status::Fail
            } else {
                Status::Info
            },
            "GPU",
            "no GPU was checked: the kernels ran on the host reference only",
        ));
    }
    let failed = rows.iter().filter(|r| r.status == Status::Fail).count();
    if json {
        let report = serde_json::json!({
            "passed": failed == 0,
            "gpu_checked": gpu_checked,
            "rows": rows,
        });
        print_line(serde_json::to_string_pretty(&report).expect("rows serialise"))?;
    } else {
        print_table(&rows, failed, gpu_checked)?;
    }
    match failed {
        0 => Ok(()),
        n => Err(CliError::ChecksFailed(n)),
    }
}

fn print_table(rows: &[Row], failed: usize, gpu_checked: bool) -> Result<(), CliError> {
    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
    for r in rows {
        print_line(format_args!(
            "{:<4}  {:<width$}  {}",
            r.status.label(),
            r.check,
            r.detail
        ))?;
    }
    match (failed, gpu_checked) {
        (0, true) => print_line("all checks passed"),
        (0, false) => print_line("all checks passed; no GPU was checked"),
        _ => Ok(()),
    }
}

/// The driver, NVML with every GPU it sees, and NVRTC.
fn libraries() -> Vec<Row> {
    let driver = cuda::driver_available();
    let missing = if driver { Status::Fail } else { Status::Skip };
    let mut rows = vec![if driver {
        let supports = cuda::driver_version()
            .map_or("an unknown CUDA version".into(), |(major, minor)| {
                format!("CUDA {major}.{minor}")
            });
        row(
            Status::Pass,
            "CUDA driver library",
            format!("libcuda found; the driver supports {supports}"),
        )
    } else {
        row(Status::Skip, "CUDA driver library", "libcuda not found: this machine has no NVIDIA driver; only the host device is available")
    }];
    match nvml::telemetry() {
        Ok((version, gpus)) => {
            rows.push(row(
                Status::Pass,
                "NVML",
                format!("driver {version}, {} GPU(s)", gpus.len()),
            ));
            rows.extend(gpus.into_iter().map(|gpu| {
                row(
                    Status::Info,
                    format!("GPU {} {}", gpu.index, gpu.name),
                    format!(
                        "{}, {} used of {}, {} other compute process(es)",
                        gpu.uuid,
                        human(gpu.used_bytes),
                        human(gpu.total_bytes),
                        gpu.other_compute_processes(&[std::process::id()], false)
                    ),
                )
            }));
        }
        Err(e) => rows.push(row(missing, "NVML", e.to_string())),
    }
    rows.push(
        if let Some((major, minor)) = cuda::compile::nvrtc_version() {
            row(
                Status::Pass,
                "NVRTC library",
                format!("libnvrtc {major}.{minor} found"),
            )
        } else {
            row(
                missing,
                "NVRTC library",
                "libnvrtc not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`",
            )
        },
    );
    rows
}

/// Without a driver, NVRTC can still compile every family.
fn compile_only() -> Vec<Row> {
    cuda::kernel::Family::ALL
        .iter()
        .map(
            |&family| match cuda::compile::compile(family, "compute_90") {
                Ok(_) => row(
                    Status::Pass,
                    format!("compile {} (compute_90)", family.file()),
                    format!("{} kernel(s)", family.kernels().count()),
                ),
                Err(e) => row(
                    Status::Fail,
                    format!("compile {}", family.file()),
                    e.to_string(),
                ),
            },
        )
        .collect()
}

/// Opens every CUDA device and runs the checks on it; and whether a GPU passed its small tune.
fn cuda_devices() -> (Vec<Row>, bool) {
    let count = cuda::device_count().unwrap_or(0);
    if count == 0 {
        let none = row(Status::Fail, "CUDA devices", "the driver reports no device");
        return (vec![none], false);
    }
    let (mut rows, mut tuned) = (Vec::new(), false);
    for index in 0..count {
        let name = format!("cuda:{index}");
        let used_before_open = nvml::telemetry().map(|(_, gpus)| gpus).unwrap_or_default();
        match cuda::CudaDevice::open(index) {
            Ok(mut device) => {
                let (major, minor) = device.compute_capability();
                let info = device.info();
                rows.push(row(
                    Status::Pass,
                    format!("{name} opened, kernels compiled"),
                    format!(
                        "{}, compute {major}.{minor}, {} free of {}",
                        info.name,
                        human(info.free_bytes),
                        human(info.total_bytes)
                    ),
                ));
                let loaded = match device.kernel_form() {
                    (KernelForm::Cubin, _) => format!("CUBIN for sm_{major}{minor}"),
                    (KernelForm::Ptx, refused) => format!(
                        "PTX for compute_{major}{minor}, which the driver compiles (the CUBIN was refused: {})",
                        refused.unwrap_or("unknown")
                    ),
                };
                rows.push(row(Status::Pass, format!("{name} kernels"), loaded));
                rows.push(context_reservation(&name, &device, &used_before_open));
                let (checks, passed) = device_checks(&name, &mut device);
                rows.extend(checks);
                tuned |= passed;
                rows.push(pool_row(&name, &device));
            }
            Err(e) => rows.push(row(
                Status::Fail,
                format!("{name} open"),
                format!("{e}{}", version_advice()),
            )),
        }
    }
    (rows, tuned)
}

/// What opening the device (its context and the loaded kernels) took, as NVML counts the GPU's
/// used memory before and after, against the reserve the GPU catalogue assumes. Another process
/// allocating meanwhile moves the figure too, so it is information, not a check.
fn context_reservation(
    name: &str,
    device: &cuda::CudaDevice,
    before: &[nvml::GpuTelemetry],
) -> Row {
    let info = device.info();
    let after = nvml::telemetry().map(|(_, gpus)| gpus).unwrap_or_default();
    let (Some(before), Some(after)) = (nvml::find(before, &info), nvml::find(&after, &info)) else {
        return row(
            Status::Info,
            format!("{name} context"),
            "NVML does not list this GPU: the context's reservation is not measured",
        );
    };
    let taken = after.used_bytes.saturating_sub(before.used_bytes);
    let assumed = catalogue::CONTEXT_RESERVE_BYTES;
    Row {
        figures: Some(serde_json::json!({
            "context_bytes": taken,
            "assumed_reserve_bytes": assumed,
            "context_over_reserve": taken as f64 / assumed as f64,
        })),
        ..row(
            Status::Info,
            format!("{name} context"),
            format!(
                "opening the context and loading the kernels took {} (NVML's used memory before \
                 and after); the GPU catalogue's estimates assume {}",
                human(taken),
                human(assumed)
            ),
        )
    }
}

/// The default memory pool around the device's last probe: what the leak check reads, and what a
/// trim to zero leaves reserved (the pool's keeping; no allocation is live in it).
fn pool_row(name: &str, device: &cuda::CudaDevice) -> Row {
    let Some(pool) = device.pool_figures() else {
        return row(
            Status::Info,
            format!("{name} memory pool"),
            "the device has no memory pools: leaks are counted device-wide, within 64 MiB",
        );
    };
    Row {
        figures: serde_json::to_value(pool).ok(),
        ..row(
            Status::Info,
            format!("{name} memory pool"),
            format!(
                "last probe: reserved {} before, {} at peak, {} when freed, {} after trimming to \
                 zero; live allocations {} before, {} after",
                human(pool.reserved_before),
                human(pool.reserved_peak),
                human(pool.reserved_before_trim),
                human(pool.reserved_after_trim),
                human(pool.used_before),
                human(pool.used_after)
            ),
        )
    }
}

/// Every kernel check, the training check and a small tune on one device; and whether the
/// tune passed.
fn device_checks<D: Probing + Transfer>(name: &str, device: &mut D) -> (Vec<Row>, bool) {
    let mut rows = check_rows(name, "kernel checks", parity::check_kernels(device));
    rows.extend(check_rows(
        name,
        "training check",
        parity::check_training(device),
    ));
    let tune = small_tune(name, device);
    let tuned = tune.status == Status::Pass;
    rows.push(tune);
    (rows, tuned)
}

fn check_rows(
    device: &str,
    what: &str,
    checks: Result<Vec<Check>, headroom_engine::DeviceError>,
) -> Vec<Row> {
    match checks {
        Ok(checks) => checks
            .into_iter()
            .map(|c| {
                row(
                    if c.passed { Status::Pass } else { Status::Fail },
                    format!("{device}: {}", c.name),
                    format!("max relative error {:.2e}", c.max_error),
                )
            })
            .collect(),
        Err(e) => vec![row(
            Status::Fail,
            format!("{device}: {what}"),
            e.to_string(),
        )],
    }
}

fn small_tune(name: &str, device: &mut dyn Device) -> Row {
    let job = Job::from_json(DOCTOR_JOB).expect("the doctor's job is valid");
    match tune(&job, device, &mut |_| ControlFlow::Continue(())) {
        Ok(r) => row(
            Status::Pass,
            format!("{name}: small tune (784-128-10, SGD)"),
            format!(
                "max {} ({}), recommended {}, {} probes, {:.2} s",
                r.max_batch_size,
                r.limited_by,
                r.recommended_batch_size,
                r.probes.len(),
                r.elapsed_seconds
            ),
        ),
        Err(e) => row(Status::Fail, format!("{name}: small tune"), e.to_string()),
    }
}

/// What to do when NVRTC is newer than the driver: PTX it writes is then refused at load
/// (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), and only a CUBIN, or a matching pair, works.
fn version_advice() -> String {
    match (cuda::driver_version(), cuda::compile::nvrtc_version()) {
        (Some(driver), Some(nvrtc)) if nvrtc > driver => format!(
            "; NVRTC {}.{} is newer than the driver's CUDA {}.{}: install a driver for CUDA {}.{} \
             (R580 or newer for CUDA 13), or put an NVRTC no newer than {}.{} on the loader path",
            nvrtc.0, nvrtc.1, driver.0, driver.1, nvrtc.0, nvrtc.1, driver.0, driver.1
        ),
        _ => String::new(),
    }
}
