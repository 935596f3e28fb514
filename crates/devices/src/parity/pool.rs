//! pool.cu: max pooling (values, the places of the maxima, ties and a NaN included), average
//! pooling (both divisors) and adaptive average pooling, forward and backward, against naive
//! f64 references over every tap of every window.

use super::conv::tap;
use super::{compare, poison, random, rounded, tolerance, Check, STORAGES};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::modules::adaptive_avg_pool2d::AdaptivePooling;
use headroom_engine::modules::pooling::{pooled_side, PoolKind, Pooling};
use headroom_engine::plan::Storage;

/// A pooling of `kind` over `channels x height x width`: `[kernel, stride, padding, dilation]`,
/// `ceil_mode` and `count_include_pad`.
fn pooling(
    kind: PoolKind,
    [channels, height, width]: [u64; 3],
    [kernel, stride, padding, dilation]: [u64; 4],
    ceil_mode: bool,
    count_include_pad: bool,
) -> Pooling {
    let side = |size| pooled_side(size, kernel, stride, padding, dilation, ceil_mode);
    Pooling {
        kind,
        channels,
        height,
        width,
        kernel,
        stride,
        padding,
        dilation,
        out_height: side(height).expect("a window fits"),
        out_width: side(width).expect("a window fits"),
        count_include_pad,
    }
}

/// The poolings checked, with their batch sizes: a 1x1 window, LeNet's 2x2, a padded 3x3 over
/// a non-square input, a last window past the border (`ceil_mode`), and per kind a dilated max
/// or an average that does not count the padding.
fn poolings(kind: PoolKind) -> [(u64, Pooling); 5] {
    let last = match kind {
        PoolKind::Max => pooling(kind, [2, 9, 9], [3, 1, 2, 2], false, true),
        PoolKind::Average => pooling(kind, [2, 7, 9], [3, 2, 1, 1], false, false),
    };
    [
        (1, pooling(kind, [1, 1, 1], [1, 1, 0, 1], false, true)),
        (2, pooling(kind, [6, 12, 12], [2, 2, 0, 1], false, true)),
        (3, pooling(kind, [2, 7, 9], [3, 2, 1, 1], false, true)),
        (2, pooling(kind, [3, 7, 7], [3, 2, 1, 1], true, true)),
        (2, last),
    ]
}

/// What a pooling should give: each output's value, the place of a maximum, and each input's
/// gradient from `dy`.
struct Expected {
    y: Vec<f32>,
    places: Vec<f32>,
    dx: Vec<f32>,
}

/// The naive pooling of `x` (`rows` samples) and its backward from `dy`.
fn expected(rows: u64, p: &Pooling, x: &[f32], dy: &[f32]) -> Expected {
    let (oh, ow, plane_len) = (p.out_height, p.out_width, p.height * p.width);
    let mut y = vec![0.0f32; dy.len()];
    let mut places = vec![0.0f32; dy.len()];
    let mut dx = vec![0.0f64; x.len()];
    let at = (p.stride, p.padding, p.dilation);
    for plane in 0..rows * p.channels {
        for (i, j) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
            let out = ((plane * oh + i) * ow + j) as usize;
            let taps: Vec<u64> = (0..p.kernel)
                .flat_map(|a| (0..p.kernel).map(move |b| (a, b)))
                .filter_map(|(a, b)| {
                    Some(tap(i, a, at, p.height)? * p.width + tap(j, b, at, p.width)?)
                })
                .collect();
            let index = |place: u64| (plane * plane_len + place) as usize;
            match p.kind {
                PoolKind::Max => {
                    let best = taps.iter().copied().fold(taps[0], |best, place| {
                        let (v, b) = (x[index(place)], x[index(best)]);
                        match v > b || (v.is_nan() && !b.is_nan()) {
                            true => place,
                            false => best,
                        }
                    });
                    y[out] = x[index(best)];
                    places[out] = best as f32;
                    dx[index(best)] += f64::from(dy[out]);
                }
                PoolKind::Average => {
                    let divisor = average_divisor(p, i, j) as f64;
                    let sum: f64 = taps.iter().map(|&place| f64::from(x[index(place)])).sum();
                    y[out] = (sum / divisor) as f32;
                    for &place in &taps {
                        dx[index(place)] += f64::from(dy[out]) / divisor;
                    }
                }
            }
        }
    }
    Expected {
        y,
        places,
        dx: dx.iter().map(|&v| v as f32).collect(),
    }
}

/// Average pooling's divisor at output `(i, j)`, counted tap by tap: taps inside the padded
/// input with `count_include_pad`, inside the input without.
fn average_divisor(p: &Pooling, i: u64, j: u64) -> u64 {
    let counted = |index: u64, size: u64| {
        (0..p.kernel)
            .map(|a| (index * p.stride + a) as i64 - p.padding as i64)
            .filter(|&r| match p.count_include_pad {
                true => r < (size + p.padding) as i64,
                false => r >= 0 && r < size as i64,
            })
            .count() as u64
    };
    counted(i, p.height) * counted(j, p.width)
}

/// A NaN maximum must come back as a NaN: compared as a marker value.
fn unnan(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| if v.is_nan() { 1e9 } else { v })
        .collect()
}

