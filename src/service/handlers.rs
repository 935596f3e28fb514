//! The HTTP handlers: small functions from request to answer, every error a [`Problem`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::jobs::{JobDocument, TuneJob};
use super::problem::Problem;
use super::workers::{DeviceWorker, EnqueueError};
use super::AppState;
use crate::device::select::DeviceSpec;
use crate::device::{nvml, DeviceKind};
use crate::job::Job;

/// What `POST /tune` takes besides the job.
#[derive(Debug, PartialEq, Deserialize)]
struct TuneOptions {
    /// Where to run it.
    #[serde(default)]
    device: DeviceSpec,
    /// Probe even if a cached result exists.
    #[serde(default)]
    no_cache: bool,
    /// Probe a GPU other processes compute on.
    #[serde(default)]
    allow_shared: bool,
}

/// The body of `POST /tune`: the service's options, and every other key as the job.
#[derive(Deserialize)]
struct TuneBody {
    #[serde(flatten)]
    options: TuneOptions,
    #[serde(flatten)]
    job: serde_json::Map<String, Value>,
}

/// Splits the body into the service's options and the job (with the config's defaults filled in).
fn parse_tune_request(body: Value, state: &AppState) -> Result<(TuneOptions, Job), Problem> {
    if !body.is_object() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object holding a job",
        ));
    }
    let TuneBody { options, mut job } = serde_path_to_error::deserialize(body).map_err(|e| {
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

/// The worker a job goes to: the one named, or for `auto` the least busy CUDA device (the host
/// when there is none).
fn choose_worker(state: &AppState, spec: DeviceSpec) -> Result<Arc<DeviceWorker>, Problem> {
    let workers = state.workers().ok_or_else(not_ready)?;
    let load = |w: &DeviceWorker| w.queue_length() + usize::from(w.is_busy());
    let chosen = match spec {
        DeviceSpec::Auto => workers
            .iter()
            .filter(|w| w.is_cuda())
            .min_by_key(|w| load(w))
            .or_else(|| workers.iter().find(|w| !w.is_cuda())),
        named => workers.iter().find(|w| w.device == named),
    };
    chosen.cloned().ok_or_else(|| {
        let served: Vec<String> = workers.iter().map(|w| w.device.to_string()).collect();
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "device {spec} is not served here; this service has {}",
                served.join(", ")
            ),
        )
        .with_field("device")
    })
}

fn not_ready() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "devices are still being opened; retry shortly",
    )
    .retry_after(1)
}

/// Refuses to probe a GPU that other processes are computing on, unless allowed.
fn check_shared(worker: &DeviceWorker, allowed: bool) -> Result<(), Problem> {
    if allowed || !worker.is_cuda() {
        return Ok(());
    }
    let index = worker.info().index;
    let Ok((_, gpus)) = nvml::telemetry() else {
        return Ok(());
    };
    match gpus.iter().find(|g| g.index == index) {
        Some(gpu) if gpu.other_compute_processes > 0 => Err(Problem::typed(
            StatusCode::CONFLICT,
            "device-shared",
            "Device in use",
            format!(
                "{} has {} other process(es) with a compute context holding {} bytes; probing it could make them run out of memory. \
                 Send \"allow_shared\": true to probe anyway",
                worker.device, gpu.other_compute_processes, gpu.used_bytes
            ),
        )),
        _ => Ok(()),
    }
}

fn wants_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
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

fn accepted(document: JobDocument) -> Response {
    let location = format!("/jobs/{}", document.id);
    let mut response = (StatusCode::ACCEPTED, Json(document)).into_response();
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("ids are ASCII"),
    );
    response
}

/// `POST /tune`
#[utoipa::path(post, path = "/tune", request_body = TuneRequest,
    responses((status = 200, body = crate::result::TuneResult), (status = 202, body = JobDocument),
              (status = 400, body = Problem), (status = 409, body = Problem), (status = 413, body = Problem),
              (status = 415, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem),
              (status = 503, body = Problem)))]
