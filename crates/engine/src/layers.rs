//! A model as a list of layers, in PyTorch's `torch.nn` names and defaults, so that a user reads
//! their model across: `{"conv2d": {"out_channels": 6, "kernel_size": 5, "padding": 2}}`,
//! `{"max_pool2d": {"kernel_size": 2}}`, `{"linear": {"out_features": 120}}`, `{"relu": {}}`,
//! `{"residual": {"layers": [...]}}`.
//!
//! [`walk`] checks every layer's shape against what reaches it (naming the layer's index and
//! field when it cannot apply) and counts the parameters as PyTorch's `sum(p.numel())` does. A
//! list of convolutions (each maybe with batch norm, then the activation and maybe max, average
//! or global average pooling after it), `flatten`, then `linear` layers, one kind of activation
//! and `dropout` after it is a network headroom trains ([`LayerSpec::as_network`]), residual
//! blocks of batch-normalized convolutions among the convolutions.

use serde::{Deserialize, Serialize};

use crate::plan::image::window_count as window_output;
use crate::plan::{Activation, Convolution, Layer, PoolKind, Pooling, Shortcut};

/// The most layers a list may hold, residual blocks' own counted: deeper than any ResNet.
pub const MAX_LAYERS: usize = 1000;
/// The deepest nesting of residual blocks.
pub const MAX_NESTING: usize = 8;
/// The largest width, channel count, kernel, stride or padding any one layer may name.
pub const MAX_EXTENT: u64 = 1 << 32;

/// One layer of `model.layers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// `nn.Conv2d`: square kernel, the input's channels inferred.
    Conv2d(Conv2d),
    /// `nn.MaxPool2d`.
    MaxPool2d(Pool2d),
    /// `nn.AvgPool2d`.
    AvgPool2d(Pool2d),
    /// `nn.BatchNorm2d` in training mode, its channels inferred.
    BatchNorm2d(BatchNorm2d),
    /// `nn.Dropout`.
    Dropout(Dropout),
    /// `nn.Flatten`: every dimension of a sample into one.
    Flatten(NoArguments),
    /// `nn.Linear`, its input features inferred.
    Linear(Linear),
    /// `nn.ReLU`.
    Relu(NoArguments),
    /// `nn.GELU` (the tanh approximation, as headroom's kernels compute it).
    Gelu(NoArguments),
    /// `nn.Tanh`.
    Tanh(NoArguments),
    /// `nn.AdaptiveAvgPool2d(1)` then `flatten`: one value per channel.
    GlobalAvgPool2d(NoArguments),
    /// Its layers added to the block's input: an identity shortcut when the shapes agree, else a
    /// 1x1 convolution (no bias) and batch norm, as ResNet's downsampling blocks do.
    Residual(Residual),
}

/// A layer that takes no arguments: `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// `nn.Conv2d`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conv2d {
    /// Output channels.
    pub out_channels: u64,
    /// Side of the square kernel.
    pub kernel_size: u64,
    /// Step between applications (1).
    #[serde(default = "one")]
    pub stride: u64,
    /// Zeros added on every side (0).
    #[serde(default)]
    pub padding: u64,
    /// Whether a bias is learnt (true).
    #[serde(default = "yes")]
    pub bias: bool,
}

/// `nn.MaxPool2d`'s and `nn.AvgPool2d`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool2d {
    /// Side of the square window.
    pub kernel_size: u64,
    /// Step between windows (the kernel size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u64>,
    /// Padding on every side (0), at most half the kernel.
    #[serde(default)]
    pub padding: u64,
}

/// `nn.BatchNorm2d`'s arguments that change memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNorm2d {
    /// Whether a scale and shift are learnt (true).
    #[serde(default = "yes")]
    pub affine: bool,
}

/// `nn.Dropout`'s argument.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dropout {
    /// Probability of zeroing each value (0.5), in [0, 1).
    #[serde(default = "half")]
    pub p: f64,
}

/// `nn.Linear`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Linear {
    /// Output features.
    pub out_features: u64,
    /// Whether a bias is learnt (true).
    #[serde(default = "yes")]
    pub bias: bool,
}

/// A residual block's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Residual {
    /// The layers whose output is added to the shortcut.
    pub layers: Vec<LayerSpec>,
}

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

fn half() -> f64 {
    0.5
}

/// The shape of one sample between layers: `[C, H, W]` for images, `[N]` once flat.
pub type Shape = Vec<u64>;

/// A layer list that cannot be built: the field at fault (`model.layers[2].conv2d.kernel_size`)
/// and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong and what would work.
    pub reason: String,
}

impl LayerError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> LayerError {
        LayerError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What a checked layer list amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walked {
    /// The shape of a sample after the last layer.
    pub output: Shape,
    /// Learnt values, as PyTorch's `sum(p.numel() for p in model.parameters())` counts them.
    pub parameters: u64,
    /// Layers in all, residual blocks' own (and their shortcuts) counted.
    pub layers: usize,
}

impl LayerSpec {
    /// Its name in a job.
    pub fn name(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d(_) => "conv2d",
            LayerSpec::MaxPool2d(_) => "max_pool2d",
            LayerSpec::AvgPool2d(_) => "avg_pool2d",
            LayerSpec::BatchNorm2d(_) => "batch_norm2d",
            LayerSpec::Dropout(_) => "dropout",
            LayerSpec::Flatten(_) => "flatten",
            LayerSpec::Linear(_) => "linear",
            LayerSpec::Relu(_) => "relu",
            LayerSpec::Gelu(_) => "gelu",
            LayerSpec::Tanh(_) => "tanh",
            LayerSpec::GlobalAvgPool2d(_) => "global_avg_pool2d",
            LayerSpec::Residual(_) => "residual",
        }
    }

