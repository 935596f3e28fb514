//! `nn.Flatten`: every dimension of a sample into one. A view of its input (no copy, no
//! allocation), whose gradient is its input's.

use super::check::product;
use super::{LayerError, Module, Parameters, Path, Token, Values};
use crate::program::graph::{Graph, Tensor};

/// A flatten layer.
#[derive(Debug, Clone)]
pub struct Flatten {
    shape: Vec<u64>,
    /// Whether the input has more than one dimension (else flatten returns it itself).
    of_many_dimensions: bool,
}

impl Flatten {
    /// Flattens a sample of `input` shape.
    pub fn new(input: &[u64], at: &Path) -> Result<Flatten, LayerError> {
        Ok(Flatten {
            shape: vec![product(input, at)?],
            of_many_dimensions: input.len() > 1,
        })
    }
}

impl Module for Flatten {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        graph.alias(x)
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
        self.of_many_dimensions || input_is_view
    }
}
