//! `nn.Identity`: returns its input.

use super::{Module, Parameters, Token, Values};
use crate::program::graph::{Graph, Tensor};

/// An identity layer.
#[derive(Debug, Clone)]
pub struct Identity {
    shape: Vec<u64>,
}

impl Identity {
    /// The identity of a sample of `input` shape.
    pub fn new(input: &[u64]) -> Identity {
        Identity {
            shape: input.to_vec(),
        }
    }
}

impl Module for Identity {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        graph.retain(x);
        x
    }

    fn reference(&self, x: &[f64], _: usize, _: &mut Values<'_>, _: u64) -> Vec<f64> {
        x.to_vec()
    }

    fn token(&self) -> Token {
        Token::Hidden
    }

    fn keeps_output(&self, input_kept: bool) -> bool {
        input_kept
    }

    fn is_view(&self) -> bool {
        true
    }

    fn returns_view(&self, input_is_view: bool) -> bool {
        input_is_view
    }
}
