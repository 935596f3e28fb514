//! The host device is the reference, so these tests check it against mathematics, not itself:
//! finite differences in f64, hand-computed optimizer updates (in `ops`), and learning.

use super::*;
use crate::transfer::{read_all, read_parameters, trained_parameters};
use headroom_engine::device::Device;
use headroom_engine::plan::{
    Allocator, Convolution, Layer, OptimizerKind, Plan, PoolKind, Pooling, Precision, Shortcut,
    Storage, Training, BATCH_NORM_EPS,
};
use headroom_engine::plan::{Framework, Moment};
use headroom_engine::step::{Executor, Steps, MAX_TIMED_STEPS};
use Activation::{Gelu, Relu, Tanh};
use OptimizerKind::{Adam, Adamw, Sgd, SgdMomentum};

fn plan_of(
    input: u64,
    hidden: &[u64],
    classes: u64,
    activation: Activation,
    optimizer: OptimizerKind,
) -> Plan {
    plan_with_rate(input, hidden, classes, activation, optimizer, 0.05)
}

fn plan_with_rate(
    input: u64,
    hidden: &[u64],
    classes: u64,
    activation: Activation,
    optimizer: OptimizerKind,
    rate: f32,
) -> Plan {
    Plan::new(
        input,
        hidden,
        classes,
        activation,
        Training {
            optimizer,
            learning_rate: rate,
            precision: Precision::F32True,
            framework: Framework::Pytorch,
        },
    )
    .unwrap()
}

