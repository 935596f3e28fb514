//! Convolution and pooling on plain f32 slices of NCHW batches: the host's reference for
//! `kernels/conv.cu` and `kernels/pool.cu`. A convolution unfolds each sample's windows
//! (im2col, one sample at a time, so the host's scratch stays small) and multiplies with the
//! `gemm` crate; samples are spread over every core with rayon.

use rayon::prelude::*;

use headroom_engine::plan::{Convolution, Pooling};

/// Calls `tap(column, place)` for every window place that falls inside one sample's input:
/// `column` indexes the sample's windows (`positions x fan_in`, row `i * out_width + j` holding
/// output `(i, j)`'s window in the filters' order: channel, kernel row, kernel column) and
/// `place` the sample's input.
fn each_tap(conv: &Convolution, mut tap: impl FnMut(usize, usize)) {
    let (h, w, k) = (
        conv.height as usize,
        conv.width as usize,
        conv.kernel as usize,
    );
    let (oh, ow) = (conv.out_height() as usize, conv.out_width() as usize);
    let (stride, padding) = (conv.stride as usize, conv.padding as usize);
    let fan_in = conv.fan_in() as usize;
    for position in 0..oh * ow {
        let (i, j) = (position / ow, position % ow);
        for c in 0..conv.in_channels as usize {
            for a in 0..k {
                let Some(r) = (i * stride + a).checked_sub(padding).filter(|&r| r < h) else {
                    continue;
                };
                for b in 0..k {
                    let Some(s) = (j * stride + b).checked_sub(padding).filter(|&s| s < w) else {
                        continue;
                    };
                    tap(position * fan_in + (c * k + a) * k + b, (c * h + r) * w + s);
                }
            }
        }
    }
}

/// One sample's windows (padding reads 0): see [`each_tap`].
fn unfold(x: &[f32], conv: &Convolution, cols: &mut [f32]) {
    cols.fill(0.0);
    each_tap(conv, |column, place| cols[column] = x[place]);
}

/// Adds one sample's window gradients back to the places they were read from: the inverse of
/// [`unfold`].
fn fold(cols: &[f32], conv: &Convolution, dx: &mut [f32]) {
    dx.fill(0.0);
    each_tap(conv, |column, place| dx[place] += cols[column]);
}

fn sizes(conv: &Convolution) -> (usize, usize, usize, usize) {
    (
        conv.inputs() as usize,
        conv.outputs() as usize,
        (conv.out_height() * conv.out_width()) as usize,
        conv.fan_in() as usize,
    )
}

/// `y = x (*) w` for every sample of `x`.
pub fn conv2d_forward(x: &[f32], w: &[f32], y: &mut [f32], conv: &Convolution) {
    let (inputs, outputs, positions, fan_in) = sizes(conv);
    let filters = conv.out_channels as usize;
    y.par_chunks_mut(outputs)
        .zip(x.par_chunks(inputs))
        .for_each_init(
            || vec![0.0f32; positions * fan_in],
            |cols, (y, x)| {
                unfold(x, conv, cols);
                // y (filters x positions) = w (filters x fan_in) * cols^T
                super::ops::gemm(
                    filters,
                    fan_in,
                    positions,
                    w,
                    (fan_in as isize, 1),
                    cols,
                    (1, fan_in as isize),
                    y,
                    false,
                    gemm::Parallelism::None,
                );
            },
        );
}

/// The gradient of every sample's input from `dy` and the filters.
pub fn conv2d_input_gradient(dy: &[f32], w: &[f32], dx: &mut [f32], conv: &Convolution) {
    let (inputs, outputs, positions, fan_in) = sizes(conv);
    let filters = conv.out_channels as usize;
    dx.par_chunks_mut(inputs)
        .zip(dy.par_chunks(outputs))
        .for_each_init(
            || vec![0.0f32; positions * fan_in],
            |cols, (dx, dy)| {
                // cols (positions x fan_in) = dy^T (positions x filters) * w (filters x fan_in)
                super::ops::gemm(
                    positions,
                    filters,
                    fan_in,
                    dy,
                    (1, positions as isize),
                    w,
                    (fan_in as isize, 1),
                    cols,
                    false,
                    gemm::Parallelism::None,
                );
                fold(cols, conv, dx);
            },
        );
}

