//! The HTTP handlers, one file per resource: small functions from request to answer, every
//! error a [`Problem`]. Each carries its OpenAPI description ([`utoipa::path`]); the router
//! (`super::router`) registers them and the document from the same list.

pub mod devices;
pub mod estimate;
pub mod health;
pub mod jobs;
pub mod pages;
pub mod tune;

use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::problem::Problem;
use super::AppState;
use headroom_engine::job::Job;

/// A request body that is a job plus a route's own options `O` beside its members.
#[derive(Deserialize)]
struct JobRequest<O> {
    #[serde(flatten)]
    options: O,
    #[serde(flatten)]
    job: serde_json::Map<String, Value>,
}

/// Reads a JSON body as the route's options `O` and a job, the service's defaults (`headroom`,
/// `search`) filled in where the job gives none: 415 unless it is JSON, 400 unless it parses,
/// 422 naming the field at fault.
fn job_request<O: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    state: &AppState,
) -> Result<(O, Job), Problem> {
    if !is_json(headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the job as JSON with Content-Type: application/json",
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object holding a job",
        ));
    }
    let JobRequest { options, mut job } = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field}: {}", e.inner()),
        )
        .with_field(field)
    })?;
    job.entry("headroom")
        .or_insert_with(|| Value::from(state.config.headroom));
    if !state.config.search.is_empty() {
        let search = job
            .entry("search")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(search) = search {
            for (key, value) in &state.config.search {
                search.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
    let job = Job::from_value(Value::Object(job)).map_err(|e| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).with_field(e.field)
    })?;
    Ok((options, job))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
}

/// The answer while the devices are still being opened.
fn not_ready() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "devices are still being opened; retry shortly",
    )
    .retry_after(1)
}