/// A small network of two pooled convolutions: 2x6x6 through a padded 3x3 convolution to 3
/// channels, max pooled 2x2; a 2x2 convolution to 4 channels, average pooled 2x2 with stride
/// 1 and padding 1; then `hidden` and `classes`. With `norm`, batch norm follows each
/// convolution.
fn convolutional(
    hidden: &[u64],
    classes: u64,
    activation: Activation,
    training: Training,
    norm: bool,
) -> Plan {
    let first = Convolution {
        in_channels: 2,
        height: 6,
        width: 6,
        out_channels: 3,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let second = Convolution {
        in_channels: 3,
        height: 3,
        width: 3,
        out_channels: 4,
        kernel: 2,
        stride: 1,
        padding: 0,
    };
    let pool = |kind, conv: Convolution, stride, padding| Pooling {
        kind,
        channels: conv.out_channels,
        height: conv.out_height(),
        width: conv.out_width(),
        kernel: 2,
        stride,
        padding,
    };
    let layer = match norm {
        true => Layer::normalized,
        false => Layer::convolution,
    };
    Plan::convolutional(
        &[
            layer(first, Some(pool(PoolKind::Max, first, 2, 0))),
            layer(second, Some(pool(PoolKind::Average, second, 1, 1))),
        ],
        72,
        hidden,
        classes,
        activation,
        training,
    )
    .unwrap()
}

/// A small residual network: 2x6x6 through a padded 3x3 convolution to 3 channels (batch norm,
/// activation), then one residual block of two padded 3x3 convolutions with batch norm: to 3
/// channels with the identity shortcut, average pooled 2x2; or (`projection`) to 4 channels at
/// stride 2 with a 1x1 convolution and batch norm as the shortcut, pooled globally; then
/// `hidden` and `classes`.
fn residual(
    hidden: &[u64],
    classes: u64,
    activation: Activation,
    training: Training,
    projection: bool,
) -> Plan {
    let conv = |in_channels, side, out_channels, stride| Convolution {
        in_channels,
        height: side,
        width: side,
        out_channels,
        kernel: 3,
        stride,
        padding: 1,
    };
    let (channels, stride) = if projection { (4, 2) } else { (3, 1) };
    let stem = conv(2, 6, 3, 1);
    let first = conv(3, 6, channels, stride);
    let second = conv(channels, first.out_height(), channels, 1);
    let side = second.out_height();
    let kernel = if projection { side } else { 2 };
    let pool = Pooling {
        kind: PoolKind::Average,
        channels,
        height: side,
        width: side,
        kernel,
        stride: kernel,
        padding: 0,
    };
    let shortcut = Shortcut {
        from: 1,
        projection: projection.then_some(Convolution {
            kernel: 1,
            padding: 0,
            ..conv(3, 6, channels, stride)
        }),
    };
    Plan::convolutional(
        &[
            Layer::normalized(stem, None),
            Layer::normalized(first, None),
            Layer::normalized(second, Some(pool)).with_shortcut(shortcut),
        ],
        72,
        hidden,
        classes,
        activation,
        training,
    )
    .unwrap()
}

/// A convolution of one sample in f64, from the definition.
fn conv_f64(x: &[f64], w: &[f64], b: &[f64], c: &Convolution) -> Vec<f64> {
    let (oh, ow) = (c.out_height() as usize, c.out_width() as usize);
    let (h, wd, k) = (c.height as usize, c.width as usize, c.kernel as usize);
    let (stride, pad, cin) = (
        c.stride as usize,
        c.padding as isize,
        c.in_channels as usize,
    );
    let mut y = vec![0.0; c.out_channels as usize * oh * ow];
    for o in 0..c.out_channels as usize {
        for i in 0..oh {
            for j in 0..ow {
                let mut sum = b[o];
                for ch in 0..cin {
                    for a in 0..k {
                        for bb in 0..k {
                            let r = (i * stride + a) as isize - pad;
                            let q = (j * stride + bb) as isize - pad;
                            if r >= 0 && q >= 0 && (r as usize) < h && (q as usize) < wd {
                                sum += x[(ch * h + r as usize) * wd + q as usize]
                                    * w[((o * cin + ch) * k + a) * k + bb];
                            }
                        }
                    }
                }
                y[(o * oh + i) * ow + j] = sum;
            }
        }
    }
    y
}

/// Pooling of one sample in f64, from the definition (max: the largest; average: over the
/// whole window, padding counted).
fn pool_f64(x: &[f64], p: &Pooling) -> Vec<f64> {
    let (oh, ow) = (p.out_height() as usize, p.out_width() as usize);
    let (h, w, k) = (p.height as usize, p.width as usize, p.kernel as usize);
    let (stride, pad) = (p.stride as usize, p.padding as isize);
    let mut y = Vec::new();
    for c in 0..p.channels as usize {
        for i in 0..oh {
            for j in 0..ow {
                let mut values = Vec::new();
                for a in 0..k {
                    for b in 0..k {
                        let r = (i * stride + a) as isize - pad;
                        let q = (j * stride + b) as isize - pad;
                        if r >= 0 && q >= 0 && (r as usize) < h && (q as usize) < w {
                            values.push(x[(c * h + r as usize) * w + q as usize]);
                        }
                    }
                }
                y.push(match p.kind {
                    PoolKind::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    PoolKind::Average => values.iter().sum::<f64>() / (k * k) as f64,
                });
            }
        }
    }
    y
}

/// Batch norm in f64 over a batch of samples (`channels x spatial` values each), from the
/// definition: each channel normalized by its mean and biased variance over the batch, then
/// scaled and shifted.
fn batch_norm_f64(batch: &mut [Vec<f64>], scale: &[f64], shift: &[f64]) {
    let channels = scale.len();
    let spatial = batch[0].len() / channels;
    for c in 0..channels {
        let values = || {
            batch
                .iter()
                .flat_map(|y| &y[c * spatial..(c + 1) * spatial])
        };
        let count = (batch.len() * spatial) as f64;
        let mean = values().sum::<f64>() / count;
        let variance = values().map(|v| (v - mean).powi(2)).sum::<f64>() / count;
        let invstd = 1.0 / (variance + f64::from(BATCH_NORM_EPS)).sqrt();
        for y in batch.iter_mut() {
            for v in &mut y[c * spatial..(c + 1) * spatial] {
                *v = (*v - mean) * invstd * scale[c] + shift[c];
            }
        }
    }
}

/// The mean loss of the network in f64, written independently of the f32 step, a layer at a
/// time over the whole batch (batch norm mixes samples); dropout drops what the masks of `seed`
/// drawn outside a step (step 0) drop.
fn loss_f64(plan: &Plan, params: &[f64], inputs: &[f32], labels: &[u32], seed: u64) -> f64 {
    let features = plan.input_features() as usize;
    let mut batch: Vec<Vec<f64>> = inputs
        .chunks_exact(features)
        .take(labels.len())
        .map(|x| x.iter().map(|&v| v as f64).collect())
        .collect();
    let mut rest = params;
    let mut take = |n: u64| {
        let (taken, left) = rest.split_at(n as usize);
        rest = left;
        taken
    };
    let mut layer_inputs = Vec::new();
    for (i, layer) in plan.layers.iter().enumerate() {
        let (n_in, n_out) = (layer.inputs as usize, layer.outputs as usize);
        let w = take(layer.weights());
        let scale = take(layer.scales());
        let b = take(layer.biases());
        let zeros = vec![0.0; b.len()];
        let conv_bias = if layer.norm { &zeros[..] } else { b };
        layer_inputs.push(batch.clone());
        batch = batch
            .iter()
            .map(|x| match &layer.conv {
                Some(conv) => conv_f64(x, w, conv_bias, conv),
                None => (0..n_out)
                    .map(|o| b[o] + (0..n_in).map(|k| w[o * n_in + k] * x[k]).sum::<f64>())
                    .collect(),
            })
            .collect();
        if layer.norm {
            batch_norm_f64(&mut batch, scale, b);
        }
        if let Some(shortcut) = layer.shortcut {
            let block_input = &layer_inputs[shortcut.from];
            let carried: Vec<Vec<f64>> = match shortcut.projection {
                Some(conv) => {
                    let (w, scale, shift) = (
                        take(conv.weights()),
                        take(conv.out_channels),
                        take(conv.out_channels),
                    );
                    let zeros = vec![0.0; shift.len()];
                    let mut projected: Vec<Vec<f64>> = block_input
                        .iter()
                        .map(|x| conv_f64(x, w, &zeros, &conv))
                        .collect();
                    batch_norm_f64(&mut projected, scale, shift);
                    projected
                }
                None => block_input.clone(),
            };
            for (y, r) in batch.iter_mut().zip(&carried) {
                for (v, r) in y.iter_mut().zip(r) {
                    *v += r;
                }
            }
        }
        if i + 1 == plan.layers.len() {
            break;
        }
        for (r, y) in batch.iter_mut().enumerate() {
            for v in y.iter_mut() {
                *v = match plan.activation {
                    Activation::Relu => v.max(0.0),
                    Activation::Tanh => v.tanh(),
                    Activation::Gelu => {
                        0.5 * *v
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (*v + 0.044715 * v.powi(3)))
                                .tanh())
                    }
                };
            }
            if let Some(pool) = &layer.pool {
                *y = pool_f64(y, pool);
            }
            if let Some(p) = plan.dropout_after(i) {
                let layer_key = synthetic::stream_key(seed, synthetic::dropout_stream(i));
                let key = synthetic::stream_key(layer_key, 0);
                let scale = f64::from(synthetic::dropout_scale(p));
                for (j, v) in y.iter_mut().enumerate() {
                    let kept = synthetic::keeps(key, (r * n_out + j) as u64, p);
                    *v = if kept { *v * scale } else { 0.0 };
                }
            }
        }
    }
    let total: f64 = batch
        .iter()
        .zip(labels)
        .map(|(x, &label)| {
            let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = x.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            log_sum - x[label as usize]
        })
        .sum();
    total / labels.len() as f64
}

