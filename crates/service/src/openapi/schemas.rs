//! The JSON schemas of the engine's types, as the API documents them. The engine knows nothing
//! of OpenAPI, so each of its types that crosses the API has its schema here, written with the
//! same members and serde rules; `tests::every_schema_matches_what_the_engine_writes` holds
//! each one to the JSON the engine's type actually reads and writes.

#![allow(dead_code)] // The types describe JSON; nothing constructs them.

use serde::Serialize;
use utoipa::ToSchema;

/// A tuning job as written in JSON; the service validates it into a job it can run.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Job)]
pub struct JobSpec {
    /// The network to train.
    model: ModelSpec,
    /// The optimizer whose state takes device memory.
    optimizer: OptimizerSpec,
    /// How values are stored and computed, in PyTorch Lightning's words: `32-true` (default),
    /// `bf16-mixed`, `16-mixed` or `bf16-true`.
    #[serde(default)]
    precision: Precision,
    /// Whose training step the answer describes: `pytorch` (default), PyTorch's own order of
    /// allocations and frees and its optimizers' temporaries, or `headroom`, headroom's kernels
    /// with every buffer held for the whole step.
    #[serde(default)]
    framework: Framework,
    /// The older way to say `32-true`: `"dtype": "f32"`. A validated job never carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(deprecated)]
    dtype: Option<Dtype>,
    /// Number of samples in the training set; the batch never grows past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 9007199254740992_u64)]
    dataset_size: Option<u64>,
    /// Share of the largest batch that the recommended batch uses, in (0, 1].
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    headroom: f64,
    /// How the search probes the device.
    #[serde(default)]
    search: SearchSpec,
    /// The global batch the training recipe wants; the answer then says how to reach it with
    /// gradient accumulation across `world_size` GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1099511627776_u64)]
    target_batch_size: Option<u64>,
    /// Data-parallel GPUs the global batch is split over.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1048576, default = 1)]
    world_size: u64,
    /// How the model's state is split over those GPUs.
    #[serde(default)]
    sharding: Sharding,
    /// With `fsdp`: whether each block's `fully_shard` lets its gathered parameters go after
    /// its forward (PyTorch's default) or, `false`, keeps them to its backward (ZeRO-2's
    /// memory). The model's own keeps its parameters either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = true)]
    reshard_after_forward: Option<bool>,
}

/// How a job's model state is split over its `world_size` GPUs.
#[derive(Serialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Each GPU holds the whole model, its gradients and optimizer state.
    #[default]
    None,
    /// PyTorch's FSDP2: `fully_shard` on each decoder layer (a Hugging Face config's) or each
    /// top-level residual block or checkpoint (a layer list's), then on the model; at least 2
    /// GPUs, the `pytorch` framework, checkpoints only at the top of the list, no f32 LoRA
    /// adapters in a `bf16-true` model. The answer is one GPU's.
    Fsdp,
}

/// A size along one dimension, or a layer's width: at least 1.
pub struct Extent;

impl utoipa::PartialSchema for Extent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1))
            .maximum(Some(headroom_engine::job::MAX_DIMENSION))
            .description(Some(
                "A size along one dimension, or a layer's width: at least 1, at most 2^32.",
            ))
            .into()
    }
}

impl ToSchema for Extent {}

/// An MLP: flatten the input, then `Linear -> activation` per hidden width, then `Linear -> classes`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Shape of one sample, any rank, e.g. `[3, 32, 32]`; absent when a sample is `tokens`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(min_items = 1, value_type = Vec<Extent>)]
    input_shape: Vec<u64>,
    /// A sample as a sequence of token ids (int64) instead of values: `layers` then starts with
    /// an `embedding`, and the batch size counts sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens: Option<Tokens>,
    /// Widths of the hidden layers, possibly none.
    #[serde(default)]
    #[schema(value_type = Vec<Extent>)]
    hidden_layers: Vec<u64>,
    /// Number of output classes of the softmax cross-entropy loss, taken over the logits' last
    /// dimension: one label a sample (`[num_classes]` logits), or one a position
    /// (`[sequence_length, num_classes]`: a language model's, its vocabulary).
    #[schema(minimum = 2, maximum = 4294967296_u64)]
    num_classes: u64,
    /// Activation after every hidden layer (the shorthand; relu when not given).
    #[serde(default)]
    activation: Option<Activation>,
    /// The model as layers in PyTorch's `torch.nn` names, instead of `hidden_layers` and
    /// `activation`, in any order PyTorch runs. Every shape is checked (a 422 names the layer's
    /// index and field). At most 1,000 layers, residual blocks' own counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layers: Option<Vec<Layer>>,
    /// LoRA, as peft's `LoraConfig`: every parameter of the model frozen, adapters of rank `r`
    /// beside the linear layers `target_modules` names, trained in f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora: Option<Lora>,
    /// A Hugging Face `config.json` (`model_type` `llama`, `mistral`, `qwen2`, `gpt2` or
    /// `vit`), read as its layer list instead of `layers`: a language model needs
    /// `tokens.sequence_length`; `vocab_size`, `input_shape` and `num_classes` come from the
    /// config (given, they must agree with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    huggingface: Option<serde_json::Value>,
    /// Activation checkpointing as `gradient_checkpointing_enable()` does it: every decoder
    /// layer of `huggingface`, or every top-level `residual` block of `layers`, run as a
    /// `checkpoint` (the answer's job shows them); a model with no block is refused (422).
    #[serde(default)]
    #[schema(default = false)]
    gradient_checkpointing: bool,
    /// The parameters the model is known to have (PyTorch's `sum(p.numel() for p in
    /// model.parameters())`): a model described with another count is refused (422).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameter_count: Option<u64>,
}

