//! Layers whose parameters are not trained: `requires_grad_(False)` on each of them, as a
//! fine-tuning run freezes a backbone. Frozen parameters are filled as trained ones are and
//! read by the forward, but get no gradient and no optimizer state; autograd's consequences
//! follow from the graph: a layer whose inputs need no gradient records no node and saves
//! nothing (a frozen first block keeps no activations), a product saves the input only for a
//! weight that is trained, and under autocast a frozen weight's half copy is made at each use
//! rather than cached (PyTorch caches casts of leaves that require grad only). Running
//! statistics are still updated: freezing is about gradients, not about the train mode.
//!
//! A tied head reads the embedding table as the embedding declared it: frozen with a frozen
//! embedding, trained with a trained one. A LoRA adapter inside trains ([`super::lora`]).

use serde::{Deserialize, Serialize};

use super::sequential::delegate_to_body;
use super::{Context, LayerError, LayerSpec, Module, Parameter, Parameters, Path, Sequential};
use super::{Token, Values};
use crate::program::graph::{Graph, Tensor};

/// The frozen layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrozenSpec {
    /// The layers, applied in order, whose parameters are not trained.
    pub layers: Vec<LayerSpec>,
}

impl FrozenSpec {
    /// The frozen layers over a sample of `input` shape.
    pub fn build(&self, input: &[u64], at: &Path, cx: &mut Context) -> Result<Frozen, LayerError> {
        cx.depth += 1;
        let body = Sequential::build(&self.layers, input, &at.list("layers"), cx)?;
        cx.depth -= 1;
        Ok(Frozen::around(body))
    }
}

/// Layers whose parameters are frozen.
#[derive(Debug, Clone)]
pub struct Frozen {
    body: Sequential,
}

impl Frozen {
    /// `body` with its parameters frozen (LoRA's whole model, its adapters excepted).
    pub fn around(body: Sequential) -> Frozen {
        Frozen { body }
    }
}

impl Module for Frozen {
    delegate_to_body!();

    fn parameters(&self) -> Vec<Parameter> {
        self.body
            .parameters()
            .into_iter()
            .map(Parameter::frozen)
            .collect()
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        self.body.forward(graph, x, parameters)
    }

    fn token(&self) -> Token {
        match self.body.token() {
            Token::Layer(word) => Token::Layer(format!("frozen({word})")),
            other => other,
        }
    }

    fn keeps_output(&self, _: bool) -> bool {
        self.body.keeps_output(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::ParameterKind;

    fn frozen(layers: serde_json::Value, input: &[u64]) -> Frozen {
        let spec: FrozenSpec =
            serde_json::from_value(serde_json::json!({ "layers": layers })).expect("a frozen list");
        spec.build(
            input,
            &Path::new("model.layers[0]"),
            &mut Context::default(),
        )
        .expect("builds")
    }

    #[test]
    fn every_learnt_parameter_inside_is_frozen_and_statistics_stay_statistics() {
        let block = frozen(
            serde_json::json!([
                {"conv2d": {"out_channels": 4, "kernel_size": 3}},
                {"batch_norm2d": {}},
                {"relu": {}}
            ]),
            &[3, 8, 8],
        );
        let kinds: Vec<ParameterKind> = block.parameters().iter().map(|p| p.kind).collect();
        assert!(matches!(
            kinds[..],
            [
                ParameterKind::Frozen { .. },
                ParameterKind::Frozen { .. },
                ParameterKind::Frozen { .. },
                ParameterKind::Frozen { .. },
                ParameterKind::Statistic,
                ParameterKind::Statistic,
                ParameterKind::Count,
            ]
        ));
        assert_eq!(block.output_shape(), &[4, 6, 6]);
    }

    #[test]
    fn an_empty_list_is_refused_by_its_field() {
        let spec = FrozenSpec { layers: Vec::new() };
        let error = spec
            .build(
                &[4],
                &Path::new("model.layers[0]").of("frozen"),
                &mut Context::default(),
            )
            .unwrap_err();
        assert_eq!(error.field, "model.layers[0].frozen.layers");
    }
}
