//! pool.cu on the host: max, average and adaptive average pooling of NCHW batches, plane by
//! plane over every core.

use rayon::prelude::*;

use super::values::HostValues;
use super::{row_map, usize_of, HostBuffer, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::modules::adaptive_avg_pool2d::{window, AdaptivePooling};
use headroom_engine::modules::pooling::Pooling;
use headroom_engine::step::Pool;

/// The input places each window of `pool` covers in one plane (the padding left out), window by
/// window, in the window's row-major order.
fn windows(pool: &Pooling) -> Vec<Vec<usize>> {
    let (h, w, k) = (
        pool.height as usize,
        pool.width as usize,
        pool.kernel as usize,
    );
    let (oh, ow) = (pool.out_height as usize, pool.out_width as usize);
    let (stride, padding, dilation) = (
        pool.stride as usize,
        pool.padding as usize,
        pool.dilation as usize,
    );
    (0..oh * ow)
        .map(|out| {
            let (i, j) = (out / ow, out % ow);
            (0..k * k)
                .filter_map(|ab| {
                    let r = (i * stride + ab / k * dilation).checked_sub(padding)?;
                    let s = (j * stride + ab % k * dilation).checked_sub(padding)?;
                    (r < h && s < w).then_some(r * w + s)
                })
                .collect()
        })
        .collect()
}

/// Each window's divisor, as [`Pooling::divisor`] counts it.
fn divisors(pool: &Pooling) -> Vec<f32> {
    (0..pool.out_height)
        .flat_map(|i| (0..pool.out_width).map(move |j| pool.divisor(i, j) as f32))
        .collect()
}

fn plane_sizes(pool: &Pooling) -> (usize, usize) {
    (
        (pool.height * pool.width) as usize,
        (pool.out_height * pool.out_width) as usize,
    )
}

/// Max pooling of every plane: the largest value of each window (a NaN if any, the first of
/// equal ones) and its place.
pub fn max_pool_forward(x: &[f32], y: &mut [f32], indices: &mut [i64], pool: &Pooling) {
    let (plane, out_plane) = plane_sizes(pool);
    let windows = windows(pool);
    y.par_chunks_mut(out_plane)
        .zip(indices.par_chunks_mut(out_plane))
        .zip(x.par_chunks(plane))
        .for_each(|((y, indices), x)| {
            for (out, places) in windows.iter().enumerate() {
                // A dilated window may fall wholly in the padding: 0, its gradient nowhere
                // (as the kernel has it).
                let Some((&first, rest)) = places.split_first() else {
                    y[out] = 0.0;
                    indices[out] = -1;
                    continue;
                };
                let mut best = first;
                for &at in rest {
                    let (v, b) = (x[at], x[best]);
                    if v > b || (v.is_nan() && !b.is_nan()) {
                        best = at;
                    }
                }
                y[out] = x[best];
                indices[out] = best as i64;
            }
        });
}

/// Max pooling's backward: each window's gradient to the place of its maximum.
pub fn max_pool_backward(dy: &[f32], indices: &[i64], dx: &mut [f32], pool: &Pooling) {
    let (plane, out_plane) = plane_sizes(pool);
    dx.par_chunks_mut(plane)
        .zip(dy.par_chunks(out_plane).zip(indices.par_chunks(out_plane)))
        .for_each(|(dx, (dy, indices))| {
            dx.fill(0.0);
            for (&g, &at) in dy.iter().zip(indices) {
                if let Ok(at) = usize::try_from(at) {
                    dx[at] += g;
                }
            }
        });
}

/// Average pooling of every plane, each window over its divisor.
pub fn avg_pool_forward(x: &[f32], y: &mut [f32], pool: &Pooling) {
    let (plane, out_plane) = plane_sizes(pool);
    let (windows, divisors) = (windows(pool), divisors(pool));
    y.par_chunks_mut(out_plane)
        .zip(x.par_chunks(plane))
        .for_each(|(y, x)| {
            for (out, places) in windows.iter().enumerate() {
                y[out] = places.iter().map(|&at| x[at]).sum::<f32>() / divisors[out];
            }
        });
}

/// Average pooling's backward: each window's gradient over its divisor to every place it
/// covers.
pub fn avg_pool_backward(dy: &[f32], dx: &mut [f32], pool: &Pooling) {
    let (plane, out_plane) = plane_sizes(pool);
    let (windows, divisors) = (windows(pool), divisors(pool));
    dx.par_chunks_mut(plane)
        .zip(dy.par_chunks(out_plane))
        .for_each(|(dx, dy)| {
            dx.fill(0.0);
            for ((places, &g), divisor) in windows.iter().zip(dy).zip(&divisors) {
                for &at in places {
                    dx[at] += g / divisor;
                }
            }
        });
}

/// The input places of each adaptive window in one plane, window by window.
fn adaptive_windows(pool: &AdaptivePooling) -> Vec<Vec<usize>> {
    let w = pool.width;
    (0..pool.out_height)
        .flat_map(|i| (0..pool.out_width).map(move |j| (i, j)))
        .map(|(i, j)| {
            let cols = window(j, pool.out_width, w);
            window(i, pool.out_height, pool.height)
                .flat_map(|r| cols.clone().map(move |s| (r * w + s) as usize))
                .collect()
        })
        .collect()
}

/// Adaptive average pooling of every plane.
pub fn adaptive_pool_forward(x: &[f32], y: &mut [f32], pool: &AdaptivePooling) {
    let (plane, out_plane) = (
        (pool.height * pool.width) as usize,
        (pool.out_height * pool.out_width) as usize,
    );
    let windows = adaptive_windows(pool);
    y.par_chunks_mut(out_plane)
        .zip(x.par_chunks(plane))
        .for_each(|(y, x)| {
            for (out, places) in windows.iter().enumerate() {
                y[out] = places.iter().map(|&at| x[at]).sum::<f32>() / places.len() as f32;
            }
        });
}

/// Adaptive average pooling's backward: each window's gradient over its size to every place it
/// covers.
pub fn adaptive_pool_backward(dy: &[f32], dx: &mut [f32], pool: &AdaptivePooling) {
    let (plane, out_plane) = (
        (pool.height * pool.width) as usize,
        (pool.out_height * pool.out_width) as usize,
    );
    let windows = adaptive_windows(pool);
    dx.par_chunks_mut(plane)
        .zip(dy.par_chunks(out_plane))
        .for_each(|(dx, dy)| {
            dx.fill(0.0);
            for (places, &g) in windows.iter().zip(dy) {
                let share = g / places.len() as f32;
                for &at in places {
                    dx[at] += share;
                }
            }
        });
}

impl Pool for HostDevice {
    fn max_pool_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        indices: &mut HostBuffer<i64>,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((x, inputs), (y, outputs), usize_of(rows), |block, x, y| {
            let places = &mut indices[block.start * outputs..block.end * outputs];
            max_pool_forward(x, y, places, pool)
        });
        Ok(())
    }

    fn max_pool_backward(
        &mut self,
        dy: &HostValues,
        indices: &HostBuffer<i64>,
        dx: &mut HostValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map(
            (dy, outputs),
            (dx, inputs),
            usize_of(rows),
            |block, dy, dx| {
                let places = &indices[block.start * outputs..block.end * outputs];
                max_pool_backward(dy, places, dx, pool)
            },
        );
        Ok(())
    }

    fn avg_pool_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((x, inputs), (y, outputs), usize_of(rows), |_, x, y| {
            avg_pool_forward(x, y, pool)
        });
        Ok(())
    }

    fn avg_pool_backward(
        &mut self,
        dy: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((dy, outputs), (dx, inputs), usize_of(rows), |_, dy, dx| {
            avg_pool_backward(dy, dx, pool)
        });
        Ok(())
    }

    fn adaptive_pool_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        rows: u64,
        pool: &AdaptivePooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((x, inputs), (y, outputs), usize_of(rows), |_, x, y| {
            adaptive_pool_forward(x, y, pool)
        });
        Ok(())
    }

    fn adaptive_pool_backward(
        &mut self,
        dy: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        pool: &AdaptivePooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((dy, outputs), (dx, inputs), usize_of(rows), |_, dy, dx| {
            adaptive_pool_backward(dy, dx, pool)
        });
        Ok(())
    }
}
