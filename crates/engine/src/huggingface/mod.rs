//! A Hugging Face `config.json` as a job's model: `"model": {"huggingface": {...}, "tokens":
//! {"sequence_length": 2048}}` is read as the layer list the architecture is made of, in
//! PyTorch's modules: for the Llama family (`model_type` `llama`, `mistral`, `qwen2`), the token
//! embedding, per decoder layer a pre-norm block of RMS norm and grouped-query causal attention
//! with rotary embedding and one of RMS norm and the gated MLP, the final norm, and the head
//! (tied to the embedding with `tie_word_embeddings`); for `gpt2`, token and learned position
//! embeddings, pre-norm blocks of layer norm and attention, of layer norm and the MLP, each
//! with GPT-2's dropouts, and the tied head; for `vit`, an image classifier (the patch
//! embedding, pre-norm blocks, the class token's classifier), its image and classes from the
//! config. A decoder's `vocab_size` and logits come from the config. What the list cannot say
//! is refused by field: a sliding window, an activation the list does not take, GPT-2's
//! unscaled or cross attention, another architecture. Attention is SDPA's unless the config
//! says `"attn_implementation": "eager"` (what `from_pretrained` takes; `config.json` does not
//! store it, so a job adds it).
//!
//! The Llama family's norms are `LlamaRMSNorm`'s composite (`"implementation": "composite"`), and
//! a language model trains with transformers' own step ([`step`]: its loss, its output held while
//! the loss is taken); GPT-2's `gelu_new` is `NewGELUActivation`'s composite; its fused `c_attn`
//! and ViT's own modules are read as PyTorch's modules.

use serde_json::{json, Map, Value};

use crate::modules::checkpoint::{self, checkpoint_blocks};
use crate::modules::LayerSpec;
use crate::plan::HuggingFaceStep;

mod decoder;
mod gpt2;
mod vit;

use decoder::Family;

/// Where the config is in a job.
const FIELD: &str = "model.huggingface";

/// A config that cannot be read as a layer list: the job's field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field (`model.huggingface.hidden_act`).
    pub field: String,
    /// What is wrong and what would work.
    pub reason: String,
}

impl ConfigError {
    pub(super) fn new(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Writes the layer list, vocabulary and classes `model.huggingface` describes into a job's
/// `model` (the config stays, as the record of where they came from); a model without it is
/// left as it is. A layer list given beside the config must be the config's own (a job this
/// wrote, sent again).
pub fn expand(model: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let Some(config) = model.get("huggingface") else {
        return Ok(());
    };
    let Value::Object(config) = config.clone() else {
        return Err(ConfigError::new(
            FIELD,
            "must be a Hugging Face config.json object",
        ));
    };
    for field in ["hidden_layers", "activation"] {
        let given = model
            .get(field)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()));
        if given {
            return Err(ConfigError::new(
                format!("model.{field}"),
                "model.huggingface describes the model: give the config or the model's fields, \
                 not both",
            ));
        }
    }
    let config = Config(&config);
    let model_type = config.text("model_type", None)?;
    let (layers, input, classes) = match model_type.as_str() {
        "llama" | "mistral" => decoder::layers(&config, Family::Llama)?,
        "qwen2" => decoder::layers(&config, Family::Qwen2)?,
        "gpt2" => gpt2::layers(&config, sequence_length(model))?,
        "vit" => vit::layers(&config)?,
        other => {
            return Err(config.error(
                "model_type",
                format!(
                    "headroom reads \"gpt2\", \"vit\" and the Llama family (\"llama\", \
                     \"mistral\", \"qwen2\"), not {other:?}; write its layer list as \
                     model.layers instead"
                ),
            ))
        }
    };
    match input {
        Input::Tokens { vocab } => {
            // Read by the step ([`step`]): whether the key/value cache fills.
            config.flag("use_cache", true)?;
            set_tokens(model, vocab)?
        }
        Input::Image(shape) => set_image(model, shape)?,
    }
    agree(model, "num_classes", json!(classes), "the config's classes")?;
    // Every family's decoder (or encoder) layer is two residual blocks.
    let layers = match checkpoint::asked(model) {
        true => checkpoint_blocks(layers, 2).map_err(|e| ConfigError::new(e.field, e.reason))?,
        false => layers,
    };
    let layers = Value::Array(layers);
    if model
        .get("layers")
        .is_some_and(|given| !same_layers(given, &layers))
    {
        return Err(ConfigError::new(
            "model.layers",
            "model.huggingface describes the model: give the config or the layer list, not both",
        ));
    }
    model.insert("layers".into(), layers);
    Ok(())
}

