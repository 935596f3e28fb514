//! Element-wise activations: `nn.ReLU`, `nn.ReLU6`, `nn.LeakyReLU`, `nn.GELU`, `nn.Tanh`,
//! `nn.Sigmoid`, `nn.SiLU`. Each runs elementwise.cu's `activation_forward` (in place for
//! `inplace: true`) and saves for backward what PyTorch's autograd saves of it: relu, tanh and
//! sigmoid their output, the others their input (in place, leaky relu its output, which is all
//! there is, and relu6 a copy of its input autograd makes first); backward is
//! `activation_gradient` from that saved tensor.

use serde::{Deserialize, Serialize};

use super::{Context, LayerError, Module, Parameters, Path, Token, Values};
pub use crate::program::geometry::Nonlinearity;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Framework, Instr, SavedAs, Scale};

/// `nn.ReLU`'s and `nn.ReLU6`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InPlaceSpec {
    /// Write the result over the input (false).
    #[serde(default)]
    pub inplace: bool,
}

/// `nn.LeakyReLU`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeakyReluSpec {
    /// The slope below zero (0.01).
    #[serde(default = "default_slope")]
    pub negative_slope: f64,
    /// Write the result over the input (false).
    #[serde(default)]
    pub inplace: bool,
}

fn default_slope() -> f64 {
    0.01
}

impl LeakyReluSpec {
    /// The activation over `input`.
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<Activation, LayerError> {
        if !self.negative_slope.is_finite() || self.negative_slope < 0.0 {
            return Err(at.error_at(
                "negative_slope",
                format!(
                    "must be a finite number of at least 0 (its in-place form saves its output, \
                     which a negative slope would not invert), got {}",
                    self.negative_slope
                ),
            ));
        }
        let slope = self.negative_slope as f32;
        Activation::new(
            Nonlinearity::LeakyRelu { slope },
            self.inplace,
            input,
            at,
            cx,
        )
    }
}

/// `nn.GELU`'s argument, and how PyTorch computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeluSpec {
    /// `"none"` (exact, the default) or `"tanh"`.
    #[serde(default)]
    pub approximate: Approximation,
    /// `"fused"` (`nn.GELU`, the default) or `"composite"` (Hugging Face's
    /// `NewGELUActivation`, GPT-2's `gelu_new`: the tanh approximation written out).
    #[serde(default)]
    pub implementation: GeluImplementation,
}

/// How a GELU is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeluImplementation {
    /// `F.gelu`, one kernel.
    #[default]
    Fused,
    /// `NewGELUActivation`'s pow, tanh, sums and products ([`super::composite_gelu`]).
    Composite,
}

/// How GELU is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approximation {
    /// Exactly, through the error function.
    #[default]
    None,
    /// By `tanh`.
    Tanh,
}

impl GeluSpec {
    /// The activation over `input`.
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<Activation, LayerError> {
        let kind =
            match (self.approximate, self.implementation) {
                (Approximation::None, GeluImplementation::Fused) => Nonlinearity::GeluErf,
                (Approximation::Tanh, _) => Nonlinearity::GeluTanh,
                (Approximation::None, GeluImplementation::Composite) => return Err(at.error_at(
                    "implementation",
                    "\"composite\" is Hugging Face's NewGELUActivation, the tanh approximation \
                     written out: give \"approximate\": \"tanh\" with it",
                )),
            };
        let activation = Activation::new(kind, false, input, at, cx)?;
        Ok(Activation {
            composite: self.implementation == GeluImplementation::Composite,
            ..activation
        })
    }
}

/// An activation layer.
#[derive(Debug, Clone)]
pub struct Activation {
    nonlinearity: Nonlinearity,
    /// Computed as PyTorch runs Hugging Face's `NewGELUActivation` (the PyTorch profile).
    composite: bool,
    inplace: bool,
    /// In place on a view of another tensor ([`Context::input_is_view`]).
    on_view: bool,
    shape: Vec<u64>,
    elements: u64,
}

impl Activation {
    /// `nonlinearity` over a sample of `input` shape, in place when `inplace` (which PyTorch
    /// allows only on a tensor nothing saved for backward).
    pub fn new(
        nonlinearity: Nonlinearity,
        inplace: bool,
        input: &[u64],
        at: &Path,
        cx: &Context,
    ) -> Result<Activation, LayerError> {
        if inplace && cx.input_kept {
            return Err(at.error_at(
                "inplace",
                "the tensor reaching this layer is saved for backward (the layer before it saves \
                 its output, as relu does, or a residual block's shortcut reads it again): \
                 changing it in place stops PyTorch's backward (\"one of the variables needed \
                 for gradient computation has been modified by an inplace operation\"); set \
                 \"inplace\": false",
            ));
        }
        Ok(Activation {
            nonlinearity,
            composite: false,
            inplace,
            on_view: inplace && cx.input_is_view,
            shape: input.to_vec(),
            elements: super::check::product(input, at)?,
        })
    }
}

