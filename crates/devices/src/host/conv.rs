//! conv.cu on the host: convolutions of NCHW batches with groups and dilation, as products over
//! many samples at once. A chunk of samples (as many as [`UNFOLD_VALUES`] of unfolded windows
//! hold) has its windows unfolded side by side, group by group (im2col, in runs of contiguous
//! columns), and each pass is one product over the chunk in the `gemm` crate, spread over every
//! core; the unfolding, folding and the copies between a group's planes and the batch's layout
//! run in parallel too. The chunks never depend on the threads, so every run adds alike.

use rayon::prelude::*;

use super::gemm::{gemm, parallelism, Parallelism};
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

/// A convolution's geometry in host sizes, read once per pass.
struct Windows {
    height: usize,
    width: usize,
    kernel: usize,
    out_height: usize,
    out_width: usize,
    stride: usize,
    padding: isize,
    dilation: usize,
    channels: usize,
}

impl Windows {
    fn of(conv: &Convolution) -> Windows {
        Windows {
            height: conv.height as usize,
            width: conv.width as usize,
            kernel: conv.kernel as usize,
            out_height: conv.out_height() as usize,
            out_width: conv.out_width() as usize,
            stride: conv.stride as usize,
            padding: conv.padding as isize,
            dilation: conv.dilation as usize,
            channels: Sizes::of(conv).channels,
        }
    }

    /// Calls `run(column, place, len)` for every run of row `row` of group `group`'s windows
    /// that falls inside one sample's input. The windows are im2col's: row `(channel, kernel
    /// row, kernel column)` in the filters' order, column `i * out_width + j` for output
    /// `(i, j)`; a run is `len` consecutive columns from `column`, reading the input from
    /// `place` every `stride` values.
    fn row_runs(&self, group: usize, row: usize, mut run: impl FnMut(usize, usize, usize)) {
        let (h, w, k, ow) = (self.height, self.width, self.kernel, self.out_width);
        let (g, a, b) = (row / (k * k), row / k % k, row % k);
        let c = group * self.channels + g;
        let offset = (b * self.dilation) as isize - self.padding;
        let (first, end) = inside(offset, self.stride, w, ow);
        if first == end {
            return;
        }
        for i in 0..self.out_height {
            let r = (i * self.stride + a * self.dilation) as isize - self.padding;
            if r < 0 || r >= h as isize {
                continue;
            }
            let s = (first * self.stride) as isize + offset;
            run(
                i * ow + first,
                (c * h + r as usize) * w + s as usize,
                end - first,
            );
        }
    }
}

/// Output positions a chunk's product should have at least: samples are unfolded together
/// until their windows reach this many columns, enough for the product's tiles.
const CHUNK_COLUMNS: usize = 512;

/// Values a chunk's unfolded windows may take beyond one sample's: 4 Mi (16 MiB of f32).
const UNFOLD_VALUES: usize = 1 << 22;

/// Partial sums of the filters' gradient: a fixed number, whatever the threads.
const WEIGHT_GRADIENT_GROUPS: usize = 4;

/// Samples unfolded together: enough for [`CHUNK_COLUMNS`] within [`UNFOLD_VALUES`], at least
/// one. It depends on the layer alone, never on the threads.
fn samples_per_chunk(s: &Sizes) -> usize {
    let wanted = CHUNK_COLUMNS.div_ceil(s.positions.max(1));
    let room = UNFOLD_VALUES / (s.fan_in * s.positions).max(1);
    wanted.min(room).max(1)
}

/// One thread's scratch: a chunk's unfolded windows and one group's output planes side by side.
#[derive(Default)]
struct Scratch {
    cols: Vec<f32>,
    side: Vec<f32>,
}

impl Scratch {
    /// Sized for `samples` samples.
    fn sized(&mut self, s: &Sizes, samples: usize) -> (&mut [f32], &mut [f32]) {
        self.cols.resize(s.fan_in * samples * s.positions, 0.0);
        self.side.resize(s.filters * samples * s.positions, 0.0);
        (&mut self.cols, &mut self.side)
    }
}

