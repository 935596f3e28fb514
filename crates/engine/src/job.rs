//! The job description: what the caller asks headroom to tune, parsed and validated.
//!
//! [`JobSpec`] is the JSON as written; parsing reports the path of the offending field
//! (`search.start: invalid type ...`). Validation checks every rule the JSON types alone cannot
//! express and yields a [`Job`]: the spec with its [`Plan`], the only form the rest of headroom
//! accepts, so no code holds a job that was not checked or cannot be planned.

use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::modules::lora::{LoraSpec, TargetModules};
use crate::modules::{LayerError, LayerSpec, Token};
use crate::plan::Framework;
use crate::plan::Sharding;
use crate::plan::Training;
use crate::plan::{mlp_layers, Activation, OptimizerKind, Plan, PlanError, Precision, Samples};
use crate::result::LimitedBy;

/// Largest accepted `target_batch_size`: far above any recipe's global batch; it bounds the
/// search for an exact accumulation plan.
pub const MAX_TARGET_BATCH: u64 = 1 << 40;

/// Largest accepted `world_size`.
pub const MAX_WORLD_SIZE: u64 = 1 << 20;

/// Largest accepted width of any single dimension (input, hidden or classes).
///
/// Far beyond any MLP a device can hold; it only keeps products of user sizes well inside `u64`.
pub const MAX_DIMENSION: u64 = 1 << 32;

/// The largest integer JSON numbers carry exactly everywhere (2^53): the most a batch size
/// (`search.start`, `search.max`) may be.
pub const MAX_EXACT_INTEGER: u64 = 1 << 53;

/// A tuning job as written in JSON; [`Job`] is its validated form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The network to train.
    pub model: ModelSpec,
    /// The optimizer whose state takes device memory.
    pub optimizer: OptimizerSpec,
    /// How values are stored and computed, in PyTorch Lightning's words: `32-true` (default),
    /// `bf16-mixed`, `16-mixed` or `bf16-true`.
    #[serde(default)]
    pub precision: Precision,
    /// Whose training step the answer describes: `pytorch` (default), PyTorch's own order of
    /// allocations and frees and its optimizers' temporaries, or `headroom`, headroom's kernels
    /// with every buffer held for the whole step.
    #[serde(default)]
    pub framework: Framework,
    /// The older way to say `32-true`: `"dtype": "f32"`. A validated job never carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// Number of samples in the training set; the batch never grows past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_size: Option<u64>,
    /// Share of the largest batch that the recommended batch uses, in (0, 1].
    #[serde(default = "default_headroom")]
    pub headroom: f64,
    /// How the search probes the device.
    #[serde(default)]
    pub search: SearchSpec,
    /// The global batch the training recipe wants; the answer then says how to reach it with
    /// gradient accumulation across `world_size` GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_batch_size: Option<u64>,
    /// Data-parallel GPUs the global batch is split over.
    #[serde(default = "default_world_size")]
    pub world_size: u64,
    /// How the model's state is split over those GPUs: `none` (default: each holds it whole)
    /// or `fsdp` (PyTorch's FSDP2; the answer is one GPU's).
    #[serde(default, skip_serializing_if = "ShardingSpec::is_none")]
    pub sharding: ShardingSpec,
    /// With `fsdp`: whether each block's `fully_shard` lets its gathered parameters go after its
    /// forward and gathers them again in backward (PyTorch's default, ZeRO-3), or keeps them
    /// from its forward to its backward (`false`: ZeRO-2's memory, FSDP1's `SHARD_GRAD_OP`).
    /// The model's own `fully_shard` keeps its parameters either way, as PyTorch does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reshard_after_forward: Option<bool>,
}

/// How a job's model state is split over its `world_size` GPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardingSpec {
    /// Each GPU holds the whole model, its gradients and optimizer state (DDP's memory less its
    /// gradient buckets).
    #[default]
    None,
    /// PyTorch's FSDP2: `fully_shard` on each decoder layer (a Hugging Face config's) or each
    /// top-level residual block or checkpoint (a layer list's), then on the model, with its
    /// defaults.
    Fsdp,
}

impl ShardingSpec {
    fn is_none(&self) -> bool {
        *self == ShardingSpec::None
    }
}

/// The network: an MLP in shorthand (flatten the input, then `Linear -> activation` per hidden
/// width, then `Linear -> classes`), or a list of layers in PyTorch's names ([`LayerSpec`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Shape of one sample, any rank, e.g. `[3, 32, 32]`; empty when a sample is `tokens`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_shape: Vec<u64>,
    /// A sample as a sequence of token ids instead of values: the list then starts with an
    /// `embedding`, and the batch size counts sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensSpec>,
    /// Widths of the hidden layers, possibly none (the shorthand).
    #[serde(default)]
    pub hidden_layers: Vec<u64>,
    /// Number of output classes of the softmax cross-entropy loss.
    pub num_classes: u64,
    /// Activation after every hidden layer (the shorthand; relu when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// The model as layers, instead of `hidden_layers` and `activation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerSpec>>,
    /// LoRA (peft's `LoraConfig`): the model frozen, adapters on the linear layers named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// The Hugging Face `config.json` the layers were read from ([`crate::huggingface`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface: Option<serde_json::Value>,
    /// Activation checkpointing as `gradient_checkpointing_enable()` does it: each decoder
    /// layer of a Hugging Face config, or each residual block of a layer list, written into
    /// the list as a `checkpoint` ([`crate::modules::checkpoint::checkpoint_blocks`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// The parameters the model is known to have (PyTorch's `sum(p.numel() for p in
    /// model.parameters())`): a model described with another count is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_count: Option<u64>,
}

/// A sample of token ids (int64, as a tokenizer's `input_ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSpec {
    /// Tokens a sequence.
    pub sequence_length: u64,
    /// Token ids are below it (the embedding's `num_embeddings`).
    pub vocab_size: u64,
}

/// Optimizer and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// Which update rule.
    pub name: OptimizerKind,
    /// Step size; each optimizer has its own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
}

/// The element type of older jobs: `f32` only, an alias of `"precision": "32-true"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
}

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "f32" => Ok(Dtype::F32),
            _ => Err(serde::de::Error::custom(format!(
                "dtype `{name}` is not taken; \"dtype\": \"f32\" is the older spelling of \
                 \"precision\": \"32-true\", and half precision is \"precision\": \
                 \"bf16-mixed\", \"16-mixed\" or \"bf16-true\""
            ))),
        }
    }
}

/// The default [`SearchSpec::min_timed_seconds`].
pub const MIN_TIMED_SECONDS: f64 = 0.05;
/// The largest [`SearchSpec::min_timed_seconds`] a job may ask for.
pub const MAX_MIN_TIMED_SECONDS: f64 = 10.0;

/// How the batch size is searched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSpec {
    /// First batch size probed by the doubling strategy.
    pub start: u64,
    /// Largest batch size ever probed.
    pub max: u64,
    /// Batch sizes are rounded to this multiple where possible.
    pub multiple_of: u64,
    /// Relative gap between the last fit and the first OOM at which bisection stops.
    pub tolerance: f64,
    /// Training steps run per probe, at least.
    pub steps_per_probe: u32,
    /// A probe of two steps or more keeps stepping (up to 64 steps timed) until its timed steps
    /// add up to this many seconds: a step of a small batch is too short to time alone. 0 turns
    /// it off.
    pub min_timed_seconds: f64,
    /// Where the first probe goes.
    pub strategy: Strategy,
    /// The throughput knee is the smallest batch from which doubling gains less than this
    /// fraction in samples/s.
    pub knee_tolerance: f64,
    /// Most probes added below the maximum to find the throughput knee.
    pub throughput_probes: u32,
}

impl Default for SearchSpec {
    fn default() -> Self {
        SearchSpec {
            start: 16,
            max: 1 << 30,
            multiple_of: 8,
            tolerance: 0.01,
            steps_per_probe: 2,
            min_timed_seconds: MIN_TIMED_SECONDS,
            strategy: Strategy::Double,
            knee_tolerance: 0.1,
            throughput_probes: 4,
        }
    }
}

/// Where the search starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Double from `start` until the first OOM, then bisect.
    #[default]
    Double,
    /// Probe the memory model's prediction first, then confirm and bisect around it.
    Predict,
}

fn default_world_size() -> u64 {
    1
}

fn default_headroom() -> f64 {
    0.8
}

/// A job that cannot be run, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    /// Dotted path of the field, e.g. `search.start` or `model.hidden_layers[1]`; empty for the body.
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl std::fmt::Display for JobError {
    /// `field: reason`, or the reason alone when the body as a whole is at fault.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for JobError {}

impl JobError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        JobError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A job that passed validation, with its plan. It reads as its [`JobSpec`].
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    spec: JobSpec,
    plan: Plan,
}