/// peft's `LoraConfig` (a 422 names a bad field, or a target no layer has).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    /// The adapters' rank.
    #[serde(default)]
    #[schema(default = 8, minimum = 1, maximum = 4294967296_u64)]
    r: u64,
    /// The update is scaled by `lora_alpha / r`.
    #[serde(default)]
    #[schema(default = 8.0, exclusive_minimum = 0.0)]
    lora_alpha: f64,
    /// Dropout on each adapter's input, in [0, 1).
    #[serde(default)]
    #[schema(default = 0.0, minimum = 0.0, exclusive_maximum = 1.0)]
    lora_dropout: f64,
    /// The linear layers adapted: among `q_proj`, `k_proj`, `v_proj`, `o_proj` (self-attention),
    /// `gate_proj`, `up_proj`, `down_proj` (gated MLP) and `linear` (the list's own linear
    /// layers), the model's head excepted; or `"all-linear"`.
    #[serde(default)]
    #[schema(default = json!(["q_proj", "v_proj"]))]
    target_modules: TargetModules,
}

/// LoRA's targets: names, or one (`"all-linear"`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names of linear layers.
    Names(Vec<String>),
    /// `"all-linear"`, or one name.
    One(String),
}

/// A sample of token ids.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Tokens a sequence.
    #[schema(value_type = Extent)]
    sequence_length: u64,
    /// Token ids are below it (the embedding's `num_embeddings`).
    #[schema(value_type = Extent)]
    vocab_size: u64,
}

/// One layer: an object of one member, the layer's name in PyTorch's `torch.nn` holding its
/// arguments (PyTorch's defaults), e.g. `{"conv2d": {"out_channels": 6, "kernel_size": 5,
/// "padding": 2}}`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// `nn.Conv2d`, square kernel, input channels inferred.
    Conv2d(Conv2d),
    /// `nn.MaxPool2d`.
    MaxPool2d(MaxPool2d),
    /// `nn.AvgPool2d`.
    AvgPool2d(AvgPool2d),
    /// `nn.AdaptiveAvgPool2d`.
    AdaptiveAvgPool2d(AdaptiveAvgPool2d),
    /// `nn.AdaptiveAvgPool2d(1)` then flatten.
    GlobalAvgPool2d(NoArguments),
    /// `nn.BatchNorm2d` in training mode, channels inferred.
    BatchNorm2d(BatchNorm),
    /// `nn.BatchNorm1d` in training mode, over `[features]` or `[channels, length]`.
    BatchNorm1d(BatchNorm),
    /// `nn.Dropout`.
    Dropout(Dropout),
    /// `nn.Embedding` over `model.tokens`: the first layer of a model over token ids.
    Embedding(Embedding),
    /// A learned positional embedding added to a `[positions, features]` sample (GPT-2's
    /// `wpe`).
    PositionalEmbedding(PositionalEmbedding),
    /// `nn.Flatten`.
    Flatten(NoArguments),
    /// `x[:, 0]`: the first position of a `[positions, features]` sample.
    FirstToken(NoArguments),
    /// `x.mean(dim=1)`: the mean over the positions of a `[positions, features]` sample.
    MeanPool(NoArguments),
    /// A ViT's patch embedding: patches as tokens after a class token, positions added.
    PatchEmbedding(PatchEmbedding),
    /// `nn.Identity`.
    Identity(NoArguments),
    /// `down(act(gate(x)) * up(x))` over the last dimension: Llama's MLP (SwiGLU).
    GatedMlp(GatedMlp),
    /// `nn.LayerNorm` over the last dimension, features inferred; f32 under autocast.
    LayerNorm(LayerNorm),
    /// `nn.RMSNorm` over the last dimension, features inferred; fused (input, f32 rstd and
    /// weight saved).
    RmsNorm(RmsNorm),
    /// `nn.Linear` over the last dimension, input features inferred.
    Linear(Linear),
    /// `nn.ReLU`.
    Relu(InPlace),
    /// `nn.ReLU6`.
    Relu6(InPlace),
    /// `nn.LeakyReLU`.
    LeakyRelu(LeakyRelu),
    /// `nn.GELU`.
    Gelu(Gelu),
    /// `nn.Tanh`.
    Tanh(NoArguments),
    /// `nn.Sigmoid`.
    Sigmoid(NoArguments),
    /// `nn.SiLU`.
    Silu(NoArguments),
    /// `body(x) + shortcut(x)`: its layers' output added to its shortcut's (the identity unless
    /// given).
    Residual(Residual),
    /// Its layers with their parameters frozen (`requires_grad_(False)`): no gradient, no
    /// optimizer state; a fine-tuned model's backbone. A head tied to a frozen embedding is
    /// frozen with it.
    Frozen(Frozen),
    /// Its layers under activation checkpointing (`torch.utils.checkpoint`, non-reentrant):
    /// the region's input kept, its activations recomputed in backward. Not nested; the
    /// `pytorch` framework only.
    Checkpoint(Checkpoint),
    /// Multi-head self-attention over a `[positions, features]` sample: query, key, value and
    /// output projections around fused scaled dot-product attention.
    SelfAttention(SelfAttention),
}

/// A layer without arguments: `{}`.
#[derive(Serialize, ToSchema)]
pub struct NoArguments {}

/// `nn.Conv2d`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct Conv2d {
    /// Output channels.
    #[schema(minimum = 1, maximum = 4294967296_u64)]
    out_channels: u64,
    /// Side of the square kernel.
    #[schema(minimum = 1, maximum = 4294967296_u64)]
    kernel_size: u64,
    /// Step between applications.
    #[serde(default)]
    #[schema(default = 1, minimum = 1, maximum = 4294967296_u64)]
    stride: u64,
    /// Zeros added on every side.
    #[serde(default)]
    #[schema(default = 0, maximum = 4294967296_u64)]
    padding: u64,
    /// Spacing between the kernel's taps.
    #[serde(default)]
    #[schema(default = 1, minimum = 1, maximum = 4294967296_u64)]
    dilation: u64,
    /// Groups of channels (as many as the channels: depthwise); divides both channel counts.
    #[serde(default)]
    #[schema(default = 1, minimum = 1, maximum = 4294967296_u64)]
    groups: u64,
    /// Whether a bias is learnt.
    #[serde(default)]
    #[schema(default = true)]
    bias: bool,
}

