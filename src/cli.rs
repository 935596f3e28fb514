//! The commands behind the `headroom` binary and what they print.
//!
//! Exit codes: 0 success, 1 any other failure, 2 an invalid job or arguments, 3 the model does
//! not fit at batch size 1.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;

use bytesize::ByteSize;
use serde::Serialize;

use crate::device::select::{self, DeviceSpec};
use crate::device::DeviceError;
use crate::device::{cuda, host, nvml, Device};
use crate::job::Job;
use crate::parity::{self, Check};
use crate::plan::{MemoryBreakdown, Plan};
use crate::result::{Outcome, Probe, TuneResult};
use crate::search::{recommended_batch_size, tune, TuneError, PROBE_SEED};

/// Any failure not listed below.
pub const EXIT_FAILURE: u8 = 1;
/// The job or the arguments are invalid.
pub const EXIT_INVALID: u8 = 2;
/// The model does not fit at batch size 1.
pub const EXIT_DOES_NOT_FIT: u8 = 3;

/// Largest job file read, bytes: a job is a few hundred bytes.
const MAX_JOB_FILE_BYTES: u64 = 1 << 20;

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

fn human(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

/// Reads and validates a job file.
pub fn read_job(path: &Path) -> Result<Job, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read job file {}: {e}", path.display()))?
        .len();
    if size > MAX_JOB_FILE_BYTES {
        return Err(format!(
            "job file {} is {size} bytes; a job is at most 1 MiB",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read job file {}: {e}", path.display()))?;
    Job::from_json(&text).map_err(|e| format!("invalid job {}: {e}", path.display()))
}

/// Reads the job, checks the host budget and opens the device: the start of every command that
/// probes. Says so on stderr when `auto` fell back to the host.
fn job_and_device(
    job_path: &Path,
    device: DeviceSpec,
    host_memory: u64,
) -> Result<(Job, select::Opened), ExitCode> {
    let job = read_job(job_path).map_err(|message| fail(EXIT_INVALID, message))?;
    let budget = check_host_budget(host_memory).map_err(|message| fail(EXIT_INVALID, message))?;
    let opened = select::open(device, budget).map_err(|message| {
        fail(
            EXIT_FAILURE,
            format!("cannot open device {device}: {message}"),
        )
    })?;
    if let Some(reason) = &opened.fallback_reason {
        eprintln!("note: using the host device ({reason})");
    }
    Ok((job, opened))
}

/// Prints a command's answer (JSON with `--json`, else `human`) and maps errors to exit codes.
fn answer<T: Serialize>(
    outcome: Result<T, TuneError>,
    json: bool,
    human: impl FnOnce(&T) -> String,
) -> ExitCode {
    match outcome {
        Ok(value) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).expect("answers serialise")
            );
            ExitCode::SUCCESS
        }
        Ok(value) => {
            print!("{}", human(&value));
            ExitCode::SUCCESS
        }
        Err(err @ TuneError::DoesNotFit { .. }) => fail(EXIT_DOES_NOT_FIT, err),
        Err(err) => fail(EXIT_FAILURE, err),
    }
}

/// Checks a host budget against the machine: a budget past physical memory would let the host
/// device commit more than exists.
pub fn check_host_budget(bytes: u64) -> Result<u64, String> {
    if bytes == 0 {
        return Err("--host-memory must be more than 0 bytes".into());
    }
    match host::system_memory_bytes() {
        Some(physical) if bytes > physical => Err(format!(
            "--host-memory {} is more than this machine's {} of memory",
            human(bytes),
            human(physical)
        )),
        _ => Ok(bytes),
    }
}

/// `headroom tune`: runs the search and prints the result.
pub fn tune_command(job_path: &Path, device: DeviceSpec, host_memory: u64, json: bool) -> ExitCode {
    let (job, mut opened) = match job_and_device(job_path, device, host_memory) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let info = opened.device.info();
    eprintln!(
        "tuning on {} {} ({}): {} free of {}",
        info.kind,
        info.index,
        info.name,
        human(info.free_bytes),
        human(info.total_bytes)
    );
    let mut print_probe = |probe: &Probe| {
        eprintln!("{}", probe_line(probe));
        ControlFlow::Continue(())
    };
    answer(
        tune(&job, opened.device.as_mut(), &mut print_probe),
        json,
        summary,
    )
}

