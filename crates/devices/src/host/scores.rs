//! scores.cu on the host: eager attention's kernels. The batched products a matrix at a time
//! through `gemm` (every core on each product), each operand's matrix read through its strides
//! from the values it spans; the mask, the softmax and the head repetition by rows or samples,
//! 16-bit values widened a block at a time.

use std::ops::Range;

use super::gemm::{gemm, parallelism};
use super::values::{chunks, HostValues};
use super::{row_map, usize_of, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::program::geometry::{BatchedProduct, HeadGroups, Strides};
use headroom_engine::step::Scores;

/// The offsets matrix `(b, h)` of a batch laid out by `strides` spans, `rows x cols` of them.
fn matrix(strides: &Strides, b: u64, h: u64, rows: u64, cols: u64) -> Range<usize> {
    let start = usize_of(b * strides.batch + h * strides.head);
    let one = Strides {
        batch: 0,
        head: 0,
        ..*strides
    };
    start..start + usize_of(one.span(1, 1, rows, cols))
}

/// The row and column strides of `strides`, for `gemm`.
fn row_col(strides: &Strides) -> (isize, isize) {
    let signed = |n: u64| isize::try_from(n).expect("strides of host buffers fit isize");
    (signed(strides.row), signed(strides.col))
}

impl Scores for HostDevice {
    fn batched_product(
        &mut self,
        a: &HostValues,
        b: &HostValues,
        c: &mut HostValues,
        shape: &BatchedProduct,
    ) -> Result<(), DeviceError> {
        assert_eq!(shape.c.col, 1, "a batched product writes whole rows");
        let (rows, inner, cols) = (shape.rows, shape.inner, shape.cols);
        let mut out = vec![0.0f32; usize_of(rows * cols)];
        for n in 0..shape.batch {
            for h in 0..shape.heads {
                let a_values = a.read(matrix(&shape.a, n, h, rows, inner));
                let b_values = b.read(matrix(&shape.b, n, h, inner, cols));
                let [m, k, width] = [rows, inner, cols].map(usize_of);
                gemm(
                    m,
                    k,
                    width,
                    &a_values,
                    row_col(&shape.a),
                    &b_values,
                    row_col(&shape.b),
                    &mut out,
                    false,
                    parallelism(),
                );
                let start = usize_of(n * shape.c.batch + h * shape.c.head);
                for (r, row) in out.chunks_exact(width).enumerate() {
                    c.write(start + r * usize_of(shape.c.row), row);
                }
            }
        }
        Ok(())
    }

    fn causal_mask(
        &mut self,
        from: &HostValues,
        to: &mut HostValues,
        matrices: u64,
        positions: u64,
    ) -> Result<(), DeviceError> {
        let t = usize_of(positions);
        let len = usize_of(matrices * positions * positions);
        for range in chunks(len, t) {
            let values = from.read(range.clone());
            let first_row = range.start / t;
            to.update(range, |out| {
                for (r, (out, values)) in out
                    .chunks_exact_mut(t)
                    .zip(values.chunks_exact(t))
                    .enumerate()
                {
                    let i = (first_row + r) % t;
                    out[..=i].copy_from_slice(&values[..=i]);
                    out[i + 1..].fill(f32::NEG_INFINITY);
                }
            });
        }
        Ok(())
    }

    fn softmax_rows(
        &mut self,
        x: &HostValues,
        p: &mut HostValues,
        rows: u64,
        cols: u64,
    ) -> Result<(), DeviceError> {
        let width = usize_of(cols);
        row_map((x, width), (p, width), usize_of(rows), |_, x, p| {
            for (x, p) in x.chunks_exact(width).zip(p.chunks_exact_mut(width)) {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (p, &x) in p.iter_mut().zip(x) {
                    *p = (x - max).exp();
                    sum += *p;
                }
                p.iter_mut().for_each(|p| *p /= sum);
            }
        });
        Ok(())
    }

    fn softmax_rows_backward(
        &mut self,
        p: &HostValues,
        dp: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        cols: u64,
    ) -> Result<(), DeviceError> {
        let width = usize_of(cols);
        for range in chunks(usize_of(rows * cols), width) {
            let (p, dp) = (p.read(range.clone()), dp.read(range.clone()));
            dx.update(range, |dx| {
                let rows = dx.chunks_exact_mut(width).zip(p.chunks_exact(width));
                for ((dx, p), dp) in rows.zip(dp.chunks_exact(width)) {
                    let dot: f32 = p.iter().zip(dp).map(|(p, dp)| p * dp).sum();
                    for ((dx, p), dp) in dx.iter_mut().zip(p).zip(dp) {
                        *dx = p * (dp - dot);
                    }
                }
            });
        }
        Ok(())
    }

    fn repeat_heads(
        &mut self,
        from: &HostValues,
        to: &mut HostValues,
        shape: &HeadGroups,
    ) -> Result<(), DeviceError> {
        let (grouped, repeated) = sample_lengths(shape);
        for b in 0..usize_of(shape.batch) {
            let x = from.read(b * grouped..(b + 1) * grouped);
            let mut y = vec![0.0f32; repeated];
            for_each_row(shape, |row, source| y[row].copy_from_slice(&x[source]));
            to.write(b * repeated, &y);
        }
        Ok(())
    }

    fn sum_head_groups(
        &mut self,
        from: &HostValues,
        to: &mut HostValues,
        shape: &HeadGroups,
    ) -> Result<(), DeviceError> {
        let (grouped, repeated) = sample_lengths(shape);
        for b in 0..usize_of(shape.batch) {
            let dy = from.read(b * repeated..(b + 1) * repeated);
            let mut dx = vec![0.0f32; grouped];
            for_each_row(shape, |row, source| {
                dx[source]
                    .iter_mut()
                    .zip(&dy[row])
                    .for_each(|(x, y)| *x += y);
            });
            to.write(b * grouped, &dx);
        }
        Ok(())
    }
}

/// Values of one sample's key/value heads, and of its repeated heads.
fn sample_lengths(shape: &HeadGroups) -> (usize, usize) {
    let grouped = usize_of(shape.positions * shape.kv_heads * shape.head_dim);
    (grouped, grouped * usize_of(shape.groups))
}

/// Every row of one sample's repeated heads (`[heads, positions, head_dim]`) with the row of
/// the key/value heads it repeats (`[positions, kv_heads, head_dim]`), query heads in order.
fn for_each_row(shape: &HeadGroups, mut visit: impl FnMut(Range<usize>, Range<usize>)) {
    let [t, kv, groups, d] = [
        shape.positions,
        shape.kv_heads,
        shape.groups,
        shape.head_dim,
    ]
    .map(usize_of);
    for h in 0..kv * groups {
        for s in 0..t {
            let (row, source) = ((h * t + s) * d, (s * kv + h / groups) * d);
            visit(row..row + d, source..source + d);
        }
    }
}
