//! headroom's engine: what a job is, how much memory its training step takes, the step itself
//! written against the kernels a device provides, and the search for the largest batch. It
//! knows nothing of HTTP, SQL, HTML or plotting; the devices, the service and the CLI are built
//! on it.
//!
//! # Layout
//!
//! - [`job`]: the job description (JSON), parsed and validated with field paths into a [`Job`]
//!   that owns its [`Plan`].
//! - [`modules`]: the layer kinds, one file each in PyTorch's names: shape rule and errors,
//!   parameters, forward, what autograd saves, backward, and the f64 reference.
//! - [`memory`]: how a step's memory is counted: storages, precisions, the four parts, the
//!   allocator's rounding, the moments of a step and the peak's breakdown.
//! - [`program`]: a training step compiled for one batch size: its allocations, frees and
//!   kernels in order, recorded from the modules as PyTorch's autograd runs them, or as
//!   headroom's own step holds them ([`program::Framework`]); its peak.
//! - [`plan`]: the model and its training, the four-part memory model and the prediction of
//!   the largest batch; [`estimate`]: the memory model's answer for an amount of free memory,
//!   no device touched; [`frontier`]: over token ids, that answer at each sequence length.
//! - [`step`]: the [`step::Kernels`] a device provides, family by family, and the executor that
//!   runs a program on them.
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
pub mod frontier;
pub mod huggingface;
pub mod job;
pub mod knee;
pub mod memory;
pub mod modules;
pub mod plan;
pub mod program;
pub mod result;
pub mod search;
pub mod step;
pub mod synthetic;

pub use device::{Device, DeviceError, DeviceInfo};
pub use job::{Job, JobError, JobSpec};
pub use plan::{MemoryBreakdown, Plan};
pub use result::TuneResult;
pub use search::{tune, TuneError};
