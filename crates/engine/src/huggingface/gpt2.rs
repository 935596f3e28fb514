//! GPT-2 (`gpt2`) as a layer list.

use serde_json::json;

use super::{language_model, Config, ConfigError, Made};

/// GPT-2's layer list: token and learned position embeddings and their dropout, per layer a
/// pre-norm block of layer norm, causal attention with bias (`c_attn`'s query, key and value,
/// one projection split in three; `c_proj`) and dropout, and one of layer norm, the MLP (`c_fc`, the activation, `c_proj`) and
/// dropout; the final layer norm and the head, tied to the token embedding unless
/// `tie_word_embeddings` is false. `Conv1D`'s weights are stored transposed, the same numbers.
pub(super) fn layers(config: &Config<'_>, sequence: Option<u64>) -> Result<Made, ConfigError> {
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
    let activation = config.activation("activation_function", "gelu_new")?;
    let dropout = |p: f64| json!({"dropout": {"p": p}});
    let (embedded, attended, residual) = (
        config.probability("embd_pdrop", 0.1)?,
        config.probability("attn_pdrop", 0.1)?,
        config.probability("resid_pdrop", 0.1)?,
    );
    let norm = json!({"layer_norm": {"eps": config.number("layer_norm_epsilon", Some(1e-5))?}});
    let inner = config.count("n_inner", Some(4 * hidden))?;
    let attention = json!({"self_attention": {
        "num_heads": heads, "causal": true, "dropout": attended, "fused_qkv": true,
        "upcast_softmax": false,
        "implementation": config.attention_implementation()?,
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
    // A layer is ten of a list's layers (blocks of three and five), around five more.
    let depth = config.depth("n_layer", Some(12), 10, 5)?;
    let positions = config.count("n_positions", Some(1024))?;
    if let Some(sequence) = sequence.filter(|&n| n > positions) {
        return Err(ConfigError::new(
            "model.tokens.sequence_length",
            format!("is {sequence}, and GPT-2 places at most n_positions ({positions}) tokens"),
        ));
    }
    let tied = config.flag("tie_word_embeddings", true)?;
    let front = vec![
        json!({"embedding": {"embedding_dim": hidden}}),
        json!({"positional_embedding": {"max_positions": positions}}),
        dropout(embedded),
    ];
    Ok(language_model(front, (&block, depth), norm, vocab, tied))
}
