//! The `host` device: the training step on the CPU in f32, inside a byte budget.
//!
//! Every buffer is charged to a [`Ledger`] before it is allocated; a charge past the budget, or
//! an allocation the system refuses, is [`DeviceError::OutOfMemory`]. Nothing is allocated for a
//! batch that does not fit.

pub mod ops;

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::device::{DeviceError, DeviceInfo, DeviceKind, Probing};
use crate::parity::Transfer;
use crate::plan::Activation;
use crate::step::{Allocate, Kernels, OptimizerState, UpdateRule};
use crate::synthetic;

/// Default budget of the host device: 256 MiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 256 << 20;

/// Bytes charged against a budget.
#[derive(Debug)]
pub struct Ledger {
    budget: u64,
    used: AtomicU64,
}

impl Ledger {
    fn charge(&self, bytes: u64) -> Result<(), DeviceError> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= self.budget)
            })
            .map(|_| ())
            .map_err(|used| DeviceError::OutOfMemory {
                requested_bytes: bytes,
                free_bytes: self.budget.saturating_sub(used),
            })
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

/// A zeroed host buffer whose bytes stay charged to the ledger until it is dropped.
#[derive(Debug)]
pub struct HostBuffer<T> {
    data: Vec<T>,
    ledger: Arc<Ledger>,
}

impl<T: Copy + Default> HostBuffer<T> {
    fn zeroed(ledger: &Arc<Ledger>, len: u64) -> Result<Self, DeviceError> {
        let bytes =
            len.checked_mul(std::mem::size_of::<T>() as u64)
                .ok_or(DeviceError::OutOfMemory {
                    requested_bytes: u64::MAX,
                    free_bytes: ledger.budget.saturating_sub(ledger.used()),
                })?;
        ledger.charge(bytes)?;
        let refused = DeviceError::OutOfMemory {
            requested_bytes: bytes,
            free_bytes: ledger.budget.saturating_sub(ledger.used()),
        };
        let Ok(len) = usize::try_from(len) else {
            ledger.release(bytes);
            return Err(refused);
        };
        let mut data = Vec::new();
        if data.try_reserve_exact(len).is_err() {
            ledger.release(bytes);
            return Err(refused);
        }
        data.resize(len, T::default());
        Ok(HostBuffer {
            data,
            ledger: Arc::clone(ledger),
        })
    }
}

impl<T: Copy + Default> HostBuffer<T> {
    fn copied(ledger: &Arc<Ledger>, values: &[T]) -> Result<Self, DeviceError> {
        let mut buffer = HostBuffer::zeroed(ledger, values.len() as u64)?;
        buffer.copy_from_slice(values);
        Ok(buffer)
    }
}

impl<T> Drop for HostBuffer<T> {
    fn drop(&mut self) {
        self.ledger
            .release((self.data.len() * std::mem::size_of::<T>()) as u64);
    }
}

impl<T> Deref for HostBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T> DerefMut for HostBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

/// The CPU device.
#[derive(Debug, Clone)]
pub struct HostDevice {
    ledger: Arc<Ledger>,
}

impl HostDevice {
    /// A host device that may hold at most `budget_bytes` at once.
    pub fn new(budget_bytes: u64) -> HostDevice {
        HostDevice {
            ledger: Arc::new(Ledger {
                budget: budget_bytes,
                used: AtomicU64::new(0),
            }),
        }
    }

    /// Bytes charged right now (zero between probes).
    pub fn used_bytes(&self) -> u64 {
        self.ledger.used()
    }
}

impl Default for HostDevice {
    fn default() -> Self {
        HostDevice::new(DEFAULT_BUDGET_BYTES)
    }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("host buffers are indexed by usize")
}

impl Allocate for HostDevice {
    type F32 = HostBuffer<f32>;
    type U32 = HostBuffer<u32>;
    type Error = DeviceError;

    fn f32_zeroed(&mut self, len: u64) -> Result<Self::F32, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }

    fn u32_zeroed(&mut self, len: u64) -> Result<Self::U32, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }
}

impl Kernels for HostDevice {
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn fill_uniform(
        &mut self,
        out: &mut Self::F32,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        synthetic::fill_uniform(&mut out[..usize_of(len)], key, scale);
        Ok(())
    }

    fn fill_labels(
        &mut self,
        labels: &mut Self::U32,
        inputs: &Self::F32,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (rows, features) = (usize_of(rows), usize_of(features));
        synthetic::fill_labels(
            &mut labels[..rows],
            &inputs[..rows * features],
            features,
            usize_of(classes),
        );
        Ok(())
    }

