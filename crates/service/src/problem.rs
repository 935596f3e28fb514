//! RFC 9457 problem details: every error the service answers.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::probe_worker::client::WorkerError;
use headroom_engine::search::TuneError;

/// An `application/problem+json` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
    /// The path of the offending field of the request body, for invalid fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Seconds to wait before retrying, for busy answers.
    #[serde(skip)]
    pub retry_after_seconds: Option<u64>,
}

/// Where headroom's problem types live; a type is this and its slug.
const PROBLEM_TYPES: &str = "https://headroom.dev/problems/";

/// The slug of a model that does not fit at batch size 1.
const DOES_NOT_FIT: &str = "does-not-fit";

/// What a job's error adds when its probe worker is gone.
pub const NEW_WORKER: &str = "; the next job runs in a new worker process";

impl Problem {
    /// A problem of type `about:blank` with the status's reason as its title.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            problem_type: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            retry_after_seconds: None,
        }
    }

    /// A problem with its own type (`{PROBLEM_TYPES}{slug}`) and title.
    pub fn typed(
        status: StatusCode,
        slug: &str,
        title: &str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            problem_type: format!("{PROBLEM_TYPES}{slug}"),
            title: title.into(),
            ..Problem::new(status, detail)
        }
    }

    /// The slug of headroom's own problem types (`does-not-fit`), `None` for `about:blank`
    /// and anything else.
    pub fn slug(&self) -> Option<&str> {
        self.problem_type.strip_prefix(PROBLEM_TYPES)
    }

    /// Whether the model does not fit at batch size 1 ([`TuneError::DoesNotFit`]).
    pub fn is_does_not_fit(&self) -> bool {
        self.slug() == Some(DOES_NOT_FIT)
    }

    /// Names the offending field.
    pub fn with_field(mut self, field: impl Into<String>) -> Problem {
        self.field = Some(field.into());
        self
    }

    /// The problem a search that gave no answer reports.
    pub fn of_search(err: &TuneError) -> Problem {
        let (status, slug, title) = match err {
            TuneError::DoesNotFit(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                DOES_NOT_FIT,
                "Model does not fit",
            ),
            TuneError::Fault { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "device-fault",
                "Device fault",
            ),
            TuneError::Unstable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unstable-limit",
                "Device limit unstable",
            ),
            TuneError::Cancelled => (StatusCode::CONFLICT, "cancelled", "Job cancelled"),
        };
        Problem::typed(status, slug, title, err.to_string())
    }

    /// A job's probe worker that crashed or hung: the job failed, the device goes on with a new
    /// worker.
    pub fn of_worker(err: &WorkerError) -> Problem {
        let (slug, title) = match err {
            WorkerError::Hung { .. } => ("probe-timeout", "Probe did not finish"),
            WorkerError::Crashed { .. } => ("worker-crashed", "Probe worker crashed"),
            WorkerError::Start { .. } => ("worker-unavailable", "Probe worker unavailable"),
        };
        Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            slug,
            title,
            format!("{err}{NEW_WORKER}"),
        )
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after_seconds = Some(seconds);
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).expect("problems serialise");
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after_seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
