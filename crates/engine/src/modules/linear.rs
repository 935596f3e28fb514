//! `nn.Linear`: `y = x w^T + b` over the last dimension of a sample (gemm.cu's `linear_forward`,
//! elementwise.cu's `bias_add`). PyTorch runs it as `addmm` (`mm` without bias) over the sample's
//! leading positions flattened, which saves the input for the weights' gradient and the weights
//! for the input's, each only when that gradient is needed; backward makes the input's gradient,
//! then the weights', then the bias's (the sum autograd reduces the broadcast bias's gradient
//! with). Under autocast its bias, then its weights, then an input stored otherwise are cast to
//! half first. A `tied` layer (a language model's head with `tie_word_embeddings`) reads the
//! model's embedding table as its weights: one parameter, whose two gradients autograd sums.

use serde::{Deserialize, Serialize};

use super::check::{extent, product, sum};
use super::{Context, LayerError, Module, Parameter, Parameters, Path, Token, Values};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// `nn.Linear`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearSpec {
    /// Output features.
    pub out_features: u64,
    /// Whether a bias is learnt (true).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Whether its weights are the model's embedding table (false): `out_features` is then
    /// the vocabulary and its input the embedding's width.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tied: bool,
}

fn yes() -> bool {
    true
}

impl LinearSpec {
    /// The layer over a sample of `input` shape: its last dimension is the features.
    pub fn build(&self, input: &[u64], at: &Path, cx: &Context) -> Result<Linear, LayerError> {
        let Some((&inputs, leading)) = input.split_last() else {
            return Err(at.error("linear needs an input with at least one dimension"));
        };
        let outputs = extent(at, "out_features", self.out_features, 1)?;
        let tied = match (self.tied, cx.embedding) {
            (false, _) => None,
            (true, None) => {
                return Err(at.error_at(
                    "tied",
                    "a tied linear layer reads the embedding table, and the model has no \
                     embedding before it",
                ))
            }
            (true, Some((index, vocab, dim))) if (outputs, inputs) == (vocab, dim) => Some(index),
            (true, Some((_, vocab, dim))) => {
                return Err(at.error_at(
                    "tied",
                    format!(
                        "the embedding table is {vocab} x {dim}, and this layer's weights would \
                         be {outputs} x {inputs}: a tied head writes the vocabulary \
                         (out_features {vocab}) from the embedding's width ({dim})"
                    ),
                ))
            }
        };
        let positions = product(leading, at)?;
        let weights = product(&[outputs, inputs], at)?;
        sum(weights, if self.bias { outputs } else { 0 }, at)?;
        let mut output = leading.to_vec();
        output.push(outputs);
        product(&output, at)?;
        Ok(Linear {
            inputs,
            outputs,
            positions,
            bias: self.bias,
            tied,
            output,
        })
    }
}

/// A linear layer.
#[derive(Debug, Clone)]
pub struct Linear {
    inputs: u64,
    outputs: u64,
    /// Positions per sample it is applied at: the product of the leading dimensions.
    positions: u64,
    bias: bool,
    /// The index of the embedding table it reads as its weights, when tied.
    tied: Option<usize>,
    output: Vec<u64>,
}

impl Module for Linear {
    fn output_shape(&self) -> &[u64] {
        &self.output
    }

