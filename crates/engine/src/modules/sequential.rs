//! Layers applied one after another, as `nn.Sequential` runs them: the model itself, and a
//! residual block's body and shortcut.

use std::sync::Arc;

use super::{Context, LayerError, LayerSpec, Module, Parameter, Parameters, Path, Token, Values};
use super::{MAX_LAYERS, MAX_NESTING};
use crate::program::graph::{Graph, Tensor};

/// Layers in order: each one's output is the next one's input, and goes (unless something saved
/// it) once the next layer has run, as the variable `nn.Sequential` rebinds lets it go.
#[derive(Debug, Clone)]
pub struct Sequential {
    layers: Vec<Arc<dyn Module>>,
    output: Vec<u64>,
    keeps_output: bool,
    returns_view: bool,
}

impl Sequential {
    /// The layers `specs` over a sample of `input` shape, at `path` (`model.layers`); each shape
    /// is checked as the sample passes through, and every error names the layer and its field.
    pub fn build(
        specs: &[LayerSpec],
        input: &[u64],
        path: &Path,
        cx: &mut Context,
    ) -> Result<Sequential, LayerError> {
        if specs.is_empty() {
            return Err(path.error("must hold at least one layer"));
        }
        if cx.depth > MAX_NESTING {
            return Err(path.error(format!("residual blocks nest at most {MAX_NESTING} deep")));
        }
        let mut layers = Vec::with_capacity(specs.len().min(MAX_LAYERS));
        let mut shape = input.to_vec();
        for (i, spec) in specs.iter().enumerate() {
            let at = path.index(i);
            cx.layers += 1;
            if cx.layers > MAX_LAYERS {
                return Err(at.error(format!(
                    "a model may hold at most {MAX_LAYERS} layers, residual blocks' own counted"
                )));
            }
            if cx.tokens.is_some() && !spec.reads_tokens() {
                return Err(at.error(format!(
                    "token ids reach this {}: a model over model.tokens starts with an embedding",
                    spec.name()
                )));
            }
            let first_parameter = cx.parameters;
            cx.head = cx.depth == 0 && i + 1 == specs.len();
            let layer = spec.build(&shape, &at, cx)?;
            cx.parameters = first_parameter + layer.parameters().len();
            cx.input_kept = layer.keeps_output(cx.input_kept);
            cx.input_is_view = layer.returns_view(cx.input_is_view);
            shape = layer.output_shape().to_vec();
            layers.push(layer);
        }
        Ok(Sequential {
            layers,
            output: shape,
            keeps_output: cx.input_kept,
            returns_view: cx.input_is_view,
        })
    }

    /// `layer` alone (a built model wrapped whole: its LoRA base frozen).
    pub fn of(layer: Arc<dyn Module>) -> Sequential {
        Sequential {
            output: layer.output_shape().to_vec(),
            keeps_output: layer.keeps_output(false),
            returns_view: layer.returns_view(false),
            layers: vec![layer],
        }
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Arc<dyn Module>] {
        &self.layers
    }
}

impl Module for Sequential {
    fn output_shape(&self) -> &[u64] {
        &self.output
    }

    fn parameters(&self) -> Vec<Parameter> {
        self.layers.iter().flat_map(|l| l.parameters()).collect()
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        graph.retain(x);
        let mut current = x;
        for layer in &self.layers {
            let next = layer.forward(graph, current, parameters);
            graph.release(current);
            current = next;
        }
        current
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, seed: u64) -> Vec<f64> {
        self.layers.iter().fold(x.to_vec(), |current, layer| {
            layer.reference(&current, rows, values, seed)
        })
    }

    fn multiply_adds(&self) -> u64 {
        self.layers.iter().map(|l| l.multiply_adds()).sum()
    }

    fn token(&self) -> Token {
        let shown: Vec<String> = self
            .layers
            .iter()
            .filter_map(|l| match l.token() {
                Token::Hidden => None,
                Token::Width(width) => Some(format!("linear{width}")),
                Token::Activation(name) => Some(name.to_string()),
                Token::Dropout(p) => Some(format!("dropout{p}")),
                Token::Layer(word) => Some(word),
            })
            .collect();
        Token::Layer(shown.join("-"))
    }

    fn keeps_output(&self, _: bool) -> bool {
        self.keeps_output
    }

    fn is_view(&self) -> bool {
        self.layers.iter().all(|l| l.is_view())
    }

    fn returns_view(&self, _: bool) -> bool {
        self.returns_view
    }
}

/// The [`Module`] methods of a container whose layers run as they are, in a [`Sequential`]
/// field named `body` (frozen layers, a checkpointed region): handed to the body.
macro_rules! delegate_to_body {
    () => {
        fn output_shape(&self) -> &[u64] {
            self.body.output_shape()
        }

        fn reference(
            &self,
            x: &[f64],
            rows: usize,
            values: &mut Values<'_>,
            seed: u64,
        ) -> Vec<f64> {
            self.body.reference(x, rows, values, seed)
        }

        fn multiply_adds(&self) -> u64 {
            self.body.multiply_adds()
        }

        fn is_view(&self) -> bool {
            self.body.is_view()
        }

        fn returns_view(&self, input_is_view: bool) -> bool {
            self.body.returns_view(input_is_view)
        }
    };
}

pub(crate) use delegate_to_body;
