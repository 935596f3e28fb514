//! What every command that works on a job reads first: the job (a file or standard input), the
//! host budget, the device, and the files it will write.

use std::io::Read;
use std::path::{Path, PathBuf};

use headroom_devices::host;
use headroom_devices::select::{self, DeviceSpec};
use headroom_engine::job::{Job, JobError};

use super::output::human;
use super::CliError;

/// Largest job file read, bytes: a job is a few hundred bytes.
const MAX_JOB_FILE_BYTES: u64 = 1 << 20;

/// Where a command's job comes from: a job file, or a Hugging Face `config.json` with the few
/// fields a job adds to a model.
#[derive(clap::Args)]
pub struct JobSource {
    /// The job description (JSON), e.g. examples/cifar10-mlp-adam.json; `-` reads standard input.
    #[arg(required_unless_present = "hf_config", conflicts_with = "hf_config")]
    job: Option<PathBuf>,
    /// Instead of a job: a Hugging Face model's config.json (model_type llama, mistral, qwen2,
    /// gpt2 or vit), a language model trained on sequences of --sequence-length tokens.
    #[arg(long, value_name = "CONFIG.json")]
    hf_config: Option<PathBuf>,
    /// With --hf-config: the tokens of a sequence (a language model's).
    #[arg(long, value_name = "N")]
    sequence_length: Option<u64>,
    /// With --hf-config: sgd, sgd_momentum, adam or adamw (the default).
    #[arg(long, value_name = "NAME")]
    optimizer: Option<String>,
    /// With --hf-config: Lightning's precision, e.g. bf16-mixed (32-true unless given).
    #[arg(long, value_name = "PRECISION")]
    precision: Option<String>,
    /// With --hf-config: how attention runs, as from_pretrained's attn_implementation: sdpa
    /// (the default) or eager (the scores materialized).
    #[arg(long, value_name = "IMPLEMENTATION")]
    attn_implementation: Option<String>,
    /// With --hf-config: activation checkpointing of every decoder layer, as
    /// `model.gradient_checkpointing_enable()` does.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// With --hf-config: fine-tune with LoRA adapters of this rank, the model frozen (peft's
    /// `LoraConfig(r=...)`).
    #[arg(long, value_name = "R")]
    lora_r: Option<u64>,
    /// With --lora-r: the adapters' alpha (8 unless given; they scale by alpha / r).
    #[arg(long, value_name = "ALPHA", requires = "lora_r")]
    lora_alpha: Option<f64>,
    /// With --lora-r: the linear layers adapted, comma-separated (q_proj,v_proj unless given),
    /// or all-linear.
    #[arg(long, value_name = "NAMES", requires = "lora_r")]
    lora_target_modules: Option<String>,
    /// With --hf-config: shard the model over this many GPUs with FSDP2 (`fully_shard` on each
    /// decoder layer, then on the model); the batch and memory answered are one GPU's.
    #[arg(long, value_name = "GPUS")]
    fsdp: Option<u64>,
    /// With --fsdp: keep each decoder layer's gathered parameters from its forward to its
    /// backward (`fully_shard(..., reshard_after_forward=False)`: ZeRO-2's memory).
    #[arg(long, requires = "fsdp")]
    no_reshard_after_forward: bool,
}

impl JobSource {
    /// Reads and validates the job.
    pub fn read(&self) -> Result<Job, CliError> {
        let Some(config_path) = &self.hf_config else {
            let given = [
                ("--sequence-length", self.sequence_length.is_some()),
                ("--optimizer", self.optimizer.is_some()),
                ("--precision", self.precision.is_some()),
                ("--attn-implementation", self.attn_implementation.is_some()),
                ("--gradient-checkpointing", self.gradient_checkpointing),
                ("--lora-r", self.lora_r.is_some()),
                ("--fsdp", self.fsdp.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, given)| *given) {
                return Err(CliError::Argument(format!(
                    "{flag} goes with --hf-config: a job file says it in the job"
                )));
            }
            // clap requires the job file without --hf-config.
            let path = self.job.as_deref().unwrap_or(Path::new("-"));
            return read_job(path);
        };
        let (name, text) = read_text(config_path)?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| CliError::InvalidJob {
                name: name.clone(),
                source: JobError {
                    field: "model.huggingface".into(),
                    reason: format!("is not JSON: {error}"),
                },
            })?;
        let mut model = serde_json::json!({"huggingface": config});
        if let Some(implementation) = &self.attn_implementation {
            model["huggingface"]["attn_implementation"] = implementation.as_str().into();
        }
        if let Some(tokens) = self.sequence_length {
            model["tokens"] = serde_json::json!({"sequence_length": tokens});
        }
        if self.gradient_checkpointing {
            model["gradient_checkpointing"] = true.into();
        }
        if let Some(r) = self.lora_r {
            model["lora"] = self.lora(r);
        }
        let mut job = serde_json::json!({
            "model": model,
            "optimizer": {"name": self.optimizer.as_deref().unwrap_or("adamw")},
            "precision": self.precision.as_deref().unwrap_or("32-true"),
        });
        if let Some(world) = self.fsdp {
            job["world_size"] = world.into();
            job["sharding"] = "fsdp".into();
            if self.no_reshard_after_forward {
                job["reshard_after_forward"] = false.into();
            }
        }
        Job::from_value(job).map_err(|source| match source.field.as_str() {
            "model.tokens" if self.sequence_length.is_none() => CliError::Argument(format!(
                "{name} describes a language model: give --sequence-length N, the tokens of a \
                 sequence"
            )),
            "model.tokens" => CliError::Argument(format!(
                "{name} describes an image model: leave --sequence-length out"
            )),
            _ => CliError::InvalidJob { name, source },
        })
    }

    /// The job's `model.lora` of rank `r` from the LoRA flags.
    fn lora(&self, r: u64) -> serde_json::Value {
        let mut lora = serde_json::json!({ "r": r });
        if let Some(alpha) = self.lora_alpha {
            lora["lora_alpha"] = alpha.into();
        }
        match self.lora_target_modules.as_deref() {
            Some("all-linear") => lora["target_modules"] = "all-linear".into(),
            Some(names) => {
                let names: Vec<&str> = names.split(',').map(str::trim).collect();
                lora["target_modules"] = names.into();
            }
            None => {}
        }
        lora
    }
}

