//! `nn.MaxPool2d`: each window's largest value and, as PyTorch's `max_pool2d_with_indices` keeps
//! them, the int64 places of the maxima (pool.cu). It saves its input and those places for
//! backward, which routes each gradient to its maximum's place.

use serde::{Deserialize, Serialize};

use super::pooling::{pool_samples, PoolBackward, PoolKind, Pooling, Windows};
use super::{LayerError, Module, Parameters, Path, Token, Values};
use crate::memory::{Element, Part};
use crate::program::graph::{Graph, Tensor};
use crate::program::Instr;

/// `nn.MaxPool2d`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxPool2dSpec {
    /// Side of the square window.
    pub kernel_size: u64,
    /// Step between windows (the kernel size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u64>,
    /// Padding on every side (0), at most half the window.
    #[serde(default)]
    pub padding: u64,
    /// Spacing between a window's taps (1).
    #[serde(default = "one")]
    pub dilation: u64,
    /// Round the output's sides up (false).
    #[serde(default)]
    pub ceil_mode: bool,
}

fn one() -> u64 {
    1
}

impl MaxPool2dSpec {
    /// The pooling of a sample of `input` shape.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<MaxPool2d, LayerError> {
        let windows = Windows {
            kernel: self.kernel_size,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            ceil_mode: self.ceil_mode,
        };
        let pool = windows.pooling(PoolKind::Max, true, input, at, "max_pool2d")?;
        Ok(MaxPool2d {
            output: vec![pool.channels, pool.out_height, pool.out_width],
            pool,
        })
    }
}

/// A max pooling layer.
#[derive(Debug, Clone)]
pub struct MaxPool2d {
    pool: Pooling,
    output: Vec<u64>,
}

impl Module for MaxPool2d {
    fn output_shape(&self) -> &[u64] {
        &self.output
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        let elements = graph.times_rows(self.pool.outputs());
        let y = graph.output(elements, graph.storage(x));
        let indices = graph.allocate(Part::Activations, elements, Element::Index);
        graph.emit(Instr::PoolForward {
            x: graph.slot(x),
            y: graph.slot(y),
            indices: Some(graph.slot(indices)),
            rows: graph.rows(),
            pool: self.pool,
        });
        let backward = PoolBackward {
            x,
            indices: Some(indices),
            pool: self.pool,
        };
        graph.record(backward, &[x], &[x, indices], &[y]);
        graph.release(indices);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, _: &mut Values<'_>, _: u64) -> Vec<f64> {
        pool_samples(x, rows, &self.pool)
    }

    fn token(&self) -> Token {
        Token::Layer(super::avg_pool2d::pool_word("max", &self.pool))
    }
}
