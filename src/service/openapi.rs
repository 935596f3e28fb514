//! The OpenAPI 3 document, generated from the handlers and types by utoipa.

use axum::Json;
use utoipa::OpenApi;

use super::handlers;

/// The service's API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "headroom",
        description = "Finds the largest training batch size a device can hold, and a safe one."
    ),
    paths(
        handlers::tune,
        handlers::get_job,
        handlers::cancel_job,
        handlers::list_jobs,
        handlers::devices,
        handlers::metrics,
        handlers::livez,
        handlers::readyz
    ),
    components(schemas(
        handlers::TuneRequest,
        handlers::DeviceStatus,
        super::jobs::JobDocument,
        super::problem::Problem,
        crate::result::TuneResult,
        crate::job::JobSpec
    ))
)]
pub struct ApiDoc;

/// `GET /openapi.json`
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
