//! Checks of `norm.cu`: batch norm's forward (the batch's statistics, the normalized output,
//! the running statistics and their step count) and backward, and layer norm's (each row's
//! statistics, the output, the input's and the parameters' gradients), against references
//! written here in f64 from the definitions, in the storages the precisions use.

use super::{compare, poison, random, rounded, tolerance, Check};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::modules::batch_norm::Planes;
use headroom_engine::modules::layer_norm::NormalizedRows;
use headroom_engine::plan::Storage;
use headroom_engine::program::{
    Affine, BatchStatistics, LayerAffine, RowStatistics, RunningStatistics,
};

/// Batch norm's values (the batch, its outputs and gradients), its parameters (and running
/// statistics), and their gradients, as each precision stores them: `32-true`, the mixed ones
/// (16-bit values over f32 parameters), `bf16-true`.
const STORAGES: [(Storage, Storage, Storage); 4] = [
    (Storage::F32, Storage::F32, Storage::F32),
    (Storage::Bf16, Storage::F32, Storage::F32),
    (Storage::F16, Storage::F32, Storage::F32),
    (Storage::Bf16, Storage::Bf16, Storage::Bf16),
];

/// What the reference computes for one channel layout.
struct Reference {
    y: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    dx: Vec<f32>,
    dscale: Vec<f32>,
    dshift: Vec<f32>,
}

/// Batch norm from the definitions, in f64: `x`, `dy` are `planes`, the rest per channel.
fn reference(
    planes: &Planes,
    (x, dy): (&[f32], &[f32]),
    (scale, shift): (&[f32], &[f32]),
    (running_mean, running_var): (&[f32], &[f32]),
) -> Reference {
    let (channels, spatial) = (planes.channels as usize, planes.spatial as usize);
    let channel = |i: usize| i / spatial % channels;
    let count = planes.per_channel() as f64;
    let mut sums = vec![[0.0f64; 2]; channels];
    for (i, &v) in x.iter().enumerate() {
        sums[channel(i)][0] += f64::from(v);
    }
    let mean: Vec<f64> = sums.iter().map(|s| s[0] / count).collect();
    for (i, &v) in x.iter().enumerate() {
        sums[channel(i)][1] += (f64::from(v) - mean[channel(i)]).powi(2);
    }
    let variance: Vec<f64> = sums.iter().map(|s| s[1] / count).collect();
    let invstd: Vec<f64> = variance
        .iter()
        .map(|v| 1.0 / (v + f64::from(planes.eps)).sqrt())
        .collect();
    let xhat = |i: usize| (f64::from(x[i]) - mean[channel(i)]) * invstd[channel(i)];
    let y: Vec<f32> = (0..x.len())
        .map(|i| (xhat(i) * f64::from(scale[channel(i)]) + f64::from(shift[channel(i)])) as f32)
        .collect();
    let momentum = f64::from(planes.momentum);
    let moved =
        |old: f32, batch: f64| ((1.0 - momentum) * f64::from(old) + momentum * batch) as f32;
    let unbiased = count / (count - 1.0).max(1.0);
    let mut grad_sums = vec![[0.0f64; 2]; channels];
    for (i, &g) in dy.iter().enumerate() {
        grad_sums[channel(i)][0] += f64::from(g);
        grad_sums[channel(i)][1] += f64::from(g) * xhat(i);
    }
    let dx = (0..x.len())
        .map(|i| {
            let [sum_dy, sum_dy_xhat] = grad_sums[channel(i)];
            (f64::from(scale[channel(i)])
                * invstd[channel(i)]
                * (f64::from(dy[i]) - sum_dy / count - xhat(i) * sum_dy_xhat / count))
                as f32
        })
        .collect();
    Reference {
        y,
        mean: mean.iter().map(|&m| m as f32).collect(),
        invstd: invstd.iter().map(|&s| s as f32).collect(),
        running_mean: (0..channels)
            .map(|c| moved(running_mean[c], mean[c]))
            .collect(),
        running_var: (0..channels)
            .map(|c| moved(running_var[c], variance[c] * unbiased))
            .collect(),
        dx,
        dscale: grad_sums.iter().map(|s| s[1] as f32).collect(),
        dshift: grad_sums.iter().map(|s| s[0] as f32).collect(),
    }
}

/// One layout checked: its planes, whether it has an affine transform, and whether backward
/// computes the input's gradient.
struct Case {
    planes: Planes,
    affine: bool,
    input_gradient: bool,
}

