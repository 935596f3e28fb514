//! headroom's devices: the training step of the engine on real hardware and on its reference.
//!
//! # Layout
//!
//! - [`host`]: the CPU reference with a memory budget, and the default without a GPU.
//! - [`cuda`]: hand-written CUDA kernels (`kernels/*.cu`) through NVRTC and cudarc.
//! - [`nvml`]: GPU telemetry (memory, utilisation, other processes) through NVML.
//! - [`select`]: choosing and opening a device from `auto`, `host` or `cuda:N`.
//! - [`parity`]: every kernel family of a device, in every storage, and short training runs in
//!   every precision, checked against the host reference; [`transfer`]: the copies they need.

pub mod cuda;
pub mod host;
pub mod nvml;
pub mod parity;
pub mod select;
pub mod transfer;