    /// The network a list describes: convolutions (with bias, or without and batch norm after
    /// them), each followed by the activation and at most one max, average or (ending the
    /// convolutions, flattening) global average pooling, then `flatten` and the MLP of `linear`
    /// layers (with bias), the activation and `dropout` after it; one kind of activation
    /// throughout.
    /// Otherwise the path of the first layer headroom cannot train yet, and why. `input` is a
    /// sample's shape; the list has been walked ([`walk`]).
    pub fn as_network(
        layers: &[LayerSpec],
        input: &[u64],
        path: &str,
    ) -> Result<Network, LayerError> {
        let mut net = Network::default();
        let mut widths = Vec::new();
        // The first activation and its path: headroom uses one throughout.
        let mut activation: Option<(Activation, String)> = None;
        let mut same_activation = |kind: Activation, at: &str| match &activation {
            Some((first, first_at)) if *first != kind => Err(LayerError::new(
                at,
                format!(
                    "headroom uses one activation throughout, and {first_at} is {}",
                    activation_name(*first)
                ),
            )),
            Some(_) => Ok(()),
            None => {
                activation = Some((kind, at.to_string()));
                Ok(())
            }
        };
        let mut shape = input.to_vec();
        // What the last layer read was.
        #[derive(PartialEq, Clone, Copy)]
        enum After {
            Start,
            BareConv,
            Conv,
            ConvActivation,
            Pool,
            Global,
            Flat,
            Linear,
            Activation,
            Dropout,
        }
        let mut after = After::Start;
        for (i, layer) in layers.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let in_features = matches!(after, After::Start | After::ConvActivation | After::Pool);
            let kind = match layer {
                LayerSpec::Conv2d(conv) if in_features => {
                    let normalized = matches!(layers.get(i + 1), Some(LayerSpec::BatchNorm2d(_)));
                    if conv.bias == normalized {
                        return Err(LayerError::new(
                            format!("{at}.conv2d.bias"),
                            match conv.bias {
                                true => {
                                    "a convolution that batch_norm2d follows takes \"bias\": \
                                         false, as ResNet's do: batch norm subtracts the mean, so \
                                         the bias would learn nothing"
                                }
                                false => {
                                    "headroom trains a convolution without bias only when \
                                          batch_norm2d follows it: give it \"bias\": true or add \
                                          batch_norm2d"
                                }
                            },
                        ));
                    }
                    let conv = convolution(conv, &mut shape, &at, layer)?;
                    net.convolutions.push(match normalized {
                        true => Layer::normalized(conv, None),
                        false => Layer::convolution(conv, None),
                    });
                    after = match normalized {
                        true => After::BareConv,
                        false => After::Conv,
                    };
                    continue;
                }
                LayerSpec::BatchNorm2d(norm) if after == After::BareConv => {
                    if !norm.affine {
                        return Err(LayerError::new(
                            format!("{at}.batch_norm2d.affine"),
                            "headroom trains batch norm with its scale and shift (affine: true)",
                        ));
                    }
                    after = After::Conv;
                    continue;
                }
                LayerSpec::BatchNorm2d(_) => {
                    return Err(LayerError::new(
                        at,
                        "headroom trains batch_norm2d right after a convolution without bias, \
                         before its activation: conv2d, batch_norm2d, activation",
                    ))
                }
                LayerSpec::Conv2d(_) => {
                    return Err(LayerError::new(
                        at,
                        "headroom trains a convolution at the start of the list or after the \
                         activation (and pooling) of another: conv2d, activation, pooling",
                    ))
                }
                LayerSpec::MaxPool2d(pool) | LayerSpec::AvgPool2d(pool)
                    if after == After::ConvActivation =>
                {
                    let [channels, height, width] = image(&shape, &at, layer)?;
                    let pooling = Pooling {
                        kind: match layer {
                            LayerSpec::MaxPool2d(_) => PoolKind::Max,
                            _ => PoolKind::Average,
                        },
                        channels,
                        height,
                        width,
                        kernel: pool.kernel_size,
                        stride: pool.stride.unwrap_or(pool.kernel_size),
                        padding: pool.padding,
                    };
                    shape = vec![channels, pooling.out_height(), pooling.out_width()];
                    if let Some(conv) = net.convolutions.last_mut() {
                        conv.pool = Some(pooling);
                    }
                    after = After::Pool;
                    continue;
                }
                LayerSpec::GlobalAvgPool2d(_) if after == After::ConvActivation => {
                    let [channels, height, width] = image(&shape, &at, layer)?;
                    if height != width {
                        return Err(LayerError::new(
                            at,
                            format!(
                                "headroom pools square windows: global_avg_pool2d over a \
                                 {height}x{width} input is not trained yet"
                            ),
                        ));
                    }
                    // AdaptiveAvgPool2d(1) over a square input is one window of its size.
                    if let Some(conv) = net.convolutions.last_mut() {
                        conv.pool = Some(Pooling {
                            kind: PoolKind::Average,
                            channels,
                            height,
                            width,
                            kernel: height,
                            stride: height,
                            padding: 0,
                        });
                    }
                    shape = vec![channels];
                    after = After::Global;
                    continue;
                }
                LayerSpec::GlobalAvgPool2d(_) => {
                    return Err(LayerError::new(
                        at,
                        "headroom pools globally right after a convolution's activation: \
                         conv2d, activation, global_avg_pool2d",
                    ))
                }
                LayerSpec::MaxPool2d(_) | LayerSpec::AvgPool2d(_) => {
                    return Err(LayerError::new(
                        at,
                        "headroom pools right after a convolution's activation, once: conv2d, \
                         activation, pooling",
                    ))
                }
                LayerSpec::Residual(block) if in_features && after != After::Start => {
                    let inner = format!("{at}.residual.layers");
                    let from = net.convolutions.len();
                    let mut body_shape = shape.clone();
                    // What the body's last layer was: a convolution, its batch norm, or (at the
                    // start, and after an activation) neither.
                    #[derive(PartialEq)]
                    enum Body {
                        Open,
                        Conv,
                        Norm,
                    }
                    let mut body = Body::Open;
                    for (j, inside) in block.layers.iter().enumerate() {
                        let at = format!("{inner}[{j}]");
                        let kind = match (inside, &body) {
                            (LayerSpec::Conv2d(conv), Body::Open) if !conv.bias => {
                                let conv = convolution(conv, &mut body_shape, &at, inside)?;
                                net.convolutions.push(Layer::normalized(conv, None));
                                body = Body::Conv;
                                continue;
                            }
                            (LayerSpec::BatchNorm2d(norm), Body::Conv) if norm.affine => {
                                body = Body::Norm;
                                continue;
                            }
                            (LayerSpec::Relu(_), Body::Norm) => Activation::Relu,
                            (LayerSpec::Gelu(_), Body::Norm) => Activation::Gelu,
                            (LayerSpec::Tanh(_), Body::Norm) => Activation::Tanh,
                            _ => {
                                return Err(LayerError::new(
                                    at,
                                    "headroom trains a residual block of convolutions without \
                                     bias, each with batch_norm2d after it and the activation \
                                     between them: conv2d, batch_norm2d, relu, conv2d, \
                                     batch_norm2d",
                                ))
                            }
                        };
                        same_activation(kind, &at)?;
                        body = Body::Open;
                    }
                    if body != Body::Norm {
                        return Err(LayerError::new(
                            inner,
                            "must end with a convolution's batch_norm2d: the block's sum is \
                             activated after it",
                        ));
                    }
                    let projection = projection(&shape, &body_shape)
                        .ok_or_else(|| unmatched(&at, &shape, &body_shape))?;
                    if let Some(last) = net.convolutions.last_mut() {
                        last.shortcut = Some(Shortcut { from, projection });
                    }
                    shape = body_shape;
                    after = After::Conv;
                    continue;
                }
                LayerSpec::Flatten(_) if in_features || after == After::Global => {
                    shape = vec![product(&shape, &at)?];
                    after = After::Flat;
                    continue;
                }
                LayerSpec::Linear(linear) if linear.bias => {
                    if after == After::Linear {
                        return Err(LayerError::new(at, "two linear layers in a row: headroom's MLP puts an activation between them"));
                    }
                    if after == After::Activation {
                        net.dropout.push(0.0);
                    }
                    widths.push(linear.out_features);
                    after = After::Linear;
                    continue;
                }
                LayerSpec::Linear(_) => {
                    return Err(LayerError::new(
                        format!("{at}.linear.bias"),
                        "a linear layer without bias is not trained by headroom yet",
                    ))
                }
                LayerSpec::Dropout(dropout) if after == After::Activation => {
                    net.dropout.push(dropout.p as f32);
                    after = After::Dropout;
                    continue;
                }
                LayerSpec::Dropout(_) => {
                    return Err(LayerError::new(
                        at,
                        "headroom's MLP trains dropout right after a hidden layer's activation, \
                         once: linear, activation, dropout, linear",
                    ))
                }
                LayerSpec::Residual(_) => {
                    return Err(LayerError::new(
                        at,
                        "headroom trains a residual block after a convolution's activation or \
                         pooling: a stem convolution first, as ResNet's",
                    ))
                }
                LayerSpec::Flatten(_) => {
                    return Err(LayerError::new(
                        at,
                        "headroom flattens an image once, after the convolutions' activation or \
                         pooling and before the first linear layer",
                    ))
                }
                LayerSpec::Relu(_) => Activation::Relu,
                LayerSpec::Gelu(_) => Activation::Gelu,
                LayerSpec::Tanh(_) => Activation::Tanh,
            };
            after =
                match after {
                    After::Linear => After::Activation,
                    After::Conv => After::ConvActivation,
                    _ => return Err(LayerError::new(
                        at,
                        "headroom applies an activation only after a linear or conv2d layer, once",
                    )),
                };
            same_activation(kind, &at)?;
        }
        if after != After::Linear {
            return Err(LayerError::new(
                format!("{path}[{}]", layers.len() - 1),
                "the list must end with the linear layer that writes the logits, not an activation, \
                 dropout, convolution or pooling",
            ));
        }
        widths
            .pop()
            .ok_or_else(|| LayerError::new(path, "needs a linear layer to write the logits"))?;
        net.hidden = widths;
        net.activation = activation.map_or(Activation::default(), |(a, _)| a);
        Ok(net)
    }
}

