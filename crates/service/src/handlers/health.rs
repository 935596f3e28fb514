//! `GET /livez` and `GET /readyz`: liveness and readiness, for probes and load balancers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::not_ready;
use crate::openapi::Unavailable;
use crate::problem::Problem;
use crate::AppState;
use headroom_devices::select::DeviceSpec;

/// The process is alive.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `ok`.
    pub status: String,
}

/// The service is ready for jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `degraded` when the store fails (jobs are still taken and answered) or a
    /// device refuses jobs because its probe worker keeps failing (see `unhealthy_devices`).
    #[schema(pattern = "^(ready|degraded)$")]
    pub status: String,
    /// The devices served: `host` or `cuda:N`.
    #[schema(value_type = Vec<String>)]
    pub devices: Vec<DeviceSpec>,
    /// Devices refusing jobs for now, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unhealthy_devices: Vec<UnhealthyDevice>,
    /// The store of jobs and results.
    pub store: StoreStatus,
}

/// A device whose probe worker failed repeatedly: it refuses jobs (503) until its cooldown ends.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnhealthyDevice {
    /// `host` or `cuda:N`.
    #[schema(value_type = String)]
    pub device: DeviceSpec,
    /// The last failure.
    pub reason: String,
    /// Seconds until it takes jobs again.
    pub retry_after_seconds: u64,
}

/// The store, as readiness reports it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreStatus {
    /// The backend and where it is, without a password.
    pub location: String,
    /// Whether its last operation worked.
    pub healthy: bool,
    /// The last failure, while it fails: until it works again, jobs and results are kept in
    /// memory and written when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `GET /livez`: the process answers; it says nothing of the devices.
#[utoipa::path(get, path = "/livez", tag = "health",
    responses((status = 200, description = "The process answers.", body = Liveness)))]
pub async fn livez() -> Json<Liveness> {
    Json(Liveness {
        status: "ok".into(),
    })
}

/// `GET /readyz`: devices are open and kernels compiled; a failing store degrades, but does
/// not unready, the service.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Every configured device that could be opened is open, its kernels compiled; `degraded` while the store fails.", body = Readiness),
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
    let problem = state.store_health.problem();
    let unhealthy_devices: Vec<UnhealthyDevice> = workers
        .iter()
        .filter_map(|w| {
            w.refusal().map(|(reason, wait)| UnhealthyDevice {
                device: w.device,
                reason,
                retry_after_seconds: wait.as_secs().max(1),
            })
        })
        .collect();
    Ok(Json(Readiness {
        status: if problem.is_some() || !unhealthy_devices.is_empty() {
            "degraded"
        } else {
            "ready"
        }
        .into(),
        devices: workers.iter().map(|w| w.device).collect(),
        unhealthy_devices,
        store: StoreStatus {
            location: state.store.describe().into(),
            healthy: problem.is_none(),
            problem,
        },
    }))
}
