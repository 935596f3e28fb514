//! One worker thread per device: the device's bounded queue, and one job at a time on it
//! (concurrent OOM probes on one device would corrupt each other's measurements).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cache::ResultCache;
use super::jobs::{JobState, TuneJob};
use super::metrics::Metrics;
use super::problem::Problem;
use crate::device::{Device, DeviceInfo, DeviceKind};
use crate::result::Probe;
use crate::search::{tune, TuneError};

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum EnqueueError {
    /// The device's queue is full.
    Full,
    /// The service is shutting down.
    Closed,
}

/// A device, its queue and its worker thread.
pub struct DeviceWorker {
    /// Name used in jobs and labels: `host` or `cuda:N`.
    pub name: String,
    /// Identity for the result cache (name, memory, driver, code).
    pub identity: String,
    sender: Mutex<Option<SyncSender<Arc<TuneJob>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    queued: AtomicUsize,
    busy: AtomicBool,
    info: Mutex<DeviceInfo>,
    metrics: Arc<Metrics>,
}

/// What a worker needs besides its device.
pub struct WorkerContext {
    /// Where results go.
    pub cache: Arc<ResultCache>,
    /// Where measurements go.
    pub metrics: Arc<Metrics>,
}

impl DeviceWorker {
    /// Starts the worker thread of `device`, with a queue of `queue_length` jobs.
    pub fn start(
        name: String,
        driver_version: &str,
        device: Box<dyn Device>,
        queue_length: usize,
        context: WorkerContext,
    ) -> Arc<DeviceWorker> {
        let info = device.info();
        let identity = format!(
            "{}|{}|{}|{driver_version}",
            info.kind, info.name, info.total_bytes
        );
        let (sender, receiver) = sync_channel::<Arc<TuneJob>>(queue_length);
        let worker = Arc::new(DeviceWorker {
            name,
            identity,
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(None),
            queued: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            info: Mutex::new(info),
            metrics: Arc::clone(&context.metrics),
        });
        let this = Arc::clone(&worker);
        let thread = std::thread::Builder::new()
            .name(format!("headroom-{}", worker.name))
            .spawn(move || {
                let mut device = device;
                while let Ok(job) = receiver.recv() {
                    this.count_queued(false);
                    this.run(device.as_mut(), &job, &context);
                }
                tracing::info!(device = %this.name, "worker stopped; device released");
            })
            .expect("spawning a worker thread");
        *worker.thread.lock().expect("thread slot") = Some(thread);
        worker
    }

    /// Counts a job into (`joined`) or out of the queue and updates the gauge.
    fn count_queued(&self, joined: bool) {
        let now = if joined {
            self.queued.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.queued.fetch_sub(1, Ordering::SeqCst) - 1
        };
        self.metrics.queue_length(&self.name, now);
    }

    /// Queues a job; a full queue is refused at once.
    pub fn enqueue(&self, job: Arc<TuneJob>) -> Result<(), EnqueueError> {
        let sender = self.sender.lock().expect("sender slot");
        let Some(sender) = sender.as_ref() else {
            return Err(EnqueueError::Closed);
        };
        self.count_queued(true);
        match sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.count_queued(false);
                Err(EnqueueError::Full)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.count_queued(false);
                Err(EnqueueError::Closed)
            }
        }
    }

    /// Jobs waiting.
    pub fn queue_length(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Whether a job is running.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// The device's identity and memory as of its last job.
    pub fn info(&self) -> DeviceInfo {
        self.info.lock().expect("info slot").clone()
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        self.info().kind == DeviceKind::Cuda
    }

    /// Stops taking jobs; the thread ends (and frees the device) once its queue is drained.
    pub fn close(&self) {
        self.sender.lock().expect("sender slot").take();
    }

    /// Waits up to `grace` for the worker thread to end; returns whether it did.
    pub fn join(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            let finished = self
                .thread
                .lock()
                .expect("thread slot")
                .as_ref()
                .is_none_or(|t| t.is_finished());
            if finished {
                if let Some(thread) = self.thread.lock().expect("thread slot").take() {
                    let _ = thread.join();
                }
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(&self, device: &mut dyn Device, job: &TuneJob, context: &WorkerContext) {
        if !job.start() {
            return;
        }
        self.busy.store(true, Ordering::SeqCst);
        context.metrics.busy(&self.name, true);
        let started = Instant::now();
        let mut last = Instant::now();
        let mut observe = |probe: &Probe| {
            let outcome = probe.outcome.to_string();
            context
                .metrics
                .probe(&self.name, &outcome, last.elapsed().as_secs_f64());
            last = Instant::now();
            tracing::info!(job = %job.id, device = %self.name, batch_size = probe.batch_size, outcome, step_seconds = probe.step_seconds, "probe");
            job.record_probe(probe);
            if job.is_cancel_requested() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let (state, result, error) = match tune(&job.spec, device, &mut observe) {
            Ok(result) => {
                context.metrics.last_batch_sizes(
                    &self.name,
                    result.max_batch_size,
                    result.recommended_batch_size,
                );
                context.cache.insert(job.cache_key.clone(), result.clone());
                (JobState::Succeeded, Some(result), None)
            }
            Err(TuneError::Cancelled) => (
                JobState::Cancelled,
                None,
                Some(Problem::of_search(&TuneError::Cancelled)),
            ),
            Err(err) => (JobState::Failed, None, Some(Problem::of_search(&err))),
        };
        job.finish(state, result, error);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(job = %job.id, device = %self.name, state = ?state, seconds, "job finished");
        context.metrics.tune(&self.name, state.label(), seconds);
        *self.info.lock().expect("info slot") = device.info();
        self.busy.store(false, Ordering::SeqCst);
        context.metrics.busy(&self.name, false);
    }
}