impl Job {
    /// Parses and validates a job from JSON text.
    pub fn from_json(text: &str) -> Result<Job, JobError> {
        let value = serde_json::from_str(text).map_err(|err| JobError::new("", err.to_string()))?;
        Job::from_value(value)
    }

    /// Parses and validates a job already read as a JSON value. A whole number written with a
    /// fraction (`128.0`, as some JSON writers do) is that integer, as JSON Schema says.
    pub fn from_value(mut value: serde_json::Value) -> Result<Job, JobError> {
        integral_floats_as_integers(&mut value);
        if let Some(serde_json::Value::Object(model)) = value.get_mut("model") {
            crate::huggingface::expand(model)
                .map_err(|error| JobError::new(error.field, error.reason))?;
            checkpoint_layer_list(model)?;
        }
        Job::new(deserialize_with_path(value)?)
    }

    /// Validates a spec; every error names its field.
    pub fn new(mut spec: JobSpec) -> Result<Job, JobError> {
        let plan = spec.validate()?;
        if let Some(known) = spec.model.parameter_count {
            let described = plan.parameter_count();
            if known != described {
                return Err(JobError::new(
                    "model.parameter_count",
                    format!(
                        "is {known}, and the model described has {described} parameters: the \
                         description leaves something out or adds to it"
                    ),
                ));
            }
        }
        spec.dtype = None;
        if spec.model.layers.is_none() {
            spec.model.activation.get_or_insert_default();
        }
        Ok(Job { spec, plan })
    }

    /// The job as written, defaults filled in.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The model's shapes and memory model.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

impl Deref for Job {
    type Target = JobSpec;

    fn deref(&self) -> &JobSpec {
        &self.spec
    }
}

impl Serialize for Job {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.spec.serialize(serializer)
    }
}

/// A unit enum's name as its JSON spells it.
fn serde_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `model.gradient_checkpointing` over a layer list (a Hugging Face config's is written by
/// [`crate::huggingface::expand`]): each top-level residual block checkpointed.
fn checkpoint_layer_list(
    model: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<(), JobError> {
    use crate::modules::checkpoint::{asked, checkpoint_blocks};
    if !asked(model) || model.contains_key("huggingface") {
        return Ok(());
    }
    let layers = match model.get_mut("layers") {
        Some(serde_json::Value::Array(layers)) => std::mem::take(layers),
        _ => Vec::new(),
    };
    let error = |e: crate::modules::LayerError| JobError::new(e.field, e.reason);
    let layers = checkpoint_blocks(layers, 1).map_err(error)?;
    model.insert("layers".into(), serde_json::Value::Array(layers));
    Ok(())
}

/// Turns every number that is a whole, non-negative float no larger than 2^53 (where floats
/// are exact) into an integer, so that integer fields take it.
pub fn integral_floats_as_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(number) => {
            if let Some(float) = number.as_f64().filter(|_| number.is_f64()) {
                if float.fract() == 0.0 && (0.0..=MAX_EXACT_INTEGER as f64).contains(&float) {
                    *number = serde_json::Number::from(float as u64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        serde_json::Value::Object(members) => {
            members.values_mut().for_each(integral_floats_as_integers)
        }
        _ => {}
    }
}

fn deserialize_with_path<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<JobSpec, JobError>
where
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { String::new() } else { path };
        JobError::new(field, err.into_inner().to_string())
    })
}

impl JobSpec {
    /// Checks the rules the types cannot express and plans the model.
    fn validate(&self) -> Result<Plan, JobError> {
        let layers = self.model.validate()?;
        if let Some(lr) = self.optimizer.learning_rate {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(JobError::new(
                    "optimizer.learning_rate",
                    "must be a positive, finite number",
                ));
            }
        }
        match self.dataset_size {
            Some(0) => return Err(JobError::new("dataset_size", "must be at least 1")),
            Some(n) if n > MAX_EXACT_INTEGER => {
                return Err(JobError::new(
                    "dataset_size",
                    format!("must be at most 2^53 ({MAX_EXACT_INTEGER})"),
                ))
            }
            _ => {}
        }
        if !(self.headroom > 0.0 && self.headroom <= 1.0) {
            return Err(JobError::new(
                "headroom",
                format!("must be in (0, 1], got {}", self.headroom),
            ));
        }
        self.search.validate()?;
        if let Some(target) = self.target_batch_size {
            if !(1..=MAX_TARGET_BATCH).contains(&target) {
                return Err(JobError::new(
                    "target_batch_size",
                    format!("must be between 1 and {MAX_TARGET_BATCH}, got {target}"),
                ));
            }
        }
        if !(1..=MAX_WORLD_SIZE).contains(&self.world_size) {
            return Err(JobError::new(
                "world_size",
                format!(
                    "must be between 1 and {MAX_WORLD_SIZE}, got {}",
                    self.world_size
                ),
            ));
        }
        if self.dtype.is_some() && self.precision != Precision::F32True {
            return Err(JobError::new(
                "dtype",
                format!(
                    "\"dtype\": \"f32\" contradicts \"precision\": \"{}\"; give precision alone",
                    self.precision
                ),
            ));
        }
        let training = Training {
            optimizer: self.optimizer.name,
            learning_rate: self.learning_rate(),
            precision: self.precision,
            framework: self.framework,
        };
        let shorthand = self.model.layers.is_none();
        let sequence = self.model.tokens.map(|t| [t.sequence_length]);
        let samples = Samples {
            shape: sequence
                .as_ref()
                .map_or(&self.model.input_shape[..], |s| &s[..]),
            vocab: self.model.tokens.map(|t| t.vocab_size),
        };
        let (classes, lora) = (self.model.num_classes, self.model.lora.as_ref());
        let error = |error| match error {
            // The shorthand's MLP has no layer list to point into.
            PlanError::Layer(error) if shorthand => JobError::new("model", error.reason),
            PlanError::Layer(error) => error.into(),
            PlanError::Overflow(overflow) => JobError::new(
                "model",
                format!("{overflow}; the model is far larger than any device"),
            ),
        };
        let plan = Plan::build(samples, &layers, lora, classes, training, "model.layers");
        let mut plan = plan.map_err(error)?;
        let (config, checkpointing) = (&self.model.huggingface, self.model.gradient_checkpointing);
        if let Some(step) = config
            .as_ref()
            .and_then(|c| crate::huggingface::step(c, checkpointing))
        {
            plan = plan.with_hugging_face_step(step);
        }
        match self.sharding()? {
            Some(sharding) => plan.sharded(sharding).map_err(error),
            None => Ok(plan),
        }
    }

    /// FSDP's sharding, when asked and modelled.
    fn sharding(&self) -> Result<Option<Sharding>, JobError> {
        if self.sharding == ShardingSpec::None {
            return match self.reshard_after_forward {
                Some(_) => Err(JobError::new(
                    "reshard_after_forward",
                    "is FSDP's: give \"sharding\": \"fsdp\" or leave it out",
                )),
                None => Ok(None),
            };
        }
        let refuse = |reason: &str| Err(JobError::new("sharding", reason));
        if self.framework != Framework::Pytorch {
            return refuse("FSDP is PyTorch's: give framework \"pytorch\"");
        }
        if self.world_size < 2 {
            return refuse("FSDP over one GPU shards nothing: give world_size 2 or more");
        }
        // A top-level checkpoint is sharded as a block (`fully_shard` of the checkpointed
        // module); one inside another layer would recompute inside a block's forward.
        let layers = self.model.layers.as_deref().unwrap_or_default();
        if layers
            .iter()
            .flat_map(|layer| layer.nested().into_iter().skip(1))
            .any(|l| matches!(l, LayerSpec::Checkpoint(_)))
        {
            return refuse(
                "FSDP with activation checkpointing inside another layer is not modelled: put \
                 the checkpoint at the top of the list, where FSDP shards it as a block",
            );
        }
        let blocks_per_group = match self.model.huggingface.is_some() {
            true => 2,
            false => 1,
        };
        Ok(Some(Sharding {
            world: self.world_size,
            blocks_per_group,
            reshard_after_forward: self.reshard_after_forward.unwrap_or(true),
        }))
    }

    /// One line that tells jobs apart: an MLP (a flatten, linear layers with bias, one kind
    /// of activation and dropout after it) as `MLP 1x28x28-128-10 relu, sgd, 32-true, pytorch`,
    /// with `dropout 0.2/0` when a hidden layer has some; any other model as its layers in a
    /// word each (`CNN 3x32x32 conv32k3p1-bn-relu-max2-...`, activations by name, a residual
    /// block as `res(...)`), or by its counts past 24 layers.
    pub fn summary(&self) -> String {
        let shape: Vec<String> = self.model.input_shape.iter().map(u64::to_string).collect();
        let input = match self.model.tokens {
            Some(t) => format!("{}tok/{}", t.sequence_length, t.vocab_size),
            None => shape.join("x"),
        };
        let lora = self.model.lora.as_ref().map_or(String::new(), |lora| {
            let targets = match &lora.target_modules {
                TargetModules::Names(names) => names.join("+"),
                TargetModules::One(name) => name.clone(),
            };
            format!("lora r{} {targets}, ", lora.r)
        });
        let sharding = match self.sharding {
            ShardingSpec::Fsdp => match self.reshard_after_forward {
                Some(false) => format!(", fsdp over {} kept gathered", self.world_size),
                _ => format!(", fsdp over {}", self.world_size),
            },
            ShardingSpec::None => String::new(),
        };
        let training = format!(
            "{lora}{}, {}, {}{sharding}",
            serde_name(&self.optimizer.name),
            self.precision,
            self.framework.name()
        );
        let Ok(layers) = self.model.layers() else {
            return format!("model {input}, {training}");
        };
        let Ok(model) = crate::modules::Sequential::build(
            &layers,
            &self.model.sample_shape(),
            &crate::modules::Path::new("model.layers"),
            &mut crate::modules::Context {
                tokens: self.model.tokens.map(|t| t.vocab_size),
                ..Default::default()
            },
        ) else {
            return format!("model {input}, {training}");
        };
        let tokens: Vec<Token> = model.layers().iter().map(|l| l.token()).collect();
        if let Some(mlp) = mlp_summary(&tokens) {
            return format!("MLP {input}-{mlp}, {training}");
        }
        let kind = match layers
            .iter()
            .flat_map(LayerSpec::nested)
            .any(|l| matches!(l, LayerSpec::Conv2d(_) | LayerSpec::Residual(_)))
        {
            true => "CNN",
            false => "NN",
        };
        let words: Vec<String> = tokens
            .into_iter()
            .filter_map(|token| match token {
                Token::Hidden => None,
                Token::Width(width) => Some(format!("linear{width}")),
                Token::Activation(name) => Some(name.to_string()),
                Token::Dropout(p) => Some(format!("dropout{p}")),
                Token::Layer(word) => Some(word),
            })
            .collect();
        match words.len() {
            0..=24 => format!("{kind} {input} {}, {training}", words.join("-")),
            n => {
                let parameters = crate::modules::Module::parameters(&model);
                let counts = match crate::modules::Parameter::counts(&parameters) {
                    None => "more parameters than u64 counts".to_string(),
                    Some(c) if c.all == c.trainable => format!("{} parameters", c.all),
                    Some(c) => format!("{} parameters ({} trainable)", c.all, c.trainable),
                };
                format!("{kind} {input} {n} layers, {counts}, {training}")
            }
        }
    }

    /// The learning rate in effect: the job's, or the optimizer's default.
    pub fn learning_rate(&self) -> f32 {
        self.optimizer
            .learning_rate
            .unwrap_or_else(|| self.optimizer.name.default_learning_rate()) as f32
    }

    /// The largest batch the search may probe: `search.max`, and `dataset_size` when given.
    pub fn batch_cap(&self) -> u64 {
        self.dataset_size
            .map_or(self.search.max, |n| n.min(self.search.max))
    }

    /// Which cap [`JobSpec::batch_cap`] is: `dataset_size` when it is the smaller, else `max`.
    pub fn cap_reason(&self) -> LimitedBy {
        match self.dataset_size {
            Some(n) if n <= self.search.max => LimitedBy::DatasetSize,
            _ => LimitedBy::Max,
        }
    }
}