/// One step's gradients of `plan` at `rows` samples, against the f64 finite differences of the
/// same model at the same parameters and inputs (as stored): the largest difference, relative to
/// the largest gradient.
fn gradient_error(plan: &Plan, rows: u64, seed: u64) -> f64 {
    let mut device = HostDevice::default();
    let program = plan.program(rows, seed).unwrap();
    let mut executor = Executor::setup(&mut device, &program).unwrap();
    let params: Vec<f64> = read_parameters(&mut device, &program, &executor)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let (inputs, labels) = program.inputs;
    let inputs = executor.values(inputs).to_f32_vec();
    let labels = executor.labels(labels).to_vec();
    // Forward and backward, not the update: the gradients are alive then.
    executor
        .run(&mut device, program.until(Moment::Optimizer), None)
        .unwrap();
    // Loss scaling leaves the gradients scaled; the update divides them.
    let scale = executor.loss_scale.map_or(1.0, |s| s.scale as f64);
    let analytic: Vec<f64> = read_all(&mut device, &program.gradients, &executor)
        .unwrap()
        .into_iter()
        .map(|g| g as f64 / scale)
        .collect();
    assert_eq!(analytic.len(), params.len());
    let largest = analytic.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let mut worst = 0.0f64;
    for i in 0..params.len() {
        let h = 1e-6;
        let mut plus = params.clone();
        plus[i] += h;
        let mut minus = params.clone();
        minus[i] -= h;
        let numeric = (loss_f64(plan, &plus, &inputs, &labels, seed)
            - loss_f64(plan, &minus, &inputs, &labels, seed))
            / (2.0 * h);
        worst = worst.max((numeric - analytic[i]).abs() / largest);
    }
    let row_loss = ops::mean(&executor.values(program.loss.0).to_f32_vec()) as f64;
    let want = loss_f64(plan, &params, &inputs, &labels, seed);
    assert!(
        (row_loss - want).abs() < 1e-5 + gradient_tolerance(plan.precision) * want,
        "{}: loss {row_loss} vs {want}",
        plan.precision
    );
    worst
}

