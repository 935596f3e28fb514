//! One check per kernel family, in every storage combination a precision uses.

use super::reference;
use super::{
    compare, compare_bits, poison, random, round, rounded, tolerance, Check, PRODUCTS, STORAGES,
};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::{OptimizerKind, Storage};
use headroom_engine::program::OptimizerState;
use headroom_engine::step::UpdateRule;
use headroom_engine::synthetic;

/// Runs every kernel check on `device`.
pub fn check_kernels<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = check_fill(device)?;
    checks.extend(check_gemm(device)?);
    checks.extend(super::elementwise::check_elementwise(device)?);
    checks.extend(check_convert(device)?);
    checks.extend(check_copy_range(device)?);
    checks.extend(check_reduce(device)?);
    checks.extend(check_loss(device)?);
    checks.extend(check_optimizer(device)?);
    checks.extend(check_dropout(device)?);
    checks.extend(super::conv::check_conv(device)?);
    checks.extend(super::pool::check_pool(device)?);
    checks.extend(super::norm::check_batch_norm(device)?);
    checks.extend(super::norm::check_layer_norm(device)?);
    checks.extend(super::embedding::check_embedding(device)?);
    checks.extend(super::attention::check_attention(device)?);
    checks.extend(super::attention::check_rotary(device)?);
    checks.extend(super::scores::check_scores(device)?);
    Ok(checks)
}

/// dropout.cu: the mask drawn from the synthetic stream, the kept values scaled and the backward
/// through that mask, bit for bit, in every storage.
fn check_dropout<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    let through = |mask: &[bool], values: &[f32], p: f32| -> Vec<f32> {
        let scale = synthetic::dropout_scale(p);
        mask.iter()
            .zip(values)
            .map(|(&kept, &v)| if kept { v * scale } else { 0.0 })
            .collect()
    };
    for storage in STORAGES {
        for (len, p) in [(1usize, 0.5f32), (1000, 0.1), (7 * 129, 0.5), (4099, 0.9)] {
            let n = len as u64;
            let key = synthetic::stream_key(9, synthetic::dropout_stream(len));
            let kept: Vec<bool> = (0..n).map(|i| synthetic::keeps(key, i, p)).collect();
            let inputs = rounded(&random(len, 11), storage);
            let x = device.write_values(&inputs, storage)?;
            let mut y = device.write_values(&poison(len), storage)?;
            let mut mask = device.mask_zeroed(n)?;
            device.dropout_forward(&x, &mut mask, &mut y, n, p, key)?;
            let name = format!("n={len} p={p} {storage:?}");
            checks.push(compare_bits(
                format!("dropout_forward {name}"),
                &device.read_values(&y, n)?,
                &rounded(&through(&kept, &inputs, p), storage),
            ));
            let as_f32 = |bytes: Vec<u8>| bytes.into_iter().map(f32::from).collect::<Vec<_>>();
            checks.push(compare_bits(
                format!("dropout mask {name}"),
                &as_f32(device.read_mask(&mask, n)?),
                &as_f32(kept.iter().map(|&k| u8::from(k)).collect()),
            ));
            let gradients = rounded(&random(len, 12), storage);
            let grad = device.write_values(&gradients, storage)?;
            let mut dx = device.write_values(&poison(len), storage)?;
            device.dropout_backward(&grad, &mask, &mut dx, n, p)?;
            checks.push(compare_bits(
                format!("dropout_backward {name}"),
                &device.read_values(&dx, n)?,
                &rounded(&through(&kept, &gradients, p), storage),
            ));
        }
    }
    Ok(checks)
}

/// The layer shapes the products and column sums are checked at: rows x inputs -> outputs.
const LAYER_SHAPES: [(usize, usize, usize); 4] =
    [(1, 1, 1), (7, 784, 10), (129, 7, 1000), (1000, 129, 7)];

/// fill.cu: the synthetic stream and the labels, bit for bit, in every storage.
fn check_fill<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for storage in STORAGES {
        for len in [1usize, 1000, 7 * 129] {
            let key = synthetic::stream_key(3, 4);
            let mut out = device.write_values(&poison(len), storage)?;
            device.fill_uniform(&mut out, len as u64, key, 0.25)?;
            let mut want = vec![0.0; len];
            synthetic::fill_uniform(&mut want, key, 0.25);
            checks.push(compare_bits(
                format!("fill_uniform n={len} {storage:?}"),
                &device.read_values(&out, len as u64)?,
                &rounded(&want, storage),
            ));
        }
        for (rows, features, classes) in [(1usize, 1usize, 10usize), (129, 784, 10), (1000, 7, 129)]
        {
            let inputs = rounded(&random(rows * features, 5), storage);
            let x = device.write_values(&inputs, storage)?;
            let mut labels = device.write_u32(&vec![u32::MAX; rows])?;
            let (r, f, c) = (rows as u64, features as u64, classes as u64);
            device.fill_labels(&mut labels, &x, r, f, c)?;
            let mut want = vec![0u32; rows];
            synthetic::fill_labels(&mut want, &inputs, features, classes);
            // Labels are small integers, exact as f32.
            let as_f32 = |labels: &[u32]| labels.iter().map(|&v| v as f32).collect::<Vec<_>>();
            checks.push(compare_bits(
                format!("fill_labels {rows}x{features} classes={classes} {storage:?}"),
                &as_f32(&device.read_u32(&labels, r)?),
                &as_f32(&want),
            ));
        }
    }
    Ok(checks)
}

