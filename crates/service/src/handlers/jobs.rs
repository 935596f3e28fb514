//! `/jobs`: a job's state, its cancellation, and the recent jobs.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use uuid::Uuid;

use super::pages::{job_etag, job_page, missing_page, wants_html};
use crate::document::JobDocument;
use crate::jobs::TuneJob;
use crate::openapi::{Conflict, NotFound, Unauthorized, Unavailable};
use crate::problem::Problem;
use crate::store::journal::Direction;
use crate::store::StoredJob;
use crate::AppState;
use headroom_engine::job::Job;

/// How often a client following an unfinished job should look again, seconds.
const POLL_SECONDS: u64 = 1;

fn parse_id(id: &str) -> Result<Uuid, Problem> {
    id.parse().map_err(|_| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("no job {id}: job ids are UUIDs"),
        )
    })
}

/// A job as this service knows it: live in memory, or only in the store (finished before a
/// restart, or another node's).
enum Found {
    Live(Arc<TuneJob>),
    Stored(Box<StoredJob>),
}

async fn find_job(state: &AppState, id: &str) -> Result<Found, Problem> {
    let uuid = parse_id(id)?;
    if let Some(job) = state.jobs.get(uuid) {
        return Ok(Found::Live(job));
    }
    let stored = state.store.job(uuid).await;
    state
        .store_health
        .record(Direction::Read, "read_job", &stored);
    match stored {
        Ok(Some(job)) => Ok(Found::Stored(Box::new(job))),
        Ok(None) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!(
                "no job {id}; the store keeps finished jobs for {} days, at most {} of them",
                state.config.retention_days, state.config.retention_jobs
            ),
        )),
        Err(e) => Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("job {id} is not in memory, and the store cannot be read now: {e}"),
        )
        .retry_after(5)),
    }
}

/// `GET /jobs/{id}`: a job's state, the probes so far, its result or error.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id, as `POST /tune` answered it")),
    responses(
        (status = 200, description = "The job: its state, the probes so far, and its result or error once finished; \
          as an HTML page with its charts when the client accepts `text/html` first.",
         content(
             (JobDocument = "application/json"),
             (String = "text/html"),
         ),
         headers(("Retry-After" = u64, description = "While the job is queued or running: seconds until it is worth asking again"),
                 ("ETag" = String, description = "The HTML page's version: it changes when the job's state does or a probe finishes"))),
        (status = 304, description = "The HTML page asked for with `If-None-Match` has not changed: no probe has finished since.",
         headers(("ETag" = String, description = "The page's version"))),
        Unauthorized, NotFound, Unavailable,
    ),
    security((), ("bearer" = [])))]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let found = match find_job(&state, &id).await {
        Err(problem) if problem.status == 404 && wants_html(&headers) => {
            return Ok(missing_page(&problem.detail));
        }
        found => found?,
    };
    let (document, spec) = match found {
        Found::Live(job) => (state.jobs.document(&job), Some(job.spec.clone())),
        Found::Stored(stored) => (stored.document, Job::from_json(&stored.request).ok()),
    };
    let finished = document.state.is_finished();
    let mut response = if wants_html(&headers) {
        // The page's own version: a page that polls asks with it, and while no probe has
        // finished it gets a bodiless 304.
        let etag = job_etag(&document);
        let unchanged = headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|asked| asked.as_bytes() == etag.as_bytes());
        let mut response = if unchanged {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            job_page(spec.as_ref(), &document).into_response()
        };
        if let Ok(value) = HeaderValue::from_str(&etag) {
            response.headers_mut().insert(header::ETAG, value);
        }
        response
    } else {
        Json(document).into_response()
    };
    if !finished {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(POLL_SECONDS));
    }
    Ok(response)
}

/// `DELETE /jobs/{id}`: cancels a job.
#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 202, description = "Cancelling: a queued job is cancelled at once, a running one after its current probe.", body = JobDocument),
        Unauthorized, NotFound, Conflict, Unavailable,
    ),
    security((), ("bearer" = [])))]
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let job = match find_job(&state, &id).await? {
        Found::Live(job) => job,
        Found::Stored(stored) if stored.document.state.is_finished() => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                format!(
                    "job {id} has already finished ({})",
                    stored.document.state.label()
                ),
            ))
        }
        Found::Stored(stored) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                format!("job {id} runs on node {}; cancel it there", stored.node),
            ))
        }
    };
    if !job.cancel() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            format!("job {id} has already finished ({:?})", job.state()),
        ));
    }
    Ok((StatusCode::ACCEPTED, Json(state.jobs.document(&job))).into_response())
}

/// `GET /jobs`: the jobs the service knows, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs",
    responses(
        (status = 200, description = "This node's queued, running and recently finished jobs (from memory and the store), newest first.", body = Vec<JobDocument>),
        Unauthorized,
    ),
    security((), ("bearer" = [])))]
pub async fn list_jobs(State(state): State<Arc<AppState>>) -> Json<Vec<JobDocument>> {
    Json(state.recent_documents().await)
}
