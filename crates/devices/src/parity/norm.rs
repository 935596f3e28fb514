//! Checks of `norm.cu`: batch norm's forward (the batch's statistics, the normalized output and
//! its activation, the running statistics and their step count) and backward, against a
//! reference written here in f64 from the definitions, in the storages the precisions use.

use super::{compare, poison, random, rounded, tolerance, Check};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::program::{BatchStatistics, RunningStatistics};
use headroom_engine::plan::{Activation, Planes, Storage, BATCH_NORM_EPS, BATCH_NORM_MOMENTUM};

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
    post: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    dx: Vec<f32>,
    dscale: Vec<f32>,
    dbias: Vec<f32>,
}

/// Batch norm from the definitions, in f64: `x`, `dy` are `planes`, the rest per channel.
fn reference(
    planes: &Planes,
    (x, dy): (&[f32], &[f32]),
    (scale, bias): (&[f32], &[f32]),
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
        .map(|v| 1.0 / (v + f64::from(BATCH_NORM_EPS)).sqrt())
        .collect();
    let xhat = |i: usize| (f64::from(x[i]) - mean[channel(i)]) * invstd[channel(i)];
    let y: Vec<f32> = (0..x.len())
        .map(|i| (xhat(i) * f64::from(scale[channel(i)]) + f64::from(bias[channel(i)])) as f32)
        .collect();
    let momentum = f64::from(BATCH_NORM_MOMENTUM);
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
        post: y.iter().map(|&v| v.max(0.0)).collect(),
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
        dbias: grad_sums.iter().map(|s| s[0] as f32).collect(),
    }
}

/// Batch norm forward (a residual block's shortcut added at every shape but the smallest, ReLU
/// after it) and backward over 2 samples of one channel of one value up to 129 samples of 4
/// channels of 3x3, in every storage a precision uses.
pub fn check_batch_norm<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (values, params, grads) in STORAGES {
        for (rows, channels, spatial) in [(2u64, 1u64, 1u64), (3, 6, 25), (129, 4, 9)] {
            let planes = Planes {
                rows,
                channels,
                spatial,
            };
            let (len, c) = (planes.values() as usize, channels as usize);
            // An offset and a spread per channel, as a layer's outputs have.
            let x: Vec<f32> = random(len, 40)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1.0 + (i / spatial as usize % c) as f32) + 0.5)
                .collect();
            let x = rounded(&x, values);
            let dy = rounded(&random(len, 41), values);
            // A residual block's shortcut, added to the output, at all but the smallest shape.
            let residual = (rows > 2).then(|| rounded(&random(len, 46), values));
            let scale = rounded(&random(c, 42), params);
            let bias = rounded(&random(c, 43), params);
            let running_mean = rounded(&random(c, 44), params);
            let running_var = rounded(
                &random(c, 45).iter().map(|v| v.abs()).collect::<Vec<_>>(),
                params,
            );
            let mut want = reference(
                &planes,
                (&x, &dy),
                (&scale, &bias),
                (&running_mean, &running_var),
            );
            if let Some(residual) = &residual {
                for (y, r) in want.y.iter_mut().zip(residual) {
                    *y += r;
                }
                want.post = want.y.iter().map(|&v| v.max(0.0)).collect();
            }

            let x_d = device.write_values(&x, values)?;
            let scale_d = device.write_values(&scale, params)?;
            let bias_d = device.write_values(&bias, params)?;
            let residual_d = match &residual {
                Some(r) => Some(device.write_values(r, values)?),
                None => None,
            };
            let mut y = device.write_values(&poison(len), values)?;
            let mut post = device.write_values(&poison(len), values)?;
            let mut saved = BatchStatistics {
                mean: device.write_values(&poison(c), Storage::F32)?,
                invstd: device.write_values(&poison(c), Storage::F32)?,
            };
            let mut running = RunningStatistics {
                mean: device.write_values(&running_mean, params)?,
                var: device.write_values(&running_var, params)?,
                steps: device.index_zeroed(1)?,
            };
            device.batch_norm_forward(
                &x_d,
                &scale_d,
                &bias_d,
                residual_d.as_ref(),
                &mut y,
                Some(&mut post),
                &mut saved,
                &mut running,
                &planes,
                Activation::Relu,
            )?;
            let shape = format!("{rows}x{channels}x{spatial} {values:?}/{params:?}/{grads:?}");
            let mut check = |what: &str, got: Vec<f32>, want: &[f32], storage: Storage| {
                checks.push(compare(
                    format!("batch norm {what} {shape}"),
                    &got,
                    &rounded(want, storage),
                    tolerance(storage),
                ));
            };
            let (n, cu) = (len as u64, channels);
            check("output", device.read_values(&y, n)?, &want.y, values);
            check("relu", device.read_values(&post, n)?, &want.post, values);
            check(
                "mean",
                device.read_values(&saved.mean, cu)?,
                &want.mean,
                Storage::F32,
            );
            check(
                "invstd",
                device.read_values(&saved.invstd, cu)?,
                &want.invstd,
                Storage::F32,
            );
            check(
                "running mean",
                device.read_values(&running.mean, cu)?,
                &want.running_mean,
                params,
            );
            check(
                "running variance",
                device.read_values(&running.var, cu)?,
                &want.running_var,
                params,
            );
            let steps = device.read_index(&running.steps, 1)?;
            check("step count", vec![steps[0] as f32], &[1.0], Storage::F32);

            let dy_d = device.write_values(&dy, values)?;
            let mut dx = device.write_values(&poison(len), values)?;
            let mut dscale = device.write_values(&poison(c), grads)?;
            let mut dbias = device.write_values(&poison(c), grads)?;
            device.batch_norm_backward(
                &dy_d,
                &x_d,
                &scale_d,
                BatchStatistics {
                    mean: &saved.mean,
                    invstd: &saved.invstd,
                },
                &mut dx,
                &mut dscale,
                &mut dbias,
                &planes,
            )?;
            check(
                "input gradient",
                device.read_values(&dx, n)?,
                &want.dx,
                values,
            );
            check(
                "scale gradient",
                device.read_values(&dscale, cu)?,
                &want.dscale,
                grads,
            );
            check(
                "bias gradient",
                device.read_values(&dbias, cu)?,
                &want.dbias,
                grads,
            );
        }
    }
    Ok(checks)
}