/// Partial sums of the filters' gradient: a fixed number of groups of samples, whatever the
/// threads, so the sum comes out the same on every run.
const WEIGHT_GRADIENT_GROUPS: usize = 16;

/// Adds the filters' gradient, summed over every sample of `dy` and `x`, to `dw`: each group of
/// samples sums into its own partial (in parallel), and the partials are added in order.
pub fn add_conv2d_weight_gradient(dy: &[f32], x: &[f32], dw: &mut [f32], conv: &Convolution) {
    let (inputs, outputs, positions, fan_in) = sizes(conv);
    let filters = conv.out_channels as usize;
    let rows = dy.len() / outputs.max(1);
    let group = rows.div_ceil(WEIGHT_GRADIENT_GROUPS).max(1);
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(group * outputs)
        .zip(x.par_chunks(group * inputs))
        .map(|(dy, x)| {
            let mut sum = vec![0.0f32; filters * fan_in];
            let mut cols = vec![0.0f32; positions * fan_in];
            for (dy, x) in dy.chunks_exact(outputs).zip(x.chunks_exact(inputs)) {
                unfold(x, conv, &mut cols);
                // sum (filters x fan_in) += dy (filters x positions) * cols (positions x fan_in)
                super::ops::gemm(
                    filters,
                    positions,
                    fan_in,
                    dy,
                    (positions as isize, 1),
                    &cols,
                    (fan_in as isize, 1),
                    &mut sum,
                    true,
                    gemm::Parallelism::None,
                );
            }
            sum
        })
        .collect();
    for partial in partials {
        dw.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
    }
}

/// The input places each window of `pool` covers in one plane, window by window, in the
/// window's row-major order.
fn windows(pool: &Pooling) -> Vec<Vec<usize>> {
    let (h, w, k) = (
        pool.height as usize,
        pool.width as usize,
        pool.kernel as usize,
    );
    let (oh, ow) = (pool.out_height() as usize, pool.out_width() as usize);
    let (stride, padding) = (pool.stride as usize, pool.padding as usize);
    (0..oh * ow)
        .map(|out| {
            let (i, j) = (out / ow, out % ow);
            (0..k * k)
                .filter_map(|ab| {
                    let r = (i * stride + ab / k).checked_sub(padding)?;
                    let s = (j * stride + ab % k).checked_sub(padding)?;
                    (r < h && s < w).then_some(r * w + s)
                })
                .collect()
        })
        .collect()
}

fn plane_sizes(pool: &Pooling) -> (usize, usize) {
    (
        (pool.height * pool.width) as usize,
        (pool.out_height() * pool.out_width()) as usize,
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
                let mut best = places[0];
                for &at in &places[1..] {
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
                dx[at as usize] += g;
            }
        });
}

/// Average pooling of every plane, padding counted in each window's `kernel x kernel`.
pub fn avg_pool_forward(x: &[f32], y: &mut [f32], pool: &Pooling) {
    let (plane, out_plane) = plane_sizes(pool);
    let area = (pool.kernel * pool.kernel) as f32;
    let windows = windows(pool);
    y.par_chunks_mut(out_plane)
        .zip(x.par_chunks(plane))
        .for_each(|(y, x)| {
            for (out, places) in windows.iter().enumerate() {
                y[out] = places.iter().map(|&at| x[at]).sum::<f32>() / area;
            }
        });
}

/// Average pooling's backward: each window's gradient over `kernel x kernel` to every place it
/// covers.
pub fn avg_pool_backward(dy: &[f32], dx: &mut [f32], pool: &Pooling) {
    let (plane, out_plane) = plane_sizes(pool);
    let area = (pool.kernel * pool.kernel) as f32;
    let windows = windows(pool);
    dx.par_chunks_mut(plane)
        .zip(dy.par_chunks(out_plane))
        .for_each(|(dx, dy)| {
            dx.fill(0.0);
            for (places, &g) in windows.iter().zip(dy) {
                for &at in places {
                    dx[at] += g;
                }
            }
            dx.iter_mut().for_each(|v| *v /= area);
        });
}
