//! attention.cu on the host: the fused forward and backward, a sample at a time (its queries,
//! keys and values widened to f32: one sample's scratch), query rows (key rows for the keys'
//! and values' gradients) spread over every core. Like the kernels it keeps no `sequence x
//! sequence` buffer: a row's scores at a time, the backward's probabilities recomputed from the
//! saved log-sum-exp.

use rayon::prelude::*;

use super::values::HostValues;
use super::{usize_of, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::program::geometry::Attention;
use headroom_engine::program::{AttentionGradients, AttentionSaved};
use headroom_engine::step::Attend;

/// The sizes of one sample, as indices.
#[derive(Clone, Copy)]
struct Sizes {
    sequence: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
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
        }
    }

    /// Values of one sample's queries, and of its keys.
    fn lengths(&self) -> (usize, usize) {
        let row = self.sequence * self.head_dim;
        (row * self.heads, row * self.kv_heads)
    }

    /// The keys query `i` sees.
    fn keys(&self, i: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            self.sequence
        }
    }

    /// The queries that see key `j`.
    fn queries(&self, j: usize) -> std::ops::Range<usize> {
        if self.causal {
            j..self.sequence
        } else {
            0..self.sequence
        }
    }

    /// The key/value head query head `h` reads.
    fn group(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    fn query_row<'a>(&self, x: &'a [f32], i: usize, h: usize) -> &'a [f32] {
        &x[(i * self.heads + h) * self.head_dim..][..self.head_dim]
    }

    fn key_row<'a>(&self, x: &'a [f32], j: usize, g: usize) -> &'a [f32] {
        &x[(j * self.kv_heads + g) * self.head_dim..][..self.head_dim]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

fn add_scaled(into: &mut [f32], scale: f32, x: &[f32]) {
    into.iter_mut().zip(x).for_each(|(y, x)| *y += scale * x);
}

impl Attend for HostDevice {
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
            let q = q.read(b * queries..(b + 1) * queries);
            let k = k.read(b * keys..(b + 1) * keys);
            let v = v.read(b * keys..(b + 1) * keys);
            let mut out = vec![0.0f32; queries];
            let mut sums = vec![0.0f32; rows];
            out.par_chunks_mut(z.heads * z.head_dim)
                .zip(sums.par_chunks_mut(z.heads))
                .enumerate()
                .for_each(|(i, (out, sums))| {
                    let mut scores = vec![0.0f32; z.keys(i)];
                    for h in 0..z.heads {
                        let (g, qi) = (z.group(h), z.query_row(&q, i, h));
                        for (j, s) in scores.iter_mut().enumerate() {
                            *s = dot(qi, z.key_row(&k, j, g)) * z.scale;
                        }
                        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let out = &mut out[h * z.head_dim..][..z.head_dim];
                        let mut sum = 0.0f32;
                        for (j, s) in scores.iter().enumerate() {
                            let p = (s - max).exp();
                            sum += p;
                            add_scaled(out, p, z.key_row(&v, j, g));
                        }
                        out.iter_mut().for_each(|x| *x /= sum);
                        sums[h] = max + sum.ln();
                    }
                });
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
            let of_queries = |x: &HostValues| x.read(b * queries..(b + 1) * queries).into_owned();
            let of_keys = |x: &HostValues| x.read(b * keys..(b + 1) * keys).into_owned();
            let (q, o, d_o) = (of_queries(saved.q), of_queries(saved.o), of_queries(dout));
            let (k, v) = (of_keys(saved.k), of_keys(saved.v));
            let lse = saved.lse.read(b * rows..(b + 1) * rows);
            // dout_i . o_i per query row and head: the softmax's backward subtracts it.
            let delta: Vec<f32> = (0..rows)
                .map(|r| {
                    let at = r * z.head_dim..(r + 1) * z.head_dim;
                    dot(&d_o[at.clone()], &o[at])
                })
                .collect();
            let probability = |i: usize, h: usize, kj: &[f32]| {
                (dot(z.query_row(&q, i, h), kj) * z.scale - lse[i * z.heads + h]).exp()
            };
            let mut dq = vec![0.0f32; queries];
            dq.par_chunks_mut(z.heads * z.head_dim)
                .enumerate()
                .for_each(|(i, dq)| {
                    for h in 0..z.heads {
                        let (g, doi) = (z.group(h), z.query_row(&d_o, i, h));
                        let dq = &mut dq[h * z.head_dim..][..z.head_dim];
                        for j in 0..z.keys(i) {
                            let kj = z.key_row(&k, j, g);
                            let p = probability(i, h, kj);
                            let ds = p * (dot(doi, z.key_row(&v, j, g)) - delta[i * z.heads + h]);
                            add_scaled(dq, ds, kj);
                        }
                        dq.iter_mut().for_each(|x| *x *= z.scale);
                    }
                });
            let mut dk = vec![0.0f32; keys];
            let mut dv = vec![0.0f32; keys];
            let group = z.heads / z.kv_heads;
            dk.par_chunks_mut(z.kv_heads * z.head_dim)
                .zip(dv.par_chunks_mut(z.kv_heads * z.head_dim))
                .enumerate()
                .for_each(|(j, (dk, dv))| {
                    for g in 0..z.kv_heads {
                        let (kj, vj) = (z.key_row(&k, j, g), z.key_row(&v, j, g));
                        let dk = &mut dk[g * z.head_dim..][..z.head_dim];
                        let dv = &mut dv[g * z.head_dim..][..z.head_dim];
                        for h in g * group..(g + 1) * group {
                            for i in z.queries(j) {
                                let doi = z.query_row(&d_o, i, h);
                                let p = probability(i, h, kj);
                                add_scaled(dv, p, doi);
                                let ds = p * (dot(doi, vj) - delta[i * z.heads + h]);
                                add_scaled(dk, ds, z.query_row(&q, i, h));
                            }
                        }
                        dk.iter_mut().for_each(|x| *x *= z.scale);
                    }
                });
            grads.dq.write(b * queries, &dq);
            grads.dk.write(b * keys, &dk);
            grads.dv.write(b * keys, &dv);
        }
        Ok(())
    }
}