/// Hugging Face's own step for a model read from `config` (one [`expand`] took): a language
/// model's, its key/value cache filled as `use_cache` says (on unless the config turns it off,
/// and off under gradient checkpointing, as transformers turns it off in training); none for
/// an image classifier.
pub fn step(config: &Value, checkpointing: bool) -> Option<HuggingFaceStep> {
    let language_model = matches!(
        config.get("model_type").and_then(Value::as_str),
        Some("llama" | "mistral" | "qwen2" | "gpt2")
    );
    // `expand` has refused a `use_cache` that is not true, false or null.
    let use_cache = config.get("use_cache").and_then(Value::as_bool) != Some(false);
    language_model.then_some(HuggingFaceStep {
        use_cache: use_cache && !checkpointing,
    })
}

/// What a model of a config reads.
enum Input {
    /// Token ids of a vocabulary of `vocab` (the job gives the sequence length).
    Tokens { vocab: u64 },
    /// Images of `[channels, height, width]`.
    Image([u64; 3]),
}

/// A model's layers, input and classes.
type Made = (Vec<Value>, Input, u64);

/// Writes the vocabulary into the job's `model.tokens`, which gives the sequence length.
fn set_tokens(model: &mut Map<String, Value>, vocab: u64) -> Result<(), ConfigError> {
    let Some(Value::Object(tokens)) = model.get_mut("tokens") else {
        return Err(ConfigError::new(
            "model.tokens",
            "a model read from model.huggingface trains on token ids: give \
             {\"tokens\": {\"sequence_length\": N}} (vocab_size comes from the config)",
        ));
    };
    if let Some(given) = tokens.get("vocab_size").filter(|&v| *v != json!(vocab)) {
        return Err(ConfigError::new(
            "model.tokens.vocab_size",
            format!("is {given}, and the config's vocab_size is {vocab}: leave it out"),
        ));
    }
    tokens.insert("vocab_size".into(), json!(vocab));
    Ok(())
}

/// Writes the image's shape as the job's `model.input_shape`.
fn set_image(model: &mut Map<String, Value>, shape: [u64; 3]) -> Result<(), ConfigError> {
    if model.get("tokens").is_some_and(|t| !t.is_null()) {
        return Err(ConfigError::new(
            "model.tokens",
            "this model reads images (image_size and num_channels come from the config): \
             leave tokens out",
        ));
    }
    agree(model, "input_shape", json!(shape), "the config's image")
}

/// Sets `model.{field}` to what the config says, refusing a different value given beside it.
fn agree(
    model: &mut Map<String, Value>,
    field: &str,
    value: Value,
    what: &str,
) -> Result<(), ConfigError> {
    if let Some(given) = model.get(field).filter(|&v| !v.is_null() && *v != value) {
        return Err(ConfigError::new(
            format!("model.{field}"),
            format!("is {given}, and {what} is {value}: leave it out"),
        ));
    }
    model.insert(field.into(), value);
    Ok(())
}

/// A language model: `front` (the embeddings), `depth` times `layer`, the final `norm` and the
/// head over `vocab` (tied to the token embedding or not).
fn language_model(
    front: Vec<Value>,
    (layer, depth): (&[Value], u64),
    norm: Value,
    vocab: u64,
    tied: bool,
) -> Made {
    let layers = front
        .into_iter()
        .chain((0..depth).flat_map(|_| layer.to_vec()))
        .chain([
            norm,
            json!({"linear": {"out_features": vocab, "bias": false, "tied": tied}}),
        ])
        .collect();
    (layers, Input::Tokens { vocab }, vocab)
}

