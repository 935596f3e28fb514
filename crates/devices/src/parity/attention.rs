//! Checks of `attention.cu`: the fused forward (output and log-sum-exp) and its backward
//! against a reference written here in f64 that materializes every score, at sequence lengths
//! that are not multiples of the kernels' tiles, causal and not, grouped-query and multi-query,
//! the widest head the kernels take, in every storage.

use super::{compare, poison, random, rounded, tolerance, Check, STORAGES, TOLERANCE};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::Storage;
use headroom_engine::program::geometry::Attention;
use headroom_engine::program::{AttentionGradients, AttentionSaved};

/// Runs the attention checks on `device`.
pub fn check_attention<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    // (batch, sequence, heads, kv_heads, head_dim, causal)
    let cases = [
        (1u64, 1u64, 1u64, 1u64, 1u64, false),
        (2, 70, 4, 2, 24, true),
        (1, 33, 3, 1, 8, false),
        (1, 129, 2, 2, 64, true),
        (1, 5, 1, 1, 256, false),
    ];
    let mut checks = Vec::new();
    for storage in STORAGES {
        for (batch, sequence, heads, kv_heads, head_dim, causal) in cases {
            let shape = Attention {
                batch,
                sequence,
                heads,
                kv_heads,
                head_dim,
                causal,
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
/// sequence` matrix of probabilities materialized.
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
                        want[0][qi(s, i, head) + e] += p[i][j] * v[kj(s, j, g) + e] as f64;
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
                    let ds = p[i][j] * (dp - delta);
                    for e in 0..d {
                        want[2][qi(s, i, head) + e] += ds * k[kj(s, j, g) + e] as f64 * scale;
                        want[3][kj(s, j, g) + e] += ds * q[qi(s, i, head) + e] as f64 * scale;
                        want[4][kj(s, j, g) + e] += p[i][j] * d_o[qi(s, i, head) + e] as f64;
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
        "{} x {} x {}/{} heads x {}{} {storage:?}",
        shape.batch,
        shape.sequence,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        if shape.causal { " causal" } else { "" }
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