/// 2 samples of one channel of one value up to 129 samples of 4 channels of 3x3; with and
/// without an affine transform (`affine=False`), with and without the input's gradient (the
/// first layer's), at PyTorch's default `eps` and `momentum` and at others.
fn cases() -> [Case; 4] {
    let planes = |rows, channels, spatial, eps, momentum| Planes {
        rows,
        channels,
        spatial,
        eps,
        momentum,
    };
    [
        Case {
            planes: planes(2, 1, 1, 1e-5, 0.1),
            affine: true,
            input_gradient: true,
        },
        Case {
            planes: planes(3, 6, 25, 1e-3, 0.01),
            affine: false,
            input_gradient: true,
        },
        Case {
            planes: planes(129, 4, 9, 1e-5, 0.1),
            affine: true,
            input_gradient: false,
        },
        Case {
            planes: planes(5, 3, 1, 0.1, 0.5),
            affine: true,
            input_gradient: true,
        },
    ]
}

/// Runs the batch norm checks in every storage a precision uses.
pub fn check_batch_norm<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for storages in STORAGES {
        for case in cases() {
            checks.extend(check_case(device, &case, storages)?);
        }
    }
    Ok(checks)
}

fn check_case<K: Transfer>(
    device: &mut K,
    case: &Case,
    (values, params, grads): (Storage, Storage, Storage),
) -> Result<Vec<Check>, DeviceError> {
    let planes = &case.planes;
    let (len, c, spatial) = (
        planes.values() as usize,
        planes.channels as usize,
        planes.spatial as usize,
    );
    // An offset and a spread per channel, as a layer's outputs have.
    let x: Vec<f32> = random(len, 40)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / spatial % c) as f32) + 0.5)
        .collect();
    let x = rounded(&x, values);
    let dy = rounded(&random(len, 41), values);
    let (scale, shift) = match case.affine {
        true => (
            rounded(&random(c, 42), params),
            rounded(&random(c, 43), params),
        ),
        false => (vec![1.0; c], vec![0.0; c]),
    };
    let running_mean = rounded(&random(c, 44), params);
    let running_var = rounded(
        &random(c, 45).iter().map(|v| v.abs()).collect::<Vec<_>>(),
        params,
    );
    let want = reference(
        planes,
        (&x, &dy),
        (&scale, &shift),
        (&running_mean, &running_var),
    );

    let x_d = device.write_values(&x, values)?;
    let scale_d = device.write_values(&scale, params)?;
    let shift_d = device.write_values(&shift, params)?;
    let affine = case.affine.then_some(Affine {
        scale: &scale_d,
        shift: &shift_d,
    });
    let mut y = device.write_values(&poison(len), values)?;
    let mut saved = BatchStatistics {
        mean: device.write_values(&poison(c), Storage::F32)?,
        invstd: device.write_values(&poison(c), Storage::F32)?,
    };
    let mut running = RunningStatistics {
        mean: device.write_values(&running_mean, params)?,
        var: device.write_values(&running_var, params)?,
        steps: device.index_zeroed(1)?,
    };
    device.batch_norm_forward(&x_d, affine, &mut y, &mut saved, &mut running, planes)?;
    let shape = format!(
        "{}x{}x{} eps={} momentum={} affine={} {values:?}/{params:?}/{grads:?}",
        planes.rows, planes.channels, planes.spatial, planes.eps, planes.momentum, case.affine
    );
    let mut checks = Vec::new();
    let mut check = |what: &str, got: Vec<f32>, want: &[f32], storage: Storage| {
        checks.push(compare(
            format!("batch norm {what} {shape}"),
            &got,
            &rounded(want, storage),
            tolerance(storage),
        ));
    };
    let (n, cu) = (len as u64, planes.channels);
    check("output", device.read_values(&y, n)?, &want.y, values);
    let mean = device.read_values(&saved.mean, cu)?;
    check("mean", mean, &want.mean, Storage::F32);
    let invstd = device.read_values(&saved.invstd, cu)?;
    check("invstd", invstd, &want.invstd, Storage::F32);
    let moved = device.read_values(&running.mean, cu)?;
    check("running mean", moved, &want.running_mean, params);
    let moved = device.read_values(&running.var, cu)?;
    check("running variance", moved, &want.running_var, params);
    let steps = device.read_index(&running.steps, 1)?;
    check("step count", vec![steps[0] as f32], &[1.0], Storage::F32);

    let dy_d = device.write_values(&dy, values)?;
    let mut dx = device.write_values(&poison(len), values)?;
    let mut dscale = device.write_values(&poison(c), grads)?;
    let mut dshift = device.write_values(&poison(c), grads)?;
    let statistics = BatchStatistics {
        mean: &saved.mean,
        invstd: &saved.invstd,
    };
    device.batch_norm_backward(
        &dy_d,
        &x_d,
        case.affine.then_some(&scale_d),
        statistics,
        case.input_gradient.then_some(&mut dx),
        case.affine.then_some(Affine {
            scale: &mut dscale,
            shift: &mut dshift,
        }),
        planes,
    )?;
    if case.input_gradient {
        check(
            "input gradient",
            device.read_values(&dx, n)?,
            &want.dx,
            values,
        );
    }
    if case.affine {
        let got = device.read_values(&dscale, cu)?;
        check("scale gradient", got, &want.dscale, grads);
        let got = device.read_values(&dshift, cu)?;
        check("shift gradient", got, &want.dshift, grads);
    }
    Ok(checks)
}

