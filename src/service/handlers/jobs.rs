//! `/jobs`: a job's state, its cancellation, and the recent jobs.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use uuid::Uuid;

use super::pages::{job_page, wants_html};
use crate::service::jobs::{JobDocument, TuneJob};
use crate::service::openapi::{Conflict, NotFound, Unauthorized};
use crate::service::problem::Problem;
use crate::service::AppState;

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

fn find_job(state: &AppState, id: &str) -> Result<Arc<TuneJob>, Problem> {
    let uuid = parse_id(id)?;
    state.jobs.get(uuid).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!(
                "no job {id}; finished jobs are kept for the last {} jobs",
                state.config.job_history
            ),
        )
    })
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
         headers(("Retry-After" = u64, description = "While the job is queued or running: seconds until it is worth asking again"))),
        Unauthorized, NotFound,
    ),
    security((), ("bearer" = [])))]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let job = find_job(&state, &id)?;
    let document = state.jobs.document(&job);
    let finished = document.state.is_finished();
    let mut response = if wants_html(&headers) {
        job_page(&job, &document).into_response()
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
        Unauthorized, NotFound, Conflict,
    ),
    security((), ("bearer" = [])))]
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let job = find_job(&state, &id)?;
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
        (status = 200, description = "Queued, running and recently finished jobs, newest first.", body = Vec<JobDocument>),
        Unauthorized,
    ),
    security((), ("bearer" = [])))]
pub async fn list_jobs(State(state): State<Arc<AppState>>) -> Json<Vec<JobDocument>> {
    Json(
        state
            .jobs
            .recent()
            .iter()
            .map(|j| state.jobs.document(j))
            .collect(),
    )
}
