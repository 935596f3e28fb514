//! `nn.Conv2d` over NCHW batches, with groups (depthwise: as many as the channels) and
//! dilation: conv.cu's direct kernels, the bias added by elementwise.cu's `bias_add`. PyTorch's
//! `convolution` saves its input and its weights for backward whatever needs a gradient, and
//! its backward makes the input's gradient (when needed), then the filters', then the bias's.
//! Under autocast its bias, then its weights, then an input stored otherwise are cast to half
//! first.

use serde::{Deserialize, Serialize};

use super::check::{extent, image, product, show, sum};
use super::{LayerError, Module, Parameter, Parameters, Path, Token, Values};
pub use crate::program::geometry::{window_count, Convolution};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// `nn.Conv2d`'s arguments (square kernels, the same stride, padding and dilation on both
/// sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conv2dSpec {
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
    /// Spacing between the kernel's taps (1).
    #[serde(default = "one")]
    pub dilation: u64,
    /// Groups of channels convolved apart (1; the input's channels for a depthwise
    /// convolution); both channel counts must divide by it.
    #[serde(default = "one")]
    pub groups: u64,
    /// Whether a bias is learnt (true).
    #[serde(default = "yes")]
    pub bias: bool,
}

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

impl Conv2dSpec {
    /// The convolution of a sample of `input` shape.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<Conv2d, LayerError> {
        let [in_channels, height, width] = image(input, at, "conv2d")?;
        let out_channels = extent(at, "out_channels", self.out_channels, 1)?;
        let kernel = extent(at, "kernel_size", self.kernel_size, 1)?;
        let stride = extent(at, "stride", self.stride, 1)?;
        let padding = extent(at, "padding", self.padding, 0)?;
        let dilation = extent(at, "dilation", self.dilation, 1)?;
        let groups = extent(at, "groups", self.groups, 1)?;
        if in_channels % groups != 0 || out_channels % groups != 0 {
            return Err(at.error_at(
                "groups",
                format!(
                    "must divide both the input's {in_channels} channels and the \
                     {out_channels} output channels, as PyTorch requires, got {groups}"
                ),
            ));
        }
        let conv = Convolution {
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
        for (side, name) in [(height, "height"), (width, "width")] {
            if window_count(side, kernel, stride, padding, dilation).is_none() {
                return Err(at.error_at(
                    "kernel_size",
                    format!(
                        "{kernel} (dilation {dilation}) is wider than the input's {name} with \
                         padding {padding} ({} reaches the layer)",
                        show(input)
                    ),
                ));
            }
        }
        let weights = product(&[out_channels, in_channels / groups, kernel, kernel], at)?;
        sum(weights, out_channels, at)?;
        let output = vec![out_channels, conv.out_height(), conv.out_width()];
        product(&output, at)?;
        Ok(Conv2d {
            conv,
            bias: self.bias,
            output,
        })
    }
}

/// A convolution layer.
#[derive(Debug, Clone)]
pub struct Conv2d {
    conv: Convolution,
    bias: bool,
    output: Vec<u64>,
}

impl Module for Conv2d {
    fn output_shape(&self) -> &[u64] {
        &self.output
    }

    fn parameters(&self) -> Vec<Parameter> {
        let biases = self.bias.then_some(self.conv.out_channels);
        Parameter::weight_and_bias(self.conv.weights(), biases, self.conv.fan_in())
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let weight = parameters.take();
        let bias = self.bias.then(|| parameters.take());
        let bias = bias.map(|b| graph.operand_parameter(b));
        let w = graph.operand_parameter(weight);
        let x = graph.operand(x);
        let rows = graph.rows();
        let len = graph.times_rows(self.conv.outputs());
        let y = graph.output(len, graph.compute());
        graph.emit(Instr::ConvForward {
            x: graph.slot(x),
            w: graph.slot(w),
            y: graph.slot(y),
            rows,
            conv: self.conv,
        });
        if let Some(b) = bias {
            graph.emit(Instr::BiasAdd {
                y: graph.slot(y),
                bias: graph.slot(b),
                rows,
                cols: self.conv.out_channels,
                spatial: self.conv.spatial(),
            });
        }
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        let backward = Conv2dBackward {
            x,
            w,
            bias: self.bias,
            conv: self.conv,
        };
        graph.record(backward, &inputs, &[x, w], &[y]);
        for tensor in inputs {
            graph.release(tensor);
        }
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, _: u64) -> Vec<f64> {
        let w = values.take();
        let b = self.bias.then(|| values.take());
        let c = self.conv;
        x.chunks_exact(c.inputs() as usize)
            .take(rows)
            .flat_map(|sample| convolve(sample, w, b, &c))
            .collect()
    }

