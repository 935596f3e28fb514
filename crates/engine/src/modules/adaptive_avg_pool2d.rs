//! `nn.AdaptiveAvgPool2d`: each channel averaged over `output_size` windows that tile it
//! (window `i` of `n` over a side of `s` spans `floor(i s / n)` to `ceil((i + 1) s / n)`),
//! pool.cu's adaptive kernels. PyTorch saves the input for backward, except for a 1x1 output,
//! which it computes as a mean over the plane and which saves nothing; either way backward
//! spreads each gradient over its window into a gradient the input's size.
//! `global_avg_pool2d` is `AdaptiveAvgPool2d(1)` then `flatten`.

use serde::{Deserialize, Serialize};

use super::check::{extent, image, product};
use super::{LayerError, Module, Parameters, Path, Token, Values};
pub use crate::program::geometry::{window, AdaptivePooling};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// `nn.AdaptiveAvgPool2d`'s argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveAvgPool2dSpec {
    /// The output's side, or `[height, width]`.
    pub output_size: OutputSize,
}

/// A side, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutputSize {
    /// A square output.
    Side(u64),
    /// `[height, width]`.
    Sides([u64; 2]),
}

impl AdaptiveAvgPool2dSpec {
    /// The pooling of a sample of `input` shape.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<AdaptiveAvgPool2d, LayerError> {
        let [h, w] = match self.output_size {
            OutputSize::Side(side) => [side, side],
            OutputSize::Sides(sides) => sides,
        };
        let out_height = extent(at, "output_size", h, 1)?;
        let out_width = extent(at, "output_size", w, 1)?;
        AdaptiveAvgPool2d::new(input, at, (out_height, out_width), false)
    }
}

/// `global_avg_pool2d`: `AdaptiveAvgPool2d(1)` then `flatten`, over a sample of `input` shape.
pub fn global(input: &[u64], at: &Path) -> Result<AdaptiveAvgPool2d, LayerError> {
    AdaptiveAvgPool2d::new(input, at, (1, 1), true)
}

/// An adaptive average pooling layer (flattening its output when it is `global_avg_pool2d`).
#[derive(Debug, Clone)]
pub struct AdaptiveAvgPool2d {
    pool: AdaptivePooling,
    output: Vec<u64>,
}

impl AdaptiveAvgPool2d {
    fn new(
        input: &[u64],
        at: &Path,
        (out_height, out_width): (u64, u64),
        flatten: bool,
    ) -> Result<AdaptiveAvgPool2d, LayerError> {
        let kind = if flatten {
            "global_avg_pool2d"
        } else {
            "adaptive_avg_pool2d"
        };
        let [channels, height, width] = image(input, at, kind)?;
        let pool = AdaptivePooling {
            channels,
            height,
            width,
            out_height,
            out_width,
        };
        product(&[channels, out_height, out_width], at)?;
        let output = match flatten {
            true => vec![channels],
            false => vec![channels, out_height, out_width],
        };
        Ok(AdaptiveAvgPool2d { pool, output })
    }

    /// PyTorch computes a 1x1 output as a mean, which saves nothing for backward.
    fn is_mean(&self) -> bool {
        (self.pool.out_height, self.pool.out_width) == (1, 1)
    }
}

impl Module for AdaptiveAvgPool2d {
    fn output_shape(&self) -> &[u64] {
        &self.output
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        let len = graph.times_rows(self.pool.outputs());
        let y = graph.output(len, graph.storage(x));
        graph.emit(Instr::AdaptivePoolForward {
            x: graph.slot(x),
            y: graph.slot(y),
            rows: graph.rows(),
            pool: self.pool,
        });
        let saved: &[Tensor] = if self.is_mean() { &[] } else { &[x] };
        let backward = AdaptivePoolBackward {
            input: graph.elements(x),
            pool: self.pool,
        };
        graph.record(backward, &[x], saved, &[y]);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, _: &mut Values<'_>, _: u64) -> Vec<f64> {
        let p = self.pool;
        let mut y = Vec::with_capacity(rows * p.outputs() as usize);
        for sample in x.chunks_exact(p.inputs() as usize).take(rows) {
            for c in 0..p.channels {
                for i in 0..p.out_height {
                    for j in 0..p.out_width {
                        let (rows_of, cols_of) = (
                            window(i, p.out_height, p.height),
                            window(j, p.out_width, p.width),
                        );
                        let count = (rows_of.end - rows_of.start) * (cols_of.end - cols_of.start);
                        let total: f64 = rows_of
                            .flat_map(|r| cols_of.clone().map(move |s| (r, s)))
                            .map(|(r, s)| sample[((c * p.height + r) * p.width + s) as usize])
                            .sum();
                        y.push(total / count as f64);
                    }
                }
            }
        }
        y
    }

    fn token(&self) -> Token {
        match self.output.len() {
            1 => Token::Layer("gap".into()),
            _ => Token::Layer(format!(
                "adaptive{}x{}",
                self.pool.out_height, self.pool.out_width
            )),
        }
    }
}

/// Adaptive average pooling's backward.
#[derive(Debug)]
struct AdaptivePoolBackward {
    input: u64,
    pool: AdaptivePooling,
}

impl Backward for AdaptivePoolBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (Some(dy), true) = (grads[0], pass.needs(0)) else {
            return vec![None];
        };
        let dx = pass.gradient(0, self.input, pass.storage(dy));
        pass.emit(Instr::AdaptivePoolBackward {
            dy: pass.slot(dy),
            dx: pass.slot(dx),
            rows: pass.rows(),
            pool: self.pool,
        });
        vec![Some(dx)]
    }
}