/// Runs the pooling checks in every storage.
pub fn check_pool<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for storage in STORAGES {
        for kind in [PoolKind::Max, PoolKind::Average] {
            for (rows, p) in poolings(kind) {
                checks.extend(check_pooling(device, rows, &p, storage)?);
            }
        }
        for (rows, side, out) in [
            (2u64, [7u64, 9], [1u64, 1]),
            (2, [7, 9], [3, 4]),
            (1, [5, 5], [7, 7]),
        ] {
            checks.extend(check_adaptive(device, rows, side, out, storage)?);
        }
    }
    Ok(checks)
}

fn check_pooling<K: Transfer>(
    device: &mut K,
    rows: u64,
    p: &Pooling,
    storage: Storage,
) -> Result<Vec<Check>, DeviceError> {
    let (inputs, outputs) = (rows * p.inputs(), rows * p.outputs());
    let mut x = rounded(&random(inputs as usize, 24), storage);
    // Ties (the first wins) and a NaN (it wins) in the first window.
    if inputs >= 4 {
        x[1] = x[0];
        x[p.width as usize] = f32::NAN;
    }
    let dy = rounded(&random(outputs as usize, 25), storage);
    let want = expected(rows, p, &x, &dy);
    let (xd, dyd) = (
        device.write_values(&x, storage)?,
        device.write_values(&dy, storage)?,
    );
    let shape = format!(
        "{:?} {rows}x{}x{}x{} k{} s{} p{} d{} -> {}x{} include_pad={} {storage:?}",
        p.kind,
        p.channels,
        p.height,
        p.width,
        p.kernel,
        p.stride,
        p.padding,
        p.dilation,
        p.out_height,
        p.out_width,
        p.count_include_pad
    );
    let mut checks = Vec::new();
    let mut y = device.write_values(&poison(outputs as usize), storage)?;
    let mut dx = device.write_values(&poison(inputs as usize), storage)?;
    match p.kind {
        PoolKind::Max => {
            let mut indices = device.index_zeroed(outputs)?;
            device.max_pool_forward(&xd, &mut y, &mut indices, rows, p)?;
            let places = device.read_index(&indices, outputs)?;
            checks.push(compare(
                format!("pool places {shape}"),
                &places.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &want.places,
                0.0,
            ));
            device.max_pool_backward(&dyd, &indices, &mut dx, rows, p)?;
        }
        PoolKind::Average => {
            device.avg_pool_forward(&xd, &mut y, rows, p)?;
            device.avg_pool_backward(&dyd, &mut dx, rows, p)?;
        }
    }
    checks.push(compare(
        format!("pool forward {shape}"),
        &unnan(&device.read_values(&y, outputs)?),
        &unnan(&rounded(&want.y, storage)),
        tolerance(storage),
    ));
    checks.push(compare(
        format!("pool backward {shape}"),
        &device.read_values(&dx, inputs)?,
        &rounded(&want.dx, storage),
        tolerance(storage),
    ));
    Ok(checks)
}

/// Adaptive average pooling of `rows` samples of 3 channels of `[height, width]` to
/// `[out_height, out_width]`: window `i` of `n` over a side of `size` spans
/// `floor(i size / n) .. ceil((i + 1) size / n)`.
fn check_adaptive<K: Transfer>(
    device: &mut K,
    rows: u64,
    [height, width]: [u64; 2],
    [out_height, out_width]: [u64; 2],
    storage: Storage,
) -> Result<Vec<Check>, DeviceError> {
    let p = AdaptivePooling {
        channels: 3,
        height,
        width,
        out_height,
        out_width,
    };
    let (inputs, outputs) = (rows * p.inputs(), rows * p.outputs());
    let x = rounded(&random(inputs as usize, 26), storage);
    let dy = rounded(&random(outputs as usize, 27), storage);
    let span = |i: u64, n: u64, size: u64| (i * size / n)..((i + 1) * size).div_ceil(n);
    let (mut want_y, mut want_dx) = (
        vec![0.0f64; outputs as usize],
        vec![0.0f64; inputs as usize],
    );
    for plane in 0..rows * p.channels {
        for (i, j) in (0..out_height).flat_map(|i| (0..out_width).map(move |j| (i, j))) {
            let out = ((plane * out_height + i) * out_width + j) as usize;
            let window: Vec<usize> = span(i, out_height, height)
                .flat_map(|r| span(j, out_width, width).map(move |s| r * width + s))
                .map(|place| (plane * height * width + place) as usize)
                .collect();
            let size = window.len() as f64;
            want_y[out] = window.iter().map(|&k| f64::from(x[k])).sum::<f64>() / size;
            for &k in &window {
                want_dx[k] += f64::from(dy[out]) / size;
            }
        }
    }
    let (xd, dyd) = (
        device.write_values(&x, storage)?,
        device.write_values(&dy, storage)?,
    );
    let mut y = device.write_values(&poison(outputs as usize), storage)?;
    let mut dx = device.write_values(&poison(inputs as usize), storage)?;
    device.adaptive_pool_forward(&xd, &mut y, rows, &p)?;
    device.adaptive_pool_backward(&dyd, &mut dx, rows, &p)?;
    let narrow = |v: &[f64]| rounded(&v.iter().map(|&v| v as f32).collect::<Vec<_>>(), storage);
    let shape = format!("{rows}x3x{height}x{width} -> {out_height}x{out_width} {storage:?}");
    Ok(vec![
        compare(
            format!("adaptive pool forward {shape}"),
            &device.read_values(&y, outputs)?,
            &narrow(&want_y),
            tolerance(storage),
        ),
        compare(
            format!("adaptive pool backward {shape}"),
            &device.read_values(&dx, inputs)?,
            &narrow(&want_dx),
            tolerance(storage),
        ),
    ])
}