/// One line per probe, as it happens.
pub fn probe_line(probe: &Probe) -> String {
    format!(
        "  probe batch {:>12}  {:<5} {:>10.4} s/step {:>14.0} samples/s {:>12}",
        probe.batch_size,
        probe.outcome.to_string(),
        probe.step_seconds,
        probe.samples_per_second,
        human(probe.device_bytes)
    )
}

fn memory_table(memory: &MemoryBreakdown) -> String {
    let rows = [
        ("parameters", memory.parameters),
        ("gradients", memory.gradients),
        ("optimizer state", memory.optimizer_state),
        ("batch data", memory.batch_data),
        ("activations", memory.activations),
        ("total", memory.total),
    ];
    rows.iter()
        .map(|(name, bytes)| format!("  {name:<16} {:>12}\n", human(*bytes)))
        .collect()
}

/// The human summary of a result.
pub fn summary(result: &TuneResult) -> String {
    let ratio = if result.predicted_max_batch_size > 0 {
        format!(
            "{:.3}",
            result.max_batch_size as f64 / result.predicted_max_batch_size as f64
        )
    } else {
        "n/a".into()
    };
    format!(
        "max batch size          {} (limited by {})\n\
         recommended batch size  {} ({}% headroom)\n\
         predicted max           {} (measured / predicted = {ratio})\n\
         device                  {} {} ({}, {} total)\n\
         search                  {} probes in {:.2} s\n\
         memory at batch {}:\n{}",
        result.max_batch_size,
        result.limited_by,
        result.recommended_batch_size,
        (result.headroom * 100.0).round(),
        result.predicted_max_batch_size,
        result.device.kind,
        result.device.index,
        result.device.name,
        human(result.device.total_bytes),
        result.probes.len(),
        result.elapsed_seconds,
        result.recommended_batch_size,
        memory_table(&result.memory),
    )
}

/// What `headroom estimate` answers: the memory model alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Free bytes assumed.
    pub memory_bytes: u64,
    /// Trainable parameters.
    pub parameter_count: u64,
    /// Bytes independent of the batch size.
    pub fixed_bytes: u64,
    /// Bytes each sample adds.
    pub bytes_per_sample: u64,
    /// Largest batch the model predicts fits (capped by `search.max` and `dataset_size`).
    pub predicted_max_batch_size: u64,
    /// The headroom rule applied to the prediction.
    pub recommended_batch_size: u64,
    /// Breakdown at the recommended batch size.
    pub memory: MemoryBreakdown,
}

/// The memory model's answer for `job` with `memory_bytes` free.
pub fn estimate(job: &Job, memory_bytes: u64) -> Result<Estimate, TuneError> {
    let plan = Plan::new(job).map_err(|e| TuneError::Fault {
        batch_size: 0,
        message: e.to_string(),
    })?;
    let predicted = plan.predict_max_batch(memory_bytes).min(job.batch_cap());
    if predicted == 0 {
        return Err(TuneError::DoesNotFit {
            fixed_bytes: plan.fixed_bytes(),
            batch_one_bytes: plan.memory(1).map_or(u64::MAX, |m| m.total),
            free_bytes: memory_bytes,
        });
    }
    let recommended = recommended_batch_size(predicted, job.headroom, job.search.multiple_of);
    Ok(Estimate {
        memory_bytes,
        parameter_count: plan.parameter_count(),
        fixed_bytes: plan.fixed_bytes(),
        bytes_per_sample: plan.bytes_per_sample(),
        predicted_max_batch_size: predicted,
        recommended_batch_size: recommended,
        memory: plan.memory(recommended).unwrap_or_default(),
    })
}