/// The network headroom trains: convolutions (each followed by the activation and maybe a
/// pooling), then an MLP over their flattened output: the widths of its hidden layers, the
/// activation after each, and the dropout after each activation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Network {
    /// The convolution layers, input side first, each with its batch norm and the pooling
    /// after its activation.
    pub convolutions: Vec<Layer>,
    /// Widths of the MLP's hidden layers.
    pub hidden: Vec<u64>,
    /// The activation after each convolution and hidden layer.
    pub activation: Activation,
    /// The probability of dropout after each hidden layer's activation (0: none), one per
    /// hidden layer.
    pub dropout: Vec<f32>,
}

/// Checks `layers` from a sample of `input` shape, layer by layer, and counts the parameters.
pub fn walk(layers: &[LayerSpec], input: &[u64], path: &str) -> Result<Walked, LayerError> {
    if layers.is_empty() {
        return Err(LayerError::new(path, "must hold at least one layer"));
    }
    let mut walked = Walked {
        output: input.to_vec(),
        parameters: 0,
        layers: 0,
    };
    walk_into(layers, path, 0, &mut walked)?;
    Ok(walked)
}

fn walk_into(
    layers: &[LayerSpec],
    path: &str,
    depth: usize,
    walked: &mut Walked,
) -> Result<(), LayerError> {
    for (i, layer) in layers.iter().enumerate() {
        let at = format!("{path}[{i}]");
        walked.layers += 1;
        if walked.layers > MAX_LAYERS {
            return Err(LayerError::new(
                at,
                format!(
                    "a model may hold at most {MAX_LAYERS} layers, residual blocks' own counted"
                ),
            ));
        }
        let field = |name: &str| format!("{at}.{}.{name}", layer.name());
        let shape = std::mem::take(&mut walked.output);
        let (output, parameters) = match layer {
            LayerSpec::Conv2d(conv) => {
                let [channels, height, width] = image(&shape, &at, layer)?;
                extent(&field("out_channels"), conv.out_channels, 1)?;
                extent(&field("kernel_size"), conv.kernel_size, 1)?;
                extent(&field("stride"), conv.stride, 1)?;
                extent(&field("padding"), conv.padding, 0)?;
                let side = |size: u64, name: &str| {
                    window_output(size, conv.kernel_size, conv.stride, conv.padding).ok_or_else(
                        || {
                            too_large(
                                &field("kernel_size"),
                                conv.kernel_size,
                                conv.padding,
                                &shape,
                                name,
                            )
                        },
                    )
                };
                let (h, w) = (side(height, "height")?, side(width, "width")?);
                let weights = product(
                    &[
                        conv.out_channels,
                        channels,
                        conv.kernel_size,
                        conv.kernel_size,
                    ],
                    &at,
                )?;
                let bias = if conv.bias { conv.out_channels } else { 0 };
                (
                    vec![conv.out_channels, h, w],
                    checked_add(weights, bias, &at)?,
                )
            }
            LayerSpec::MaxPool2d(pool) | LayerSpec::AvgPool2d(pool) => {
                let [channels, height, width] = image(&shape, &at, layer)?;
                extent(&field("kernel_size"), pool.kernel_size, 1)?;
                let stride = pool.stride.unwrap_or(pool.kernel_size);
                extent(&field("stride"), stride, 1)?;
                if pool.padding > pool.kernel_size / 2 {
                    return Err(LayerError::new(
                        field("padding"),
                        format!(
                            "must be at most half the kernel size ({}), as PyTorch requires, got {}",
                            pool.kernel_size / 2,
                            pool.padding
                        ),
                    ));
                }
                let side = |size: u64, name: &str| {
                    window_output(size, pool.kernel_size, stride, pool.padding).ok_or_else(|| {
                        too_large(
                            &field("kernel_size"),
                            pool.kernel_size,
                            pool.padding,
                            &shape,
                            name,
                        )
                    })
                };
                (
                    vec![channels, side(height, "height")?, side(width, "width")?],
                    0,
                )
            }
            LayerSpec::BatchNorm2d(norm) => {
                let [channels, _, _] = image(&shape, &at, layer)?;
                let parameters = if norm.affine { 2 * channels } else { 0 };
                (shape, parameters)
            }
            LayerSpec::Dropout(dropout) => {
                if !(0.0..1.0).contains(&dropout.p) {
                    return Err(LayerError::new(
                        field("p"),
                        format!("must be in [0, 1), got {}", dropout.p),
                    ));
                }
                (shape, 0)
            }
            LayerSpec::Flatten(_) => (vec![product(&shape, &at)?], 0),
            LayerSpec::Linear(linear) => {
                let [features] = shape[..] else {
                    return Err(LayerError::new(
                        at,
                        format!(
                            "linear needs a flat input, and {} reaches it; put {{\"flatten\": {{}}}} \
                             (or global_avg_pool2d) before it",
                            show(&shape)
                        ),
                    ));
                };
                extent(&field("out_features"), linear.out_features, 1)?;
                let weights = product(&[linear.out_features, features], &at)?;
                let bias = if linear.bias { linear.out_features } else { 0 };
                (vec![linear.out_features], checked_add(weights, bias, &at)?)
            }
            LayerSpec::Relu(_) | LayerSpec::Gelu(_) | LayerSpec::Tanh(_) => (shape, 0),
            LayerSpec::GlobalAvgPool2d(_) => {
                let [channels, _, _] = image(&shape, &at, layer)?;
                (vec![channels], 0)
            }
            LayerSpec::Residual(block) => {
                if depth + 1 > MAX_NESTING {
                    return Err(LayerError::new(
                        at,
                        format!("residual blocks nest at most {MAX_NESTING} deep"),
                    ));
                }
                let inner = format!("{at}.residual.layers");
                if block.layers.is_empty() {
                    return Err(LayerError::new(inner, "must hold at least one layer"));
                }
                let before = walked.parameters;
                walked.output = shape.clone();
                walk_into(&block.layers, &inner, depth + 1, walked)?;
                let body = walked.parameters - before;
                walked.parameters = before;
                let output = std::mem::take(&mut walked.output);
                let shortcut = shortcut(&shape, &output, &at)?;
                walked.layers += usize::from(shortcut > 0) * 2;
                (output, checked_add(body, shortcut, &at)?)
            }
        };
        walked.output = output;
        walked.parameters = checked_add(walked.parameters, parameters, &at)?;
    }
    Ok(())
}

