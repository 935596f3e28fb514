//! `nn.Dropout` as PyTorch runs it on a GPU, through the fused `native_dropout`: each step
//! draws a new mask from headroom's counter-based stream (dropout.cu, the same bits on every
//! device), keeps a value with probability `1 - p` and scales it by `1 / (1 - p)`. It writes
//! its output, then a one-byte mask, and saves only the mask; backward writes a new gradient
//! through it. `Dropout(0)` returns its input, as PyTorch does.

use serde::{Deserialize, Serialize};

use super::check::product;
use super::{Context, LayerError, Module, Parameters, Path, Token, Values};
use crate::memory::{Element, Part};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;
use crate::synthetic;

/// `nn.Dropout`'s argument.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropoutSpec {
    /// Probability of zeroing each value (0.5), in [0, 1).
    #[serde(default = "half")]
    pub p: f64,
}

fn half() -> f64 {
    0.5
}

impl DropoutSpec {
    /// Dropout over a sample of `input` shape, its masks from the stream of the `cx.dropouts`-th
    /// dropout layer.
    pub fn build(&self, input: &[u64], at: &Path, cx: &mut Context) -> Result<Dropout, LayerError> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(at.error_at("p", format!("must be in [0, 1), got {}", self.p)));
        }
        let stream = cx.dropouts;
        cx.dropouts += 1;
        Ok(Dropout {
            p: self.p as f32,
            stream,
            elements: product(input, at)?,
            shape: input.to_vec(),
        })
    }
}

/// A dropout layer.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f32,
    /// Which dropout layer of the model it is: its masks' stream.
    stream: usize,
    elements: u64,
    shape: Vec<u64>,
}

impl Dropout {
    /// The key of the masks of `seed`'s steps; step `s` draws the sub-stream
    /// `stream_key(key, s)`.
    fn key(&self, seed: u64) -> u64 {
        synthetic::stream_key(seed, synthetic::dropout_stream(self.stream))
    }
}

impl Module for Dropout {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        if self.p == 0.0 {
            graph.retain(x);
            return x;
        }
        let len = graph.times_rows(self.elements);
        let key = self.key(graph.seed());
        drop(graph, x, len, self.p, key)
    }

    fn reference(&self, x: &[f64], rows: usize, _: &mut Values<'_>, seed: u64) -> Vec<f64> {
        if self.p == 0.0 {
            return x.to_vec();
        }
        let key = synthetic::stream_key(self.key(seed), 0);
        let scale = f64::from(synthetic::dropout_scale(self.p));
        x.iter()
            .take(rows * self.elements as usize)
            .enumerate()
            .map(|(i, &v)| match synthetic::keeps(key, i as u64, self.p) {
                true => v * scale,
                false => 0.0,
            })
            .collect()
    }

    fn token(&self) -> Token {
        Token::Dropout(self.p)
    }

    fn keeps_output(&self, input_kept: bool) -> bool {
        self.p == 0.0 && input_kept
    }

    fn is_view(&self) -> bool {
        self.p == 0.0
    }

    fn returns_view(&self, input_is_view: bool) -> bool {
        self.p == 0.0 && input_is_view
    }
}

/// `native_dropout` of the `len` values of `x` with probability `p`, its masks drawn from
/// the stream `key` (step `s` from `stream_key(key, s)`): the output, with a one-byte mask saved
/// for backward. A reference the caller owns.
pub fn drop(graph: &mut Graph, x: Tensor, len: u64, p: f32, key: u64) -> Tensor {
    let y = graph.output(len, graph.storage(x));
    let mask = graph.allocate(Part::Activations, len, Element::Mask);
    graph.emit(Instr::DropoutForward {
        x: graph.slot(x),
        mask: graph.slot(mask),
        y: graph.slot(y),
        len,
        p,
        key,
    });
    graph.record(DropoutBackward { mask, p }, &[x], &[mask], &[y]);
    graph.release(mask);
    y
}

/// Dropout's backward.
#[derive(Debug)]
struct DropoutBackward {
    mask: Tensor,
    p: f32,
}

impl Backward for DropoutBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (Some(dy), true) = (grads[0], pass.needs(0)) else {
            return vec![None];
        };
        let len = pass.elements(dy);
        let dx = pass.gradient(0, len, pass.storage(dy));
        pass.emit(Instr::DropoutBackward {
            dy: pass.slot(dy),
            mask: pass.slot(self.mask),
            dx: pass.slot(dx),
            len,
            p: self.p,
        });
        vec![Some(dx)]
    }
}
