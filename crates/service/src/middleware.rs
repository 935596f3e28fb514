//! The layers every request passes: the bearer token, the route label, and the observer that
//! times requests, refuses oversized bodies and turns every error answer into a problem document.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::problem::Problem;
use crate::state::AppState;

/// Bearer-token check for `/tune` and `/jobs`, in constant time.
pub(crate) async fn require_token(token: Arc<str>, request: Request, next: Next) -> Response {
    let expected = token.as_bytes();
    if expected.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    if given.ct_eq(expected).into() {
        return next.run(request).await;
    }
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "send the service's token as Authorization: Bearer <token>",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// The route template a request matched (`/jobs/{id}`), for the metrics' `route` label.
#[derive(Clone)]
struct RouteLabel(String);

/// Runs inside the router, where the matched route is known, and hands it out with the response.
pub(crate) async fn label_route(matched: MatchedPath, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response
        .extensions_mut()
        .insert(RouteLabel(matched.as_str().to_string()));
    response
}

/// How much of an oversized body is read and dropped before answering 413, and for how long:
/// a client that writes its whole body before reading (most do) then reads the answer instead of
/// a reset connection.
const DRAIN_BYTES: u64 = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads and drops up to [`DRAIN_BYTES`] of `body`, within [`DRAIN_TIME`].
async fn drain(body: axum::body::Body) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut read = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// The readiness probe's route: its 503 while the devices open is an answer, not a failure.
const READINESS: &str = "/readyz";

/// Times and counts every request by route, method and status, refuses a declared body past the
/// limit before routing it, and turns every error answer that is not yet a problem document
/// (axum's own rejections: a body past the limit, a bad path) into one; a page for a browser
/// stays a page.
pub(crate) async fn observe_request(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut response = if declared.is_some_and(|bytes| bytes > state.config.body_limit.0) {
        drain(request.into_body()).await;
        StatusCode::PAYLOAD_TOO_LARGE.into_response()
    } else {
        next.run(request).await
    };
    let status = response.status();
    if (status.is_client_error() || status.is_server_error())
        && !is_problem(&response)
        && !is_page(&response)
    {
        response = as_problem(response, &state).await;
    }
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or("unmatched", |r| r.0.as_str())
        .to_string();
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .request(&route, &method, status.as_u16(), seconds);
    let code = status.as_u16();
    if status.is_server_error() && route != READINESS {
        tracing::warn!(route, method, status = code, seconds, "request failed");
    } else if seconds > state.config.slow_request_seconds {
        tracing::info!(route, method, status = code, seconds, "slow request");
    }
    response
}

/// A page for a browser (a 404 page), which stays one.
fn is_page(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"))
}

fn is_problem(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/problem+json")
}

/// An error answer as a problem document with the same status, its text as the detail.
async fn as_problem(response: Response, state: &AppState) -> Response {
    let (parts, body) = response.into_parts();
    let detail = if parts.status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the body is larger than the limit of {}",
            state.config.body_limit
        )
    } else {
        let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        if text.is_empty() {
            parts
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_string()
        } else {
            text
        }
    };
    let mut problem = Problem::new(parts.status, detail).into_response();
    problem.extensions_mut().extend(parts.extensions);
    problem
}
