//! attention.cu on the host: the fused forward and backward, a sample at a time (its queries,
//! keys and values widened to f32: one sample's scratch), heads (key/value heads in backward)
//! spread over every core. Like the kernels it keeps no `sequence x sequence` buffer: the
//! scores of a tile of [`TILE`] query rows against the keys at a time, multiplied by gemm, the
//! backward's probabilities recomputed from the saved log-sum-exp, and dropout's factors
//! redrawn from the stream where they are used, as the kernels do. Rotary embedding a row of
//! a head at a time.

use rayon::prelude::*;

use super::gemm::{gemm, Parallelism};
use super::values::{chunks, HostValues};
use super::{usize_of, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::program::geometry::{Attention, AttentionDropout, Rotary};
use headroom_engine::program::{AttentionGradients, AttentionSaved};
use headroom_engine::step::Attend;

/// Query rows whose scores are computed at once.
const TILE: usize = 64;

/// The sizes of one sample, as indices.
#[derive(Clone, Copy)]
struct Sizes {
    sequence: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
    shape: Attention,
}

impl Sizes {
    fn of(shape: &Attention) -> Sizes {
        Sizes {
            sequence: usize_of(shape.sequence),
            heads: usize_of(shape.heads),
            kv_heads: usize_of(shape.kv_heads),
            head_dim: usize_of(shape.head_dim),
            causal: shape.causal,
            scale: shape.scale(),
            shape: *shape,
        }
    }

    /// Multiplies the probabilities of `rows` of head `h` of sample `b` (row-major, `keys` a
    /// row) by their dropout factors, if any.
    fn drop(&self, p: &mut [f32], b: usize, h: usize, rows: &std::ops::Range<usize>, keys: usize) {
        let Some(dropout) = self.shape.dropout else {
            return;
        };
        for (i, row) in rows.clone().zip(p.chunks_exact_mut(keys)) {
            for (j, p) in row.iter_mut().enumerate() {
                *p *= factor(&dropout, &self.shape, [b, h, i, j]);
            }
        }
    }

    /// Values of one sample's queries, and of its keys.
    fn lengths(&self) -> (usize, usize) {
        let row = self.sequence * self.head_dim;
        (row * self.heads, row * self.kv_heads)
    }

    /// The keys the query rows `rows` see: all, or up to the last row's when causal.
    fn keys(&self, rows: &std::ops::Range<usize>) -> usize {
        if self.causal {
            rows.end
        } else {
            self.sequence
        }
    }

    /// Tiles of query rows.
    fn tiles(&self) -> impl Iterator<Item = std::ops::Range<usize>> {
        let t = self.sequence;
        (0..t).step_by(TILE).map(move |i| i..(i + TILE).min(t))
    }

    /// Head `h`'s rows of a `[sequence, n, head_dim]` sample from row `first`: the slice and
    /// its (row, column) strides.
    fn rows<'a>(&self, x: &'a [f32], n: usize, h: usize, first: usize) -> Operand<'a> {
        let at = (first * n + h) * self.head_dim;
        (&x[at..], ((n * self.head_dim) as isize, 1))
    }

    /// The same rows read as columns (their transpose).
    fn columns<'a>(&self, x: &'a [f32], n: usize, h: usize) -> Operand<'a> {
        (&x[h * self.head_dim..], (1, (n * self.head_dim) as isize))
    }
}

fn factor(dropout: &AttentionDropout, shape: &Attention, at: [usize; 4]) -> f32 {
    dropout.factor(shape, at.map(|n| n as u64))
}

/// An operand of a product: its values and their (row, column) strides.
type Operand<'a> = (&'a [f32], (isize, isize));

/// `c (m x n) = a (m x k) b (k x n)`, or `c +=` it when `accumulate`; `c` dense.
fn product(
    m: usize,
    k: usize,
    n: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    gemm(
        m,
        k,
        n,
        a.0,
        a.1,
        b.0,
        b.1,
        c,
        accumulate,
        Parallelism::None,
    );
}

/// Masks the scores of `rows` against `keys` keys (row-major, `keys` a row) past each row's
/// position when causal, with `-inf`.
fn mask(z: &Sizes, scores: &mut [f32], rows: &std::ops::Range<usize>, keys: usize) {
    if z.causal {
        for (r, i) in rows.clone().enumerate() {
            scores[r * keys + i + 1..(r + 1) * keys].fill(f32::NEG_INFINITY);
        }
    }
}