/// The windows of `group` for every sample of `x` side by side (padding reads 0): row `r` of
/// sample `n` at `cols[r * ld + n * positions..]`, `ld` being the samples times `positions`
/// (see [`Windows::row_runs`]).
fn unfold(x: &[f32], conv: &Convolution, group: usize, cols: &mut [f32]) {
    let (s, windows) = (Sizes::of(conv), Windows::of(conv));
    let stride = conv.stride as usize;
    let samples = x.len() / s.inputs;
    let rows = cols.par_chunks_exact_mut(samples * s.positions);
    rows.enumerate().for_each(|(row, cols)| {
        cols.fill(0.0);
        for (x, cols) in x
            .chunks_exact(s.inputs)
            .zip(cols.chunks_exact_mut(s.positions))
        {
            windows.row_runs(group, row, |column, place, len| {
                let cols = &mut cols[column..column + len];
                if stride == 1 {
                    cols.copy_from_slice(&x[place..place + len]);
                } else {
                    let x = x[place..].iter().step_by(stride);
                    cols.iter_mut().zip(x).for_each(|(c, &x)| *c = x);
                }
            });
        }
    });
}

/// Adds the window gradients `cols` (laid out as [`unfold`] lays them) of `group` back to the
/// places every sample read them from: the inverse of [`unfold`].
fn fold(cols: &[f32], conv: &Convolution, group: usize, dx: &mut [f32]) {
    let (s, windows) = (Sizes::of(conv), Windows::of(conv));
    let stride = conv.stride as usize;
    let ld = dx.len() / s.inputs * s.positions;
    dx.par_chunks_exact_mut(s.inputs)
        .enumerate()
        .for_each(|(n, dx)| {
            for row in 0..s.fan_in {
                let cols = &cols[row * ld + n * s.positions..][..s.positions];
                windows.row_runs(group, row, |column, place, len| {
                    let cols = &cols[column..column + len];
                    if stride == 1 {
                        let dx = &mut dx[place..place + len];
                        dx.iter_mut().zip(cols).for_each(|(d, &c)| *d += c);
                    } else {
                        let dx = dx[place..].iter_mut().step_by(stride);
                        dx.zip(cols).for_each(|(d, &c)| *d += c);
                    }
                });
            }
        });
}

/// Group `group`'s output planes of a chunk of samples: in place when the chunk is one sample
/// (its planes are already side by side), else copied from `batch` into `side`, plane `f` of
/// sample `n` at `side[f * ld + n * positions..]`, `ld` being the samples times `positions`.
fn side_by_side<'a>(batch: &'a [f32], side: &'a mut [f32], s: &Sizes, group: usize) -> &'a [f32] {
    let samples = batch.len() / s.outputs;
    let planes = group * s.filters * s.positions;
    if samples == 1 {
        return &batch[planes..][..s.filters * s.positions];
    }
    let rows = side.par_chunks_exact_mut(samples * s.positions);
    rows.enumerate().for_each(|(f, row)| {
        for (n, to) in row.chunks_exact_mut(s.positions).enumerate() {
            let from = n * s.outputs + planes + f * s.positions;
            to.copy_from_slice(&batch[from..][..s.positions]);
        }
    });
    side
}

/// Writes group `group`'s output planes of every sample of `batch` from `side` (laid out as
/// [`side_by_side`] lays them).
fn scatter(side: &[f32], batch: &mut [f32], s: &Sizes, group: usize) {
    let ld = batch.len() / s.outputs * s.positions;
    let samples = batch.par_chunks_exact_mut(s.outputs);
    samples.enumerate().for_each(|(n, sample)| {
        let sample = &mut sample[group * s.filters * s.positions..];
        for (f, plane) in sample
            .chunks_exact_mut(s.positions)
            .take(s.filters)
            .enumerate()
        {
            plane.copy_from_slice(&side[f * ld + n * s.positions..][..s.positions]);
        }
    });
}

