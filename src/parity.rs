//! Kernel checks written once, run against any device's [`Kernels`]: each operation on random
//! inputs with awkward sizes (1, 7, 129, 784, 1000), outputs poisoned with NaN beforehand so an
//! unwritten element fails, compared with the host reference within [`TOLERANCE`].
//!
//! The matrix products are compared with a naive f64 product, so the checks mean something even
//! when the device under test is the host itself.

use crate::device::host::ops;
use crate::device::host::HostDevice;
use crate::device::{Device, DeviceError};
use crate::job::{Activation, Job, OptimizerKind};
use crate::plan::Plan;
use crate::step::{Kernels, UpdateRule};
use crate::synthetic;

/// Largest accepted relative error (absolute below magnitude 1).
pub const TOLERANCE: f64 = 1e-4;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked, with its sizes.
    pub name: String,
    /// Largest error seen, relative to `max(1, |reference|)`.
    pub max_error: f64,
    /// Whether it stayed within [`TOLERANCE`] and every element was written.
    pub passed: bool,
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let key = synthetic::stream_key(seed, 0xc0ffee);
    (0..len)
        .map(|i| synthetic::uniform(key, i as u64, 1.0))
        .collect()
}

fn compare(name: String, got: &[f32], want: &[f32]) -> Check {
    let mut max_error = if got.len() == want.len() {
        0.0f64
    } else {
        f64::INFINITY
    };
    for (&g, &w) in got.iter().zip(want) {
        let error = (g as f64 - w as f64).abs() / (w.abs() as f64).max(1.0);
        // NaN (a poisoned, unwritten element) must fail.
        let error = if error.is_nan() { f64::INFINITY } else { error };
        max_error = max_error.max(error);
    }
    Check {
        passed: max_error <= TOLERANCE,
        name,
        max_error,
    }
}

fn naive_product(
    m: usize,
    k: usize,
    n: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|l| a(i, l) as f64 * b(l, j) as f64).sum::<f64>() as f32;
        }
    }
    c
}

