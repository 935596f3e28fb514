//! Kernel checks written once, run against any device's [`Kernels`]: each operation on random
//! inputs with awkward sizes (1, 7, 129, 784, 1000), outputs poisoned with NaN beforehand so an
//! unwritten element fails, compared with the host reference within [`TOLERANCE`]. One check per
//! kernel family (fill, gemm, elementwise, reduce, loss, optimizer), then a few training steps.
//!
//! The matrix products are compared with a naive f64 product, so the checks mean something even
//! when the device under test is the host itself.

use crate::device::host::ops;
use crate::device::host::HostDevice;
use crate::device::{DeviceError, Probing};
use crate::plan::{Activation, OptimizerKind, Plan};
use crate::step::{self, Kernels, OptimizerState, StepBuffers, UpdateRule};
use crate::synthetic;

/// Largest accepted relative error (absolute below magnitude 1).
pub const TOLERANCE: f64 = 1e-4;

/// Copies between host and device memory, for these checks alone: probes never stage data
/// through host memory (they generate it on the device).
pub trait Transfer: Kernels<Error = DeviceError> {
    /// The first `len` values of a buffer.
    fn read_f32(&mut self, buffer: &Self::F32, len: u64) -> Result<Vec<f32>, DeviceError>;
    /// The first `len` values of a label buffer.
    fn read_u32(&mut self, buffer: &Self::U32, len: u64) -> Result<Vec<u32>, DeviceError>;
    /// A new buffer holding `values`.
    fn write_f32(&mut self, values: &[f32]) -> Result<Self::F32, DeviceError>;
    /// A new label buffer holding `values`.
    fn write_u32(&mut self, values: &[u32]) -> Result<Self::U32, DeviceError>;
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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

fn poison(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
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
pub fn check_kernels<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = check_fill(device)?;
    checks.extend(check_gemm(device)?);
    checks.extend(check_elementwise(device)?);
    checks.extend(check_reduce(device)?);
    checks.extend(check_loss(device)?);
    checks.extend(check_optimizer(device)?);
    Ok(checks)
}

/// The layer shapes the products and column sums are checked at: rows x inputs -> outputs.
const LAYER_SHAPES: [(usize, usize, usize); 4] =
    [(1, 1, 1), (7, 784, 10), (129, 7, 1000), (1000, 129, 7)];

/// fill.cu: the synthetic stream and the labels, bit for bit.
fn check_fill<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
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
        let (r, f, c) = (rows as u64, features as u64, classes as u64);
        device.fill_labels(&mut labels, &x, r, f, c)?;
        let mut want = vec![0u32; rows];
        synthetic::fill_labels(&mut want, &inputs, features, classes);
        // Labels are small integers, exact as f32.
        let as_f32 = |labels: &[u32]| labels.iter().map(|&v| v as f32).collect::<Vec<_>>();
        checks.push(compare(
            format!("fill_labels {rows}x{features} classes={classes}"),
            &as_f32(&device.read_u32(&labels, r)?),
            &as_f32(&want),
        ));
    }
    Ok(checks)
}

