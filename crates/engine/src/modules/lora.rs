//! LoRA as `peft` runs it (`LoraConfig`, its vanilla `lora.Linear`): every parameter of the
//! model frozen, and beside each targeted linear layer an adapter of rank `r` that trains,
//! `result = base(x) + lora_B(lora_A(dropout(x))) * (lora_alpha / r)`.
//!
//! The adapter is written from PyTorch's modules, so its memory is what autograd holds. Its
//! weights are f32 whatever the model's type (peft's `autocast_adapter_dtype`), and so are their
//! gradients and optimizer state. peft casts the input to that type first
//! (`x.to(lora_A.weight.dtype)`, bound to the forward's `x` until it returns: under autocast a
//! 16-bit input becomes an f32 copy, which autocast casts back to 16 bits for `lora_A`, a
//! second copy; in `bf16-true` the adapter computes in f32, and its sum with the bf16 base
//! output, f32, is cast back). Dropout (when `lora_dropout` > 0) writes its output and one-byte
//! mask; `lora_A` saves its input and `lora_B` the `r` values a position between them (their
//! weights train); `* scaling` and the sum with the base output are new tensors saving
//! nothing ([`Adapter`]). Its kernels are headroom's own: the products of a linear layer, a
//! scaled copy, a sum.
//! The base layer's frozen weight is read where it is (no gradient, and autocast casts it at
//! each use).
//!
//! peft starts `lora_B` at zero, which makes the first step's update of `lora_A` zero; headroom
//! fills both from its synthetic streams, the memory the same, so that the finite-difference
//! checks see every gradient.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::dropout::DropoutSpec;
use super::linear::{Adapter, LinearSpec};
use super::{Context, LayerError, LayerSpec, Module, Path, MAX_EXTENT};

/// The linear layers an adapter can be put on, by peft's names: a self-attention's
/// projections, a gated MLP's three, and `linear` for a layer list's own linear layers (the
/// model's head excepted).
pub const TARGETS: [&str; 8] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "linear",
];

/// peft's `LoraConfig` as a job writes it (`model.lora`), its defaults peft's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// The adapters' rank (8).
    #[serde(default = "eight")]
    pub r: u64,
    /// The update is scaled by `lora_alpha / r` (8).
    #[serde(default = "eight_as_f64")]
    pub lora_alpha: f64,
    /// Dropout on each adapter's input (0: none).
    #[serde(default)]
    pub lora_dropout: f64,
    /// The linear layers adapted: names of [`TARGETS`], or `"all-linear"` for every one of
    /// them (`["q_proj", "v_proj"]`, peft's default for Llama).
    #[serde(default = "query_and_value")]
    pub target_modules: TargetModules,
}

fn eight() -> u64 {
    8
}

fn eight_as_f64() -> f64 {
    8.0
}

fn query_and_value() -> TargetModules {
    TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
}

/// `target_modules`: a list of names, or one (peft's `"all-linear"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names of [`TARGETS`].
    Names(Vec<String>),
    /// `"all-linear"`, or one name.
    One(String),
}

/// A checked [`LoraSpec`]: what building a linear layer asks of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lora {
    rank: u64,
    scaling: f32,
    dropout: f64,
    targets: BTreeSet<&'static str>,
}