impl From<LayerError> for JobError {
    fn from(error: LayerError) -> JobError {
        JobError::new(error.field, error.reason)
    }
}

impl ModelSpec {
    /// One sample's shape: `input_shape`, or `[sequence_length]` token ids.
    pub fn sample_shape(&self) -> Vec<u64> {
        match self.tokens {
            Some(t) => vec![t.sequence_length],
            None => self.input_shape.clone(),
        }
    }

    /// The model as a layer list: `model.layers`, or the shorthand's MLP written as one (a
    /// flatten when the input has more than one dimension, then `linear` and the activation per
    /// hidden width, and the `linear` layer of the logits).
    pub fn layers(&self) -> Result<Vec<LayerSpec>, LayerError> {
        if let Some(list) = &self.layers {
            return Ok(list.clone());
        }
        let activation = self.activation.unwrap_or_default();
        let mlp = mlp_layers(&self.hidden_layers, self.num_classes, activation, &[]);
        let flatten = (self.input_shape.len() > 1)
            .then_some(LayerSpec::Flatten(crate::modules::NoArguments {}));
        Ok(flatten.into_iter().chain(mlp).collect())
    }

    /// Checks every width and the shorthand against a layer list; returns the model's layers.
    fn validate(&self) -> Result<Vec<LayerSpec>, JobError> {
        if let Some(tokens) = self.tokens {
            if !self.input_shape.is_empty() {
                return Err(JobError::new(
                    "model.input_shape",
                    "give model.input_shape (values) or model.tokens (token ids), not both",
                ));
            }
            check_dimension("model.tokens.sequence_length", tokens.sequence_length)?;
            check_dimension("model.tokens.vocab_size", tokens.vocab_size)?;
            if self.layers.is_none() {
                return Err(JobError::new(
                    "model.layers",
                    "a model over model.tokens is a layer list starting with an embedding, e.g. \
                     [{\"embedding\": {\"embedding_dim\": 256}}, ...]",
                ));
            }
        } else if self.input_shape.is_empty() {
            return Err(JobError::new(
                "model.input_shape",
                "must have at least one dimension, e.g. [1, 28, 28]",
            ));
        }
        for (i, &dim) in self.input_shape.iter().enumerate() {
            check_dimension(&format!("model.input_shape[{i}]"), dim)?;
        }
        for (i, &width) in self.hidden_layers.iter().enumerate() {
            check_dimension(&format!("model.hidden_layers[{i}]"), width)?;
        }
        check_dimension("model.num_classes", self.num_classes)?;
        if self.num_classes < 2 {
            return Err(JobError::new(
                "model.num_classes",
                "must be at least 2 for a softmax cross-entropy loss",
            ));
        }
        self.input_shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&f| f <= MAX_DIMENSION)
            .ok_or_else(|| {
                JobError::new(
                    "model.input_shape",
                    format!("the flattened input must have at most {MAX_DIMENSION} features"),
                )
            })?;
        if self.layers.is_some() {
            let shorthand = if !self.hidden_layers.is_empty() {
                Some("model.hidden_layers")
            } else {
                self.activation.map(|_| "model.activation")
            };
            if let Some(field) = shorthand {
                return Err(JobError::new(
                    field,
                    "give either model.layers or the shorthand (hidden_layers, activation), not \
                     both; a layer list names its activations as layers, e.g. {\"relu\": {}}",
                ));
            }
        }
        Ok(self.layers()?)
    }
}

/// An MLP's summary, `784-128-10 relu dropout 0.2/0`, if the layers are one: an optional
/// flatten, then hidden linear layers (with bias) each with the same activation and maybe
/// dropout, then the logits' linear layer.
fn mlp_summary(tokens: &[Token]) -> Option<String> {
    let mut widths = Vec::new();
    let mut dropout: Vec<f32> = Vec::new();
    let mut activation: Option<&str> = None;
    let mut rest = tokens
        .iter()
        .skip_while(|t| **t == Token::Hidden)
        .peekable();
    while let Some(token) = rest.next() {
        let Token::Width(width) = token else {
            return None;
        };
        widths.push(width.to_string());
        match rest.next() {
            None => break,
            Some(Token::Activation(name)) if activation.is_none_or(|a| a == *name) => {
                activation = Some(name);
            }
            Some(_) => return None,
        }
        dropout.push(match rest.peek() {
            Some(Token::Dropout(p)) => {
                rest.next();
                *p
            }
            _ => 0.0,
        });
    }
    let dropped = match dropout.iter().any(|&p| p > 0.0) {
        true => {
            let each: Vec<String> = dropout.iter().map(f32::to_string).collect();
            format!(" dropout {}", each.join("/"))
        }
        false => String::new(),
    };
    Some(format!(
        "{} {}{dropped}",
        widths.join("-"),
        activation.unwrap_or("relu")
    ))
}

