//! `headroom serve`: the HTTP service around the engine.
//!
//! - [`handlers`]: the routes; [`problem`]: RFC 9457 errors.
//! - [`jobs`]: job lifecycle and history; [`workers`]: one queue and thread per device.
//! - [`cache`]: reuse of finished results; [`metrics`]: the Prometheus registry.
//! - [`store`]: jobs and results across restarts and nodes; [`recovery`]: a start over it.
//! - [`openapi`]: the OpenAPI 3 document served at `/openapi.json`.

pub mod cache;
pub mod handlers;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod recovery;
pub mod store;
pub mod workers;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::device::select::{self, DeviceSpec};
use crate::device::{cuda, nvml};
use cache::{ResultCache, SharedResults};
use jobs::{JobStore, Recorder};
use metrics::Metrics;
use problem::Problem;
use store::journal::{Journal, StoreHealth};
use store::{Retention, Store, StoreError, StoredJob};
use workers::{DeviceWorker, WorkerContext};

/// Everything the handlers share.
pub struct AppState {
    /// The settings in force.
    pub config: Config,
    /// This service's node name in the store.
    pub node: Arc<str>,
    /// Jobs in memory: every unfinished one and the recently finished, recent first.
    pub jobs: JobStore,
    /// Finished results, in memory and in the store.
    pub cache: Arc<ResultCache>,
    /// Where jobs and results are kept.
    pub store: Arc<dyn Store>,
    /// The store's writer.
    pub journal: Journal,
    /// Whether the store works.
    pub store_health: Arc<StoreHealth>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    workers: OnceLock<Vec<Arc<DeviceWorker>>>,
}

impl AppState {
    /// State over `store`, with no devices open yet; starts the store's writer on the current
    /// tokio runtime.
    pub fn new(config: Config, store: Arc<dyn Store>) -> Arc<AppState> {
        let metrics = Arc::new(Metrics::new());
        let store_health = Arc::new(StoreHealth::new(Arc::clone(&metrics)));
        let ttl = Duration::from_secs(config.cache_ttl_seconds);
        let retention = Retention {
            max_age: Duration::from_secs(config.retention_days.saturating_mul(86_400)),
            max_jobs: config.retention_jobs,
            result_ttl: ttl,
        };
        let journal = Journal::start(Arc::clone(&store), Arc::clone(&store_health), retention);
        let shared = SharedResults {
            store: Arc::clone(&store),
            journal: journal.clone(),
            health: Arc::clone(&store_health),
        };
        Arc::new(AppState {
            node: config.node().into(),
            jobs: JobStore::new(config.job_history),
            cache: Arc::new(ResultCache::new(ttl, config.cache_capacity, Some(shared))),
            store,
            journal,
            store_health,
            metrics,
            workers: OnceLock::new(),
            config,
        })
    }

    /// The device workers, once the devices are open.
    pub fn workers(&self) -> Option<&[Arc<DeviceWorker>]> {
        self.workers.get().map(Vec::as_slice)
    }

    /// What a job's changes are recorded with.
    pub fn recorder(&self) -> Recorder {
        Recorder {
            journal: self.journal.clone(),
            node: Arc::clone(&self.node),
        }
    }

    /// The result-cache key of `job` on `worker`'s device: shared by every node with an
    /// identical device, or this node's alone when results are not shared.
    pub fn cache_key(&self, job: &crate::job::Job, worker: &DeviceWorker) -> String {
        if self.config.share_results {
            cache::key(job, &worker.identity)
        } else {
            cache::key(job, &format!("{}|{}", worker.identity, self.node))
        }
    }

