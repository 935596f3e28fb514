//! `POST /tune`: validates the job, answers from the cache, joins an identical job in flight or
//! queues a new one, and waits for it up to the configured time.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{check_json, not_ready, parse_job_request};
use crate::cache;
use crate::document::JobDocument;
use crate::jobs::{Joined, TuneJob};
use crate::openapi::schemas;
use crate::openapi::{
    job_request_body, BadRequest, Busy, Cancelled, Invalid, TooLarge, Unauthorized, Unavailable,
    UnsupportedType,
};
use crate::parsed::ParsedBodies;
use crate::problem::Problem;
use crate::store::journal::Direction;
use crate::workers::{DeviceWorker, EnqueueError};
use crate::AppState;
use headroom_devices::nvml;
use headroom_devices::select::DeviceSpec;
use headroom_engine::job::Job;

/// How long an accepted job waits for the store to keep it before the answer goes anyway.
const STORE_WAIT: Duration = Duration::from_secs(2);
/// When a client refused for want of a store should try again, seconds (the writer's retry).
const STORE_RETRY_SECONDS: u64 = 2;

/// A `POST /tune` body, parsed and validated: kept by its bytes ([`crate::parsed`]), in the
/// router's extensions.
pub struct ParsedTune {
    options: TuneOptions,
    job: Job,
    /// The job as the cache key holds it.
    normalised: String,
    /// The job in a line, as the last-answer gauges label it.
    model: String,
}

/// What `POST /tune` takes besides the job.
#[derive(Debug, PartialEq, Deserialize, ToSchema)]
pub struct TuneOptions {
    /// Where to run it: `auto` (the least busy GPU, else the host), `host`, `cuda` or `cuda:N`.
    #[serde(default)]
    #[schema(value_type = String, pattern = "^(auto|host|cuda(:[0-9]+)?)$", default = "auto")]
    device: DeviceSpec,
    /// Probe even if a cached result exists.
    #[serde(default)]
    #[schema(default = false)]
    no_cache: bool,
    /// Probe a GPU other processes compute on (they may run out of memory).
    #[serde(default)]
    #[schema(default = false)]
    allow_shared: bool,
    /// A GPU by its UUID (`GPU-...`, as `nvidia-smi -L` and Slurm's `CUDA_VISIBLE_DEVICES` may
    /// name it), in place of `device`.
    #[serde(default)]
    #[schema(pattern = "^GPU-[0-9a-fA-F-]+$")]
    gpu_uuid: Option<String>,
}

job_request_body!(
    TuneRequest,
    TuneOptions,
    "A job, as in examples/, plus where and how to run it."
);

/// The worker a job goes to: the GPU with `uuid`, the one named, or for `auto` the least busy
/// CUDA device (the host when there is none).
fn choose_worker(
    state: &AppState,
    spec: DeviceSpec,
    uuid: Option<&str>,
) -> Result<Arc<DeviceWorker>, Problem> {
    let workers = state.workers().ok_or_else(not_ready)?;
    if let Some(uuid) = uuid {
        let same = |w: &&Arc<DeviceWorker>| {
            w.info()
                .uuid
                .is_some_and(|own| own.eq_ignore_ascii_case(uuid))
        };
        return workers.iter().find(same).cloned().ok_or_else(|| {
            let served: Vec<String> = workers
                .iter()
                .filter_map(|w| w.info().uuid.map(|u| format!("{} ({u})", w.device)))
                .collect();
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "no GPU {uuid} is served here; this service has {}",
                    if served.is_empty() {
                        "no GPU".to_string()
                    } else {
                        served.join(", ")
                    }
                ),
            )
            .with_field("gpu_uuid")
        });
    }
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

/// Refuses a job for a device whose probe worker keeps failing, until its cooldown has passed.
fn check_healthy(worker: &DeviceWorker) -> Result<(), Problem> {
    match worker.refusal() {
        None => Ok(()),
        Some((reason, wait)) => Err(Problem::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "device-unhealthy",
            "Device unhealthy",
            format!(
                "{} refuses jobs for {} s more: its probe worker failed repeatedly (last: {reason})",
                worker.device,
                wait.as_secs().max(1)
            ),
        )
        .retry_after(wait.as_secs().max(1))),
    }
}