pub async fn tune(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    if !is_json(&headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the job as JSON with Content-Type: application/json",
        ));
    }
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let (options, job) = parse_tune_request(value, &state)?;
    let worker = choose_worker(&state, options.device)?;
    check_shared(&worker, options.allow_shared || state.config.allow_shared)?;
    let cache_key = super::cache::key(&job, &worker.identity);
    if !options.no_cache {
        if let Some(result) = state.cache.get(&cache_key) {
            state.metrics.cache_hit();
            return Ok(Json(result).into_response());
        }
    }
    state.metrics.cache_miss();
    let job = TuneJob::new(job, worker.device, cache_key);
    state.jobs.insert(Arc::clone(&job));
    match worker.enqueue(Arc::clone(&job)) {
        Ok(()) => {}
        Err(EnqueueError::Full) => {
            state.jobs.remove(job.id);
            return Err(Problem::typed(
                StatusCode::TOO_MANY_REQUESTS,
                "queue-full",
                "Queue full",
                format!(
                    "{} already has {} jobs waiting; retry later",
                    worker.device,
                    worker.queue_length()
                ),
            )
            .retry_after(state.config.wait_seconds.clamp(1, 30)));
        }
        Err(EnqueueError::Closed) => {
            state.jobs.remove(job.id);
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the service is shutting down",
            ));
        }
    }
    if wants_async(&headers)
        || !job
            .wait(Duration::from_secs(state.config.wait_seconds))
            .await
    {
        return Ok(accepted(state.jobs.document(&job)));
    }
    let document = job.document();
    match (document.result, document.error) {
        (Some(result), _) => Ok(Json(result).into_response()),
        (None, Some(problem)) => Err(problem),
        (None, None) => Err(Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the job finished with neither a result nor an error; this is a bug in headroom",
        )),
    }
}

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

/// `GET /jobs/{id}`
#[utoipa::path(get, path = "/jobs/{id}", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = JobDocument), (status = 404, body = Problem)))]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobDocument>, Problem> {
    Ok(Json(state.jobs.document(&*find_job(&state, &id)?)))
}

/// `DELETE /jobs/{id}`
#[utoipa::path(delete, path = "/jobs/{id}", params(("id" = String, Path, description = "Job id")),
    responses((status = 202, body = JobDocument), (status = 404, body = Problem), (status = 409, body = Problem)))]
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

/// `GET /jobs`
#[utoipa::path(get, path = "/jobs", responses((status = 200, body = Vec<JobDocument>)))]
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

/// One device as `GET /devices` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceStatus {
    /// `host` or `cuda`.
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
}

/// `GET /devices`
#[utoipa::path(get, path = "/devices", responses((status = 200, body = Vec<DeviceStatus>), (status = 503, body = Problem)))]
pub async fn devices(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<DeviceStatus>>, Problem> {
    let workers = state.workers().ok_or_else(not_ready)?;
    let gpus =
        tokio::task::spawn_blocking(|| nvml::telemetry().map(|(_, gpus)| gpus).unwrap_or_default())
            .await
            .unwrap_or_default();
    Ok(Json(
        workers
            .iter()
            .map(|w| {
                let info = w.info();
                let gpu = gpus
                    .iter()
                    .find(|g| info.kind == DeviceKind::Cuda && g.index == info.index);
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
                    other_compute_processes: gpu.map(|g| g.other_compute_processes),
                    busy: w.is_busy(),
                    queue_length: w.queue_length(),
                }
            })
            .collect(),
    ))
}

/// `GET /metrics`
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let gpus =
        tokio::task::spawn_blocking(|| nvml::telemetry().map(|(_, gpus)| gpus).unwrap_or_default())
            .await
            .unwrap_or_default();
    for gpu in gpus {
        state
            .metrics
            .gpu_memory(gpu.index, &gpu.uuid, gpu.total_bytes, gpu.used_bytes);
    }
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        state.metrics.encode(),
    )
        .into_response()
}

/// `GET /livez`: the process answers.
#[utoipa::path(get, path = "/livez", responses((status = 200, description = "alive")))]
pub async fn livez() -> Json<Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: devices are open and kernels compiled.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, body = Problem)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Value>, Problem> {
    let workers = state.workers().ok_or_else(not_ready)?;
    if workers.is_empty() {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no configured device could be opened; see the log",
        ));
    }
    Ok(Json(
        serde_json::json!({"status": "ready", "devices": workers.iter().map(|w| w.device).collect::<Vec<_>>()}),
    ))
}

/// The body of `POST /tune`: a job, plus where and how to run it (documentation only: the
/// handler reads the body as a job with these keys taken out).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct TuneRequest {
    /// The job.
    #[serde(flatten)]
    job: crate::job::JobSpec,
    /// `auto` (default), `host` or `cuda:N`.
    device: Option<String>,
    /// Probe even if a cached result exists.
    no_cache: Option<bool>,
    /// Probe a GPU other processes are computing on.
    allow_shared: Option<bool>,
}
