//! The CUDA device's whole Rust side, run on the CUDA stand-in (`tests/standin/`): a CPU
//! stand-in for the driver and NVML, found through `LD_LIBRARY_PATH` like the real ones, with
//! the kernels of `kernels/*.cu` on the CPU emulation. headroom's code does not know about it.
//!
//! It proves launch arguments, module loading, allocation and its rounding, the
//! OOM-versus-fault split, the leak check, the service's probe workers surviving faults, hangs
//! and crashes (the stand-in keeps a sticky error for the rest of the process, as NVIDIA
//! documents), NVML telemetry and the 409 rule; it says nothing about speed or hardware. Tests that need the stand-in inside
//! this process run themselves again in a child process (the loader reads its path at start).

mod support;

use std::ops::ControlFlow;
use std::process::Output;
use std::time::{Duration, Instant};

use headroom_devices::cuda::CudaDevice;
use headroom_devices::parity::{check_kernels, check_training};
use headroom_engine::device::{Device, DeviceError};
use headroom_engine::step::Steps;
use headroom_engine::{tune, Job};
use serde_json::{json, Value};
use support::standin::StandIn;
use support::{assert_all_pass, job, metric_value, ServerProcess};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            stderr(output)
        )
    })
}

/// An example with a prediction-first search and one step per probe: the model as shipped, the
/// search kept short for the CPU emulation.
fn example(name: &str) -> Value {
    let path = format!("{}/examples/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let mut job: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    job["search"] = json!({"strategy": "predict", "steps_per_probe": 1});
    job
}

#[test]
fn parity_suite_and_training_run_through_the_real_launchers() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    if standin.in_child(
        "parity_suite_and_training_run_through_the_real_launchers",
        &[("HEADROOM_STANDIN_MEMORY", "256MiB")],
    ) {
        return;
    }
    let mut device = CudaDevice::open(0).unwrap();
    assert_eq!(device.compute_capability(), (9, 0));
    assert_all_pass("cuda:0", &check_kernels(&mut device).unwrap());
    assert_all_pass("cuda:0", &check_training(&mut device).unwrap());
}