/// Runs every kernel check on `device`.
pub fn check_kernels<K>(device: &mut K) -> Result<Vec<Check>, DeviceError>
where
    K: Kernels<Error = DeviceError>,
{
    let mut checks = Vec::new();
    let poison = |len: usize| vec![f32::NAN; len];

    for len in [1usize, 1000, 7 * 129] {
        let key = synthetic::stream_key(3, 4);
        let mut out = device.write_f32(&poison(len))?;
        device.fill_uniform(&mut out, len as u64, key, 0.25)?;
        let mut want = vec![0.0; len];
        synthetic::fill_uniform(&mut want, key, 0.25);
        checks.push(compare(
            format!("fill_uniform n={len}"),
            &device.read_f32(&out, len as u64)?,
            &want,
        ));
    }
    for (rows, features, classes) in [(1usize, 1usize, 10usize), (129, 784, 10), (1000, 7, 129)] {
        let inputs = random(rows * features, 5);
        let x = device.write_f32(&inputs)?;
        let mut labels = device.write_u32(&vec![u32::MAX; rows])?;
        device.fill_labels(
            &mut labels,
            &x,
            rows as u64,
            features as u64,
            classes as u64,
        )?;
        let mut want = vec![0u32; rows];
        synthetic::fill_labels(&mut want, &inputs, features, classes);
        // Labels are small integers, exact as f32.
        let got: Vec<f32> = device
            .read_u32(&labels, rows as u64)?
            .iter()
            .map(|&v| v as f32)
            .collect();
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        checks.push(compare(
            format!("fill_labels {rows}x{features} classes={classes}"),
            &got,
            &want,
        ));
    }

    for (rows, inputs, outputs) in [
        (1usize, 1usize, 1usize),
        (7, 784, 10),
        (129, 7, 1000),
        (1000, 129, 7),
    ] {
        let x = random(rows * inputs, 1);
        let w = random(outputs * inputs, 2);
        let dy = random(rows * outputs, 3);
        let (xd, wd, dyd) = (
            device.write_f32(&x)?,
            device.write_f32(&w)?,
            device.write_f32(&dy)?,
        );
        let shape = format!("{rows}x{inputs}->{outputs}");

        let mut y = device.write_f32(&poison(rows * outputs))?;
        device.linear_forward(&xd, &wd, &mut y, rows as u64, inputs as u64, outputs as u64)?;
        let want = naive_product(
            rows,
            inputs,
            outputs,
            |i, l| x[i * inputs + l],
            |l, j| w[j * inputs + l],
        );
        checks.push(compare(
            format!("gemm forward {shape}"),
            &device.read_f32(&y, (rows * outputs) as u64)?,
            &want,
        ));

        let mut dw = device.write_f32(&poison(outputs * inputs))?;
        device.weight_gradient(
            &dyd,
            &xd,
            &mut dw,
            rows as u64,
            inputs as u64,
            outputs as u64,
        )?;
        let want = naive_product(
            outputs,
            rows,
            inputs,
            |i, l| dy[l * outputs + i],
            |l, j| x[l * inputs + j],
        );
        checks.push(compare(
            format!("gemm weight gradient {shape}"),
            &device.read_f32(&dw, (outputs * inputs) as u64)?,
            &want,
        ));

        let mut dx = device.write_f32(&poison(rows * inputs))?;
        device.input_gradient(
            &dyd,
            &wd,
            &mut dx,
            rows as u64,
            inputs as u64,
            outputs as u64,
        )?;
        let want = naive_product(
            rows,
            outputs,
            inputs,
            |i, l| dy[i * outputs + l],
            |l, j| w[l * inputs + j],
        );
        checks.push(compare(
            format!("gemm input gradient {shape}"),
            &device.read_f32(&dx, (rows * inputs) as u64)?,
            &want,
        ));

        let mut db = device.write_f32(&poison(outputs))?;
        device.bias_gradient(&dyd, &mut db, rows as u64, outputs as u64)?;
        let mut want = vec![0.0; outputs];
        ops::bias_gradient(&dy, &mut want, outputs);
        checks.push(compare(
            format!("bias gradient {rows}x{outputs}"),
            &device.read_f32(&db, outputs as u64)?,
            &want,
        ));
    }

    for activation in [Activation::Relu, Activation::Gelu, Activation::Tanh] {
        let (rows, cols) = (129usize, 7usize);
        let pre_values: Vec<f32> = random(rows * cols, 6).iter().map(|v| v * 4.0).collect();
        let bias_values = random(cols, 7);
        let len = (rows * cols) as u64;
        let mut pre = device.write_f32(&pre_values)?;
        let bias = device.write_f32(&bias_values)?;
        let mut post = device.write_f32(&poison(rows * cols))?;
        device.bias_activation(
            &mut pre,
            &bias,
            Some(&mut post),
            rows as u64,
            cols as u64,
            activation,
        )?;
        let mut want_pre = pre_values.clone();
        let mut want_post = vec![0.0; rows * cols];
        ops::bias_activation(
            &mut want_pre,
            &bias_values,
            Some(&mut want_post),
            cols,
            activation,
        );
        checks.push(compare(
            format!("bias+{activation:?} pre {rows}x{cols}"),
            &device.read_f32(&pre, len)?,
            &want_pre,
        ));
        checks.push(compare(
            format!("bias+{activation:?} post {rows}x{cols}"),
            &device.read_f32(&post, len)?,
            &want_post,
        ));

        let grad = random(rows * cols, 8);
        let grad_d = device.write_f32(&grad)?;
        device.activation_backward(&grad_d, &mut pre, len, activation)?;
        ops::activation_backward(&grad, &mut want_pre, activation);
        checks.push(compare(
            format!("{activation:?} backward n={len}"),
            &device.read_f32(&pre, len)?,
            &want_pre,
        ));
    }
    {
        let (rows, cols) = (1000usize, 784usize);
        let pre_values = random(rows * cols, 9);
        let bias_values = random(cols, 10);
        let mut pre = device.write_f32(&pre_values)?;
        let bias = device.write_f32(&bias_values)?;
        device.bias_activation(
            &mut pre,
            &bias,
            None,
            rows as u64,
            cols as u64,
            Activation::Relu,
        )?;
        let mut want = pre_values;
        ops::bias_activation(&mut want, &bias_values, None, cols, Activation::Relu);
        checks.push(compare(
            format!("bias add {rows}x{cols}"),
            &device.read_f32(&pre, (rows * cols) as u64)?,
            &want,
        ));
    }

    for (rows, classes) in [(1usize, 10usize), (129, 10), (7, 1000)] {
        let logit_values: Vec<f32> = random(rows * classes, 11)
            .iter()
            .map(|v| v * 30.0)
            .collect();
        let label_values: Vec<u32> = (0..rows).map(|r| ((r * 7919) % classes) as u32).collect();
        let mut logits = device.write_f32(&logit_values)?;
        let labels = device.write_u32(&label_values)?;
        let mut loss = device.write_f32(&poison(rows))?;
        device.softmax_cross_entropy(
            &mut logits,
            &labels,
            &mut loss,
            rows as u64,
            classes as u64,
        )?;
        let mut want_grad = logit_values;
        let mut want_loss = vec![0.0; rows];
        ops::softmax_cross_entropy(&mut want_grad, &label_values, &mut want_loss, classes);
        checks.push(compare(
            format!("softmax cross-entropy loss {rows}x{classes}"),
            &device.read_f32(&loss, rows as u64)?,
            &want_loss,
        ));
        checks.push(compare(
            format!("softmax cross-entropy gradient {rows}x{classes}"),
            &device.read_f32(&logits, (rows * classes) as u64)?,
            &want_grad,
        ));
    }

    for len in [1usize, 1000, 129 * 784] {
        let values = random(len, 12);
        let buffer = device.write_f32(&values)?;
        let mut accumulator = device.write_f32(&[f32::NAN])?;
        let got = device.mean(&buffer, len as u64, &mut accumulator)?;
        checks.push(compare(
            format!("mean n={len}"),
            &[got],
            &[ops::mean(&values)],
        ));
    }

    for kind in [
        OptimizerKind::Sgd,
        OptimizerKind::SgdMomentum,
        OptimizerKind::Adam,
        OptimizerKind::Adamw,
    ] {
        let len = 1000usize;
        let (param_values, grad_values) = (random(len, 13), random(len, 14));
        let state_values: Vec<Vec<f32>> = (0..kind.state_per_parameter())
            .map(|i| random(len, 15 + i).iter().map(|v| v.abs() * 0.1).collect())
            .collect();
        let rule = UpdateRule::new(kind, 0.01, 3);
        let mut param = device.write_f32(&param_values)?;
        let grad = device.write_f32(&grad_values)?;
        let mut state = state_values
            .iter()
            .map(|s| device.write_f32(s))
            .collect::<Result<Vec<_>, _>>()?;
        device.optimizer_step(&mut param, &grad, &mut state, len as u64, rule)?;
        let mut want_param = param_values;
        let mut want_state = state_values;
        let mut state_refs: Vec<&mut [f32]> =
            want_state.iter_mut().map(|s| s.as_mut_slice()).collect();
        ops::optimizer_step(&mut want_param, &grad_values, &mut state_refs, rule);
        checks.push(compare(
            format!("{kind:?} update n={len}"),
            &device.read_f32(&param, len as u64)?,
            &want_param,
        ));
        for (i, (got, want)) in state.iter().zip(&want_state).enumerate() {
            checks.push(compare(
                format!("{kind:?} state {i} n={len}"),
                &device.read_f32(got, len as u64)?,
                want,
            ));
        }
    }
    Ok(checks)
}

