//! One worker thread per device: the device's bounded queue, and one job at a time on it
//! (concurrent OOM probes on one device would corrupt each other's measurements).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::answer::TuneAnswer;
use super::cache::ResultCache;
use super::jobs::{JobEnd, TuneJob};
use super::lock;
use super::metrics::{DeviceLabels, Metrics};
use super::problem::Problem;
use headroom_devices::select::DeviceSpec;
use headroom_engine::device::{Device, DeviceInfo, DeviceKind};
use headroom_engine::result::Probe;
use headroom_engine::search::{tune, TuneError};

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// The device's queue is full.
    #[error("the device's queue is full")]
    Full,
    /// The service is shutting down.
    #[error("the device stopped taking jobs")]
    Closed,
}

/// What a worker shares with the service.
pub struct WorkerContext {
    /// Where results go.
    pub cache: Arc<ResultCache>,
    /// Where measurements go.
    pub metrics: Arc<Metrics>,
    /// This service's node name, for a result's `measured_on`.
    pub node: Arc<str>,
}

/// A device, its queue and its worker thread.
pub struct DeviceWorker {
    /// What jobs name: `host` or `cuda:N`.
    pub device: DeviceSpec,
    /// Identity for the result cache (name, memory, driver, code).
    pub identity: String,
    /// Labels of the device's metrics.
    pub labels: DeviceLabels,
    context: WorkerContext,
    sender: Mutex<Option<SyncSender<Arc<TuneJob>>>>,
    thread: Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
    queued: AtomicUsize,
    busy: AtomicBool,
    info: Mutex<DeviceInfo>,
}

impl DeviceWorker {
    /// Starts the worker thread of `device`, with a queue of `queue_length` jobs; a GPU's NVML
    /// index labels its metrics.
    pub fn start(
        spec: DeviceSpec,
        driver_version: &str,
        device: Box<dyn Device>,
        queue_length: usize,
        context: WorkerContext,
        nvml_index: Option<u32>,
    ) -> Arc<DeviceWorker> {
        let info = device.info();
        let labels = DeviceLabels::new(spec, &info, nvml_index);
        let identity = format!(
            "{}|{}|{}|{driver_version}",
            info.kind, info.name, info.total_bytes
        );
        let (sender, receiver) = mpsc::sync_channel::<Arc<TuneJob>>(queue_length);
        let (stopped, on_stop) = mpsc::channel();
        let worker = Arc::new(DeviceWorker {
            device: spec,
            identity,
            labels,
            context,
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(None),
            queued: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            info: Mutex::new(info),
        });
        let this = Arc::clone(&worker);
        let thread = std::thread::Builder::new()
            .name(format!("headroom-{spec}"))
            .spawn(move || {
                let mut device = device;
                while let Ok(job) = receiver.recv() {
                    this.count_queued(false);
                    this.run(device.as_mut(), &job);
                }
                drop(device);
                tracing::info!(device = %this.device, "worker stopped; device released");
                let _ = stopped.send(());
            })
            .expect("spawning a worker thread");
        *lock(&worker.thread) = Some((thread, on_stop));
        worker
    }

    /// Counts a job into (`joined`) or out of the queue and updates the gauge.
    fn count_queued(&self, joined: bool) {
        let now = if joined {
            self.queued.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.queued.fetch_sub(1, Ordering::SeqCst) - 1
        };
        self.context.metrics.queue_length(&self.labels, now);
    }

    /// Queues a job; a full queue is refused at once.
    pub fn enqueue(&self, job: Arc<TuneJob>) -> Result<(), EnqueueError> {
        let sender = lock(&self.sender);
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

    /// Queues a job, waiting for room in the queue (for jobs kept across a restart: they were
    /// accepted already).
    pub fn enqueue_waiting(&self, job: Arc<TuneJob>) -> Result<(), EnqueueError> {
        let sender = lock(&self.sender).clone();
        let sender = sender.ok_or(EnqueueError::Closed)?;
        self.count_queued(true);
        sender.send(job).map_err(|_| {
            self.count_queued(false);
            EnqueueError::Closed
        })
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
        lock(&self.info).clone()
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        self.info().kind == DeviceKind::Cuda
    }

    /// Stops taking jobs; the thread ends (and frees the device) once its queue is drained.
    pub fn close(&self) {
        lock(&self.sender).take();
    }

    /// Waits up to `grace` for the worker thread to end; returns whether it did.
    pub fn join(&self, grace: Duration) -> bool {
        let mut slot = lock(&self.thread);
        let Some((thread, stopped)) = slot.take() else {
            return true;
        };
        match stopped.recv_timeout(grace) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                true
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                *slot = Some((thread, stopped));
                false
            }
        }
    }

    fn run(&self, device: &mut dyn Device, job: &TuneJob) {
        if !job.start() {
            return;
        }
        let metrics = &self.context.metrics;
        self.busy.store(true, Ordering::SeqCst);
        metrics.busy(&self.labels, true);
        let started = Instant::now();
        let mut last = Instant::now();
        let mut observe = |probe: &Probe| {
            let outcome = probe.outcome.to_string();
            metrics.probe(&self.labels, &outcome, last.elapsed().as_secs_f64());
            last = Instant::now();
            tracing::info!(job = %job.id, device = %self.device, batch_size = probe.batch_size, outcome, step_seconds = probe.step_seconds, "probe");
            job.record_probe(probe);
            if job.is_cancel_requested() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let end = match tune(&job.spec, device, &mut observe) {
            Ok(result) => {
                let result = TuneAnswer {
                    result,
                    cached: false,
                    measured_on: Some(format!("{}/{}", self.context.node, self.device)),
                    measured_at: Some(super::document::now()),
                };
                metrics.last_batch_sizes(
                    &self.labels,
                    result.max_batch_size,
                    result.recommended_batch_size,
                );
                self.context
                    .cache
                    .insert(job.cache_key.clone(), result.clone());
                JobEnd::Succeeded(Box::new(result))
            }
            Err(TuneError::Cancelled) => job.stopped(),
            Err(err) => JobEnd::Failed(Problem::of_search(&err)),
        };
        // Everything about the job is recorded before it is finished: a client woken by the
        // finish then reads metrics and device state that include it.
        let state = end.state();
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(job = %job.id, device = %self.device, state = state.label(), seconds, "job finished");
        metrics.tune(&self.labels, state.label(), seconds);
        *lock(&self.info) = device.info();
        self.busy.store(false, Ordering::SeqCst);
        metrics.busy(&self.labels, false);
        job.finish(end);
    }
}