impl SearchSpec {
    fn validate(&self) -> Result<(), JobError> {
        for (field, value) in [
            ("search.start", self.start),
            ("search.max", self.max),
            ("search.multiple_of", self.multiple_of),
        ] {
            if value == 0 {
                return Err(JobError::new(field, "must be at least 1"));
            }
        }
        for (field, value) in [("search.start", self.start), ("search.max", self.max)] {
            if value > MAX_EXACT_INTEGER {
                return Err(JobError::new(
                    field,
                    format!("must be at most 2^53 ({MAX_EXACT_INTEGER})"),
                ));
            }
        }
        if self.start > self.max {
            return Err(JobError::new(
                "search.start",
                format!("must not exceed search.max ({} > {})", self.start, self.max),
            ));
        }
        if self.multiple_of > 1 << 20 {
            return Err(JobError::new("search.multiple_of", "must be at most 2^20"));
        }
        if !(self.tolerance > 0.0 && self.tolerance < 1.0) {
            return Err(JobError::new(
                "search.tolerance",
                format!("must be in (0, 1), got {}", self.tolerance),
            ));
        }
        if !(1..=1000).contains(&self.steps_per_probe) {
            return Err(JobError::new(
                "search.steps_per_probe",
                "must be between 1 and 1000",
            ));
        }
        if !(0.0..=MAX_MIN_TIMED_SECONDS).contains(&self.min_timed_seconds) {
            return Err(JobError::new(
                "search.min_timed_seconds",
                format!(
                    "must be between 0 and {MAX_MIN_TIMED_SECONDS}, got {}",
                    self.min_timed_seconds
                ),
            ));
        }
        if !(self.knee_tolerance > 0.0 && self.knee_tolerance < 1.0) {
            return Err(JobError::new(
                "search.knee_tolerance",
                format!("must be in (0, 1), got {}", self.knee_tolerance),
            ));
        }
        if self.throughput_probes > 16 {
            return Err(JobError::new(
                "search.throughput_probes",
                "must be at most 16",
            ));
        }
        Ok(())
    }
}

fn check_dimension(field: &str, value: u64) -> Result<(), JobError> {
    if value == 0 {
        return Err(JobError::new(field, "must be at least 1"));
    }
    if value > MAX_DIMENSION {
        return Err(JobError::new(
            field,
            format!("must be at most {MAX_DIMENSION}"),
        ));
    }
    Ok(())
}

