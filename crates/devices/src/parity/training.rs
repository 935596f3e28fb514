//! Whole training steps on a device against the host: every precision, and the loss scaler's
//! skipped steps under `16-mixed`.

use super::{compare, tolerance, Check};
use crate::host::HostDevice;
use crate::transfer::trained_parameters;
use crate::transfer::Transfer;
use headroom_engine::device::{DeviceError, Probing};
use headroom_engine::plan::Framework;
use headroom_engine::plan::{
    Activation, Convolution, Layer, OptimizerKind, Plan, PoolKind, Pooling, Precision, Shortcut,
    Training, LOSS_SCALE_INITIAL,
};

/// The accepted difference of parameters after three steps in `precision`: f32's tolerance,
/// or one unit of the 16-bit storage the step computes in. The master parameters of the mixed
/// precisions are f32, but a 16-bit activation stored one unit apart (see [`tolerance`])
/// moves the gradients, and so the parameters, by a fraction of that unit times the step size.
fn training_tolerance(precision: Precision) -> f64 {
    tolerance(precision.compute())
}

/// Trains the same small model for three steps on `device` and on the host, and compares every
/// parameter afterwards: every optimizer and activation in f32, two of them in each 16-bit
/// precision, some with dropout after the hidden layers; then the loss scaler's skipped steps.
pub fn check_training<D: Probing + Transfer>(device: &mut D) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    const DROPOUT: &[f32] = &[0.5, 0.2];
    let f32_runs = [
        (
            OptimizerKind::Sgd,
            Activation::Relu,
            Framework::Pytorch,
            &[][..],
        ),
        (
            OptimizerKind::SgdMomentum,
            Activation::Tanh,
            Framework::Headroom,
            DROPOUT,
        ),
        (
            OptimizerKind::Adam,
            Activation::Gelu,
            Framework::Pytorch,
            DROPOUT,
        ),
        (
            OptimizerKind::Adamw,
            Activation::Relu,
            Framework::Headroom,
            &[],
        ),
        (
            OptimizerKind::SgdMomentum,
            Activation::Tanh,
            Framework::Pytorch,
            &[],
        ),
    ];
    let half_runs = [
        (
            OptimizerKind::SgdMomentum,
            Activation::Gelu,
            Framework::Pytorch,
            DROPOUT,
        ),
        (
            OptimizerKind::Adamw,
            Activation::Relu,
            Framework::Headroom,
            DROPOUT,
        ),
    ];
    for precision in Precision::ALL {
        let runs: &[(OptimizerKind, Activation, Framework, &[f32])] = match precision {
            Precision::F32True => &f32_runs,
            _ => &half_runs,
        };
        for &(optimizer, activation, framework, dropout) in runs {
            let learning_rate = optimizer.default_learning_rate() as f32;
            let plan = Plan::new(
                49,
                &[129, 33],
                10,
                activation,
                Training {
                    optimizer,
                    learning_rate,
                    precision,
                    framework,
                },
            )
            .expect("the parity model plans")
            .with_dropout(dropout);
            let (want, _) = trained_parameters(&mut HostDevice::default(), &plan, 1000, 3, 42)?;
            let (got, _) = trained_parameters(device, &plan, 1000, 3, 42)?;
            checks.push(compare(
                format!(
                    "3 training steps, {optimizer:?} + {activation:?}, dropout {dropout:?}, batch \
                     1000, {precision}, {framework}'s step"
                ),
                &got,
                &want,
                training_tolerance(precision),
            ));
        }
    }
    for precision in Precision::ALL {
        // Batch norm in headroom's step, where its backward writes over buffers it has read.
        for (norm, framework) in [(false, Framework::Pytorch), (true, Framework::Headroom)] {
            let training = Training {
                optimizer: OptimizerKind::Adam,
                learning_rate: 0.001,
                precision,
                framework,
            };
            let plan = lenet_like(training, norm);
            let (want, _) = trained_parameters(&mut HostDevice::default(), &plan, 33, 3, 42)?;
            let (got, _) = trained_parameters(device, &plan, 33, 3, 42)?;
            checks.push(compare(
                format!(
                    "3 training steps, LeNet-like convolutions (batch norm: {norm}), Adam, batch \
                     33, {precision}, {framework}'s step"
                ),
                &got,
                &want,
                training_tolerance(precision),
            ));
        }
    }
    for (n, precision) in Precision::ALL.into_iter().enumerate() {
        let framework = [Framework::Pytorch, Framework::Headroom][n % 2];
        let training = Training {
            optimizer: OptimizerKind::SgdMomentum,
            learning_rate: 0.01,
            precision,
            framework,
        };
        let plan = resnet_like(training);
        let (want, _) = trained_parameters(&mut HostDevice::default(), &plan, 9, 3, 42)?;
        let (got, _) = trained_parameters(device, &plan, 9, 3, 42)?;
        checks.push(compare(
            format!(
                "3 training steps, ResNet-like blocks (a projection, an identity), SGD with \
                 momentum, batch 9, {precision}, {framework}'s step"
            ),
            &got,
            &want,
            training_tolerance(precision),
        ));
    }
    checks.push(check_loss_scaling(device)?);
    Ok(checks)
}