    fn multiply_adds(&self) -> u64 {
        self.conv.outputs() * self.conv.fan_in()
    }

    fn token(&self) -> Token {
        let c = self.conv;
        let mut word = format!("conv{}k{}", c.out_channels, c.kernel);
        for (letter, value, usual) in [
            ('s', c.stride, 1),
            ('p', c.padding, 0),
            ('d', c.dilation, 1),
            ('g', c.groups, 1),
        ] {
            if value != usual {
                word.push_str(&format!("{letter}{value}"));
            }
        }
        if !self.bias {
            word.push_str("nobias");
        }
        Token::Layer(word)
    }
}

/// One sample's convolution in f64, from the definition.
fn convolve(x: &[f64], w: &[f64], b: Option<&[f64]>, c: &Convolution) -> Vec<f64> {
    let (oh, ow) = (c.out_height() as i64, c.out_width() as i64);
    let (h, wd, k) = (c.height as i64, c.width as i64, c.kernel as i64);
    let (stride, pad, dil) = (c.stride as i64, c.padding as i64, c.dilation as i64);
    let per_group_in = (c.in_channels / c.groups) as i64;
    let per_group_out = (c.out_channels / c.groups) as i64;
    let mut y = Vec::with_capacity((c.out_channels as i64 * oh * ow) as usize);
    for o in 0..c.out_channels as i64 {
        let group = o / per_group_out;
        for i in 0..oh {
            for j in 0..ow {
                let mut total = b.map_or(0.0, |b| b[o as usize]);
                for g in 0..per_group_in {
                    let channel = group * per_group_in + g;
                    for a in 0..k {
                        for bb in 0..k {
                            let r = i * stride - pad + a * dil;
                            let q = j * stride - pad + bb * dil;
                            if (0..h).contains(&r) && (0..wd).contains(&q) {
                                total += x[((channel * h + r) * wd + q) as usize]
                                    * w[(((o * per_group_in + g) * k + a) * k + bb) as usize];
                            }
                        }
                    }
                }
                y.push(total);
            }
        }
    }
    y
}

/// A convolution's backward.
#[derive(Debug)]
struct Conv2dBackward {
    x: Tensor,
    w: Tensor,
    bias: bool,
    conv: Convolution,
}

impl Backward for Conv2dBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let inputs = 2 + usize::from(self.bias);
        let Some(dy) = grads[0] else {
            return vec![None; inputs];
        };
        let rows = pass.rows();
        let storage = pass.storage(dy);
        let dx = pass.needs(0).then(|| {
            let dx = pass.gradient(0, pass.elements(self.x), storage);
            pass.emit(Instr::ConvInputGradient {
                dy: pass.slot(dy),
                w: pass.slot(self.w),
                dx: pass.slot(dx),
                rows,
                conv: self.conv,
            });
            dx
        });
        let dw = pass.needs(1).then(|| {
            let dw = pass.gradient(1, self.conv.weights(), storage);
            pass.emit(Instr::ConvWeightGradient {
                dy: pass.slot(dy),
                x: pass.slot(self.x),
                dw: pass.slot(dw),
                rows,
                conv: self.conv,
            });
            dw
        });
        let db = (self.bias && pass.needs(2)).then(|| {
            let db = pass.gradient(2, self.conv.out_channels, storage);
            pass.emit(Instr::BiasGradient {
                dy: pass.slot(dy),
                db: pass.slot(db),
                rows,
                cols: self.conv.out_channels,
                spatial: self.conv.spatial(),
            });
            db
        });
        let mut gradients = vec![dx, dw, db];
        gradients.truncate(inputs);
        gradients
    }
}