/// `headroom estimate`.
pub fn estimate_command(job_path: &Path, memory: u64, json: bool) -> ExitCode {
    let job = match read_job(job_path) {
        Ok(job) => job,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    answer(estimate(&job, memory), json, |e| {
        format!(
            "parameters              {}\n\
             fixed                   {}\n\
             per sample              {}\n\
             predicted max batch     {} in {}\n\
             recommended batch size  {}\n\
             memory at batch {}:\n{}",
            e.parameter_count,
            human(e.fixed_bytes),
            human(e.bytes_per_sample),
            e.predicted_max_batch_size,
            human(e.memory_bytes),
            e.recommended_batch_size,
            e.recommended_batch_size,
            memory_table(&e.memory)
        )
    })
}

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
    /// Bytes the memory model predicts for this batch size.
    pub modelled_bytes: u64,
}

/// `headroom probe`: single probes at given batch sizes, with throughput.
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
    let plan = Plan::new(&job).expect("a validated job plans");
    let mut measurements = Vec::new();
    for &batch_size in batch_sizes {
        let Some(modelled) = plan.memory(batch_size) else {
            return fail(
                EXIT_INVALID,
                format!("batch size {batch_size} overflows the memory model"),
            );
        };
        let run = opened.device.run_steps(
            &plan,
            batch_size,
            job.search.steps_per_probe.max(2),
            PROBE_SEED,
        );
        let measurement = match run {
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
                    modelled_bytes: modelled.total,
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
                modelled_bytes: modelled.total,
            },
            Err(fault) => {
                return fail(
                    EXIT_FAILURE,
                    format!("probe at batch size {batch_size}: {fault}"),
                )
            }
        };
        if !json {
            println!(
                "batch {:>12}  {:<4} {:>10.5} s/step {:>14.0} samples/s {:>8.2} TFLOP/s {:>7}  held {:>11}  modelled {:>11}",
                measurement.batch_size,
                measurement.outcome.to_string(),
                measurement.step_seconds,
                measurement.samples_per_second,
                measurement.tflops,
                measurement.peak_share.map_or(String::new(), |s| format!("{:.1}%", 100.0 * s)),
                human(measurement.device_bytes),
                human(measurement.modelled_bytes),
            );
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

/// One row of the doctor's table.
struct Row {
    status: &'static str,
    check: String,
    detail: String,
}

fn row(status: &'static str, check: impl Into<String>, detail: impl Into<String>) -> Row {
    Row {
        status,
        check: check.into(),
        detail: detail.into(),
    }
}

fn check_rows(device: &str, checks: Result<Vec<Check>, crate::DeviceError>) -> Vec<Row> {
    match checks {
        Ok(checks) => checks
            .into_iter()
            .map(|c| {
                row(
                    if c.passed { "pass" } else { "FAIL" },
                    format!("{device}: {}", c.name),
                    format!("max relative error {:.2e}", c.max_error),
                )
            })
            .collect(),
        Err(e) => vec![row(
            "FAIL",
            format!("{device}: kernel checks"),
            e.to_string(),
        )],
    }
}

/// The small tune the doctor runs: the MNIST example, capped so it finishes in seconds.
const DOCTOR_JOB: &str = r#"{"model": {"input_shape": [1, 28, 28], "hidden_layers": [128], "num_classes": 10},
    "optimizer": {"name": "sgd"}, "search": {"max": 65536, "strategy": "predict"}}"#;