#[test]
fn doctor_passes_on_the_standin() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let output = standin
        .headroom()
        .args(["doctor", "--json", "--host-memory", "16MiB"])
        .env("HEADROOM_STANDIN_MEMORY", "16MiB")
        .output()
        .unwrap();
    let report = json_of(&output);
    assert!(output.status.success(), "{report:#}");
    assert_eq!(report["passed"], true);
    let rows = report["rows"].as_array().unwrap();
    let check = |name: &str| {
        rows.iter()
            .find(|r| r["check"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in {report:#}"))
    };
    assert_eq!(check("NVML")["status"], "pass");
    assert!(check("GPU 0 CPU stand-in")["detail"]
        .as_str()
        .unwrap()
        .starts_with("GPU-"));
    assert_eq!(check("cuda:0 opened")["status"], "pass");
    assert_eq!(check("cuda:0 kernels")["detail"], "CUBIN for sm_90");
    assert_eq!(check("cuda:0: small tune")["status"], "pass");
    assert_eq!(report["gpu_checked"], true);
    assert!(check("CUDA driver library")["detail"]
        .as_str()
        .unwrap()
        .ends_with("the driver supports CUDA 13.0"));
    assert!(check("NVRTC library")["detail"]
        .as_str()
        .unwrap()
        .starts_with("libnvrtc 13."));
    assert!(
        rows.iter()
            .filter(|r| r["check"].as_str().unwrap().starts_with("cuda:0: "))
            .count()
            > 50
    );
}

/// A driver that refuses the CUBIN (another architecture, say) gets PTX, and the doctor says
/// which it loaded and why; `--require-gpu` passes with a GPU.
#[test]
fn a_refused_cubin_falls_back_to_ptx() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let output = standin
        .headroom()
        .args([
            "doctor",
            "--json",
            "--require-gpu",
            "--host-memory",
            "16MiB",
        ])
        .env("HEADROOM_STANDIN_MEMORY", "16MiB")
        .env("HEADROOM_STANDIN_REFUSE_CUBIN", "1")
        .output()
        .unwrap();
    let report = json_of(&output);
    assert!(output.status.success(), "{report:#}");
    let rows = report["rows"].as_array().unwrap();
    let kernels = rows
        .iter()
        .find(|r| r["check"] == "cuda:0 kernels")
        .unwrap_or_else(|| panic!("{report:#}"));
    let detail = kernels["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("PTX for compute_90") && detail.contains("CUDA_ERROR_NO_BINARY_FOR_GPU"),
        "{detail}"
    );
}

/// `tune --device cuda` of each example at a small budget finds a limit that fresh probes confirm
/// (the max fits, one `multiple_of` above the first OOM does not), near the memory model's; the
/// shipped models except the wide MLP, the ResNets, the ImageNet models and GPT-2, which need
/// more memory and arithmetic than the emulation has time for (ResNet-like blocks train through
/// it in the parity suite; the tiny GPT stands for GPT-2).
#[test]
fn each_example_tunes_to_a_limit_that_probes_confirm() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    // The tiny GPT three times: as it is, with every block checkpointed (recomputed in
    // backward), and sharded with FSDP over 3 GPUs (one rank's step).
    for (name, memory, variant) in [
        ("mnist-mlp-sgd", "24MiB", ""),
        ("cifar10-mlp-adam", "48MiB", ""),
        ("cifar10-mlp-bf16", "48MiB", ""),
        ("deep-mlp-adamw", "128MiB", ""),
        ("lenet5-mnist", "16MiB", ""),
        ("cifar10-cnn-bn", "4MiB", ""),
        ("tiny-gpt", "16MiB", ""),
        ("tiny-gpt", "16MiB", "checkpointed"),
        ("tiny-gpt", "16MiB", "sharded"),
    ] {
        let mut job = example(name);
        if name == "tiny-gpt" {
            // Its limit is a few sequences: a step of 8 could not come within 3% of it.
            job["search"]["multiple_of"] = json!(1);
        }
        match variant {
            "checkpointed" => job["model"]["gradient_checkpointing"] = json!(true),
            "sharded" => {
                job["sharding"] = json!("fsdp");
                job["world_size"] = json!(3);
            }
            _ => {}
        }
        let name = match variant {
            "" => name.to_string(),
            variant => format!("{name}, {variant}"),
        };
        let path = support::job_file(&job);
        let run = |args: &[&str]| {
            standin
                .headroom()
                .args(args)
                .env("HEADROOM_STANDIN_MEMORY", memory)
                .output()
                .unwrap()
        };
        let output = run(&["tune", path.to_str().unwrap(), "--device", "cuda", "--json"]);
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let result = json_of(&output);
        let max = result["max_batch_size"].as_u64().unwrap();
        let predicted = result["predicted_max_batch_size"].as_u64().unwrap();
        assert_eq!(result["limited_by"], "memory", "{name}: {result:#}");
        assert_eq!(result["device"]["kind"], "cuda");
        let ratio = max as f64 / predicted as f64;
        assert!(
            (0.97..=1.0).contains(&ratio),
            "{name}: measured {max}, predicted {predicted}"
        );
        let first_oom = result["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["outcome"] == "oom")
            .map(|p| p["batch_size"].as_u64().unwrap())
            .min()
            .unwrap();
        let above = (first_oom + 8).to_string();
        let sizes = format!("{max},{above}");
        let output = run(&[
            "probe",
            path.to_str().unwrap(),
            "--device",
            "cuda",
            "--batch-size",
            &sizes,
            "--json",
        ]);
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let outcomes: Vec<Value> = json_of(&output)
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["outcome"].clone())
            .collect();
        assert_eq!(
            outcomes,
            ["fit", "oom"],
            "{name}: max {max}, first OOM {first_oom}"
        );
    }
}

