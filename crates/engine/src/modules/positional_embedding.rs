//! A learned positional embedding, as GPT-2 adds its `wpe`: `x + table[0..positions]` over a
//! `[positions, features]` sample, the table `max_positions x features`. PyTorch's step, as
//! Hugging Face writes it: `position_ids = arange(positions)` (int64, saved by the lookup),
//! `wpe(position_ids)` (the table's first rows, a new tensor), then the sum with the batch
//! broadcast over it (a new tensor, f32 when the two differ). Backward hands the sum's gradient
//! to `x` unchanged, sums it over the batch for the positions' rows (`sum_to_size`), and makes
//! the table's whole gradient, zero past the positions (`embedding_dense_backward`).

use serde::{Deserialize, Serialize};

use super::check::{extent, product};
use super::residual::promoted;
use super::{LayerError, Module, Parameter, Parameters, Path, Token, Values};
use crate::memory::{Element, Part, Storage};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Instr, Scale};

/// A positional embedding's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PositionalEmbeddingSpec {
    /// Rows of the table (GPT-2's `n_positions`; the sample's positions when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_positions: Option<u64>,
}

impl PositionalEmbeddingSpec {
    /// The table over a sample of `input` shape, `[positions, features]`.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<PositionalEmbedding, LayerError> {
        let &[positions, features] = input else {
            return Err(at.error(format!(
                "positional_embedding needs a [positions, features] input (an embedding's \
                 output), and {} reaches it",
                super::check::show(input)
            )));
        };
        let rows = extent(
            at,
            "max_positions",
            self.max_positions.unwrap_or(positions),
            1,
        )?;
        if rows < positions {
            return Err(at.error_at(
                "max_positions",
                format!("the table's {rows} rows cannot place {positions} positions"),
            ));
        }
        product(&[rows, features], at)?;
        Ok(PositionalEmbedding {
            rows,
            positions,
            features,
            shape: input.to_vec(),
        })
    }
}

/// A positional embedding.
#[derive(Debug, Clone)]
pub struct PositionalEmbedding {
    rows: u64,
    positions: u64,
    features: u64,
    shape: Vec<u64>,
}

impl Module for PositionalEmbedding {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn parameters(&self) -> Vec<Parameter> {
        vec![Parameter::trained(self.rows * self.features, 1.0).of_rows(self.rows)]
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let table = parameters.take();
        let sample = self.positions * self.features;
        let ids = graph.pytorch_only(Part::Activations, self.positions, Element::Index);
        let looked_up = graph.output(sample, graph.storage(table));
        graph.emit(Instr::Convert {
            from: graph.slot(table),
            to: graph.slot(looked_up),
            len: sample,
            scale: Scale::One,
        });
        let saved: Vec<Tensor> = ids.into_iter().collect();
        graph.record(
            LookupBackward {
                table: self.rows * self.features,
                sample,
            },
            &[table],
            &saved,
            &[looked_up],
        );
        graph.release_optional(ids);
        let y = broadcast_add(graph, x, looked_up);
        graph.release(looked_up);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, _: u64) -> Vec<f64> {
        let table = values.take();
        let sample = (self.positions * self.features) as usize;
        x[..rows * sample]
            .iter()
            .enumerate()
            .map(|(i, v)| v + table[i % sample])
            .collect()
    }

    fn token(&self) -> Token {
        Token::Layer(format!("pos{}", self.rows))
    }
}

/// `x + rows`, `rows` one sample's values added to every sample (PyTorch's broadcast `add`),
/// recorded with its backward; a reference the caller owns. The sum is f32 where the two differ
/// (a 16-bit input under autocast), which is then the rows' storage too.
pub(super) fn broadcast_add(graph: &mut Graph, x: Tensor, rows: Tensor) -> Tensor {
    let x_storage = graph.storage(x);
    let storage = promoted(x_storage, graph.storage(rows));
    let (len, sample) = (graph.elements(x), graph.elements(rows));
    let y = graph.output(len, storage);
    graph.emit(Instr::Convert {
        from: graph.slot(x),
        to: graph.slot(y),
        len,
        scale: Scale::One,
    });
    graph.emit(Instr::BiasAdd {
        y: graph.slot(y),
        bias: graph.slot(rows),
        rows: graph.rows(),
        cols: sample,
        spatial: 1,
    });
    graph.record(
        BroadcastAddBackward { x_storage, sample },
        &[x, rows],
        &[],
        &[y],
    );
    y
}

/// The lookup's backward: the table's whole gradient, the positions' rows from theirs.
#[derive(Debug)]
struct LookupBackward {
    /// Elements of the table.
    table: u64,
    /// Elements of the positions' rows.
    sample: u64,
}

impl Backward for LookupBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0].filter(|_| pass.needs(0)) else {
            return vec![None];
        };
        // Allocated zeroed: the rows past the positions stay 0.
        let dw = pass.gradient(0, self.table, pass.storage(dy));
        pass.emit(Instr::Convert {
            from: pass.slot(dy),
            to: pass.slot(dw),
            len: self.sample,
            scale: Scale::One,
        });
        vec![Some(dw)]
    }
}

/// The broadcast sum's backward: the gradient to `x` as it is (converted where `x` is stored
/// otherwise), and summed over the batch for the looked-up rows.
#[derive(Debug)]
struct BroadcastAddBackward {
    x_storage: Storage,
    sample: u64,
}

impl Backward for BroadcastAddBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None, None];
        };
        let dx = pass
            .needs(0)
            .then(|| pass.gradient_as(0, dy, self.x_storage));
        let dpositions = pass.needs(1).then(|| {
            let summed = pass.gradient(1, self.sample, pass.storage(dy));
            pass.emit(Instr::BiasGradient {
                dy: pass.slot(dy),
                db: pass.slot(summed),
                rows: pass.rows(),
                cols: self.sample,
                spatial: 1,
            });
            summed
        });
        vec![dx, dpositions]
    }
}
