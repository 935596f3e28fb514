//! Checks of `conv.cu`, `pool.cu` and the per-channel bias: each against a naive reference
//! written here from the definitions (f64 sums over every window), at geometries with stride,
//! padding and windows cut by the border.

use super::{compare, poison, random, rounded, tolerance, Check, PRODUCTS, STORAGES};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::{Activation, Convolution, PoolKind, Pooling, Storage};

/// Convolutions checked: 1x1, LeNet's padded 5x5 and a strided, padded 3x3 over a
/// non-square input, at 1 to 3 samples.
fn convolutions() -> [(u64, Convolution); 3] {
    let conv = |in_channels, height, width, out_channels, kernel, stride, padding| Convolution {
        in_channels,
        height,
        width,
        out_channels,
        kernel,
        stride,
        padding,
    };
    [
        (1, conv(1, 1, 1, 1, 1, 1, 0)),
        (2, conv(1, 12, 12, 6, 5, 1, 2)),
        (3, conv(3, 9, 7, 4, 3, 2, 1)),
    ]
}

/// The input place `(r, s)` of output `(i, j)` read by kernel place `(a, b)`, if inside.
fn source(
    (i, j): (u64, u64),
    (a, b): (u64, u64),
    (stride, padding): (u64, u64),
    (height, width): (u64, u64),
) -> Option<(u64, u64)> {
    let r = (i * stride + a).checked_sub(padding)?;
    let s = (j * stride + b).checked_sub(padding)?;
    (r < height && s < width).then_some((r, s))
}

