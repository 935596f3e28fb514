//! Tuning jobs: their lifecycle (queued, running, finished) and the bounded history of them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

use super::lock;
use super::problem::Problem;
use super::store::journal::Journal;
use super::store::StoredJob;
use crate::answer::TuneAnswer;
use crate::document::{interrupted, now, JobDocument, JobState, Progress};
use headroom_devices::select::DeviceSpec;
use headroom_engine::job::Job;
use headroom_engine::result::Probe;
use headroom_engine::search::TuneError;

/// How a job ended: the result, or the problem a client is told.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    /// The search answered.
    Succeeded(Box<TuneAnswer>),
    /// The search gave no answer.
    Failed(Problem),
    /// Cancelled by a client.
    Cancelled,
    /// Stopped because the service stopped.
    Interrupted,
}

impl JobEnd {
    /// The state it leaves the job in.
    pub fn state(&self) -> JobState {
        match self {
            JobEnd::Succeeded(_) => JobState::Succeeded,
            JobEnd::Failed(_) => JobState::Failed,
            JobEnd::Cancelled => JobState::Cancelled,
            JobEnd::Interrupted => JobState::Interrupted,
        }
    }
}

/// Where a job's changes go: the store's journal, under the node that runs the job.
#[derive(Clone)]
pub struct Recorder {
    /// The store's writer.
    pub journal: Journal,
    /// This service's node name.
    pub node: Arc<str>,
}

/// One job: its specification, its document, a cancel flag and a finished signal. Every change
/// of its document goes to its recorder, if it has one.
pub struct TuneJob {
    /// The job's id.
    pub id: Uuid,
    /// The validated job.
    pub spec: Job,
    /// Cache key of the job on its device.
    pub cache_key: String,
    document: Mutex<JobDocument>,
    cancel: AtomicBool,
    /// Set at shutdown: a queued job stays queued (in the store, for the next start), a running
    /// one stops after its probe as interrupted.
    shutting_down: AtomicBool,
    finished: watch::Sender<bool>,
    recorder: Option<Recorder>,
    /// The normalised job (JSON), as the store keeps it.
    request: String,
}

impl TuneJob {
    /// A new queued job for `device`.
    pub fn new(
        spec: Job,
        device: DeviceSpec,
        cache_key: String,
        recorder: Option<Recorder>,
    ) -> Arc<TuneJob> {
        let id = Uuid::new_v4();
        let document = JobDocument {
            id: id.to_string(),
            state: JobState::Queued,
            device,
            model: spec.summary(),
            request: serde_json::to_value(spec.spec()).expect("jobs serialise"),
            queue_position: None,
            progress: Progress { probes: Vec::new() },
            result: None,
            error: None,
            created_at: now(),
            started_at: None,
            finished_at: None,
        };
        Self::with_document(id, spec, cache_key, document, recorder)
    }

    /// A queued job the store kept across a restart, with its id and times.
    pub fn restore(
        id: Uuid,
        spec: Job,
        stored: StoredJob,
        recorder: Option<Recorder>,
    ) -> Arc<TuneJob> {
        Self::with_document(id, spec, stored.cache_key, stored.document, recorder)
    }

    fn with_document(
        id: Uuid,
        spec: Job,
        cache_key: String,
        document: JobDocument,
        recorder: Option<Recorder>,
    ) -> Arc<TuneJob> {
        Arc::new(TuneJob {
            id,
            request: serde_json::to_string(&spec).expect("jobs serialise"),
            spec,
            cache_key,
            document: Mutex::new(document),
            cancel: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            finished: watch::channel(false).0,
            recorder,
        })
    }

    /// A snapshot of the document.
    pub fn document(&self) -> JobDocument {
        self.lock().clone()
    }

    /// Sends the job as it is now to the store.
    pub fn record(&self) {
        self.send(&self.lock());
    }

    /// Sends `document` (this job's, its lock held: changes reach the journal in order).
    fn send(&self, document: &JobDocument) {
        if let Some(recorder) = &self.recorder {
            recorder.journal.job(StoredJob {
                node: recorder.node.to_string(),
                request: self.request.clone(),
                cache_key: self.cache_key.clone(),
                document: document.clone(),
            });
        }
    }

