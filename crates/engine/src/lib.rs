//! headroom's engine: what a job is, how much memory its training step takes, the step itself
//! written against the kernels a device provides, and the search for the largest batch. It
//! knows nothing of HTTP, SQL, HTML or plotting; the devices, the service and the CLI are built
//! on it.
//!
//! # Layout
//!
//! - [`job`]: the job description (JSON), parsed and validated with field paths into a [`Job`]
//!   that owns its [`Plan`]; [`layers`]: a model as a layer list in PyTorch's names, every
//!   shape checked and the parameters counted.
//! - [`plan`]: layer shapes (linear, and convolutions with their pooling: [`plan::image`]),
//!   every buffer of a step, the four-part memory model and the prediction of the largest batch.
//! - [`estimate`]: the memory model's answer for an amount of free memory, no device touched.
//!   Its [`plan::program`] is a training step compiled for one batch size: its allocations,
//!   frees and kernels in order, as PyTorch runs it or as headroom's own step does
//!   ([`plan::Framework`]).
//! - [`step`]: the [`step::Kernels`] a device provides, and the executor that runs a program on
//!   them.
//! - [`synthetic`]: the counter-based hash behind synthetic data and initial parameters.
//! - [`device`]: the [`Device`] trait the search probes, and what devices report.
//! - [`search`]: doubling or prediction, bisection and confirmation; it sees only [`Device`].
//! - [`advice`]: the headroom rule, accumulation advice; [`knee`]: the throughput knee read
//!   from noisy measurements through a fitted step time, with its interval.
//! - [`result`]: the answer of a search, [`TuneResult`].
//! - [`catalogue`]: GPU what-ifs: the memory model on common cards.

pub mod advice;
pub mod catalogue;
pub mod device;
pub mod estimate;
pub mod job;
pub mod knee;
pub mod layers;
pub mod plan;
pub mod result;
pub mod search;
pub mod step;
pub mod synthetic;

pub use device::{Device, DeviceError, DeviceInfo};
pub use job::{Job, JobError, JobSpec};
pub use plan::{MemoryBreakdown, Plan};
pub use result::TuneResult;
pub use search::{tune, TuneError};
