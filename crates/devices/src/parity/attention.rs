//! Checks of `attention.cu`: the fused forward (output and log-sum-exp) and its backward
//! against a reference written here in f64 that materializes every score, at sequence lengths
//! that are not multiples of the kernels' tiles, causal and not, grouped-query and multi-query,
//! the widest head the kernels take, with dropout and without, in every storage; and rotary embedding and its gradient
//! against the same definitions in f64.

use super::{compare, poison, random, rounded, tolerance, Check, STORAGES, TOLERANCE};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::modules::rotary;
use headroom_engine::plan::Storage;
use headroom_engine::program::geometry::{Attention, AttentionDropout, Rotary};
use headroom_engine::program::{AttentionGradients, AttentionSaved};

/// Runs the attention checks on `device`.
pub fn check_attention<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    // (batch, sequence, heads, kv_heads, head_dim, causal, dropout)
    let cases = [
        (1u64, 1u64, 1u64, 1u64, 1u64, false, 0.0f32),
        (2, 70, 4, 2, 24, true, 0.0),
        (2, 70, 4, 2, 24, true, 0.25),
        (1, 33, 3, 1, 8, false, 0.0),
        (1, 33, 3, 1, 8, false, 0.5),
        (1, 129, 2, 2, 64, true, 0.0),
        (1, 5, 1, 1, 256, false, 0.0),
    ];
    let mut checks = Vec::new();
    for storage in STORAGES {
        for (batch, sequence, heads, kv_heads, head_dim, causal, p) in cases {
            let shape = Attention {
                batch,
                sequence,
                heads,
                kv_heads,
                head_dim,
                causal,
                dropout: (p > 0.0).then_some(AttentionDropout { p, key: 74 }),
            };
            checks.extend(check_case(device, storage, &shape)?);
        }
    }
    Ok(checks)
}