/// gemm.cu: the three products of a linear layer against a naive f64 product.
fn check_gemm<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (rows, inputs, outputs) in LAYER_SHAPES {
        let x = random(rows * inputs, 1);
        let w = random(outputs * inputs, 2);
        let dy = random(rows * outputs, 3);
        let (xd, wd, dyd) = (
            device.write_f32(&x)?,
            device.write_f32(&w)?,
            device.write_f32(&dy)?,
        );
        let (r, i, o) = (rows as u64, inputs as u64, outputs as u64);
        let shape = format!("{rows}x{inputs}->{outputs}");

        let mut y = device.write_f32(&poison(rows * outputs))?;
        device.linear_forward(&xd, &wd, &mut y, r, i, o)?;
        let want = naive_product(
            rows,
            inputs,
            outputs,
            |a, l| x[a * inputs + l],
            |l, b| w[b * inputs + l],
        );
        checks.push(compare(
            format!("gemm forward {shape}"),
            &device.read_f32(&y, r * o)?,
            &want,
        ));

        let mut dw = device.write_f32(&poison(outputs * inputs))?;
        device.weight_gradient(&dyd, &xd, &mut dw, r, i, o)?;
        let want = naive_product(
            outputs,
            rows,
            inputs,
            |a, l| dy[l * outputs + a],
            |l, b| x[l * inputs + b],
        );
        checks.push(compare(
            format!("gemm weight gradient {shape}"),
            &device.read_f32(&dw, o * i)?,
            &want,
        ));

        let mut dx = device.write_f32(&poison(rows * inputs))?;
        device.input_gradient(&dyd, &wd, &mut dx, r, i, o)?;
        let want = naive_product(
            rows,
            outputs,
            inputs,
            |a, l| dy[a * outputs + l],
            |l, b| w[l * inputs + b],
        );
        checks.push(compare(
            format!("gemm input gradient {shape}"),
            &device.read_f32(&dx, r * i)?,
            &want,
        ));
    }
    Ok(checks)
}

/// elementwise.cu: bias with each activation, its backward, and the bias alone.
fn check_elementwise<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for activation in [Activation::Relu, Activation::Gelu, Activation::Tanh] {
        let (rows, cols) = (129usize, 7usize);
        let pre_values: Vec<f32> = random(rows * cols, 6).iter().map(|v| v * 4.0).collect();
        let bias_values = random(cols, 7);
        let len = (rows * cols) as u64;
        let mut pre = device.write_f32(&pre_values)?;
        let bias = device.write_f32(&bias_values)?;
        let mut post = device.write_f32(&poison(rows * cols))?;
        let (r, c) = (rows as u64, cols as u64);
        device.bias_activation(&mut pre, &bias, Some(&mut post), r, c, activation)?;
        let mut want_pre = pre_values.clone();
        let mut want_post = vec![0.0; rows * cols];
        ops::bias_activation(
            &mut want_pre,
            &bias_values,
            Some(&mut want_post),
            cols,
            activation,
        );
        let name = format!("{activation:?} {rows}x{cols}");
        checks.push(compare(
            format!("bias+{name} pre"),
            &device.read_f32(&pre, len)?,
            &want_pre,
        ));
        checks.push(compare(
            format!("bias+{name} post"),
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
    let (rows, cols) = (1000usize, 784usize);
    let pre_values = random(rows * cols, 9);
    let bias_values = random(cols, 10);
    let mut pre = device.write_f32(&pre_values)?;
    let bias = device.write_f32(&bias_values)?;
    let (r, c) = (rows as u64, cols as u64);
    device.bias_activation(&mut pre, &bias, None, r, c, Activation::Relu)?;
    let mut want = pre_values;
    ops::bias_activation(&mut want, &bias_values, None, cols, Activation::Relu);
    checks.push(compare(
        format!("bias add {rows}x{cols}"),
        &device.read_f32(&pre, r * c)?,
        &want,
    ));
    Ok(checks)
}

/// reduce.cu: column sums (bias gradients) and the mean.
fn check_reduce<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (rows, _, outputs) in LAYER_SHAPES {
        let dy = random(rows * outputs, 3);
        let dyd = device.write_f32(&dy)?;
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
    Ok(checks)
}

/// loss.cu: the per-row loss and the logits' gradient, with logits large enough to overflow a
/// naive softmax.
fn check_loss<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (rows, classes) in [(1usize, 10usize), (129, 10), (7, 1000)] {
        let logit_values: Vec<f32> = random(rows * classes, 11)
            .iter()
            .map(|v| v * 30.0)
            .collect();
        let label_values: Vec<u32> = (0..rows).map(|r| ((r * 7919) % classes) as u32).collect();
        let mut logits = device.write_f32(&logit_values)?;
        let labels = device.write_u32(&label_values)?;
        let mut loss = device.write_f32(&poison(rows))?;
        let (r, c) = (rows as u64, classes as u64);
        device.softmax_cross_entropy(&mut logits, &labels, &mut loss, r, c)?;
        let mut want_grad = logit_values;
        let mut want_loss = vec![0.0; rows];
        ops::softmax_cross_entropy(&mut want_grad, &label_values, &mut want_loss, classes);
        checks.push(compare(
            format!("softmax cross-entropy loss {rows}x{classes}"),
            &device.read_f32(&loss, r)?,
            &want_loss,
        ));
        checks.push(compare(
            format!("softmax cross-entropy gradient {rows}x{classes}"),
            &device.read_f32(&logits, r * c)?,
            &want_grad,
        ));
    }
    Ok(checks)
}

/// optimizer.cu: one update of every optimizer, parameters and state.
fn check_optimizer<K: Transfer>(device: &mut K) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
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
        let mut state = match &state_values[..] {
            [] => OptimizerState::Sgd,
            [velocity] => OptimizerState::Momentum {
                velocity: device.write_f32(velocity)?,
            },
            [m, v] => OptimizerState::Adam {
                m: device.write_f32(m)?,
                v: device.write_f32(v)?,
            },
            _ => unreachable!("optimizers keep at most two state values per parameter"),
        };
        device.optimizer_step(&mut param, &grad, &mut state, len as u64, rule)?;
        let mut want_param = param_values;
        let mut want_state = state_values;
        let reference = match &mut want_state[..] {
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
        ops::optimizer_step(&mut want_param, &grad_values, reference, rule);
        checks.push(compare(
            format!("{kind:?} update n={len}"),
            &device.read_f32(&param, len as u64)?,
            &want_param,
        ));
        for (i, (got, want)) in state.buffers().into_iter().zip(&want_state).enumerate() {
            checks.push(compare(
                format!("{kind:?} state {i} n={len}"),
                &device.read_f32(got, len as u64)?,
                want,
            ));
        }
    }
    Ok(checks)
}

