//! `nn.Linear`: `y = x w^T + b` over the last dimension of a sample (gemm.cu's `linear_forward`,
//! elementwise.cu's `bias_add`). PyTorch runs it as `addmm` (`mm` without bias) over the sample's
//! leading positions flattened, which saves the input for the weights' gradient and the weights
//! for the input's, each only when that gradient is needed; backward makes the input's gradient,
//! then the weights', then the bias's (the sum autograd reduces the broadcast bias's gradient
//! with). Under autocast its bias, then its weights, then an input stored otherwise are cast to
//! half first. A `tied` layer (a language model's head with `tie_word_embeddings`) reads the
//! model's embedding table as its weights: one parameter, whose two gradients autograd sums.
//! With a LoRA adapter ([`Adapter`], the job's `model.lora`) its output is peft's `lora.Linear`'s,
//! `base(x) + lora_B(lora_A(dropout(x))) * scaling`.

use serde::{Deserialize, Serialize};

use super::check::{extent, product, sum};
use super::dropout::Dropout;
use super::{residual, Context, LayerError, Module, Parameter, ParameterKind, Parameters, Path};
use super::{Token, Values};
use crate::memory::Storage;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Instr, Scale};

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
    /// `out_features` without bias, not tied (a LoRA adapter's `lora_A` and `lora_B`).
    pub fn plain(out_features: u64) -> LinearSpec {
        LinearSpec {
            out_features,
            bias: false,
            tied: false,
        }
    }

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
            adapter: None,
        })
    }
}