/// What the layer norm reference computes.
struct RowReference {
    y: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    dx: Vec<f32>,
    dscale: Vec<f32>,
    dshift: Vec<f32>,
}

/// Layer norm (RMS norm unless `centered`) from the definitions, in f64: `x`, `dy` are `rows`,
/// `scale` and `shift` per feature.
fn row_reference(
    rows: &NormalizedRows,
    centered: bool,
    (x, dy): (&[f32], &[f32]),
    (scale, shift): (&[f32], &[f32]),
) -> RowReference {
    let n = rows.features as usize;
    let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&v| f64::from(v)).collect() };
    let (x, dy, scale, shift) = (wide(x), wide(dy), wide(scale), wide(shift));
    let mut want = RowReference {
        y: Vec::new(),
        mean: Vec::new(),
        rstd: Vec::new(),
        dx: Vec::new(),
        dscale: Vec::new(),
        dshift: Vec::new(),
    };
    let (mut dscale, mut dshift) = (vec![0.0f64; n], vec![0.0f64; n]);
    for (x, dy) in x.chunks_exact(n).zip(dy.chunks_exact(n)) {
        let mean = match centered {
            true => x.iter().sum::<f64>() / n as f64,
            false => 0.0,
        };
        let variance = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let rstd = 1.0 / (variance + f64::from(rows.eps)).sqrt();
        let xhat: Vec<f64> = x.iter().map(|v| (v - mean) * rstd).collect();
        let h: Vec<f64> = (0..n).map(|j| scale[j] * dy[j]).collect();
        let mean_h = match centered {
            true => h.iter().sum::<f64>() / n as f64,
            false => 0.0,
        };
        let mean_h_xhat = (0..n).map(|j| h[j] * xhat[j]).sum::<f64>() / n as f64;
        for j in 0..n {
            want.y.push((xhat[j] * scale[j] + shift[j]) as f32);
            want.dx
                .push((rstd * (h[j] - mean_h - xhat[j] * mean_h_xhat)) as f32);
            dscale[j] += dy[j] * xhat[j];
            dshift[j] += dy[j];
        }
        want.mean.push(mean as f32);
        want.rstd.push(rstd as f32);
    }
    want.dscale = dscale.iter().map(|&v| v as f32).collect();
    want.dshift = dshift.iter().map(|&v| v as f32).collect();
    want
}

/// One layer norm layout: its rows, whether it centres them (RMS norm does not), which
/// parameters it learns, and whether backward computes the input's gradient.
struct RowCase {
    rows: NormalizedRows,
    centered: bool,
    scale: bool,
    shift: bool,
    input_gradient: bool,
}

/// A row of one value up to 129 rows of 300 (more than a block's threads), with a scale and
/// shift, a scale alone (`bias=False`), neither (`elementwise_affine=False`), and without the
/// input's gradient; RMS norm with a scale and without.
fn row_cases() -> [RowCase; 8] {
    let case = |rows, features, eps, scale, shift, input_gradient| RowCase {
        rows: NormalizedRows {
            rows,
            features,
            eps,
        },
        centered: true,
        scale,
        shift,
        input_gradient,
    };
    [
        case(2, 1, 1e-5, true, true, true),
        case(3, 5, 1e-5, true, true, true),
        case(129, 300, 1e-5, true, false, false),
        case(7, 64, 1e-3, false, false, true),
        case(4, 257, 0.1, true, true, true),
        RowCase {
            centered: false,
            ..case(3, 5, 1e-6, true, false, true)
        },
        RowCase {
            centered: false,
            ..case(129, 300, 1e-6, true, false, true)
        },
        RowCase {
            centered: false,
            ..case(7, 64, 1e-3, false, false, true)
        },
    ]
}

