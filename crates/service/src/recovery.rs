//! A node's start over a store that outlived its last run: running jobs become `interrupted`,
//! queued jobs are queued again.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use uuid::Uuid;

use super::document;
use super::jobs::{JobEnd, TuneJob};
use super::problem::Problem;
use super::store::journal::Direction;
use super::store::sql::SqlStore;
use super::store::{Recovered, Store, StoreError, StoredJob};
use super::AppState;
use headroom_devices::select::DeviceSpec;
use headroom_engine::job::{Job, JobError};

/// How often a store that could not be reached at start is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Starts `store` (checked, migrated) and takes over `node`'s jobs: the running ones are marked
/// `interrupted`, the queued ones returned.
pub async fn take_over(
    store: &SqlStore,
    node: &str,
    integrity_check: bool,
) -> Result<Recovered, StoreError> {
    let recovered = store
        .start(node, &document::interrupted(), integrity_check)
        .await?;
    if recovered.interrupted > 0 || !recovered.queued.is_empty() {
        tracing::info!(
            node,
            interrupted = recovered.interrupted,
            queued = recovered.queued.len(),
            "jobs from before the restart: the running ones are interrupted, the queued ones run"
        );
    }
    Ok(recovered)
}

/// A store that could not be reached at start (PostgreSQL down, a read-only or full disk): tried
/// again until it answers, the service degraded meanwhile (`/readyz` says why); then this
/// node's jobs from before are taken over and its queued ones run. A database found then not to
/// be headroom's, or damaged, is never written to: the service stays degraded, saying so.
pub async fn take_over_when_back(
    state: Arc<AppState>,
    store: Arc<SqlStore>,
    integrity_check: bool,
) {
    loop {
        tokio::time::sleep(RETRY_EVERY).await;
        if !take_over_now(&state, &store, integrity_check).await {
            return;
        }
    }
}

/// A large SQLite store's start ([`SqlStore::large_file`]): its integrity check runs
/// while the service serves, degraded, writing nothing to the store; once it passes, this
/// node's jobs are taken over. Damage found leaves the file untouched and the service degraded,
/// saying what to do.
pub async fn check_then_take_over(state: Arc<AppState>, store: Arc<SqlStore>) {
    let started = std::time::Instant::now();
    match store.check_integrity().await {
        Ok(()) => {
            tracing::info!(
                store = store.describe(),
                seconds = started.elapsed().as_secs_f64(),
                "the store's integrity check passed; taking it over"
            );
            if take_over_now(&state, &store, false).await {
                take_over_when_back(state, store, false).await;
            }
        }
        Err(StoreError::Unavailable(_)) => take_over_when_back(state, store, true).await,
        Err(error) => {
            tracing::error!(%error, "the store cannot be used; the service goes on without it");
            store.closed_because(error.to_string());
            let refused = Err::<(), _>(error);
            state
                .store_health
                .record_retry(Direction::Write, "open", &refused);
        }
    }
}

/// One try at taking the store over; whether to try again (it was unavailable).
async fn take_over_now(state: &Arc<AppState>, store: &SqlStore, integrity_check: bool) -> bool {
    let outcome = take_over(store, &state.node, integrity_check).await;
    state
        .store_health
        .record_retry(Direction::Write, "open", &outcome);
    match outcome {
        Ok(recovered) => {
            let requeueing = Arc::clone(state);
            let _ = tokio::task::spawn_blocking(move || requeueing.requeue(recovered.queued)).await;
            restore_last_answers(state).await;
            false
        }
        Err(StoreError::Unavailable(_)) => true,
        Err(error) => {
            tracing::error!(%error, "the store cannot be used; the service goes on without it");
            false
        }
    }
}

/// Why a job kept across a restart does not run again.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    /// The store holds an id that is no UUID.
    #[error("the stored job id is not a UUID: {0}")]
    BadId(#[from] uuid::Error),
    /// The job is not valid for this build of headroom.
    #[error("the job no longer validates: {0}")]
    NoLongerValid(#[from] JobError),
    /// Its device is not served any more.
    #[error("{0} is not served since the restart")]
    NotServed(DeviceSpec),
    /// Its device stopped taking jobs (the service is stopping).
    #[error("{0} stopped taking jobs")]
    Closed(DeviceSpec),
}

/// Queues `stored` again on its device, waiting for room in the queue; when that cannot be,
/// the job fails saying why, and the reason is returned.
pub fn requeue(state: &AppState, stored: StoredJob) -> Result<(), RequeueError> {
    let id: Uuid = stored.document.id.parse()?;
    let spec = match Job::from_json(&stored.request) {
        Ok(spec) => spec,
        Err(e) => {
            let reason = RequeueError::from(e);
            let mut document = stored.document.clone();
            document.state = document::JobState::Failed;
            document.error = Some(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                reason.to_string(),
            ));
            document.finished_at = Some(document::now());
            state.journal.job(StoredJob { document, ..stored });
            return Err(reason);
        }
    };
    let device = stored.document.device;
    let job = TuneJob::restore(id, spec, stored, Some(state.recorder()));
    state.jobs.restore(Arc::clone(&job));
    let worker = state
        .workers()
        .unwrap_or_default()
        .iter()
        .find(|w| w.device == device);
    let queued = match worker {
        Some(worker) => worker
            .enqueue_waiting(Arc::clone(&job))
            .map_err(|_| RequeueError::Closed(device)),
        None => Err(RequeueError::NotServed(device)),
    };
    queued.inspect_err(|reason| {
        job.finish(JobEnd::Failed(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{reason}; submit the job again"),
        )))
    })
}

/// Resolves once the service's devices are open (or found not to open).
pub async fn devices_open(state: &AppState) {
    while state.workers().is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`restore_last_answers`] once the devices whose gauges they are have opened.
pub async fn restore_last_answers_once_open(state: Arc<AppState>) {
    devices_open(&state).await;
    restore_last_answers(&state).await;
}

/// How many of a node's newest jobs the last answers are restored from at start.
const LAST_ANSWERS_FROM: usize = 256;

/// Sets each device's last-answer gauges from the node's finished jobs in the store, oldest
/// first, so that a restarted node's dashboard shows the answers it had (the newest per model,
/// the models tuned last on each device).
pub async fn restore_last_answers(state: &AppState) {
    let recent = match state
        .store
        .recent_jobs(&state.node, LAST_ANSWERS_FROM)
        .await
    {
        Ok(recent) => recent,
        Err(error) => {
            tracing::warn!(%error, "the last answers could not be read from the store");
            return;
        }
    };
    let workers = state.workers().unwrap_or_default();
    for document in recent.iter().rev() {
        let (Some(answer), Some(worker)) = (
            document.result.as_ref(),
            workers.iter().find(|w| w.device == document.device),
        ) else {
            continue;
        };
        if document.model.is_empty() {
            continue;
        }
        state.metrics.last_batch_sizes(
            &worker.labels,
            &document.model,
            answer.max_batch_size,
            answer.recommended_batch_size,
        );
    }
}