/// What the answer is for when the job came from a Hugging Face config: `gpt2 (a Hugging Face
/// config): 124439808 parameters, sequences of 1024 tokens`, and for a language model whose
/// step it is (transformers' own); `None` for other jobs.
pub fn model_line(job: &Job) -> Option<String> {
    let model = &job.spec().model;
    let model_type = model.huggingface.as_ref()?.get("model_type")?.as_str()?;
    let input = match model.tokens {
        Some(tokens) => format!("sequences of {} tokens", tokens.sequence_length),
        None => format!("images of {:?}", model.input_shape),
    };
    let step = match job.plan().hugging_face {
        Some(step) if step.use_cache => {
            "\nstep                    transformers' own (its loss, its key/value cache)"
        }
        Some(_) => "\nstep                    transformers' own (its loss)",
        None => "",
    };
    Some(format!(
        "model                   {model_type} (a Hugging Face config): {} parameters, {input}{step}",
        super::output::parameters(
            job.plan().parameter_count(),
            job.plan().trainable_parameter_count()
        ),
    ))
}

/// Reads and validates a job file, or the job on standard input when `path` is `-`.
pub fn read_job(path: &Path) -> Result<Job, CliError> {
    let (name, text) = read_text(path)?;
    Job::from_json(&text).map_err(|source| CliError::InvalidJob { name, source })
}

/// A job-sized file (at most [`MAX_JOB_FILE_BYTES`]), or standard input when `path` is `-`,
/// with the name errors give it.
fn read_text(path: &Path) -> Result<(String, String), CliError> {
    let (name, reader): (String, Box<dyn Read>) = if path == Path::new("-") {
        (
            "on standard input".into(),
            Box::new(std::io::stdin().lock()),
        )
    } else {
        let name = path.display().to_string();
        match std::fs::File::open(path) {
            Ok(file) => (name, Box::new(file)),
            Err(source) => return Err(CliError::ReadJob { name, source }),
        }
    };
    let mut text = String::new();
    if let Err(source) = reader
        .take(MAX_JOB_FILE_BYTES + 1)
        .read_to_string(&mut text)
    {
        return Err(CliError::ReadJob { name, source });
    }
    if text.len() as u64 > MAX_JOB_FILE_BYTES {
        return Err(CliError::JobTooLarge { name });
    }
    Ok((name, text))
}

/// Checks a host budget against the machine: a budget past physical memory would let the host
/// device commit more than exists.
pub fn check_host_budget(bytes: u64) -> Result<u64, CliError> {
    if bytes == 0 {
        return Err(CliError::Argument(
            "--host-memory must be more than 0 bytes".into(),
        ));
    }
    match host::system_memory_bytes() {
        Some(physical) if bytes > physical => Err(CliError::Argument(format!(
            "--host-memory {} is more than this machine's {} of memory",
            human(bytes),
            human(physical)
        ))),
        _ => Ok(bytes),
    }
}

/// Reads the job, checks the host budget and opens the device: the start of every command that
/// probes. Says so on stderr when `auto` fell back to the host.
pub fn job_and_device(
    job_path: &Path,
    device: DeviceSpec,
    host_memory: u64,
) -> Result<(Job, select::Opened), CliError> {
    let job = read_job(job_path)?;
    let budget = check_host_budget(host_memory)?;
    let opened =
        select::open(device, budget).map_err(|source| CliError::OpenDevice { device, source })?;
    if let Some(reason) = &opened.fallback_reason {
        eprintln!("note: using the host device ({reason})");
    }
    Ok((job, opened))
}

/// A file a command writes its answer to, checked when the command starts so that an
/// unwritable path fails before any work is done, and written only when the answer is there:
/// a failed command leaves no empty file behind.
#[derive(Debug, Clone)]
pub struct OutputFile {
    what: &'static str,
    path: PathBuf,
}

impl OutputFile {
    /// Checks that `path` can be written (`what` names its contents in errors).
    pub fn check(what: &'static str, path: PathBuf) -> Result<OutputFile, CliError> {
        let existed = path.exists();
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|source| CliError::Unwritable {
                what,
                path: path.clone(),
                source,
            })?;
        if !existed {
            let _ = std::fs::remove_file(&path);
        }
        Ok(OutputFile { what, path })
    }

    /// Writes `contents`, replacing the file.
    pub fn write(&self, contents: &str) -> Result<(), CliError> {
        std::fs::write(&self.path, contents).map_err(|source| CliError::Write {
            what: self.what,
            path: self.path.clone(),
            source,
        })
    }
}