/// Runs the layer norm checks in every storage a precision uses.
pub fn check_layer_norm<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for storages in STORAGES {
        for case in row_cases() {
            checks.extend(check_row_case(device, &case, storages)?);
        }
    }
    Ok(checks)
}

fn check_row_case<K: Transfer>(
    device: &mut K,
    case: &RowCase,
    (values, params, grads): (Storage, Storage, Storage),
) -> Result<Vec<Check>, DeviceError> {
    let rows = &case.rows;
    let (len, n, r) = (
        rows.values() as usize,
        rows.features as usize,
        rows.rows as usize,
    );
    // An offset and a spread per row, as a layer's outputs have.
    let x: Vec<f32> = random(len, 50)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / n % 3) as f32) + 0.25 * (i / n) as f32)
        .collect();
    let x = rounded(&x, values);
    let dy = rounded(&random(len, 51), values);
    let scale = match case.scale {
        true => rounded(&random(n, 52), params),
        false => vec![1.0; n],
    };
    let shift = match case.shift {
        true => rounded(&random(n, 53), params),
        false => vec![0.0; n],
    };
    let want = row_reference(rows, case.centered, (&x, &dy), (&scale, &shift));

    let x_d = device.write_values(&x, values)?;
    let scale_d = device.write_values(&scale, params)?;
    let shift_d = device.write_values(&shift, params)?;
    let affine = case.scale.then_some(LayerAffine {
        scale: &scale_d,
        shift: case.shift.then_some(&shift_d),
    });
    let mut y = device.write_values(&poison(len), values)?;
    let mean = match case.centered {
        true => Some(device.write_values(&poison(r), Storage::F32)?),
        false => None,
    };
    let mut saved = RowStatistics {
        mean,
        rstd: device.write_values(&poison(r), Storage::F32)?,
    };
    device.layer_norm_forward(&x_d, affine, &mut y, &mut saved, rows)?;
    let kind = if case.centered { "layer" } else { "RMS" };
    let shape = format!(
        "{}x{} eps={} scale={} shift={} {values:?}/{params:?}/{grads:?}",
        rows.rows, rows.features, rows.eps, case.scale, case.shift
    );
    let mut checks = Vec::new();
    let mut check = |what: &str, got: Vec<f32>, want: &[f32], storage: Storage| {
        checks.push(compare(
            format!("{kind} norm {what} {shape}"),
            &got,
            &rounded(want, storage),
            tolerance(storage),
        ));
    };
    check(
        "output",
        device.read_values(&y, len as u64)?,
        &want.y,
        values,
    );
    if let Some(mean) = &saved.mean {
        let mean = device.read_values(mean, rows.rows)?;
        check("mean", mean, &want.mean, Storage::F32);
    }
    let rstd = device.read_values(&saved.rstd, rows.rows)?;
    check("rstd", rstd, &want.rstd, Storage::F32);

    let dy_d = device.write_values(&dy, values)?;
    let mut dx = device.write_values(&poison(len), values)?;
    let mut dscale = device.write_values(&poison(n), grads)?;
    let mut dshift = device.write_values(&poison(n), grads)?;
    device.layer_norm_backward(
        &dy_d,
        &x_d,
        case.scale.then_some(&scale_d),
        RowStatistics {
            mean: saved.mean.as_ref(),
            rstd: &saved.rstd,
        },
        case.input_gradient.then_some(&mut dx),
        case.scale.then_some(LayerAffine {
            scale: &mut dscale,
            shift: case.shift.then_some(&mut dshift),
        }),
        rows,
    )?;
    if case.input_gradient {
        let got = device.read_values(&dx, len as u64)?;
        check("input gradient", got, &want.dx, values);
    }
    if case.scale {
        let got = device.read_values(&dscale, n as u64)?;
        check("scale gradient", got, &want.dscale, grads);
    }
    if case.shift {
        let got = device.read_values(&dshift, n as u64)?;
        check("shift gradient", got, &want.dshift, grads);
    }
    Ok(checks)
}
