//! Copies between host and device memory, for checks alone (parity, gradients, determinism):
//! probes never stage data through host memory.

use headroom_engine::device::{DeviceError, Probing};
use headroom_engine::plan::{Plan, Storage};
use headroom_engine::program::{Program, Slot};
use headroom_engine::step::{self, Executor, Kernels, Steps};

/// Copies between host and device memory, for these checks alone: probes never stage data
/// through host memory (they generate it on the device).
pub trait Transfer: Kernels<Error = DeviceError> {
    /// The first `len` values of a buffer, as f32.
    fn read_values(&mut self, buffer: &Self::Values, len: u64) -> Result<Vec<f32>, DeviceError>;
    /// The first `len` values of a label buffer.
    fn read_u32(&mut self, buffer: &Self::U32, len: u64) -> Result<Vec<u32>, DeviceError>;
    /// The first `len` bytes of a dropout mask.
    fn read_mask(&mut self, buffer: &Self::Mask, len: u64) -> Result<Vec<u8>, DeviceError>;
    /// The first `len` places of pooling maxima.
    fn read_index(&mut self, buffer: &Self::Index, len: u64) -> Result<Vec<i64>, DeviceError>;
    /// A new buffer holding `values`, stored (rounded) as `storage`.
    fn write_values(
        &mut self,
        values: &[f32],
        storage: Storage,
    ) -> Result<Self::Values, DeviceError>;
    /// A new label buffer holding `values`.
    fn write_u32(&mut self, values: &[u32]) -> Result<Self::U32, DeviceError>;
    /// A new int64 buffer (token ids) holding `values`.
    fn write_index(&mut self, values: &[i64]) -> Result<Self::Index, DeviceError>;
}

/// Trains `steps` steps at `rows` as a probe does and returns every parameter afterwards,
/// layer by layer (weights, then biases), with the loss scale it ended with (if it scales).
pub fn trained_parameters<D: Probing + Transfer>(
    device: &mut D,
    plan: &Plan,
    rows: u64,
    steps: u32,
    seed: u64,
) -> Result<(Vec<f32>, Option<f32>), DeviceError> {
    let before = device.begin_probe()?;
    let trained = step::run_probe(device, plan, rows, Steps::exactly(steps), seed).and_then(
        |(executor, program, _)| {
            let parameters = read_parameters(device, &program, &executor)?;
            Ok((parameters, executor.loss_scale.map(|s| s.scale)))
        },
    );
    let ended = device.end_probe(before);
    let trained = trained?;
    ended?;
    Ok(trained)
}

/// Every parameter, layer by layer (weights, then biases), copied to the host.
pub fn read_parameters<D: Transfer>(
    device: &mut D,
    program: &Program,
    executor: &Executor<D>,
) -> Result<Vec<f32>, DeviceError> {
    read_all(device, &program.parameters, executor)
}

/// The buffers of `slots`, each with its length, one after another, copied to the host.
pub fn read_all<D: Transfer>(
    device: &mut D,
    slots: &[(Slot, u64)],
    executor: &Executor<D>,
) -> Result<Vec<f32>, DeviceError> {
    let mut values = Vec::new();
    for &(slot, len) in slots {
        values.extend(device.read_values(executor.values(slot), len)?);
    }
    Ok(values)
}
