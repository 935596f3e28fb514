//! The `host` device: the training step on the CPU, inside a byte budget, the reference every
//! kernel is checked against. It stores values as the plan's precision says and computes in
//! f32, rounding what it stores to 16 bits where the GPU does ([`values`]). One module per
//! kernel family, as `crates/devices/kernels/*.cu` has them: [`fill`], [`gemm`],
//! [`elementwise`], [`reduce`], [`conv`], [`pool`], [`norm`], [`embedding`], [`attention`],
//! [`dropout`], [`loss`], [`optimizer`].
//!
//! Every buffer is charged to a [`Ledger`] before it is allocated; a charge past the budget, or
//! an allocation the system refuses, is [`DeviceError::OutOfMemory`]. Nothing is allocated for a
//! batch that does not fit; freed buffers are kept for reuse within the budget ([`memory`]).
//! Widening 16-bit values takes scratch outside the budget: a layer's weights in f32 at most,
//! and chunks of [`values::CHUNK`] values; a convolution also unfolds a chunk of samples'
//! windows, 16 MiB or one sample's per thread ([`conv`]), attention widens one sequence
//! ([`attention`]).

pub mod attention;
pub mod conv;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod fill;
pub mod gemm;
pub mod loss;
pub mod memory;
pub mod norm;
pub mod optimizer;
pub mod pool;
pub mod reduce;
pub mod scores;
pub mod values;

use std::ops::Range;
use std::sync::Arc;

use crate::transfer::Transfer;
use headroom_engine::device::{DeviceError, DeviceInfo, DeviceKind, Probing};
use headroom_engine::plan::Storage;
use headroom_engine::step::{Allocate, Kernels, Stored};
pub use memory::HostBuffer;
use memory::Ledger;
use values::{chunks, row_blocks, HostValues};

/// Default budget of the host device: 256 MiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 256 << 20;

/// The CPU device.
#[derive(Debug, Clone)]
pub struct HostDevice {
    ledger: Arc<Ledger>,
}

impl HostDevice {
    /// A host device that may hold at most `budget_bytes` at once.
    pub fn new(budget_bytes: u64) -> HostDevice {
        HostDevice {
            ledger: Arc::new(Ledger::new(budget_bytes)),
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

pub(super) fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("host buffers are indexed by usize")
}

impl Allocate for HostDevice {
    type Values = HostValues;
    type U32 = HostBuffer<u32>;
    type Mask = HostBuffer<u8>;
    type Index = HostBuffer<i64>;
    type Error = DeviceError;

    fn zeroed(&mut self, len: u64, storage: Storage) -> Result<HostValues, DeviceError> {
        HostValues::zeroed(&self.ledger, len, storage)
    }

    fn u32_zeroed(&mut self, len: u64) -> Result<Self::U32, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }

    fn mask_zeroed(&mut self, len: u64) -> Result<Self::Mask, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }

    fn index_zeroed(&mut self, len: u64) -> Result<Self::Index, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }
}

/// Elements a rayon task takes at least: enough to outweigh handing work to another core.
pub(super) const TASK: usize = 16 * 1024;

/// Whole rows of `cols` values making up about one task.
pub(super) fn task_rows(cols: usize) -> usize {
    (TASK / cols.max(1)).max(1)
}

/// `y (rows x y_width)` from `a (rows x a_width)` by blocks of rows whose widest operand spans
/// about [`values::CHUNK`] values (one block when both are f32, which needs no widening): `op`
/// takes a block's rows, its `a` and its `y`.
pub(super) fn row_map(
    (a, a_width): (&HostValues, usize),
    (y, y_width): (&mut HostValues, usize),
    rows: usize,
    mut op: impl FnMut(Range<usize>, &[f32], &mut [f32]),
) {
    let all_f32 = a.storage() == Storage::F32 && y.storage() == Storage::F32;
    for block in row_blocks(rows, a_width.max(y_width), all_f32) {
        let a = a.read(block.start * a_width..block.end * a_width);
        y.update(block.start * y_width..block.end * y_width, |y| {
            op(block, &a, y)
        });
    }
}

/// `y (rows x y_width) = a (rows x a_width) * b` by blocks of rows ([`row_map`]), `b` (`b_len`
/// values, stored as `a` is) widened once: the forward and input-gradient products.
/// `product` takes a block's rows.
pub(super) fn row_product(
    a: (&HostValues, usize),
    (b, b_len): (&HostValues, usize),
    y: (&mut HostValues, usize),
    rows: usize,
    product: impl Fn(&[f32], &[f32], &mut [f32], usize),
) {
    let b = b.read(0..b_len);
    row_map(a, y, rows, |block, a, y| product(a, &b, y, block.len()));
}

/// `out = op(from)` element by element, a chunk at a time.
pub(super) fn map_chunks(
    from: &HostValues,
    out: &mut HostValues,
    len: u64,
    op: impl Fn(&[f32], &mut [f32]),
) {
    for range in chunks(usize_of(len), 1) {
        let from = from.read(range.clone());
        out.update(range, |out| op(&from, out));
    }
}

impl Kernels for HostDevice {
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl Transfer for HostDevice {
    fn read_values(&mut self, buffer: &HostValues, len: u64) -> Result<Vec<f32>, DeviceError> {
        Ok(buffer.read(0..usize_of(len)).into_owned())
    }

    fn read_u32(&mut self, buffer: &Self::U32, len: u64) -> Result<Vec<u32>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn read_mask(&mut self, buffer: &Self::Mask, len: u64) -> Result<Vec<u8>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn read_index(&mut self, buffer: &Self::Index, len: u64) -> Result<Vec<i64>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn write_values(
        &mut self,
        values: &[f32],
        storage: Storage,
    ) -> Result<HostValues, DeviceError> {
        let mut buffer = HostValues::zeroed(&self.ledger, values.len() as u64, storage)?;
        buffer.write(0, values);
        Ok(buffer)
    }

    fn write_u32(&mut self, values: &[u32]) -> Result<Self::U32, DeviceError> {
        HostBuffer::copied(&self.ledger, values)
    }

    fn write_index(&mut self, values: &[i64]) -> Result<Self::Index, DeviceError> {
        HostBuffer::copied(&self.ledger, values)
    }
}

impl Probing for HostDevice {
    fn describe(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Host,
            index: 0,
            name: format!(
                "host CPU ({} threads, reference)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            uuid: None,
            total_bytes: self.ledger.budget(),
            free_bytes: self.ledger.budget().saturating_sub(self.ledger.used()),
        }
    }

    fn begin_probe(&mut self) -> Result<u64, DeviceError> {
        Ok(self.ledger.restart_peak())
    }

    fn peak_bytes(&mut self) -> Result<u64, DeviceError> {
        Ok(self.ledger.peak())
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