    /// Opens the configured devices (compiling kernels for GPUs) and starts their workers, one
    /// per physical device. A device that fails to open is logged and left out; the others are
    /// served.
    pub fn open_devices(&self) -> Result<(), String> {
        let specs = device_specs(&self.config.devices, cuda_device_count());
        let (driver_version, gpus) =
            nvml::telemetry().unwrap_or_else(|_| ("none".into(), Vec::new()));
        let mut workers = Vec::new();
        for spec in specs {
            let opened = match select::open(spec, self.config.host_memory.0) {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::error!(device = %spec, error = %e, "device could not be opened; not serving it");
                    continue;
                }
            };
            tracing::info!(device = %spec, "device open");
            let context = WorkerContext {
                cache: Arc::clone(&self.cache),
                metrics: Arc::clone(&self.metrics),
                node: Arc::clone(&self.node),
            };
            let nvml_index = nvml::find(&gpus, &opened.device.info()).map(|g| g.index);
            workers.push(DeviceWorker::start(
                spec,
                &driver_version,
                opened.device,
                self.config.queue_length,
                context,
                nvml_index,
            ));
        }
        self.workers
            .set(workers)
            .map_err(|_| "devices were already opened".to_string())
    }

    /// Queues again the jobs that were queued when this node last stopped, oldest first, each
    /// waiting for room in its device's queue. A job whose device is no longer served, or that
    /// no longer validates, fails saying so.
    pub fn requeue(&self, queued: Vec<StoredJob>) {
        for stored in queued {
            let id = stored.document.id.clone();
            match recovery::requeue(self, stored) {
                Ok(()) => tracing::info!(job = %id, "queued again after the restart"),
                Err(reason) => tracing::warn!(job = %id, %reason, "not run after the restart"),
            }
        }
    }

    /// Stops the workers taking jobs and the running ones after their probe; queued jobs stay
    /// queued in the store, for the next start.
    pub fn begin_shutdown(&self) {
        for worker in self.workers().unwrap_or_default() {
            worker.close();
        }
        for job in self.jobs.recent() {
            job.stop_for_shutdown();
        }
    }

    /// Waits (up to `grace` in all) for the workers to finish their probe and free their devices.
    pub fn finish_shutdown(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        self.workers()
            .unwrap_or_default()
            .iter()
            .all(|w| w.join(deadline.saturating_duration_since(Instant::now())))
    }
}

fn cuda_device_count() -> u32 {
    if cuda::compile::nvrtc_available() {
        cuda::device_count().unwrap_or(0)
    } else {
        0
    }
}

/// The devices to serve, each physical device once: `auto` is every one of the `cuda_devices`
/// and the host; `cuda` is `cuda:0`. A device listed twice (`["auto", "cuda:0"]`) is served once,
/// with a warning: two workers on one GPU would disturb each other's probes, and one's fault
/// recovery would reset the other's context.
fn device_specs(configured: &[DeviceSpec], cuda_devices: u32) -> Vec<DeviceSpec> {
    let mut specs = Vec::new();
    for &spec in configured {
        let expanded = match spec {
            DeviceSpec::Auto => (0..cuda_devices)
                .map(DeviceSpec::Cuda)
                .chain([DeviceSpec::Host])
                .collect(),
            named => vec![named],
        };
        for device in expanded {
            if specs.contains(&device) {
                tracing::warn!(device = %device, "{device} is configured more than once (\"auto\" includes every GPU and the host); serving it once");
            } else {
                specs.push(device);
            }
        }
    }
    specs
}

/// Locks `mutex`, going on with its data if a thread panicked while holding it: every value
/// behind the service's locks stays consistent between statements.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every route, declared once for axum and the OpenAPI document alike. `/tune` and `/jobs` sit
/// behind the bearer token.
fn api_routes(token: &str) -> OpenApiRouter<Arc<AppState>> {
    let token: Arc<str> = token.into();
    let protected = OpenApiRouter::new()
        .routes(routes!(handlers::tune::tune))
        .routes(routes!(handlers::jobs::list_jobs))
        .routes(routes!(handlers::jobs::get_job, handlers::jobs::cancel_job))
        .route_layer(middleware::from_fn(move |request, next| {
            require_token(Arc::clone(&token), request, next)
        }));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(protected)
        .routes(routes!(handlers::estimate::estimate))
        .routes(routes!(handlers::pages::home))
        .routes(routes!(handlers::devices::devices))
        .routes(routes!(handlers::devices::metrics))
        .routes(routes!(handlers::health::livez))
        .routes(routes!(handlers::health::readyz))
}

