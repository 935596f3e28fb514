//! The service's side of a probe worker: starting the process with only its device visible,
//! sending it jobs, following its probes under a watchdog, and telling a crash or a hang apart
//! from an answer.

use std::io::{BufReader, ErrorKind};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::protocol::{receive, send, Event, Request};
use headroom_devices::select::DeviceSpec;
use headroom_engine::device::DeviceInfo;
use headroom_engine::job::Job;
use headroom_engine::result::Probe;
use headroom_engine::search::TuneError;
use headroom_engine::TuneResult;

/// How to start a worker: the `headroom` binary (its hidden `worker` command) and the host
/// device's budget.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The binary to run.
    pub program: PathBuf,
    /// Memory budget of the host device, bytes.
    pub host_memory_bytes: u64,
}

impl WorkerCommand {
    /// Workers of `program`, or of the running binary when it is empty.
    pub fn new(program: &str, host_memory_bytes: u64) -> std::io::Result<WorkerCommand> {
        let program = match program {
            "" => std::env::current_exe()?,
            named => PathBuf::from(named),
        };
        Ok(WorkerCommand {
            program,
            host_memory_bytes,
        })
    }

    /// CUDA devices the driver lists, counted by a worker process (0 when it cannot tell).
    pub fn count_cuda(&self) -> u32 {
        let output = Command::new(&self.program)
            .args(["worker", "--count-cuda"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        output
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }
}

/// How long a probe may take before its worker is stopped: ten times what the previous probe
/// took, scaled by the batch ratio, within `[floor, ceiling]`; `ceiling` for a job's first probe
/// and between probes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watchdog {
    /// The least a probe is given.
    pub floor: Duration,
    /// The most a probe is given.
    pub ceiling: Duration,
}

impl Watchdog {
    /// The service's defaults (`probe_timeout_floor_seconds`, `probe_timeout_seconds`).
    pub const DEFAULT: Watchdog = Watchdog {
        floor: Duration::from_secs(60),
        ceiling: Duration::from_secs(900),
    };

    /// The time allowed for a probe at `batch_size`, after `previous` (batch size and time).
    pub fn allowance(&self, previous: Option<(u64, Duration)>, batch_size: u64) -> Duration {
        let Some((before, took)) = previous else {
            return self.ceiling;
        };
        let ratio = (batch_size as f64 / before.max(1) as f64).max(1.0);
        let allowed = took.as_secs_f64() * 10.0 * ratio;
        Duration::from_secs_f64(allowed.min(self.ceiling.as_secs_f64())).max(self.floor)
    }
}

/// Why a worker gave no answer: each leaves the worker stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkerError {
    /// The process did not start, or did not open its device.
    #[error("the probe worker for {device} could not start: {reason}")]
    Start {
        /// The device.
        device: DeviceSpec,
        /// Why.
        reason: String,
    },
    /// The process ended without an answer (a crash in the driver, a kill).
    #[error("the probe worker for {device} ended unexpectedly ({status}){}", during(*.batch_size))]
    Crashed {
        /// The device.
        device: DeviceSpec,
        /// How it ended: an exit code or a signal.
        status: String,
        /// The probe it was running.
        batch_size: Option<u64>,
    },
    /// A probe (or the worker between probes) passed its deadline; the worker was killed.
    #[error("{} did not finish within {seconds:.0} s; the probe worker for {device} was stopped", match batch_size { Some(b) => format!("the probe at batch size {b}"), None => "the worker".to_string() })]
    Hung {
        /// The device.
        device: DeviceSpec,
        /// The probe that hung, if one was running.
        batch_size: Option<u64>,
        /// The time it had.
        seconds: f64,
    },
}

fn during(batch_size: Option<u64>) -> String {
    batch_size.map_or(String::new(), |b| {
        format!(" during the probe at batch size {b}")
    })
}

/// A running worker process with its device open.
pub struct ProbeWorker {
    device: DeviceSpec,
    child: Child,
    input: Option<ChildStdin>,
    events: Receiver<Event>,
    info: DeviceInfo,
    fallback_reason: Option<String>,
}