/// `c (m x n) = a * b` in f64, rounded to `storage`.
fn naive_product(
    (m, k, n): (usize, usize, usize),
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
    storage: Storage,
) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let sum = (0..k).map(|l| a(i, l) as f64 * b(l, j) as f64).sum::<f64>();
            c[i * n + j] = round(sum as f32, storage);
        }
    }
    c
}

/// gemm.cu: the three products of a linear layer against a naive f64 product.
fn check_gemm<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (ab, c) in PRODUCTS {
        for (rows, inputs, outputs) in LAYER_SHAPES {
            let x = rounded(&random(rows * inputs, 1), ab);
            let w = rounded(&random(outputs * inputs, 2), ab);
            let dy = rounded(&random(rows * outputs, 3), ab);
            let (xd, wd, dyd) = (
                device.write_values(&x, ab)?,
                device.write_values(&w, ab)?,
                device.write_values(&dy, ab)?,
            );
            let (r, i, o) = (rows as u64, inputs as u64, outputs as u64);
            let shape = format!("{rows}x{inputs}->{outputs} {ab:?}->{c:?}");

            let mut y = device.write_values(&poison(rows * outputs), c)?;
            device.linear_forward(&xd, &wd, &mut y, r, i, o)?;
            let want = naive_product(
                (rows, inputs, outputs),
                |a, l| x[a * inputs + l],
                |l, b| w[b * inputs + l],
                c,
            );
            let got = device.read_values(&y, r * o)?;
            checks.push(compare(
                format!("gemm forward {shape}"),
                &got,
                &want,
                tolerance(c),
            ));

            let mut dw = device.write_values(&poison(outputs * inputs), c)?;
            device.weight_gradient(&dyd, &xd, &mut dw, r, i, o)?;
            let want = naive_product(
                (outputs, rows, inputs),
                |a, l| dy[l * outputs + a],
                |l, b| x[l * inputs + b],
                c,
            );
            let got = device.read_values(&dw, o * i)?;
            let name = format!("gemm weight gradient {shape}");
            checks.push(compare(name, &got, &want, tolerance(c)));

            let mut dx = device.write_values(&poison(rows * inputs), c)?;
            device.input_gradient(&dyd, &wd, &mut dx, r, i, o)?;
            let want = naive_product(
                (rows, outputs, inputs),
                |a, l| dy[a * outputs + l],
                |l, b| w[l * inputs + b],
                c,
            );
            let got = device.read_values(&dx, r * i)?;
            let name = format!("gemm input gradient {shape}");
            checks.push(compare(name, &got, &want, tolerance(c)));
        }
    }
    Ok(checks)
}

/// Values at every edge of 16-bit rounding: ties to even, subnormals, overflow, NaN.
fn conversion_values() -> Vec<f32> {
    let mut values = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 + 1.0 / 256.0,  // a bf16 tie
        1.0 + 3.0 / 256.0,  // a bf16 tie that rounds up
        1.0 + 1.0 / 2048.0, // an f16 tie
        65504.0,            // the largest f16
        65519.0,            // rounds down to it
        65520.0,            // rounds to f16 infinity
        6.0e-8,             // an f16 subnormal
        2.980_232_2e-8,     // 2^-25: an f16 tie between 0 and the smallest subnormal
        3.0e-8,             // just above it
        6.103_515_6e-5,     // the smallest f16 normal
        6.1e-5,             // just below: the largest f16 subnormals
        1.0e-40,            // an f32 subnormal
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    values.extend(random(997, 17).iter().map(|v| v * 70000.0));
    values
}

/// elementwise.cu's `convert`: autocast's casts and the loss scale, bit for bit against the
/// host's `half` crate.
fn check_convert<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    let values = conversion_values();
    let len = values.len() as u64;
    for (from, to, scale) in [
        (Storage::F32, Storage::Bf16, 1.0),
        (Storage::F32, Storage::F16, 1.0),
        (Storage::F32, Storage::F16, 65536.0),
        (Storage::Bf16, Storage::F32, 1.0),
        (Storage::F16, Storage::F32, 1.0),
    ] {
        let source = rounded(&values, from);
        let from_d = device.write_values(&source, from)?;
        let mut to_d = device.write_values(&poison(values.len()), to)?;
        device.convert(&from_d, &mut to_d, len, scale)?;
        let want: Vec<f32> = source.iter().map(|&v| round(v * scale, to)).collect();
        checks.push(compare_bits(
            format!("convert n={len} {from:?}->{to:?} x{scale}"),
            &device.read_values(&to_d, len)?,
            &want,
        ));
    }
    Ok(checks)
}