/// A ResNet's shape in miniature: 3x8x8, a padded 3x3 convolution to 4 channels; a block of
/// two to 8 channels at stride 2 with a 1x1 projection shortcut; a block of two with the
/// identity, pooled globally; 10 classes. Batch norm after every convolution.
fn resnet_like(training: Training) -> Plan {
    let conv = |in_channels, side, out_channels, stride| Convolution {
        in_channels,
        height: side,
        width: side,
        out_channels,
        kernel: 3,
        stride,
        padding: 1,
    };
    let block = |from, projection| Shortcut { from, projection };
    let projection = Convolution {
        kernel: 1,
        padding: 0,
        ..conv(4, 8, 8, 2)
    };
    let pool = Pooling {
        kind: PoolKind::Average,
        channels: 8,
        height: 4,
        width: 4,
        kernel: 4,
        stride: 4,
        padding: 0,
    };
    Plan::convolutional(
        &[
            Layer::normalized(conv(3, 8, 4, 1), None),
            Layer::normalized(conv(4, 8, 8, 2), None),
            Layer::normalized(conv(8, 4, 8, 1), None).with_shortcut(block(1, Some(projection))),
            Layer::normalized(conv(8, 4, 8, 1), None),
            Layer::normalized(conv(8, 4, 8, 1), Some(pool)).with_shortcut(block(3, None)),
        ],
        192,
        &[],
        10,
        Activation::Relu,
        training,
    )
    .expect("the parity model plans")
}

/// LeNet-5's shape at a third of its size: 1x12x12, a padded 5x5 convolution to 6 channels, max
/// pooled; a 3x3 convolution to 8, average pooled; 32 hidden, 10 classes. With `norm`, batch
/// norm follows each convolution.
fn lenet_like(training: Training, norm: bool) -> Plan {
    let first = Convolution {
        in_channels: 1,
        height: 12,
        width: 12,
        out_channels: 6,
        kernel: 5,
        stride: 1,
        padding: 2,
    };
    let second = Convolution {
        in_channels: 6,
        height: 6,
        width: 6,
        out_channels: 8,
        kernel: 3,
        stride: 1,
        padding: 0,
    };
    let pool = |kind, channels, side| Pooling {
        kind,
        channels,
        height: side,
        width: side,
        kernel: 2,
        stride: 2,
        padding: 0,
    };
    let layer = match norm {
        true => Layer::normalized,
        false => Layer::convolution,
    };
    Plan::convolutional(
        &[
            layer(first, Some(pool(PoolKind::Max, 6, 12))),
            layer(second, Some(pool(PoolKind::Average, 8, 4))),
        ],
        144,
        &[32],
        10,
        Activation::Relu,
        training,
    )
    .expect("the parity model plans")
}

/// `16-mixed` at batch 1 over 10 000 classes from `GradScaler`'s first scale, 2^16: the label's
/// probability starts near 1/10 000, so its scaled logit gradient, about (1/10 000 - 1) x 2^16,
/// passes f16's largest value (65504) and the first step is skipped, halving the scale. Device
/// and host must skip the same steps (so end on the same scale) and agree on the parameters; the check fails if no step was skipped, since it would then prove nothing.
fn check_loss_scaling<D: Probing + Transfer>(device: &mut D) -> Result<Check, DeviceError> {
    let plan = Plan::new(
        49,
        &[129, 33],
        10_000,
        Activation::Relu,
        Training {
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.01,
            precision: Precision::F16Mixed,
            framework: Framework::Pytorch,
        },
    )
    .expect("the parity model plans");
    let (want, want_scale) = trained_parameters(&mut HostDevice::default(), &plan, 1, 6, 42)?;
    let (got, got_scale) = trained_parameters(device, &plan, 1, 6, 42)?;
    let mut check = compare(
        format!(
            "16-mixed loss scaling, batch 1, 6 steps: scale {got_scale:?} (host {want_scale:?})"
        ),
        &got,
        &want,
        training_tolerance(plan.precision),
    );
    let skipped = want_scale.is_some_and(|s| s < LOSS_SCALE_INITIAL);
    check.passed &= skipped && got_scale == want_scale;
    Ok(check)
}