fn tune_with(standin: &StandIn, env: &[(&str, &str)]) -> Output {
    let path = support::job_file(&example("mnist-mlp-sgd"));
    standin
        .headroom()
        .args(["tune", path.to_str().unwrap(), "--device", "cuda", "--json"])
        .env("HEADROOM_STANDIN_MEMORY", "16MiB")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn an_injected_fault_ends_the_tune_naming_the_driver_error() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    for (fault, name) in [
        ("40", "CUDA_ERROR_ILLEGAL_ADDRESS"),
        ("40:ecc", "CUDA_ERROR_ECC_UNCORRECTABLE"),
    ] {
        let output = tune_with(standin, &[("HEADROOM_STANDIN_FAIL_LAUNCH", fault)]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{message}");
        assert!(message.contains(name), "{message}");
        assert!(message.contains("probe at batch size"), "{message}");
        assert!(!message.contains("out of memory"), "{message}");
        assert!(message.lines().any(|l| l.contains(" error ")), "{message}");
    }
}

/// A GPU timer that reads NaN or infinity (an event pair the driver cannot time) leaves a tune
/// that answers, its probes without a speed, rather than a worker whose events cannot be read.
#[test]
fn a_timer_that_reads_no_number_leaves_probes_without_a_speed() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    for elapsed in ["nan", "inf"] {
        let output = tune_with(standin, &[("HEADROOM_STANDIN_ELAPSED", elapsed)]);
        assert!(output.status.success(), "{elapsed}: {}", stderr(&output));
        let result = json_of(&output);
        assert!(
            result["max_batch_size"].as_u64().unwrap() > 1000,
            "{result:#}"
        );
        let probes = result["probes"].as_array().unwrap();
        assert!(probes.iter().any(|p| p["outcome"] == "fit"), "{result:#}");
        for probe in probes {
            assert_eq!(probe["step_seconds"], 0.0, "{elapsed}: {probe}");
            assert_eq!(probe["samples_per_second"], 0.0, "{elapsed}: {probe}");
        }
    }
}

#[test]
fn out_of_memory_reported_at_a_synchronise_is_still_out_of_memory() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let at_allocation = json_of(&tune_with(standin, &[]));
    let output = tune_with(standin, &[("HEADROOM_STANDIN_OOM_AT_SYNC", "1")]);
    assert!(output.status.success(), "{}", stderr(&output));
    let at_synchronise = json_of(&output);
    assert_eq!(
        at_synchronise["max_batch_size"],
        at_allocation["max_batch_size"]
    );
    assert!(at_synchronise["probes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["outcome"] == "oom"));
}

#[test]
fn a_probe_that_leaves_memory_behind_is_caught() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let output = tune_with(standin, &[("HEADROOM_STANDIN_LEAK_FREE", "30")]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("did not come back"), "{message}");
}

#[test]
fn a_pool_that_keeps_memory_after_a_trim_is_not_a_leak() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let output = tune_with(standin, &[("HEADROOM_STANDIN_TRIM_KEEPS", "4MiB")]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(json_of(&output)["max_batch_size"].as_u64().unwrap() > 0);
    // A leak is still a leak with such a pool.
    let output = tune_with(
        standin,
        &[
            ("HEADROOM_STANDIN_TRIM_KEEPS", "4MiB"),
            ("HEADROOM_STANDIN_LEAK_FREE", "30"),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("did not come back"));
}

#[test]
fn another_process_allocating_during_a_probe_is_not_a_leak() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let output = tune_with(standin, &[("HEADROOM_STANDIN_FOREIGN_ALLOC", "30:1MiB")]);
    assert!(output.status.success(), "{}", stderr(&output));
    let result = json_of(&output);
    assert!(
        result["max_batch_size"].as_u64().unwrap() > 1000,
        "{result:#}"
    );
}

/// After a sticky fault the process's device refuses every later probe, naming the fault: the
/// driver recovers only in a new process (the service's probe workers are such processes).
#[test]
fn after_a_fault_the_process_s_device_refuses_further_probes() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    if standin.in_child(
        "after_a_fault_the_process_s_device_refuses_further_probes",
        &[
            ("HEADROOM_STANDIN_MEMORY", "16MiB"),
            ("HEADROOM_STANDIN_FAIL_LAUNCH", "40"),
        ],
    ) {
        return;
    }
    let job = Job::from_value(example("mnist-mlp-sgd")).unwrap();
    let mut device = CudaDevice::open(0).unwrap();
    let err = tune(&job, &mut device, &mut |_| ControlFlow::Continue(())).unwrap_err();
    assert!(
        err.to_string().contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{err}"
    );
    let again = tune(&job, &mut device, &mut |_| ControlFlow::Continue(())).unwrap_err();
    let again = again.to_string();
    assert!(
        again.contains("earlier fault") && again.contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{again}"
    );
    // A new context in the same process does not help either, as on the real driver.
    let reopened = CudaDevice::open(0).map(|_| ()).unwrap_err().to_string();
    assert!(
        reopened.contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{reopened}"
    );
}

