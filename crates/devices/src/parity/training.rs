//! Whole training steps on a device against the host: every precision, and the loss scaler's
//! skipped steps under `16-mixed`.

use super::{compare, tolerance, Check};
use crate::host::HostDevice;
use crate::transfer::trained_parameters;
use crate::transfer::Transfer;
use headroom_engine::device::{DeviceError, Probing};
use headroom_engine::modules::LayerSpec;
use headroom_engine::plan::Framework;
use headroom_engine::plan::{
    Activation, OptimizerKind, Plan, Precision, Training, LOSS_SCALE_INITIAL,
};
use serde_json::json;

/// The accepted difference of parameters after three steps in `precision`: f32's tolerance,
/// or one unit of the 16-bit storage the step computes in. The master parameters of the mixed
/// precisions are f32, but a 16-bit activation stored one unit apart (see [`tolerance`])
/// moves the gradients, and so the parameters, by a fraction of that unit times the step size.
fn training_tolerance(precision: Precision) -> f64 {
    tolerance(precision.compute())
}

/// A model as a layer list in the job's form.
fn layers(list: serde_json::Value) -> Vec<LayerSpec> {
    serde_json::from_value(list).expect("the parity models are valid layer lists")
}

/// The plan of `list` over `input_shape` into 10 classes.
fn plan(input_shape: &[u64], list: serde_json::Value, training: Training) -> Plan {
    Plan::new(input_shape, &layers(list), 10, training, "model").expect("the parity model plans")
}

/// MLPs of 49 inputs, hidden widths 129 and 33, 10 classes, with each activation; `dropout`
/// puts dropout after each hidden activation.
fn mlp(activation: serde_json::Value, dropout: bool, training: Training) -> Plan {
    let mut list = Vec::new();
    for width in [129, 33] {
        list.push(json!({"linear": {"out_features": width}}));
        list.push(activation.clone());
        if dropout {
            list.push(json!({"dropout": {"p": 0.3}}));
        }
    }
    list.push(json!({"linear": {"out_features": 10}}));
    plan(&[49], serde_json::Value::Array(list), training)
}

/// Trains the same small model for three steps on `device` and on the host, and compares every
/// parameter afterwards: MLPs with every optimizer and activation (in place or not, some with
/// dropout) in f32 and two in each 16-bit precision; convolutional models in every precision;
/// then the loss scaler's skipped steps.
pub fn check_training<D: Probing + Transfer>(device: &mut D) -> Result<Vec<Check>, DeviceError> {
    let mut checks = Vec::new();
    let f32_runs = [
        (OptimizerKind::Sgd, json!({"relu": {}}), false),
        (OptimizerKind::SgdMomentum, json!({"tanh": {}}), true),
        (
            OptimizerKind::Adam,
            json!({"gelu": {"approximate": "tanh"}}),
            true,
        ),
        (
            OptimizerKind::Adamw,
            json!({"relu": {"inplace": true}}),
            false,
        ),
        (OptimizerKind::SgdMomentum, json!({"silu": {}}), false),
        (OptimizerKind::Adam, json!({"gelu": {}}), false),
        (OptimizerKind::Sgd, json!({"sigmoid": {}}), true),
        (
            OptimizerKind::SgdMomentum,
            json!({"leaky_relu": {"negative_slope": 0.2, "inplace": true}}),
            false,
        ),
        (OptimizerKind::Adamw, json!({"relu6": {}}), true),
    ];
    let half_runs = [
        (OptimizerKind::SgdMomentum, json!({"gelu": {}}), true),
        (
            OptimizerKind::Adamw,
            json!({"relu": {"inplace": true}}),
            true,
        ),
    ];
    for precision in Precision::ALL {
        let runs = match precision {
            Precision::F32True => &f32_runs[..],
            _ => &half_runs[..],
        };
        for (n, (optimizer, activation, dropout)) in runs.iter().enumerate() {
            let framework = [Framework::Pytorch, Framework::Headroom][n % 2];
            let training = Training {
                optimizer: *optimizer,
                learning_rate: optimizer.default_learning_rate() as f32,
                precision,
                framework,
            };
            let plan = mlp(activation.clone(), *dropout, training);
            checks.push(compare_training(
                device,
                &plan,
                1000,
                format!("MLP with {activation}, dropout {dropout}, {optimizer:?}, batch 1000"),
            )?);
        }
    }
    for (n, precision) in Precision::ALL.into_iter().enumerate() {
        for (model, name) in [
            (
                lenet_like as fn(Training) -> Plan,
                "LeNet-like convolutions",
            ),
            (
                resnet_like,
                "ResNet-like blocks (a projection, an identity)",
            ),
            (
                mobilenet_like,
                "MobileNet-like blocks (depthwise, dilated, relu6, silu)",
            ),
            (
                transformer_like,
                "a transformer over tokens (fused and eager attention)",
            ),
        ] {
            let framework = [Framework::Pytorch, Framework::Headroom][n % 2];
            let training = Training {
                optimizer: OptimizerKind::SgdMomentum,
                learning_rate: 0.01,
                precision,
                framework,
            };
            let label = format!("{name}, SGD with momentum, batch 9");
            checks.push(compare_training(device, &model(training), 9, label)?);
        }
    }
    checks.push(check_loss_scaling(device)?);
    Ok(checks)
}