    /// The current state.
    pub fn state(&self) -> JobState {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobDocument> {
        lock(&self.document)
    }

    /// The device it waits for or runs on.
    pub fn device(&self) -> DeviceSpec {
        self.lock().device
    }

    /// Marks the job running, unless it was cancelled while queued or the service is stopping;
    /// returns whether to run it.
    pub fn start(&self) -> bool {
        let mut doc = self.lock();
        if self.shutting_down.load(Ordering::SeqCst) {
            return false;
        }
        if doc.state != JobState::Queued || self.cancel.load(Ordering::SeqCst) {
            drop(doc);
            self.finish(JobEnd::Cancelled);
            return false;
        }
        doc.state = JobState::Running;
        doc.started_at = Some(now());
        self.send(&doc);
        true
    }

    /// Records a probe as it finishes.
    pub fn record_probe(&self, probe: &Probe) {
        let mut doc = self.lock();
        doc.progress.probes.push(probe.clone());
        self.send(&doc);
    }

    /// Asks the job to stop: at once if queued, after its current probe if running. Returns
    /// false if it had already finished.
    pub fn cancel(&self) -> bool {
        self.cancel.store(true, Ordering::SeqCst);
        let state = self.state();
        if state == JobState::Queued {
            self.finish(JobEnd::Cancelled);
        }
        !state.is_finished()
    }

    /// Whether cancellation was asked for.
    pub fn is_cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The service is stopping: a queued job is left queued for the next start, a running one
    /// stops after its current probe.
    pub fn stop_for_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
        // Wakes the requests waiting for the job: it will not finish in this process.
        self.finished.send_modify(|_| {});
    }

