//! `GET /devices` and `GET /metrics`: what each device is and holds, NVML telemetry included.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::not_ready;
use crate::metrics::DeviceLabels;
use crate::openapi::schemas;
use crate::openapi::Unavailable;
use crate::problem::Problem;
use crate::AppState;
use headroom_devices::nvml;
use headroom_engine::device::DeviceKind;

/// One device as `GET /devices` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceStatus {
    /// `host` or `cuda`.
    #[schema(value_type = schemas::DeviceKind)]
    pub kind: DeviceKind,
    /// Index among devices of its kind.
    pub index: u32,
    /// `host` or `cuda:N`: what jobs name.
    pub device: String,
    /// Model name.
    pub name: String,
    /// GPU UUID (CUDA only).
    pub uuid: Option<String>,
    /// Memory in all, bytes.
    pub total_bytes: u64,
    /// Memory in use, bytes (by anyone, for GPUs).
    pub used_bytes: u64,
    /// Memory free, bytes.
    pub free_bytes: u64,
    /// GPU utilisation, percent (CUDA only).
    pub utilization_percent: Option<u32>,
    /// GPU temperature, Celsius (CUDA only).
    pub temperature_celsius: Option<u32>,
    /// Other processes computing on the GPU (CUDA only).
    pub other_compute_processes: Option<usize>,
    /// Whether a job is running.
    pub busy: bool,
    /// Jobs waiting.
    pub queue_length: usize,
    /// Whether it takes jobs: false for a while after its probe worker failed repeatedly.
    pub healthy: bool,
    /// The process id of its probe worker, while one runs.
    pub worker_pid: Option<u32>,
}

/// `GET /devices`
#[utoipa::path(get, path = "/devices", tag = "devices",
    responses(
        (status = 200, description = "Every device served, with NVML telemetry for GPUs.", body = Vec<DeviceStatus>),
        Unavailable,
    ))]
pub async fn devices(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<DeviceStatus>>, Problem> {
    Ok(Json(device_statuses(&state).await?))
}

/// Every device served, with NVML's telemetry for the GPUs.
pub(crate) async fn device_statuses(state: &AppState) -> Result<Vec<DeviceStatus>, Problem> {
    let workers = state.workers().ok_or_else(not_ready)?;
    let gpus = state.gpu_readings.read_async().await;
    Ok(workers
        .iter()
        .map(|w| {
            let info = w.info();
            let gpu = nvml::find(&gpus, &info);
            DeviceStatus {
                kind: info.kind,
                index: info.index,
                device: w.device.to_string(),
                name: info.name.clone(),
                uuid: gpu.map(|g| g.uuid.clone()),
                total_bytes: gpu.map_or(info.total_bytes, |g| g.total_bytes),
                used_bytes: gpu.map_or(info.total_bytes - info.free_bytes, |g| g.used_bytes),
                free_bytes: gpu.map_or(info.free_bytes, |g| g.free_bytes),
                utilization_percent: gpu.and_then(|g| g.utilization_percent),
                temperature_celsius: gpu.and_then(|g| g.temperature_celsius),
                other_compute_processes: gpu
                    .map(|g| g.other_compute_processes(&w.process_ids(), w.worker_pid().is_some())),
                busy: w.is_busy(),
                queue_length: w.queue_length(),
                healthy: w.refusal().is_none(),
                worker_pid: w.worker_pid(),
            }
        })
        .collect())
}

/// `GET /metrics`
#[utoipa::path(get, path = "/metrics", tag = "devices",
    responses((status = 200, description = "Every metric, in the Prometheus text exposition format.",
               body = String, content_type = "text/plain; version=0.0.4")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let gpus = state.gpu_readings.read_async().await;
    let workers = state.workers().unwrap_or_default();
    for gpu in gpus.iter() {
        let served = workers
            .iter()
            .find(|w| w.info().uuid.as_deref() == Some(gpu.uuid.as_str()));
        let labels = match served {
            Some(worker) => worker.labels.clone(),
            None => DeviceLabels::of_gpu(None, gpu.index, &gpu.uuid, &gpu.name),
        };
        state
            .metrics
            .gpu_memory(&labels, gpu.total_bytes, gpu.used_bytes);
    }
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        state.metrics.encode(),
    )
        .into_response()
}
