//! The probe worker's side: `headroom worker`, a process of its own that opens one device and
//! runs the service's searches on it, so that a fault, a hang or a crash in the driver ends this
//! process and never the service. After a device fault it exits: NVIDIA documents that a sticky
//! error leaves the process's CUDA context unusable until the process is relaunched.

use std::fs::File;
use std::io::Write;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use super::protocol::{receive, send, Event, Request};
use headroom_devices::cuda;
use headroom_devices::select::{self, DeviceSpec};
use headroom_engine::device::{Device, DeviceError, DeviceInfo, StepReport};
use headroom_engine::job::Job;
use headroom_engine::plan::Plan;
use headroom_engine::search::{tune, TuneError};
use headroom_engine::step::Steps;

/// How a worker ended, as its exit code says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The service closed the worker's input.
    Done = 0,
    /// The device could not be opened.
    OpenFailed = 1,
    /// A device fault: the next job needs a new process.
    Faulted = 3,
}

/// Runs the worker on `spec` (the host with `host_budget_bytes`) until the service closes its
/// input or the device faults.
pub fn run(spec: DeviceSpec, host_budget_bytes: u64) -> Exit {
    if let Err(e) = take_standard_output() {
        eprintln!("error: the probe worker cannot set up its event stream: {e}");
        return Exit::OpenFailed;
    }
    let opened = match select::open(spec, host_budget_bytes) {
        Ok(opened) => opened,
        Err(e) => {
            emit(&Event::OpenFailed {
                reason: e.to_string(),
            });
            return Exit::OpenFailed;
        }
    };
    serve(opened.device, opened.fallback_reason)
}

/// CUDA devices the driver lists, written on standard output (0 without a driver): the service
/// counts GPUs through a worker, so that it never loads the driver itself.
pub fn count_cuda() -> Exit {
    let count = if cuda::compile::nvrtc_available() {
        cuda::device_count().unwrap_or(0)
    } else {
        0
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{count}").and_then(|()| out.flush());
    Exit::Done
}

/// Faults CUDA device 0 on purpose and prints, as one JSON line, what the driver answered then
/// (`cuda::drill`): for the GPU check, in a throwaway worker. Exits [`Exit::Faulted`] when the
/// fault was told apart from out-of-memory, [`Exit::OpenFailed`] without a device.
pub fn fault_drill() -> Exit {
    let mut out = std::io::stdout().lock();
    let (line, exit) = match cuda::CudaDevice::open(0) {
        Ok(mut device) => {
            let report = device.fault_drill();
            let exit = if report.classified_as_fault {
                Exit::Faulted
            } else {
                Exit::Done
            };
            (
                serde_json::json!({ "device": device.info().name, "drill": report }),
                exit,
            )
        }
        Err(e) => (
            serde_json::json!({ "open_failed": e.to_string() }),
            Exit::OpenFailed,
        ),
    };
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    exit
}

/// Announces the open device, then runs each job the service sends.
fn serve(mut device: Box<dyn Device>, fallback_reason: Option<String>) -> Exit {
    emit(&Event::Ready {
        info: device.info(),
        fallback_reason,
    });
    let cancel = Arc::new(AtomicBool::new(false));
    let jobs = read_requests(Arc::clone(&cancel));
    for job in jobs {
        let outcome = match Job::from_value(job) {
            Ok(job) => search(&job, device.as_mut(), &cancel),
            Err(e) => Err(TuneError::Fault {
                batch_size: 0,
                message: format!("the worker could not read the job: {e}"),
            }),
        };
        let faulted = matches!(outcome, Err(TuneError::Fault { .. }));
        emit(&Event::Ended {
            outcome: Box::new(outcome),
            info: device.info(),
        });
        if faulted {
            return Exit::Faulted;
        }
    }
    Exit::Done
}

/// Reads requests on a thread of their own: jobs come out of the returned channel, a cancel
/// sets `cancel` at once, and the end of the input cancels and closes the channel.
fn read_requests(cancel: Arc<AtomicBool>) -> mpsc::Receiver<serde_json::Value> {
    let (jobs, received) = mpsc::channel();
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
        loop {
            match receive::<_, Request>(&mut input) {
                Ok(Some(Request::Tune { job })) => {
                    cancel.store(false, Ordering::SeqCst);
                    if jobs.send(job).is_err() {
                        break;
                    }
                }
                Ok(Some(Request::Cancel)) => cancel.store(true, Ordering::SeqCst),
                Ok(None) | Err(_) => {
                    cancel.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
    });
    received
}

/// One search, each probe announced as it starts and reported as it ends.
fn search(
    job: &Job,
    device: &mut dyn Device,
    cancel: &AtomicBool,
) -> Result<headroom_engine::TuneResult, TuneError> {
    let mut announced = Announced { device };
    tune(job, &mut announced, &mut |probe| {
        emit(&Event::Probe(probe.clone()));
        if cancel.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
}

/// A device that tells the service when each probe starts, for its watchdog.
struct Announced<'a> {
    device: &'a mut dyn Device,
}

impl Device for Announced<'_> {
    fn info(&self) -> DeviceInfo {
        self.device.info()
    }

    fn run_steps(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: Steps,
        seed: u64,
    ) -> Result<StepReport, DeviceError> {
        emit(&Event::ProbeStarted { batch_size });
        self.device.run_steps(plan, batch_size, steps, seed)
    }
}

/// Where events go: a private copy of the standard output the service reads.
static EVENTS: OnceLock<Mutex<File>> = OnceLock::new();

/// Keeps the standard output the service reads for events alone: the events go to a private
/// copy of it, and standard output itself is pointed at standard error, so that whatever a
/// library prints (a driver's warning, a stray `printf`) reaches the service's log instead of
/// its event stream.
fn take_standard_output() -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let _flushed = stdout.lock().flush();
    // SAFETY: dup and dup2 take and return plain descriptors; 1 and 2 are open in a process the
    // service started with piped output, and the duplicate is owned by the File made from it.
    let events = unsafe {
        let copy = libc::dup(stdout.as_raw_fd());
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        File::from_raw_fd(copy)
    };
    let _ = EVENTS.set(Mutex::new(events));
    Ok(())
}

/// Writes an event; a service that no longer reads ends the worker.
fn emit(event: &Event) {
    let sent = match EVENTS.get() {
        Some(events) => send(&mut *crate::lock(events), event),
        None => send(&mut std::io::stdout().lock(), event),
    };
    if sent.is_err() {
        std::process::exit(Exit::Done as i32);
    }
}
