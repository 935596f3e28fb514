//! The first position of a `[positions, features]` sample, `x[:, 0]`: a ViT's class token,
//! pooled for its head. PyTorch's `select` is a view, so the whole input lives as long as the
//! selected token does (the head's linear layer saves it); headroom copies the token
//! (embedding.cu's `first_token_forward`: `features` values a sample more than PyTorch) and keeps
//! the input alive with it. Backward writes the gradient into a zeroed input-sized buffer, as
//! `select_backward` does.

use super::check::show;
use super::{LayerError, Module, Parameters, Path, Token, Values};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// Builds the pooling over a sample of `input` shape.
pub fn build(input: &[u64], at: &Path) -> Result<FirstToken, LayerError> {
    let [positions, features] = *input else {
        return Err(at.error(format!(
            "first_token needs a [positions, features] sample, and {} reaches it",
            show(input)
        )));
    };
    Ok(FirstToken {
        positions,
        shape: vec![features],
    })
}

/// The first-token pooling.
#[derive(Debug, Clone)]
pub struct FirstToken {
    positions: u64,
    shape: Vec<u64>,
}

impl Module for FirstToken {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        let dim = self.shape[0];
        let len = graph.times_rows(dim);
        let y = graph.output(len, graph.storage(x));
        graph.emit(Instr::FirstTokenForward {
            x: graph.slot(x),
            y: graph.slot(y),
            rows: graph.rows(),
            positions: self.positions,
            dim,
        });
        graph.keep_alive_with(y, x);
        let backward = FirstTokenBackward {
            positions: self.positions,
            dim,
            elements: graph.elements(x),
        };
        graph.record(backward, &[x], &[], &[y]);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, _: &mut Values<'_>, _: u64) -> Vec<f64> {
        let (p, d) = (self.positions as usize, self.shape[0] as usize);
        (0..rows)
            .flat_map(|n| x[n * p * d..n * p * d + d].to_vec())
            .collect()
    }

    fn token(&self) -> Token {
        Token::Layer("first".into())
    }
}

/// `select_backward`: the gradient at the first position, zeros elsewhere.
#[derive(Debug)]
struct FirstTokenBackward {
    positions: u64,
    dim: u64,
    /// Elements of the input.
    elements: u64,
}

impl Backward for FirstTokenBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0].filter(|_| pass.needs(0)) else {
            return vec![None];
        };
        let dx = pass.gradient(0, self.elements, pass.storage(dy));
        pass.emit(Instr::FirstTokenBackward {
            dy: pass.slot(dy),
            dx: pass.slot(dx),
            rows: pass.rows(),
            positions: self.positions,
            dim: self.dim,
        });
        vec![Some(dx)]
    }
}