/// `nn.MaxPool2d`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct MaxPool2d {
    /// Side of the square window.
    #[schema(minimum = 1, maximum = 4294967296_u64)]
    kernel_size: u64,
    /// Step between windows; the kernel size when not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 4294967296_u64)]
    stride: Option<u64>,
    /// Padding on every side, at most half the (dilated) window.
    #[serde(default)]
    #[schema(default = 0)]
    padding: u64,
    /// Spacing between the window's taps.
    #[serde(default)]
    #[schema(default = 1, minimum = 1, maximum = 4294967296_u64)]
    dilation: u64,
    /// Round the output's sides up.
    #[serde(default)]
    #[schema(default = false)]
    ceil_mode: bool,
}

/// `nn.AvgPool2d`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct AvgPool2d {
    /// Side of the square window.
    #[schema(minimum = 1, maximum = 4294967296_u64)]
    kernel_size: u64,
    /// Step between windows; the kernel size when not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 4294967296_u64)]
    stride: Option<u64>,
    /// Padding on every side, at most half the window.
    #[serde(default)]
    #[schema(default = 0)]
    padding: u64,
    /// Round the output's sides up.
    #[serde(default)]
    #[schema(default = false)]
    ceil_mode: bool,
    /// Whether the padding counts in a window's divisor.
    #[serde(default)]
    #[schema(default = true)]
    count_include_pad: bool,
}

/// `nn.AdaptiveAvgPool2d`'s argument.
#[derive(Serialize, ToSchema)]
pub struct AdaptiveAvgPool2d {
    /// The output's side, or its `[height, width]`.
    output_size: OutputSize,
}

/// An adaptive pooling's output size.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum OutputSize {
    /// A square output, of this side (at least 1).
    Side(u64),
    /// `[height, width]`.
    Sides([u64; 2]),
}

/// `nn.BatchNorm2d`'s and `nn.BatchNorm1d`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct BatchNorm {
    /// Whether a scale and shift are learnt.
    #[serde(default)]
    #[schema(default = true)]
    affine: bool,
    /// Added to the variance.
    #[serde(default)]
    #[schema(default = 1e-5, exclusive_minimum = 0.0)]
    eps: f64,
    /// The weight of a step's statistics in the running ones.
    #[serde(default)]
    #[schema(default = 0.1, minimum = 0.0, maximum = 1.0)]
    momentum: f64,
}

/// `nn.Embedding`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct Embedding {
    /// Values a token is looked up as.
    #[schema(value_type = Extent)]
    embedding_dim: u64,
    /// The id whose row gets no gradient; negative counts from the vocabulary's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    padding_idx: Option<i64>,
}

/// A positional embedding's argument.
#[derive(Serialize, ToSchema)]
pub struct PositionalEmbedding {
    /// Rows of the table (GPT-2's `n_positions`); the sample's positions when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Extent>)]
    max_positions: Option<u64>,
}

/// A gated MLP's arguments.
#[derive(Serialize, ToSchema)]
pub struct GatedMlp {
    /// Width of the gate and up projections.
    #[schema(minimum = 1)]
    intermediate_size: u64,
    /// The gate's activation, by Hugging Face's `hidden_act` names.
    #[serde(default)]
    #[schema(default = "silu")]
    activation: GateActivation,
    /// Whether the three projections learn a bias.
    #[serde(default)]
    #[schema(default = false)]
    bias: bool,
}

/// A patch embedding's arguments.
#[derive(Serialize, ToSchema)]
pub struct PatchEmbedding {
    /// Values a token.
    #[schema(value_type = Extent)]
    embedding_dim: u64,
    /// Side of a square patch: the convolution's kernel and stride; it divides the image.
    #[schema(value_type = Extent)]
    patch_size: u64,
}

/// Self-attention's arguments.
#[derive(Serialize, ToSchema)]
pub struct SelfAttention {
    /// Query heads.
    #[schema(value_type = Extent)]
    num_heads: u64,
    /// Key/value heads, dividing `num_heads` (grouped-query attention); `num_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Extent>)]
    num_kv_heads: Option<u64>,
    /// Values of a head, at most 256; the features over `num_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 256)]
    head_dim: Option<u64>,
    /// Whether a position attends only to itself and those before it.
    #[serde(default)]
    #[schema(default = false)]
    causal: bool,
    /// Whether the four projections learn a bias.
    #[serde(default)]
    #[schema(default = true)]
    bias: bool,
    /// Rotary position embedding's base on the queries and keys (an even `head_dim`); none
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 1.0)]
    rope_theta: Option<f64>,
    /// Whether the output projection learns a bias; `bias` when absent (Qwen2's has none
    /// beside biased query, key and value projections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_bias: Option<bool>,
    /// Dropout on the attention probabilities while training (SDPA's `dropout_p`); the fused
    /// kernels keep no mask, so it adds no memory.
    #[serde(default)]
    #[schema(minimum = 0.0, exclusive_maximum = 1.0, default = 0.0)]
    dropout: f64,
    /// How the scores are computed (Hugging Face's `attn_implementation`).
    #[serde(default)]
    implementation: AttentionImplementation,
    /// Whether the query, key and value come from one linear layer, split (GPT-2's `c_attn`):
    /// one input cast under autocast, and the three views of one tensor. Not with `rope_theta`
    /// or LoRA on the query, key or value.
    #[serde(default)]
    #[schema(default = false)]
    fused_qkv: bool,
    /// The eager path's softmax: in f32, cast back (Llama's `softmax(w, dtype=torch.float32)`),
    /// or in the scores' type (false: GPT-2's `softmax(w)`); f32 under CUDA's autocast either way.
    #[serde(default)]
    #[schema(default = true)]
    upcast_softmax: bool,
}