/// One head's forward over a sample: its output rows `[sequence, head_dim]` and log-sum-exps.
fn head_forward(
    z: &Sizes,
    (q, k, v): (&[f32], &[f32], &[f32]),
    b: usize,
    h: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (d, g) = (z.head_dim, h / (z.heads / z.kv_heads));
    let mut out = vec![0.0f32; z.sequence * d];
    let mut lse = vec![0.0f32; z.sequence];
    let mut scores = vec![0.0f32; TILE * z.sequence];
    for rows in z.tiles() {
        let (m, keys) = (rows.len(), z.keys(&rows));
        let scores = &mut scores[..m * keys];
        product(
            m,
            d,
            keys,
            z.rows(q, z.heads, h, rows.start),
            z.columns(k, z.kv_heads, g),
            scores,
            false,
        );
        mask(z, scores, &rows, keys);
        for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s)) * z.scale;
            let mut sum = 0.0f32;
            for s in row.iter_mut() {
                *s = (*s * z.scale - max).exp();
                sum += *s;
            }
            row.iter_mut().for_each(|p| *p /= sum);
            lse[rows.start + r] = max + sum.ln();
        }
        z.drop(scores, b, h, &rows, keys);
        let o = &mut out[rows.start * d..rows.end * d];
        product(
            m,
            keys,
            d,
            (scores, (keys as isize, 1)),
            z.rows(v, z.kv_heads, g, 0),
            o,
            false,
        );
    }
    (out, lse)
}

/// The inputs of one sample's backward, widened.
struct Sample<'a> {
    /// Which sample of the batch.
    b: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
    /// `dout_i . o_i` per query row and head, `[sequence, heads]`.
    delta: &'a [f32],
}

/// The backward of key/value head `g` over a sample: the query gradients of its heads (each
/// `[sequence, head_dim]`), and its keys' and values' gradients.
fn group_backward(z: &Sizes, s: &Sample<'_>, g: usize) -> (Vec<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let d = z.head_dim;
    let group = z.heads / z.kv_heads;
    let mut dk = vec![0.0f32; z.sequence * d];
    let mut dv = vec![0.0f32; z.sequence * d];
    let mut scores = vec![0.0f32; TILE * z.sequence];
    let mut d_scores = vec![0.0f32; TILE * z.sequence];
    let mut dqs = Vec::with_capacity(group);
    for h in g * group..(g + 1) * group {
        let mut dq = vec![0.0f32; z.sequence * d];
        for rows in z.tiles() {
            let (m, keys) = (rows.len(), z.keys(&rows));
            let p = &mut scores[..m * keys];
            let q_rows = z.rows(s.q, z.heads, h, rows.start);
            let do_rows = z.rows(s.d_o, z.heads, h, rows.start);
            product(m, d, keys, q_rows, z.columns(s.k, z.kv_heads, g), p, false);
            mask(z, p, &rows, keys);
            for (r, row) in p.chunks_exact_mut(keys).enumerate() {
                let lse = s.lse[(rows.start + r) * z.heads + h];
                row.iter_mut().for_each(|x| *x = (*x * z.scale - lse).exp());
            }
            let ds = &mut d_scores[..m * keys];
            product(
                m,
                d,
                keys,
                do_rows,
                z.columns(s.v, z.kv_heads, g),
                ds,
                false,
            );
            // Dropout scales dout v^T's entries, then (for dv) the probabilities.
            z.drop(ds, s.b, h, &rows, keys);
            for (r, (ds, p)) in ds
                .chunks_exact_mut(keys)
                .zip(p.chunks_exact(keys))
                .enumerate()
            {
                let delta = s.delta[(rows.start + r) * z.heads + h];
                ds.iter_mut()
                    .zip(p)
                    .for_each(|(x, p)| *x = p * (*x - delta));
            }
            z.drop(p, s.b, h, &rows, keys);
            let (dense, transposed) = ((keys as isize, 1), (1, keys as isize));
            // dq = ds k * scale; dv += p^T dout; dk += ds^T q * scale (scaled at the end).
            let dq_rows = &mut dq[rows.start * d..rows.end * d];
            product(
                m,
                keys,
                d,
                (&*ds, dense),
                z.rows(s.k, z.kv_heads, g, 0),
                dq_rows,
                false,
            );
            product(
                keys,
                m,
                d,
                (&*p, transposed),
                do_rows,
                &mut dv[..keys * d],
                true,
            );
            product(
                keys,
                m,
                d,
                (&*ds, transposed),
                q_rows,
                &mut dk[..keys * d],
                true,
            );
        }
        dq.iter_mut().for_each(|x| *x *= z.scale);
        dqs.push(dq);
    }
    dk.iter_mut().for_each(|x| *x *= z.scale);
    (dqs, dk, dv)
}

/// Sample `b`'s `len` values of `x`, as f32.
fn sample(x: &HostValues, b: usize, len: usize) -> std::borrow::Cow<'_, [f32]> {
    x.read(b * len..(b + 1) * len)
}

/// Writes one head's `[sequence, head_dim]` rows into a `[sequence, n, head_dim]` sample.
fn scatter(into: &mut [f32], rows: &[f32], n: usize, h: usize, d: usize) {
    for (t, row) in rows.chunks_exact(d).enumerate() {
        into[(t * n + h) * d..][..d].copy_from_slice(row);
    }
}