impl Linear {
    /// The layer with a LoRA adapter when the job's `model.lora` targets `name` (peft's name
    /// for it: `q_proj`, ..., `linear`); unchanged for the model's head and a tied layer.
    pub fn adapted(
        mut self,
        name: &str,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<Linear, LayerError> {
        let Some(lora) = cx.lora.clone().filter(|_| self.tied.is_none() && !cx.head) else {
            return Ok(self);
        };
        self.adapter = lora
            .adapter(name, input, self.outputs, at, cx)?
            .map(Box::new);
        Ok(self)
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
    /// Its LoRA adapter, if the job puts one on it.
    adapter: Option<Box<Adapter>>,
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
        declared.extend(self.adapter.iter().flat_map(|a| a.parameters()));
        declared
    }

    fn forward(&self, graph: &mut Graph, input: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let weight = match self.tied {
            Some(index) => parameters.shared(index),
            None => parameters.take(),
        };
        let bias = self.bias.then(|| parameters.take());
        let bias = bias.map(|b| graph.operand_parameter(b));
        let w = graph.operand_parameter(weight);
        let x = graph.operand(input);
        let rows = graph.times_rows(self.positions);
        // In its operands' type: the compute type, but for an f32 LoRA adapter over a bf16 model.
        let y = graph.output(rows.saturating_mul(self.outputs), graph.storage(x));
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
        let Some(adapter) = &self.adapter else {
            return y;
        };
        let sum = adapter.forward(graph, input, y, parameters);
        graph.release(y);
        sum
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, seed: u64) -> Vec<f64> {
        let (n_in, n_out) = (self.inputs as usize, self.outputs as usize);
        let w = match self.tied {
            Some(index) => values.shared(index),
            None => values.take(),
        };
        let b = self.bias.then(|| values.take());
        let base = x
            .chunks_exact(n_in)
            .take(rows * self.positions as usize)
            .flat_map(|row| {
                (0..n_out).map(move |o| {
                    let product: f64 = (0..n_in).map(|k| w[o * n_in + k] * row[k]).sum();
                    product + b.map_or(0.0, |b| b[o])
                })
            })
            .collect();
        match &self.adapter {
            Some(adapter) => adapter.reference(x, base, rows, values, seed),
            None => base,
        }
    }

    fn multiply_adds(&self) -> u64 {
        self.positions * self.inputs * self.outputs
            + self.adapter.as_ref().map_or(0, |a| a.multiply_adds())
    }

    fn token(&self) -> Token {
        if let Some(adapter) = &self.adapter {
            return Token::Layer(format!("linear{}+lora{}", self.outputs, adapter.rank()));
        }
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
        // The bias's gradient is the output's, summed over the rows by autograd's engine
        // after the product's backward has returned.
        pass.applied();
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

/// One linear layer's LoRA adapter ([`super::lora`]): `lora_B(lora_A(dropout(x))) * scaling`
/// added to its output.
#[derive(Debug, Clone)]
pub struct Adapter {
    dropout: Option<Dropout>,
    a: Linear,
    b: Linear,
    scaling: f32,
    rank: u64,
}

impl Adapter {
    /// The adapter of `lora_A` and `lora_B`, its input dropped out first when `dropout` is
    /// given, its update scaled by `scaling`.
    pub fn new(dropout: Option<Dropout>, [a, b]: [Linear; 2], scaling: f32, rank: u64) -> Adapter {
        Adapter {
            dropout,
            a,
            b,
            scaling,
            rank,
        }
    }

    /// `lora_A`'s and `lora_B`'s weights, trained wherever the adapter is.
    pub fn parameters(&self) -> Vec<Parameter> {
        self.a
            .parameters()
            .into_iter()
            .chain(self.b.parameters())
            .map(|p| match p.kind {
                ParameterKind::Trained { scale } => Parameter {
                    kind: ParameterKind::Adapter { scale },
                    ..p
                },
                _ => p,
            })
            .collect()
    }

    /// Records `base + lora_B(lora_A(dropout(x))) * scaling`, `base` the base layer's output
    /// over `x`; both references stay the caller's. Returns the sum, which the caller owns.
    pub fn forward(
        &self,
        graph: &mut Graph,
        x: Tensor,
        base: Tensor,
        parameters: &mut Parameters<'_>,
    ) -> Tensor {
        // peft's `_cast_input_dtype`: the input in the adapter's weight type, f32, bound to
        // the forward's `x` until it returns.
        let input = match graph.storage(x) {
            Storage::F32 => {
                graph.retain(x);
                x
            }
            _ => graph.cast(x, Storage::F32, Scale::One),
        };
        let dropped = match &self.dropout {
            Some(dropout) => dropout.forward(graph, input, parameters),
            None => {
                graph.retain(input);
                input
            }
        };
        let low = self.a.forward(graph, dropped, parameters);
        graph.release(dropped);
        let update = self.b.forward(graph, low, parameters);
        graph.release(low);
        let scaled = graph.times(update, self.scaling);
        graph.release(update);
        let sum = residual::add(graph, base, scaled);
        graph.release(scaled);
        // `result.to(torch_result_dtype)`: a bf16 model's sum with the f32 update is f32.
        let storage = graph.storage(base);
        let result = match graph.storage(sum) == storage {
            true => sum,
            false => {
                let cast = graph.cast(sum, storage, Scale::One);
                graph.release(sum);
                cast
            }
        };
        graph.release(input);
        result
    }

    /// `base + scaling * lora_B(lora_A(dropout(x)))` in f64, over `rows` samples.
    pub fn reference(
        &self,
        x: &[f64],
        base: Vec<f64>,
        rows: usize,
        values: &mut Values<'_>,
        seed: u64,
    ) -> Vec<f64> {
        let dropped = match &self.dropout {
            Some(dropout) => dropout.reference(x, rows, values, seed),
            None => x.to_vec(),
        };
        let low = self.a.reference(&dropped, rows, values, seed);
        let update = self.b.reference(&low, rows, values, seed);
        let scaling = f64::from(self.scaling);
        base.iter()
            .zip(update)
            .map(|(b, u)| b + scaling * u)
            .collect()
    }

    /// Its multiply-adds per sample.
    pub fn multiply_adds(&self) -> u64 {
        self.a.multiply_adds() + self.b.multiply_adds()
    }

    /// Its rank.
    pub fn rank(&self) -> u64 {
        self.rank
    }
}