impl ProbeWorker {
    /// Starts a worker for `spec` and waits up to `timeout` for its device to open. A GPU
    /// worker sees only its own GPU (`CUDA_VISIBLE_DEVICES`), and dies with the service.
    pub fn start(
        command: &WorkerCommand,
        spec: DeviceSpec,
        timeout: Duration,
    ) -> Result<ProbeWorker, WorkerError> {
        let start_error = |reason: String| WorkerError::Start {
            device: spec,
            reason,
        };
        // A GPU worker sees only its GPU, as device 0.
        let opens = match spec {
            DeviceSpec::Cuda(_) => DeviceSpec::Cuda(0),
            other => other,
        };
        let mut process = Command::new(&command.program);
        process
            .args(["worker", "--device", &opens.to_string()])
            .args(["--host-memory", &command.host_memory_bytes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let DeviceSpec::Cuda(index) = spec {
            let inherited = std::env::var("CUDA_VISIBLE_DEVICES").ok();
            process.env(
                "CUDA_VISIBLE_DEVICES",
                only_gpu(inherited.as_deref(), index),
            );
        }
        die_with_parent(&mut process);
        let mut child = process
            .spawn()
            .map_err(|e| start_error(format!("{}: {e}", command.program.display())))?;
        let input = child.stdin.take();
        let output = child.stdout.take().expect("stdout is piped");
        let (sender, events) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("headroom-{spec}-events"))
            .spawn(move || forward_events(output, &sender, spec))
            .map_err(|e| start_error(e.to_string()))?;
        let mut worker = ProbeWorker {
            device: spec,
            child,
            input,
            events,
            info: DeviceInfo {
                kind: headroom_engine::device::DeviceKind::Host,
                index: 0,
                name: String::new(),
                uuid: None,
                total_bytes: 0,
                free_bytes: 0,
            },
            fallback_reason: None,
        };
        match worker.events.recv_timeout(timeout) {
            Ok(Event::Ready {
                info,
                fallback_reason,
            }) => {
                worker.info = worker.renumbered(info);
                worker.fallback_reason = fallback_reason;
                Ok(worker)
            }
            Ok(Event::OpenFailed { reason }) => Err(start_error(reason)),
            Ok(other) => Err(start_error(format!(
                "it said {other:?} before it was ready"
            ))),
            Err(RecvTimeoutError::Timeout) => Err(start_error(format!(
                "its device did not open within {} s",
                timeout.as_secs()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                let status = worker.wait_status();
                Err(start_error(format!("it ended ({status})")))
            }
        }
    }

    /// The device's identity and memory as of the worker's last answer.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Why a worker started for `auto` opened the host, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The process id, for logs.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs the search for `job` in the worker. `observer` sees each probe and may cancel the
    /// search; a probe past its [`Watchdog`] allowance, or an end of the process, is a
    /// [`WorkerError`] and stops the worker.
    pub fn tune(
        &mut self,
        job: &Job,
        watchdog: &Watchdog,
        observer: &mut dyn FnMut(&Probe) -> ControlFlow<()>,
    ) -> Result<Result<TuneResult, TuneError>, WorkerError> {
        let request = Request::Tune {
            job: serde_json::to_value(job).expect("jobs serialise"),
        };
        if !self.request(&request) {
            return Err(self.crashed(None));
        }
        let mut deadline = Instant::now() + watchdog.ceiling;
        let mut running: Option<(u64, Instant, Duration)> = None;
        let mut previous: Option<(u64, Duration)> = None;
        let mut cancelled = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::ProbeStarted { batch_size }) => {
                    let allowed = watchdog.allowance(previous, batch_size);
                    running = Some((batch_size, Instant::now(), allowed));
                    deadline = Instant::now() + allowed;
                }
                Ok(Event::Probe(probe)) => {
                    if let Some((batch_size, started, _)) = running.take() {
                        previous = Some((batch_size, started.elapsed()));
                    }
                    deadline = Instant::now() + watchdog.ceiling;
                    if observer(&probe).is_break() && !cancelled {
                        cancelled = true;
                        self.request(&Request::Cancel);
                    }
                }
                Ok(Event::Ended { outcome, info }) => {
                    self.info = self.renumbered(info);
                    return Ok(*outcome);
                }
                Ok(Event::Ready { .. } | Event::OpenFailed { .. }) => {
                    self.kill();
                    return Err(self.crashed(running.map(|r| r.0)));
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    return Err(WorkerError::Hung {
                        device: self.device,
                        batch_size: running.map(|r| r.0),
                        seconds: running.map_or(watchdog.ceiling, |r| r.2).as_secs_f64(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.crashed(running.map(|r| r.0)));
                }
            }
        }
    }

    /// Closes the worker's input and waits up to `grace` for it to end, then kills it.
    pub fn stop(mut self, grace: Duration) {
        self.input.take();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Sends a request; false when the worker no longer reads.
    fn request(&mut self, request: &Request) -> bool {
        self.input
            .as_mut()
            .is_some_and(|input| send(input, request).is_ok())
    }

    /// The error for a worker that ended without an answer.
    fn crashed(&mut self, batch_size: Option<u64>) -> WorkerError {
        WorkerError::Crashed {
            device: self.device,
            status: self.wait_status(),
            batch_size,
        }
    }

    /// How the process ended (it has closed its output): waited for up to [`EXIT_GRACE`],
    /// then killed.
    fn wait_status(&mut self) -> String {
        self.input.take();
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return describe(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    self.kill();
                    return format!(
                        "it closed its output but had not exited {} s later, so it was killed",
                        EXIT_GRACE.as_secs()
                    );
                }
                Err(e) => {
                    self.kill();
                    return format!("its status is unknown: {e}");
                }
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A GPU worker sees its GPU as device 0; the service knows it by its own index.
    fn renumbered(&self, mut info: DeviceInfo) -> DeviceInfo {
        if let DeviceSpec::Cuda(index) = self.device {
            info.index = index;
        }
        info
    }
}

impl Drop for ProbeWorker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// How long a worker that closed its output has to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Passes on every event the worker of `device` writes, until its output ends. A line that is
/// no event (something a library printed, a message this build cannot read) is logged and
/// skipped: the watchdog alone decides when a worker has been silent too long.
fn forward_events(output: ChildStdout, events: &Sender<Event>, device: DeviceSpec) {
    let mut output = BufReader::new(output);
    loop {
        match receive::<_, Event>(&mut output) {
            Ok(Some(event)) => {
                if events.send(event).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                tracing::warn!(%device, "the probe worker wrote a line that is no event; ignored: {e}");
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// `CUDA_VISIBLE_DEVICES` for a worker of the service's GPU `index`: that GPU alone, as the
/// service's own `CUDA_VISIBLE_DEVICES` (a list of indices or UUIDs) names it, if it has one.
fn only_gpu(inherited: Option<&str>, index: u32) -> String {
    inherited
        .and_then(|list| list.split(',').nth(index as usize))
        .map_or_else(|| index.to_string(), |entry| entry.trim().to_string())
}

/// An exit status in words: `exit code 3`, `killed by signal 6 (SIGABRT)`.
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => {
            let name = match signal {
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            };
            format!("killed by signal {signal}{name}")
        }
        (None, None) => "ended".into(),
    }
}

/// Asks the kernel to kill the worker when the service's thread that started it dies, so that
/// a `kill -9` of the service leaves no worker behind.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_engine::device::DeviceKind;
    use std::os::unix::fs::PermissionsExt;

    /// A worker program written as a shell script: it announces a host device, reads the tune
    /// request, then does `after_request`.
    fn scripted_worker(dir: &std::path::Path, after_request: &str) -> WorkerCommand {
        let ready = serde_json::to_string(&Event::Ready {
            info: DeviceInfo {
                kind: DeviceKind::Host,
                index: 0,
                name: "a scripted worker".into(),
                uuid: None,
                total_bytes: 1 << 20,
                free_bytes: 1 << 20,
            },
            fallback_reason: None,
        })
        .unwrap();
        let program = dir.join("worker.sh");
        let script =
            format!("#!/bin/sh\nprintf '%s\\n' '{ready}'\nread request\n{after_request}\n");
        std::fs::write(&program, script).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        WorkerCommand {
            program,
            host_memory_bytes: 1 << 20,
        }
    }

    /// The MNIST example, as a job.
    fn mnist() -> Job {
        Job::from_json(include_str!("../../../../examples/mnist-mlp-sgd.json")).unwrap()
    }

    const QUICK: Watchdog = Watchdog {
        floor: Duration::from_secs(1),
        ceiling: Duration::from_secs(2),
    };

    /// A worker that prints what is no event (a library writing to standard output) and then
    /// hangs is still stopped by the watchdog: the line is skipped, not the end of the events.
    #[test]
    fn a_worker_that_prints_garbage_then_hangs_is_killed_by_the_watchdog() {
        let dir = tempfile::tempdir().unwrap();
        let command = scripted_worker(
            dir.path(),
            "echo 'libfoo: hello from a library'\necho '{\"probe\": {\"step_seconds\": null}}'\nexec sleep 600",
        );
        let mut worker =
            ProbeWorker::start(&command, DeviceSpec::Host, Duration::from_secs(10)).unwrap();
        let pid = worker.pid();
        let started = Instant::now();
        let outcome = worker.tune(&mnist(), &QUICK, &mut |_| ControlFlow::Continue(()));
        assert!(
            matches!(
                outcome,
                Err(WorkerError::Hung {
                    batch_size: None,
                    ..
                })
            ),
            "{outcome:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        // The process is gone: killed and reaped.
        assert_ne!(unsafe { libc::kill(pid as i32, 0) }, 0);
    }

    /// A worker that closes its output but does not exit is waited for a bounded time, then
    /// killed; its job ends as a crash that says so.
    #[test]
    fn a_worker_that_closes_its_output_and_hangs_is_killed_after_a_grace() {
        let dir = tempfile::tempdir().unwrap();
        let command = scripted_worker(dir.path(), "exec sleep 600 >&-");
        let mut worker =
            ProbeWorker::start(&command, DeviceSpec::Host, Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        let outcome = worker.tune(&mnist(), &Watchdog::DEFAULT, &mut |_| {
            ControlFlow::Continue(())
        });
        let Err(WorkerError::Crashed { status, .. }) = outcome else {
            panic!("{outcome:?}");
        };
        assert!(status.contains("killed"), "{status}");
        assert!(started.elapsed() < EXIT_GRACE + Duration::from_secs(10));
    }

    #[test]
    fn a_worker_sees_the_gpu_the_service_calls_by_its_index() {
        assert_eq!(only_gpu(None, 1), "1");
        assert_eq!(only_gpu(Some("2,3"), 1), "3");
        assert_eq!(only_gpu(Some("GPU-aa, GPU-bb"), 1), "GPU-bb");
        assert_eq!(only_gpu(Some("2"), 0), "2");
    }

    #[test]
    fn a_probe_gets_ten_times_the_last_scaled_by_the_batch_within_the_bounds() {
        let watchdog = Watchdog {
            floor: Duration::from_secs(5),
            ceiling: Duration::from_secs(100),
        };
        assert_eq!(watchdog.allowance(None, 16), Duration::from_secs(100));
        let after = |batch, secs: f64| Some((batch, Duration::from_secs_f64(secs)));
        assert_eq!(
            watchdog.allowance(after(16, 0.001), 32),
            Duration::from_secs(5)
        );
        assert_eq!(
            watchdog.allowance(after(16, 1.0), 32),
            Duration::from_secs(20)
        );
        assert_eq!(
            watchdog.allowance(after(32, 1.0), 16),
            Duration::from_secs(10)
        );
        assert_eq!(
            watchdog.allowance(after(16, 30.0), 64),
            Duration::from_secs(100)
        );
    }
}
