//! A Hugging Face `config.json` as a job's model: `"model": {"huggingface": {...}, "tokens":
//! {"sequence_length": 2048}}` is read as the layer list the architecture is made of, in
//! PyTorch's modules: for the Llama family (`model_type` `llama`, `mistral`, `qwen2`), the token
//! embedding, per decoder layer a pre-norm block of RMS norm and grouped-query causal attention
//! with rotary embedding and one of RMS norm and the gated MLP, the final norm, and the head
//! (tied to the embedding with `tie_word_embeddings`); for `gpt2`, token and learned position
//! embeddings, pre-norm blocks of layer norm and attention, of layer norm and the MLP, each
//! with GPT-2's dropouts, and the tied head. `vocab_size` and the logits come from the
//! config. What the list cannot say is refused by field: a sliding window, an activation the
//! list does not take, GPT-2's unscaled or cross attention, another architecture.
//!
//! The list describes the architecture as PyTorch's own modules train it (`nn.RMSNorm`'s fused
//! kernel); Hugging Face's `LlamaRMSNorm` computes by hand in f32 and saves more.

use serde_json::{json, Map, Value};

use crate::modules::LayerSpec;

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
    fn new(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
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
    for field in ["hidden_layers", "input_shape", "activation"] {
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
    let layers = match model_type.as_str() {
        "llama" | "mistral" => decoder_layers(&config, Family::Llama)?,
        "qwen2" => decoder_layers(&config, Family::Qwen2)?,
        "gpt2" => gpt2_layers(&config, sequence_length(model))?,
        other => {
            return Err(ConfigError::new(
                format!("{FIELD}.model_type"),
                format!(
                    "headroom reads \"gpt2\" and the Llama family (\"llama\", \"mistral\", \
                     \"qwen2\"), not {other:?}; write its layer list as model.layers instead"
                ),
            ))
        }
    };
    let vocab = config.count("vocab_size", None)?;
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
    if let Some(given) = model.get("num_classes").filter(|&v| *v != json!(vocab)) {
        return Err(ConfigError::new(
            "model.num_classes",
            format!("is {given}, and the config's vocab_size is {vocab}: leave it out"),
        ));
    }
    model.insert("num_classes".into(), json!(vocab));
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

/// The job's `model.tokens.sequence_length`, if it is a whole number.
fn sequence_length(model: &Map<String, Value>) -> Option<u64> {
    model.get("tokens")?.get("sequence_length")?.as_u64()
}

/// Whether `given` is the layer list `made` says, as layers (defaults written out or not).
fn same_layers(given: &Value, made: &Value) -> bool {
    let read = |v: &Value| serde_json::from_value::<Vec<LayerSpec>>(v.clone()).ok();
    read(given).is_some_and(|given| Some(given) == read(made))
}

/// The decoders of the Llama family: where they differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// Llama and Mistral: the projections' bias from `attention_bias`, a `sliding_window`
    /// whenever one is given.
    Llama,
    /// Qwen2: a bias on the query, key and value projections, none on the output's; its
    /// `sliding_window` applies only with `use_sliding_window` (or sliding `layer_types`).
    Qwen2,
}

/// The layer list of a decoder of the Llama family.
fn decoder_layers(config: &Config<'_>, family: Family) -> Result<Vec<Value>, ConfigError> {
    let hidden = config.count("hidden_size", None)?;
    let heads = config.count("num_attention_heads", None)?;
    let vocab = config.count("vocab_size", None)?;
    let eps = config.number("rms_norm_eps", Some(1e-6))?;
    let dropout = config.number("attention_dropout", Some(0.0))?;
    if !(0.0..1.0).contains(&dropout) {
        return Err(ConfigError::new(
            format!("{FIELD}.attention_dropout"),
            format!("must be in [0, 1), got {dropout}"),
        ));
    }
    config.refuse_sliding_window(family)?;
    let activation = config.text("hidden_act", Some("silu"))?;
    if !["silu", "gelu", "gelu_pytorch_tanh", "relu"].contains(&activation.as_str()) {
        return Err(ConfigError::new(
            format!("{FIELD}.hidden_act"),
            format!(
                "is {activation:?}; the gated MLP takes \"silu\", \"gelu\", \
                 \"gelu_pytorch_tanh\" or \"relu\""
            ),
        ));
    }
    let mut attention = json!({
        "num_heads": heads,
        "num_kv_heads": config.count("num_key_value_heads", Some(heads))?,
        "causal": true,
        "rope_theta": config.rope_theta()?,
    });
    match family {
        Family::Llama => attention["bias"] = json!(config.flag("attention_bias", false)?),
        Family::Qwen2 => attention["output_bias"] = json!(false),
    }
    if let Some(head_dim) = config.optional_count("head_dim")? {
        attention["head_dim"] = json!(head_dim);
    }
    if dropout > 0.0 {
        attention["dropout"] = json!(dropout);
    }
    let norm = json!({"rms_norm": {"eps": eps}});
    let mlp = json!({"gated_mlp": {
        "intermediate_size": config.count("intermediate_size", None)?,
        "activation": activation,
        "bias": config.flag("mlp_bias", false)?,
    }});
    let block = [
        json!({"residual": {"layers": [norm, {"self_attention": attention}]}}),
        json!({"residual": {"layers": [norm, mlp]}}),
    ];
    let depth = config.count("num_hidden_layers", None)?;
    // A decoder layer is six of a list's layers (two blocks of two), around three more.
    let deepest = (crate::modules::MAX_LAYERS as u64 - 3) / 6;
    if depth > deepest {
        return Err(ConfigError::new(
            format!("{FIELD}.num_hidden_layers"),
            format!(
                "must be at most {deepest} (each is six of a model's at most {} layers)",
                crate::modules::MAX_LAYERS
            ),
        ));
    }
    let tied = config.flag("tie_word_embeddings", false)?;
    Ok(
        std::iter::once(json!({"embedding": {"embedding_dim": hidden}}))
            .chain((0..depth).flat_map(|_| block.clone()))
            .chain([
                norm.clone(),
                json!({"linear": {"out_features": vocab, "bias": false, "tied": tied}}),
            ])
            .collect(),
    )
}

/// GPT-2's layer list: token and learned position embeddings and their dropout, per layer a
/// pre-norm block of layer norm, causal attention with bias (`c_attn`'s query, key and value,
/// `c_proj`) and dropout, and one of layer norm, the MLP (`c_fc`, the activation, `c_proj`) and
/// dropout; the final layer norm and the head, tied to the token embedding unless
/// `tie_word_embeddings` is false. `Conv1D`'s weights are stored transposed, the same numbers.
fn gpt2_layers(config: &Config<'_>, sequence: Option<u64>) -> Result<Vec<Value>, ConfigError> {
    let hidden = config.count("n_embd", Some(768))?;
    let heads = config.count("n_head", Some(12))?;
    let vocab = config.count("vocab_size", Some(50257))?;
    for (field, refused_when) in [
        ("scale_attn_weights", false),
        ("scale_attn_by_inverse_layer_idx", true),
        ("add_cross_attention", true),
    ] {
        let default = !refused_when;
        if config.flag(field, default)? == refused_when {
            return Err(config.error(
                field,
                format!(
                    "is {refused_when}: headroom's attention scales the scores by 1 / \
                     sqrt(head_dim) alone and attends to the sequence itself; set it to {default}"
                ),
            ));
        }
    }
    let activation = match config
        .text("activation_function", Some("gelu_new"))?
        .as_str()
    {
        // NewGELU is the tanh approximation, written by hand (the same values).
        "gelu_new" | "gelu_pytorch_tanh" => json!({"gelu": {"approximate": "tanh"}}),
        "gelu" => json!({"gelu": {}}),
        "relu" => json!({"relu": {}}),
        "silu" | "swish" => json!({"silu": {}}),
        "tanh" => json!({"tanh": {}}),
        other => {
            return Err(config.error(
                "activation_function",
                format!(
                    "is {other:?}; headroom takes \"gelu_new\", \"gelu_pytorch_tanh\", \
                     \"gelu\", \"relu\", \"silu\" or \"tanh\""
                ),
            ))
        }
    };
    let probability = |field: &str| {
        let p = config.number(field, Some(0.1))?;
        match (0.0..1.0).contains(&p) {
            true => Ok(p),
            false => Err(config.error(field, format!("must be in [0, 1), got {p}"))),
        }
    };
    let dropout = |p: f64| json!({"dropout": {"p": p}});
    let (embedded, attended, residual) = (
        probability("embd_pdrop")?,
        probability("attn_pdrop")?,
        probability("resid_pdrop")?,
    );
    let norm = json!({"layer_norm": {"eps": config.number("layer_norm_epsilon", Some(1e-5))?}});
    let inner = config.count("n_inner", Some(4 * hidden))?;
    let attention = json!({"self_attention": {
        "num_heads": heads, "causal": true, "dropout": attended
    }});
    let block = [
        json!({"residual": {"layers": [norm, attention, dropout(residual)]}}),
        json!({"residual": {"layers": [
            norm,
            {"linear": {"out_features": inner}},
            activation,
            {"linear": {"out_features": hidden}},
            dropout(residual)
        ]}}),
    ];
    let depth = config.count("n_layer", Some(12))?;
    // A layer is ten of a list's layers (blocks of three and five), around five more.
    let deepest = (crate::modules::MAX_LAYERS as u64 - 5) / 10;
    if depth > deepest {
        return Err(config.error(
            "n_layer",
            format!(
                "must be at most {deepest} (each is ten of a model's at most {} layers)",
                crate::modules::MAX_LAYERS
            ),
        ));
    }
    let positions = config.count("n_positions", Some(1024))?;
    if let Some(sequence) = sequence.filter(|&n| n > positions) {
        return Err(ConfigError::new(
            "model.tokens.sequence_length",
            format!("is {sequence}, and GPT-2 places at most n_positions ({positions}) tokens"),
        ));
    }
    let tied = config.flag("tie_word_embeddings", true)?;
    Ok([
        json!({"embedding": {"embedding_dim": hidden}}),
        json!({"positional_embedding": {"max_positions": positions}}),
        dropout(embedded),
    ]
    .into_iter()
    .chain((0..depth).flat_map(|_| block.clone()))
    .chain([
        norm.clone(),
        json!({"linear": {"out_features": vocab, "bias": false, "tied": tied}}),
    ])
    .collect())
}

/// A config's fields, read with errors that name them.
struct Config<'a>(&'a Map<String, Value>);