/// How self-attention computes its scores.
#[derive(Serialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttentionImplementation {
    /// `scaled_dot_product_attention`'s fused kernels: no `positions x positions` buffer.
    #[default]
    Sdpa,
    /// `eager_attention_forward`: the scores, their f32 softmax and its half copy materialized.
    Eager,
}

/// A gated MLP's activation.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GateActivation {
    /// SiLU (SwiGLU).
    Silu,
    /// Exact GELU.
    Gelu,
    /// GELU, tanh approximation.
    GeluPytorchTanh,
    /// ReLU.
    Relu,
}

/// `nn.LayerNorm`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct LayerNorm {
    /// Added to the variance.
    #[serde(default)]
    #[schema(default = 1e-5, exclusive_minimum = 0.0)]
    eps: f64,
    /// Whether a scale (and shift) per feature is learnt.
    #[serde(default)]
    #[schema(default = true)]
    elementwise_affine: bool,
    /// Whether the shift is learnt, when `elementwise_affine`.
    #[serde(default)]
    #[schema(default = true)]
    bias: bool,
}

/// `nn.RMSNorm`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct RmsNorm {
    /// Added to the mean square; absent, f32's machine epsilon.
    #[schema(exclusive_minimum = 0.0)]
    eps: Option<f64>,
    /// Whether a scale per feature is learnt.
    #[serde(default)]
    #[schema(default = true)]
    elementwise_affine: bool,
    /// How PyTorch computes it.
    #[serde(default)]
    implementation: RmsNormImplementation,
}

/// How an RMS norm is computed.
#[derive(Serialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum RmsNormImplementation {
    /// `nn.RMSNorm`: `F.rms_norm`, fused on CUDA.
    #[default]
    Fused,
    /// Hugging Face's `LlamaRMSNorm`: pow, mean, rsqrt and two products, in f32.
    Composite,
}

/// `nn.Dropout`'s argument.
#[derive(Serialize, ToSchema)]
pub struct Dropout {
    /// Probability of zeroing each value, in [0, 1).
    #[serde(default)]
    #[schema(default = 0.5, minimum = 0.0, exclusive_maximum = 1.0)]
    p: f64,
}

/// `nn.Linear`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct Linear {
    /// Output features.
    #[schema(minimum = 1, maximum = 4294967296_u64)]
    out_features: u64,
    /// Whether a bias is learnt.
    #[serde(default)]
    #[schema(default = true)]
    bias: bool,
    /// Whether its weights are the model's embedding table (`tie_word_embeddings`):
    /// `out_features` is then the vocabulary, and its input the embedding's width.
    #[serde(default)]
    #[schema(default = false)]
    tied: bool,
}

/// `nn.ReLU`'s and `nn.ReLU6`'s argument.
#[derive(Serialize, ToSchema)]
pub struct InPlace {
    /// Write the result over the input (refused where autograd saved the input).
    #[serde(default)]
    #[schema(default = false)]
    inplace: bool,
}

/// `nn.LeakyReLU`'s arguments.
#[derive(Serialize, ToSchema)]
pub struct LeakyRelu {
    /// The slope below zero.
    #[serde(default)]
    #[schema(default = 0.01)]
    negative_slope: f64,
    /// Write the result over the input.
    #[serde(default)]
    #[schema(default = false)]
    inplace: bool,
}

/// `nn.GELU`'s argument, and how PyTorch computes it.
#[derive(Serialize, ToSchema)]
pub struct Gelu {
    /// `none`: through the error function (exact); `tanh`: the tanh approximation.
    #[serde(default)]
    #[schema(default = "none")]
    approximate: GeluApproximation,
    /// `fused`: `nn.GELU`'s one kernel; `composite`: Hugging Face's `NewGELUActivation` (GPT-2's
    /// `gelu_new`), the tanh approximation written out in PyTorch operations, which saves four
    /// tensors the size of its input (with `approximate: tanh` only).
    #[serde(default)]
    #[schema(default = "fused")]
    implementation: GeluImplementation,
}

/// How PyTorch computes a GELU.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GeluImplementation {
    /// One kernel.
    Fused,
    /// Pow, tanh, sums and products.
    Composite,
}

/// How GELU is computed.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GeluApproximation {
    /// Exactly.
    None,
    /// By `tanh`.
    Tanh,
}

/// A residual block.
#[derive(Serialize, ToSchema)]
pub struct Residual {
    /// The body: the layers whose output is added to the shortcut's.
    #[schema(no_recursion, min_items = 1)]
    layers: Vec<Layer>,
    /// The shortcut's layers (a 1x1 strided convolution and batch norm, as ResNet's
    /// downsampling blocks); the identity when not given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    shortcut: Vec<Layer>,
    /// Add the shortcut into the body's output in place (`out += shortcut(x)`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(default = false)]
    inplace: bool,
}

/// Layers whose parameters are frozen.
#[derive(Serialize, ToSchema)]
pub struct Frozen {
    /// The layers, applied in order.
    #[schema(no_recursion, min_items = 1)]
    layers: Vec<Layer>,
}

/// Layers whose activations are recomputed in backward.
#[derive(Serialize, ToSchema)]
pub struct Checkpoint {
    /// The layers, applied in order.
    #[schema(no_recursion, min_items = 1)]
    layers: Vec<Layer>,
}

/// Optimizer and its hyper-parameters.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// Which update rule.
    name: OptimizerKind,
    /// Step size; each optimizer has its own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0)]
    learning_rate: Option<f64>,
}

/// Whose training step the answer describes.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Framework {
    /// PyTorch's: its order of allocations and frees, its optimizers' temporaries.
    Pytorch,
    /// headroom's own kernels, every buffer held for the whole step.
    Headroom,
}

/// The part of a training step in which memory peaks.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// Before the first step: parameters, optimizer state, the batch.
    Setup,
    /// The forward pass and the loss.
    Forward,
    /// Backward.
    Backward,
    /// The optimizer's update (and, for PyTorch, `zero_grad`).
    Optimizer,
}

/// The element type of older jobs: `f32` only, an alias of `"precision": "32-true"`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
}