/// Trains the same small model for three steps on `device` and on the host, and compares every
/// parameter afterwards.
pub fn check_training(device: &mut dyn Device) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (optimizer, activation) in [
        ("sgd", "relu"),
        ("sgd_momentum", "tanh"),
        ("adam", "gelu"),
        ("adamw", "relu"),
    ] {
        let job = Job::from_json(&format!(
            r#"{{"model": {{"input_shape": [1, 7, 7], "hidden_layers": [129, 33], "num_classes": 10,
                 "activation": "{activation}"}}, "optimizer": {{"name": "{optimizer}"}}}}"#
        ))
        .expect("the parity job is valid");
        let plan = Plan::new(&job).expect("the parity job plans");
        let want = HostDevice::default().trained_parameters(&plan, 1000, 3, 42)?;
        let got = device.trained_parameters(&plan, 1000, 3, 42)?;
        checks.push(compare(
            format!("3 training steps, {optimizer} + {activation}, batch 1000"),
            &got,
            &want,
        ));
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_passes_every_kernel_check() {
        let checks = check_kernels(&mut HostDevice::default()).unwrap();
        assert!(checks.len() > 40);
        for check in &checks {
            assert!(check.passed, "{check:?}");
        }
    }

    #[test]
    fn the_host_passes_the_training_check() {
        for check in check_training(&mut HostDevice::default()).unwrap() {
            assert!(check.passed && check.max_error == 0.0, "{check:?}");
        }
    }

    #[test]
    fn comparison_fails_on_unwritten_and_wrong_elements() {
        assert!(compare("ok".into(), &[1.0, 2.0], &[1.0, 2.00001]).passed);
        assert!(!compare("nan".into(), &[f32::NAN, 2.0], &[1.0, 2.0]).passed);
        assert!(!compare("off".into(), &[1.0, 2.1], &[1.0, 2.0]).passed);
        assert!(!compare("short".into(), &[1.0], &[1.0, 2.0]).passed);
    }
}
