//! The mean over the positions of a `[positions, features]` sample, `x.mean(dim=1)`: a sentence
//! embedding's or a ViT's mean pooling (`global_pool="avg"`). PyTorch's `mean` writes a new
//! `[features]` tensor and saves nothing but sizes, so the input goes as soon as nothing else
//! holds it; its backward (`mean_backward`: the gradient expanded and divided) writes a whole
//! input-sized gradient. CUDA's autocast leaves `mean` in its input's type (its lists name
//! `sum`, not `mean`). embedding.cu's `mean_tokens_forward` sums in f32 in position order.

use super::check::show;
use super::{LayerError, Module, Parameters, Path, Token, Values};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// Builds the pooling over a sample of `input` shape.
pub fn build(input: &[u64], at: &Path) -> Result<MeanPool, LayerError> {
    let [positions, features] = *input else {
        return Err(at.error(format!(
            "mean_pool needs a [positions, features] sample, and {} reaches it",
            show(input)
        )));
    };
    Ok(MeanPool {
        positions,
        shape: vec![features],
    })
}

/// The mean pooling.
#[derive(Debug, Clone)]
pub struct MeanPool {
    positions: u64,
    shape: Vec<u64>,
}

impl Module for MeanPool {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, _: &mut Parameters<'_>) -> Tensor {
        let dim = self.shape[0];
        let len = graph.times_rows(dim);
        let y = graph.output(len, graph.storage(x));
        graph.emit(Instr::MeanTokensForward {
            x: graph.slot(x),
            y: graph.slot(y),
            rows: graph.rows(),
            positions: self.positions,
            dim,
        });
        let backward = MeanPoolBackward {
            positions: self.positions,
            dim,
            elements: graph.elements(x),
        };
        graph.record(backward, &[x], &[], &[y]);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, _: &mut Values<'_>, _: u64) -> Vec<f64> {
        let (p, d) = (self.positions as usize, self.shape[0] as usize);
        (0..rows * d)
            .map(|k| {
                let first = (k / d) * p * d + k % d;
                (0..p).map(|t| x[first + t * d]).sum::<f64>() / p as f64
            })
            .collect()
    }

    fn token(&self) -> Token {
        Token::Layer("meanpool".into())
    }
}

/// `mean_backward`: the gradient shared out over every position.
#[derive(Debug)]
struct MeanPoolBackward {
    positions: u64,
    dim: u64,
    /// Elements of the input.
    elements: u64,
}

impl Backward for MeanPoolBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0].filter(|_| pass.needs(0)) else {
            return vec![None];
        };
        let dx = pass.gradient(0, self.elements, pass.storage(dy));
        pass.emit(Instr::MeanTokensBackward {
            dy: pass.slot(dy),
            dx: pass.slot(dx),
            rows: pass.rows(),
            positions: self.positions,
            dim: self.dim,
        });
        vec![Some(dx)]
    }
}