/// Calls `pass(out, from, scratch, parallelism)` on each chunk of samples ([`samples_per_chunk`])
/// of `out` (`out_len` values a sample) and `from` (`from_len`): chunks over every core when
/// there are enough of them, else one after another with each product over every core.
fn each_chunk(
    (out, out_len): (&mut [f32], usize),
    (from, from_len): (&[f32], usize),
    s: &Sizes,
    pass: impl Fn(&mut [f32], &[f32], &mut Scratch, Parallelism) + Sync,
) {
    let samples = samples_per_chunk(s);
    let (out_chunk, from_chunk) = (samples * out_len, samples * from_len);
    if out.len().div_ceil(out_chunk) >= rayon::current_num_threads() {
        out.par_chunks_mut(out_chunk)
            .zip(from.par_chunks(from_chunk))
            .for_each_init(Scratch::default, |scratch, (out, from)| {
                pass(out, from, scratch, Parallelism::None)
            });
    } else {
        let mut scratch = Scratch::default();
        for (out, from) in out.chunks_mut(out_chunk).zip(from.chunks(from_chunk)) {
            pass(out, from, &mut scratch, parallelism());
        }
    }
}

/// `y = x (*) w` for every sample of `x`: per chunk of samples and group, the windows unfolded
/// side by side and one product over the chunk.
pub fn conv2d_forward(x: &[f32], w: &[f32], y: &mut [f32], conv: &Convolution) {
    let s = Sizes::of(conv);
    each_chunk(
        (y, s.outputs),
        (x, s.inputs),
        &s,
        |y, x, scratch, threads| {
            let n = x.len() / s.inputs;
            let (cols, side) = scratch.sized(&s, n);
            for group in 0..conv.groups as usize {
                unfold(x, conv, group, cols);
                let planes = group * s.filters * s.positions;
                // side (filters x n positions) = w_g (filters x fan_in) * cols
                let out = match n {
                    1 => &mut y[planes..],
                    _ => &mut *side,
                };
                gemm(
                    s.filters,
                    s.fan_in,
                    n * s.positions,
                    &w[group * s.filters * s.fan_in..],
                    (s.fan_in as isize, 1),
                    cols,
                    ((n * s.positions) as isize, 1),
                    out,
                    false,
                    threads,
                );
                if n > 1 {
                    scatter(side, y, &s, group);
                }
            }
        },
    );
}

/// The gradient of every sample's input from `dy` and the filters.
pub fn conv2d_input_gradient(dy: &[f32], w: &[f32], dx: &mut [f32], conv: &Convolution) {
    let s = Sizes::of(conv);
    each_chunk(
        (dx, s.inputs),
        (dy, s.outputs),
        &s,
        |dx, dy, scratch, threads| {
            let n = dx.len() / s.inputs;
            let (cols, side) = scratch.sized(&s, n);
            dx.fill(0.0);
            for group in 0..conv.groups as usize {
                let dy = side_by_side(dy, side, &s, group);
                // cols (fan_in x n positions) = w_g^T (fan_in x filters) * dy
                gemm(
                    s.fan_in,
                    s.filters,
                    n * s.positions,
                    &w[group * s.filters * s.fan_in..],
                    (1, s.fan_in as isize),
                    dy,
                    ((n * s.positions) as isize, 1),
                    cols,
                    false,
                    threads,
                );
                fold(cols, conv, group, dx);
            }
        },
    );
}

/// Side of the square tiles [`transpose`] copies through.
const TILE: usize = 16;

/// `to[j * to_ld + i] = from[i * from_ld + j]` (`op` combining) for `i < rows`, `j < cols`,
/// tile by tile so both sides stay in cache.
fn transpose(
    (from, from_ld): (&[f32], usize),
    (rows, cols): (usize, usize),
    (to, to_ld): (&mut [f32], usize),
    op: impl Fn(&mut f32, f32),
) {
    for i0 in (0..rows).step_by(TILE) {
        for j0 in (0..cols).step_by(TILE) {
            for i in i0..(i0 + TILE).min(rows) {
                for j in j0..(j0 + TILE).min(cols) {
                    op(&mut to[j * to_ld + i], from[i * from_ld + j]);
                }
            }
        }
    }
}