/// Every `(sample, output channel, i, j, input channel, a, b, r, s)` term of a convolution:
/// the one loop the three references share.
fn terms(rows: u64, c: &Convolution) -> Vec<[u64; 9]> {
    let mut all = Vec::new();
    for n in 0..rows {
        for o in 0..c.out_channels {
            for i in 0..c.out_height() {
                for j in 0..c.out_width() {
                    for ch in 0..c.in_channels {
                        for a in 0..c.kernel {
                            for b in 0..c.kernel {
                                let at = (c.stride, c.padding);
                                if let Some((r, s)) =
                                    source((i, j), (a, b), at, (c.height, c.width))
                                {
                                    all.push([n, o, i, j, ch, a, b, r, s]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    all
}

/// conv.cu: forward, input gradient and filter gradient against naive f64 sums, in every
/// storage combination the products use.
pub fn check_conv<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (ab, out) in PRODUCTS {
        for (rows, c) in convolutions() {
            let (inputs, outputs, weights) = (c.inputs(), c.outputs(), c.weights());
            let x = rounded(&random((rows * inputs) as usize, 21), ab);
            let w = rounded(&random(weights as usize, 22), ab);
            let dy = rounded(&random((rows * outputs) as usize, 23), ab);
            let (xd, wd, dyd) = (
                device.write_values(&x, ab)?,
                device.write_values(&w, ab)?,
                device.write_values(&dy, ab)?,
            );
            let (oh, ow) = (c.out_height(), c.out_width());
            let x_at = |n: u64, ch: u64, r: u64, s: u64| {
                ((n * c.in_channels + ch) * c.height + r) * c.width + s
            };
            let y_at =
                |n: u64, o: u64, i: u64, j: u64| ((n * c.out_channels + o) * oh + i) * ow + j;
            let w_at = |o: u64, ch: u64, a: u64, b: u64| {
                ((o * c.in_channels + ch) * c.kernel + a) * c.kernel + b
            };
            let (mut want_y, mut want_dx, mut want_dw) = (
                vec![0.0f64; (rows * outputs) as usize],
                vec![0.0f64; (rows * inputs) as usize],
                vec![0.0f64; weights as usize],
            );
            for [n, o, i, j, ch, a, b, r, s] in terms(rows, &c) {
                let (xi, yi, wi) = (
                    x_at(n, ch, r, s) as usize,
                    y_at(n, o, i, j) as usize,
                    w_at(o, ch, a, b) as usize,
                );
                want_y[yi] += x[xi] as f64 * w[wi] as f64;
                want_dx[xi] += dy[yi] as f64 * w[wi] as f64;
                want_dw[wi] += dy[yi] as f64 * x[xi] as f64;
            }
            let narrow = |v: &[f64], storage| {
                rounded(&v.iter().map(|&v| v as f32).collect::<Vec<_>>(), storage)
            };
            let shape = format!(
                "{rows}x{}x{}x{} k{} s{} p{} -> {} {ab:?}->{out:?}",
                c.in_channels, c.height, c.width, c.kernel, c.stride, c.padding, c.out_channels
            );
            // Forward and input gradient store as their operands do; the filter gradient as
            // its buffer says (f32 from 16-bit operands when mixed).
            if ab == out {
                let mut y = device.write_values(&poison((rows * outputs) as usize), ab)?;
                device.conv2d_forward(&xd, &wd, &mut y, rows, &c)?;
                checks.push(compare(
                    format!("conv2d forward {shape}"),
                    &device.read_values(&y, rows * outputs)?,
                    &narrow(&want_y, ab),
                    tolerance(ab),
                ));
                let mut dx = device.write_values(&poison((rows * inputs) as usize), ab)?;
                device.conv2d_input_gradient(&dyd, &wd, &mut dx, rows, &c)?;
                checks.push(compare(
                    format!("conv2d input gradient {shape}"),
                    &device.read_values(&dx, rows * inputs)?,
                    &narrow(&want_dx, ab),
                    tolerance(ab),
                ));
            }
            let mut dw = device.write_values(&poison(weights as usize), out)?;
            device.conv2d_weight_gradient(&dyd, &xd, &mut dw, rows, &c)?;
            checks.push(compare(
                format!("conv2d weight gradient {shape}"),
                &device.read_values(&dw, weights)?,
                &narrow(&want_dw, out),
                tolerance(out),
            ));
        }
    }
    Ok(checks)
}

/// pool.cu: max pooling (values, the places of the maxima, ties and a NaN included) and
/// average pooling, forward and backward, in every storage.
pub fn check_pool<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    let pool = |kind, channels, height, width, kernel, stride, padding| Pooling {
        kind,
        channels,
        height,
        width,
        kernel,
        stride,
        padding,
    };
    for storage in STORAGES {
        for kind in [PoolKind::Max, PoolKind::Average] {
            for (rows, p) in [
                (1u64, pool(kind, 1, 1, 1, 1, 1, 0)),
                (2, pool(kind, 6, 12, 12, 2, 2, 0)),
                (3, pool(kind, 2, 7, 9, 3, 2, 1)),
            ] {
                let (inputs, outputs) = (rows * p.inputs(), rows * p.outputs());
                let mut x = rounded(&random(inputs as usize, 24), storage);
                // Ties (the first wins) and a NaN (it wins) in the first window.
                if inputs >= 4 {
                    x[1] = x[0];
                    x[p.width as usize] = f32::NAN;
                }
                let dy = rounded(&random(outputs as usize, 25), storage);
                let (xd, dyd) = (
                    device.write_values(&x, storage)?,
                    device.write_values(&dy, storage)?,
                );
                let (oh, ow) = (p.out_height(), p.out_width());
                let (mut want_y, mut want_at, mut want_dx) = (
                    vec![0.0f32; outputs as usize],
                    vec![0i64; outputs as usize],
                    vec![0.0f64; inputs as usize],
                );
                let area = (p.kernel * p.kernel) as f64;
                for plane in 0..rows * p.channels {
                    for i in 0..oh {
                        for j in 0..ow {
                            let out = ((plane * oh + i) * ow + j) as usize;
                            let mut places = Vec::new();
                            for a in 0..p.kernel {
                                for b in 0..p.kernel {
                                    let at = (p.stride, p.padding);
                                    if let Some((r, s)) =
                                        source((i, j), (a, b), at, (p.height, p.width))
                                    {
                                        places.push(r * p.width + s);
                                    }
                                }
                            }
                            let value =
                                |place: u64| x[(plane * p.height * p.width + place) as usize];
                            match kind {
                                PoolKind::Max => {
                                    let best =
                                        places.iter().copied().fold(places[0], |best, at| {
                                            let (v, b) = (value(at), value(best));
                                            if v > b || (v.is_nan() && !b.is_nan()) {
                                                at
                                            } else {
                                                best
                                            }
                                        });
                                    want_y[out] = value(best);
                                    want_at[out] = best as i64;
                                    want_dx[(plane * p.height * p.width + best) as usize] +=
                                        dy[out] as f64;
                                }
                                PoolKind::Average => {
                                    let sum: f64 = places.iter().map(|&at| value(at) as f64).sum();
                                    want_y[out] = (sum / area) as f32;
                                    for &at in &places {
                                        want_dx[(plane * p.height * p.width + at) as usize] +=
                                            dy[out] as f64 / area;
                                    }
                                }
                            }
                        }
                    }
                }
                let shape = format!(
                    "{kind:?} {rows}x{}x{}x{} k{} s{} p{} {storage:?}",
                    p.channels, p.height, p.width, p.kernel, p.stride, p.padding
                );
                let mut y = device.write_values(&poison(outputs as usize), storage)?;
                let mut dx = device.write_values(&poison(inputs as usize), storage)?;
                match kind {
                    PoolKind::Max => {
                        let mut indices = device.index_zeroed(outputs)?;
                        device.max_pool_forward(&xd, &mut y, &mut indices, rows, &p)?;
                        let places = device.read_index(&indices, outputs)?;
                        checks.push(compare(
                            format!("pool places {shape}"),
                            &places.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                            &want_at.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                            0.0,
                        ));
                        device.max_pool_backward(&dyd, &indices, &mut dx, rows, &p)?;
                    }
                    PoolKind::Average => {
                        device.avg_pool_forward(&xd, &mut y, rows, &p)?;
                        device.avg_pool_backward(&dyd, &mut dx, rows, &p)?;
                    }
                }
                let got = device.read_values(&y, outputs)?;
                // A NaN maximum must come back as a NaN: compare it as a marker.
                let unnan = |v: &[f32]| {
                    v.iter()
                        .map(|&v| if v.is_nan() { 1e9 } else { v })
                        .collect::<Vec<_>>()
                };
                checks.push(compare(
                    format!("pool forward {shape}"),
                    &unnan(&got),
                    &unnan(&rounded(&want_y, storage)),
                    tolerance(storage),
                ));
                let want_dx: Vec<f32> = want_dx.iter().map(|&v| v as f32).collect();
                checks.push(compare(
                    format!("pool backward {shape}"),
                    &device.read_values(&dx, inputs)?,
                    &rounded(&want_dx, storage),
                    tolerance(storage),
                ));
            }
        }
    }
    Ok(checks)
}

/// elementwise.cu's bias over a convolution's positions and reduce.cu's `channel_sum`: one bias
/// per channel of `rows x channels x positions`.
pub fn check_channel_bias<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (from, to) in [
        (Storage::F32, Storage::F32),
        (Storage::Bf16, Storage::F32),
        (Storage::F16, Storage::F16),
    ] {
        for (rows, channels, spatial) in [(1usize, 1usize, 2usize), (3, 6, 784), (129, 16, 25)] {
            let len = rows * channels * spatial;
            let pre = rounded(&random(len, 26), from);
            let bias = rounded(&random(channels, 27), from);
            let mut pre_d = device.write_values(&pre, from)?;
            let bias_d = device.write_values(&bias, from)?;
            let mut post = device.write_values(&poison(len), from)?;
            let (r, c, k) = (rows as u64, channels as u64, spatial as u64);
            device.bias_activation(
                &mut pre_d,
                &bias_d,
                Some(&mut post),
                r,
                c,
                k,
                Activation::Relu,
            )?;
            let want: Vec<f32> = pre
                .iter()
                .enumerate()
                .map(|(i, &z)| (z + bias[i / spatial % channels]).max(0.0))
                .collect();
            let shape = format!("{rows}x{channels}x{spatial} {from:?}->{to:?}");
            checks.push(compare(
                format!("channel bias+relu {shape}"),
                &device.read_values(&post, len as u64)?,
                &rounded(&want, from),
                tolerance(from),
            ));
            let mut db = device.write_values(&poison(channels), to)?;
            let dy = device.write_values(&pre, from)?;
            device.bias_gradient(&dy, &mut db, r, c, k)?;
            let mut want = vec![0.0f64; channels];
            for (i, &v) in pre.iter().enumerate() {
                want[i / spatial % channels] += v as f64;
            }
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            checks.push(compare(
                format!("channel sum {shape}"),
                &device.read_values(&db, c)?,
                &rounded(&want, to),
                tolerance(to),
            ));
        }
    }
    Ok(checks)
}