/// Trains `steps` steps at `rows` as a probe does and returns every parameter afterwards,
/// layer by layer (weights, then biases).
pub fn trained_parameters<D: Probing + Transfer>(
    device: &mut D,
    plan: &Plan,
    rows: u64,
    steps: u32,
    seed: u64,
) -> Result<Vec<f32>, DeviceError> {
    let before = device.begin_probe()?;
    let parameters = step::run_probe(device, plan, rows, steps, seed)
        .and_then(|(buffers, _)| read_parameters(device, plan, &buffers));
    let ended = device.end_probe(before);
    let parameters = parameters?;
    ended?;
    Ok(parameters)
}

/// Every parameter, layer by layer (weights, then biases), copied to the host.
pub fn read_parameters<D: Transfer>(
    device: &mut D,
    plan: &Plan,
    buffers: &StepBuffers<D::F32, D::U32>,
) -> Result<Vec<f32>, DeviceError> {
    let mut values = Vec::with_capacity(plan.parameter_count() as usize);
    for (layer, bufs) in plan.layers.iter().zip(&buffers.layers) {
        values.extend(device.read_f32(&bufs.weight, layer.weights())?);
        values.extend(device.read_f32(&bufs.bias, layer.outputs)?);
    }
    Ok(values)
}

/// Trains the same small model for three steps on `device` and on the host, and compares every
/// parameter afterwards: every optimizer, every activation.
pub fn check_training<D: Probing + Transfer>(device: &mut D) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    for (optimizer, activation) in [
        (OptimizerKind::Sgd, Activation::Relu),
        (OptimizerKind::SgdMomentum, Activation::Tanh),
        (OptimizerKind::Adam, Activation::Gelu),
        (OptimizerKind::Adamw, Activation::Relu),
    ] {
        let learning_rate = optimizer.default_learning_rate() as f32;
        let plan = Plan::new(49, &[129, 33], 10, activation, optimizer, learning_rate)
            .expect("the parity model plans");
        let want = trained_parameters(&mut HostDevice::default(), &plan, 1000, 3, 42)?;
        let got = trained_parameters(device, &plan, 1000, 3, 42)?;
        checks.push(compare(
            format!("3 training steps, {optimizer:?} + {activation:?}, batch 1000"),
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
