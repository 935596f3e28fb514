//! A residual block: its layers' output added to its shortcut's, `body(x) + shortcut(x)`, the
//! shortcut the identity unless given (ResNet's downsampling blocks give a strided 1x1
//! convolution and batch norm). The body runs first, then the shortcut, then the sum: out of
//! place (`body(x) + shortcut(x)`, a new tensor), or in place into the body's output with
//! `inplace` (torchvision's `out += identity`). The sum saves nothing; its backward hands its
//! gradient to both branches unchanged, and autograd runs the shortcut's branch (made last)
//! first, the gradient of the block's input from it waiting for the body's. No activation is
//! implied after the block: write it as the next layer.

use serde::{Deserialize, Serialize};

use super::check::{product, show};
use super::{Context, LayerError, LayerSpec, Module, Parameter, Parameters, Path, Sequential};
use super::{Token, Values};
use crate::memory::Storage;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// A residual block's layers and shortcut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidualSpec {
    /// The body: the layers whose output is added to the shortcut's.
    pub layers: Vec<LayerSpec>,
    /// The shortcut's layers; none (the default) is the identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shortcut: Vec<LayerSpec>,
    /// Add the shortcut into the body's output in place (`out += shortcut(x)`, false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inplace: bool,
}

impl ResidualSpec {
    /// The block over a sample of `input` shape.
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<Residual, LayerError> {
        cx.depth += 1;
        // The block's input is read again by the shortcut (and maybe saved by the body's first
        // layer): neither branch may change it in place.
        cx.input_kept = true;
        let body = Sequential::build(&self.layers, input, &at.list("layers"), cx)?;
        let body_kept = cx.input_kept;
        cx.input_kept = true;
        let shortcut = match self.shortcut.is_empty() {
            true => None,
            false => Some(Sequential::build(
                &self.shortcut,
                input,
                &at.list("shortcut"),
                cx,
            )?),
        };
        cx.depth -= 1;
        cx.input_kept = false;
        cx.input_is_view = false;
        let carried = shortcut.as_ref().map_or(input, |s| s.output_shape());
        if body.output_shape() != carried {
            let what = match &shortcut {
                None => "the identity shortcut carries".to_string(),
                Some(_) => "its shortcut makes".to_string(),
            };
            return Err(at.error(format!(
                "its layers turn {} into {}, and {what} {}: give it a \"shortcut\" of layers that \
                 makes {} (ResNet's: a 1x1 conv2d with the body's stride and no bias, then \
                 batch_norm2d)",
                show(input),
                show(body.output_shape()),
                show(carried),
                show(body.output_shape()),
            )));
        }
        if self.inplace && (body_kept || body.is_view()) {
            return Err(at.error_at(
                "inplace",
                "the body's output is saved for backward (its last layer saves its output, as \
                 relu does) or is the block's input itself: adding into it in place stops \
                 PyTorch's backward; set \"inplace\": false",
            ));
        }
        Ok(Residual {
            elements: product(body.output_shape(), at)?,
            body,
            shortcut,
            inplace: self.inplace,
        })
    }
}

/// A residual block.
#[derive(Debug, Clone)]
pub struct Residual {
    body: Sequential,
    shortcut: Option<Sequential>,
    inplace: bool,
    elements: u64,
}

impl Module for Residual {
    fn output_shape(&self) -> &[u64] {
        self.body.output_shape()
    }

    fn parameters(&self) -> Vec<Parameter> {
        let mut declared = self.body.parameters();
        declared.extend(self.shortcut.iter().flat_map(|s| s.parameters()));
        declared
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let body = self.body.forward(graph, x, parameters);
        let carried = match &self.shortcut {
            Some(shortcut) => shortcut.forward(graph, x, parameters),
            None => {
                graph.retain(x);
                x
            }
        };
        let sum = match self.inplace {
            true => {
                let len = graph.times_rows(self.elements);
                graph.emit(Instr::Accumulate {
                    from: graph.slot(carried),
                    into: graph.slot(body),
                    len,
                });
                let sum = graph.alias(body);
                let addends = [graph.storage(body), graph.storage(carried)];
                graph.record(AddBackward { addends }, &[body, carried], &[], &[sum]);
                sum
            }
            false => add(graph, body, carried),
        };
        graph.release(body);
        graph.release(carried);
        sum
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, seed: u64) -> Vec<f64> {
        let body = self.body.reference(x, rows, values, seed);
        let carried = match &self.shortcut {
            Some(shortcut) => shortcut.reference(x, rows, values, seed),
            None => x.to_vec(),
        };
        body.iter().zip(&carried).map(|(a, b)| a + b).collect()
    }

    fn multiply_adds(&self) -> u64 {
        self.body.multiply_adds() + self.shortcut.as_ref().map_or(0, |s| s.multiply_adds())
    }

    fn token(&self) -> Token {
        let word = |s: &Sequential| match s.token() {
            Token::Layer(word) => word,
            _ => String::new(),
        };
        Token::Layer(match &self.shortcut {
            Some(shortcut) => format!("res({}|{})", word(&self.body), word(shortcut)),
            None => format!("res({})", word(&self.body)),
        })
    }
}

/// `a + b` out of place, as PyTorch adds two tensors of one shape: a new activation in the
/// promoted storage, recorded (backward hands the gradient to both, converted where an addend is
/// stored otherwise). A reference the caller owns.
pub(super) fn add(graph: &mut Graph, a: Tensor, b: Tensor) -> Tensor {
    let len = graph.elements(a);
    let addends = [graph.storage(a), graph.storage(b)];
    let sum = graph.output(len, promoted(addends[0], addends[1]));
    graph.emit(Instr::Add {
        a: graph.slot(a),
        b: graph.slot(b),
        out: graph.slot(sum),
        len,
    });
    graph.record(AddBackward { addends }, &[a, b], &[], &[sum]);
    sum
}

/// The storage of a sum of `a` and `b`, as PyTorch promotes types: 16-bit only when both are
/// the same 16-bit type (under autocast a block's 16-bit body and its f32 input sum to f32).
pub(super) fn promoted(a: Storage, b: Storage) -> Storage {
    match a == b {
        true => a,
        false => Storage::F32,
    }
}

/// A sum's backward: its gradient to each addend, unchanged, or converted to the addend's
/// storage where it differs (autograd's cast of a gradient to its input's type).
#[derive(Debug)]
struct AddBackward {
    /// How each addend is stored.
    addends: [Storage; 2],
}

impl Backward for AddBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None, None];
        };
        (0..2)
            .map(|k| {
                pass.needs(k)
                    .then(|| pass.gradient_as(k, dy, self.addends[k]))
            })
            .collect()
    }
}
