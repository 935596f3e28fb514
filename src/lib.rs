//! headroom finds the largest training batch size a device can hold for a model, by running
//! real training steps, and recommends a safe one.
//!
//! # Layout
//!
//! - [`job`]: the job description (JSON), parsed and validated with field paths into a [`Job`]
//!   that owns its [`Plan`].
//! - [`plan`]: layer shapes, every buffer of a step, the four-part memory model, the prediction
//!   and the estimate.
//! - [`step`]: one training step written once against the [`step::Kernels`] a device provides.
//! - [`synthetic`]: the counter-based hash behind synthetic data and initial parameters.
//! - [`device`]: the [`device::Device`] trait; `host` (CPU reference) and `cuda` (NVRTC kernels
//!   from `kernels/*.cu`), device selection, and NVML telemetry.
//! - [`search`]: doubling or prediction, bisection and confirmation; it sees only [`Device`].
//! - [`advice`]: the headroom rule, the throughput knee, accumulation advice.
//! - [`catalogue`]: GPU what-ifs: the memory model on common cards.
//! - [`plot`]: SVG charts of memory and throughput against batch size.
//! - [`result`]: the result JSON shared by the CLI and the service.
//! - [`parity`]: every kernel family of a device, in every storage, and short training runs in
//!   every precision, checked against the host reference.
//! - [`service`]: `headroom serve`: HTTP API, per-device job queues, cache, metrics, and the
//!   store of jobs and results (SQLite or PostgreSQL) that outlives restarts.
//! - [`config`]: the service's settings (file, `HEADROOM_*` environment, flags).
//! - [`cli`]: the commands behind `headroom tune | estimate | probe | doctor | serve`, and their output.

pub mod advice;
pub mod catalogue;
pub mod cli;
pub mod config;
pub mod device;
pub mod job;
pub mod parity;
pub mod plan;
pub mod plot;
pub mod result;
pub mod search;
pub mod service;
pub mod step;
pub mod synthetic;

pub use device::{Device, DeviceError, DeviceInfo};
pub use job::{Job, JobError, JobSpec};
pub use plan::{MemoryBreakdown, Plan};
pub use result::TuneResult;
pub use search::{tune, TuneError};