/// Rotary embedding (`backward`: its transpose) from `from` into `to`, a head's row at a time:
/// `to = from * cos + partner * sin`, the partner across the half `-from[i + half]` or
/// `from[i - half]` forward, `from[i + half]` or `-from[i - half]` backward.
fn rotary(from: &HostValues, to: &mut HostValues, shape: &Rotary, backward: bool) {
    let (d, heads, sequence) = (
        usize_of(shape.head_dim),
        usize_of(shape.heads),
        usize_of(shape.sequence),
    );
    let half = d / 2;
    let sign = if backward { -1.0 } else { 1.0 };
    for range in chunks(usize_of(shape.values()), d) {
        let first_row = range.start / d;
        let x = from.read(range.clone());
        to.update(range, |y| {
            for (r, (x, y)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
                let t = (first_row + r) / heads % sequence;
                for (i, y) in y.iter_mut().enumerate() {
                    let angle = shape.angle(t as u64, i as u64);
                    let partner = match i < half {
                        true => -sign * x[i + half],
                        false => sign * x[i - half],
                    };
                    *y = x[i] * angle.cos() + partner * angle.sin();
                }
            }
        });
    }
}

impl Attend for HostDevice {
    fn rotary_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        shape: &Rotary,
    ) -> Result<(), DeviceError> {
        rotary(x, y, shape, false);
        Ok(())
    }

    fn rotary_backward(
        &mut self,
        dy: &HostValues,
        dx: &mut HostValues,
        shape: &Rotary,
    ) -> Result<(), DeviceError> {
        rotary(dy, dx, shape, true);
        Ok(())
    }

    fn attention_forward(
        &mut self,
        q: &HostValues,
        k: &HostValues,
        v: &HostValues,
        o: &mut HostValues,
        lse: &mut HostValues,
        shape: &Attention,
    ) -> Result<(), DeviceError> {
        let z = Sizes::of(shape);
        let (queries, keys) = z.lengths();
        let rows = z.sequence * z.heads;
        for b in 0..usize_of(shape.batch) {
            let (q, k, v) = (
                sample(q, b, queries),
                sample(k, b, keys),
                sample(v, b, keys),
            );
            let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..z.heads)
                .into_par_iter()
                .map(|h| head_forward(&z, (&q, &k, &v), b, h))
                .collect();
            let mut out = vec![0.0f32; queries];
            let mut sums = vec![0.0f32; rows];
            for (h, (rows, lse)) in heads.iter().enumerate() {
                scatter(&mut out, rows, z.heads, h, z.head_dim);
                scatter(&mut sums, lse, z.heads, h, 1);
            }
            o.write(b * queries, &out);
            lse.write(b * rows, &sums);
        }
        Ok(())
    }

    fn attention_backward(
        &mut self,
        saved: AttentionSaved<&HostValues>,
        dout: &HostValues,
        grads: AttentionGradients<&mut HostValues>,
        shape: &Attention,
    ) -> Result<(), DeviceError> {
        let z = Sizes::of(shape);
        let (queries, keys) = z.lengths();
        let rows = z.sequence * z.heads;
        for b in 0..usize_of(shape.batch) {
            let (q, o, d_o) = (
                sample(saved.q, b, queries),
                sample(saved.o, b, queries),
                sample(dout, b, queries),
            );
            let (k, v) = (sample(saved.k, b, keys), sample(saved.v, b, keys));
            let lse = saved.lse.read(b * rows..(b + 1) * rows);
            let delta: Vec<f32> = d_o
                .chunks_exact(z.head_dim)
                .zip(o.chunks_exact(z.head_dim))
                .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a * b).sum())
                .collect();
            let sample = Sample {
                b,
                q: &q,
                k: &k,
                v: &v,
                d_o: &d_o,
                lse: &lse,
                delta: &delta,
            };
            let groups: Vec<_> = (0..z.kv_heads)
                .into_par_iter()
                .map(|g| group_backward(&z, &sample, g))
                .collect();
            let mut dq = vec![0.0f32; queries];
            let mut dk = vec![0.0f32; keys];
            let mut dv = vec![0.0f32; keys];
            let group = z.heads / z.kv_heads;
            for (g, (dqs, dk_g, dv_g)) in groups.iter().enumerate() {
                for (j, dq_h) in dqs.iter().enumerate() {
                    scatter(&mut dq, dq_h, z.heads, g * group + j, z.head_dim);
                }
                scatter(&mut dk, dk_g, z.kv_heads, g, z.head_dim);
                scatter(&mut dv, dv_g, z.kv_heads, g, z.head_dim);
            }
            grads.dq.write(b * queries, &dq);
            grads.dk.write(b * keys, &dk);
            grads.dv.write(b * keys, &dv);
        }
        Ok(())
    }
}