/// How the batch size is searched.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSpec {
    /// First batch size probed by the doubling strategy.
    #[schema(minimum = 1, maximum = 9007199254740992_u64)]
    start: u64,
    /// Largest batch size ever probed.
    #[schema(minimum = 1, maximum = 9007199254740992_u64)]
    max: u64,
    /// Batch sizes are rounded to this multiple where possible.
    #[schema(minimum = 1, maximum = 1048576)]
    multiple_of: u64,
    /// Relative gap between the last fit and the first OOM at which bisection stops.
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    tolerance: f64,
    /// Training steps run per probe.
    #[schema(minimum = 1, maximum = 1000)]
    steps_per_probe: u32,
    /// A probe of two steps or more keeps stepping (up to 64 steps timed) until its timed steps
    /// add up to this many seconds: a step of a small batch is too short to time alone. 0 turns
    /// it off (0.05).
    #[schema(minimum = 0.0, maximum = 10.0)]
    min_timed_seconds: f64,
    /// Where the first probe goes.
    strategy: Strategy,
    /// The throughput knee is the smallest batch from which doubling gains less than this
    /// fraction in samples/s (0.1).
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    knee_tolerance: f64,
    /// Most probes added below the maximum to find the throughput knee.
    #[schema(maximum = 16)]
    throughput_probes: u32,
}

impl Default for SearchSpec {
    /// The engine's defaults, which the schema documents.
    fn default() -> Self {
        let engine = headroom_engine::job::SearchSpec::default();
        SearchSpec {
            start: engine.start,
            max: engine.max,
            multiple_of: engine.multiple_of,
            tolerance: engine.tolerance,
            steps_per_probe: engine.steps_per_probe,
            min_timed_seconds: engine.min_timed_seconds,
            strategy: match engine.strategy {
                headroom_engine::job::Strategy::Double => Strategy::Double,
                headroom_engine::job::Strategy::Predict => Strategy::Predict,
            },
            knee_tolerance: engine.knee_tolerance,
            throughput_probes: engine.throughput_probes,
        }
    }
}

/// Where the search starts.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Double from `start` until the first OOM, then bisect.
    Double,
    /// Probe the memory model's prediction first, then confirm and bisect around it.
    Predict,
}

/// How training stores and computes, in PyTorch Lightning's words for it.
///
/// - `32-true`: everything in f32.
/// - `bf16-mixed` and `16-mixed`, as PyTorch's autocast runs an MLP: f32 master parameters, f32
///   gradients and optimizer state; a half copy of every weight and bias for the products
///   (autocast's weight cache, remade each step); the input batch as the loader delivers it
///   (f32) plus autocast's half copy of it, which the first product reads and backward keeps;
///   products take half operands and accumulate in f32; activations saved for backward, and the
///   gradients between layers, are half; the logits are made f32 for the softmax cross-entropy,
///   and their gradient half again for backward. `16-mixed` also scales the loss as
///   `GradScaler` does: the gradients are checked for inf/NaN before the update, a step that
///   overflowed is skipped and the scale halved, and the scale doubles after
///   [`LOSS_SCALE_GROWTH_INTERVAL`] clean steps.
/// - `bf16-true`: parameters, gradients, optimizer state, the input batch and activations all in
///   bf16 (products still accumulate in f32, and updates are computed in f32 and rounded).
///
/// In every precision the per-sample losses and their mean stay f32.
#[derive(Serialize, ToSchema)]
pub enum Precision {
    /// Everything f32.
    #[serde(rename = "32-true")]
    F32True,
    /// Autocast to bfloat16 over f32 master parameters.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// Autocast to IEEE half over f32 master parameters, with dynamic loss scaling.
    #[serde(rename = "16-mixed")]
    F16Mixed,
    /// Everything bfloat16.
    #[serde(rename = "bf16-true")]
    Bf16True,
}

/// Element-wise non-linearity after each hidden layer.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x * Phi(x)` in the tanh approximation.
    Gelu,
    /// Hyperbolic tangent.
    Tanh,
}

/// The update rules headroom implements.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Plain stochastic gradient descent: no state.
    Sgd,
    /// SGD with momentum 0.9: one velocity per parameter.
    SgdMomentum,
    /// Adam: two moments per parameter.
    Adam,
    /// Adam with decoupled weight decay: two moments per parameter.
    Adamw,
}

/// The outcome of a finished search.
#[derive(Serialize, ToSchema)]
#[schema(as = TuneResult)]
pub struct TuneAnswer {
    /// The largest batch size that ran.
    max_batch_size: u64,
    /// The batch size to use: `headroom x max_batch_size`, rounded down to `multiple_of`.
    recommended_batch_size: u64,
    /// Tokens in the recommended batch, when a sample is a sequence of token ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recommended_tokens: Option<u64>,
    /// The share of the largest batch the recommendation uses.
    headroom: f64,
    /// How the probed steps stored and computed (`32-true` for results from before precisions).
    #[serde(default)]
    precision: Precision,
    /// Set when this precision holds fewer samples than `32-true` would, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    precision_note: Option<String>,
    /// Whose training step the probes ran and the prediction describes (`headroom` for results
    /// from before the PyTorch profile).
    framework: Framework,
    /// The GPUs FSDP shards the model over, when it does: the batch and memory are one GPU's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fsdp_world_size: Option<u64>,
    /// Whether FSDP's blocks let their gathered parameters go after their forward (`false`:
    /// kept to their backward), when FSDP shards the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fsdp_reshard_after_forward: Option<bool>,
    /// The throughput knee: the smallest batch from which doubling gains less than
    /// `search.knee_tolerance` in fitted samples/s. A larger batch trains little faster.
    throughput_batch_size: u64,
    /// The range the knee could lie in: the knees of every curve that fits the measurements
    /// within three standard errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    throughput_knee: Option<Knee>,
    /// Said when the measurements do not place the knee within a factor of four.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    throughput_note: Option<String>,
    /// Samples/s of every batch size that fitted, by batch size, with the fitted curve.
    throughput: Vec<ThroughputPoint>,
    /// The step time fitted to the measurements, the curve the knee is read from (absent with
    /// fewer than two sizes measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    throughput_fit: Option<StepTime>,
    /// How to reach the job's `target_batch_size` with gradient accumulation, when it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accumulation: Option<Accumulation>,
    /// What stopped the search from going higher.
    limited_by: LimitedBy,
    /// The memory model's largest batch for the device's free memory at the start.
    predicted_max_batch_size: u64,
    /// The device probed.
    device: DeviceInfo,
    /// The modelled memory at the recommended batch size.
    memory: MemoryBreakdown,
    /// Every probe, in the order it ran.
    probes: Vec<Probe>,
    /// Wall time of the whole search, seconds.
    elapsed_seconds: f64,
    /// True when the service answered from its cache instead of probing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cached: bool,
    /// Where the service measured it: its node and device, e.g. `node-17/cuda:0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    measured_on: Option<String>,
    /// When the service measured it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    measured_at: Option<String>,
}

