//! A node's start over a store that outlived its last run: running jobs become `interrupted`,
//! queued jobs are queued again.

use std::sync::Arc;

use axum::http::StatusCode;
use uuid::Uuid;

use super::jobs::{self, JobEnd, TuneJob};
use super::problem::Problem;
use super::store::{Recovered, Store, StoreError, StoredJob};
use super::AppState;
use crate::job::Job;

/// Marks `node`'s jobs that were running `interrupted` and returns the queued ones.
pub async fn take_over(store: &dyn Store, node: &str) -> Result<Recovered, StoreError> {
    let recovered = store.recover(node, &jobs::interrupted()).await?;
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

/// Queues `stored` again on its device, waiting for room in the queue; when that cannot be,
/// the job fails saying why, and the reason is returned.
pub fn requeue(state: &AppState, stored: StoredJob) -> Result<(), String> {
    let id: Uuid = stored
        .document
        .id
        .parse()
        .map_err(|e| format!("the stored job id is not a UUID: {e}"))?;
    let spec = match Job::from_json(&stored.request) {
        Ok(spec) => spec,
        Err(e) => {
            let reason = format!("the job no longer validates: {e}");
            let mut document = stored.document.clone();
            document.state = jobs::JobState::Failed;
            document.error = Some(Problem::new(StatusCode::UNPROCESSABLE_ENTITY, &reason));
            document.finished_at = Some(jobs::now());
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
        Some(worker) => worker.enqueue_waiting(Arc::clone(&job)),
        None => Err(format!("{device} is not served since the restart")),
    };
    queued.inspect_err(|reason| {
        job.finish(JobEnd::Failed(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{reason}; submit the job again"),
        )))
    })
}
