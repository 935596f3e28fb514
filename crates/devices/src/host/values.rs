//! Host buffers of values in any [`Storage`], and the f32 views the operations work on: an f32
//! buffer lends its own memory, a 16-bit one is widened a chunk at a time (exactly: every bf16
//! and f16 value is an f32) and what an operation writes is rounded back to nearest, ties to
//! even, as the CUDA kernels round (`kernels/storage.cuh`). Scratch stays small: a chunk of at
//! most [`CHUNK`] values.

use std::borrow::Cow;
use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{HostBuffer, Ledger};
use headroom_engine::device::DeviceError;
use headroom_engine::plan::Storage;
use headroom_engine::step::Stored;

/// Values widened at a time from 16-bit storage.
pub const CHUNK: usize = 1 << 16;

/// A host buffer of values, stored as its variant says.
#[derive(Debug)]
pub enum HostValues {
    /// f32 values.
    F32(HostBuffer<f32>),
    /// bfloat16 values.
    Bf16(HostBuffer<bf16>),
    /// IEEE half values.
    F16(HostBuffer<f16>),
}

impl Stored for HostValues {
    fn storage(&self) -> Storage {
        match self {
            HostValues::F32(_) => Storage::F32,
            HostValues::Bf16(_) => Storage::Bf16,
            HostValues::F16(_) => Storage::F16,
        }
    }
}

impl HostValues {
    pub(super) fn zeroed(
        ledger: &std::sync::Arc<Ledger>,
        len: u64,
        storage: Storage,
    ) -> Result<HostValues, DeviceError> {
        Ok(match storage {
            Storage::F32 => HostValues::F32(HostBuffer::zeroed(ledger, len)?),
            Storage::Bf16 => HostValues::Bf16(HostBuffer::zeroed(ledger, len)?),
            Storage::F16 => HostValues::F16(HostBuffer::zeroed(ledger, len)?),
        })
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        match self {
            HostValues::F32(values) => values.len(),
            HostValues::Bf16(values) => values.len(),
            HostValues::F16(values) => values.len(),
        }
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every value, as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.read(0..self.len()).into_owned()
    }

    /// The values in `range` as f32: borrowed when stored as f32, widened otherwise.
    pub fn read(&self, range: Range<usize>) -> Cow<'_, [f32]> {
        match self {
            HostValues::F32(values) => Cow::Borrowed(&values[range]),
            HostValues::Bf16(values) => Cow::Owned(values[range].to_f32_vec()),
            HostValues::F16(values) => Cow::Owned(values[range].to_f32_vec()),
        }
    }

    /// Lets `change` work on the values in `range` as f32, then stores them rounded.
    pub fn update<R>(&mut self, range: Range<usize>, change: impl FnOnce(&mut [f32]) -> R) -> R {
        match self {
            HostValues::F32(values) => change(&mut values[range]),
            HostValues::Bf16(values) => {
                let mut wide = values[range.clone()].to_f32_vec();
                let result = change(&mut wide);
                values[range].convert_from_f32_slice(&wide);
                result
            }
            HostValues::F16(values) => {
                let mut wide = values[range.clone()].to_f32_vec();
                let result = change(&mut wide);
                values[range].convert_from_f32_slice(&wide);
                result
            }
        }
    }

    /// Stores `values` (rounded) from index `at`.
    pub fn write(&mut self, at: usize, values: &[f32]) {
        self.update(at..at + values.len(), |out| out.copy_from_slice(values));
    }
}

/// `0..len` in ranges of about [`CHUNK`] values, each a whole number of `align`-long rows.
pub fn chunks(len: usize, align: usize) -> impl Iterator<Item = Range<usize>> {
    let align = align.max(1);
    let step = (CHUNK / align).max(1) * align;
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// Rows `0..rows` in blocks whose widest operand (`width` values a row) spans about [`CHUNK`]
/// values; one block when every operand is f32, which needs no widening.
pub fn row_blocks(rows: usize, width: usize, all_f32: bool) -> impl Iterator<Item = Range<usize>> {
    let step = if all_f32 {
        rows.max(1)
    } else {
        (CHUNK / width.max(1)).max(1)
    };
    (0..rows)
        .step_by(step)
        .map(move |start| start..(start + step).min(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_range_in_whole_rows() {
        for (len, align) in [(0, 7), (1, 1), (CHUNK * 3 + 5, 10), (1000, 3000)] {
            let ranges: Vec<Range<usize>> = chunks(len, align).collect();
            assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), len);
            for r in &ranges[..ranges.len().saturating_sub(1)] {
                assert_eq!(r.len() % align, 0, "{r:?}");
            }
        }
        let blocks: Vec<_> = row_blocks(10, 100_000, false).collect();
        assert_eq!(blocks.len(), 10);
        assert_eq!(row_blocks(10, 100_000, true).count(), 1);
    }

    #[test]
    fn sixteen_bit_values_round_to_nearest_even_when_written() {
        let ledger = std::sync::Arc::new(Ledger::new(1 << 20));
        let mut values = HostValues::zeroed(&ledger, 3, Storage::Bf16).unwrap();
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one, 1.
        values.write(0, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::MAX]);
        assert_eq!(
            &values.read(0..3)[..],
            &[1.0, 1.0 + 4.0 / 256.0, f32::INFINITY]
        );
        let mut halves = HostValues::zeroed(&ledger, 2, Storage::F16).unwrap();
        halves.write(0, &[65520.0, 65519.0]);
        assert_eq!(&halves.read(0..2)[..], &[f32::INFINITY, 65504.0]);
    }
}
