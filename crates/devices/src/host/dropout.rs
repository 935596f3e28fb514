//! dropout.cu on the host: the masks drawn from the counter-based stream, the same bits as on a
//! GPU.

use rayon::prelude::*;

use super::values::{chunks, HostValues};
use super::{usize_of, HostBuffer, HostDevice, TASK};
use headroom_engine::device::DeviceError;
use headroom_engine::step::DropoutKernels;
use headroom_engine::synthetic;

/// Training-mode dropout of values `first..` of a buffer: `mask[i]` is whether
/// [`synthetic::keeps`] keeps value `first + i`, `y[i] = x[i] * scale` where kept, else 0.
pub fn dropout_forward(x: &[f32], mask: &mut [u8], y: &mut [f32], first: usize, p: f32, key: u64) {
    let scale = synthetic::dropout_scale(p);
    y.par_chunks_mut(TASK)
        .zip(mask.par_chunks_mut(TASK).zip(x.par_chunks(TASK)))
        .enumerate()
        .for_each(|(n, (y, (mask, x)))| {
            let first = first + n * TASK;
            for (i, ((y, m), &x)) in y.iter_mut().zip(mask).zip(x).enumerate() {
                let kept = synthetic::keeps(key, (first + i) as u64, p);
                *m = u8::from(kept);
                *y = if kept { x * scale } else { 0.0 };
            }
        });
}

/// Dropout's backward: `dx[i] = dy[i] * scale` where `mask[i]` kept, else 0.
pub fn dropout_backward(dy: &[f32], mask: &[u8], dx: &mut [f32], p: f32) {
    let scale = synthetic::dropout_scale(p);
    dx.par_chunks_mut(TASK)
        .zip(dy.par_chunks(TASK).zip(mask.par_chunks(TASK)))
        .for_each(|(dx, (dy, mask))| {
            for ((d, &g), &m) in dx.iter_mut().zip(dy).zip(mask) {
                *d = if m != 0 { g * scale } else { 0.0 };
            }
        });
}

impl DropoutKernels for HostDevice {
    fn dropout_forward(
        &mut self,
        x: &HostValues,
        mask: &mut HostBuffer<u8>,
        y: &mut HostValues,
        len: u64,
        p: f32,
        key: u64,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let x = x.read(range.clone());
            let mask = &mut mask[range.clone()];
            y.update(range.clone(), |y| {
                dropout_forward(&x, mask, y, range.start, p, key)
            });
        }
        Ok(())
    }

    fn dropout_backward(
        &mut self,
        dy: &HostValues,
        mask: &HostBuffer<u8>,
        dx: &mut HostValues,
        len: u64,
        p: f32,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let dy = dy.read(range.clone());
            let mask = &mask[range.clone()];
            dx.update(range, |dx| dropout_backward(&dy, mask, dx, p));
        }
        Ok(())
    }
}
