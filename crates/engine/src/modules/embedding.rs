//! `nn.Embedding`: each token id of a sequence looked up in a learnt table of `vocab x
//! embedding_dim` values (embedding.cu's `embedding_forward`), the model's first layer over
//! `model.tokens`. PyTorch's `embedding` writes the rows in the table's dtype (autocast casts
//! nothing: f32 under the mixed precisions) and saves the ids; its backward
//! (`embedding_dense_backward`) makes the table's gradient whole, zeros where no token
//! looked, and none into the row of `padding_idx`.

use serde::{Deserialize, Serialize};

use super::check::{extent, product};
use super::{Context, LayerError, Module, Parameter, Parameters, Path, Token, Values};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// `nn.Embedding`'s arguments; `num_embeddings` is `model.tokens.vocab_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// Values a token is looked up as.
    pub embedding_dim: u64,
    /// The id whose row gets no gradient (none); negative counts from the vocabulary's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_idx: Option<i64>,
}

impl EmbeddingSpec {
    /// The table over a sample of `input` shape, `[sequence_length]` token ids below the
    /// vocabulary `cx.tokens` holds (which this layer consumes: it writes values).
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<Embedding, LayerError> {
        let Some(vocab) = cx.tokens.take() else {
            return Err(at.error(
                "an embedding reads token ids: give model.tokens (sequence_length, vocab_size) \
                 instead of model.input_shape, and start the list with it",
            ));
        };
        let dim = extent(at, "embedding_dim", self.embedding_dim, 1)?;
        let padding = match self.padding_idx {
            None => None,
            Some(i) if (0..vocab as i128).contains(&i128::from(i)) => Some(i as u64),
            Some(i) if i < 0 && i128::from(i) >= -(vocab as i128) => Some(vocab - i.unsigned_abs()),
            Some(i) => {
                return Err(at.error_at(
                    "padding_idx",
                    format!(
                        "must be within the vocabulary (-{vocab} to {}), got {i}",
                        vocab - 1
                    ),
                ))
            }
        };
        cx.embedding.get_or_insert((cx.parameters, vocab, dim));
        let mut output = input.to_vec();
        output.push(dim);
        product(&output, at)?;
        product(&[vocab, dim], at)?;
        Ok(Embedding {
            vocab,
            dim,
            positions: product(input, at)?,
            padding,
            output,
        })
    }
}

/// An embedding table.
#[derive(Debug, Clone)]
pub struct Embedding {
    vocab: u64,
    dim: u64,
    /// Tokens per sample.
    positions: u64,
    padding: Option<u64>,
    output: Vec<u64>,
}

impl Module for Embedding {
    fn output_shape(&self) -> &[u64] {
        &self.output
    }

    fn parameters(&self) -> Vec<Parameter> {
        // PyTorch draws the table from N(0, 1); the synthetic stream spans [-1, 1).
        vec![Parameter::trained(self.vocab * self.dim, 1.0).of_rows(self.vocab)]
    }

    fn forward(&self, graph: &mut Graph, ids: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let weight = parameters.take();
        let tokens = graph.times_rows(self.positions);
        let y = graph.output(tokens.saturating_mul(self.dim), graph.storage(weight));
        graph.emit(Instr::EmbeddingForward {
            ids: graph.slot(ids),
            weight: graph.slot(weight),
            y: graph.slot(y),
            tokens,
            dim: self.dim,
        });
        let backward = EmbeddingBackward {
            ids,
            tokens,
            dim: self.dim,
            vocab: self.vocab,
            padding: self.padding,
        };
        graph.record(backward, &[ids, weight], &[ids], &[y]);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, _: u64) -> Vec<f64> {
        let table = values.take();
        let dim = self.dim as usize;
        x[..rows * self.positions as usize]
            .iter()
            .flat_map(|&id| &table[id as usize * dim..(id as usize + 1) * dim])
            .copied()
            .collect()
    }

    fn token(&self) -> Token {
        Token::Layer(format!("embed{}", self.dim))
    }
}

/// An embedding's backward: the table's gradient.
#[derive(Debug)]
struct EmbeddingBackward {
    ids: Tensor,
    tokens: u64,
    dim: u64,
    vocab: u64,
    padding: Option<u64>,
}

impl Backward for EmbeddingBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0].filter(|_| pass.needs(1)) else {
            return vec![None, None];
        };
        let dw = pass.gradient(1, self.vocab * self.dim, pass.storage(dy));
        pass.emit(Instr::EmbeddingBackward {
            dy: pass.slot(dy),
            ids: pass.slot(self.ids),
            dw: pass.slot(dw),
            tokens: self.tokens,
            dim: self.dim,
            vocab: self.vocab,
            padding: self.padding,
        });
        vec![None, Some(dw)]
    }
}