/// What the reference computes: the output, the log-sum-exp and the three gradients.
struct Expected {
    o: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Attention and its backward from the definition, in f64, each head's whole `sequence x
/// sequence` matrix of probabilities materialized, and dropout's factors beside it.
fn reference(q: &[f32], k: &[f32], v: &[f32], d_o: &[f32], shape: &Attention) -> Expected {
    let [b, t, h, kvh, d] = [
        shape.batch,
        shape.sequence,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
    ]
    .map(|n| n as usize);
    let scale = 1.0 / (d as f64).sqrt();
    let qi = |s: usize, i: usize, head: usize| ((s * t + i) * h + head) * d;
    let kj = |s: usize, j: usize, g: usize| ((s * t + j) * kvh + g) * d;
    let dot = |a: &[f32], x: usize, c: &[f32], y: usize| -> f64 {
        (0..d).map(|e| a[x + e] as f64 * c[y + e] as f64).sum()
    };
    let mut want = [
        vec![0.0f64; b * t * h * d],
        vec![0.0f64; b * t * h],
        vec![0.0f64; b * t * h * d],
        vec![0.0f64; b * t * kvh * d],
        vec![0.0f64; b * t * kvh * d],
    ];
    for s in 0..b {
        for head in 0..h {
            let g = head / (h / kvh);
            let sees = |i: usize, j: usize| !shape.causal || j <= i;
            let mut p = vec![vec![0.0f64; t]; t];
            let z = |i: usize, j: usize| match shape.dropout {
                Some(dropout) => {
                    f64::from(dropout.factor(shape, [s, head, i, j].map(|n| n as u64)))
                }
                None => 1.0,
            };
            for (i, row) in p.iter_mut().enumerate() {
                let scores: Vec<f64> = (0..t)
                    .map(|j| match sees(i, j) {
                        true => dot(q, qi(s, i, head), k, kj(s, j, g)) * scale,
                        false => f64::NEG_INFINITY,
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                want[1][(s * t + i) * h + head] = max + total.ln();
                for (j, x) in scores.iter().enumerate() {
                    row[j] = (x - max).exp() / total;
                }
            }
            for i in 0..t {
                for j in 0..t {
                    for e in 0..d {
                        want[0][qi(s, i, head) + e] +=
                            p[i][j] * z(i, j) * v[kj(s, j, g) + e] as f64;
                    }
                }
            }
            for i in 0..t {
                let o_i = &want[0][qi(s, i, head)..][..d];
                let delta: f64 = (0..d)
                    .map(|e| d_o[qi(s, i, head) + e] as f64 * o_i[e])
                    .sum();
                for j in 0..t {
                    let dp = dot(d_o, qi(s, i, head), v, kj(s, j, g));
                    let ds = p[i][j] * (z(i, j) * dp - delta);
                    for e in 0..d {
                        want[2][qi(s, i, head) + e] += ds * k[kj(s, j, g) + e] as f64 * scale;
                        want[3][kj(s, j, g) + e] += ds * q[qi(s, i, head) + e] as f64 * scale;
                        want[4][kj(s, j, g) + e] +=
                            p[i][j] * z(i, j) * d_o[qi(s, i, head) + e] as f64;
                    }
                }
            }
        }
    }
    let [o, lse, dq, dk, dv] = want.map(|x| x.iter().map(|&v| v as f32).collect::<Vec<_>>());
    Expected { o, lse, dq, dk, dv }
}

fn check_case<K: Transfer>(
    device: &mut K,
    storage: Storage,
    shape: &Attention,
) -> Result<Vec<Check>, DeviceError> {
    let (queries, keys, rows) = (shape.query_values(), shape.key_values(), shape.rows());
    let [q, k, v] = [(queries, 70), (keys, 71), (keys, 72)]
        .map(|(len, seed)| rounded(&random(len as usize, seed), storage));
    let d_o = rounded(&random(queries as usize, 73), storage);
    let want = reference(&q, &k, &v, &d_o, shape);

    let [q_d, k_d, v_d, do_d] = [&q, &k, &v, &d_o].map(|x| device.write_values(x, storage));
    let (q_d, k_d, v_d, do_d) = (q_d?, k_d?, v_d?, do_d?);
    let mut o = device.write_values(&poison(queries as usize), storage)?;
    let mut lse = device.write_values(&poison(rows as usize), Storage::F32)?;
    device.attention_forward(&q_d, &k_d, &v_d, &mut o, &mut lse, shape)?;
    let mut dq = device.write_values(&poison(queries as usize), storage)?;
    let mut dk = device.write_values(&poison(keys as usize), storage)?;
    let mut dv = device.write_values(&poison(keys as usize), storage)?;
    // The backward reads the output the device wrote, as training does.
    device.attention_backward(
        AttentionSaved {
            q: &q_d,
            k: &k_d,
            v: &v_d,
            o: &o,
            lse: &lse,
        },
        &do_d,
        AttentionGradients {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        },
        shape,
    )?;
    let name = format!(
        "{} x {} x {}/{} heads x {}{}{} {storage:?}",
        shape.batch,
        shape.sequence,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        if shape.causal { " causal" } else { "" },
        match shape.dropout {
            Some(dropout) => format!(" dropout {}", dropout.p),
            None => String::new(),
        }
    );
    // The gradients are sums over a sequence of products of rounded values: a 16-bit storage
    // rounds the output the backward reads, which moves them by a few units in its last place.
    let gradient_tolerance = match storage {
        Storage::F32 => TOLERANCE,
        _ => 4.0 * tolerance(storage),
    };
    Ok(vec![
        compare(
            format!("attention output {name}"),
            &device.read_values(&o, queries)?,
            &want.o,
            tolerance(storage),
        ),
        compare(
            format!("attention log-sum-exp {name}"),
            &device.read_values(&lse, rows)?,
            &want.lse,
            TOLERANCE,
        ),
        compare(
            format!("attention query gradient {name}"),
            &device.read_values(&dq, queries)?,
            &want.dq,
            gradient_tolerance,
        ),
        compare(
            format!("attention key gradient {name}"),
            &device.read_values(&dk, keys)?,
            &want.dk,
            gradient_tolerance,
        ),
        compare(
            format!("attention value gradient {name}"),
            &device.read_values(&dv, keys)?,
            &want.dv,
            gradient_tolerance,
        ),
    ])
}

/// Runs the rotary embedding checks on `device`: a head of two values at one position, heads
/// wider and narrower than a warp over lengths that are not powers of two, Llama 3's base;
/// into the input's storage and into f32 (autocast's promotion by the f32 tables).
pub fn check_rotary<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    // (batch, sequence, heads, head_dim, theta)
    let cases = [
        (1u64, 1u64, 1u64, 2u64, 10_000.0f32),
        (2, 37, 3, 64, 10_000.0),
        (1, 130, 2, 8, 500_000.0),
    ];
    let mut checks = Vec::new();
    for storage in STORAGES {
        for out in [storage, Storage::F32] {
            for (batch, sequence, heads, head_dim, theta) in cases {
                let shape = Rotary {
                    batch,
                    sequence,
                    heads,
                    head_dim,
                    theta,
                };
                checks.extend(check_rotary_case(device, (storage, out), &shape)?);
            }
        }
    }
    Ok(checks)
}

/// The gradient of rotary embedding from its definition in f64: the transpose of the map that
/// turns each pair (`x[i]`, `x[i + half]`) by the pair's angle.
fn rotary_gradient(dy: &[f32], shape: &Rotary) -> Vec<f32> {
    let (d, heads, sequence) = (
        shape.head_dim as usize,
        shape.heads as usize,
        shape.sequence,
    );
    let half = d / 2;
    dy.chunks_exact(d)
        .enumerate()
        .flat_map(|(row, g)| {
            let t = (row / heads) as u64 % sequence;
            (0..d).map(move |j| {
                let pair = j % half;
                let angle = f64::from(shape.angle(t, pair as u64));
                let (cos, sin) = (angle.cos(), angle.sin());
                let (first, second) = (f64::from(g[pair]), f64::from(g[pair + half]));
                // y[pair] = x[pair] cos - x[pair + half] sin; y[pair + half] = x[pair + half] cos + x[pair] sin
                let dx = match j < half {
                    true => first * cos + second * sin,
                    false => second * cos - first * sin,
                };
                dx as f32
            })
        })
        .collect()
}

fn check_rotary_case<K: Transfer>(
    device: &mut K,
    (storage, out): (Storage, Storage),
    shape: &Rotary,
) -> Result<Vec<Check>, DeviceError> {
    let len = shape.values() as usize;
    let x = rounded(&random(len, 74), storage);
    let dy = rounded(&random(len, 75), out);
    let wide: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let want_y: Vec<f32> = rotary::reference(&wide, shape)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let want_dx = rotary_gradient(&dy, shape);

    let x_d = device.write_values(&x, storage)?;
    let mut y = device.write_values(&poison(len), out)?;
    device.rotary_forward(&x_d, &mut y, shape)?;
    let dy_d = device.write_values(&dy, out)?;
    let mut dx = device.write_values(&poison(len), storage)?;
    device.rotary_backward(&dy_d, &mut dx, shape)?;
    let name = format!(
        "{} x {} x {} heads x {} theta {} {storage:?} -> {out:?}",
        shape.batch, shape.sequence, shape.heads, shape.head_dim, shape.theta
    );
    Ok(vec![
        compare(
            format!("rotary output {name}"),
            &device.read_values(&y, len as u64)?,
            &rounded(&want_y, out),
            tolerance(out).max(tolerance(storage)),
        ),
        compare(
            format!("rotary input gradient {name}"),
            &device.read_values(&dx, len as u64)?,
            &rounded(&want_dx, storage),
            tolerance(storage).max(tolerance(out)),
        ),
    ])
}