/// After a sticky fault every driver call of the process answers with it, on every device and
/// whatever its arguments, as NVIDIA documents: the calls below each once returned another
/// answer (or checked only the faulting device).
#[test]
fn after_a_fault_every_driver_call_answers_with_it() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    if standin.in_child(
        "after_a_fault_every_driver_call_answers_with_it",
        &[
            ("HEADROOM_STANDIN_MEMORY", "16MiB"),
            ("HEADROOM_STANDIN_DEVICES", "2"),
            ("HEADROOM_STANDIN_FAIL_LAUNCH", "40"),
        ],
    ) {
        return;
    }
    const ILLEGAL_ADDRESS: i32 = 700;
    let job = Job::from_value(example("mnist-mlp-sgd")).unwrap();
    let mut device = CudaDevice::open(0).unwrap();
    let err = tune(&job, &mut device, &mut |_| ControlFlow::Continue(())).unwrap_err();
    assert!(
        err.to_string().contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{err}"
    );
    use std::ffi::c_void;
    type Handle = *mut c_void;
    let null: Handle = std::ptr::null_mut();
    // SAFETY: the stand-in's libcuda.so.1, already loaded by the device above; each entry point
    // is called with the C signature the driver API gives it (handles as pointers, CUdevice as
    // i32), with valid pointers for what it may write.
    unsafe {
        let driver = libloading::Library::new("libcuda.so.1").unwrap();
        let symbol = |name: &str| name.as_bytes().to_vec();
        let mut pool = null;
        let default_pool = driver
            .get::<unsafe extern "C" fn(*mut Handle, i32) -> i32>(&symbol(
                "cuDeviceGetDefaultMemPool",
            ))
            .unwrap();
        // Device 1 never faulted itself: the process's error is its error too.
        assert_eq!(default_pool(&mut pool, 1), 0);
        let mut value = 0u64;
        let value = (&mut value as *mut u64).cast::<c_void>();
        let mut out = null;
        let pool_attribute = |name: &str, attribute: i32| {
            let call = driver
                .get::<unsafe extern "C" fn(Handle, i32, Handle) -> i32>(&symbol(name))
                .unwrap();
            call(pool, attribute, value)
        };
        let answers = [
            (
                "cuMemPoolGetAttribute",
                pool_attribute("cuMemPoolGetAttribute", 0x6),
            ),
            (
                "cuMemPoolSetAttribute",
                pool_attribute("cuMemPoolSetAttribute", 0x6),
            ),
            ("cuMemPoolTrimTo", {
                let call = driver
                    .get::<unsafe extern "C" fn(Handle, usize) -> i32>(&symbol("cuMemPoolTrimTo"))
                    .unwrap();
                call(pool, 0)
            }),
            ("cuModuleGetFunction", {
                let call = driver
                    .get::<unsafe extern "C" fn(*mut Handle, Handle, *const std::ffi::c_char) -> i32>(&symbol("cuModuleGetFunction"))
                    .unwrap();
                call(&mut out, null, c"linear_forward".as_ptr())
            }),
            ("cuModuleUnload", {
                let call = driver
                    .get::<unsafe extern "C" fn(Handle) -> i32>(&symbol("cuModuleUnload"))
                    .unwrap();
                call(null)
            }),
            ("cuEventDestroy_v2", {
                let call = driver
                    .get::<unsafe extern "C" fn(Handle) -> i32>(&symbol("cuEventDestroy_v2"))
                    .unwrap();
                call(null)
            }),
            ("cuDevicePrimaryCtxRelease_v2", {
                let call = driver
                    .get::<unsafe extern "C" fn(i32) -> i32>(&symbol(
                        "cuDevicePrimaryCtxRelease_v2",
                    ))
                    .unwrap();
                call(1)
            }),
            ("cuCtxGetCurrent", {
                let call = driver
                    .get::<unsafe extern "C" fn(*mut Handle) -> i32>(&symbol("cuCtxGetCurrent"))
                    .unwrap();
                call(&mut out)
            }),
        ];
        for (name, answer) in answers {
            assert_eq!(answer, ILLEGAL_ADDRESS, "{name}");
        }
    }
}