/// How far a precision's gradients may be from the exact ones, relative to the largest: f32
/// arithmetic for `32-true`; for the others, the rounding of each stored 16-bit value (half a
/// unit: 2^-9 relative for bfloat16, 2^-12 for IEEE half), compounding through the stored
/// activations, their gradients and the products of two hidden layers: 8 such units (the
/// largest seen is 2 units for bfloat16, 1.2 for half).
fn gradient_tolerance(precision: Precision) -> f64 {
    match precision.compute() {
        Storage::F32 => 1e-4,
        Storage::Bf16 => 8.0 / 512.0,
        Storage::F16 => 8.0 / 4096.0,
    }
}

#[test]
fn gradients_match_finite_differences_in_every_precision_activation_and_framework() {
    for framework in [Framework::Pytorch, Framework::Headroom] {
        for precision in Precision::ALL {
            for activation in [Relu, Gelu, Tanh] {
                for dropout in [&[][..], &[0.5, 0.25]] {
                    let plan = Plan::new(
                        5,
                        &[4, 6],
                        3,
                        activation,
                        Training {
                            optimizer: Sgd,
                            learning_rate: 0.05,
                            precision,
                            framework,
                        },
                    )
                    .unwrap()
                    .with_dropout(dropout);
                    let error = gradient_error(&plan, 7, 11);
                    let name =
                        format!("{framework} {precision} {activation:?} dropout {dropout:?}");
                    eprintln!("{name}: {error:.2e}");
                    assert!(
                        error <= gradient_tolerance(precision),
                        "{name}: gradients {error:.2e} from finite differences"
                    );
                }
                let training = Training {
                    optimizer: Sgd,
                    learning_rate: 0.05,
                    precision,
                    framework,
                };
                // Dropout after the hidden linear layer, past the convolutions.
                let plans = [false, true]
                    .map(|norm| {
                        let plan = convolutional(&[5], 3, activation, training, norm);
                        (plan, format!("convolutional, batch norm {norm}"))
                    })
                    .into_iter()
                    .chain([false, true].map(|projection| {
                        let plan = residual(&[5], 3, activation, training, projection);
                        (plan, format!("residual, projection {projection}"))
                    }));
                for (plan, kind) in plans {
                    let plan = plan.with_dropout(&[0.5]);
                    let error = gradient_error(&plan, 3, 12);
                    let name = format!("{framework} {precision} {activation:?} {kind}");
                    eprintln!("{name}: {error:.2e}");
                    assert!(
                        error <= gradient_tolerance(precision),
                        "{name}: gradients {error:.2e} from finite differences"
                    );
                }
            }
        }
    }
}

