//! conv.cu on the host: convolutions of NCHW batches with groups and dilation. Each sample's
//! windows are unfolded group by group (im2col, in runs of contiguous columns, one sample at a
//! time, so the host's scratch stays small) and multiplied with the `gemm` crate; samples are
//! spread over every core with rayon. The filters' gradient sums fixed groups of samples, so every run adds in the same
//! order.

use rayon::prelude::*;

use super::gemm::gemm;
use super::values::{row_blocks, HostValues};
use super::{row_product, usize_of, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::modules::conv2d::Convolution;
use headroom_engine::plan::Storage;
use headroom_engine::step::{Conv, Stored};

/// One sample's sizes: input and output values, output positions, a group's window (`fan_in`),
/// input channels and filters per group.
struct Sizes {
    inputs: usize,
    outputs: usize,
    positions: usize,
    fan_in: usize,
    channels: usize,
    filters: usize,
}

impl Sizes {
    fn of(conv: &Convolution) -> Sizes {
        let groups = conv.groups as usize;
        Sizes {
            inputs: conv.inputs() as usize,
            outputs: conv.outputs() as usize,
            positions: conv.spatial() as usize,
            fan_in: conv.fan_in() as usize,
            channels: conv.in_channels as usize / groups,
            filters: conv.out_channels as usize / groups,
        }
    }
}

/// The output columns `j` of one kernel column whose input column `j * stride + offset` falls
/// inside `0..width`: the first and one past the last.
fn inside(offset: isize, stride: usize, width: usize, out_width: usize) -> (usize, usize) {
    let stride = stride as isize;
    let first = if offset >= 0 {
        0
    } else {
        (-offset + stride - 1) / stride
    };
    let end = (width as isize - offset + stride - 1)
        .div_euclid(stride)
        .max(0);
    let end = (end as usize).min(out_width);
    (first as usize, end.max(first as usize))
}

/// Calls `run(column, place, len)` for every run of window places of group `group` that falls
/// inside one sample's input. The group's windows are `fan_in x positions` (im2col's layout:
/// row `(channel, kernel row, kernel column)` in the filters' order, column `i * out_width + j`
/// for output `(i, j)`); a run is `len` consecutive columns from `column`, reading the input
/// from `place` every `stride` values.
fn each_run(conv: &Convolution, group: usize, mut run: impl FnMut(usize, usize, usize)) {
    let (h, w, k) = (
        conv.height as usize,
        conv.width as usize,
        conv.kernel as usize,
    );
    let (oh, ow) = (conv.out_height() as usize, conv.out_width() as usize);
    let (stride, padding, dilation) = (
        conv.stride as usize,
        conv.padding as isize,
        conv.dilation as usize,
    );
    let sizes = Sizes::of(conv);
    for g in 0..sizes.channels {
        let c = group * sizes.channels + g;
        for a in 0..k {
            for b in 0..k {
                let row = ((g * k + a) * k + b) * sizes.positions;
                let offset = (b * dilation) as isize - padding;
                let (first, end) = inside(offset, stride, w, ow);
                for i in 0..oh {
                    let r = (i * stride + a * dilation) as isize - padding;
                    if r < 0 || r >= h as isize || first == end {
                        continue;
                    }
                    let s = (first * stride) as isize + offset;
                    run(
                        row + i * ow + first,
                        (c * h + r as usize) * w + s as usize,
                        end - first,
                    );
                }
            }
        }
    }
}

/// One sample's windows of `group` (padding reads 0): see [`each_run`].
fn unfold(x: &[f32], conv: &Convolution, group: usize, cols: &mut [f32]) {
    let stride = conv.stride as usize;
    cols.fill(0.0);
    each_run(conv, group, |column, place, len| {
        let cols = &mut cols[column..column + len];
        if stride == 1 {
            cols.copy_from_slice(&x[place..place + len]);
        } else {
            let x = x[place..].iter().step_by(stride);
            cols.iter_mut().zip(x).for_each(|(c, &x)| *c = x);
        }
    });
}

/// Adds one sample's window gradients of `group` back to the places they were read from: the
/// inverse of [`unfold`].
fn fold(cols: &[f32], conv: &Convolution, group: usize, dx: &mut [f32]) {
    let stride = conv.stride as usize;
    each_run(conv, group, |column, place, len| {
        let cols = &cols[column..column + len];
        let dx = dx[place..].iter_mut().step_by(stride);
        dx.zip(cols).for_each(|(d, &c)| *d += c);
    });
}

/// `y = x (*) w` for every sample of `x`.
pub fn conv2d_forward(x: &[f32], w: &[f32], y: &mut [f32], conv: &Convolution) {
    let s = Sizes::of(conv);
    y.par_chunks_mut(s.outputs)
        .zip(x.par_chunks(s.inputs))
        .for_each_init(
            || vec![0.0f32; s.positions * s.fan_in],
            |cols, (y, x)| {
                for group in 0..conv.groups as usize {
                    unfold(x, conv, group, cols);
                    // y_g (filters x positions) = w_g (filters x fan_in) * cols
                    let w = &w[group * s.filters * s.fan_in..];
                    let y = &mut y[group * s.filters * s.positions..];
                    gemm(
                        s.filters,
                        s.fan_in,
                        s.positions,
                        w,
                        (s.fan_in as isize, 1),
                        cols,
                        (s.positions as isize, 1),
                        y,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
}

/// The gradient of every sample's input from `dy` and the filters.
pub fn conv2d_input_gradient(dy: &[f32], w: &[f32], dx: &mut [f32], conv: &Convolution) {
    let s = Sizes::of(conv);
    dx.par_chunks_mut(s.inputs)
        .zip(dy.par_chunks(s.outputs))
        .for_each_init(
            || vec![0.0f32; s.positions * s.fan_in],
            |cols, (dx, dy)| {
                dx.fill(0.0);
                for group in 0..conv.groups as usize {
                    // cols (fan_in x positions) = w_g^T (fan_in x filters) * dy_g
                    let dy = &dy[group * s.filters * s.positions..];
                    let w = &w[group * s.filters * s.fan_in..];
                    gemm(
                        s.fan_in,
                        s.filters,
                        s.positions,
                        w,
                        (1, s.fan_in as isize),
                        dy,
                        (s.positions as isize, 1),
                        cols,
                        false,
                        gemm::Parallelism::None,
                    );
                    fold(cols, conv, group, dx);
                }
            },
        );
}

/// Partial sums of the filters' gradient: a fixed number of groups of samples, whatever the
/// threads, so the sum comes out the same on every run.
const WEIGHT_GRADIENT_GROUPS: usize = 16;

/// Adds the filters' gradient, summed over every sample of `dy` and `x`, to `dw`: each group of
/// samples sums into its own partial (in parallel), and the partials are added in order.
pub fn add_conv2d_weight_gradient(dy: &[f32], x: &[f32], dw: &mut [f32], conv: &Convolution) {
    let s = Sizes::of(conv);
    let rows = dy.len() / s.outputs.max(1);
    let chunk = rows.div_ceil(WEIGHT_GRADIENT_GROUPS).max(1);
    let groups = conv.groups as usize;
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(chunk * s.outputs)
        .zip(x.par_chunks(chunk * s.inputs))
        .map(|(dy, x)| {
            let mut sum = vec![0.0f32; dw.len()];
            let mut cols = vec![0.0f32; s.positions * s.fan_in];
            for (dy, x) in dy.chunks_exact(s.outputs).zip(x.chunks_exact(s.inputs)) {
                for group in 0..groups {
                    unfold(x, conv, group, &mut cols);
                    // sum_g (filters x fan_in) += dy_g (filters x positions) * cols^T
                    let dy = &dy[group * s.filters * s.positions..];
                    let sum = &mut sum[group * s.filters * s.fan_in..];
                    gemm(
                        s.filters,
                        s.positions,
                        s.fan_in,
                        dy,
                        (s.positions as isize, 1),
                        &cols,
                        (1, s.positions as isize),
                        sum,
                        true,
                        gemm::Parallelism::None,
                    );
                }
            }
            sum
        })
        .collect();
    for partial in partials {
        dw.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
    }
}

impl Conv for HostDevice {
    fn conv2d_forward(
        &mut self,
        x: &HostValues,
        w: &HostValues,
        y: &mut HostValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(conv.inputs()), usize_of(conv.outputs()));
        row_product(
            (x, inputs),
            (w, usize_of(conv.weights())),
            (y, outputs),
            usize_of(rows),
            |x, w, y, _| conv2d_forward(x, w, y, conv),
        );
        Ok(())
    }

    fn conv2d_input_gradient(
        &mut self,
        dy: &HostValues,
        w: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(conv.inputs()), usize_of(conv.outputs()));
        row_product(
            (dy, outputs),
            (w, usize_of(conv.weights())),
            (dx, inputs),
            usize_of(rows),
            |dy, w, dx, _| conv2d_input_gradient(dy, w, dx, conv),
        );
        Ok(())
    }

    fn conv2d_weight_gradient(
        &mut self,
        dy: &HostValues,
        x: &HostValues,
        dw: &mut HostValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(conv.inputs()), usize_of(conv.outputs()));
        let all_f32 = dy.storage() == Storage::F32 && x.storage() == Storage::F32;
        // The sum over samples, by blocks, in f32; rounded once at the end.
        let mut sum = vec![0.0f32; usize_of(conv.weights())];
        for block in row_blocks(usize_of(rows), inputs.max(outputs), all_f32) {
            let dy = dy.read(block.start * outputs..block.end * outputs);
            let x = x.read(block.start * inputs..block.end * inputs);
            add_conv2d_weight_gradient(&dy, &x, &mut sum, conv);
        }
        dw.write(0, &sum);
        Ok(())
    }
}