impl Module for Activation {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        let len = graph.times_rows(self.elements);
        if self.composite && graph.framework() == Framework::Pytorch {
            return super::composite_gelu::forward(graph, x, len);
        }
        // The input autograd keeps: a copy where it clones before the in-place op (only when
        // it records one: when the input needs a gradient).
        let clones = self.inplace && self.nonlinearity.clones_input_in_place();
        let input = match clones && graph.requires_grad(x) {
            true => {
                let copy = graph.output(len, graph.storage(x));
                graph.emit(Instr::Convert {
                    from: graph.slot(x),
                    to: graph.slot(copy),
                    len,
                    scale: Scale::One,
                });
                copy
            }
            false => x,
        };
        let y = match self.inplace {
            true => graph.alias(x),
            false => graph.output(len, graph.storage(x)),
        };
        graph.emit(Instr::Activation {
            x: graph.slot(x),
            y: graph.slot(y),
            len,
            nonlinearity: self.nonlinearity,
        });
        let saved_as = self.nonlinearity.saves(self.inplace);
        let saved = match saved_as {
            SavedAs::Input => input,
            SavedAs::Output => y,
        };
        let backward = ActivationBackward {
            nonlinearity: self.nonlinearity,
            saved,
            saved_as,
            on_view: self.on_view,
        };
        graph.record(backward, &[x], &[saved], &[y]);
        if input != x {
            graph.release(input);
        }
        if !self.on_view {
            return y;
        }
        // The view changed in place is made anew from its base, its gradient through
        // `AsStridedBackward`.
        let view = graph.alias(y);
        graph.record(ViewBackward, &[y], &[], &[view]);
        graph.release(y);
        view
    }

    fn reference(&self, x: &[f64], _: usize, _: &mut Values<'_>, _: u64) -> Vec<f64> {
        x.iter().map(|&v| self.nonlinearity.apply(v)).collect()
    }

    fn token(&self) -> Token {
        match self.composite {
            true => Token::Activation("gelu_new"),
            false => Token::Activation(self.nonlinearity.name()),
        }
    }

    fn keeps_output(&self, _: bool) -> bool {
        self.nonlinearity.saves(self.inplace) == SavedAs::Output
    }
}

/// An activation's backward: the input's gradient from the one saved tensor. In place on a
/// view, PyTorch runs it inside `CopySlices`: the base's gradient copied into a new tensor, the
/// view's part of it cloned, the activation's gradient of that clone written back.
#[derive(Debug)]
struct ActivationBackward {
    nonlinearity: Nonlinearity,
    saved: Tensor,
    saved_as: SavedAs,
    on_view: bool,
}

impl Backward for ActivationBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (Some(dy), true) = (grads[0], pass.needs(0)) else {
            return vec![None];
        };
        let (len, storage) = (pass.elements(self.saved), pass.storage(self.saved));
        let dx = pass.gradient(0, len, storage);
        let gradient = |pass: &mut Pass<'_>, grad: Tensor, out: Tensor| {
            pass.emit(Instr::ActivationGradient {
                grad: pass.slot(grad),
                saved: pass.slot(self.saved),
                out: pass.slot(out),
                len,
                nonlinearity: self.nonlinearity,
                saved_as: self.saved_as,
            });
        };
        let copy = |pass: &mut Pass<'_>, from: Tensor, to: Tensor| {
            let (from, to) = (pass.slot(from), pass.slot(to));
            pass.emit(Instr::Convert {
                from,
                to,
                len,
                scale: Scale::One,
            });
        };
        let through_copy_slices = match self.on_view {
            true => pass
                .pytorch_only(len, storage)
                .zip(pass.pytorch_only(len, storage)),
            false => None,
        };
        match through_copy_slices {
            Some((clone, result)) => {
                copy(pass, dy, dx);
                copy(pass, dx, clone);
                gradient(pass, clone, result);
                copy(pass, result, dx);
                pass.release(clone);
                pass.release(result);
            }
            None => gradient(pass, dy, dx),
        }
        vec![Some(dx)]
    }
}

/// The backward of a view made anew after an in-place change (`AsStridedBackward`): the
/// gradient copied into a new tensor of the base's size (here the view's).
#[derive(Debug)]
struct ViewBackward;

impl Backward for ViewBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (Some(dy), true) = (grads[0], pass.needs(0)) else {
            return vec![None];
        };
        let (len, storage) = (pass.elements(dy), pass.storage(dy));
        let Some(copy) = pass.pytorch_only(len, storage) else {
            return vec![Some(pass.pass_through(dy))];
        };
        pass.emit(Instr::Convert {
            from: pass.slot(dy),
            to: pass.slot(copy),
            len,
            scale: Scale::One,
        });
        vec![Some(copy)]
    }
}