/// Widths and batch sizes whose byte counts pass 64 bits, or the device, are out of memory:
/// no driver call, no fault, no write past a buffer, and the device works on.
#[test]
fn allocation_sizes_that_overflow_are_out_of_memory() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    if standin.in_child(
        "allocation_sizes_that_overflow_are_out_of_memory",
        &[("HEADROOM_STANDIN_MEMORY", "64MiB")],
    ) {
        return;
    }
    let wide = Job::from_value(job(&[1 << 32], &[1 << 16], 10, "sgd")).unwrap();
    let narrow = Job::from_value(job(&[784], &[128], 10, "sgd")).unwrap();
    // One feature: the input buffer has `batch` elements, whose bytes wrap to 4 in 64 bits.
    let thin = Job::from_value(job(&[1], &[1], 2, "sgd")).unwrap();
    let mut device = CudaDevice::open(0).unwrap();
    for (job, batch) in [
        (&wide, 1),
        (&narrow, 1 << 62),
        (&thin, (1 << 62) + 1),
        (&narrow, u64::MAX),
    ] {
        let outcome = device.run_steps(job.plan(), batch, Steps::exactly(1), 1);
        assert!(
            matches!(outcome, Err(DeviceError::OutOfMemory { .. })),
            "batch {batch}: {outcome:?}"
        );
    }
    assert_eq!(device.info().free_bytes, 64 << 20);
    assert!(device
        .run_steps(narrow.plan(), 1000, Steps::exactly(1), 1)
        .is_ok());
}

fn serve(standin: &StandIn, env: &[(&str, &str)], devices: &[&str]) -> ServerProcess {
    let mut command = standin.headroom();
    command
        .arg("serve")
        .args(devices.iter().flat_map(|d| ["--device", d]))
        .env("HEADROOM_STANDIN_MEMORY", "32MiB")
        .env("HEADROOM_WAIT_SECONDS", "120")
        .envs(env.iter().copied());
    ServerProcess::start(command)
}

/// Where a test's server injects faults into its workers, and where the stand-in's processes
/// say that they hold a context (so that NVML lists every worker, as the real one does).
struct Faults {
    dir: tempfile::TempDir,
}

impl Faults {
    fn new() -> Faults {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        Faults { dir }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "HEADROOM_STANDIN_FAIL_LAUNCH_FILE",
                self.file().display().to_string(),
            ),
            (
                "HEADROOM_STANDIN_STATE_DIR",
                self.dir.path().join("state").display().to_string(),
            ),
        ]
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("fail-launch")
    }

    /// The next process to reach its `launch`th launch fails as `how` says (`ecc`, `hang`,
    /// `crash`, or `` for an illegal address).
    fn inject(&self, text: &str) {
        std::fs::write(self.file(), text).unwrap();
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(self.file());
    }
}

fn serve_with_faults(
    standin: &StandIn,
    faults: &Faults,
    env: &[(&str, &str)],
    devices: &[&str],
) -> ServerProcess {
    let owned = faults.env();
    let mut all: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(env);
    serve(standin, &all, devices)
}

/// The MNIST example on `device`, never from the cache, prediction first, with the same kernel
/// launches whatever the machine's speed (no timing floor, no probes for the throughput knee,
/// whose number depends on the speeds measured): the faults below are injected at a launch
/// number, [`FAULT_AT`].
fn mnist_on(device: &str) -> Value {
    let mut body = example("mnist-mlp-sgd");
    body["device"] = json!(device);
    body["no_cache"] = json!(true);
    body["search"] = json!({"strategy": "predict", "min_timed_seconds": 0, "throughput_probes": 0});
    body
}

/// A launch a worker reaches during its second tune of [`mnist_on`]'s job (about 100 launches
/// each), never during its first.
const FAULT_AT: &str = "150";