/// elementwise.cu's `copy_range`: a range moved between offsets, bit for bit, the values around
/// it untouched, in every storage.
fn check_copy_range<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    let (len, from_offset, to_offset) = (1000, 37, 523);
    for storage in [Storage::F32, Storage::Bf16, Storage::F16] {
        let source = rounded(&random(from_offset + len + 11, 5), storage);
        let target = rounded(&random(to_offset + len + 29, 6), storage);
        let from_d = device.write_values(&source, storage)?;
        let mut to_d = device.write_values(&target, storage)?;
        let at = |offset: usize| offset as u64;
        device.copy_range(
            (&from_d, at(from_offset)),
            (&mut to_d, at(to_offset)),
            at(len),
        )?;
        let mut want = target.clone();
        want[to_offset..to_offset + len].copy_from_slice(&source[from_offset..from_offset + len]);
        checks.push(compare_bits(
            format!("copy_range n={len} {storage:?} {from_offset}->{to_offset}"),
            &device.read_values(&to_d, at(target.len()))?,
            &want,
        ));
    }
    Ok(checks)
}

/// reduce.cu: column sums (bias gradients) from and into each storage, the mean, and the
/// overflow check.
fn check_reduce<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (from, to) in [
        (Storage::F32, Storage::F32),
        (Storage::Bf16, Storage::F32),
        (Storage::F16, Storage::F32),
        (Storage::Bf16, Storage::Bf16),
    ] {
        for (rows, _, outputs) in LAYER_SHAPES {
            let dy = rounded(&random(rows * outputs, 3), from);
            let dyd = device.write_values(&dy, from)?;
            let mut db = device.write_values(&poison(outputs), to)?;
            device.bias_gradient(&dyd, &mut db, rows as u64, outputs as u64, 1)?;
            let want = reference::column_sums(&dy, outputs);
            checks.push(compare(
                format!("bias gradient {rows}x{outputs} {from:?}->{to:?}"),
                &device.read_values(&db, outputs as u64)?,
                &rounded(&want, to),
                tolerance(to),
            ));
        }
    }
    for (rows, channels, spatial) in [(1usize, 1usize, 2usize), (3, 6, 784), (129, 16, 25)] {
        let (from, to) = (Storage::Bf16, Storage::F32);
        let dy = rounded(&random(rows * channels * spatial, 26), from);
        let dyd = device.write_values(&dy, from)?;
        let mut db = device.write_values(&poison(channels), to)?;
        let (r, c, k) = (rows as u64, channels as u64, spatial as u64);
        device.bias_gradient(&dyd, &mut db, r, c, k)?;
        let mut want = vec![0.0f64; channels];
        for (i, &v) in dy.iter().enumerate() {
            want[i / spatial % channels] += f64::from(v);
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        checks.push(compare(
            format!("channel sum {rows}x{channels}x{spatial} {from:?}->{to:?}"),
            &device.read_values(&db, c)?,
            &want,
            tolerance(to),
        ));
    }
    for len in [1usize, 1000, 129 * 784] {
        let values = random(len, 12);
        let buffer = device.write_values(&values, Storage::F32)?;
        let mut accumulator = device.write_values(&[f32::NAN], Storage::F32)?;
        let got = device.mean(&buffer, len as u64, &mut accumulator)?;
        let want = [reference::mean(&values)];
        checks.push(compare(
            format!("mean n={len}"),
            &[got],
            &want,
            super::TOLERANCE,
        ));
    }
    for storage in STORAGES {
        let clean = random(1000, 18);
        for (poisoned, at) in [(None, 0), (Some(f32::INFINITY), 999), (Some(f32::NAN), 0)] {
            let mut values = clean.clone();
            if let Some(bad) = poisoned {
                values[at] = bad;
            }
            let a = device.write_values(&random(7, 19), storage)?;
            let b = device.write_values(&values, storage)?;
            let mut flag = device.write_values(&[f32::NAN], Storage::F32)?;
            let found = device.any_nonfinite(&[(&a, 7), (&b, 1000)], &mut flag)?;
            checks.push(compare(
                format!("nonfinite {poisoned:?} at {at} {storage:?}"),
                &[f32::from(u8::from(found))],
                &[f32::from(u8::from(poisoned.is_some()))],
                0.0,
            ));
        }
    }
    Ok(checks)
}

