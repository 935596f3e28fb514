//! The ordered writer between the service and its store, and the store's health.
//!
//! Every change of a job is sent here as the whole job (so a later write supersedes an earlier
//! one) and written in order by one task: a probe never waits on the database, and a slow or
//! broken store costs the service its memory across restarts, never its answers. A write that
//! fails is kept and tried again until the store takes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Retention, Store, StoreError, StoredJob};
use crate::answer::TuneAnswer;
use crate::lock;
use crate::metrics::Metrics;

/// How often writes the store refused are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How often retention is enforced (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(600);

enum Write {
    Job(Box<StoredJob>),
    Result {
        key: String,
        result: Box<TuneAnswer>,
    },
    Flush(oneshot::Sender<bool>),
}

/// Sends writes to the store's writer task, in order.
#[derive(Clone)]
pub struct Journal {
    sender: mpsc::UnboundedSender<Write>,
}

impl Journal {
    /// Starts the writer task of `store` (on the current tokio runtime), which also enforces
    /// `retention`.
    pub fn start(store: Arc<dyn Store>, health: Arc<StoreHealth>, retention: Retention) -> Journal {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(
            Writer {
                store,
                health,
                jobs: HashMap::new(),
                results: HashMap::new(),
            }
            .run(receiver, retention),
        );
        Journal { sender }
    }

    /// Writes `job` as it is now.
    pub fn job(&self, job: StoredJob) {
        let _ = self.sender.send(Write::Job(Box::new(job)));
    }

    /// Keeps `result` under `key`.
    pub fn result(&self, key: String, result: TuneAnswer) {
        let _ = self.sender.send(Write::Result {
            key,
            result: Box::new(result),
        });
    }

    /// Waits (up to `within`) until everything sent before is written; returns whether it was.
    pub async fn flush(&self, within: Duration) -> bool {
        let (done, written) = oneshot::channel();
        if self.sender.send(Write::Flush(done)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(within, written).await, Ok(Ok(true)))
    }
}

/// Whether the store works, as `/readyz` reports it: the last error of reads and of writes,
/// each kept until an operation of its kind works again (a read that works says nothing of a
/// read-only file's writes).
pub struct StoreHealth {
    reads: Mutex<Option<String>>,
    writes: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

/// Which way an operation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// It read from the store.
    Read,
    /// It wrote to the store.
    Write,
}

impl StoreHealth {
    /// Healthy until an operation fails.
    pub fn new(metrics: Arc<Metrics>) -> StoreHealth {
        StoreHealth {
            reads: Mutex::new(None),
            writes: Mutex::new(None),
            metrics,
        }
    }

    /// Notes how `operation` went: a failure is counted, and logged when its direction turns
    /// unhealthy; a success after failures is logged as the store's recovery.
    pub fn record<T>(
        &self,
        direction: Direction,
        operation: &str,
        outcome: &Result<T, StoreError>,
    ) {
        if outcome.is_err() {
            self.metrics.store_error(operation);
        }
        self.note(direction, operation, outcome);
    }

    /// Notes how another try of an operation already counted went: as [`StoreHealth::record`],
    /// but a failure is not counted again (the counter counts failed operations, not tries).
    pub fn record_retry<T>(
        &self,
        direction: Direction,
        operation: &str,
        outcome: &Result<T, StoreError>,
    ) {
        self.note(direction, operation, outcome);
    }

    fn note<T>(&self, direction: Direction, operation: &str, outcome: &Result<T, StoreError>) {
        let mut problem = lock(match direction {
            Direction::Read => &self.reads,
            Direction::Write => &self.writes,
        });
        match outcome {
            Ok(_) => {
                if problem.take().is_some() {
                    tracing::info!(operation, "the store works again");
                }
            }
            Err(error) => {
                if problem.is_none() {
                    tracing::warn!(operation, %error, "the store failed; tuning goes on, and jobs and results are kept in memory until it works again");
                } else {
                    tracing::debug!(operation, %error, "the store failed again");
                }
                *problem = Some(format!("{operation}: {error}"));
            }
        }
    }

    /// Whether the last operation of `direction` failed: callers then skip the store rather
    /// than wait for it, until the writer finds it working again.
    pub fn failing(&self, direction: Direction) -> bool {
        lock(match direction {
            Direction::Read => &self.reads,
            Direction::Write => &self.writes,
        })
        .is_some()
    }

    /// What is wrong with the store, if anything.
    pub fn problem(&self) -> Option<String> {
        let problems: Vec<String> = [&self.reads, &self.writes]
            .into_iter()
            .filter_map(|p| lock(p).clone())
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

/// The writer task's state: what the store has not taken yet, newest version of each.
struct Writer {
    store: Arc<dyn Store>,
    health: Arc<StoreHealth>,
    jobs: HashMap<String, StoredJob>,
    results: HashMap<String, TuneAnswer>,
}

impl Writer {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Write>, retention: Retention) {
        let mut retry = tokio::time::interval(RETRY_EVERY);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                write = receiver.recv() => {
                    let Some(write) = write else { break };
                    let mut flushes = Vec::new();
                    self.take(write, &mut flushes);
                    while let Ok(write) = receiver.try_recv() {
                        self.take(write, &mut flushes);
                    }
                    self.save(true).await;
                    let written = self.jobs.is_empty() && self.results.is_empty();
                    for flush in flushes {
                        let _ = flush.send(written);
                    }
                }
                _ = retry.tick() => {
                    if !(self.jobs.is_empty() && self.results.is_empty()) {
                        self.save(false).await;
                    } else if self.health.failing(Direction::Read) {
                        let checked = self.store.check().await;
                        self.health.record_retry(Direction::Read, "check", &checked);
                    }
                }
                _ = prune.tick() => {
                    let pruned = self.store.prune(&retention).await;
                    self.health.record(Direction::Write, "prune", &pruned);
                    if let Ok(removed @ 1..) = pruned {
                        tracing::info!(removed, "retention removed old jobs and results");
                    }
                }
            }
        }
    }

    fn take(&mut self, write: Write, flushes: &mut Vec<oneshot::Sender<bool>>) {
        match write {
            Write::Job(job) => {
                self.jobs.insert(job.document.id.clone(), *job);
            }
            Write::Result { key, result } => {
                self.results.insert(key, *result);
            }
            Write::Flush(done) => flushes.push(done),
        }
    }

    /// Saves the jobs, then the results; stops at the first failure, so that a later write
    /// that works cannot report the store healthy while earlier ones still wait. A failure is
    /// counted when the save carries new writes (`fresh`), not when it only tries old ones again.
    async fn save(&mut self, fresh: bool) {
        let record = |health: &StoreHealth, operation: &str, outcome: &Result<(), StoreError>| {
            if fresh {
                health.record(Direction::Write, operation, outcome)
            } else {
                health.record_retry(Direction::Write, operation, outcome)
            }
        };
        if !self.jobs.is_empty() {
            let jobs: Vec<StoredJob> = self.jobs.values().cloned().collect();
            let saved = self.store.save_jobs(&jobs).await;
            record(&self.health, "save_jobs", &saved);
            if saved.is_err() {
                return;
            }
            self.jobs.clear();
        }
        let keys: Vec<String> = self.results.keys().cloned().collect();
        for key in keys {
            let saved = self.store.save_result(&key, &self.results[&key]).await;
            record(&self.health, "save_result", &saved);
            if saved.is_err() {
                break;
            }
            self.results.remove(&key);
        }
    }
}