/// Refuses to probe a GPU that other processes are computing on, unless allowed.
async fn check_shared(
    state: &AppState,
    worker: &DeviceWorker,
    allowed: bool,
) -> Result<(), Problem> {
    if allowed || !worker.is_cuda() {
        return Ok(());
    }
    // NVML is read anew (a worker replaced a moment ago would read as another process), on a
    // blocking thread, never on the request's task: a slow NVML must not stall the runtime's
    // other requests.
    let gpus = state.gpu_readings.read_now_async().await;
    let others = |gpu: &nvml::GpuTelemetry| {
        gpu.other_compute_processes(&worker.process_ids(), worker.worker_pid().is_some())
    };
    match nvml::find(&gpus, &worker.info()) {
        Some(gpu) if others(gpu) > 0 => Err(Problem::typed(
            StatusCode::CONFLICT,
            "device-shared",
            "Device in use",
            format!(
                "{} has {} other process(es) with a compute context holding {} bytes; probing it could make them run out of memory. \
                 Send \"allow_shared\": true to probe anyway",
                worker.device, others(gpu), gpu.used_bytes
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

fn accepted(document: JobDocument) -> Response {
    let location = format!("/jobs/{}", document.id);
    let mut response = (StatusCode::ACCEPTED, Json(document)).into_response();
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("ids are ASCII"),
    );
    response
}

/// Waits (up to [`STORE_WAIT`]) for the store to take everything sent so far, unless its
/// writes are failing; returns whether it took them.
async fn stored(state: &AppState) -> bool {
    !state.store_health.failing(Direction::Write) && state.journal.flush(STORE_WAIT).await
}

/// 503 for a job that would outlive the request while the store cannot keep it: a 202 is a
/// promise that a restart does not break.
fn not_kept(state: &AppState) -> Problem {
    Problem::typed(
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
        "Store unavailable",
        format!(
            "the store cannot keep jobs now ({}), so none is accepted to answer later; retry \
             later, or send the job without `Prefer: respond-async` to wait for its answer",
            state
                .store_health
                .problem()
                .unwrap_or_else(|| "its writes fail".into())
        ),
    )
    .retry_after(STORE_RETRY_SECONDS)
}

/// Queues a new job on its worker; a full or closed queue answers 429 or 503.
fn enqueue(state: &AppState, worker: &DeviceWorker, job: &Arc<TuneJob>) -> Result<(), Problem> {
    Err(match worker.enqueue(Arc::clone(job)) {
        Ok(()) => return Ok(()),
        Err(EnqueueError::Full) => Problem::typed(
            StatusCode::TOO_MANY_REQUESTS,
            "queue-full",
            "Queue full",
            format!(
                "{} already has {} jobs waiting; retry later",
                worker.device,
                worker.queue_length()
            ),
        )
        .retry_after(state.config.wait_seconds.clamp(1, 30)),
        Err(EnqueueError::Closed) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is shutting down",
        ),
    })
}

/// `POST /tune`: tunes a job, or answers from the cache, or joins an identical job in flight.
#[utoipa::path(post, path = "/tune", tag = "tune",
    request_body(content = TuneRequest, content_type = "application/json",
        description = "A job (as in examples/), plus where and how to run it"),
    params(("Prefer" = Option<String>, Header,
        description = "`respond-async`: answer 202 with the job at once instead of waiting up to the service's `wait_seconds`")),
    responses(
        (status = 200, description = "The answer: the largest batch size that fits and the recommended one (`cached` when reused).", body = schemas::TuneAnswer),
        (status = 202, description = "Accepted: the job is queued or running; follow `Location`.", body = JobDocument,
         headers(("Location" = String, description = "The job, `/jobs/{id}`"))),
        BadRequest, Unauthorized, Cancelled, TooLarge, UnsupportedType, Invalid, Busy, Unavailable,
    ),
    security((), ("bearer" = [])))]
pub async fn tune(
    State(state): State<Arc<AppState>>,
    Extension(parsed_tunes): Extension<Arc<ParsedBodies<ParsedTune>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    check_json(&headers)?;
    let parsed = parsed_tunes.get_or_parse(&body, || {
        let (options, job) = parse_job_request::<TuneOptions>(&body, &state)?;
        let normalised = cache::normalised(&job);
        Ok::<_, Problem>(ParsedTune {
            options,
            model: job.summary(),
            job,
            normalised,
        })
    })?;
    let options = &parsed.options;
    let worker = choose_worker(&state, options.device, options.gpu_uuid.as_deref())?;
    let cache_key = state.cache_key(&parsed.normalised, &worker);
    if !options.no_cache {
        if let Some(cached) = state.cache.get(&cache_key).await {
            state.metrics.cache_hit();
            // A cached answer is this device's last answer for the model as much as a new one.
            state.metrics.last_batch_sizes(
                &worker.labels,
                &parsed.model,
                cached.answer.max_batch_size,
                cached.answer.recommended_batch_size,
            );
            // Sent as kept: serialised once, when the answer was cached.
            return Ok((
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                cached.json.clone(),
            )
                .into_response());
        }
    }
    state.metrics.cache_miss();
    // A cached answer probes nothing; a new job is checked against the GPU's other users.
    check_shared(
        &state,
        &worker,
        options.allow_shared || state.config.allow_shared,
    )
    .await?;
    check_healthy(&worker)?;
    let asynchronous = wants_async(&headers);
    if asynchronous && state.store_health.failing(Direction::Write) {
        return Err(not_kept(&state));
    }
    let job = TuneJob::new(
        parsed.job.clone(),
        worker.device,
        cache_key,
        Some(state.recorder()),
    );
    let (job, new) = match state
        .jobs
        .insert_or_join(job, |new| enqueue(&state, &worker, new))?
    {
        Joined::New(job) => {
            // Accepted: in the store before the client hears of it, so a restart loses it not.
            job.record();
            (job, true)
        }
        Joined::InFlight(job) => {
            state.metrics.single_flight_join();
            (job, false)
        }
    };
    if asynchronous {
        if stored(&state).await {
            return Ok(accepted(state.jobs.document(&job)));
        }
        if new {
            job.cancel();
        }
        return Err(not_kept(&state));
    }
    let wait = Duration::from_secs(state.config.wait_seconds);
    while !job.wait(wait).await {
        if stored(&state).await || job.is_stopping() {
            return Ok(accepted(state.jobs.document(&job)));
        }
        // A 202 now would promise a job the store does not hold, which a restart would lose:
        // while the store cannot keep it, the request waits for the answer instead.
        tracing::warn!(job = %job.id, "the store cannot keep the job: the request waits for its answer instead of a 202");
    }
    let document = job.document();
    match (document.result, document.error) {
        (Some(result), _) => {
            // Answered only once kept: a node sharing the store reuses it from then on.
            stored(&state).await;
            Ok(Json(result).into_response())
        }
        (None, Some(problem)) => Err(problem),
        (None, None) => Err(Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the job finished with neither a result nor an error; this is a bug in headroom",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::openapi::{RefOr, Schema};
    use utoipa::PartialSchema;

    #[test]
    fn a_tune_request_is_a_job_with_the_options_beside_it() {
        let RefOr::T(Schema::Object(request)) = TuneRequest::schema() else {
            panic!("an object")
        };
        let RefOr::T(Schema::Object(job)) = schemas::JobSpec::schema() else {
            panic!("an object")
        };
        let names: Vec<&String> = request.properties.keys().collect();
        for member in job.properties.keys() {
            assert!(names.contains(&member), "{member} missing");
        }
        for option in ["device", "no_cache", "allow_shared"] {
            assert!(request.properties.contains_key(option), "{option} missing");
        }
        assert_eq!(request.required, job.required);
        assert!(request.additional_properties.is_some());
        assert_eq!(TuneRequest::name(), "TuneRequest");
    }
}