    fn linear_forward(
        &mut self,
        x: &Self::F32,
        w: &Self::F32,
        y: &mut Self::F32,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        ops::linear_forward(x, w, y, usize_of(rows), usize_of(inputs), usize_of(outputs));
        Ok(())
    }

    fn weight_gradient(
        &mut self,
        dy: &Self::F32,
        x: &Self::F32,
        dw: &mut Self::F32,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        ops::weight_gradient(
            dy,
            x,
            dw,
            usize_of(rows),
            usize_of(inputs),
            usize_of(outputs),
        );
        Ok(())
    }

    fn input_gradient(
        &mut self,
        dy: &Self::F32,
        w: &Self::F32,
        dx: &mut Self::F32,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        ops::input_gradient(
            dy,
            w,
            dx,
            usize_of(rows),
            usize_of(inputs),
            usize_of(outputs),
        );
        Ok(())
    }

    fn bias_activation(
        &mut self,
        pre: &mut Self::F32,
        bias: &Self::F32,
        post: Option<&mut Self::F32>,
        rows: u64,
        cols: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let len = usize_of(rows * cols);
        ops::bias_activation(
            &mut pre[..len],
            bias,
            post.map(|p| &mut p[..len]),
            usize_of(cols),
            activation,
        );
        Ok(())
    }

    fn activation_backward(
        &mut self,
        grad_post: &Self::F32,
        pre: &mut Self::F32,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let len = usize_of(len);
        ops::activation_backward(&grad_post[..len], &mut pre[..len], activation);
        Ok(())
    }

    fn bias_gradient(
        &mut self,
        dy: &Self::F32,
        db: &mut Self::F32,
        rows: u64,
        cols: u64,
    ) -> Result<(), DeviceError> {
        ops::bias_gradient(&dy[..usize_of(rows * cols)], db, usize_of(cols));
        Ok(())
    }

    fn softmax_cross_entropy(
        &mut self,
        logits: &mut Self::F32,
        labels: &Self::U32,
        row_loss: &mut Self::F32,
        rows: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let rows = usize_of(rows);
        ops::softmax_cross_entropy(
            &mut logits[..rows * usize_of(classes)],
            &labels[..rows],
            &mut row_loss[..rows],
            usize_of(classes),
        );
        Ok(())
    }

    fn mean(
        &mut self,
        values: &Self::F32,
        len: u64,
        accumulator: &mut Self::F32,
    ) -> Result<f32, DeviceError> {
        accumulator[0] = ops::mean(&values[..usize_of(len)]);
        Ok(accumulator[0])
    }

    fn optimizer_step(
        &mut self,
        param: &mut Self::F32,
        grad: &Self::F32,
        state: &mut OptimizerState<Self::F32>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        let len = usize_of(len);
        let state = match state {
            OptimizerState::Sgd => OptimizerState::Sgd,
            OptimizerState::Momentum { velocity } => OptimizerState::Momentum {
                velocity: &mut velocity[..len],
            },
            OptimizerState::Adam { m, v } => OptimizerState::Adam {
                m: &mut m[..len],
                v: &mut v[..len],
            },
        };
        ops::optimizer_step(&mut param[..len], &grad[..len], state, rule);
        Ok(())
    }
}

impl Transfer for HostDevice {
    fn read_f32(&mut self, buffer: &Self::F32, len: u64) -> Result<Vec<f32>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn read_u32(&mut self, buffer: &Self::U32, len: u64) -> Result<Vec<u32>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn write_f32(&mut self, values: &[f32]) -> Result<Self::F32, DeviceError> {
        HostBuffer::copied(&self.ledger, values)
    }

    fn write_u32(&mut self, values: &[u32]) -> Result<Self::U32, DeviceError> {
        HostBuffer::copied(&self.ledger, values)
    }
}

impl Probing for HostDevice {
    fn describe(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Host,
            index: 0,
            name: format!(
                "host CPU ({} threads, f32 reference)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            uuid: None,
            total_bytes: self.ledger.budget,
            free_bytes: self.ledger.budget.saturating_sub(self.ledger.used()),
        }
    }

    fn begin_probe(&mut self) -> Result<u64, DeviceError> {
        Ok(self.ledger.used())
    }

    fn held_bytes(&mut self) -> Result<u64, DeviceError> {
        Ok(self.ledger.used())
    }

    fn end_probe(&mut self, before: u64) -> Result<(), DeviceError> {
        match self.ledger.used() {
            used if used == before => Ok(()),
            used => Err(DeviceError::Fault(format!(
                "the host ledger holds {used} bytes after the probe, {before} before"
            ))),
        }
    }
}

/// This machine's physical memory, where the platform tells (Linux's `/proc/meminfo`).
pub fn system_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests;