#[test]
fn the_service_reports_gpu_telemetry_and_serves_each_gpu_once() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let server = serve(
        standin,
        &[("HEADROOM_STANDIN_UTILIZATION", "37")],
        &["auto", "cuda:0"],
    );
    let (status, devices) = server.http.get("/devices");
    assert_eq!(status, 200);
    let devices = devices.as_array().unwrap();
    let gpus: Vec<&Value> = devices.iter().filter(|d| d["kind"] == "cuda").collect();
    assert_eq!(gpus.len(), 1, "{devices:#?}");
    let gpu = gpus[0];
    assert_eq!(gpu["device"], "cuda:0");
    assert!(gpu["uuid"].as_str().unwrap().starts_with("GPU-"));
    assert_eq!(gpu["utilization_percent"], 37);
    assert_eq!(gpu["temperature_celsius"], 35);
    assert_eq!(gpu["total_bytes"], 32 << 20);
    assert_eq!(gpu["other_compute_processes"], 0);
    let answer = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let metrics = server.http.get_text("/metrics");
    let gpu = [
        ("device", "cuda:0"),
        ("gpu", "0"),
        ("UUID", "GPU-57a4d100-0000-4000-8000-000000000000"),
        ("model_name", "CPU stand-in for an NVIDIA GPU (tests only)"),
    ];
    let value = |metric: &str, extra: &[(&str, &str)]| {
        let labels: Vec<(&str, &str)> = gpu.iter().chain(extra).copied().collect();
        metric_value(&metrics, metric, &labels)
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in\n{metrics}"))
    };
    assert_eq!(
        value("headroom_device_memory_total_bytes", &[]),
        (32 << 20) as f64
    );
    assert_eq!(
        value("headroom_tunes_total", &[("outcome", "succeeded")]),
        1.0
    );
    assert!(value("headroom_last_max_batch_size", &[]) > 1000.0);
}

/// The shared-GPU check of a new tune reads NVML off the async runtime: with one runtime
/// thread and an NVML that takes seconds to answer, the service still answers `/livez` at once
/// while the check waits.
#[test]
fn a_slow_nvml_reading_does_not_hold_up_other_requests() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let delay = dir.path().join("nvml-delay");
    let delay_path = delay.display().to_string();
    let server = serve(
        standin,
        &[
            ("TOKIO_WORKER_THREADS", "1"),
            ("HEADROOM_STANDIN_NVML_DELAY_FILE", delay_path.as_str()),
        ],
        &["cuda:0"],
    );
    // From now on, every NVML initialisation takes 4 s.
    std::fs::write(&delay, "4000").unwrap();
    let slow = Duration::from_secs(4);
    std::thread::scope(|scope| {
        let tune = scope.spawn(|| {
            server
                .http
                .tune(&mnist_on("cuda:0"), &[("Prefer", "respond-async")])
        });
        std::thread::sleep(Duration::from_millis(500));
        let asked = Instant::now();
        assert_eq!(server.http.get("/livez").0, 200);
        let waited = asked.elapsed();
        assert!(
            waited < slow / 4,
            "/livez waited {waited:?} behind an NVML reading"
        );
        let accepted = tune.join().unwrap();
        assert_eq!(accepted.status, 202, "{}", accepted.body);
    });
}

#[test]
fn a_gpu_another_process_computes_on_is_refused_unless_allowed() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let server = serve(
        standin,
        &[("HEADROOM_STANDIN_PROCESSES", "4242:4MiB")],
        &["cuda:0"],
    );
    let answer = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert!(answer.body["detail"]
        .as_str()
        .unwrap()
        .contains("allow_shared"));
    let mut allowed = mnist_on("cuda:0");
    allowed["allow_shared"] = json!(true);
    let answer = server.http.tune(&allowed, &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    // The foreign process's 4 MiB are not the tuner's: the limit is what the rest holds.
    assert_eq!(answer.body["device"]["free_bytes"], 28 << 20);
}

/// The worker process of `device` on `server`, from `/devices`.
fn worker_pid(server: &ServerProcess, device: &str) -> u32 {
    let (_, devices) = server.http.get("/devices");
    let entry = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == device)
        .unwrap_or_else(|| panic!("{device} in {devices:#}"));
    entry["worker_pid"].as_u64().expect("a running worker") as u32
}

/// Whether a process with this id is alive (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Runs a job that ends in a worker failure, and checks what the client and the service say.
fn fails_and_recovers(server: &ServerProcess, control: &Value, expected: &[&str]) {
    let failed = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(failed.status, 503, "{}", failed.body);
    let detail = failed.body["detail"].as_str().unwrap();
    for words in expected {
        assert!(detail.contains(words), "{words:?} in {detail}");
    }
    assert!(detail.contains("new worker process"), "{detail}");
    assert_eq!(server.http.get("/livez").0, 200);
    let answer = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    for key in [
        "max_batch_size",
        "recommended_batch_size",
        "predicted_max_batch_size",
    ] {
        assert_eq!(answer.body[key], control[key], "{key}");
    }
}