/// The job's `model.tokens.sequence_length`, if it is a whole number.
fn sequence_length(model: &Map<String, Value>) -> Option<u64> {
    model.get("tokens")?.get("sequence_length")?.as_u64()
}

/// Whether `given` is the layer list `made` says, as layers (defaults written out or not).
fn same_layers(given: &Value, made: &Value) -> bool {
    let read = |v: &Value| serde_json::from_value::<Vec<LayerSpec>>(v.clone()).ok();
    read(given).is_some_and(|given| Some(given) == read(made))
}

/// A config's fields, read with errors that name them.
pub(super) struct Config<'a>(pub(super) &'a Map<String, Value>);

impl Config<'_> {
    pub(super) fn error(&self, name: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(format!("{FIELD}.{name}"), reason)
    }

    /// A positive whole number; `default` when absent (or null), else required.
    pub(super) fn count(&self, name: &str, default: Option<u64>) -> Result<u64, ConfigError> {
        match (self.optional_count(name)?, default) {
            (Some(n), _) | (None, Some(n)) => Ok(n),
            (None, None) => Err(self.error(name, "is required")),
        }
    }

    pub(super) fn optional_count(&self, name: &str) -> Result<Option<u64>, ConfigError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match value.as_u64() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(self.error(
                    name,
                    format!("must be a positive whole number, got {value}"),
                )),
            },
        }
    }

    pub(super) fn number(&self, name: &str, default: Option<f64>) -> Result<f64, ConfigError> {
        match (self.0.get(name), default) {
            (None | Some(Value::Null), Some(d)) => Ok(d),
            (None | Some(Value::Null), None) => Err(self.error(name, "is required")),
            (Some(value), _) => value
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| self.error(name, format!("must be a number, got {value}"))),
        }
    }

    /// How many times a layer of `per_layer` list layers repeats (`name`, `default` when
    /// absent), bounded so that they and `around` more fit a model's
    /// [`crate::modules::MAX_LAYERS`].
    pub(super) fn depth(
        &self,
        name: &str,
        default: Option<u64>,
        per_layer: u64,
        around: u64,
    ) -> Result<u64, ConfigError> {
        let depth = self.count(name, default)?;
        let most = crate::modules::MAX_LAYERS as u64;
        let deepest = (most - around) / per_layer;
        match depth <= deepest {
            true => Ok(depth),
            false => Err(self.error(
                name,
                format!(
                    "must be at most {deepest} (each is up to {per_layer} of a model's at most \
                     {most} layers)"
                ),
            )),
        }
    }

    /// A probability in [0, 1), `default` when absent.
    pub(super) fn probability(&self, name: &str, default: f64) -> Result<f64, ConfigError> {
        let p = self.number(name, Some(default))?;
        match (0.0..1.0).contains(&p) {
            true => Ok(p),
            false => Err(self.error(name, format!("must be in [0, 1), got {p}"))),
        }
    }

    /// The side of a square (`224` or `[224, 224]`), `default` when absent.
    pub(super) fn side(&self, name: &str, default: u64) -> Result<u64, ConfigError> {
        let side = |value: &Value| value.as_u64().filter(|&n| n > 0);
        let read = match self.0.get(name) {
            None | Some(Value::Null) => return Ok(default),
            Some(Value::Array(sides)) => match &sides[..] {
                [a, b] if a == b => side(a),
                _ => None,
            },
            Some(value) => side(value),
        };
        read.ok_or_else(|| {
            self.error(
                name,
                "must be a positive whole number, or two equal ones (a square)",
            )
        })
    }

    pub(super) fn flag(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(value) => Err(self.error(name, format!("must be true or false, got {value}"))),
        }
    }

    pub(super) fn text(&self, name: &str, default: Option<&str>) -> Result<String, ConfigError> {
        match (self.0.get(name), default) {
            (Some(Value::String(s)), _) => Ok(s.clone()),
            (None | Some(Value::Null), Some(d)) => Ok(d.to_string()),
            (None | Some(Value::Null), None) => Err(self.error(name, "is required")),
            (Some(value), _) => Err(self.error(name, format!("must be a string, got {value}"))),
        }
    }

    /// How attention is computed: `attn_implementation` (what `from_pretrained` takes, which
    /// `config.json` does not store: headroom reads it here), `sdpa` unless given.
    pub(super) fn attention_implementation(&self) -> Result<&'static str, ConfigError> {
        match self.text("attn_implementation", Some("sdpa"))?.as_str() {
            "sdpa" => Ok("sdpa"),
            "eager" => Ok("eager"),
            other => Err(self.error(
                "attn_implementation",
                format!(
                    "is {other:?}; headroom runs \"sdpa\" (PyTorch's fused attention) and \
                     \"eager\" (the scores materialized)"
                ),
            )),
        }
    }

    /// The activation layer Hugging Face's `ACT2FN` names (`gelu_new`, transformers' own tanh
    /// approximation written out, computes the values of `gelu_pytorch_tanh` through four saved
    /// tensors: the composite GELU).
    pub(super) fn activation(&self, name: &str, default: &str) -> Result<Value, ConfigError> {
        Ok(match self.text(name, Some(default))?.as_str() {
            "gelu_new" => json!({"gelu": {"approximate": "tanh", "implementation": "composite"}}),
            "gelu_pytorch_tanh" => json!({"gelu": {"approximate": "tanh"}}),
            "gelu" => json!({"gelu": {}}),
            "relu" => json!({"relu": {}}),
            "silu" | "swish" => json!({"silu": {}}),
            "tanh" => json!({"tanh": {}}),
            other => {
                return Err(self.error(
                    name,
                    format!(
                        "is {other:?}; headroom takes \"gelu_new\", \"gelu_pytorch_tanh\", \
                         \"gelu\", \"relu\", \"silu\" or \"tanh\""
                    ),
                ))
            }
        })
    }

    /// `rope_theta`, or `rope_parameters.rope_theta` (newer configs); 10,000 when neither.
    pub(super) fn rope_theta(&self) -> Result<f64, ConfigError> {
        match self.0.get("rope_parameters") {
            Some(Value::Object(parameters)) => Config(parameters)
                .number("rope_theta", Some(10_000.0))
                .map_err(|e| {
                    ConfigError::new(
                        e.field.replace(FIELD, "model.huggingface.rope_parameters"),
                        e.reason,
                    )
                }),
            _ => self.number("rope_theta", Some(10_000.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_becomes_the_layers_vocabulary_and_classes() {
        let mut model = json!({
            "huggingface": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96,
                            "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "vocab_size": 300, "sliding_window": null},
            "tokens": {"sequence_length": 16}
        });
        let Value::Object(model) = &mut model else {
            unreachable!()
        };
        expand(model).unwrap();
        assert_eq!(model["num_classes"], 300);
        assert_eq!(model["tokens"]["vocab_size"], 300);
        // The embedding, two blocks a decoder layer, the final norm, the head.
        let layers = model["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1 + 2 * 2 + 2);
        let attention = &layers[1]["residual"]["layers"][1]["self_attention"];
        assert_eq!(attention["rope_theta"], 10_000.0);
        assert_eq!(attention["implementation"], "sdpa");
        assert_eq!(layers[6]["linear"]["tied"], false);
        assert!(model.contains_key("huggingface"));
    }

    #[test]
    fn attn_implementation_picks_the_eager_path_and_names_what_it_cannot_run() {
        let model = |implementation: &str| {
            json!({
                "huggingface": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                "vocab_size": 100, "attn_implementation": implementation},
                "tokens": {"sequence_length": 8}
            })
        };
        let Value::Object(mut eager) = model("eager") else {
            unreachable!()
        };
        expand(&mut eager).unwrap();
        let attention = &eager["layers"][1]["residual"]["layers"][1]["self_attention"];
        assert_eq!(attention["implementation"], "eager");
        let Value::Object(mut flash) = model("flash_attention_2") else {
            unreachable!()
        };
        let error = expand(&mut flash).unwrap_err();
        assert_eq!(error.field, "model.huggingface.attn_implementation");
        assert!(error.reason.contains("\"eager\""), "{}", error.reason);
    }
}