    fn parameters(&self) -> Vec<Parameter> {
        let biases = self.bias.then_some(self.outputs);
        let mut declared =
            Parameter::weight_and_bias(self.inputs * self.outputs, biases, self.inputs);
        if self.tied.is_some() {
            declared.remove(0);
        }
        declared
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let weight = match self.tied {
            Some(index) => parameters.shared(index),
            None => parameters.take(),
        };
        let bias = self.bias.then(|| parameters.take());
        let bias = bias.map(|b| graph.operand_parameter(b));
        let w = graph.operand_parameter(weight);
        let x = graph.operand(x);
        let rows = graph.times_rows(self.positions);
        let y = graph.output(rows.saturating_mul(self.outputs), graph.compute());
        graph.emit(Instr::LinearForward {
            x: graph.slot(x),
            w: graph.slot(w),
            y: graph.slot(y),
            rows,
            inputs: self.inputs,
            outputs: self.outputs,
        });
        if let Some(b) = bias {
            graph.emit(Instr::BiasAdd {
                y: graph.slot(y),
                bias: graph.slot(b),
                rows,
                cols: self.outputs,
                spatial: 1,
            });
        }
        // The product saves each operand for the other's gradient, when that one is needed.
        let saved_x = graph.requires_grad(w).then_some(x);
        let saved_w = graph.requires_grad(x).then_some(w);
        let saved: Vec<Tensor> = saved_x.into_iter().chain(saved_w).collect();
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        let backward = LinearBackward {
            x: saved_x,
            w: saved_w,
            x_elements: graph.elements(x),
            bias: self.bias,
            rows,
            inputs: self.inputs,
            outputs: self.outputs,
        };
        graph.record(backward, &inputs, &saved, &[y]);
        for tensor in inputs {
            graph.release(tensor);
        }
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, _: u64) -> Vec<f64> {
        let (n_in, n_out) = (self.inputs as usize, self.outputs as usize);
        let w = match self.tied {
            Some(index) => values.shared(index),
            None => values.take(),
        };
        let b = self.bias.then(|| values.take());
        x.chunks_exact(n_in)
            .take(rows * self.positions as usize)
            .flat_map(|row| {
                (0..n_out).map(move |o| {
                    let product: f64 = (0..n_in).map(|k| w[o * n_in + k] * row[k]).sum();
                    product + b.map_or(0.0, |b| b[o])
                })
            })
            .collect()
    }

    fn multiply_adds(&self) -> u64 {
        self.positions * self.inputs * self.outputs
    }

    fn token(&self) -> Token {
        if self.tied.is_some() {
            return Token::Layer(format!("tied{}", self.outputs));
        }
        match (self.positions, self.bias) {
            (1, true) => Token::Width(self.outputs),
            (1, false) => Token::Layer(format!("linear{}nobias", self.outputs)),
            _ => Token::Layer(format!("linear{}", self.outputs)),
        }
    }
}

/// A linear layer's backward.
#[derive(Debug)]
struct LinearBackward {
    /// The input, saved when the weights' gradient is needed.
    x: Option<Tensor>,
    /// The weights, saved when the input's gradient is needed.
    w: Option<Tensor>,
    /// Elements of the input.
    x_elements: u64,
    bias: bool,
    rows: u64,
    inputs: u64,
    outputs: u64,
}

impl Backward for LinearBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let inputs_count = 2 + usize::from(self.bias);
        let Some(dy) = grads[0] else {
            return vec![None; inputs_count];
        };
        let (rows, inputs, outputs) = (self.rows, self.inputs, self.outputs);
        let dx = self.w.filter(|_| pass.needs(0)).map(|w| {
            let dx = pass.gradient(0, self.x_elements, pass.storage(dy));
            pass.emit(Instr::InputGradient {
                dy: pass.slot(dy),
                w: pass.slot(w),
                dx: pass.slot(dx),
                rows,
                inputs,
                outputs,
            });
            dx
        });
        let dw = self.x.filter(|_| pass.needs(1)).map(|x| {
            let dw = pass.gradient(1, inputs * outputs, pass.storage(dy));
            pass.emit(Instr::WeightGradient {
                dy: pass.slot(dy),
                x: pass.slot(x),
                dw: pass.slot(dw),
                rows,
                inputs,
                outputs,
            });
            dw
        });
        let db = (self.bias && pass.needs(2)).then(|| {
            let db = pass.gradient(2, outputs, pass.storage(dy));
            pass.emit(Instr::BiasGradient {
                dy: pass.slot(dy),
                db: pass.slot(db),
                rows,
                cols: outputs,
                spatial: 1,
            });
            db
        });
        let mut gradients = vec![dx, dw, db];
        gradients.truncate(inputs_count);
        gradients
    }
}