/// A job builder for the crate's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// A validated MLP job: `input` features through `hidden` widths to `classes`, trained with
    /// `optimizer`; `extra` adds members to the JSON, each after a comma: `, "headroom": 0.5`.
    pub(crate) fn mlp(
        input: &[u64],
        hidden: &[u64],
        classes: u64,
        optimizer: &str,
        extra: &str,
    ) -> super::Job {
        let text = format!(
            r#"{{"model": {{"input_shape": {input:?}, "hidden_layers": {hidden:?}, "num_classes": {classes}}},
                 "optimizer": {{"name": "{optimizer}"}} {extra}}}"#
        );
        super::Job::from_json(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::MAX_LAYERS;
    use crate::plan::HuggingFaceStep;
    use crate::program::Instr;
    use serde_json::{json, Value};

    fn error_of(text: &str) -> JobError {
        Job::from_json(text).expect_err("job should be rejected")
    }

    const MINIMAL: &str = r#"{"model": {"input_shape": [1, 28, 28], "hidden_layers": [128],
        "num_classes": 10}, "optimizer": {"name": "sgd"}}"#;

    #[test]
    fn minimal_job_gets_defaults() {
        let job = Job::from_json(MINIMAL).unwrap();
        assert_eq!(job.precision, Precision::F32True);
        assert_eq!(job.headroom, 0.8);
        assert_eq!(job.search, SearchSpec::default());
        assert_eq!(job.model.activation, Some(Activation::Relu));
        assert_eq!(job.learning_rate(), 0.01);
        assert_eq!(job.batch_cap(), 1 << 30);
        assert_eq!(
            job.summary(),
            "MLP 1x28x28-128-10 relu, sgd, 32-true, pytorch"
        );
    }

    /// `128.0` is the integer 128, as JSON Schema reads it; `128.5` and numbers past 2^53 (the
    /// schema's maximum for batch sizes and the dataset) are errors naming their field.
    #[test]
    fn whole_floats_are_integers_and_sizes_stop_at_two_to_the_53() {
        let job = |extra: &str| {
            Job::from_json(&format!(
                r#"{{"model": {{"input_shape": [1.0, 28, 28.0], "hidden_layers": [128.0],
                    "num_classes": 10.0}}, "optimizer": {{"name": "sgd"}}{extra}}}"#
            ))
        };
        let parsed = job("").unwrap();
        assert_eq!(parsed.model.input_shape, [1, 28, 28]);
        assert_eq!(parsed.model.hidden_layers, [128]);
        assert_eq!(parsed.learning_rate(), 0.01);
        let field = |extra: &str| job(extra).unwrap_err().field;
        assert_eq!(field(r#", "dataset_size": 2.5"#), "dataset_size");
        assert_eq!(
            field(r#", "dataset_size": 9007199254740993"#),
            "dataset_size"
        );
        assert_eq!(
            field(r#", "search": {"max": 9007199254740993}"#),
            "search.max"
        );
        assert!(job(r#", "dataset_size": 9007199254740992, "search": {"max": 1e15}"#).is_ok());
    }

    #[test]
    fn full_job_from_the_contract_parses() {
        let job = Job::from_json(
            r#"{"model": {"input_shape": [3, 32, 32], "hidden_layers": [128], "num_classes": 10,
                "activation": "relu"},
              "optimizer": {"name": "adam", "learning_rate": 0.001},
              "dtype": "f32", "dataset_size": 50000, "headroom": 0.8,
              "search": {"start": 16, "max": 1073741824, "multiple_of": 8, "tolerance": 0.01,
                         "steps_per_probe": 2, "strategy": "double"}}"#,
        )
        .unwrap();
        assert_eq!(job.optimizer.name, OptimizerKind::Adam);
        assert_eq!(job.batch_cap(), 50000);
    }

    #[test]
    fn an_mlp_as_a_layer_list_plans_as_its_shorthand() {
        let shorthand = Job::from_json(
            r#"{"model": {"input_shape": [1, 28, 28], "hidden_layers": [128, 64], "num_classes": 10,
                "activation": "tanh"}, "optimizer": {"name": "adam"}}"#,
        )
        .unwrap();
        let listed = Job::from_json(
            r#"{"model": {"input_shape": [1, 28, 28], "num_classes": 10, "layers": [
                {"flatten": {}}, {"linear": {"out_features": 128}}, {"tanh": {}},
                {"linear": {"out_features": 64}}, {"tanh": {}}, {"linear": {"out_features": 10}}]},
                "optimizer": {"name": "adam"}}"#,
        )
        .unwrap();
        assert_eq!(listed.plan(), shorthand.plan());
        assert_eq!(listed.summary(), shorthand.summary());
        // The list is kept as written, with no shorthand added beside it.
        let normalised = serde_json::to_value(&listed).unwrap();
        assert!(
            normalised["model"].get("activation").is_none(),
            "{normalised}"
        );
        assert_eq!(
            normalised["model"]["layers"][2],
            serde_json::json!({"tanh": {}})
        );
        assert_eq!(
            serde_json::to_value(&shorthand).unwrap()["model"]["activation"],
            "tanh"
        );
    }

    #[test]
    fn an_image_model_in_any_order_pytorch_runs_is_read_checked_and_planned() {
        let lenet = r#"{"model": {"input_shape": [1, 28, 28], "num_classes": 10, "layers": [
            {"conv2d": {"out_channels": 6, "kernel_size": 5, "padding": 2}}, {"relu": {}},
            {"max_pool2d": {"kernel_size": 2}}, {"conv2d": {"out_channels": 16, "kernel_size": 5}},
            {"relu": {}}, {"max_pool2d": {"kernel_size": 2}}, {"flatten": {}},
            {"linear": {"out_features": 120}}, {"relu": {}}, {"linear": {"out_features": 84}},
            {"relu": {}}, {"linear": {"out_features": 10}}]}, "optimizer": {"name": "sgd"}}"#;
        let job = Job::from_json(lenet).unwrap();
        assert_eq!(job.plan().parameter_count(), 61706);
        assert_eq!(
            job.summary(),
            "CNN 1x28x28 conv6k5p2-relu-max2-conv16k5-relu-max2-linear120-relu-linear84-relu-\
             linear10, sgd, 32-true, pytorch"
        );
        // A convolution with its default bias before batch norm, pooling before the activation,
        // a convolution with no activation after it: PyTorch runs each, and so does headroom.
        let normed = lenet.replace(
            r#"{"relu": {}}, {"max_pool2d": {"kernel_size": 2}}, {"flatten""#,
            r#"{"batch_norm2d": {}}, {"max_pool2d": {"kernel_size": 2}}, {"flatten""#,
        );
        let job = Job::from_json(&normed).unwrap();
        assert_eq!(job.plan().parameter_count(), 61706 + 2 * 16);
        let stacked = lenet.replace(
            r#"{"conv2d": {"out_channels": 16, "kernel_size": 5}}"#,
            r#"{"conv2d": {"out_channels": 16, "kernel_size": 5}}, {"conv2d": {"out_channels": 16, "kernel_size": 1, "groups": 16, "bias": false}}"#,
        );
        let job = Job::from_json(&stacked).unwrap();
        assert_eq!(job.plan().parameter_count(), 61706 + 16);
        // A residual block whose body keeps the shape needs no shortcut; one that changes it
        // says which shortcut would match.
        let residual = lenet.replace(
            r#"{"relu": {}}, {"max_pool2d": {"kernel_size": 2}}, {"flatten""#,
            r#"{"relu": {}}, {"residual": {"layers": [{"conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}}]}}, {"max_pool2d": {"kernel_size": 2}}, {"flatten""#,
        );
        let job = Job::from_json(&residual).unwrap();
        assert_eq!(job.plan().parameter_count(), 61706 + 16 * 16 * 9 + 16);
        assert!(
            job.summary().contains("-res(conv16k3p1)-"),
            "{}",
            job.summary()
        );
        let strided = residual.replace(r#""padding": 1}}]}}"#, r#""padding": 1, "stride": 2}}]}}"#);
        let error = Job::from_json(&strided).unwrap_err();
        assert_eq!(error.field, "model.layers[5]");
        assert!(
            error.reason.contains("[16, 10, 10] into [16, 5, 5]")
                && error.reason.contains("\"shortcut\""),
            "{error}"
        );
        let shortcut = strided.replace(
            r#""stride": 2}}]}}"#,
            r#""stride": 2}}], "shortcut": [{"conv2d": {"out_channels": 16, "kernel_size": 1, "stride": 2, "bias": false}}, {"batch_norm2d": {}}]}}"#,
        );
        let job = Job::from_json(&shortcut).unwrap();
        assert_eq!(
            job.plan().parameter_count(),
            61706 + 16 * 16 * 9 + 16 + 16 * 16 + 2 * 16 - 400 * 120 + 16 * 2 * 2 * 120
        );
        let wrong_classes = lenet.replace(r#""num_classes": 10"#, r#""num_classes": 12"#);
        let error = Job::from_json(&wrong_classes).unwrap_err();
        assert_eq!(error.field, "model.layers");
        assert!(error.reason.contains("12 out_features"), "{error}");
        let both = lenet.replace(
            r#""num_classes": 10,"#,
            r#""num_classes": 10, "hidden_layers": [8],"#,
        );
        assert_eq!(
            Job::from_json(&both).unwrap_err().field,
            "model.hidden_layers"
        );
        let activation = lenet.replace(
            r#""num_classes": 10,"#,
            r#""num_classes": 10, "activation": "relu","#,
        );
        assert_eq!(
            Job::from_json(&activation).unwrap_err().field,
            "model.activation"
        );
        let unknown = lenet.replace(r#"{"relu": {}}"#, r#"{"swish": {}}"#);
        assert!(Job::from_json(&unknown)
            .unwrap_err()
            .field
            .starts_with("model.layers[1]"));
        // An in-place activation after one that saves its output would change what backward
        // reads: refused, naming the field.
        let inplace = lenet.replace(
            r#"{"relu": {}}, {"max_pool2d""#,
            r#"{"relu": {}}, {"relu": {"inplace": true}}, {"max_pool2d""#,
        );
        let error = Job::from_json(&inplace).unwrap_err();
        assert_eq!(error.field, "model.layers[5].relu.inplace");
    }

    #[test]
    fn bad_layer_lists_get_an_error_naming_the_layer() {
        let job = |layers: &str| {
            format!(
                r#"{{"model": {{"input_shape": [3, 8, 8], "num_classes": 10, "layers": [{layers}]}},
                    "optimizer": {{"name": "sgd"}}}}"#
            )
        };
        let end = r#"{"flatten": {}}, {"linear": {"out_features": 10}}"#;
        let cases = [
            // Shapes that cannot meet.
            (
                format!(r#"{{"flatten": {{}}}}, {{"batch_norm2d": {{}}}}, {end}"#),
                "model.layers[1]",
                "[channels, height, width]",
            ),
            (
                format!(r#"{{"conv2d": {{"out_channels": 4, "kernel_size": 9}}}}, {end}"#),
                "model.layers[0].conv2d.kernel_size",
                "wider than the input",
            ),
            (
                r#"{"conv2d": {"out_channels": 4, "kernel_size": 3}}, {"linear": {"out_features": 10}}"#
                    .to_string(),
                "model.layers",
                "end the list with a linear layer of 10",
            ),
            // Groups that do not divide the channels.
            (
                format!(r#"{{"conv2d": {{"out_channels": 4, "kernel_size": 3, "groups": 3}}}}, {end}"#),
                "model.layers[0].conv2d.groups",
                "must divide",
            ),
            // Channel counts whose products overflow.
            (
                format!(
                    r#"{{"conv2d": {{"out_channels": 4294967296, "kernel_size": 1}}}},
                       {{"conv2d": {{"out_channels": 4294967296, "kernel_size": 1}}}}, {end}"#
                ),
                "model.layers[1]",
                "multiply past",
            ),
            (
                format!(r#"{{"max_pool2d": {{"kernel_size": 2, "padding": 2}}}}, {end}"#),
                "model.layers[0].max_pool2d.padding",
                "at most half the window",
            ),
            (
                format!(r#"{{"layer_norm": {{"eps": 0}}}}, {end}"#),
                "model.layers[0].layer_norm.eps",
                "must be a positive number",
            ),
            (
                format!(r#"{{"gated_mlp": {{"intermediate_size": 0}}}}, {end}"#),
                "model.layers[0].gated_mlp.intermediate_size",
                "must be between 1 and",
            ),
        ];
        for (layers, field, reason) in cases {
            let error = Job::from_json(&job(&layers)).unwrap_err();
            assert_eq!(error.field, field, "{layers}: {error}");
            assert!(error.reason.contains(reason), "{layers}: {error}");
        }
        // 10,000 layers: refused at the first past the limit, without building the rest.
        let deep = vec![r#"{"relu": {}}"#; 10_000].join(", ");
        let error = Job::from_json(&job(&format!("{deep}, {end}"))).unwrap_err();
        assert_eq!(error.field, format!("model.layers[{MAX_LAYERS}]"));
        assert!(error.reason.contains("at most 1000 layers"), "{error}");
    }

    #[test]
    fn a_model_over_tokens_is_checked_by_field() {
        let job = |model: &str| {
            format!(
                r#"{{"model": {{{model}, "num_classes": 50}}, "optimizer": {{"name": "adamw"}}}}"#
            )
        };
        let tokens = r#""tokens": {"sequence_length": 8, "vocab_size": 50}"#;
        let lm = r#"{"embedding": {"embedding_dim": 4}}, {"linear": {"out_features": 50}}"#;
        let plan = Job::from_json(&job(&format!(r#"{tokens}, "layers": [{lm}]"#)))
            .unwrap()
            .plan;
        assert_eq!((plan.vocab(), plan.loss_positions()), (Some(50), 8));
        // A tied head's weights are the table: one parameter, counted once.
        let tied = lm.replace(
            r#""out_features": 50"#,
            r#""out_features": 50, "tied": true"#,
        );
        let plan = Job::from_json(&job(&format!(r#"{tokens}, "layers": [{tied}]"#)))
            .unwrap()
            .plan;
        assert_eq!(plan.parameter_count(), 50 * 4 + 50);
        let cases = [
            (
                format!(r#"{tokens}, "input_shape": [8], "layers": [{lm}]"#),
                "model.input_shape",
                "not both",
            ),
            (
                tokens.to_string(),
                "model.layers",
                "starting with an embedding",
            ),
            (
                r#""tokens": {"sequence_length": 0, "vocab_size": 50}, "layers": []"#.to_string(),
                "model.tokens.sequence_length",
                "at least 1",
            ),
            (
                format!(r#"{tokens}, "layers": [{{"linear": {{"out_features": 50}}}}]"#),
                "model.layers[0]",
                "token ids reach this linear",
            ),
            (
                format!(r#""input_shape": [8], "layers": [{lm}]"#),
                "model.layers[0]",
                "an embedding reads token ids",
            ),
            (
                format!(
                    r#"{tokens}, "layers": [{{"embedding": {{"embedding_dim": 4, "padding_idx": -51}}}},
                       {{"linear": {{"out_features": 50}}}}]"#
                ),
                "model.layers[0].embedding.padding_idx",
                "within the vocabulary",
            ),
            (
                format!(
                    r#"{tokens}, "layers": [{{"embedding": {{"embedding_dim": 4}}}},
                       {{"linear": {{"out_features": 49}}}}]"#
                ),
                "model.layers",
                "[positions, 50] for one label a position",
            ),
            (
                format!(
                    r#"{tokens}, "layers": [{{"embedding": {{"embedding_dim": 4}}}},
                       {{"linear": {{"out_features": 50, "tied": true, "bias": false}}}},
                       {{"linear": {{"out_features": 5}}}}, {{"linear": {{"out_features": 50, "tied": true}}}}]"#
                ),
                "model.layers[3].linear.tied",
                "the embedding table is 50 x 4, and this layer's weights would be 50 x 5",
            ),
            (
                format!(
                    r#"{tokens}, "layers": [{{"embedding": {{"embedding_dim": 4}}}},
                       {{"positional_embedding": {{"max_positions": 7}}}}, {{"linear": {{"out_features": 50}}}}]"#
                ),
                "model.layers[1].positional_embedding.max_positions",
                "the table's 7 rows cannot place 8 positions",
            ),
            (
                r#""input_shape": [4], "layers": [{"linear": {"out_features": 50, "tied": true}}]"#
                    .to_string(),
                "model.layers[0].linear.tied",
                "has no embedding before it",
            ),
        ];
        for (model, field, reason) in cases {
            let error = Job::from_json(&job(&model)).unwrap_err();
            assert_eq!(error.field, field, "{model}: {error}");
            assert!(error.reason.contains(reason), "{model}: {error}");
        }
    }

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

    /// Qwen2.5-0.5B's config.json, as the Hub serves it.
    fn qwen25() -> Value {
        json!({
            "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
            "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
            "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "transformers_version": "4.40.1", "use_cache": true, "use_sliding_window": false,
            "vocab_size": 151936
        })
    }

    #[test]
    fn a_qwen2_config_has_biased_query_key_and_value_projections_only() {
        let job = llama_job(qwen25()).unwrap();
        // transformers' Qwen2ForCausalLM on the meta device counts 494,032,768.
        assert_eq!(job.plan().parameter_count(), 494_032_768);
        let layers = serde_json::to_value(&job.spec().model.layers).unwrap();
        let attention = &layers[1]["residual"]["layers"][1]["self_attention"];
        assert_eq!(attention["bias"], json!(true), "{attention}");
        assert_eq!(attention["output_bias"], json!(false), "{attention}");
        let refused = [
            ("use_sliding_window", json!(true), "set it to false"),
            (
                "layer_types",
                json!(["full_attention", "sliding_attention"]),
                "\"full_attention\"",
            ),
        ];
        assert_each_refused(qwen25, llama_job, &refused);
    }

    /// GPT-2 (small)'s config.json, as the Hub serves it.
    fn gpt2() -> Value {
        json!({
            "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
            "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
            "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
            "resid_pdrop": 0.1, "summary_activation": null, "summary_first_dropout": 0.1,
            "summary_proj_to_labels": true, "summary_type": "cls_index",
            "summary_use_proj": true, "vocab_size": 50257
        })
    }

    #[test]
    fn a_gpt2_config_is_gpt2_s_layers_with_its_dropouts() {
        let job = gpt2_job(gpt2()).unwrap();
        // transformers' GPT2LMHeadModel on the meta device counts 124,439,808 (tied head)...
        assert_eq!(job.plan().parameter_count(), 124_439_808);
        let mut example: Value =
            serde_json::from_str(include_str!("../../../examples/gpt2-small.json")).unwrap();
        let layers = &mut example["model"]["layers"];
        set(layers, "gelu", json!({"implementation": "composite"}));
        set(
            layers,
            "self_attention",
            json!({"fused_qkv": true, "upcast_softmax": false}),
        );
        assert_reads_as(&job, &example.to_string());
        let layers = serde_json::to_value(&job.spec().model.layers).unwrap();
        let text = layers.to_string();
        assert_eq!(text.matches("\"self_attention\"").count(), 12);
        // The embeddings' dropout, and two a layer after its blocks.
        assert_eq!(
            text.matches("{\"dropout\":{\"p\":0.1}}").count(),
            25,
            "{text}"
        );
        assert_eq!(text.matches("\"dropout\":0.1").count(), 12, "{text}");
        // ... and 6,558,280 for two layers of 64 with a head of its own and n_inner 100.
        let small = with(
            gpt2(),
            [
                ("n_layer", json!(2)),
                ("n_embd", json!(64)),
                ("n_head", json!(4)),
                ("n_inner", json!(100)),
                ("tie_word_embeddings", json!(false)),
            ],
        );
        let job = gpt2_job(small).unwrap();
        assert_eq!(job.plan().parameter_count(), 6_558_280);
        let refused = [
            ("scale_attn_weights", json!(false), "set it to true"),
            ("add_cross_attention", json!(true), "set it to false"),
            ("activation_function", json!("gelu_fast"), "\"gelu_new\""),
            ("attn_pdrop", json!(1.0), "must be in [0, 1)"),
            ("n_layer", json!(100), "at most 99"),
        ];
        assert_each_refused(gpt2, gpt2_job, &refused);
        let error = llama_job(gpt2()).unwrap_err();
        assert_eq!(error.field, "model.tokens.sequence_length");
        assert!(error.reason.contains("n_positions (1024)"), "{error:?}");
    }

    /// ViT's config.json as `google/vit-base-patch16-224` writes it (its labels shortened).
    fn vit() -> Value {
        let labels: serde_json::Map<String, Value> = (0..1000)
            .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
            .collect();
        json!({
            "architectures": ["ViTForImageClassification"], "attention_probs_dropout_prob": 0.0,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 768,
            "id2label": labels, "image_size": 224, "initializer_range": 0.02,
            "intermediate_size": 3072, "layer_norm_eps": 1e-12, "model_type": "vit",
            "num_attention_heads": 12, "num_channels": 3, "num_hidden_layers": 12,
            "patch_size": 16, "qkv_bias": true
        })
    }

    fn vit_job(model: Value) -> Result<Job, JobError> {
        Job::from_value(json!({"model": model, "optimizer": {"name": "adamw"}}))
    }

    #[test]
    fn a_vit_config_is_an_image_classifier() {
        let job = vit_job(json!({"huggingface": vit()})).unwrap();
        // transformers' ViTForImageClassification counts 86,567,656 for 1,000 labels.
        assert_eq!(job.plan().parameter_count(), 86_567_656);
        let model = &job.spec().model;
        assert_eq!(model.input_shape, [3, 224, 224]);
        assert_eq!(model.num_classes, 1000);
        // ... and 67,474 for this one, whose dropouts become layers.
        let small = with(
            vit(),
            [
                ("hidden_size", json!(64)),
                ("num_hidden_layers", json!(2)),
                ("num_attention_heads", json!(4)),
                ("intermediate_size", json!(100)),
                ("image_size", json!([32, 32])),
                ("patch_size", json!(4)),
                ("qkv_bias", json!(false)),
                ("hidden_dropout_prob", json!(0.1)),
                ("attention_probs_dropout_prob", json!(0.2)),
                ("id2label", Value::Null),
                ("num_labels", json!(10)),
            ],
        );
        let job = vit_job(json!({"huggingface": small})).unwrap();
        assert_eq!(job.plan().parameter_count(), 67_474);
        let text = serde_json::to_value(&job.spec().model.layers)
            .unwrap()
            .to_string();
        assert_eq!(
            text.matches("{\"dropout\":{\"p\":0.1}}").count(),
            5,
            "{text}"
        );
        assert_eq!(text.matches("\"dropout\":0.2").count(), 2, "{text}");
        let refused = [
            (
                json!({"huggingface": vit(), "tokens": {"sequence_length": 8}}),
                "model.tokens",
            ),
            (
                json!({"huggingface": vit(), "input_shape": [3, 32, 32]}),
                "model.input_shape",
            ),
            (
                json!({"huggingface": vit(), "num_classes": 10}),
                "model.num_classes",
            ),
        ];
        for (model, field) in refused {
            assert_eq!(vit_job(model).unwrap_err().field, field);
        }
        for (name, value) in [
            ("image_size", json!([224, 192])),
            ("hidden_act", json!("quick_gelu")),
            ("hidden_dropout_prob", json!(1)),
        ] {
            let mut config = vit();
            config[name] = value;
            let error = vit_job(json!({"huggingface": config})).unwrap_err();
            assert_eq!(error.field, format!("model.huggingface.{name}"), "{error}");
        }
        let again =
            json!({"huggingface": vit(), "input_shape": [3, 224, 224], "num_classes": 1000});
        assert!(vit_job(again).is_ok());
        let counted = json!({"huggingface": vit(), "parameter_count": 86_567_656});
        assert!(vit_job(counted).is_ok());
        let miscounted = json!({"huggingface": vit(), "parameter_count": 86_567_655});
        let error = vit_job(miscounted).unwrap_err();
        assert_eq!(error.field, "model.parameter_count");
        assert!(error.reason.contains("86567656"), "{error}");
    }

    fn gpt2_job(config: Value) -> Result<Job, JobError> {
        Job::from_value(json!({
            "model": {"huggingface": config, "tokens": {"sequence_length": 1024}},
            "optimizer": {"name": "adamw"}
        }))
    }

    /// peft adapts GPT-2's `c_attn` as one pair over the split projection, which headroom does
    /// not model: LoRA on the query, key or value of a fused projection is refused by the
    /// attention's field; on the MLP's linear layers it is taken.
    #[test]
    fn lora_on_gpt2_s_fused_query_key_and_value_is_refused_and_elsewhere_taken() {
        let lora_job = |lora: Value| {
            Job::from_value(json!({
                "model": {"huggingface": gpt2(), "tokens": {"sequence_length": 64}, "lora": lora},
                "optimizer": {"name": "adamw"}
            }))
        };
        let refused = lora_job(json!({"target_modules": ["q_proj"]})).unwrap_err();
        assert!(
            refused.field.ends_with("self_attention.fused_qkv"),
            "{refused}"
        );
        assert!(refused.reason.contains("LoRA"), "{refused}");
        let taken = lora_job(json!({"r": 4, "target_modules": ["linear"]})).unwrap();
        // Rank 4 on each layer's two MLP layers (768 -> 3072 -> 768), twelve layers.
        let trainable = taken.plan().trainable_parameter_count();
        assert_eq!(trainable, 12 * 2 * 4 * (768 + 3072));
    }

    fn llama_job(config: Value) -> Result<Job, JobError> {
        Job::from_value(json!({
            "model": {"huggingface": config, "tokens": {"sequence_length": 2048}},
            "optimizer": {"name": "adamw", "learning_rate": 0.003},
            "precision": "bf16-mixed"
        }))
    }

    #[test]
    fn smollm2_s_config_is_the_example_s_layer_list_with_hugging_face_s_norm() {
        let from_config = llama_job(smollm2()).unwrap();
        assert_eq!(from_config.plan().parameter_count(), 134_515_008);
        let mut example: Value =
            serde_json::from_str(include_str!("../../../examples/smollm2-135m.json")).unwrap();
        let composite = json!({"implementation": "composite"});
        set(&mut example["model"]["layers"], "rms_norm", composite);
        assert_reads_as(&from_config, &example.to_string());
        let step = from_config.plan().hugging_face;
        assert_eq!(step, Some(HuggingFaceStep { use_cache: true }));
    }

    #[test]
    fn checkpointing_or_the_config_turns_the_cache_off() {
        let checkpointed = Job::from_value(json!({
            "model": {"huggingface": smollm2(), "tokens": {"sequence_length": 64},
                      "gradient_checkpointing": true},
            "optimizer": {"name": "adamw"}
        }));
        let uncached = llama_job(with(smollm2(), [("use_cache", json!(false))])).unwrap();
        for job in [checkpointed.unwrap(), uncached] {
            let step = job.plan().hugging_face;
            assert_eq!(step, Some(HuggingFaceStep { use_cache: false }));
        }
        let refused = llama_job(with(smollm2(), [("use_cache", json!("no"))])).unwrap_err();
        assert_eq!(refused.field, "model.huggingface.use_cache", "{refused}");
    }

    /// `fields` set in every layer of `layers` of kind `of` (nested too): an example's layers as
    /// Hugging Face's modules compute them (`LlamaRMSNorm`, `NewGELUActivation`, GPT-2's
    /// attention).
    fn set(layers: &mut Value, of: &str, fields: Value) {
        for layer in layers.as_array_mut().into_iter().flatten() {
            for (kind, args) in layer.as_object_mut().into_iter().flatten() {
                match (kind == of, args.get_mut("layers")) {
                    (true, _) => {
                        for (field, value) in fields.as_object().into_iter().flatten() {
                            args[field] = value.clone();
                        }
                    }
                    (false, Some(inner)) => set(inner, of, fields.clone()),
                    _ => {}
                }
            }
        }
    }

    /// `config` with `fields` set.
    fn with<const N: usize>(mut config: Value, fields: [(&str, Value); N]) -> Value {
        for (field, value) in fields {
            config[field] = value;
        }
        config
    }

    /// Asserts that `config()` with each `(field, value, reason)` set is refused by that field
    /// of `model.huggingface`, for that reason, as `job` reads it.
    fn assert_each_refused(
        config: fn() -> Value,
        job: fn(Value) -> Result<Job, JobError>,
        refused: &[(&str, Value, &str)],
    ) {
        for (field, value, reason) in refused {
            let error = job(with(config(), [(*field, value.clone())])).unwrap_err();
            assert_eq!(error.field, format!("model.huggingface.{field}"), "{error}");
            assert!(error.reason.contains(reason), "{error}");
        }
    }

    /// Asserts that `job`, read from a config, is the example job `example` describes: its
    /// layers, tokens and classes.
    fn assert_reads_as(job: &Job, example: &str) {
        let example = Job::from_json(example).unwrap();
        let (read, written) = (&job.spec().model, &example.spec().model);
        assert!(read.layers == written.layers, "the layer lists differ");
        assert_eq!(
            (read.tokens, read.num_classes),
            (written.tokens, written.num_classes)
        );
    }

    #[test]
    fn attention_dropout_is_each_attention_layer_s_dropout() {
        let mut config = smollm2();
        config["attention_dropout"] = json!(0.1);
        let job = llama_job(config).unwrap();
        let layers = serde_json::to_value(&job.spec().model.layers).unwrap();
        let text = layers.to_string();
        assert_eq!(text.matches("\"self_attention\"").count(), 30);
        assert_eq!(text.matches("\"dropout\":0.1").count(), 30, "{text}");
    }

    #[test]
    fn what_the_list_cannot_say_is_refused_by_field() {
        let with = |field: &str, value: Value| {
            let mut config = smollm2();
            config[field] = value;
            llama_job(config).unwrap_err()
        };
        let cases = [
            (
                "attention_dropout",
                json!(1.5),
                "attention_dropout",
                "must be in [0, 1)",
            ),
            (
                "sliding_window",
                json!(4096),
                "sliding_window",
                "set it to null",
            ),
            ("hidden_act", json!("gelu_new"), "hidden_act", "\"silu\""),
            ("model_type", json!("phi3"), "model_type", "not \"phi3\""),
            (
                "hidden_size",
                json!(-4),
                "hidden_size",
                "positive whole number",
            ),
            (
                "num_hidden_layers",
                json!(167),
                "num_hidden_layers",
                "at most 166",
            ),
        ];
        for (field, value, named, reason) in cases {
            let error = with(field, value);
            assert_eq!(error.field, format!("model.huggingface.{named}"), "{error}");
            assert!(error.reason.contains(reason), "{error}");
        }
        let mut deepest = smollm2();
        deepest["num_hidden_layers"] = json!(166);
        assert!(llama_job(deepest).is_ok());
        let mut config = smollm2();
        config.as_object_mut().unwrap().remove("hidden_size");
        assert_eq!(
            llama_job(config).unwrap_err().field,
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
        let written = serde_json::to_value(llama_job(smollm2()).unwrap().spec()).unwrap();
        let again = Job::from_value(written).unwrap();
        assert_eq!(again.plan().parameter_count(), 134_515_008);
    }

    #[test]
    fn an_untied_llama_with_its_own_head_width_and_newer_rope_parameters() {
        let mut config = smollm2();
        config["tie_word_embeddings"] = json!(false);
        config["head_dim"] = json!(32);
        config["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "default"});
        let plan = llama_job(config).unwrap();
        let layers = plan.spec().model.layers.as_ref().unwrap();
        let attention = serde_json::to_value(&layers[1]).unwrap();
        let attention = &attention["residual"]["layers"][1]["self_attention"];
        assert_eq!(attention["head_dim"], 32);
        assert_eq!(attention["rope_theta"], 500000.0);
        // The untied head is a second vocab x hidden matrix.
        assert!(plan.plan().parameter_count() > 134_515_008);
    }

    #[test]
    fn self_attention_is_checked_by_field_and_keeps_no_score_matrix() {
        let job = |attention: &str| {
            format!(
                r#"{{"model": {{"input_shape": [512, 48], "num_classes": 5, "layers": [
                    {{"self_attention": {attention}}}, {{"flatten": {{}}}},
                    {{"linear": {{"out_features": 5}}}}]}}, "optimizer": {{"name": "adamw"}}}}"#
            )
        };
        // Llama's projections: 6 query heads of 8 over 2 key/value heads, no bias.
        let plan = Job::from_json(&job(
            r#"{"num_heads": 6, "num_kv_heads": 2, "causal": true, "bias": false}"#,
        ))
        .unwrap()
        .plan;
        let projections = 48 * 48 + 2 * (48 * 16) + 48 * 48;
        assert_eq!(plan.parameter_count(), projections + 512 * 48 * 5 + 5);
        // The fused path holds no buffer of positions x positions values, at any batch.
        for batch in [1, 16] {
            let program = plan.program(batch, 0).unwrap();
            let largest = program
                .step
                .iter()
                .filter_map(|instr| match instr {
                    Instr::Alloc { buffer, .. } => Some(buffer.elements),
                    _ => None,
                })
                .max()
                .unwrap();
            assert!(largest < batch * 512 * 512, "{largest} at batch {batch}");
        }
        // Rotary embedding keeps none either: its tables are positions x head_dim.
        let rotary = Job::from_json(&job(r#"{"num_heads": 6, "rope_theta": 10000}"#))
            .unwrap()
            .plan;
        for batch in [1, 16] {
            let program = rotary.program(batch, 0).unwrap();
            assert!(program.step.iter().all(|instr| match instr {
                Instr::Alloc { buffer, .. } => buffer.elements < batch * 512 * 512,
                _ => true,
            }));
        }
        // A batch whose sizes pass u64 is no program, not a panic.
        assert!(plan.program(1 << 60, 0).is_none());
        assert!(plan.memory(u64::MAX).is_none());
        let cases = [
            (r#"{"num_heads": 5}"#, "num_heads", "5 does not divide 48"),
            (r#"{"num_heads": 0}"#, "num_heads", "between 1 and"),
            (
                r#"{"num_heads": 6, "num_kv_heads": 4}"#,
                "num_kv_heads",
                "4 does not divide num_heads (6)",
            ),
            (
                r#"{"num_heads": 2, "head_dim": 512}"#,
                "head_dim",
                "between 1 and 256",
            ),
            (
                r#"{"num_heads": 4294967296, "head_dim": 256}"#,
                "num_heads",
                "4294967296 heads of 256 values are wider than 4294967296",
            ),
            (
                r#"{"num_heads": 2, "head_dim": 5, "rope_theta": 10000}"#,
                "rope_theta",
                "head_dim must be even, got 5",
            ),
            (
                r#"{"num_heads": 6, "rope_theta": 0.5}"#,
                "rope_theta",
                "finite number above 1, got 0.5",
            ),
        ];
        for (attention, field, reason) in cases {
            let error = Job::from_json(&job(attention)).unwrap_err();
            assert_eq!(
                error.field,
                format!("model.layers[0].self_attention.{field}"),
                "{attention}: {error}"
            );
            assert!(error.reason.contains(reason), "{attention}: {error}");
        }
        let error = Job::from_json(&job(r#"{"num_heads": 6, "heads": 2}"#)).unwrap_err();
        assert!(error.reason.contains("unknown field `heads`"), "{error}");
        let flat = r#"{"model": {"input_shape": [48], "num_classes": 5, "layers": [
            {"self_attention": {"num_heads": 6}}]}, "optimizer": {"name": "sgd"}}"#;
        let error = Job::from_json(flat).unwrap_err();
        assert_eq!(error.field, "model.layers[0]");
        assert!(error.reason.contains("[positions, features]"), "{error}");
    }

    #[test]
    fn every_error_names_its_field() {
        let cases = [
            (r#"{"optimizer": {"name": "sgd"}}"#, ""),
            (
                r#"{"model": {"input_shape": [], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#,
                "model.input_shape",
            ),
            (
                r#"{"model": {"input_shape": [0], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#,
                "model.input_shape[0]",
            ),
            (
                r#"{"model": {"input_shape": [-3], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#,
                "model.input_shape[0]",
            ),
            (
                r#"{"model": {"input_shape": [4], "hidden_layers": [8, 0], "num_classes": 10},
                   "optimizer": {"name": "sgd"}}"#,
                "model.hidden_layers[1]",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "lion"}}"#,
                "optimizer.name",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"},
                   "dtype": "f16"}"#,
                "dtype",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"},
                   "headroom": 1.5}"#,
                "headroom",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"},
                   "search": {"start": 64, "max": 32}}"#,
                "search.start",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"},
                   "search": {"start": "16"}}"#,
                "search.start",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"},
                   "colour": true}"#,
                "colour",
            ),
            (
                r#"{"model": {"input_shape": [65536, 65536, 65536], "num_classes": 10},
                   "optimizer": {"name": "sgd"}}"#,
                "model.input_shape",
            ),
            (
                r#"{"model": {"input_shape": [4294967296], "hidden_layers": [4294967296, 4294967296],
                   "num_classes": 10}, "optimizer": {"name": "adam"}}"#,
                "model",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd",
                   "learning_rate": -1}}"#,
                "optimizer.learning_rate",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"},
                   "dataset_size": 0}"#,
                "dataset_size",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 1}, "optimizer": {"name": "sgd"}}"#,
                "model.num_classes",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 2}, "optimizer": {"name": "sgd"},
                   "target_batch_size": 0}"#,
                "target_batch_size",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 2}, "optimizer": {"name": "sgd"},
                   "world_size": 0}"#,
                "world_size",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 2}, "optimizer": {"name": "sgd"},
                   "search": {"knee_tolerance": 1.5}}"#,
                "search.knee_tolerance",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 2}, "optimizer": {"name": "sgd"},
                   "search": {"min_timed_seconds": -0.1}}"#,
                "search.min_timed_seconds",
            ),
            (
                r#"{"model": {"input_shape": [4], "num_classes": 2}, "optimizer": {"name": "sgd"},
                   "search": {"min_timed_seconds": 3600}}"#,
                "search.min_timed_seconds",
            ),
        ];
        for (text, field) in cases {
            let err = error_of(text);
            assert_eq!(err.field, field, "{text} gave {err}");
            assert!(!err.reason.is_empty());
        }
    }

    #[test]
    fn precision_takes_lightnings_names_and_dtype_f32_is_its_alias() {
        let with = |extra: &str| {
            format!(
                r#"{{"model": {{"input_shape": [4], "num_classes": 10}}, "optimizer": {{"name": "sgd"}}{extra}}}"#
            )
        };
        for precision in Precision::ALL {
            let job = Job::from_json(&with(&format!(r#", "precision": "{precision}""#))).unwrap();
            assert_eq!(job.precision, precision);
            assert_eq!(job.plan().precision, precision);
        }
        let alias = Job::from_json(&with(r#", "dtype": "f32""#)).unwrap();
        assert_eq!(alias.precision, Precision::F32True);
        assert!(!serde_json::to_string(&alias).unwrap().contains("dtype"));

        let err = Job::from_json(&with(r#", "precision": "fp8""#)).unwrap_err();
        assert_eq!(err.field, "precision");
        for name in ["32-true", "bf16-mixed", "16-mixed", "bf16-true"] {
            assert!(err.reason.contains(name), "{err}");
        }
        let err = Job::from_json(&with(r#", "dtype": "bf16""#)).unwrap_err();
        assert_eq!(err.field, "dtype");
        assert!(err.reason.contains("bf16-mixed"), "{err}");
        let err =
            Job::from_json(&with(r#", "dtype": "f32", "precision": "bf16-mixed""#)).unwrap_err();
        assert_eq!(err.field, "dtype");
    }

    #[test]
    fn trailing_garbage_and_truncation_are_errors() {
        assert!(Job::from_json(&format!("{MINIMAL} x")).is_err());
        assert!(Job::from_json(&MINIMAL[..MINIMAL.len() - 3]).is_err());
    }

    #[test]
    fn shipped_examples_are_valid() {
        for name in ["mnist-mlp-sgd", "cifar10-mlp-adam", "deep-mlp-adamw"] {
            let path = format!("{}/../../examples/{name}.json", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            Job::from_json(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }
}
