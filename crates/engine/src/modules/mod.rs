//! The layers a model is made of, one module per kind, as PyTorch's `torch.nn` has them.
//!
//! A module file holds everything about its kind: its arguments as a job writes them
//! (`{"conv2d": {"out_channels": 64, "kernel_size": 3}}`, PyTorch's names and defaults), its
//! shape rule and the errors naming `model.layers[i].field`, its parameters and buffers in
//! PyTorch's order, its forward on the [`Graph`] (the kernels it runs, and what autograd saves
//! of it for backward), its [`Backward`](crate::program::graph::Backward) (the gradients it
//! allocates and the kernels that write them), and its forward in f64 from the definition, which
//! the finite-difference checks differentiate. The step (`plan::compile`) runs the
//! model's [`Sequential`] knowing no kind; a container ([`residual::Residual`],
//! [`frozen::Frozen`], [`checkpoint::Checkpoint`]) composes its children the same way.
//!
//! # Adding a layer kind
//! 1. `modules/<kind>.rs`: its arguments (serde, PyTorch's defaults), their `build` (the shape
//!    rule, every error naming its field), and a [`Module`]: `parameters`, `forward` (allocate
//!    the output, emit the kernels, [`Graph::record`] what it saves), its backward, and
//!    `reference` in f64.
//! 2. Its variant in [`LayerSpec`], and its arm in [`LayerSpec::build`] and
//!    [`LayerSpec::name`].
//! 3. If it needs a kernel the devices lack: the instruction in [`crate::program::instr`], the
//!    method in its family of [`crate::step::Kernels`], the kernel in
//!    `crates/devices/kernels/<family>.cu` with its launcher in `cuda/`, the host's in `host/`,
//!    and a parity check with a reference of its own in `parity/`.
//! 4. Tests: the kind in `tests/pytorch/memory_check.py`'s builder and random lists (PyTorch's
//!    own accounting), and in the devices' finite-difference check.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::program::graph::{Graph, Tensor};
use crate::synthetic::init_scale;

pub mod activation;
pub mod adaptive_avg_pool2d;
pub mod avg_pool2d;
pub mod batch_norm;
pub mod check;
pub mod checkpoint;
pub mod composite_gelu;
pub mod composite_rms_norm;
pub mod conv2d;
pub mod cross_entropy;
pub mod dropout;
pub mod eager_attention;
pub mod embedding;
pub mod first_token;
pub mod flatten;
pub mod frozen;
pub mod gated_mlp;
pub mod identity;
pub mod layer_norm;
pub mod linear;
pub mod lora;
pub mod max_pool2d;
pub mod mean_pool;
pub mod patch_embedding;
pub mod pooling;
pub mod positional_embedding;
pub mod residual;
pub mod rms_norm;
pub mod rotary;
pub mod self_attention;
pub mod sequential;

pub use check::LayerError;
pub use sequential::Sequential;

/// The most layers a model may hold, residual blocks' own counted: deeper than any ResNet.
pub const MAX_LAYERS: usize = 1000;
/// The deepest nesting of residual blocks.
pub const MAX_NESTING: usize = 8;
/// The largest width, channel count, kernel, stride or padding any one layer may name.
pub const MAX_EXTENT: u64 = 1 << 32;