fn small_tune(name: &str, device: &mut dyn Device) -> Row {
    let job = Job::from_json(DOCTOR_JOB).expect("the doctor's job is valid");
    match tune(&job, device, &mut |_| ControlFlow::Continue(())) {
        Ok(r) => row(
            "pass",
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
        Err(e) => row("FAIL", format!("{name}: small tune"), e.to_string()),
    }
}

/// `headroom doctor`: what a node has, and whether every kernel agrees with the host.
pub fn doctor_command(host_memory: u64) -> ExitCode {
    let mut rows = Vec::new();
    let driver = cuda::driver_available();
    rows.push(if driver {
        row("pass", "CUDA driver library", "libcuda found")
    } else {
        row("skip", "CUDA driver library", "libcuda not found: this machine has no NVIDIA driver; only the host device is available")
    });
    match nvml::telemetry() {
        Ok((version, gpus)) => {
            rows.push(row(
                "pass",
                "NVML",
                format!("driver {version}, {} GPU(s)", gpus.len()),
            ));
            for gpu in gpus {
                rows.push(row(
                    "info",
                    format!("GPU {} {}", gpu.index, gpu.name),
                    format!(
                        "{}, {} used of {}, {} other compute process(es)",
                        gpu.uuid,
                        human(gpu.used_bytes),
                        human(gpu.total_bytes),
                        gpu.other_compute_processes
                    ),
                ));
            }
        }
        Err(e) => rows.push(row(if driver { "FAIL" } else { "skip" }, "NVML", e)),
    }
    let nvrtc = cuda::compile::nvrtc_available();
    rows.push(if nvrtc {
        row("pass", "NVRTC library", "libnvrtc found")
    } else {
        row(
            if driver { "FAIL" } else { "skip" },
            "NVRTC library",
            "libnvrtc not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`",
        )
    });
    if nvrtc && !driver {
        for source in cuda::compile::SOURCES {
            rows.push(match cuda::compile::compile(source, "compute_90") {
                Ok(_) => row(
                    "pass",
                    format!("compile {} (compute_90)", source.file),
                    format!("{} kernel(s)", source.kernels.len()),
                ),
                Err(e) => row("FAIL", format!("compile {}", source.file), e.to_string()),
            });
        }
    }
    if driver && nvrtc {
        let count = cuda::device_count().unwrap_or(0);
        if count == 0 {
            rows.push(row("FAIL", "CUDA devices", "the driver reports no device"));
        }
        for index in 0..count {
            let name = format!("cuda:{index}");
            match cuda::CudaDevice::open(index) {
                Ok(mut device) => {
                    let (major, minor) = device.compute_capability();
                    let info = device.info();
                    rows.push(row(
                        "pass",
                        format!("{name} opened, kernels compiled"),
                        format!(
                            "{}, compute {major}.{minor}, {} free of {}",
                            info.name,
                            human(info.free_bytes),
                            human(info.total_bytes)
                        ),
                    ));
                    rows.extend(check_rows(&name, parity::check_kernels(&mut device)));
                    rows.extend(check_rows(&name, parity::check_training(&mut device)));
                    rows.push(small_tune(&name, &mut device));
                }
                Err(e) => rows.push(row("FAIL", format!("{name} open"), e.to_string())),
            }
        }
    } else {
        rows.push(row(
            "info",
            "kernel checks",
            "no CUDA device: checking the host device against the reference alone",
        ));
    }
    let mut host_device = host::HostDevice::new(host_memory);
    rows.extend(check_rows("host", parity::check_kernels(&mut host_device)));
    rows.push(small_tune("host", &mut host_device));

    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
    for r in &rows {
        println!("{:<4}  {:<width$}  {}", r.status, r.check, r.detail);
    }
    let failed = rows.iter().filter(|r| r.status == "FAIL").count();
    if failed > 0 {
        println!("{failed} check(s) failed");
        ExitCode::from(EXIT_FAILURE)
    } else {
        println!("all checks passed");
        ExitCode::SUCCESS
    }
}

/// Overrides of `headroom serve` on top of the file and environment.
#[derive(Debug, Default, Clone)]
pub struct ServeOverrides {
    /// `--bind`.
    pub bind: Option<std::net::SocketAddr>,
    /// `--host-memory`.
    pub host_memory: Option<u64>,
    /// `--token`.
    pub token: Option<String>,
    /// `--log-format`.
    pub log_format: Option<crate::config::LogFormat>,
    /// `--device` (repeatable).
    pub devices: Vec<String>,
}

/// `headroom serve`: loads the config, binds, and serves until SIGTERM or SIGINT.
pub fn serve_command(config_file: Option<&Path>, overrides: ServeOverrides) -> ExitCode {
    let mut config = match crate::config::Config::load(config_file) {
        Ok(config) => config,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    if let Some(bind) = overrides.bind {
        config.bind = bind;
    }
    if let Some(bytes) = overrides.host_memory {
        config.host_memory = ByteSize(bytes);
    }
    if let Some(token) = overrides.token {
        config.token = token;
    }
    if let Some(format) = overrides.log_format {
        config.log_format = format;
    }
    if !overrides.devices.is_empty() {
        config.devices = overrides.devices;
    }
    if let Err(message) = check_host_budget(config.host_memory.0) {
        return fail(EXIT_INVALID, message);
    }
    crate::service::init_logging(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(config.bind).await {
            Ok(listener) => listener,
            Err(e) => {
                return fail(
                    EXIT_FAILURE,
                    format!("cannot listen on {}: {e}", config.bind),
                )
            }
        };
        match crate::service::serve(config, listener, crate::service::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_FAILURE, format!("the server stopped: {e}")),
        }
    })
}

