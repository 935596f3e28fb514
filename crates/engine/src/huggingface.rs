//! A Hugging Face `config.json` as a job's model: `"model": {"huggingface": {...}, "tokens":
//! {"sequence_length": 2048}}` is read as the layer list the architecture is made of, in
//! PyTorch's modules: for the Llama family (`model_type` `llama`, `mistral`), the token
//! embedding, per decoder layer a pre-norm block of RMS norm and grouped-query causal attention
//! with rotary embedding and one of RMS norm and the gated MLP, the final norm, and the head
//! (tied to the embedding with `tie_word_embeddings`). `vocab_size` and the logits come from the
//! config. What the list cannot say is refused by field: attention dropout, a sliding window
//! shorter than the sequence, an activation the gated MLP does not take, another architecture.
//!
//! The list describes the architecture as PyTorch's own modules train it (`nn.RMSNorm`'s fused
//! kernel); Hugging Face's `LlamaRMSNorm` computes by hand in f32 and saves more.

use serde_json::{json, Map, Value};

use crate::job::JobError;
use crate::modules::LayerSpec;

/// Where the config is in a job.
const FIELD: &str = "model.huggingface";

/// Writes the layer list, vocabulary and classes `model.huggingface` describes into a job's
/// `model` (the config stays, as the record of where they came from); a model without it is
/// left as it is. A layer list given beside the config must be the config's own (a job this
/// wrote, sent again).
pub fn expand(model: &mut Map<String, Value>) -> Result<(), JobError> {
    let Some(config) = model.get("huggingface") else {
        return Ok(());
    };
    let Value::Object(config) = config.clone() else {
        return Err(JobError::new(
            FIELD,
            "must be a Hugging Face config.json object",
        ));
    };
    for field in ["hidden_layers", "input_shape", "activation"] {
        let given = model
            .get(field)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()));
        if given {
            return Err(JobError::new(
                format!("model.{field}"),
                "model.huggingface describes the model: give the config or the model's fields, \
                 not both",
            ));
        }
    }
    let config = Config(&config);
    let model_type = config.text("model_type", None)?;
    let layers = match model_type.as_str() {
        "llama" | "mistral" => llama_layers(&config)?,
        other => {
            return Err(JobError::new(
                format!("{FIELD}.model_type"),
                format!(
                    "headroom reads the Llama family (\"llama\", \"mistral\"), not {other:?}; \
                     write its layer list as model.layers instead"
                ),
            ))
        }
    };
    let vocab = config.count("vocab_size", None)?;
    let Some(Value::Object(tokens)) = model.get_mut("tokens") else {
        return Err(JobError::new(
            "model.tokens",
            "a model read from model.huggingface trains on token ids: give \
             {\"tokens\": {\"sequence_length\": N}} (vocab_size comes from the config)",
        ));
    };
    if let Some(given) = tokens.get("vocab_size").filter(|&v| *v != json!(vocab)) {
        return Err(JobError::new(
            "model.tokens.vocab_size",
            format!("is {given}, and the config's vocab_size is {vocab}: leave it out"),
        ));
    }
    tokens.insert("vocab_size".into(), json!(vocab));
    if let Some(given) = model.get("num_classes").filter(|&v| *v != json!(vocab)) {
        return Err(JobError::new(
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
        return Err(JobError::new(
            "model.layers",
            "model.huggingface describes the model: give the config or the layer list, not both",
        ));
    }
    model.insert("layers".into(), layers);
    Ok(())
}

/// Whether `given` is the layer list `made` says, as layers (defaults written out or not).
fn same_layers(given: &Value, made: &Value) -> bool {
    let read = |v: &Value| serde_json::from_value::<Vec<LayerSpec>>(v.clone()).ok();
    read(given).is_some_and(|given| Some(given) == read(made))
}

/// The Llama family's layer list.
fn llama_layers(config: &Config<'_>) -> Result<Vec<Value>, JobError> {
    let hidden = config.count("hidden_size", None)?;
    let heads = config.count("num_attention_heads", None)?;
    let vocab = config.count("vocab_size", None)?;
    let eps = config.number("rms_norm_eps", Some(1e-6))?;
    let dropout = config.number("attention_dropout", Some(0.0))?;
    if dropout != 0.0 {
        return Err(JobError::new(
            format!("{FIELD}.attention_dropout"),
            format!(
                "is {dropout}; attention dropout is not a layer kind yet (on SDPA's fused path it \
                 keeps no mask, so 0 gives the same memory): set it to 0"
            ),
        ));
    }
    if let Some(window) = config.optional_count("sliding_window")? {
        return Err(JobError::new(
            format!("{FIELD}.sliding_window"),
            format!(
                "is {window}: a sliding window makes Hugging Face pass SDPA a mask, which leaves \
                 the fused path headroom models; set it to null"
            ),
        ));
    }
    let activation = config.text("hidden_act", Some("silu"))?;
    if !["silu", "gelu", "gelu_pytorch_tanh", "relu"].contains(&activation.as_str()) {
        return Err(JobError::new(
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
        "bias": config.flag("attention_bias", false)?,
        "rope_theta": config.rope_theta()?,
    });
    if let Some(head_dim) = config.optional_count("head_dim")? {
        attention["head_dim"] = json!(head_dim);
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
    if depth > crate::modules::MAX_LAYERS as u64 {
        return Err(JobError::new(
            format!("{FIELD}.num_hidden_layers"),
            format!("must be at most {}", crate::modules::MAX_LAYERS),
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

/// A config's fields, read with errors that name them.
struct Config<'a>(&'a Map<String, Value>);

impl Config<'_> {
    fn error(&self, name: &str, reason: impl Into<String>) -> JobError {
        JobError::new(format!("{FIELD}.{name}"), reason)
    }

    /// A positive whole number; `default` when absent (or null), else required.
    fn count(&self, name: &str, default: Option<u64>) -> Result<u64, JobError> {
        match (self.optional_count(name)?, default) {
            (Some(n), _) | (None, Some(n)) => Ok(n),
            (None, None) => Err(self.error(name, "is required")),
        }
    }

    fn optional_count(&self, name: &str) -> Result<Option<u64>, JobError> {
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

    fn number(&self, name: &str, default: Option<f64>) -> Result<f64, JobError> {
        match (self.0.get(name), default) {
            (None | Some(Value::Null), Some(d)) => Ok(d),
            (None | Some(Value::Null), None) => Err(self.error(name, "is required")),
            (Some(value), _) => value
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| self.error(name, format!("must be a number, got {value}"))),
        }
    }

    fn flag(&self, name: &str, default: bool) -> Result<bool, JobError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(value) => Err(self.error(name, format!("must be true or false, got {value}"))),
        }
    }

    fn text(&self, name: &str, default: Option<&str>) -> Result<String, JobError> {
        match (self.0.get(name), default) {
            (Some(Value::String(s)), _) => Ok(s.clone()),
            (None | Some(Value::Null), Some(d)) => Ok(d.to_string()),
            (None | Some(Value::Null), None) => Err(self.error(name, "is required")),
            (Some(value), _) => Err(self.error(name, format!("must be a string, got {value}"))),
        }
    }

    /// `rope_theta`, or `rope_parameters.rope_theta` (newer configs); 10,000 when neither.
    fn rope_theta(&self) -> Result<f64, JobError> {
        match self.0.get("rope_parameters") {
            Some(Value::Object(parameters)) => Config(parameters)
                .number("rope_theta", Some(10_000.0))
                .map_err(|e| {
                    JobError::new(
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
    use crate::job::Job;

    /// SmolLM2-135M's config.json, as the Hub serves it (fields headroom does not read kept).
    fn smollm2() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
            "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
            "intermediate_size": 1536, "is_llama_config": true, "max_position_embeddings": 8192,
            "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
            "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "transformers_version": "4.40.1", "use_cache": true, "vocab_size": 49152
        })
    }

    fn job(config: Value) -> Result<Job, JobError> {
        Job::from_value(json!({
            "model": {"huggingface": config, "tokens": {"sequence_length": 2048}},
            "optimizer": {"name": "adamw", "learning_rate": 0.003},
            "precision": "bf16-mixed"
        }))
    }

    #[test]
    fn smollm2_s_config_is_the_example_s_layer_list() {
        let from_config = job(smollm2()).unwrap();
        assert_eq!(from_config.plan().parameter_count(), 134_515_008);
        let example: Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/smollm2-135m.json"
        )))
        .unwrap();
        let example = Job::from_value(example).unwrap();
        let (read, written) = (&from_config.spec().model, &example.spec().model);
        assert!(read.layers == written.layers, "the layer lists differ");
        assert_eq!(
            (read.tokens, read.num_classes),
            (written.tokens, written.num_classes)
        );
    }

    #[test]
    fn what_the_list_cannot_say_is_refused_by_field() {
        let with = |field: &str, value: Value| {
            let mut config = smollm2();
            config[field] = value;
            job(config).unwrap_err()
        };
        let cases = [
            (
                "attention_dropout",
                json!(0.1),
                "attention_dropout",
                "set it to 0",
            ),
            (
                "sliding_window",
                json!(4096),
                "sliding_window",
                "set it to null",
            ),
            ("hidden_act", json!("gelu_new"), "hidden_act", "\"silu\""),
            ("model_type", json!("qwen2"), "model_type", "not \"qwen2\""),
            (
                "hidden_size",
                json!(-4),
                "hidden_size",
                "positive whole number",
            ),
            (
                "num_hidden_layers",
                json!(5000),
                "num_hidden_layers",
                "at most",
            ),
        ];
        for (field, value, named, reason) in cases {
            let error = with(field, value);
            assert_eq!(error.field, format!("model.huggingface.{named}"), "{error}");
            assert!(error.reason.contains(reason), "{error}");
        }
        let mut config = smollm2();
        config.as_object_mut().unwrap().remove("hidden_size");
        assert_eq!(
            job(config).unwrap_err().field,
            "model.huggingface.hidden_size"
        );
        let no_tokens = Job::from_value(json!({
            "model": {"huggingface": smollm2()}, "optimizer": {"name": "sgd"}
        }));
        assert_eq!(no_tokens.unwrap_err().field, "model.tokens");
        let classes = Job::from_value(json!({
            "model": {"huggingface": smollm2(), "tokens": {"sequence_length": 8},
                      "num_classes": 10},
            "optimizer": {"name": "sgd"}
        }));
        assert_eq!(classes.unwrap_err().field, "model.num_classes");
        let agreeing = Job::from_value(json!({
            "model": {"huggingface": smollm2(),
                      "tokens": {"sequence_length": 8, "vocab_size": 49152},
                      "num_classes": 49152},
            "optimizer": {"name": "sgd"}
        }));
        assert!(agreeing.is_ok());
        let both = Job::from_value(json!({
            "model": {"huggingface": smollm2(), "tokens": {"sequence_length": 8},
                      "layers": []},
            "optimizer": {"name": "sgd"}
        }));
        assert_eq!(both.unwrap_err().field, "model.layers");
        // A job as headroom writes it back (the config and its list) reads the same.
        let written = serde_json::to_value(job(smollm2()).unwrap().spec()).unwrap();
        let again = Job::from_value(written).unwrap();
        assert_eq!(again.plan().parameter_count(), 134_515_008);
    }

    #[test]
    fn an_untied_llama_with_its_own_head_width_and_newer_rope_parameters() {
        let mut config = smollm2();
        config["tie_word_embeddings"] = json!(false);
        config["head_dim"] = json!(32);
        config["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "default"});
        let plan = job(config).unwrap();
        let layers = plan.spec().model.layers.as_ref().unwrap();
        let attention = serde_json::to_value(&layers[1]).unwrap();
        let attention = &attention["residual"]["layers"][1]["self_attention"];
        assert_eq!(attention["head_dim"], 32);
        assert_eq!(attention["rope_theta"], 500000.0);
        // The untied head is a second vocab x hidden matrix.
        assert!(plan.plan().parameter_count() > 134_515_008);
    }
}
