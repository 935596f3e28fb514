//! `headroom serve`: the HTTP service around the engine and the devices.
//!
//! # Layout
//!
//! - [`serve`]: start, serve until a signal, stop in order; [`logging`]: where logs go.
//! - [`state`]: what every handler shares, and opening the devices; [`config`]: the settings.
//! - [`routes`]: the router; [`middleware`]: token, route label, request observer;
//!   [`parsed`]: request bodies parsed before, reused.
//! - [`handlers`]: the routes, one file per resource; [`problem`]: RFC 9457 errors;
//!   [`openapi`]: the OpenAPI 3.1 document and the schemas of the engine's types.
//! - [`document`]: a job as the API shows it and the store keeps it.
//! - [`jobs`]: job lifecycle and history; [`workers`]: one queue and worker thread per device,
//!   which runs jobs in the device's [`probe_worker`] process; [`supervision`]: restarts and
//!   device health when that process fails.
//! - [`answer`]: the engine's result with where and when it was measured.
//! - [`cache`]: reuse of finished results; [`metrics`]: the Prometheus registry;
//!   [`gpu_readings`]: NVML's telemetry, read at most once a second.
//! - [`store`]: jobs and results across restarts and nodes; [`recovery`]: a start over it;
//!   [`turns`]: one tune of a job at a time across the nodes sharing it.
//! - [`plot`]: SVG charts of memory and throughput against batch size.

pub mod answer;
pub mod cache;
pub mod config;
pub mod connections;
pub mod document;
pub mod gpu_readings;
pub mod handlers;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod openapi;
pub mod parsed;
pub mod plot;
pub mod probe_worker;
pub mod problem;
pub mod recovery;
pub mod routes;
pub mod serve;
pub mod state;
pub mod store;
pub mod supervision;
pub mod turns;
pub mod workers;

use std::sync::{Mutex, MutexGuard};

pub use routes::{openapi_document, router};
pub use serve::{serve, shutdown_signal, ServeError};
pub use state::AppState;

/// Locks `mutex`, going on with its data if a thread panicked while holding it: every value
/// behind the service's locks stays consistent between statements.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