impl Config<'_> {
    /// Refuses a sliding window: it makes Hugging Face pass SDPA a mask, which leaves the fused
    /// path headroom models.
    fn refuse_sliding_window(&self, family: Family) -> Result<(), ConfigError> {
        let reason = |what: String| {
            format!(
                "{what}: a sliding window makes Hugging Face pass SDPA a mask, which leaves the \
                 fused path headroom models"
            )
        };
        if family == Family::Llama {
            if let Some(window) = self.optional_count("sliding_window")? {
                let why = reason(format!("is {window}"));
                return Err(self.error("sliding_window", format!("{why}; set it to null")));
            }
            return Ok(());
        }
        if self.flag("use_sliding_window", false)? {
            let why = reason("is true".into());
            return Err(self.error("use_sliding_window", format!("{why}; set it to false")));
        }
        let sliding = match self.0.get("layer_types") {
            Some(Value::Array(types)) => types.iter().any(|t| t == "sliding_attention"),
            _ => false,
        };
        if sliding {
            let why = reason("names \"sliding_attention\"".into());
            return Err(self.error("layer_types", format!("{why}; use \"full_attention\"")));
        }
        Ok(())
    }

    fn error(&self, name: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(format!("{FIELD}.{name}"), reason)
    }

    /// A positive whole number; `default` when absent (or null), else required.
    fn count(&self, name: &str, default: Option<u64>) -> Result<u64, ConfigError> {
        match (self.optional_count(name)?, default) {
            (Some(n), _) | (None, Some(n)) => Ok(n),
            (None, None) => Err(self.error(name, "is required")),
        }
    }

    fn optional_count(&self, name: &str) -> Result<Option<u64>, ConfigError> {
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

    fn number(&self, name: &str, default: Option<f64>) -> Result<f64, ConfigError> {
        match (self.0.get(name), default) {
            (None | Some(Value::Null), Some(d)) => Ok(d),
            (None | Some(Value::Null), None) => Err(self.error(name, "is required")),
            (Some(value), _) => value
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| self.error(name, format!("must be a number, got {value}"))),
        }
    }

    fn flag(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(value) => Err(self.error(name, format!("must be true or false, got {value}"))),
        }
    }

    fn text(&self, name: &str, default: Option<&str>) -> Result<String, ConfigError> {
        match (self.0.get(name), default) {
            (Some(Value::String(s)), _) => Ok(s.clone()),
            (None | Some(Value::Null), Some(d)) => Ok(d.to_string()),
            (None | Some(Value::Null), None) => Err(self.error(name, "is required")),
            (Some(value), _) => Err(self.error(name, format!("must be a string, got {value}"))),
        }
    }

    /// `rope_theta`, or `rope_parameters.rope_theta` (newer configs); 10,000 when neither.
    fn rope_theta(&self) -> Result<f64, ConfigError> {
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
        assert_eq!(layers[6]["linear"]["tied"], false);
        assert!(model.contains_key("huggingface"));
    }
}