/// The parameters of the shortcut that makes `input` addable to `output`: none when they agree;
/// a 1x1 convolution (no bias) and batch norm when only channels and a stride differ.
fn shortcut(input: &[u64], output: &[u64], at: &str) -> Result<u64, LayerError> {
    match projection(input, output).ok_or_else(|| unmatched(at, input, output))? {
        None => Ok(0),
        Some(conv) => checked_add(
            product(&[conv.in_channels, conv.out_channels], at)?,
            2 * conv.out_channels,
            at,
        ),
    }
}

/// The shortcut of a residual block that turns `input` into `output`: `Some(None)`, the
/// identity, when they agree; else the strided 1x1 convolution that matches them (ResNet's
/// downsampling shortcut, batch norm after it); `None` when none does.
fn projection(input: &[u64], output: &[u64]) -> Option<Option<Convolution>> {
    if input == output {
        return Some(None);
    }
    let (&[in_channels, height, width], &[out_channels, out_height, out_width]) = (input, output)
    else {
        return None;
    };
    (1..=height.max(width).max(1))
        .map(|stride| Convolution {
            in_channels,
            height,
            width,
            out_channels,
            kernel: 1,
            stride,
            padding: 0,
        })
        .find(|conv| {
            window_output(height, 1, conv.stride, 0) == Some(out_height)
                && window_output(width, 1, conv.stride, 0) == Some(out_width)
        })
        .map(Some)
}