/// Adds to `dw_t` (the filters' gradient transposed: group by group, `fan_in x filters`) the
/// gradient over the samples of `dy` and `x`, chunk by chunk: per group, one product of the
/// unfolded windows and the output gradient transposed (both row-major, the layout the
/// product packs fastest), spread over `threads`.
fn add_chunks_weight_gradient(
    dy: &[f32],
    x: &[f32],
    dw_t: &mut [f32],
    conv: &Convolution,
    threads: Parallelism,
) {
    let s = Sizes::of(conv);
    let samples = samples_per_chunk(&s);
    let mut scratch = Scratch::default();
    for (dy, x) in dy
        .chunks(samples * s.outputs)
        .zip(x.chunks(samples * s.inputs))
    {
        let n = x.len() / s.inputs;
        let (cols, dy_t) = scratch.sized(&s, n);
        for group in 0..conv.groups as usize {
            unfold(x, conv, group, cols);
            dy.par_chunks_exact(s.outputs)
                .zip(dy_t.par_chunks_exact_mut(s.positions * s.filters))
                .for_each(|(sample, dy_t)| {
                    let planes = &sample[group * s.filters * s.positions..];
                    let (from, to) = ((planes, s.positions), (dy_t, s.filters));
                    transpose(from, (s.filters, s.positions), to, |t, f| *t = f);
                });
            // dw_t (fan_in x filters) += cols (fan_in x n positions) * dy_t (n positions x filters)
            gemm(
                s.fan_in,
                n * s.positions,
                s.filters,
                cols,
                ((n * s.positions) as isize, 1),
                dy_t,
                (s.filters as isize, 1),
                &mut dw_t[group * s.fan_in * s.filters..],
                true,
                threads,
            );
        }
    }
}