/// The two frameworks run the same arithmetic in another order of allocations: in f32 they train
/// to the same parameters, bit for bit, dropping the same values.
#[test]
fn both_frameworks_train_to_the_same_parameters_in_f32() {
    for (activation, optimizer, dropout) in [
        (Relu, Adam, &[][..]),
        (Gelu, SgdMomentum, &[0.5, 0.0]),
        (Tanh, Adamw, &[0.2, 0.7]),
    ] {
        let [pytorch, headroom] = [Framework::Pytorch, Framework::Headroom].map(|framework| {
            let plan = Plan::new(
                9,
                &[7, 5],
                3,
                activation,
                Training {
                    optimizer,
                    learning_rate: 0.05,
                    precision: Precision::F32True,
                    framework,
                },
            )
            .unwrap()
            .with_dropout(dropout);
            trained_parameters(&mut HostDevice::default(), &plan, 13, 3, 4)
                .unwrap()
                .0
        });
        assert_eq!(
            pytorch, headroom,
            "{activation:?} {optimizer:?} {dropout:?}"
        );
        let [pytorch, headroom] = [Framework::Pytorch, Framework::Headroom].map(|framework| {
            let training = Training {
                optimizer,
                learning_rate: 0.05,
                precision: Precision::F32True,
                framework,
            };
            [
                convolutional(&[6], 3, activation, training, false),
                convolutional(&[6], 3, activation, training, true),
                residual(&[6], 3, activation, training, false),
                residual(&[6], 3, activation, training, true),
            ]
            .map(|plan| {
                trained_parameters(&mut HostDevice::default(), &plan, 5, 3, 4)
                    .unwrap()
                    .0
            })
        });
        assert_eq!(
            pytorch, headroom,
            "convolutional {activation:?} {optimizer:?}"
        );
    }
}

#[test]
fn a_model_without_hidden_layers_has_exact_gradients_too() {
    let plan = plan_of(6, &[], 4, Relu, Sgd);
    assert!(gradient_error(&plan, 5, 3) <= 1e-4);
}

#[test]
fn loss_goes_down_with_every_optimizer() {
    for (optimizer, rate) in [(Sgd, 0.5), (SgdMomentum, 0.1), (Adam, 0.01), (Adamw, 0.01)] {
        let plan = plan_with_rate(8, &[32], 4, Relu, optimizer, rate);
        let mut device = HostDevice::default();
        let first = device
            .run_steps(&plan, 128, Steps::exactly(1), 5)
            .unwrap()
            .final_loss;
        let after = device
            .run_steps(&plan, 128, Steps::exactly(40), 5)
            .unwrap()
            .final_loss;
        assert!(
            after < 0.8 * first,
            "{optimizer:?}: loss {first} -> {after}"
        );
    }
}

