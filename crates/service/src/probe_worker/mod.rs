//! Probing in processes of their own: one worker per device, started from the same binary
//! (`headroom worker`), speaking [`protocol`] over its standard input and output. The service
//! keeps HTTP, the queue, the store, the cache and the metrics, and never loads a GPU driver
//! itself; a fault, a hang or a crash in the driver ends the worker, which the service restarts
//! ([`crate::workers`]).
//!
//! - [`protocol`]: the requests and events, one JSON object per line.
//! - [`child`]: the worker process.
//! - [`client`]: the service's handle on a worker, with the per-probe watchdog.

pub mod child;
pub mod client;
pub mod protocol;