/// Three steps of `plan` at `rows` on `device` and on the host, every parameter compared.
fn compare_training<D: Probing + Transfer>(
    device: &mut D,
    plan: &Plan,
    rows: u64,
    label: String,
) -> Result<Check, DeviceError> {
    let (want, _) = trained_parameters(&mut HostDevice::default(), plan, rows, 3, 42)?;
    let (got, _) = trained_parameters(device, plan, rows, 3, 42)?;
    Ok(compare(
        format!(
            "3 training steps, {label}, {}, {}'s step",
            plan.precision, plan.framework
        ),
        &got,
        &want,
        training_tolerance(plan.precision),
    ))
}

/// LeNet-5's shape at a third of its size over 1x12x12: a padded 5x5 convolution to 6
/// channels, batch norm before relu, max pooled with `ceil_mode`; a bias-free 3x3 convolution
/// to 8, average pooled over padding it does not count; 32 hidden, 10 classes.
fn lenet_like(training: Training) -> Plan {
    let list = json!([
        {"conv2d": {"out_channels": 6, "kernel_size": 5, "padding": 2}},
        {"batch_norm2d": {}},
        {"relu": {"inplace": true}},
        {"max_pool2d": {"kernel_size": 3, "stride": 2, "ceil_mode": true}},
        {"conv2d": {"out_channels": 8, "kernel_size": 3, "bias": false}},
        {"avg_pool2d": {"kernel_size": 2, "padding": 1, "count_include_pad": false}},
        {"flatten": {}},
        {"linear": {"out_features": 32}},
        {"batch_norm1d": {"affine": false}},
        {"tanh": {}},
        {"linear": {"out_features": 10}}
    ]);
    plan(&[1, 12, 12], list, training)
}

/// A ResNet's shape in miniature over 3x8x8: a padded 3x3 convolution to 4 channels; a block
/// of two to 8 channels at stride 2 with a 1x1 projection shortcut; a block of two with the
/// identity, pooled adaptively to 1x1; 10 classes. Batch norm after every convolution.
fn resnet_like(training: Training) -> Plan {
    let conv = |out: u64, stride: u64| json!({"conv2d": {"out_channels": out, "kernel_size": 3, "stride": stride, "padding": 1, "bias": false}});
    let bn = json!({"batch_norm2d": {}});
    let relu = json!({"relu": {"inplace": true}});
    let list = json!([
        conv(4, 1), bn, relu,
        {"residual": {
            "layers": [conv(8, 2), bn, relu, conv(8, 1), bn],
            "shortcut": [{"conv2d": {"out_channels": 8, "kernel_size": 1, "stride": 2, "bias": false}}, bn]
        }},
        relu,
        {"residual": {"layers": [conv(8, 1), bn, relu, conv(8, 1), bn]}},
        relu,
        {"adaptive_avg_pool2d": {"output_size": 1}},
        {"flatten": {}},
        {"linear": {"out_features": 10}}
    ]);
    plan(&[3, 8, 8], list, training)
}

/// A MobileNet's shape in miniature over 3x9x9: a strided 3x3 convolution to 8 channels with
/// relu6; an inverted residual (1x1 expansion, a depthwise 3x3, a 1x1 projection) around the
/// identity; a dilated convolution in two groups with silu; a dropout; adaptive pooling to 2x2;
/// 10 classes.
fn mobilenet_like(training: Training) -> Plan {
    let bn = json!({"batch_norm2d": {}});
    let list = json!([
        {"conv2d": {"out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1, "bias": false}},
        bn, {"relu6": {"inplace": true}},
        {"residual": {"layers": [
            {"conv2d": {"out_channels": 16, "kernel_size": 1, "bias": false}}, bn, {"relu6": {}},
            {"conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1, "groups": 16, "bias": false}},
            bn, {"relu6": {"inplace": true}},
            {"conv2d": {"out_channels": 8, "kernel_size": 1, "bias": false}}, bn
        ]}},
        {"conv2d": {"out_channels": 6, "kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2}},
        {"silu": {}},
        {"dropout": {"p": 0.2}},
        {"adaptive_avg_pool2d": {"output_size": 2}},
        {"flatten": {}},
        {"linear": {"out_features": 10}}
    ]);
    plan(&[3, 9, 9], list, training)
}

/// A small language model: causal grouped-query attention with rotary embedding and dropout on
/// the fused path, then on the eager path, a gated MLP, and a head tied to the embedding.
fn transformer_like(training: Training) -> Plan {
    let list = json!([
        {"embedding": {"embedding_dim": 8}},
        {"residual": {"layers": [
            {"layer_norm": {}},
            {"self_attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 4, "causal": true, "rope_theta": 10000.0, "dropout": 0.2}}
        ]}},
        {"residual": {"layers": [
            {"rms_norm": {}},
            {"self_attention": {"num_heads": 4, "num_kv_heads": 2, "causal": true, "rope_theta": 10000.0, "dropout": 0.2, "implementation": "eager"}}
        ]}},
        {"residual": {"layers": [
            {"layer_norm": {}},
            {"gated_mlp": {"intermediate_size": 12}}
        ]}},
        {"layer_norm": {}},
        {"linear": {"out_features": 11, "bias": false, "tied": true}}
    ]);
    Plan::for_tokens(7, 11, &layers(list), 11, training, "model").expect("the parity model plans")
}

/// `16-mixed` at batch 1 over 10 000 classes from `GradScaler`'s first scale, 2^16: the label's
/// probability starts near 1/10 000, so its scaled logit gradient, about (1/10 000 - 1) x 2^16,
/// passes f16's largest value (65504) and the first step is skipped, halving the scale. Device
/// and host must skip the same steps (so end on the same scale) and agree on the parameters; the check fails if no step was skipped, since it would then
/// prove nothing.
fn check_loss_scaling<D: Probing + Transfer>(device: &mut D) -> Result<Check, DeviceError> {
    let plan = Plan::mlp(
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