/// Why the batch size stopped growing.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitedBy {
    /// The device ran out of memory above `max_batch_size`.
    Memory,
    /// The job's `dataset_size` capped the batch.
    DatasetSize,
    /// The job's `search.max` capped the batch.
    Max,
}

/// One probe of the search.
#[derive(Serialize, ToSchema)]
pub struct Probe {
    /// Batch size probed.
    batch_size: u64,
    /// What happened.
    outcome: Outcome,
    /// Median seconds per training step, the warm-up step left out (0 unless it fitted).
    step_seconds: f64,
    /// How much the timed steps disagreed: their interquartile range relative to the median.
    step_seconds_spread: f64,
    /// Steps timed (0 unless it fitted).
    timed_steps: u32,
    /// `batch_size / step_seconds` (0 unless it fitted).
    samples_per_second: f64,
    /// Device bytes the probe held (0 unless it fitted).
    device_bytes: u64,
}

/// The outcome of one probe.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step ran.
    Fit,
    /// An allocation ran out of memory.
    Oom,
    /// A device fault; the search stopped.
    Error,
}

/// One point of the throughput curve: a batch size that fitted, its measured speed and spread,
/// and the fitted speed the knee is read from.
#[derive(Serialize, ToSchema)]
pub struct ThroughputPoint {
    /// Batch size.
    batch_size: u64,
    /// Samples trained per second at that size (the median step).
    samples_per_second: f64,
    /// The timed steps' interquartile range relative to their median.
    spread: f64,
    /// The fitted step time's speed at this size.
    fitted_samples_per_second: f64,
    /// Left out of the fit: further from the curve the other points draw than their scatter
    /// allows (the machine slowed or sped up during its probe).
    set_aside: bool,
}

/// The throughput knee and the range it could lie in.
#[derive(Serialize, ToSchema)]
pub struct Knee {
    /// The smallest batch from which doubling gains less than the tolerance in fitted samples/s.
    batch_size: u64,
    /// The smallest knee of the curves that fit the measurements within three standard errors.
    low: u64,
    /// The largest.
    high: u64,
}

/// A step's seconds against batch size `b`, fitted to every measured speed at once:
/// `(fixed_seconds^overlap + (seconds_per_sample * b)^overlap)^(1 / overlap)`. Samples/s is
/// `b` over it.
#[derive(Serialize, ToSchema)]
pub struct StepTime {
    /// Seconds a step takes whatever the batch (the optimizer's update, launches).
    fixed_seconds: f64,
    /// Seconds each sample adds once the batch is large.
    seconds_per_sample: f64,
    /// 1 when the two costs add; larger when the fixed one hides beneath the work (one of 1,
    /// 1.5, 2, 3, 4, 8).
    overlap: f64,
}

/// How to reach a target global batch with gradient accumulation.
#[derive(Serialize, ToSchema)]
pub struct Accumulation {
    /// Batch size of one forward/backward pass on one GPU.
    micro_batch_size: u64,
    /// Micro batches accumulated before each optimizer step.
    steps: u64,
    /// Data-parallel GPUs.
    world_size: u64,
    /// `micro_batch_size x steps x world_size`: the global batch each optimizer step sees.
    global_batch_size: u64,
    /// The global batch the recipe asked for.
    target_batch_size: u64,
    /// Whether the global batch equals the target.
    exact: bool,
    /// Why it is not exact, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// Device bytes of one training step at its peak, in the four places training uses memory.
#[derive(Serialize, ToSchema)]
pub struct MemoryBreakdown {
    /// Weights and biases (and batch norm's running statistics).
    parameters: u64,
    /// One gradient per parameter.
    gradients: u64,
    /// Momentum or Adam moments.
    optimizer_state: u64,
    /// The input batch and its labels.
    batch_data: u64,
    /// What forward keeps for backward, the backward buffers and the loss.
    activations: u64,
    /// Sum of the above.
    total: u64,
    /// When in the step the peak falls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peak_at: Option<Moment>,
}

/// Which implementation a device is.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The CPU reference.
    Host,
    /// An NVIDIA GPU.
    Cuda,
}

/// Identity and memory of a device, as reported in results.
#[derive(Serialize, ToSchema)]
pub struct DeviceInfo {
    /// Implementation.
    kind: DeviceKind,
    /// Index among devices of its kind.
    index: u32,
    /// Human-readable name (GPU model, or the host's budget).
    name: String,
    /// A GPU's UUID, `GPU-...` as NVML and DCGM write it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
    /// Memory the device has in all, bytes.
    total_bytes: u64,
    /// Memory free for a probe right now, bytes.
    free_bytes: u64,
}