/// `headroom tune --server URL`: posts the job to a running service, then polls the job until
/// it finishes.
pub fn tune_remote_command(
    server: &str,
    job_path: &Path,
    device: DeviceSpec,
    token: Option<&str>,
    json: bool,
) -> ExitCode {
    let job = match read_job(job_path) {
        Ok(job) => job,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    let mut body = serde_json::to_value(&job).expect("jobs serialise");
    body["device"] = serde_json::Value::from(device.to_string());
    let base = server.trim_end_matches('/');
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut post = agent
        .post(format!("{base}/tune"))
        .header("Prefer", "respond-async");
    if let Some(bearer) = &bearer {
        post = post.header("Authorization", bearer);
    }
    let (mut status, mut document) = match status_and_json(post.send_json(&body)) {
        Ok(answer) => answer,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot reach {base}: {e}")),
    };
    if status == 200 {
        return print_remote_result(document, json);
    }
    while status == 202
        || (status == 200
            && !matches!(
                document["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ))
    {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let id = document["id"].as_str().unwrap_or_default();
        let mut get = agent.get(format!("{base}/jobs/{id}"));
        if let Some(bearer) = &bearer {
            get = get.header("Authorization", bearer);
        }
        (status, document) = match status_and_json(get.call()) {
            Ok(answer) => answer,
            Err(e) => return fail(EXIT_FAILURE, format!("cannot reach {base}: {e}")),
        };
    }
    match (status, document["state"].as_str()) {
        (200, Some("succeeded")) => print_remote_result(document["result"].clone(), json),
        (200, _) => remote_problem(&document["error"]),
        _ => remote_problem(&document),
    }
}

/// The status and JSON body of a server's answer.
fn status_and_json(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, serde_json::Value), ureq::Error> {
    let mut response = response?;
    Ok((response.status().as_u16(), response.body_mut().read_json()?))
}

fn print_remote_result(result: serde_json::Value, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).expect("values serialise")
        );
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<TuneResult>(result) {
        Ok(result) => {
            print!("{}", summary(&result));
            ExitCode::SUCCESS
        }
        Err(e) => fail(
            EXIT_FAILURE,
            format!("the server answered with an unexpected result: {e}"),
        ),
    }
}

fn remote_problem(problem: &serde_json::Value) -> ExitCode {
    let detail = problem["detail"]
        .as_str()
        .unwrap_or("the server gave no detail");
    let code = match (problem["status"].as_u64(), problem["type"].as_str()) {
        (_, Some(t)) if t.ends_with("/does-not-fit") => EXIT_DOES_NOT_FIT,
        (Some(400 | 413 | 415 | 422), _) => EXIT_INVALID,
        _ => EXIT_FAILURE,
    };
    fail(code, format!("the server answered: {detail}"))
}