/// Adds the filters' gradient, summed over every sample of `dy` and `x`, to `dw`: the samples
/// split into [`WEIGHT_GRADIENT_GROUPS`] groups of whole chunks, each summed into its own
/// partial (groups over every core when there are enough, else each product over every core),
/// the partials added in order. The split depends on the layer and the batch alone, and a
/// product splits its rows and columns (never its sums) over threads, so every run adds alike.
pub fn add_conv2d_weight_gradient(dy: &[f32], x: &[f32], dw: &mut [f32], conv: &Convolution) {
    let s = Sizes::of(conv);
    let rows = x.len() / s.inputs.max(1);
    let chunk = samples_per_chunk(&s);
    let per_group = rows.div_ceil(chunk).div_ceil(WEIGHT_GRADIENT_GROUPS).max(1) * chunk;
    let (dy_part, x_part) = (per_group * s.outputs, per_group * s.inputs);
    let partial = |(dy, x): (&[f32], &[f32]), threads| {
        let mut sum = vec![0.0f32; dw.len()];
        add_chunks_weight_gradient(dy, x, &mut sum, conv, threads);
        sum
    };
    let partials: Vec<Vec<f32>> = if rows.div_ceil(per_group) >= rayon::current_num_threads() {
        dy.par_chunks(dy_part)
            .zip(x.par_chunks(x_part))
            .map(|part| partial(part, Parallelism::None))
            .collect()
    } else {
        dy.chunks(dy_part)
            .zip(x.chunks(x_part))
            .map(|part| partial(part, parallelism()))
            .collect()
    };
    let Some(sum) = partials.into_iter().reduce(|mut sum, partial| {
        sum.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
        sum
    }) else {
        return;
    };
    let group_weights = s.filters * s.fan_in;
    for (dw, sum) in dw
        .chunks_exact_mut(group_weights)
        .zip(sum.chunks_exact(group_weights))
    {
        let shape = (s.fan_in, s.filters);
        transpose((sum, s.filters), shape, (dw, s.fan_in), |d, v| *d += v);
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

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_engine::synthetic;
    use proptest::prelude::*;

    /// The input place of output place `i` read by tap `a`, if inside the input of side `size`.
    fn tap(i: u64, a: u64, (stride, padding, dilation): (u64, u64, u64), size: u64) -> Option<u64> {
        (i * stride + a * dilation)
            .checked_sub(padding)
            .filter(|&r| r < size)
    }

    /// `y`, `dx` and `dw` of `rows` samples by the definition, in f64.
    fn reference(x: &[f32], w: &[f32], dy: &[f32], c: &Convolution) -> [Vec<f64>; 3] {
        let s = Sizes::of(c);
        let rows = x.len() / s.inputs;
        let (mut y, mut dx, mut dw) = (vec![0.0; dy.len()], vec![0.0; x.len()], vec![0.0; w.len()]);
        let at = (c.stride, c.padding, c.dilation);
        let (oh, ow, k) = (c.out_height(), c.out_width(), c.kernel);
        for n in 0..rows as u64 {
            for o in 0..c.out_channels {
                let group = o / s.filters as u64;
                for g in 0..s.channels as u64 {
                    let ch = group * s.channels as u64 + g;
                    for (i, j, a, b) in itertools(oh, ow, k) {
                        let (Some(r), Some(q)) = (tap(i, a, at, c.height), tap(j, b, at, c.width))
                        else {
                            continue;
                        };
                        let xi = (((n * c.in_channels + ch) * c.height + r) * c.width + q) as usize;
                        let yi = (((n * c.out_channels + o) * oh + i) * ow + j) as usize;
                        let wi = (((o * s.channels as u64 + g) * k + a) * k + b) as usize;
                        y[yi] += f64::from(x[xi]) * f64::from(w[wi]);
                        dx[xi] += f64::from(dy[yi]) * f64::from(w[wi]);
                        dw[wi] += f64::from(dy[yi]) * f64::from(x[xi]);
                    }
                }
            }
        }
        [y, dx, dw]
    }

    fn itertools(oh: u64, ow: u64, k: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        (0..oh).flat_map(move |i| {
            (0..ow).flat_map(move |j| (0..k).flat_map(move |a| (0..k).map(move |b| (i, j, a, b))))
        })
    }

    fn close(got: &[f32], want: &[f64]) -> bool {
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(&g, &w)| (f64::from(g) - w).abs() <= 1e-4 * (1.0 + w.abs()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Batches of up to 70 samples span several chunks of small layers (and several
        /// partial sums of the filters' gradient), or one sample per chunk of wide ones; every
        /// pass equals the definition whatever the chunking.
        #[test]
        fn every_pass_equals_the_definition_over_many_chunks(
            rows in 1usize..70,
            side in 2u64..9,
            (channels, filters, groups) in prop_oneof![
                Just((3u64, 4u64, 1u64)), Just((4, 6, 2)), Just((4, 4, 4))
            ],
            (kernel, stride, padding, dilation) in prop_oneof![
                Just((3u64, 1u64, 1u64, 1u64)), Just((1, 1, 0, 1)), Just((3, 2, 1, 1)),
                Just((3, 1, 2, 2))
            ],
            seed in any::<u64>(),
        ) {
            let c = Convolution {
                in_channels: channels, height: side, width: side + 1, out_channels: filters,
                kernel, stride, padding, dilation, groups,
            };
            prop_assume!(c.out_height() > 0 && c.out_width() > 0);
            let values = |n: usize, salt: u64| -> Vec<f32> {
                let key = synthetic::stream_key(seed, salt);
                (0..n as u64).map(|i| synthetic::uniform(key, i, 1.0)).collect()
            };
            let s = Sizes::of(&c);
            let x = values(rows * s.inputs, 1);
            let w = values(c.weights() as usize, 2);
            let dy = values(rows * s.outputs, 3);
            let [y_want, dx_want, dw_want] = reference(&x, &w, &dy, &c);
            let (mut y, mut dx, mut dw) =
                (vec![0.0; dy.len()], vec![9.0; x.len()], vec![0.0; w.len()]);
            conv2d_forward(&x, &w, &mut y, &c);
            conv2d_input_gradient(&dy, &w, &mut dx, &c);
            add_conv2d_weight_gradient(&dy, &x, &mut dw, &c);
            prop_assert!(close(&y, &y_want), "forward");
            prop_assert!(close(&dx, &dx_want), "input gradient");
            prop_assert!(close(&dw, &dw_want), "filters' gradient");
        }
    }
}