/// One layer of `model.layers`, in PyTorch's `torch.nn` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// `nn.Conv2d`: square kernel, the input's channels inferred.
    Conv2d(conv2d::Conv2dSpec),
    /// `nn.MaxPool2d`.
    MaxPool2d(max_pool2d::MaxPool2dSpec),
    /// `nn.AvgPool2d`.
    AvgPool2d(avg_pool2d::AvgPool2dSpec),
    /// `nn.AdaptiveAvgPool2d`.
    AdaptiveAvgPool2d(adaptive_avg_pool2d::AdaptiveAvgPool2dSpec),
    /// `nn.AdaptiveAvgPool2d(1)` then `flatten`: one value per channel.
    GlobalAvgPool2d(NoArguments),
    /// `nn.BatchNorm2d` in training mode, its channels inferred.
    BatchNorm2d(batch_norm::BatchNormSpec),
    /// `nn.BatchNorm1d` in training mode, over `[features]` or `[channels, length]`.
    BatchNorm1d(batch_norm::BatchNormSpec),
    /// `nn.Dropout`.
    Dropout(dropout::DropoutSpec),
    /// `nn.Embedding` over `model.tokens`: the model's first layer.
    Embedding(embedding::EmbeddingSpec),
    /// A learned positional embedding added to a `[positions, features]` sample (GPT-2's
    /// `wpe`).
    PositionalEmbedding(positional_embedding::PositionalEmbeddingSpec),
    /// `nn.Flatten`: every dimension of a sample into one.
    Flatten(NoArguments),
    /// `x[:, 0]`: the first position of a `[positions, features]` sample (a ViT's class
    /// token, pooled).
    FirstToken(NoArguments),
    /// `x.mean(dim=1)`: the mean over the positions of a `[positions, features]` sample.
    MeanPool(NoArguments),
    /// A ViT's patch embedding: a convolution of the patch's kernel and stride, its patches as
    /// tokens after a class token, a learnt position embedding added.
    PatchEmbedding(patch_embedding::PatchEmbeddingSpec),
    /// `nn.Identity`.
    Identity(NoArguments),
    /// `down(act(gate(x)) * up(x))` over the last dimension: Llama's MLP (SwiGLU).
    GatedMlp(gated_mlp::GatedMlpSpec),
    /// `nn.LayerNorm` over the last dimension, its features inferred.
    LayerNorm(layer_norm::LayerNormSpec),
    /// `nn.RMSNorm` over the last dimension, its features inferred.
    RmsNorm(rms_norm::RmsNormSpec),
    /// `nn.Linear`, its input features inferred.
    Linear(linear::LinearSpec),
    /// `nn.ReLU`.
    Relu(activation::InPlaceSpec),
    /// `nn.ReLU6`.
    Relu6(activation::InPlaceSpec),
    /// `nn.LeakyReLU`.
    LeakyRelu(activation::LeakyReluSpec),
    /// `nn.GELU`.
    Gelu(activation::GeluSpec),
    /// `nn.Tanh`.
    Tanh(NoArguments),
    /// `nn.Sigmoid`.
    Sigmoid(NoArguments),
    /// `nn.SiLU`.
    Silu(NoArguments),
    /// Multi-head self-attention over a `[positions, features]` sample: projections, fused
    /// scaled dot-product attention, output projection.
    SelfAttention(self_attention::SelfAttentionSpec),
    /// Its layers' output added to its shortcut's (the identity unless given): `body(x) +
    /// shortcut(x)`.
    Residual(residual::ResidualSpec),
    /// Its layers with their parameters frozen (`requires_grad_(False)`): a fine-tuned
    /// model's backbone.
    Frozen(frozen::FrozenSpec),
    /// Its layers under activation checkpointing (`torch.utils.checkpoint`, non-reentrant):
    /// their activations recomputed in backward rather than kept.
    Checkpoint(checkpoint::CheckpointSpec),
}

/// A layer that takes no arguments: `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