/// A batch of 4 on a tiny MLP steps in microseconds: a 5 ms floor times many steps of it,
/// while a floor of 0 times the one step after the warm-up.
#[test]
fn short_steps_are_timed_until_they_fill_the_floor() {
    let plan = plan_of(8, &[8], 2, Relu, Sgd);
    let mut device = HostDevice::default();
    let floor = Steps {
        at_least: 2,
        min_timed_seconds: 0.005,
    };
    let report = device.run_steps(&plan, 4, floor, 1).unwrap();
    let timed = f64::from(report.timed_steps) * report.step_seconds;
    assert!(report.timed_steps > 1, "{report:?}");
    assert!(
        report.timed_steps as usize == MAX_TIMED_STEPS || timed >= 0.5 * 0.005,
        "{report:?}"
    );
    let once = device.run_steps(&plan, 4, Steps::exactly(2), 1).unwrap();
    assert_eq!(once.timed_steps, 1);
}

#[test]
fn a_probe_peaks_at_exactly_the_modelled_bytes_and_returns_them() {
    let mut device = HostDevice::default();
    for framework in [Framework::Pytorch, Framework::Headroom] {
        for precision in Precision::ALL {
            for (activation, optimizer, dropout) in [
                (Relu, Adam, &[][..]),
                (Gelu, Sgd, &[0.5, 0.0]),
                (Tanh, SgdMomentum, &[0.1, 0.9]),
                (Relu, Adamw, &[0.0, 0.3]),
            ] {
                let plan = Plan::new(
                    784,
                    &[128, 64],
                    10,
                    activation,
                    Training {
                        optimizer,
                        learning_rate: 0.01,
                        precision,
                        framework,
                    },
                )
                .unwrap()
                .with_dropout(dropout);
                for batch in [1, 7, 129, 1000] {
                    let report = device
                        .run_steps(&plan, batch, Steps::exactly(2), 1)
                        .unwrap();
                    let modelled = plan.memory(batch).unwrap();
                    assert_eq!(
                        report.device_bytes, modelled.total,
                        "{framework} {precision} {activation:?} {optimizer:?} {dropout:?} at \
                         {batch}"
                    );
                    assert_eq!(device.used_bytes(), 0);
                }
                let training = Training {
                    optimizer,
                    learning_rate: 0.01,
                    precision,
                    framework,
                };
                for (plan, norm) in [
                    (
                        convolutional(&[16], 10, activation, training, false),
                        "none",
                    ),
                    (
                        convolutional(&[16], 10, activation, training, true),
                        "batch norm",
                    ),
                    (residual(&[16], 10, activation, training, false), "identity"),
                    (
                        residual(&[16], 10, activation, training, true),
                        "projection",
                    ),
                ] {
                    for batch in [1, 7, 129] {
                        let report = device
                            .run_steps(&plan, batch, Steps::exactly(2), 1)
                            .unwrap();
                        assert_eq!(
                            report.device_bytes,
                            plan.memory(batch).unwrap().total,
                            "convolutional {framework} {precision} {activation:?} {optimizer:?} \
                             {norm} at {batch}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn past_the_budget_is_out_of_memory_and_nothing_stays_charged() {
    let plan = plan_of(784, &[128], 10, Relu, Sgd);
    let budget = 4 << 20;
    let mut device = HostDevice::new(budget);
    let limit = plan.predict_max_batch(budget, Allocator::Exact);
    assert!(device.run_steps(&plan, limit, Steps::exactly(1), 1).is_ok());
    let err = device
        .run_steps(&plan, limit + 1, Steps::exactly(1), 1)
        .unwrap_err();
    assert!(matches!(err, DeviceError::OutOfMemory { .. }), "{err:?}");
    assert_eq!(device.used_bytes(), 0);
}

#[test]
fn an_allocation_the_system_refuses_is_out_of_memory() {
    let plan = plan_of(784, &[128], 10, Relu, Sgd);
    let mut device = HostDevice::new(u64::MAX);
    let err = device
        .run_steps(&plan, 1 << 58, Steps::exactly(1), 1)
        .unwrap_err();
    assert!(matches!(err, DeviceError::OutOfMemory { .. }), "{err:?}");
    assert_eq!(device.used_bytes(), 0);
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let plan = plan_of(12, &[9], 5, Gelu, Adamw);
    let mut device = HostDevice::default();
    let a = trained_parameters(&mut device, &plan, 33, 3, 9).unwrap().0;
    let b = trained_parameters(&mut device, &plan, 33, 3, 9).unwrap().0;
    let c = trained_parameters(&mut device, &plan, 33, 3, 10).unwrap().0;
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len() as u64, plan.parameter_count());
    assert_eq!(plan.optimizer, Adamw);
}

/// 16-bit batches larger than one widening chunk go through a convolution and a max pooling
/// block by block (LeNet's first layer: 13 samples a block): each sample's outputs are those of
/// one f32 pass over the same values, rounded once, and the filter gradient summed over blocks
/// stays within a 16-bit unit of the f32 sum.
#[test]
fn sixteen_bit_batches_are_convolved_and_pooled_block_by_block() {
    let conv = Convolution {
        in_channels: 1,
        height: 28,
        width: 28,
        out_channels: 6,
        kernel: 5,
        stride: 1,
        padding: 2,
    };
    let pool = Pooling {
        kind: PoolKind::Max,
        channels: 6,
        height: 28,
        width: 28,
        kernel: 2,
        stride: 2,
        padding: 0,
    };
    let rows = 40u64;
    let (inputs, outputs) = (rows * conv.inputs(), rows * conv.outputs());
    assert!(outputs as usize > 2 * values::CHUNK, "more than two blocks");
    let bf16 = |v: &[f32]| {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect::<Vec<_>>()
    };
    let key = synthetic::stream_key(5, 6);
    let random = |n: u64, offset: u64| {
        bf16(
            &(0..n)
                .map(|i| synthetic::uniform(key, i + offset, 1.0))
                .collect::<Vec<_>>(),
        )
    };
    let (x, w, dy) = (
        random(inputs, 0),
        random(conv.weights(), inputs),
        random(outputs, 0),
    );
    let mut device = HostDevice::default();
    let mut run = |storage: Storage| {
        let [xd, wd, dyd] = [&x, &w, &dy].map(|v| device.write_values(v, storage).unwrap());
        let mut y = device.zeroed(outputs, storage).unwrap();
        device
            .conv2d_forward(&xd, &wd, &mut y, rows, &conv)
            .unwrap();
        let mut pooled = device.zeroed(rows * pool.outputs(), storage).unwrap();
        let mut places = device.index_zeroed(rows * pool.outputs()).unwrap();
        device
            .max_pool_forward(&y, &mut pooled, &mut places, rows, &pool)
            .unwrap();
        let mut back = device.zeroed(outputs, storage).unwrap();
        device
            .max_pool_backward(&pooled, &places, &mut back, rows, &pool)
            .unwrap();
        let mut dx = device.zeroed(inputs, storage).unwrap();
        device
            .conv2d_input_gradient(&dyd, &wd, &mut dx, rows, &conv)
            .unwrap();
        let mut dw = device.zeroed(conv.weights(), Storage::F32).unwrap();
        device
            .conv2d_weight_gradient(&dyd, &xd, &mut dw, rows, &conv)
            .unwrap();
        [y, pooled, back, dx, dw].map(|v| v.to_f32_vec())
    };
    let [y, pooled, back, dx, dw] = run(Storage::Bf16);
    let [y32, _, _, dx32, dw32] = run(Storage::F32);
    assert_eq!(y, bf16(&y32));
    assert_eq!(dx, bf16(&dx32));
    // Pooling reads the stored (rounded) outputs: its maxima are among them, routed back.
    assert!(pooled.iter().all(|v| y.contains(v)));
    assert_eq!(
        back.iter().filter(|&&v| v != 0.0).count(),
        pooled.iter().filter(|&&v| v != 0.0).count()
    );
    let largest = dw32.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (a, b) in dw.iter().zip(&dw32) {
        assert!((a - b).abs() <= 1e-5 * largest.max(1.0), "{a} vs {b}");
    }
}
