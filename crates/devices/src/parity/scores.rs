//! Checks of `scores.cu`, eager attention's kernels, against references written here in f64:
//! the batched product in each layout eager attention reads (a projection's heads, scores and
//! probabilities, transposed or not) at sizes that are not multiples of its tile; the causal
//! mask bit for bit into every storage it writes; the row softmax over masked rows and its
//! backward; and the repetition of key/value heads (bit for bit) and its sum.

use super::{compare, compare_bits, poison, random, round, rounded, tolerance, Check, STORAGES};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::Storage;
use headroom_engine::program::geometry::{BatchedProduct, HeadGroups, Strides};

/// Runs the eager attention checks on `device`.
pub fn check_scores<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for storage in STORAGES {
        for (batch, heads, t, d) in [(1u64, 1u64, 1u64, 1u64), (2, 3, 17, 5), (1, 2, 33, 20)] {
            checks.extend(check_products(device, storage, batch, heads, t, d)?);
        }
        checks.push(check_mask(device, storage)?);
        checks.push(check_softmax(device, storage)?);
        checks.extend(check_heads(device, storage)?);
    }
    for storage in [Storage::F32, Storage::F16, Storage::Bf16] {
        checks.push(check_softmax_backward(device, storage)?);
    }
    Ok(checks)
}

/// `c = a b` from the definition in f64, every operand read through its strides.
fn product(a: &[f32], b: &[f32], shape: &BatchedProduct, c_len: usize) -> Vec<f32> {
    let mut c = vec![f32::NAN; c_len];
    let at = |s: &Strides, n: u64, h: u64, r: u64, k: u64| {
        (n * s.batch + h * s.head + r * s.row + k * s.col) as usize
    };
    for n in 0..shape.batch {
        for h in 0..shape.heads {
            for i in 0..shape.rows {
                for j in 0..shape.cols {
                    let sum: f64 = (0..shape.inner)
                        .map(|k| {
                            a[at(&shape.a, n, h, i, k)] as f64 * b[at(&shape.b, n, h, k, j)] as f64
                        })
                        .sum();
                    c[at(&shape.c, n, h, i, j)] = sum as f32;
                }
            }
        }
    }
    c
}

/// The products eager attention runs over `batch x heads` heads of `t` positions and `d`
/// values: the scores `q k^T` from two projections' heads, the output `p v` into heads, and
/// the gradients `p^T dy` and `ds k` (a transposed square and a contiguous head).
fn check_products<K: Transfer>(
    device: &mut K,
    storage: Storage,
    batch: u64,
    heads: u64,
    t: u64,
    d: u64,
) -> Result<Vec<Check>, DeviceError> {
    let projection = Strides::heads(t, heads, d);
    let square = Strides::contiguous(heads, t, t);
    let head = Strides::contiguous(heads, t, d);
    let shape = |inner, cols, a, b, c| BatchedProduct {
        batch,
        heads,
        rows: t,
        inner,
        cols,
        a,
        b,
        c,
    };
    let cases = [
        (
            "q k^T",
            shape(d, t, projection, projection.transposed(), square),
        ),
        ("p v", shape(t, d, square, projection, projection)),
        ("p^T dy", shape(t, d, square.transposed(), projection, head)),
        ("ds k", shape(t, d, square, head, projection)),
    ];
    let mut checks = Vec::new();
    for (seed, (name, shape)) in cases.into_iter().enumerate() {
        let (a_len, b_len, c_len) = shape.spans();
        let a = rounded(&random(a_len as usize, 90 + seed as u64), storage);
        let b = rounded(&random(b_len as usize, 95 + seed as u64), storage);
        let want = rounded(&product(&a, &b, &shape, c_len as usize), storage);
        let (a_d, b_d) = (
            device.write_values(&a, storage)?,
            device.write_values(&b, storage)?,
        );
        let mut c = device.write_values(&poison(c_len as usize), storage)?;
        device.batched_product(&a_d, &b_d, &mut c, &shape)?;
        checks.push(compare(
            format!("batched product {name} {batch} x {heads} heads x {t} x {d} {storage:?}"),
            &device.read_values(&c, c_len)?,
            &want,
            tolerance(storage),
        ));
    }
    Ok(checks)
}

/// The causal mask over 3 matrices of 7 positions from `from`, into `from`'s storage and f32
/// (the sum with an f32 mask under autocast).
fn check_mask<K: Transfer>(device: &mut K, from: Storage) -> Result<Check, DeviceError> {
    let (matrices, t) = (3u64, 7u64);
    let len = (matrices * t * t) as usize;
    let x = rounded(&random(len, 80), from);
    let x_d = device.write_values(&x, from)?;
    let mut got = Vec::new();
    let mut want = Vec::new();
    for to in [from, Storage::F32] {
        let mut y = device.write_values(&poison(len), to)?;
        device.causal_mask(&x_d, &mut y, matrices, t)?;
        got.extend(device.read_values(&y, len as u64)?);
        want.extend(x.iter().enumerate().map(|(e, &v)| {
            let (i, j) = (e as u64 / t % t, e as u64 % t);
            if j > i {
                f32::NEG_INFINITY
            } else {
                round(v, to)
            }
        }));
    }
    Ok(compare_bits(format!("causal mask {from:?}"), &got, &want))
}