impl LayerSpec {
    /// Its name in a job.
    pub fn name(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d(_) => "conv2d",
            LayerSpec::MaxPool2d(_) => "max_pool2d",
            LayerSpec::AvgPool2d(_) => "avg_pool2d",
            LayerSpec::AdaptiveAvgPool2d(_) => "adaptive_avg_pool2d",
            LayerSpec::GlobalAvgPool2d(_) => "global_avg_pool2d",
            LayerSpec::BatchNorm2d(_) => "batch_norm2d",
            LayerSpec::BatchNorm1d(_) => "batch_norm1d",
            LayerSpec::Dropout(_) => "dropout",
            LayerSpec::Embedding(_) => "embedding",
            LayerSpec::PositionalEmbedding(_) => "positional_embedding",
            LayerSpec::Flatten(_) => "flatten",
            LayerSpec::FirstToken(_) => "first_token",
            LayerSpec::MeanPool(_) => "mean_pool",
            LayerSpec::PatchEmbedding(_) => "patch_embedding",
            LayerSpec::Identity(_) => "identity",
            LayerSpec::GatedMlp(_) => "gated_mlp",
            LayerSpec::LayerNorm(_) => "layer_norm",
            LayerSpec::RmsNorm(_) => "rms_norm",
            LayerSpec::Linear(_) => "linear",
            LayerSpec::Relu(_) => "relu",
            LayerSpec::Relu6(_) => "relu6",
            LayerSpec::LeakyRelu(_) => "leaky_relu",
            LayerSpec::Gelu(_) => "gelu",
            LayerSpec::Tanh(_) => "tanh",
            LayerSpec::Sigmoid(_) => "sigmoid",
            LayerSpec::Silu(_) => "silu",
            LayerSpec::Residual(_) => "residual",
            LayerSpec::Frozen(_) => "frozen",
            LayerSpec::Checkpoint(_) => "checkpoint",
            LayerSpec::SelfAttention(_) => "self_attention",
        }
    }

    /// Whether it can read token ids: an embedding, or frozen or checkpointed layers starting
    /// with one.
    pub fn reads_tokens(&self) -> bool {
        match self {
            LayerSpec::Embedding(_) => true,
            LayerSpec::Frozen(spec) => spec.layers.first().is_some_and(LayerSpec::reads_tokens),
            LayerSpec::Checkpoint(spec) => spec.layers.first().is_some_and(LayerSpec::reads_tokens),
            _ => false,
        }
    }

    /// This layer and, for a container, every layer within it, depth first.
    pub fn nested(&self) -> Vec<&LayerSpec> {
        let children: &[&[LayerSpec]] = match self {
            LayerSpec::Residual(spec) => &[&spec.layers, &spec.shortcut],
            LayerSpec::Frozen(spec) => &[&spec.layers],
            LayerSpec::Checkpoint(spec) => &[&spec.layers],
            _ => &[],
        };
        std::iter::once(self)
            .chain(
                children
                    .iter()
                    .flat_map(|list| list.iter().flat_map(LayerSpec::nested)),
            )
            .collect()
    }

    /// The module this layer is over a sample of `input` shape, or the field at fault (`at` is
    /// the layer's path, `model.layers[3]`).
    pub fn build(
        &self,
        input: &[u64],
        at: &Path,
        cx: &mut Context,
    ) -> Result<Arc<dyn Module>, LayerError> {
        use activation::{Activation, Nonlinearity};
        let at = at.of(self.name());
        Ok(match self {
            LayerSpec::Conv2d(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::MaxPool2d(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::AvgPool2d(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::AdaptiveAvgPool2d(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::GlobalAvgPool2d(_) => Arc::new(adaptive_avg_pool2d::global(input, &at)?),
            LayerSpec::BatchNorm2d(spec) => Arc::new(spec.build(input, &at, 2)?),
            LayerSpec::BatchNorm1d(spec) => Arc::new(spec.build(input, &at, 1)?),
            LayerSpec::Dropout(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::Embedding(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::PositionalEmbedding(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::Flatten(_) => Arc::new(flatten::Flatten::new(input, &at)?),
            LayerSpec::FirstToken(_) => Arc::new(first_token::build(input, &at)?),
            LayerSpec::MeanPool(_) => Arc::new(mean_pool::build(input, &at)?),
            LayerSpec::PatchEmbedding(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::Identity(_) => Arc::new(identity::Identity::new(input)),
            LayerSpec::GatedMlp(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::LayerNorm(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::RmsNorm(spec) => Arc::new(spec.build(input, &at)?),
            LayerSpec::Linear(spec) => Arc::new(
                spec.build(input, &at, cx)?
                    .adapted("linear", input, &at, cx)?,
            ),
            LayerSpec::Relu(spec) => Arc::new(Activation::new(
                Nonlinearity::Relu,
                spec.inplace,
                input,
                &at,
                cx,
            )?),
            LayerSpec::Relu6(spec) => Arc::new(Activation::new(
                Nonlinearity::Relu6,
                spec.inplace,
                input,
                &at,
                cx,
            )?),
            LayerSpec::LeakyRelu(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::Gelu(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::Tanh(_) => {
                Arc::new(Activation::new(Nonlinearity::Tanh, false, input, &at, cx)?)
            }
            LayerSpec::Sigmoid(_) => Arc::new(Activation::new(
                Nonlinearity::Sigmoid,
                false,
                input,
                &at,
                cx,
            )?),
            LayerSpec::Silu(_) => {
                Arc::new(Activation::new(Nonlinearity::Silu, false, input, &at, cx)?)
            }
            LayerSpec::Residual(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::Frozen(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::Checkpoint(spec) => Arc::new(spec.build(input, &at, cx)?),
            LayerSpec::SelfAttention(spec) => Arc::new(spec.build(input, &at, cx)?),
        })
    }
}

/// Where a layer is in the job, for errors: the layer (`model.layers[5].residual.layers[0]`)
/// and, once known, its kind, under which its fields are named (`...layers[0].conv2d.stride`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    layer: String,
    kind: Option<&'static str>,
}

impl Path {
    /// The list at `root` (`model.layers`).
    pub fn new(root: &str) -> Path {
        Path {
            layer: root.to_string(),
            kind: None,
        }
    }

    /// Its `i`-th layer.
    pub fn index(&self, i: usize) -> Path {
        Path::new(&format!("{}[{i}]", self.layer))
    }

    /// The same layer, of `kind`.
    pub fn of(&self, kind: &'static str) -> Path {
        Path {
            layer: self.layer.clone(),
            kind: Some(kind),
        }
    }

    /// A list of layers among its fields (a residual block's `layers`).
    pub fn list(&self, field: &str) -> Path {
        Path::new(&self.field(field))
    }

    /// The path of one of its fields.
    pub fn field(&self, name: &str) -> String {
        match self.kind {
            Some(kind) => format!("{}.{kind}.{name}", self.layer),
            None => format!("{}.{name}", self.layer),
        }
    }

    /// An error about the layer as a whole.
    pub fn error(&self, reason: impl Into<String>) -> LayerError {
        LayerError::new(self.layer.clone(), reason)
    }

    /// An error about one of its fields.
    pub fn error_at(&self, field: &str, reason: impl Into<String>) -> LayerError {
        LayerError::new(self.field(field), reason)
    }

    /// The layer's path.
    pub fn as_str(&self) -> &str {
        &self.layer
    }
}

/// What building a layer list keeps track of across its layers.
#[derive(Debug, Default)]
pub struct Context {
    /// Layers built so far, residual blocks' own counted.
    pub layers: usize,
    /// How deep in residual blocks the layer being built is.
    pub depth: usize,
    /// Dropout layers built so far: each draws its masks from a stream of its own.
    pub dropouts: usize,
    /// Whether the tensor reaching the next layer is saved for backward by the layer that made
    /// it (or by whatever it is a view of), or is read again later (a residual block's input,
    /// which its shortcut reads): an in-place layer may then not change it.
    pub input_kept: bool,
    /// The vocabulary size while the tensor reaching the next layer is the batch's token ids
    /// (until an embedding has read them).
    pub tokens: Option<u64>,
    /// Parameters and buffers declared by the layers built so far: the index the next layer's
    /// first one will have.
    pub parameters: usize,
    /// The first embedding's table: its parameter's index, its rows and its width (what a
    /// tied language-model head reads).
    pub embedding: Option<(usize, u64, u64)>,
    /// The job's LoRA configuration, which puts adapters on the linear layers it targets.
    pub lora: Option<lora::Lora>,
    /// Whether the layer being built is the model's head (the last of its list): no adapter.
    pub head: bool,
    /// Whether the tensor reaching the next layer is a view of another (flatten's of a
    /// multi-dimensional tensor): autograd runs an in-place layer on it through `CopySlices`.
    pub input_is_view: bool,
    /// Whether the layer being built is inside a checkpointed region.
    pub checkpointed: bool,
}

/// One learnt parameter or kept buffer of a module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parameter {
    /// Elements.
    pub elements: u64,
    /// Its first dimension's length (`param.shape[0]`), along which FSDP shards it.
    pub rows: u64,
    /// What it is.
    pub kind: ParameterKind,
}

/// What a module's parameter or buffer is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParameterKind {
    /// Learnt, starting uniform in `[-scale, scale)` (PyTorch's default for its fan-in).
    Trained {
        /// The bound of its first values.
        scale: f32,
    },
    /// A running statistic batch norm keeps between steps, in the parameters' storage.
    Statistic,
    /// Batch norm's count of steps taken, one int64.
    Count,
    /// Learnt by the model but frozen for this run ([`frozen`]): filled as a trained one is,
    /// given no gradient and no optimizer state.
    Frozen {
        /// The bound of its first values.
        scale: f32,
    },
    /// A LoRA adapter's weight ([`lora`]): trained, frozen layers around it or not.
    Adapter {
        /// The bound of its first values.
        scale: f32,
    },
}

impl Parameter {
    /// A learnt parameter of `elements`, starting within `scale`.
    /// A vector's, or with [`Parameter::of_rows`] a matrix's.
    pub fn trained(elements: u64, scale: f32) -> Parameter {
        Parameter {
            elements,
            rows: elements,
            kind: ParameterKind::Trained { scale },
        }
    }

    /// A buffer of `elements` (a vector, or a scalar for `Count`).
    pub fn buffer(elements: u64, kind: ParameterKind) -> Parameter {
        Parameter {
            elements,
            rows: elements,
            kind,
        }
    }

    /// The same parameter, its first dimension `rows` long.
    pub fn of_rows(self, rows: u64) -> Parameter {
        Parameter { rows, ..self }
    }

    /// The same parameter frozen, when it is learnt (a LoRA adapter's stays trained); a buffer
    /// unchanged.
    pub fn frozen(self) -> Parameter {
        let kind = match self.kind {
            ParameterKind::Trained { scale } => ParameterKind::Frozen { scale },
            other => other,
        };
        Parameter { kind, ..self }
    }

    /// How many values `parameters` learn, frozen ones included, and how many of those are
    /// trained; `None` past `u64`.
    pub fn counts(parameters: &[Parameter]) -> Option<LearntCounts> {
        parameters
            .iter()
            .try_fold(LearntCounts::default(), |counts, p| match p.kind {
                ParameterKind::Trained { .. } | ParameterKind::Adapter { .. } => {
                    Some(LearntCounts {
                        all: counts.all.checked_add(p.elements)?,
                        trainable: counts.trainable.checked_add(p.elements)?,
                    })
                }
                ParameterKind::Frozen { .. } => Some(LearntCounts {
                    all: counts.all.checked_add(p.elements)?,
                    ..counts
                }),
                ParameterKind::Statistic | ParameterKind::Count => Some(counts),
            })
    }

    /// A layer's `weights` and, when it has one, its bias of `biases`, both starting within
    /// `1 / sqrt(fan_in)` as PyTorch's `Linear` and `Conv2d` initialise them.
    pub fn weight_and_bias(weights: u64, biases: Option<u64>, fan_in: u64) -> Vec<Parameter> {
        let scale = init_scale(fan_in);
        let rows = weights.checked_div(fan_in).unwrap_or(0);
        let mut declared = vec![Parameter::trained(weights, scale).of_rows(rows)];
        declared.extend(biases.map(|elements| Parameter::trained(elements, scale)));
        declared
    }
}

/// How many values a model learns: `sum(p.numel() for p in model.parameters())`, and the part
/// of it with `requires_grad`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LearntCounts {
    /// Every learnt parameter's values, frozen ones included.
    pub all: u64,
    /// The trained ones'.
    pub trainable: u64,
}

/// The tensors of a model's parameters and buffers, handed to each module in the order it
/// declared them.
pub struct Parameters<'a> {
    tensors: &'a [Tensor],
    next: usize,
}

impl<'a> Parameters<'a> {
    /// The tensors of every declared parameter, in order.
    pub fn new(tensors: &'a [Tensor]) -> Parameters<'a> {
        Parameters { tensors, next: 0 }
    }

    /// The next one.
    ///
    /// # Panics
    /// If a module takes more than it declared.
    pub fn take(&mut self) -> Tensor {
        let tensor = self.tensors[self.next];
        self.next += 1;
        tensor
    }

    /// Every tensor, and the index of the one [`Parameters::take`] gives next: where to take
    /// them again from ([`Parameters::resumed`]).
    pub fn mark(&self) -> (Vec<Tensor>, usize) {
        (self.tensors.to_vec(), self.next)
    }

    /// The tensors of every declared parameter, the `next`-th given first (a checkpointed
    /// region's, taken again by its recomputation).
    pub fn resumed(tensors: &'a [Tensor], next: usize) -> Parameters<'a> {
        Parameters { tensors, next }
    }

    /// The one declared at `index` by another module (a tied head's table), not taken.
    pub fn shared(&self, index: usize) -> Tensor {
        self.tensors[index]
    }

    /// Whether every one was taken.
    pub fn done(&self) -> bool {
        self.next == self.tensors.len()
    }
}

/// The values of a model's parameters and buffers in f64, handed to each module's reference in
/// the order it declared them.
pub struct Values<'a> {
    values: &'a [Vec<f64>],
    next: usize,
}

impl<'a> Values<'a> {
    /// The values of every declared parameter, in order.
    pub fn new(values: &'a [Vec<f64>]) -> Values<'a> {
        Values { values, next: 0 }
    }

    /// The next one.
    ///
    /// # Panics
    /// If a module takes more than it declared.
    pub fn take(&mut self) -> &'a [f64] {
        let values = &self.values[self.next];
        self.next += 1;
        values
    }

    /// The values of the one declared at `index` by another module, not taken.
    pub fn shared(&self, index: usize) -> &'a [f64] {
        &self.values[index]
    }
}

/// How a module shows in a job's one-line summary.
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    /// Not shown (a view).
    Hidden,
    /// A linear layer of this width.
    Width(u64),
    /// An activation, by name.
    Activation(&'static str),
    /// Dropout of this probability.
    Dropout(f32),
    /// Any other layer, in a word: `conv64k3p1`, `bn`, `max2`, `res(...)`.
    Layer(String),
}

/// One layer kind's module: see the [module documentation](self).
pub trait Module: std::fmt::Debug + Send + Sync {
    /// One sample's output shape.
    fn output_shape(&self) -> &[u64];

    /// Its parameters and buffers (and its children's), in PyTorch's order: `model.parameters()`
    /// for the learnt ones, with each module's buffers after its parameters.
    fn parameters(&self) -> Vec<Parameter> {
        Vec::new()
    }

    /// Records its forward: reads `x` (a reference the caller keeps) and returns its output (a
    /// reference the caller owns), taking its parameters from `parameters` in the order
    /// [`Module::parameters`] declares them.
    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor;

    /// Its forward from the definition, in f64, over `rows` samples laid out one after another,
    /// its parameters from `values`; dropout draws the masks a step 0 of `seed` draws. What the
    /// finite-difference checks differentiate.
    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, seed: u64) -> Vec<f64>;

    /// Multiply-adds per sample of its forward (its backward does about twice as many).
    fn multiply_adds(&self) -> u64 {
        0
    }

    /// How it shows in the job's summary.
    fn token(&self) -> Token;

    /// Whether the tensor it returns is saved for backward by it (relu's output) or by what it
    /// is a view of (`input_kept` says whether its input is): an in-place layer after it may
    /// not change that tensor.
    fn keeps_output(&self, input_kept: bool) -> bool {
        let _ = input_kept;
        false
    }

    /// Whether what it returns is its input itself, or a view of it (flatten, identity).
    fn is_view(&self) -> bool {
        false
    }

    /// Whether what it returns is a view of another tensor (`input_is_view` says whether its
    /// input is): flatten's of a multi-dimensional tensor, or such a view passed on unchanged.
    fn returns_view(&self, input_is_view: bool) -> bool {
        let _ = input_is_view;
        false
    }
}
