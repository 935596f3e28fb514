//! One worker thread per device: the device's bounded queue, and one job at a time on it
//! (concurrent OOM probes on one device would corrupt each other's measurements), run in the
//! device's probe worker process ([`crate::probe_worker`]). The thread supervises that process:
//! it restarts one that faulted, crashed or hung, with a backoff, and marks the device unhealthy
//! after repeated failures ([`crate::supervision`]).

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
use super::probe_worker::client::{ProbeWorker, Watchdog, WorkerCommand, WorkerError};
use super::problem::{Problem, NEW_WORKER};
use super::supervision::Health;
use super::turns::{Turn, Turns};
use headroom_devices::select::DeviceSpec;
use headroom_engine::device::{DeviceInfo, DeviceKind};
use headroom_engine::result::Probe;
use headroom_engine::search::TuneError;

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

/// How a device's probe worker is started and watched.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// The worker process to start.
    pub command: WorkerCommand,
    /// How long a probe may take.
    pub watchdog: Watchdog,
    /// How long a new worker may take to open its device.
    pub start_timeout: Duration,
    /// How long an unhealthy device refuses jobs before it tries again.
    pub cooldown: Duration,
}

/// What a worker shares with the service.
pub struct WorkerContext {
    /// Where results go.
    pub cache: Arc<ResultCache>,
    /// Whose turn it is to tune a job, across the nodes sharing the store.
    pub turns: Arc<Turns>,
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
    supervision: Supervision,
    health: Mutex<Health>,
    worker_pid: Mutex<Option<u32>>,
}

impl DeviceWorker {
    /// Starts the worker thread of `spec` and, on it, the device's probe worker process (the
    /// thread that starts a worker must outlive it: the worker dies with that thread). Waits
    /// for the device to open; a GPU's NVML index (`nvml_index` of its identity) labels its
    /// metrics.
    pub fn start(
        spec: DeviceSpec,
        driver_version: &str,
        supervision: Supervision,
        queue_length: usize,
        context: WorkerContext,
        nvml_index: impl FnOnce(&DeviceInfo) -> Option<u32>,
    ) -> Result<Arc<DeviceWorker>, WorkerError> {
        let (opened, on_open) = mpsc::channel::<Result<(DeviceInfo, u32), WorkerError>>();
        let (handed, on_hand) = mpsc::channel::<Arc<DeviceWorker>>();
        let (sender, receiver) = mpsc::sync_channel::<Arc<TuneJob>>(queue_length);
        let (stopped, on_stop) = mpsc::channel();
        let starting = supervision.clone();
        let thread = std::thread::Builder::new()
            .name(format!("headroom-{spec}"))
            .spawn(move || {
                let first = ProbeWorker::start(&starting.command, spec, starting.start_timeout);
                let probe_worker = match first {
                    Ok(worker) => {
                        let _ = opened.send(Ok((worker.info().clone(), worker.pid())));
                        worker
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                        return;
                    }
                };
                let Ok(this) = on_hand.recv() else {
                    return;
                };
                this.serve(Some(probe_worker), &receiver);
                tracing::info!(device = %this.device, "worker stopped; device released");
                let _ = stopped.send(());
            })
            .expect("spawning a worker thread");
        let (info, pid) = on_open.recv().unwrap_or_else(|_| {
            Err(WorkerError::Start {
                device: spec,
                reason: "its thread ended".into(),
            })
        })?;
        let labels = DeviceLabels::new(spec, &info, nvml_index(&info));
        let identity = format!(
            "{}|{}|{}|{driver_version}",
            info.kind, info.name, info.total_bytes
        );
        context.metrics.device_at_rest(&labels, &info);
        let worker = Arc::new(DeviceWorker {
            device: spec,
            identity,
            labels,
            context,
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(Some((thread, on_stop))),
            queued: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            info: Mutex::new(info),
            supervision,
            health: Mutex::new(Health::default()),
            worker_pid: Mutex::new(Some(pid)),
        });
        let _ = handed.send(Arc::clone(&worker));
        Ok(worker)
    }