/// The memory model's answer for a device with `memory_bytes` free: no probe runs.
#[derive(Serialize, ToSchema)]
pub struct Estimate {
    /// Free bytes assumed.
    memory_bytes: u64,
    /// How the step stores and computes.
    precision: Precision,
    /// Set when this precision holds fewer samples than `32-true` would, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    precision_note: Option<String>,
    /// Whose training step the prediction describes.
    framework: Framework,
    /// The GPUs FSDP shards the model over, when it does: the batch and memory are one GPU's.
    #[serde(skip_serializing_if = "Option::is_none")]
    fsdp_world_size: Option<u64>,
    /// Whether FSDP's blocks let their gathered parameters go after their forward (`false`:
    /// kept to their backward), when FSDP shards the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fsdp_reshard_after_forward: Option<bool>,
    /// Learnt parameters, frozen ones included (`sum(p.numel() for p in model.parameters())`).
    parameter_count: u64,
    /// Those of them it trains (not frozen).
    trainable_parameter_count: u64,
    /// Bytes independent of the batch size, at the instant of the step that peaks at the
    /// predicted batch.
    fixed_bytes: u64,
    /// Bytes each sample adds, at that instant.
    bytes_per_sample: u64,
    /// Largest batch the model predicts fits (capped by `search.max` and `dataset_size`).
    predicted_max_batch_size: u64,
    /// What bounds it: `memory`, or the cap that did (`dataset_size` or `max`).
    limited_by: LimitedBy,
    /// The headroom rule applied to the prediction.
    recommended_batch_size: u64,
    /// Tokens in the recommended batch, when a sample is a sequence of token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    recommended_tokens: Option<u64>,
    /// Breakdown at the recommended batch size.
    memory: MemoryBreakdown,
    /// Over token ids: the largest batch at each sequence length, shortest first (powers of two
    /// from 128 to the positional table's rows, and the job's own length).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sequence_lengths: Vec<SequencePoint>,
}

/// The memory model's answer at one sequence length.
#[derive(Serialize, ToSchema)]
pub struct SequencePoint {
    /// Tokens a sequence.
    sequence_length: u64,
    /// The largest batch of sequences predicted to fit (0: not one).
    predicted_max_batch_size: u64,
    /// Tokens in that batch.
    tokens: u64,
    /// The headroom rule applied to it.
    recommended_batch_size: u64,
    /// Tokens in the recommended batch.
    recommended_tokens: u64,
}

/// The memory model's answer for one card.
#[derive(Serialize, ToSchema)]
pub struct GpuEstimate {
    /// The card.
    gpu: String,
    /// Its memory in all, bytes.
    total_bytes: u64,
    /// The largest and recommended batch, when batch size 1 fits.
    #[serde(skip_serializing_if = "Option::is_none")]
    estimate: Option<Estimate>,
    /// Why it does not fit, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    does_not_fit: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use serde_json::{json, Value};

    use crate::answer::TuneAnswer;
    use headroom_devices::host::HostDevice;
    use headroom_engine::catalogue;
    use headroom_engine::job::Job;

    use super::JobSpec;

