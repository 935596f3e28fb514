//! `nn.AvgPool2d`: each window's mean, its divisor as PyTorch counts it (`count_include_pad`,
//! `ceil_mode`), pool.cu. It saves its input for backward, which spreads each gradient over its
//! window.

use serde::{Deserialize, Serialize};

use super::pooling::{pool_samples, PoolBackward, PoolKind, Pooling, Windows};
use super::{LayerError, Module, Parameters, Path, Token, Values};
use crate::program::graph::{Graph, Tensor};
use crate::program::Instr;

/// `nn.AvgPool2d`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvgPool2dSpec {
    /// Side of the square window.
    pub kernel_size: u64,
    /// Step between windows (the kernel size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u64>,
    /// Padding on every side (0), at most half the window.
    #[serde(default)]
    pub padding: u64,
    /// Round the output's sides up (false).
    #[serde(default)]
    pub ceil_mode: bool,
    /// Count the padding in each window's divisor (true).
    #[serde(default = "yes")]
    pub count_include_pad: bool,
}

fn yes() -> bool {
    true
}

impl AvgPool2dSpec {
    /// The pooling of a sample of `input` shape.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<AvgPool2d, LayerError> {
        let windows = Windows {
            kernel: self.kernel_size,
            stride: self.stride,
            padding: self.padding,
            dilation: 1,
            ceil_mode: self.ceil_mode,
        };
        let pool = windows.pooling(
            PoolKind::Average,
            self.count_include_pad,
            input,
            at,
            "avg_pool2d",
        )?;
        Ok(AvgPool2d {
            output: vec![pool.channels, pool.out_height, pool.out_width],
            pool,
        })
    }
}

/// An average pooling layer.
#[derive(Debug, Clone)]
pub struct AvgPool2d {
    pool: Pooling,
    output: Vec<u64>,
}

/// A pooling's word in a job's summary: `max2`, `avg3s2p1`.
pub fn pool_word(kind: &str, pool: &Pooling) -> String {
    let mut word = format!("{kind}{}", pool.kernel);
    for (letter, value, usual) in [
        ('s', pool.stride, pool.kernel),
        ('p', pool.padding, 0),
        ('d', pool.dilation, 1),
    ] {
        if value != usual {
            word.push_str(&format!("{letter}{value}"));
        }
    }
    word
}

impl Module for AvgPool2d {
    fn output_shape(&self) -> &[u64] {
        &self.output
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        let len = graph.times_rows(self.pool.outputs());
        let y = graph.output(len, graph.storage(x));
        graph.emit(Instr::PoolForward {
            x: graph.slot(x),
            y: graph.slot(y),
            indices: None,
            rows: graph.rows(),
            pool: self.pool,
        });
        let backward = PoolBackward {
            x,
            indices: None,
            pool: self.pool,
        };
        graph.record(backward, &[x], &[x], &[y]);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, _: &mut Values<'_>, _: u64) -> Vec<f64> {
        pool_samples(x, rows, &self.pool)
    }

    fn token(&self) -> Token {
        Token::Layer(pool_word("avg", &self.pool))
    }
}