    /// Runs each queued job in the probe worker, starting a new worker when there is none (after
    /// a failure, once its backoff has passed), until the queue closes.
    fn serve(&self, mut worker: Option<ProbeWorker>, jobs: &Receiver<Arc<TuneJob>>) {
        let mut restart_at = Instant::now();
        loop {
            let job = if worker.is_some() {
                match jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                }
            } else {
                match jobs.recv_timeout(restart_at.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            if worker.is_none() {
                std::thread::sleep(restart_at.saturating_duration_since(Instant::now()));
                worker = self.restart();
                if worker.is_none() {
                    restart_at = Instant::now() + lock(&self.health).backoff();
                }
            }
            if let Some(job) = job {
                self.count_queued(false);
                if self.run(&mut worker, &job) {
                    restart_at = Instant::now() + lock(&self.health).backoff();
                } else {
                    lock(&self.health).succeeded();
                }
            }
        }
        if let Some(worker) = worker {
            worker.stop(Duration::from_secs(5));
        }
    }

    /// A new probe worker, or none (counted as a failure) when it does not start.
    fn restart(&self) -> Option<ProbeWorker> {
        let supervision = &self.supervision;
        self.context.metrics.worker_restart(&self.labels);
        match ProbeWorker::start(&supervision.command, self.device, supervision.start_timeout) {
            Ok(worker) => {
                tracing::info!(device = %self.device, pid = worker.pid(), "probe worker restarted");
                *lock(&self.info) = worker.info().clone();
                *lock(&self.worker_pid) = Some(worker.pid());
                Some(worker)
            }
            Err(e) => {
                tracing::error!(device = %self.device, error = %e, "probe worker did not start");
                self.count_failure(&e.to_string());
                None
            }
        }
    }

    /// Counts a worker failure against the device, which refuses jobs once they repeat.
    fn count_failure(&self, reason: &str) {
        if lock(&self.health).failed(Instant::now(), reason) {
            tracing::error!(device = %self.device, %reason, "the device's probe worker keeps failing; the device refuses jobs for a while");
            self.context.metrics.healthy(&self.labels, false);
        }
    }

    /// The process id of the device's probe worker, while one runs.
    pub fn worker_pid(&self) -> Option<u32> {
        *lock(&self.worker_pid)
    }

    /// This service's process and its worker's: NVML lists them as compute processes.
    pub fn process_ids(&self) -> Vec<u32> {
        std::iter::once(std::process::id())
            .chain(self.worker_pid())
            .collect()
    }

    /// Why the device refuses new jobs now, and for how much longer, if it does.
    pub fn refusal(&self) -> Option<(String, Duration)> {
        let mut health = lock(&self.health);
        let was_unhealthy = health.is_unhealthy();
        let refusal = health.refusal(Instant::now(), self.supervision.cooldown);
        if was_unhealthy && refusal.is_none() {
            self.context.metrics.healthy(&self.labels, true);
        }
        refusal
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

    /// Runs `job` in `worker`; returns whether the worker failed. A worker that faulted, crashed
    /// or hung is gone afterwards (`worker` is `None`), its failure counted against the device.
    fn run(&self, worker: &mut Option<ProbeWorker>, job: &TuneJob) -> bool {
        if !job.start() {
            return false;
        }
        let metrics = &self.context.metrics;
        let claim = match self.context.turns.wait_for_turn(job) {
            Turn::Tune(claim) => claim,
            Turn::Answered(answer) => {
                metrics.single_flight_join();
                metrics.last_batch_sizes(
                    &self.labels,
                    &job.spec.summary(),
                    answer.max_batch_size,
                    answer.recommended_batch_size,
                );
                job.finish(JobEnd::Succeeded(answer));
                return false;
            }
            Turn::Stopped => {
                job.finish(job.stopped());
                return false;
            }
        };
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
        let mut failure = None;
        let outcome = match worker.as_mut() {
            Some(probe_worker) => {
                probe_worker.tune(&job.spec, &self.supervision.watchdog, &mut observe)
            }
            None => Err(WorkerError::Start {
                device: self.device,
                reason: "the last restart failed; retrying".into(),
            }),
        };
        let end = match outcome {
            Ok(Ok(result)) => {
                let result = TuneAnswer {
                    result,
                    cached: false,
                    measured_on: Some(format!("{}/{}", self.context.node, self.device)),
                    measured_at: Some(super::document::now()),
                };
                metrics.last_batch_sizes(
                    &self.labels,
                    &job.spec.summary(),
                    result.max_batch_size,
                    result.recommended_batch_size,
                );
                self.context
                    .cache
                    .insert(job.cache_key.clone(), result.clone());
                JobEnd::Succeeded(Box::new(result))
            }
            Ok(Err(TuneError::Cancelled)) => job.stopped(),
            Ok(Err(err)) => {
                let mut problem = Problem::of_search(&err);
                if let TuneError::Fault { message, .. } = &err {
                    // The worker exits after a fault: the driver recovers only in a new process.
                    failure = Some(format!("device fault: {message}"));
                    problem.detail.push_str(NEW_WORKER);
                }
                JobEnd::Failed(problem)
            }
            Err(err) => {
                tracing::error!(job = %job.id, device = %self.device, error = %err, "probe worker failed");
                failure = Some(err.to_string());
                JobEnd::Failed(Problem::of_worker(&err))
            }
        };
        if let Some(reason) = &failure {
            if let Some(gone) = worker.take() {
                gone.stop(Duration::from_secs(1));
            }
            *lock(&self.worker_pid) = None;
            self.count_failure(reason);
        }
        // Everything about the job is recorded before it is finished: a client woken by the
        // finish then reads metrics and device state that include it (the failure counted, so
        // its next request meets a device already unhealthy).
        let state = end.state();
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(job = %job.id, device = %self.device, state = state.label(), seconds, "job finished");
        metrics.tune(&self.labels, state.label(), seconds);
        if let Some(probe_worker) = worker.as_ref() {
            *lock(&self.info) = probe_worker.info().clone();
            if !self.is_cuda() {
                metrics.device_memory(&self.labels, probe_worker.info());
            }
        }
        self.busy.store(false, Ordering::SeqCst);
        metrics.busy(&self.labels, false);
        self.context.turns.release(claim);
        job.finish(end);
        failure.is_some()
    }
}
