//! `GET /livez` and `GET /readyz`: liveness and readiness, for probes and load balancers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::not_ready;
use crate::device::select::DeviceSpec;
use crate::service::openapi::Unavailable;
use crate::service::problem::Problem;
use crate::service::AppState;

/// The process is alive.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `ok`.
    pub status: String,
}

/// The service is ready for jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// Always `ready`.
    pub status: String,
    /// The devices served: `host` or `cuda:N`.
    #[schema(value_type = Vec<String>)]
    pub devices: Vec<DeviceSpec>,
}

/// `GET /livez`: the process answers; it says nothing of the devices.
#[utoipa::path(get, path = "/livez", tag = "health",
    responses((status = 200, description = "The process answers.", body = Liveness)))]
pub async fn livez() -> Json<Liveness> {
    Json(Liveness {
        status: "ok".into(),
    })
}

/// `GET /readyz`: devices are open and kernels compiled.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Every configured device that could be opened is open, its kernels compiled.", body = Readiness),
        Unavailable,
    ))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Readiness>, Problem> {
    let workers = state.workers().ok_or_else(not_ready)?;
    if workers.is_empty() {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no configured device could be opened; see the log",
        ));
    }
    Ok(Json(Readiness {
        status: "ready".into(),
        devices: workers.iter().map(|w| w.device).collect(),
    }))
}
