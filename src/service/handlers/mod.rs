//! The HTTP handlers, one file per resource: small functions from request to answer, every
//! error a [`Problem`]. Each carries its OpenAPI description ([`utoipa::path`]); the router
//! (`super::router`) registers them and the document from the same list.

pub mod devices;
pub mod health;
pub mod jobs;
pub mod tune;

use axum::http::StatusCode;

use super::problem::Problem;

/// The answer while the devices are still being opened.
fn not_ready() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "devices are still being opened; retry shortly",
    )
    .retry_after(1)
}