/// A sticky illegal address, an uncorrectable ECC error and a `kill -9` of the worker each end
/// that job with an error naming them; the service stays up and the next job, in a new worker,
/// gets the answer it got before the fault.
#[test]
fn a_fault_or_a_killed_worker_ends_its_job_and_the_next_runs_in_a_new_worker() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let faults = Faults::new();
    let server = serve_with_faults(standin, &faults, &[], &["cuda:0"]);
    let control = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(control.status, 200, "{}", control.body);
    let first = worker_pid(&server, "cuda:0");

    faults.inject(FAULT_AT);
    fails_and_recovers(&server, &control.body, &["CUDA_ERROR_ILLEGAL_ADDRESS"]);
    let second = worker_pid(&server, "cuda:0");
    assert_ne!(first, second);
    assert!(!alive(first), "the faulted worker {first} is still running");

    faults.inject(&format!("{FAULT_AT}:ecc"));
    fails_and_recovers(&server, &control.body, &["CUDA_ERROR_ECC_UNCORRECTABLE"]);

    let mut slow = mnist_on("cuda:0");
    slow["search"] = json!({"steps_per_probe": 50});
    let accepted = server.http.tune(&slow, &[("Prefer", "respond-async")]);
    let id = accepted.body["id"].as_str().unwrap().to_string();
    server.http.wait_until_running(&id);
    let pid = worker_pid(&server, "cuda:0");
    // SAFETY: a signal to a process id read from the service a moment ago.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let ended = server.http.wait_for(&id);
    assert_eq!(ended["state"], "failed", "{ended:#}");
    let detail = ended["error"]["detail"].as_str().unwrap();
    assert!(detail.contains("SIGKILL"), "{detail}");
    let answer = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["max_batch_size"],
        control.body["max_batch_size"]
    );
    let metrics = server.http.get_text("/metrics");
    let restarts = metric_value(
        &metrics,
        "headroom_worker_restarts_total",
        &[("device", "cuda:0")],
    );
    assert_eq!(restarts, Some(3.0), "{metrics}");
}

/// A probe that never returns is stopped by the watchdog, and a driver that aborts the process
/// takes only the worker: each job ends with a clear error, the job queued behind the crash
/// runs in the next worker, and the answers are the ones from before.
#[test]
fn a_hung_probe_or_a_crashed_driver_ends_only_that_job() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let faults = Faults::new();
    let server = serve_with_faults(
        standin,
        &faults,
        &[
            ("HEADROOM_PROBE_TIMEOUT_FLOOR_SECONDS", "2"),
            ("HEADROOM_PROBE_TIMEOUT_SECONDS", "30"),
        ],
        &["cuda:0"],
    );
    let control = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(control.status, 200, "{}", control.body);

    faults.inject(&format!("{FAULT_AT}:hang"));
    fails_and_recovers(
        &server,
        &control.body,
        &[
            "the probe at batch size",
            "did not finish within",
            "was stopped",
        ],
    );

    // A line on the worker's standard output that is no event (a library printing), then a
    // hang: the line goes to the log, and the watchdog still stops the probe.
    faults.inject(&format!("{FAULT_AT}:print-hang"));
    fails_and_recovers(
        &server,
        &control.body,
        &["the probe at batch size", "did not finish within"],
    );

    faults.inject(&format!("{FAULT_AT}:crash"));
    let crashing = server
        .http
        .tune(&mnist_on("cuda:0"), &[("Prefer", "respond-async")]);
    // Not identical, or it would join the first job instead of queueing behind it.
    let mut other = mnist_on("cuda:0");
    other["headroom"] = json!(0.75);
    let queued = server.http.tune(&other, &[("Prefer", "respond-async")]);
    let crashed = server.http.wait_for(crashing.body["id"].as_str().unwrap());
    assert_eq!(crashed["state"], "failed", "{crashed:#}");
    let detail = crashed["error"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("SIGABRT") && detail.contains("ended unexpectedly"),
        "{detail}"
    );
    let after = server.http.wait_for(queued.body["id"].as_str().unwrap());
    assert_eq!(after["state"], "succeeded", "{after:#}");
    assert_eq!(
        after["result"]["max_batch_size"],
        control.body["max_batch_size"]
    );
    assert_eq!(server.http.get("/livez").0, 200);
}

