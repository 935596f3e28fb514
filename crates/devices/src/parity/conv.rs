//! conv.cu: forward, input gradient and filter gradient against naive f64 sums over every tap
//! of every window, at geometries with stride, padding, dilation, groups (depthwise included)
//! and windows cut by the border.

use super::{compare, poison, random, rounded, tolerance, Check, PRODUCTS};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::modules::conv2d::Convolution;

/// Convolutions checked, with their batch sizes: 1x1; LeNet's padded 5x5; a strided, padded
/// 3x3 over a non-square input; a dilated convolution in two groups; a depthwise one.
fn convolutions() -> [(u64, Convolution); 5] {
    let conv = |[in_channels, height, width, out_channels]: [u64; 4],
                [kernel, stride, padding, dilation, groups]: [u64; 5]| Convolution {
        in_channels,
        height,
        width,
        out_channels,
        kernel,
        stride,
        padding,
        dilation,
        groups,
    };
    [
        (1, conv([1, 1, 1, 1], [1, 1, 0, 1, 1])),
        (2, conv([1, 12, 12, 6], [5, 1, 2, 1, 1])),
        (3, conv([3, 9, 7, 4], [3, 2, 1, 1, 1])),
        (2, conv([4, 8, 9, 6], [3, 1, 2, 2, 2])),
        (2, conv([6, 7, 7, 6], [3, 2, 1, 1, 6])),
    ]
}

/// The input place of output place `i` read by tap `a`, if inside the input of side `size`.
pub fn tap(i: u64, a: u64, (stride, padding, dilation): (u64, u64, u64), size: u64) -> Option<u64> {
    let r = (i * stride + a * dilation).checked_sub(padding)?;
    (r < size).then_some(r)
}

/// Every `(input index, output index, weight index)` of a convolution's products.
fn terms(rows: u64, c: &Convolution) -> Vec<[usize; 3]> {
    let (in_per_group, out_per_group) = (c.in_channels / c.groups, c.out_channels / c.groups);
    let (oh, ow) = (c.out_height(), c.out_width());
    let at = (c.stride, c.padding, c.dilation);
    let mut all = Vec::new();
    for n in 0..rows {
        for o in 0..c.out_channels {
            let group = o / out_per_group;
            for (i, j) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
                let y = ((n * c.out_channels + o) * oh + i) * ow + j;
                for within in 0..in_per_group {
                    let ch = group * in_per_group + within;
                    for (a, b) in (0..c.kernel).flat_map(|a| (0..c.kernel).map(move |b| (a, b))) {
                        let (Some(r), Some(s)) = (tap(i, a, at, c.height), tap(j, b, at, c.width))
                        else {
                            continue;
                        };
                        let x = ((n * c.in_channels + ch) * c.height + r) * c.width + s;
                        let w = ((o * in_per_group + within) * c.kernel + a) * c.kernel + b;
                        all.push([x, y, w].map(|v| v as usize));
                    }
                }
            }
        }
    }
    all
}

/// Runs the convolution checks in every storage combination the products use.
pub fn check_conv<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (ab, out) in PRODUCTS {
        for (rows, c) in convolutions() {
            let (inputs, outputs, weights) = (rows * c.inputs(), rows * c.outputs(), c.weights());
            let x = rounded(&random(inputs as usize, 21), ab);
            let w = rounded(&random(weights as usize, 22), ab);
            let dy = rounded(&random(outputs as usize, 23), ab);
            let (xd, wd, dyd) = (
                device.write_values(&x, ab)?,
                device.write_values(&w, ab)?,
                device.write_values(&dy, ab)?,
            );
            let (mut want_y, mut want_dx, mut want_dw) = (
                vec![0.0f64; outputs as usize],
                vec![0.0f64; inputs as usize],
                vec![0.0f64; weights as usize],
            );
            for [xi, yi, wi] in terms(rows, &c) {
                want_y[yi] += f64::from(x[xi]) * f64::from(w[wi]);
                want_dx[xi] += f64::from(dy[yi]) * f64::from(w[wi]);
                want_dw[wi] += f64::from(dy[yi]) * f64::from(x[xi]);
            }
            let narrow = |v: &[f64], storage| {
                rounded(&v.iter().map(|&v| v as f32).collect::<Vec<_>>(), storage)
            };
            let shape = format!(
                "{rows}x{}x{}x{} k{} s{} p{} d{} g{} -> {} {ab:?}->{out:?}",
                c.in_channels,
                c.height,
                c.width,
                c.kernel,
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
                c.out_channels
            );
            // Forward and input gradient store as their operands do; the filter gradient as
            // its buffer says (f32 from 16-bit operands when mixed).
            if ab == out {
                let mut y = device.write_values(&poison(outputs as usize), ab)?;
                device.conv2d_forward(&xd, &wd, &mut y, rows, &c)?;
                checks.push(compare(
                    format!("conv2d forward {shape}"),
                    &device.read_values(&y, outputs)?,
                    &narrow(&want_y, ab),
                    tolerance(ab),
                ));
                let mut dx = device.write_values(&poison(inputs as usize), ab)?;
                device.conv2d_input_gradient(&dyd, &wd, &mut dx, rows, &c)?;
                checks.push(compare(
                    format!("conv2d input gradient {shape}"),
                    &device.read_values(&dx, inputs)?,
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