    /// Whether the service is stopping: the job will not finish in this process.
    pub fn is_stopping(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// How a search that stopped at this job's request ends: cancelled by a client, or
    /// interrupted by shutdown.
    pub fn stopped(&self) -> JobEnd {
        if self.shutting_down.load(Ordering::SeqCst) {
            JobEnd::Interrupted
        } else {
            JobEnd::Cancelled
        }
    }

    /// Finishes the job (once; later calls are ignored) and wakes everyone waiting for it.
    pub fn finish(&self, end: JobEnd) {
        {
            let mut doc = self.lock();
            if doc.state.is_finished() {
                return;
            }
            doc.state = end.state();
            match end {
                JobEnd::Succeeded(result) => doc.result = Some(*result),
                JobEnd::Failed(problem) => doc.error = Some(problem),
                JobEnd::Cancelled => doc.error = Some(Problem::of_search(&TuneError::Cancelled)),
                JobEnd::Interrupted => doc.error = Some(interrupted()),
            }
            doc.finished_at = Some(now());
            doc.queue_position = None;
            self.send(&doc);
        }
        self.finished.send_replace(true);
    }

    /// Waits until the job finishes, the service begins to stop, or `timeout` passes; returns
    /// whether it finished.
    pub async fn wait(&self, timeout: std::time::Duration) -> bool {
        let mut finished = self.finished.subscribe();
        let stopping = || self.shutting_down.load(Ordering::SeqCst);
        let _ = tokio::time::timeout(timeout, finished.wait_for(|done| *done || stopping())).await;
        self.state().is_finished()
    }
}

/// What [`JobStore::insert_or_join`] did.
pub enum Joined {
    /// The job was added and queued.
    New(Arc<TuneJob>),
    /// An identical job in flight, which the request follows instead.
    InFlight(Arc<TuneJob>),
}

/// Every job the service knows, newest last, with finished ones beyond the history dropped.
pub struct JobStore {
    history: usize,
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    jobs: HashMap<Uuid, Arc<TuneJob>>,
    order: VecDeque<Uuid>,
}

impl JobStore {
    /// A store keeping at most `history` finished jobs.
    pub fn new(history: usize) -> JobStore {
        JobStore {
            history,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        lock(&self.inner)
    }

    /// A job's document, with its place in its device's queue while it waits.
    pub fn document(&self, job: &TuneJob) -> JobDocument {
        let mut document = job.document();
        if document.state == JobState::Queued {
            let inner = self.lock();
            let ahead = inner
                .order
                .iter()
                .take_while(|id| **id != job.id)
                .filter(|id| {
                    let other = &inner.jobs[*id];
                    other.device() == document.device && other.state() == JobState::Queued
                })
                .count();
            document.queue_position = Some(ahead);
        }
        document
    }

    /// Adds `job` and queues it with `enqueue`, unless an identical job (the same cache key, so
    /// the same normalised job and device identity) is queued or running on the same device:
    /// then returns that one, which the caller joins instead of tuning twice. Both happen under
    /// the store's lock, so no request joins a job its queue refused.
    pub fn insert_or_join<E>(
        &self,
        job: Arc<TuneJob>,
        enqueue: impl FnOnce(&Arc<TuneJob>) -> Result<(), E>,
    ) -> Result<Joined, E> {
        let mut inner = self.lock();
        let device = job.device();
        let in_flight = inner
            .order
            .iter()
            .rev()
            .map(|id| &inner.jobs[id])
            .find(|other| {
                other.cache_key == job.cache_key
                    && other.device() == device
                    && !other.state().is_finished()
            });
        if let Some(existing) = in_flight {
            return Ok(Joined::InFlight(Arc::clone(existing)));
        }
        enqueue(&job)?;
        Self::push(&mut inner, Arc::clone(&job), self.history);
        Ok(Joined::New(job))
    }

    /// Adds a job kept across a restart, to be queued again by the caller.
    pub fn restore(&self, job: Arc<TuneJob>) {
        Self::push(&mut self.lock(), job, self.history);
    }

    /// Adds a job, dropping the oldest finished jobs past the history.
    fn push(inner: &mut StoreInner, job: Arc<TuneJob>, history: usize) {
        inner.order.push_back(job.id);
        inner.jobs.insert(job.id, job);
        let mut excess = inner.order.len().saturating_sub(history);
        let mut index = 0;
        while excess > 0 && index < inner.order.len() {
            let id = inner.order[index];
            if inner.jobs[&id].state().is_finished() {
                inner.order.remove(index);
                inner.jobs.remove(&id);
                excess -= 1;
            } else {
                index += 1;
            }
        }
    }

    /// The job with this id.
    pub fn get(&self, id: Uuid) -> Option<Arc<TuneJob>> {
        self.lock().jobs.get(&id).cloned()
    }

    /// Every job, newest first.
    pub fn recent(&self) -> Vec<Arc<TuneJob>> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .rev()
            .map(|id| Arc::clone(&inner.jobs[id]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        headroom_engine::Job::from_json(
            r#"{"model": {"input_shape": [4], "num_classes": 2}, "optimizer": {"name": "sgd"}}"#,
        )
        .unwrap()
    }

    /// Adds a job as a request does, its queue taking it.
    fn add(store: &JobStore, job: &Arc<TuneJob>) {
        let joined = store.insert_or_join(Arc::clone(job), |_| Ok::<(), ()>(()));
        assert!(matches!(joined, Ok(Joined::New(_))));
    }

    #[test]
    fn history_drops_only_finished_jobs_oldest_first() {
        let store = JobStore::new(2);
        let jobs: Vec<_> = (0..4)
            .map(|i| TuneJob::new(job(), DeviceSpec::Host, format!("job {i}"), None))
            .collect();
        jobs[0].finish(JobEnd::Cancelled);
        for j in &jobs {
            add(&store, j);
        }
        // jobs[0] was finished and is dropped; the unfinished ones stay even past the history.
        assert!(store.get(jobs[0].id).is_none());
        assert_eq!(store.recent().len(), 3);
        assert_eq!(store.recent()[0].id, jobs[3].id);
    }

    #[test]
    fn a_queued_job_cancels_at_once_and_finishes_once() {
        let j = TuneJob::new(job(), DeviceSpec::Host, String::new(), None);
        assert!(j.cancel());
        assert_eq!(j.state(), JobState::Cancelled);
        assert!(!j.start());
        assert!(!j.cancel());
        j.finish(JobEnd::Failed(Problem::of_search(&TuneError::Cancelled)));
        assert_eq!(j.state(), JobState::Cancelled);
        assert!(j.document().finished_at.is_some());
    }

    #[test]
    fn an_identical_job_in_flight_on_the_same_device_is_joined() {
        let store = JobStore::new(8);
        let add = |device, key: &str| {
            let queued = |_: &Arc<TuneJob>| Ok::<(), ()>(());
            store.insert_or_join(TuneJob::new(job(), device, key.into(), None), queued)
        };
        let is_new = |joined: Result<Joined, ()>| matches!(joined, Ok(Joined::New(_)));
        let Ok(Joined::New(first)) = add(DeviceSpec::Host, "key") else {
            panic!("the first job is new")
        };
        let Ok(Joined::InFlight(same)) = add(DeviceSpec::Host, "key") else {
            panic!("an identical job joins the first")
        };
        assert_eq!(same.id, first.id);
        assert!(is_new(add(DeviceSpec::Cuda(1), "key")));
        assert!(is_new(add(DeviceSpec::Host, "other key")));
        first.finish(JobEnd::Cancelled);
        assert!(is_new(add(DeviceSpec::Host, "key")));
        let refused = store.insert_or_join(
            TuneJob::new(job(), DeviceSpec::Host, "full".into(), None),
            |_| Err("full"),
        );
        assert!(matches!(refused, Err("full")));
        assert_eq!(store.recent().len(), 4, "a refused job is not kept");
    }

    #[test]
    fn a_queued_job_knows_how_many_wait_before_it_on_its_device() {
        let store = JobStore::new(8);
        let on = |device, key: &str| TuneJob::new(job(), device, key.into(), None);
        let jobs = [
            on(DeviceSpec::Host, "a"),
            on(DeviceSpec::Cuda(0), "b"),
            on(DeviceSpec::Host, "c"),
            on(DeviceSpec::Host, "d"),
        ];
        for j in &jobs {
            add(&store, j);
        }
        assert!(jobs[0].start());
        assert_eq!(store.document(&jobs[0]).queue_position, None);
        assert_eq!(store.document(&jobs[1]).queue_position, Some(0));
        assert_eq!(store.document(&jobs[2]).queue_position, Some(0));
        assert_eq!(store.document(&jobs[3]).queue_position, Some(1));
    }
}