/// Each row's softmax of scores in `storage`, into f32 and into `storage`, over rows of 1, 33
/// and 300 values, their scores masked as the causal mask leaves them.
fn check_softmax<K: Transfer>(device: &mut K, storage: Storage) -> Result<Check, DeviceError> {
    let mut got = Vec::new();
    let mut want = Vec::new();
    let shapes = [(3u64, 1u64), (5, 33), (2, 300)];
    for ((rows, cols), into) in [Storage::F32, storage]
        .into_iter()
        .flat_map(|into| shapes.map(|shape| (shape, into)))
    {
        let len = (rows * cols) as usize;
        let x: Vec<f32> = rounded(&random(len, 81), storage)
            .into_iter()
            .enumerate()
            .map(|(e, v)| match e as u64 % cols > e as u64 / cols {
                true => f32::NEG_INFINITY,
                false => 8.0 * v,
            })
            .collect();
        let x_d = device.write_values(&x, storage)?;
        let mut p = device.write_values(&poison(len), into)?;
        device.softmax_rows(&x_d, &mut p, rows, cols)?;
        got.extend(device.read_values(&p, len as u64)?);
        for row in x.chunks_exact(cols as usize) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            want.extend(
                row.iter()
                    .map(|&v| round(((v as f64 - max).exp() / total) as f32, into)),
            );
        }
    }
    Ok(compare(
        format!("softmax rows {storage:?}"),
        &got,
        &want,
        tolerance(storage),
    ))
}

/// The softmax's backward into `storage`, from probabilities and their gradient in f32 and in
/// `storage`, over rows of 33 values.
fn check_softmax_backward<K: Transfer>(
    device: &mut K,
    storage: Storage,
) -> Result<Check, DeviceError> {
    let (rows, cols) = (4u64, 33u64);
    let len = (rows * cols) as usize;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for from in [Storage::F32, storage] {
        let p = rounded(
            &random(len, 82)
                .iter()
                .map(|v| v.abs() / 16.0)
                .collect::<Vec<_>>(),
            from,
        );
        let dp = rounded(&random(len, 83), from);
        let (p_d, dp_d) = (
            device.write_values(&p, from)?,
            device.write_values(&dp, from)?,
        );
        let mut dx = device.write_values(&poison(len), storage)?;
        device.softmax_rows_backward(&p_d, &dp_d, &mut dx, rows, cols)?;
        got.extend(device.read_values(&dx, len as u64)?);
        for (p, dp) in p
            .chunks_exact(cols as usize)
            .zip(dp.chunks_exact(cols as usize))
        {
            let dot: f64 = p.iter().zip(dp).map(|(&p, &g)| p as f64 * g as f64).sum();
            want.extend(
                p.iter()
                    .zip(dp)
                    .map(|(&p, &g)| round((p as f64 * (g as f64 - dot)) as f32, storage)),
            );
        }
    }
    Ok(compare(
        format!("softmax rows backward {storage:?}"),
        &got,
        &want,
        tolerance(storage),
    ))
}

/// Two key/value heads repeated three times over 2 samples of 5 positions and 3 values (bit for
/// bit), and the repeated gradients summed back.
fn check_heads<K: Transfer>(device: &mut K, storage: Storage) -> Result<Vec<Check>, DeviceError> {
    let shape = HeadGroups {
        batch: 2,
        positions: 5,
        kv_heads: 2,
        groups: 3,
        head_dim: 3,
    };
    let [t, kv, g, d] = [
        shape.positions,
        shape.kv_heads,
        shape.groups,
        shape.head_dim,
    ]
    .map(|n| n as usize);
    let (grouped, repeated) = (shape.grouped() as usize, shape.repeated() as usize);
    // Element (b, h, s, e) of the repeated heads and where it comes from.
    let source = |r: usize| {
        let (e, s, h, b) = (
            r % d,
            r / d % t,
            r / (d * t) % (kv * g),
            r / (d * t * kv * g),
        );
        ((b * t + s) * kv + h / g) * d + e
    };
    let x = rounded(&random(grouped, 84), storage);
    let x_d = device.write_values(&x, storage)?;
    let mut y = device.write_values(&poison(repeated), storage)?;
    device.repeat_heads(&x_d, &mut y, &shape)?;
    let want_repeated: Vec<f32> = (0..repeated).map(|r| x[source(r)]).collect();
    let dy = rounded(&random(repeated, 85), storage);
    let dy_d = device.write_values(&dy, storage)?;
    let mut dx = device.write_values(&poison(grouped), storage)?;
    device.sum_head_groups(&dy_d, &mut dx, &shape)?;
    let mut sums = vec![0.0f64; grouped];
    for (r, &v) in dy.iter().enumerate() {
        sums[source(r)] += v as f64;
    }
    let want_sums: Vec<f32> = sums.iter().map(|&v| round(v as f32, storage)).collect();
    Ok(vec![
        compare_bits(
            format!("repeat heads {storage:?}"),
            &device.read_values(&y, repeated as u64)?,
            &want_repeated,
        ),
        compare(
            format!("sum head groups {storage:?}"),
            &device.read_values(&dx, grouped as u64)?,
            &want_sums,
            tolerance(storage),
        ),
    ])
}