/// A residual block whose shapes no shortcut matches.
fn unmatched(at: &str, input: &[u64], output: &[u64]) -> LayerError {
    LayerError::new(
        at,
        format!(
            "its layers turn {} into {}, which neither an identity nor a strided 1x1 \
             convolution shortcut can match",
            show(input),
            show(output)
        ),
    )
}

/// The convolution `conv` names over a sample of `shape`, which becomes its output's.
fn convolution(
    conv: &Conv2d,
    shape: &mut Shape,
    at: &str,
    layer: &LayerSpec,
) -> Result<Convolution, LayerError> {
    let [in_channels, height, width] = image(shape, at, layer)?;
    let conv = Convolution {
        in_channels,
        height,
        width,
        out_channels: conv.out_channels,
        kernel: conv.kernel_size,
        stride: conv.stride,
        padding: conv.padding,
    };
    *shape = vec![conv.out_channels, conv.out_height(), conv.out_width()];
    product(shape, at)?;
    Ok(conv)
}

/// An activation's name in a layer list.
fn activation_name(activation: Activation) -> &'static str {
    match activation {
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::Tanh => "tanh",
    }
}

fn image(shape: &[u64], at: &str, layer: &LayerSpec) -> Result<[u64; 3], LayerError> {
    match *shape {
        [c, h, w] => Ok([c, h, w]),
        _ => Err(LayerError::new(
            at,
            format!(
                "{} needs a [channels, height, width] input, and {} reaches it{}",
                layer.name(),
                show(shape),
                if shape.len() == 1 {
                    " (it comes after a flatten or linear layer)"
                } else {
                    ""
                }
            ),
        )),
    }
}

fn extent(field: &str, value: u64, least: u64) -> Result<(), LayerError> {
    if value < least || value > MAX_EXTENT {
        return Err(LayerError::new(
            field,
            format!("must be between {least} and {MAX_EXTENT}, got {value}"),
        ));
    }
    Ok(())
}

fn too_large(field: &str, kernel: u64, padding: u64, shape: &[u64], side: &str) -> LayerError {
    LayerError::new(
        field,
        format!(
            "{kernel} is larger than the input's {side} with padding {padding} ({} reaches the layer)",
            show(shape)
        ),
    )
}

fn product(values: &[u64], at: &str) -> Result<u64, LayerError> {
    values
        .iter()
        .try_fold(1u64, |acc, &v| acc.checked_mul(v))
        .filter(|&p| p <= 1 << 53)
        .ok_or_else(|| {
            LayerError::new(
                at,
                "its sizes multiply past 2^53: far larger than any device",
            )
        })
}

fn checked_add(a: u64, b: u64, at: &str) -> Result<u64, LayerError> {
    a.checked_add(b).filter(|&s| s <= 1 << 53).ok_or_else(|| {
        LayerError::new(
            at,
            "the model's parameters pass 2^53: far larger than any device",
        )
    })
}