/// loss.cu: the per-row loss and the logits' gradient, with logits large enough to overflow a
/// naive softmax, from f32 logits (32-true, and the f32 copy when mixed) and bf16 (bf16-true).
fn check_loss<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for storage in [Storage::F32, Storage::Bf16] {
        for (rows, classes) in [(1usize, 10usize), (129, 10), (7, 1000)] {
            let logit_values: Vec<f32> = random(rows * classes, 11)
                .iter()
                .map(|v| round(v * 30.0, storage))
                .collect();
            let label_values: Vec<u32> = (0..rows).map(|r| ((r * 7919) % classes) as u32).collect();
            let mut logits = device.write_values(&logit_values, storage)?;
            let labels = device.write_u32(&label_values)?;
            let mut loss = device.write_values(&poison(rows), Storage::F32)?;
            let (r, c) = (rows as u64, classes as u64);
            device.softmax_cross_entropy(&mut logits, &labels, &mut loss, r, c)?;
            let (want_loss, want_grad) =
                reference::softmax_cross_entropy(&logit_values, &label_values, classes);
            let name = format!("{rows}x{classes} {storage:?}");
            checks.push(compare(
                format!("softmax cross-entropy loss {name}"),
                &device.read_values(&loss, r)?,
                &want_loss,
                super::TOLERANCE,
            ));
            checks.push(compare(
                format!("softmax cross-entropy gradient {name}"),
                &device.read_values(&logits, r * c)?,
                &rounded(&want_grad, storage),
                tolerance(storage),
            ));
        }
    }
    Ok(checks)
}

/// optimizer.cu: one update of every optimizer, parameters and state: in f32, in f32 with the
/// loss scale undone, and in bf16 (bf16-true).
fn check_optimizer<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (storage, grad_scale) in [
        (Storage::F32, 1.0),
        (Storage::F32, 1.0 / 1024.0),
        (Storage::Bf16, 1.0),
    ] {
        for kind in [
            OptimizerKind::Sgd,
            OptimizerKind::SgdMomentum,
            OptimizerKind::Adam,
            OptimizerKind::Adamw,
        ] {
            checks.extend(check_update(device, kind, storage, grad_scale)?);
        }
    }
    Ok(checks)
}

fn check_update<K: Transfer>(
    device: &mut K,
    kind: OptimizerKind,
    storage: Storage,
    grad_scale: f32,
) -> Result<Vec<Check>, DeviceError> {
    let len = 1000usize;
    let param_values = rounded(&random(len, 13), storage);
    let grad_values: Vec<f32> = random(len, 14)
        .iter()
        .map(|g| round(g / grad_scale, storage))
        .collect();
    let state_values: Vec<Vec<f32>> = (0..kind.state_per_parameter())
        .map(|i| {
            let values: Vec<f32> = random(len, 15 + i).iter().map(|v| v.abs() * 0.1).collect();
            rounded(&values, storage)
        })
        .collect();
    let rule = UpdateRule {
        grad_scale,
        ..UpdateRule::new(kind, 0.01, 3)
    };
    let mut param = device.write_values(&param_values, storage)?;
    let grad = device.write_values(&grad_values, storage)?;
    let mut state = match &state_values[..] {
        [] => OptimizerState::Sgd,
        [velocity] => OptimizerState::Momentum {
            velocity: device.write_values(velocity, storage)?,
        },
        [m, v] => OptimizerState::Adam {
            m: device.write_values(m, storage)?,
            v: device.write_values(v, storage)?,
        },
        _ => unreachable!("optimizers keep at most two state values per parameter"),
    };
    device.optimizer_step(&mut param, &grad, &mut state, len as u64, rule)?;
    let mut want_param = param_values;
    let mut want_state = state_values;
    let state_of_reference = match &mut want_state[..] {
        [] => OptimizerState::Sgd,
        [velocity] => OptimizerState::Momentum {
            velocity: velocity.as_mut_slice(),
        },
        [m, v] => OptimizerState::Adam {
            m: m.as_mut_slice(),
            v: v.as_mut_slice(),
        },
        _ => unreachable!("optimizers keep at most two state values per parameter"),
    };
    reference::optimizer_step(&mut want_param, &grad_values, state_of_reference, rule);
    let name = format!("{kind:?} n={len} {storage:?} grads x{grad_scale}");
    let mut checks = vec![compare(
        format!("{name} update"),
        &device.read_values(&param, len as u64)?,
        &rounded(&want_param, storage),
        tolerance(storage),
    )];
    for (i, (got, want)) in state.buffers().into_iter().zip(&want_state).enumerate() {
        checks.push(compare(
            format!("{name} state {i}"),
            &device.read_values(got, len as u64)?,
            &rounded(want, storage),
            tolerance(storage),
        ));
    }
    Ok(checks)
}
