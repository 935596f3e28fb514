//! The Llama family's decoders (`llama`, `mistral`, `qwen2`) as layer lists.

use serde_json::{json, Value};

use super::{language_model, Config, ConfigError, Made};

/// The decoders of the Llama family: where they differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    /// Llama and Mistral: the projections' bias from `attention_bias`, a `sliding_window`
    /// whenever one is given.
    Llama,
    /// Qwen2: a bias on the query, key and value projections, none on the output's; its
    /// `sliding_window` applies only with `use_sliding_window` (or sliding `layer_types`).
    Qwen2,
}

/// The layer list of a decoder of the Llama family.
pub(super) fn layers(config: &Config<'_>, family: Family) -> Result<Made, ConfigError> {
    let hidden = config.count("hidden_size", None)?;
    let heads = config.count("num_attention_heads", None)?;
    let vocab = config.count("vocab_size", None)?;
    let eps = config.number("rms_norm_eps", Some(1e-6))?;
    let dropout = config.probability("attention_dropout", 0.0)?;
    refuse_sliding_window(config, family)?;
    let activation = config.text("hidden_act", Some("silu"))?;
    if !["silu", "gelu", "gelu_pytorch_tanh", "relu"].contains(&activation.as_str()) {
        return Err(config.error(
            "hidden_act",
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
        "implementation": config.attention_implementation()?,
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
    let norm = json!({"rms_norm": {"eps": eps, "implementation": "composite"}});
    let mlp = json!({"gated_mlp": {
        "intermediate_size": config.count("intermediate_size", None)?,
        "activation": activation,
        "bias": config.flag("mlp_bias", false)?,
    }});
    let block = [
        json!({"residual": {"layers": [norm, {"self_attention": attention}]}}),
        json!({"residual": {"layers": [norm, mlp]}}),
    ];
    // A decoder layer is six of a list's layers (two blocks of two), around three more.
    let depth = config.depth("num_hidden_layers", None, 6, 3)?;
    let tied = config.flag("tie_word_embeddings", false)?;
    let embedding = json!({"embedding": {"embedding_dim": hidden}});
    Ok(language_model(
        vec![embedding],
        (&block, depth),
        norm,
        vocab,
        tied,
    ))
}

/// Refuses a sliding window: it makes Hugging Face pass SDPA a mask, which leaves the fused
/// path headroom models.
fn refuse_sliding_window(config: &Config<'_>, family: Family) -> Result<(), ConfigError> {
    let reason = |what: String| {
        format!(
            "{what}: a sliding window makes Hugging Face pass SDPA a mask, which leaves the \
             fused path headroom models"
        )
    };
    if family == Family::Llama {
        if let Some(window) = config.optional_count("sliding_window")? {
            let why = reason(format!("is {window}"));
            return Err(config.error("sliding_window", format!("{why}; set it to null")));
        }
        return Ok(());
    }
    if config.flag("use_sliding_window", false)? {
        let why = reason("is true".into());
        return Err(config.error("use_sliding_window", format!("{why}; set it to false")));
    }
    let sliding = match config.0.get("layer_types") {
        Some(Value::Array(types)) => types.iter().any(|t| t == "sliding_attention"),
        _ => false,
    };
    if sliding {
        let why = reason("names \"sliding_attention\"".into());
        return Err(config.error("layer_types", format!("{why}; use \"full_attention\"")));
    }
    Ok(())
}