impl LoraSpec {
    /// The configuration checked against `layers` (the model's list at `at`, `model.lora`):
    /// each field in range, each target a name headroom knows and one some layer has.
    pub fn check(&self, layers: &[LayerSpec], at: &str) -> Result<Lora, LayerError> {
        let field = |name: &str| format!("{at}.{name}");
        if self.r == 0 || self.r > MAX_EXTENT {
            return Err(LayerError::new(
                field("r"),
                format!(
                    "must be at least 1 (and at most {MAX_EXTENT}), got {}",
                    self.r
                ),
            ));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(LayerError::new(
                field("lora_alpha"),
                format!("must be a positive number, got {}", self.lora_alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(LayerError::new(
                field("lora_dropout"),
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        let present = names_in(layers);
        let names: Vec<&str> = match &self.target_modules {
            TargetModules::One(all) if all == "all-linear" => present.iter().copied().collect(),
            TargetModules::One(name) => vec![name.as_str()],
            TargetModules::Names(names) => names.iter().map(String::as_str).collect(),
        };
        if names.is_empty() {
            return Err(LayerError::new(
                field("target_modules"),
                "names no layer: give some of q_proj, k_proj, v_proj, o_proj, gate_proj, \
                 up_proj, down_proj and linear, or \"all-linear\"",
            ));
        }
        let mut targets = BTreeSet::new();
        for name in names {
            let Some(&known) = TARGETS.iter().find(|&&t| t == name) else {
                return Err(LayerError::new(
                    field("target_modules"),
                    format!(
                        "{name:?} is not a linear layer headroom adapts: it takes {} \
                         (a layer list's own linear layers), or \"all-linear\"",
                        TARGETS.join(", ")
                    ),
                ));
            };
            if !present.contains(known) {
                return Err(LayerError::new(
                    field("target_modules"),
                    format!(
                        "{known:?} matches no layer of the model, which has {}",
                        match present.is_empty() {
                            true => "no linear layer but its head".to_string(),
                            false => present.iter().copied().collect::<Vec<_>>().join(", "),
                        }
                    ),
                ));
            }
            targets.insert(known);
        }
        Ok(Lora {
            rank: self.r,
            scaling: (self.lora_alpha / self.r as f64) as f32,
            dropout: self.lora_dropout,
            targets,
        })
    }
}

/// The target names the linear layers of `layers` answer to (the last layer, the head,
/// excepted, and any head tied to the embedding).
fn names_in(layers: &[LayerSpec]) -> BTreeSet<&'static str> {
    let body = &layers[..layers.len().saturating_sub(1)];
    let last_within = layers
        .last()
        .filter(|l| !matches!(l, LayerSpec::Linear(_)))
        .into_iter();
    body.iter()
        .chain(last_within)
        .flat_map(LayerSpec::nested)
        .flat_map(|layer| -> &[&'static str] {
            match layer {
                LayerSpec::SelfAttention(_) => &TARGETS[..4],
                LayerSpec::GatedMlp(_) => &TARGETS[4..7],
                LayerSpec::Linear(spec) if !spec.tied => &TARGETS[7..],
                _ => &[],
            }
        })
        .copied()
        .collect()
}

impl Lora {
    /// Whether the configuration adapts the linear layers called `name`.
    pub fn targets(&self, name: &str) -> bool {
        self.targets.contains(name)
    }

    /// The adapter of the linear layer `name` over a sample of `input` shape writing
    /// `out_features`, if the configuration targets it.
    pub fn adapter(
        &self,
        name: &str,
        input: &[u64],
        out_features: u64,
        at: &Path,
        cx: &mut Context,
    ) -> Result<Option<Adapter>, LayerError> {
        if !self.targets.contains(name) {
            return Ok(None);
        }
        let dropout = match self.dropout > 0.0 {
            true => Some(DropoutSpec { p: self.dropout }.build(input, at, cx)?),
            false => None,
        };
        let a = LinearSpec::plain(self.rank).build(input, at, cx)?;
        let b = LinearSpec::plain(out_features).build(a.output_shape(), at, cx)?;
        Ok(Some(Adapter::new(dropout, [a, b], self.scaling, self.rank)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(json: serde_json::Value) -> Vec<LayerSpec> {
        serde_json::from_value(json).expect("a layer list")
    }

    fn spec(json: serde_json::Value) -> LoraSpec {
        serde_json::from_value(json).expect("a LoRA configuration")
    }

    fn llama_like() -> Vec<LayerSpec> {
        layers(serde_json::json!([
            {"embedding": {"embedding_dim": 8}},
            {"residual": {"layers": [{"rms_norm": {}}, {"self_attention": {"num_heads": 2}}]}},
            {"residual": {"layers": [{"rms_norm": {}}, {"gated_mlp": {"intermediate_size": 16}}]}},
            {"linear": {"out_features": 10, "bias": false}}
        ]))
    }

    #[test]
    fn peft_s_defaults_adapt_the_query_and_value_projections() {
        let lora = spec(serde_json::json!({}))
            .check(&llama_like(), "model.lora")
            .unwrap();
        assert_eq!(lora.rank, 8);
        assert_eq!(lora.scaling, 1.0);
        assert_eq!(lora.targets, BTreeSet::from(["q_proj", "v_proj"]));
    }

    #[test]
    fn all_linear_is_every_projection_but_not_the_head() {
        let lora =
            spec(serde_json::json!({"target_modules": "all-linear", "r": 4, "lora_alpha": 16}))
                .check(&llama_like(), "model.lora")
                .unwrap();
        assert_eq!(lora.scaling, 4.0);
        assert_eq!(lora.targets.len(), 7);
        assert!(!lora.targets.contains("linear"), "the head is not adapted");
    }

    #[test]
    fn bad_options_are_named_by_field() {
        let cases = [
            (serde_json::json!({"r": 0}), "model.lora.r", "at least 1"),
            (
                serde_json::json!({"lora_alpha": -1.0}),
                "model.lora.lora_alpha",
                "positive",
            ),
            (
                serde_json::json!({"lora_dropout": 1.0}),
                "model.lora.lora_dropout",
                "[0, 1)",
            ),
            (
                serde_json::json!({"target_modules": ["c_attn"]}),
                "model.lora.target_modules",
                "not a linear layer",
            ),
            (
                serde_json::json!({"target_modules": ["linear"]}),
                "model.lora.target_modules",
                "matches no layer",
            ),
            (
                serde_json::json!({"target_modules": []}),
                "model.lora.target_modules",
                "names no layer",
            ),
        ];
        for (json, field, said) in cases {
            let error = spec(json.clone())
                .check(&llama_like(), "model.lora")
                .unwrap_err();
            assert_eq!(error.field, field, "{json}");
            assert!(error.reason.contains(said), "{json}: {}", error.reason);
        }
    }
}
