//! The Vision Transformer (`vit`, `ViTForImageClassification`) as a layer list.

use serde_json::{json, Value};

use super::{Config, ConfigError, Input, Made};

/// ViT's image classifier: the patch embedding (the strided convolution, the class token and
/// learned positions) and its dropout, per layer a pre-norm block of layer norm, attention
/// (`qkv_bias` on the query, key and value projections, a bias on the output's) and dropout,
/// and one of layer norm, the MLP and dropout; the final layer norm, the class token and the
/// classifier, over the config's image; its classes are `id2label`'s labels, else
/// `num_labels`, else transformers' default of 2.
pub(super) fn layers(config: &Config<'_>) -> Result<Made, ConfigError> {
    let hidden = config.count("hidden_size", Some(768))?;
    let heads = config.count("num_attention_heads", Some(12))?;
    let side = config.side("image_size", 224)?;
    let patch = config.side("patch_size", 16)?;
    let channels = config.count("num_channels", Some(3))?;
    let activation = config.activation("hidden_act", "gelu")?;
    let hidden_dropout = config.probability("hidden_dropout_prob", 0.0)?;
    let dropout = |p: f64| (p > 0.0).then(|| json!({"dropout": {"p": p}}));
    let attention = json!({"self_attention": {
        "num_heads": heads,
        "bias": config.flag("qkv_bias", true)?,
        "output_bias": true,
        "dropout": config.probability("attention_probs_dropout_prob", 0.0)?,
        "implementation": config.attention_implementation()?,
    }});
    let norm = json!({"layer_norm": {"eps": config.number("layer_norm_eps", Some(1e-12))?}});
    let mlp = [
        norm.clone(),
        json!({"linear": {"out_features": config.count("intermediate_size", Some(3072))?}}),
        activation,
        json!({"linear": {"out_features": hidden}}),
    ];
    let block = |body: Vec<Value>| {
        let body: Vec<Value> = body.into_iter().chain(dropout(hidden_dropout)).collect();
        json!({"residual": {"layers": body}})
    };
    let pair = [block(vec![norm.clone(), attention]), block(mlp.to_vec())];
    // A layer is at most eleven of a list's layers, around five more.
    let depth = config.depth("num_hidden_layers", Some(12), 11, 5)?;
    let classes = match config.0.get("id2label") {
        Some(Value::Object(labels)) if !labels.is_empty() => labels.len() as u64,
        _ => config.count("num_labels", Some(2))?,
    };
    let layers = std::iter::once(json!({"patch_embedding": {
        "embedding_dim": hidden, "patch_size": patch
    }}))
    .chain(dropout(hidden_dropout))
    .chain((0..depth).flat_map(|_| pair.clone()))
    .chain([
        norm,
        json!({"first_token": {}}),
        json!({"linear": {"out_features": classes}}),
    ])
    .collect();
    Ok((layers, Input::Image([channels, side, side]), classes))
}