fn show(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(json: &str) -> Vec<LayerSpec> {
        serde_json::from_str(json).unwrap()
    }

    fn lenet5() -> Vec<LayerSpec> {
        layers(
            r#"[{"conv2d": {"out_channels": 6, "kernel_size": 5, "padding": 2}}, {"relu": {}},
                {"avg_pool2d": {"kernel_size": 2}},
                {"conv2d": {"out_channels": 16, "kernel_size": 5}}, {"relu": {}},
                {"avg_pool2d": {"kernel_size": 2}}, {"flatten": {}},
                {"linear": {"out_features": 120}}, {"relu": {}},
                {"linear": {"out_features": 84}}, {"relu": {}},
                {"linear": {"out_features": 10}}]"#,
        )
    }

    /// The CIFAR ResNet-18: a 3x3 stem without max pool, four stages of two basic blocks.
    fn resnet18_cifar() -> serde_json::Value {
        let conv = |out: u64, stride: u64| serde_json::json!({"conv2d": {"out_channels": out, "kernel_size": 3, "stride": stride, "padding": 1, "bias": false}});
        let block = |out: u64, stride: u64| {
            serde_json::json!({"residual": {"layers": [
                conv(out, stride), {"batch_norm2d": {}}, {"relu": {}}, conv(out, 1), {"batch_norm2d": {}}
            ]}})
        };
        let mut list = vec![
            conv(64, 1),
            serde_json::json!({"batch_norm2d": {}}),
            serde_json::json!({"relu": {}}),
        ];
        for (out, stride) in [(64, 1), (128, 2), (256, 2), (512, 2)] {
            list.push(block(out, stride));
            list.push(serde_json::json!({"relu": {}}));
            list.push(block(out, 1));
            list.push(serde_json::json!({"relu": {}}));
        }
        list.push(serde_json::json!({"global_avg_pool2d": {}}));
        list.push(serde_json::json!({"linear": {"out_features": 10}}));
        serde_json::Value::Array(list)
    }

    #[test]
    fn lenet5_and_the_cifar_resnet18_count_pytorchs_parameters() {
        let lenet = walk(&lenet5(), &[1, 28, 28], "model.layers").unwrap();
        assert_eq!((lenet.output, lenet.parameters), (vec![10], 61_706));
        let resnet: Vec<LayerSpec> = serde_json::from_value(resnet18_cifar()).unwrap();
        let walked = walk(&resnet, &[3, 32, 32], "model.layers").unwrap();
        assert_eq!((walked.output, walked.parameters), (vec![10], 11_173_962));
    }

    /// The plan of `net` over `features` inputs to 10 classes.
    fn plan_of(net: &Network, features: u64) -> crate::plan::Plan {
        crate::plan::Plan::convolutional(
            &net.convolutions,
            features,
            &net.hidden,
            10,
            net.activation,
            crate::plan::Training {
                optimizer: crate::plan::OptimizerKind::Sgd,
                learning_rate: 0.1,
                precision: crate::plan::Precision::F32True,
                framework: crate::plan::Framework::Pytorch,
            },
        )
        .unwrap()
    }

    #[test]
    fn the_cifar_resnet18_lowers_to_residual_blocks_with_pytorchs_parameters() {
        let resnet: Vec<LayerSpec> = serde_json::from_value(resnet18_cifar()).unwrap();
        let net = LayerSpec::as_network(&resnet, &[3, 32, 32], "model.layers").unwrap();
        assert_eq!(net.convolutions.len(), 17);
        assert!(net.convolutions.iter().all(|layer| layer.norm));
        let shortcuts: Vec<_> = net
            .convolutions
            .iter()
            .enumerate()
            .filter_map(|(i, layer)| {
                let shortcut = layer.shortcut?;
                let projection = shortcut
                    .projection
                    .map(|c| (c.in_channels, c.out_channels, c.stride, c.height));
                Some((i, shortcut.from, projection))
            })
            .collect();
        assert_eq!(
            shortcuts,
            [
                (2, 1, None),
                (4, 3, None),
                (6, 5, Some((64, 128, 2, 32))),
                (8, 7, None),
                (10, 9, Some((128, 256, 2, 16))),
                (12, 11, None),
                (14, 13, Some((256, 512, 2, 8))),
                (16, 15, None),
            ]
        );
        assert_eq!(net.convolutions[16].pool.map(|p| p.kernel), Some(4));
        assert_eq!(plan_of(&net, 3 * 32 * 32).parameter_count(), 11_173_962);
    }

    #[test]
    fn bad_layers_name_their_index_and_field() {
        let error =
            |json: &str, input: &[u64]| walk(&layers(json), input, "model.layers").unwrap_err();
        let e = error(
            r#"[{"conv2d": {"out_channels": 6, "kernel_size": 9}}]"#,
            &[1, 4, 4],
        );
        assert_eq!(e.field, "model.layers[0].conv2d.kernel_size");
        assert!(e.reason.contains("larger than the input's height"), "{e:?}");
        let e = error(
            r#"[{"flatten": {}}, {"max_pool2d": {"kernel_size": 2, "stride": 0}}]"#,
            &[1, 4, 4],
        );
        assert_eq!(e.field, "model.layers[1]");
        assert!(
            e.reason.contains("needs a [channels, height, width] input"),
            "{e:?}"
        );
        let e = error(
            r#"[{"max_pool2d": {"kernel_size": 2, "stride": 0}}]"#,
            &[1, 4, 4],
        );
        assert_eq!(e.field, "model.layers[0].max_pool2d.stride");
        let e = error(
            r#"[{"conv2d": {"out_channels": 2, "kernel_size": 1}}, {"linear": {"out_features": 2}}]"#,
            &[1, 4, 4],
        );
        assert!(e.reason.contains("put {\"flatten\": {}}"), "{e:?}");
        let e = error(
            r#"[{"residual": {"layers": [{"flatten": {}}]}}]"#,
            &[1, 8, 8],
        );
        assert_eq!(e.field, "model.layers[0]");
        assert!(e.reason.contains("[1, 8, 8] into [64]"), "{e:?}");
        // A pooled body is matched by a strided 1x1 convolution: 1 weight and batch norm's 2.
        let pooled = walk(
            &layers(r#"[{"residual": {"layers": [{"max_pool2d": {"kernel_size": 3}}]}}]"#),
            &[1, 8, 8],
            "model.layers",
        )
        .unwrap();
        assert_eq!((pooled.output, pooled.parameters), (vec![1, 2, 2], 3));
        let e = error(r#"[{"residual": {"layers": []}}]"#, &[1, 8, 8]);
        assert_eq!(e.field, "model.layers[0].residual.layers");
        assert_eq!(error("[]", &[4]).field, "model.layers");
        let e = error(r#"[{"dropout": {"p": 1.0}}]"#, &[4]);
        assert_eq!(e.field, "model.layers[0].dropout.p");
        let e = error(
            r#"[{"conv2d": {"out_channels": 4294967296, "kernel_size": 1}}, {"conv2d": {"out_channels": 4294967296, "kernel_size": 1}}]"#,
            &[1, 1, 1],
        );
        assert!(e.reason.contains("past 2^53"), "{e:?}");
        let e = error(
            r#"[{"conv2d": {"out_channels": 4294967297, "kernel_size": 1}}]"#,
            &[1, 1, 1],
        );
        assert_eq!(e.field, "model.layers[0].conv2d.out_channels");
    }

    #[test]
    fn ten_thousand_layers_and_deep_nesting_are_refused_without_walking_them_all() {
        let many = vec![LayerSpec::Relu(NoArguments {}); 10_000];
        let e = walk(&many, &[4], "model.layers").unwrap_err();
        assert_eq!(e.field, format!("model.layers[{MAX_LAYERS}]"));
        let mut nested = LayerSpec::Relu(NoArguments {});
        for _ in 0..=MAX_NESTING {
            nested = LayerSpec::Residual(Residual {
                layers: vec![nested],
            });
        }
        let e = walk(&[nested], &[4], "model.layers").unwrap_err();
        assert!(e.reason.contains("nest at most"), "{e:?}");
    }

    #[test]
    fn an_mlp_written_as_layers_is_the_mlp_shorthand() {
        let mlp = layers(
            r#"[{"flatten": {}}, {"linear": {"out_features": 128}}, {"gelu": {}},
                {"linear": {"out_features": 64}}, {"gelu": {}}, {"linear": {"out_features": 10}}]"#,
        );
        assert_eq!(
            LayerSpec::as_network(&mlp, &[1, 28, 28], "model.layers").unwrap(),
            Network {
                convolutions: vec![],
                hidden: vec![128, 64],
                activation: Activation::Gelu,
                dropout: vec![0.0, 0.0],
            }
        );
        let mixed = layers(
            r#"[{"linear": {"out_features": 8}}, {"relu": {}}, {"linear": {"out_features": 8}}, {"tanh": {}}, {"linear": {"out_features": 2}}]"#,
        );
        let e = LayerSpec::as_network(&mixed, &[4], "model.layers").unwrap_err();
        assert_eq!(e.field, "model.layers[3]");
        let e = LayerSpec::as_network(
            &layers(r#"[{"linear": {"out_features": 8}}, {"relu": {}}]"#),
            &[4],
            "model.layers",
        )
        .unwrap_err();
        assert!(e.reason.contains("must end with the linear layer"), "{e:?}");
    }

    #[test]
    fn dropout_after_an_activation_is_the_mlp_s_and_nowhere_else() {
        let mlp = LayerSpec::as_network(
            &layers(
                r#"[{"flatten": {}}, {"linear": {"out_features": 512}}, {"relu": {}},
                    {"dropout": {"p": 0.2}}, {"linear": {"out_features": 256}}, {"relu": {}},
                    {"linear": {"out_features": 64}}, {"relu": {}}, {"dropout": {}},
                    {"linear": {"out_features": 10}}]"#,
            ),
            &[1, 28, 28],
            "model.layers",
        )
        .unwrap();
        assert_eq!(mlp.hidden, [512, 256, 64]);
        assert_eq!(mlp.dropout, [0.2, 0.0, 0.5]);
        for (list, at) in [
            (
                r#"[{"dropout": {}}, {"linear": {"out_features": 8}}, {"relu": {}}, {"linear": {"out_features": 2}}]"#,
                "model.layers[0]",
            ),
            (
                r#"[{"linear": {"out_features": 8}}, {"dropout": {}}, {"relu": {}}, {"linear": {"out_features": 2}}]"#,
                "model.layers[1]",
            ),
            (
                r#"[{"linear": {"out_features": 8}}, {"relu": {}}, {"dropout": {}}, {"dropout": {}}, {"linear": {"out_features": 2}}]"#,
                "model.layers[3]",
            ),
            (
                r#"[{"linear": {"out_features": 8}}, {"relu": {}}, {"linear": {"out_features": 2}}, {"dropout": {}}]"#,
                "model.layers[3]",
            ),
        ] {
            let e = LayerSpec::as_network(&layers(list), &[4], "model.layers").unwrap_err();
            assert_eq!(e.field, at, "{list}: {e:?}");
        }
    }

    #[test]
    fn batch_norm_and_global_pooling_lower_to_normalized_convolutions() {
        let list = layers(
            r#"[{"conv2d": {"out_channels": 4, "kernel_size": 3, "padding": 1, "bias": false}},
                {"batch_norm2d": {}}, {"relu": {}}, {"max_pool2d": {"kernel_size": 2}},
                {"conv2d": {"out_channels": 8, "kernel_size": 3, "padding": 1, "bias": false}},
                {"batch_norm2d": {}}, {"relu": {}}, {"global_avg_pool2d": {}}, {"flatten": {}},
                {"linear": {"out_features": 10}}]"#,
        );
        let walked = walk(&list, &[3, 8, 8], "model.layers").unwrap();
        assert_eq!(walked.parameters, 108 + 8 + 288 + 16 + 90);
        let net = LayerSpec::as_network(&list, &[3, 8, 8], "model.layers").unwrap();
        assert!(net.convolutions.iter().all(|layer| layer.norm));
        assert_eq!(
            net.convolutions[1].pool,
            Some(Pooling {
                kind: PoolKind::Average,
                channels: 8,
                height: 4,
                width: 4,
                kernel: 4,
                stride: 4,
                padding: 0,
            })
        );
        assert!(net.hidden.is_empty());
        assert_eq!(
            plan_of(&net, 3 * 8 * 8).parameter_count(),
            walked.parameters
        );
    }

    #[test]
    fn lenet5_lowers_to_two_pooled_convolutions_and_an_mlp() {
        let net = LayerSpec::as_network(&lenet5(), &[1, 28, 28], "model.layers").unwrap();
        let conv = |in_channels, height, out_channels, padding| Convolution {
            in_channels,
            height,
            width: height,
            out_channels,
            kernel: 5,
            stride: 1,
            padding,
        };
        let pool = |channels, height| Pooling {
            kind: PoolKind::Average,
            channels,
            height,
            width: height,
            kernel: 2,
            stride: 2,
            padding: 0,
        };
        assert_eq!(
            net.convolutions,
            [
                Layer::convolution(conv(1, 28, 6, 2), Some(pool(6, 28))),
                Layer::convolution(conv(6, 14, 16, 0), Some(pool(16, 10)))
            ]
        );
        assert_eq!(
            (net.hidden, net.activation),
            (vec![120, 84], Activation::Relu)
        );
        // What a convolutional list may not do yet, or ever, each named by its index.
        for (list, at, says) in [
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"conv2d": {"out_channels": 2, "kernel_size": 3}}]"#,
                "model.layers[1]",
                "after the activation",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"max_pool2d": {"kernel_size": 2}}]"#,
                "model.layers[1]",
                "right after a convolution's activation",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3, "bias": false}}]"#,
                "model.layers[0].conv2d.bias",
                "without bias",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"relu": {}}, {"dropout": {}}]"#,
                "model.layers[2]",
                "dropout",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"tanh": {}}, {"flatten": {}}, {"linear": {"out_features": 4}}, {"relu": {}}, {"linear": {"out_features": 2}}]"#,
                "model.layers[4]",
                "one activation throughout",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"batch_norm2d": {}}]"#,
                "model.layers[0].conv2d.bias",
                "takes \"bias\": false",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"relu": {}}, {"batch_norm2d": {}}]"#,
                "model.layers[2]",
                "right after a convolution without bias",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3, "bias": false}}, {"batch_norm2d": {"affine": false}}]"#,
                "model.layers[1].batch_norm2d.affine",
                "scale and shift",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"global_avg_pool2d": {}}]"#,
                "model.layers[1]",
                "right after a convolution's activation",
            ),
            (
                r#"[{"residual": {"layers": [{"conv2d": {"out_channels": 1, "kernel_size": 3, "padding": 1, "bias": false}}, {"batch_norm2d": {}}]}}]"#,
                "model.layers[0]",
                "a stem convolution first",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"relu": {}}, {"residual": {"layers": [{"conv2d": {"out_channels": 1, "kernel_size": 3, "padding": 1}}]}}]"#,
                "model.layers[2].residual.layers[0]",
                "residual block of convolutions without bias",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"relu": {}}, {"residual": {"layers": [{"conv2d": {"out_channels": 1, "kernel_size": 3, "padding": 1, "bias": false}}, {"batch_norm2d": {}}, {"relu": {}}]}}]"#,
                "model.layers[2].residual.layers",
                "must end with a convolution's batch_norm2d",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"relu": {}}, {"flatten": {}}, {"residual": {"layers": []}}]"#,
                "model.layers[3]",
                "residual block after a convolution",
            ),
            (
                r#"[{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"relu": {}}]"#,
                "model.layers[1]",
                "must end with the linear layer",
            ),
        ] {
            let e = LayerSpec::as_network(&layers(list), &[1, 8, 8], "model.layers").unwrap_err();
            assert_eq!(e.field, at, "{list}: {e:?}");
            assert!(e.reason.contains(says), "{list}: {e:?}");
        }
    }
}
