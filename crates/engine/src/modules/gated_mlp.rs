//! A gated MLP over the last dimension, as Llama, Mistral and Qwen2 write theirs (SwiGLU with
//! SiLU): `down(act(gate(x)) * up(x))`, three linear layers without bias by default, back to the
//! input's width. Built of the [`Linear`] and [`Activation`] modules, and PyTorch's `mul`
//! between them (elementwise.cu's `multiply`), which saves each factor for the other's
//! gradient; backward makes the first factor's gradient, then the second's. Its parameters are
//! in Hugging Face's order: `gate_proj`, `up_proj`, `down_proj`.

use serde::{Deserialize, Serialize};

use super::activation::{Activation, Nonlinearity};
use super::check::extent;
use super::linear::{Linear, LinearSpec};
use super::{Context, LayerError, Module, Parameter, Parameters, Path, Token, Values};
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::Instr;

/// The gate's activation, by Hugging Face's `hidden_act` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateActivation {
    /// `silu` (SwiGLU: Llama, Mistral, Qwen2).
    #[default]
    Silu,
    /// `gelu`, exact (GeGLU).
    Gelu,
    /// `gelu_pytorch_tanh` (Gemma).
    GeluPytorchTanh,
    /// `relu` (ReGLU).
    Relu,
}

impl GateActivation {
    fn nonlinearity(self) -> Nonlinearity {
        match self {
            GateActivation::Silu => Nonlinearity::Silu,
            GateActivation::Gelu => Nonlinearity::GeluErf,
            GateActivation::GeluPytorchTanh => Nonlinearity::GeluTanh,
            GateActivation::Relu => Nonlinearity::Relu,
        }
    }
}

/// A gated MLP's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatedMlpSpec {
    /// Width of the gate and up projections (`intermediate_size`).
    pub intermediate_size: u64,
    /// The gate's activation (`silu`).
    #[serde(default)]
    pub activation: GateActivation,
    /// Whether the three projections learn a bias (false, as Llama's).
    #[serde(default)]
    pub bias: bool,
}

impl GatedMlpSpec {
    /// The block over a sample of `input` shape: its last dimension is the features.
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<GatedMlp, LayerError> {
        let Some(&features) = input.last() else {
            return Err(at.error("gated_mlp needs an input with at least one dimension"));
        };
        let inner = extent(at, "intermediate_size", self.intermediate_size, 1)?;
        // A projection, with a LoRA adapter when the job's targets name it.
        let linear = |name: &str, out_features, input: &[u64], cx: &mut Context| {
            LinearSpec {
                out_features,
                bias: self.bias,
                tied: false,
            }
            .build(input, at, cx)?
            .adapted(name, input, at, cx)
        };
        let gate = linear("gate_proj", inner, input, cx)?;
        let up = linear("up_proj", inner, input, cx)?;
        let activation = Activation::new(
            self.activation.nonlinearity(),
            false,
            gate.output_shape(),
            at,
            cx,
        )?;
        let down = linear("down_proj", features, gate.output_shape(), cx)?;
        Ok(GatedMlp {
            gate,
            activation,
            up,
            down,
            inner,
        })
    }
}

/// A gated MLP.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate: Linear,
    activation: Activation,
    up: Linear,
    down: Linear,
    inner: u64,
}

impl Module for GatedMlp {
    fn output_shape(&self) -> &[u64] {
        self.down.output_shape()
    }

    fn parameters(&self) -> Vec<Parameter> {
        [&self.gate, &self.up, &self.down]
            .into_iter()
            .flat_map(|linear| linear.parameters())
            .collect()
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let gate = self.gate.forward(graph, x, parameters);
        let activated = self.activation.forward(graph, gate, parameters);
        graph.release(gate);
        let up = self.up.forward(graph, x, parameters);
        let product = multiply(graph, activated, up);
        graph.release(activated);
        graph.release(up);
        let y = self.down.forward(graph, product, parameters);
        graph.release(product);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, seed: u64) -> Vec<f64> {
        let gate = self.gate.reference(x, rows, values, seed);
        let activated = self.activation.reference(&gate, rows, values, seed);
        let up = self.up.reference(x, rows, values, seed);
        let product: Vec<f64> = activated.iter().zip(&up).map(|(a, b)| a * b).collect();
        self.down.reference(&product, rows, values, seed)
    }

    fn multiply_adds(&self) -> u64 {
        self.gate.multiply_adds() + self.up.multiply_adds() + self.down.multiply_adds()
    }

    fn token(&self) -> Token {
        Token::Layer(format!("gated{}", self.inner))
    }
}

/// `a * b` (PyTorch's `mul`), recorded with its backward: each factor saved when the other
/// needs a gradient. A reference the caller owns.
fn multiply(graph: &mut Graph, a: Tensor, b: Tensor) -> Tensor {
    let len = graph.elements(a);
    let product = graph.output(len, graph.storage(a));
    graph.emit(Instr::Multiply {
        a: graph.slot(a),
        b: graph.slot(b),
        out: graph.slot(product),
        len,
    });
    let saved_a = graph.requires_grad(b).then_some(a);
    let saved_b = graph.requires_grad(a).then_some(b);
    let saved: Vec<Tensor> = saved_a.into_iter().chain(saved_b).collect();
    graph.record(
        MultiplyBackward {
            a: saved_a,
            b: saved_b,
            len,
        },
        &[a, b],
        &saved,
        &[product],
    );
    product
}

/// `mul`'s backward: `da = dy * b`, `db = dy * a`.
#[derive(Debug)]
struct MultiplyBackward {
    /// The first factor, saved when the second's gradient is needed.
    a: Option<Tensor>,
    /// The second factor, saved when the first's gradient is needed.
    b: Option<Tensor>,
    len: u64,
}

impl Backward for MultiplyBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None, None];
        };
        let product_with = |pass: &mut Pass<'_>, k: usize, other: Option<Tensor>| {
            other.filter(|_| pass.needs(k)).map(|other| {
                let gradient = pass.gradient(k, self.len, pass.storage(dy));
                pass.emit(Instr::Multiply {
                    a: pass.slot(dy),
                    b: pass.slot(other),
                    out: pass.slot(gradient),
                    len: self.len,
                });
                gradient
            })
        };
        let da = product_with(pass, 0, self.b);
        let db = product_with(pass, 1, self.a);
        vec![da, db]
    }
}