/// The OpenAPI document of the service, as `/openapi.json` serves it.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes("").into_openapi()
}

/// The router with every route and layer.
pub fn router(state: Arc<AppState>) -> Router {
    let (routes, document) = api_routes(&state.config.token).split_for_parts();
    let document = axum::body::Bytes::from(
        serde_json::to_vec(&document).expect("the OpenAPI document serialises"),
    );
    routes
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], document) }),
        )
        .route_layer(middleware::from_fn(label_route))
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "no such route; see /openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method; see /openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.body_limit.0 as usize))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            observe_request,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(CatchPanicLayer::custom(|_| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server hit a bug handling this request; it has been logged",
            )
            .into_response()
        }))
        .with_state(state)
}

/// Bearer-token check for `/tune` and `/jobs`, in constant time.
async fn require_token(token: Arc<str>, request: Request, next: Next) -> Response {
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
async fn label_route(matched: MatchedPath, request: Request, next: Next) -> Response {
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

/// Times and counts every request by route, method and status, refuses a declared body past the
/// limit before routing it, and turns every error answer that is not yet a problem document
/// (axum's own rejections: a body past the limit, a bad path) into one.
async fn observe_request(
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
    if (status.is_client_error() || status.is_server_error()) && !is_problem(&response) {
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
    response
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

/// Why the service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or taken over at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Serving failed.
    #[error("the server stopped: {0}")]
    Io(#[from] std::io::Error),
}

/// How long shutdown waits for the store to take the last writes.
const STORE_FLUSH: Duration = Duration::from_secs(10);

/// Opens the store and takes over this node's jobs from before, then serves on `listener`
/// until `shutdown` resolves: stops taking jobs, lets a running probe finish (bounded by the
/// config's grace), frees the devices and writes the last changes to the store.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let store: Arc<dyn Store> = Arc::new(store::sql::open(&config.store).await?);
    tracing::info!(store = store.describe(), "store open");
    let recovered = recovery::take_over(store.as_ref(), &config.node()).await?;
    let state = AppState::new(config, store);
    let opening = Arc::clone(&state);
    let opened = tokio::task::spawn_blocking(move || {
        opening.open_devices()?;
        opening.requeue(recovered.queued);
        Ok::<(), String>(())
    });
    let stopping = Arc::clone(&state);
    let app = router(Arc::clone(&state));
    tracing::info!(address = %listener.local_addr()?, "listening");
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: stopping jobs; queued ones stay queued for the next start");
        stopping.begin_shutdown();
    });
    server.await?;
    match opened.await {
        Ok(Err(e)) => tracing::error!("opening devices failed: {e}"),
        Err(e) => tracing::error!("opening devices panicked: {e}"),
        Ok(Ok(())) => {}
    }
    let finishing = Arc::clone(&state);
    let released = tokio::task::spawn_blocking(move || finishing.finish_shutdown(grace))
        .await
        .unwrap_or(false);
    let stored = state.journal.flush(STORE_FLUSH).await;
    tracing::info!(released, stored, "stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

/// Starts logging in the configured format (to stderr).
pub fn init_logging(format: crate::config::LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Human => builder.try_init(),
        crate::config::LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_is_served_once() {
        use DeviceSpec::{Auto, Cuda, Host};
        assert_eq!(device_specs(&[Auto], 2), [Cuda(0), Cuda(1), Host]);
        assert_eq!(device_specs(&[Auto, Cuda(0)], 2), [Cuda(0), Cuda(1), Host]);
        assert_eq!(device_specs(&[Cuda(0), Host, Cuda(0)], 1), [Cuda(0), Host]);
        assert_eq!(device_specs(&[Host, Auto], 0), [Host]);
    }
}