    /// Checks `value` against `schema`, resolving references in `components`; collects in
    /// `errors` what does not conform, and every member of an object that one of them lacks.
    fn conforms(
        value: &Value,
        schema: &Value,
        components: &Value,
        path: &str,
        errors: &mut Vec<String>,
    ) {
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap();
            return conforms(value, &components[name], components, path, errors);
        }
        if let Some(choices) = schema["oneOf"].as_array() {
            let fits = choices.iter().any(|choice| {
                let mut trial = Vec::new();
                conforms(value, choice, components, path, &mut trial);
                trial.is_empty()
            });
            if !fits {
                errors.push(format!("{path}: {value} fits none of {schema}"));
            }
            return;
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_f64() => "number",
            Value::Number(_) => "integer",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let type_fits = types.is_empty()
            || types.contains(&actual)
            || (actual == "integer" && types.contains(&"number"));
        if !type_fits {
            errors.push(format!(
                "{path}: {value} is {actual}, the schema says {types:?}"
            ));
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                errors.push(format!("{path}: {value} is not one of {allowed:?}"));
            }
        }
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    conforms(item, &schema["items"], components, &path, errors);
                }
            }
            // A free-form object (a Hugging Face config) declares no members.
            Value::Object(_) if schema["properties"].is_null() => {}
            Value::Object(members) => {
                let properties = schema["properties"].as_object();
                for (name, member) in members {
                    let path = format!("{path}.{name}");
                    match properties.and_then(|p| p.get(name)) {
                        Some(property) => conforms(member, property, components, &path, errors),
                        None => errors.push(format!("{path}: not in the schema")),
                    }
                }
                for name in properties.into_iter().flat_map(|p| p.keys()) {
                    if !members.contains_key(name) {
                        errors.push(format!("{path}.{name}: in the schema, not in the sample"));
                    }
                }
            }
            _ => {}
        }
    }

    /// Checks `sample` against the schema `schema` of the service's OpenAPI document, or
    /// against the component-less `schema` given as JSON.
    fn check(sample: &impl serde::Serialize, schema: Result<&str, Value>) {
        let document = crate::openapi_document();
        let components = &document["components"]["schemas"];
        let (name, schema) = match schema {
            Ok(name) => (name.to_string(), components[name].clone()),
            Err(schema) => ("Job".to_string(), schema),
        };
        assert!(schema.is_object(), "no schema {name}");
        let mut errors = Vec::new();
        let value = serde_json::to_value(sample).unwrap();
        conforms(&value, &schema, components, &name, &mut errors);
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    /// A job with every member given.
    fn full_job() -> Value {
        json!({"model": {"input_shape": [3, 8, 8], "hidden_layers": [16], "num_classes": 4,
                         "tokens": {"sequence_length": 16, "vocab_size": 100},
                         "huggingface": {"model_type": "llama"}, "parameter_count": 1000,
                         "lora": {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1,
                                  "target_modules": ["q_proj", "linear"]},
                         "activation": "gelu", "layers": [
                             {"embedding": {"embedding_dim": 8, "padding_idx": -1}},
                             {"positional_embedding": {"max_positions": 32}},
                             {"conv2d": {"out_channels": 4, "kernel_size": 3, "stride": 1, "padding": 1,
                                         "dilation": 1, "groups": 1, "bias": false}},
                             {"max_pool2d": {"kernel_size": 2, "stride": 2, "padding": 0, "dilation": 1,
                                             "ceil_mode": false}},
                             {"avg_pool2d": {"kernel_size": 2, "stride": 2, "padding": 0, "ceil_mode": true,
                                             "count_include_pad": false}},
                             {"adaptive_avg_pool2d": {"output_size": [2, 3]}},
                             {"adaptive_avg_pool2d": {"output_size": 2}},
                             {"batch_norm2d": {"affine": true, "eps": 0.001, "momentum": 0.01}},
                             {"dropout": {"p": 0.1}}, {"identity": {}},
                             {"residual": {"layers": [{"relu": {"inplace": false}}, {"gelu": {"approximate": "tanh", "implementation": "composite"}},
                                                      {"tanh": {}}, {"sigmoid": {}}, {"silu": {}},
                                                      {"relu6": {"inplace": false}},
                                                      {"leaky_relu": {"negative_slope": 0.2, "inplace": false}}],
                                           "shortcut": [{"identity": {}}], "inplace": true}},
                             {"global_avg_pool2d": {}}, {"flatten": {}}, {"batch_norm1d": {"affine": false, "eps": 0.00001, "momentum": 0.1}},
                             {"layer_norm": {"eps": 0.00001, "elementwise_affine": true, "bias": false}},
                             {"rms_norm": {"eps": 0.000001, "elementwise_affine": true,
                                           "implementation": "composite"}},
                             {"gated_mlp": {"intermediate_size": 8, "activation": "gelu_pytorch_tanh", "bias": false}},
                             {"self_attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 2,
                                                 "causal": true, "bias": false, "rope_theta": 10000.0,
                                                 "output_bias": true, "dropout": 0.1,
                                                 "implementation": "eager", "fused_qkv": false,
                                                 "upcast_softmax": true}},
                             {"patch_embedding": {"embedding_dim": 4, "patch_size": 2}},
                             {"first_token": {}},
                             {"frozen": {"layers": [{"identity": {}}]}},
                             {"checkpoint": {"layers": [{"identity": {}}]}},
                             {"linear": {"out_features": 4, "bias": true, "tied": true}}],
                         "gradient_checkpointing": true},
               "optimizer": {"name": "adamw", "learning_rate": 0.01},
               "precision": "bf16-mixed", "dtype": "f32", "dataset_size": 100000,
               "headroom": 0.75, "target_batch_size": 1000, "world_size": 3, "sharding": "fsdp",
               "reshard_after_forward": false,
               "search": {"start": 8, "max": 4096, "multiple_of": 8, "tolerance": 0.05,
                          "steps_per_probe": 2, "min_timed_seconds": 0.05, "strategy": "double",
                          "knee_tolerance": 0.1,
                          "throughput_probes": 2}})
    }

    /// The engine's types write exactly the members their schemas declare (every optional one
    /// given here), of the types they declare: a member added to either side alone fails.
    #[test]
    fn every_schema_matches_what_the_engine_writes() {
        let spec: headroom_engine::JobSpec = serde_json::from_value(full_job()).unwrap();
        let job_schema =
            serde_json::to_value(<JobSpec as utoipa::PartialSchema>::schema()).unwrap();
        check(&spec, Err(job_schema));

        let mut job = full_job();
        job.as_object_mut().unwrap().remove("dtype");
        job["model"].as_object_mut().unwrap().remove("layers");
        job["model"].as_object_mut().unwrap().remove("tokens");
        job["model"].as_object_mut().unwrap().remove("huggingface");
        job["model"].as_object_mut().unwrap().remove("lora");
        job["model"]
            .as_object_mut()
            .unwrap()
            .remove("gradient_checkpointing");
        job["model"]
            .as_object_mut()
            .unwrap()
            .remove("parameter_count");
        let job = Job::from_value(job).unwrap();
        let mut device = HostDevice::new(8 << 20);
        let result =
            headroom_engine::tune(&job, &mut device, &mut |_| ControlFlow::Continue(())).unwrap();
        let accumulation = result.accumulation.clone().expect("the job has a target");
        assert!(accumulation.note.is_some(), "1000 over 3 GPUs is not exact");
        let answer = TuneAnswer {
            result: headroom_engine::TuneResult {
                precision_note: Some("a note".into()),
                recommended_tokens: Some(1024),
                throughput_note: Some("a note".into()),
                throughput_knee: result.throughput_knee.or(Some(headroom_engine::knee::Knee {
                    batch_size: 8,
                    low: 8,
                    high: 8,
                })),
                throughput_fit: result
                    .throughput_fit
                    .or(Some(headroom_engine::knee::StepTime {
                        fixed_seconds: 1e-3,
                        seconds_per_sample: 1e-6,
                        overlap: 1.0,
                    })),
                device: headroom_engine::DeviceInfo {
                    uuid: Some("GPU-0".into()),
                    ..result.device.clone()
                },
                ..result
            },
            cached: true,
            measured_on: Some("node/host".into()),
            measured_at: Some("2026-12-01T00:00:00Z".into()),
        };
        check(&answer, Ok("TuneResult"));

        let fits = catalogue::estimate_on(&job, "H100 80GB", 80 << 30, (9, 0));
        let mut estimate = fits.estimate.clone().unwrap();
        estimate.precision_note = Some("a note".into());
        estimate.recommended_tokens = Some(1024);
        estimate.sequence_lengths = vec![headroom_engine::frontier::SequencePoint {
            sequence_length: 128,
            predicted_max_batch_size: 8,
            tokens: 1024,
            recommended_batch_size: 4,
            recommended_tokens: 512,
        }];
        let card = catalogue::GpuEstimate {
            estimate: Some(estimate),
            does_not_fit: catalogue::estimate_on(&job, "tiny", 1 << 10, (9, 0)).does_not_fit,
            ..fits
        };
        check(&card, Ok("GpuEstimate"));
    }
}