/// A device whose worker keeps crashing refuses jobs with 503 naming it, `/readyz` says
/// degraded and the host device goes on; once the faults stop and the cooldown has passed it
/// tunes again.
#[test]
fn a_device_whose_worker_keeps_failing_is_unhealthy_until_the_faults_stop() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let faults = Faults::new();
    let server = serve_with_faults(
        standin,
        &faults,
        &[("HEADROOM_WORKER_COOLDOWN_SECONDS", "5")],
        &["cuda:0", "host"],
    );
    faults.inject("1:crash:repeat");
    for _ in 0..3 {
        let failed = server.http.tune(&mnist_on("cuda:0"), &[]);
        assert_eq!(failed.status, 503, "{}", failed.body);
        assert!(failed.body["type"]
            .as_str()
            .unwrap()
            .ends_with("worker-crashed"));
    }
    let refused = server.http.tune(&mnist_on("cuda:0"), &[]);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body["type"]
        .as_str()
        .unwrap()
        .ends_with("device-unhealthy"));
    assert!(refused.body["detail"].as_str().unwrap().contains("cuda:0"));
    let (status, ready) = server.http.get("/readyz");
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("degraded")),
        "{ready:#}"
    );
    assert_eq!(
        ready["unhealthy_devices"][0]["device"], "cuda:0",
        "{ready:#}"
    );
    let metrics = server.http.get_text("/metrics");
    assert_eq!(
        metric_value(&metrics, "headroom_device_healthy", &[("device", "cuda:0")]),
        Some(0.0),
        "{metrics}"
    );
    let host = server.http.tune(&mnist_on("host"), &[]);
    assert_eq!(host.status, 200, "{}", host.body);

    faults.clear();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        let answer = server.http.tune(&mnist_on("cuda:0"), &[]);
        if answer.status != 503 || std::time::Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(server.http.get("/readyz").1["status"], "ready");
}

#[test]
fn sigterm_during_a_cuda_tune_frees_every_allocation_and_the_context() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let report_path = report.display().to_string();
    let mut server = serve(
        standin,
        &[("HEADROOM_STANDIN_REPORT", &report_path)],
        &["cuda:0"],
    );
    let mut slow = mnist_on("cuda:0");
    slow["search"] = json!({"steps_per_probe": 50});
    let answer = server.http.tune(&slow, &[("Prefer", "respond-async")]);
    assert_eq!(answer.status, 202, "{}", answer.body);
    server
        .http
        .wait_until_running(answer.body["id"].as_str().unwrap());
    let worker = worker_pid(&server, "cuda:0");
    assert!(server.terminate(), "{}", server.log());
    assert!(!alive(worker), "the worker {worker} outlived the service");
    let log = server.log();
    assert!(log.contains("device released"), "{log}");
    let held: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(held["launches"].as_u64().unwrap() > 0, "{held}");
    assert_eq!(held["live_allocations"], 0, "{held}");
    assert_eq!(held["pool_reserved_bytes"], 0, "{held}");
    assert_eq!(held["retained_contexts"], 0, "{held}");
    assert_eq!(held["loaded_modules"], 0, "{held}");
}

#[test]
fn each_step_on_the_gpu_is_timed_by_a_pair_of_events() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut spec = example("mnist-mlp-sgd");
    spec["search"] = json!({"steps_per_probe": 3, "min_timed_seconds": 0});
    let job = support::job_file(&spec);
    let output = support::run_ok(
        "headroom probe on the stand-in",
        standin
            .headroom()
            .args([
                "probe",
                job.to_str().unwrap(),
                "--device",
                "cuda",
                "--batch-size",
                "64,128",
                "--json",
            ])
            .env("HEADROOM_STANDIN_REPORT", &report),
    );
    let probes: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        probes
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["outcome"] == "fit" && p["step_seconds"].as_f64().unwrap() > 0.0),
        "{probes}"
    );
    let counted: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // Three steps in each of two probes, the warm-up step timed too; no event left behind.
    assert_eq!(counted["timed_intervals"], 6, "{counted}");
    assert_eq!(counted["live_events"], 0, "{counted}");
}
