//! `headroom estimate`: the memory model's answer, no probe: for a given amount of free memory,
//! for one card of the GPU catalogue, or for every card.

use std::path::PathBuf;

use bytesize::ByteSize;
use headroom_engine::catalogue::{self, GpuEstimate, MODEL_NOTE};
use headroom_engine::job::Job;
use headroom_engine::plan::{Allocator, Plan, Tracing};

use super::input::{model_line, JobSource, OutputFile};
use super::output::{self, print, print_line};
use super::CliError;

/// Arguments of `headroom estimate`.
#[derive(clap::Args)]
pub struct EstimateArgs {
    #[command(flatten)]
    job: JobSource,
    /// Free device memory, charged exactly, e.g. 80GiB.
    #[arg(long, conflicts_with = "gpu")]
    memory: Option<ByteSize>,
    /// A GPU of the catalogue, e.g. "H100 80GB", a100-40gb or h200; an unknown name lists them.
    #[arg(long)]
    gpu: Option<String>,
    /// Draw memory against batch size to this SVG file (with --memory or --gpu); over token
    /// ids, the largest batch against sequence length below it.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Instead of a largest batch: the modelled memory of a step at this batch size, at its
    /// peak, by part.
    #[arg(long, value_name = "N", conflicts_with_all = ["memory", "gpu", "plot"])]
    batch_size: Option<u64>,
    /// With --batch-size: model the step as PyTorch runs it under a tracer (MemTracker, any
    /// TorchDispatchMode), where autograd sums a parameter's gradients out of place and no
    /// CUDA kernel's inner workspace is seen; what `tests/pytorch/memory_check.py` compares
    /// with MemTracker.
    #[arg(long, requires = "batch_size")]
    traced: bool,
    /// Print the estimate as JSON.
    #[arg(long)]
    json: bool,
}

/// What to estimate for.
enum Target {
    /// An amount of free memory, charged exactly.
    Memory,
    /// A card of the catalogue, its allocator's rounding included.
    Gpu,
    /// Every card of the catalogue.
    Catalogue,
}

/// Prints the estimate (JSON with `--json`) and draws it to `--plot`.
pub fn run(args: EstimateArgs) -> Result<(), CliError> {
    let job = args.job.read()?;
    if let (Some(line), false) = (model_line(&job), args.json) {
        print_line(line)?;
    }
    if let Some(batch_size) = args.batch_size {
        let tracing = match args.traced {
            true => Tracing::Traced,
            false => Tracing::Untraced,
        };
        let plan = job.plan().clone().with_tracing(tracing);
        return memory_at(&job, &plan, batch_size, args.json);
    }
    if args.plot.is_some() && args.memory.is_none() && args.gpu.is_none() {
        return Err(CliError::Argument(
            "--plot draws one estimate: give --memory or --gpu".into(),
        ));
    }
    if args.memory == Some(ByteSize(0)) {
        return Err(CliError::Argument(
            "--memory must be more than 0 bytes".into(),
        ));
    }
    let plot = args
        .plot
        .map(|path| OutputFile::check("the plot", path))
        .transpose()?;
    let (target, estimates) = match (args.memory, &args.gpu) {
        (Some(memory), _) => (
            Target::Memory,
            vec![catalogue::estimate_free(&job, memory.0)],
        ),
        (None, Some(name)) => {
            let gpu = catalogue::find(name)?;
            (Target::Gpu, vec![catalogue::estimate_for(&job, gpu)])
        }
        (None, None) => (Target::Catalogue, catalogue::every_gpu(&job)),
    };
    report(&target, &estimates, args.json)?;
    if let (Some(plot), [single]) = (plot, &estimates[..]) {
        if let Some(e) = &single.estimate {
            plot.write(&headroom_service::plot::estimate_svg(
                job.plan(),
                e.memory_bytes,
                e.predicted_max_batch_size,
                e.recommended_batch_size,
                &e.sequence_lengths,
            )?)?;
        }
    }
    match (&target, &estimates[..]) {
        (Target::Memory | Target::Gpu, [single]) => match single.does_not_fit {
            Some(reason) => Err(reason.into()),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The modelled memory of a step of `job` (as `plan` runs it) at `batch_size`, at its peak.
fn memory_at(job: &Job, plan: &Plan, batch_size: u64, json: bool) -> Result<(), CliError> {
    let memory = plan.memory(batch_size).ok_or_else(|| {
        CliError::Argument(format!(
            "batch size {batch_size} overflows the memory model"
        ))
    })?;
    if json {
        let cuda = |allocator| plan.device_bytes(batch_size, allocator);
        let mut value = serde_json::json!({
            "batch_size": batch_size,
            "parameter_count": plan.parameter_count(),
            "trainable_parameter_count": plan.trainable_parameter_count(),
            "framework": job.framework,
            "precision": job.precision,
            "memory": memory,
            "cuda_bytes": cuda(Allocator::CudaPages),
            "pytorch_cuda_bytes": cuda(Allocator::PytorchCaching),
        });
        if let Some(sharding) = plan.sharding {
            value["fsdp_world_size"] = sharding.world.into();
            value["fsdp_reshard_after_forward"] = sharding.reshard_after_forward.into();
        }
        print_line(serde_json::to_string_pretty(&value).expect("JSON prints"))
    } else {
        print(output::memory_at(batch_size, &memory))
    }
}

/// Prints the estimates: JSON, one estimate, or the catalogue's table; a note says that they
/// are the model's, not measurements.
fn report(target: &Target, estimates: &[GpuEstimate], json: bool) -> Result<(), CliError> {
    if json {
        // For an amount of memory the estimate itself; for a card, the card and its estimate.
        let value = match target {
            Target::Memory => estimates[0].estimate.as_ref().map(serde_json::to_value),
            Target::Gpu => Some(serde_json::to_value(&estimates[0])),
            Target::Catalogue => Some(serde_json::to_value(
                serde_json::json!({"note": MODEL_NOTE, "estimates": estimates}),
            )),
        };
        if let Some(value) = value {
            let value = value.expect("estimates serialise");
            print_line(serde_json::to_string_pretty(&value).expect("JSON prints"))?;
        }
        return Ok(());
    }
    match target {
        Target::Catalogue => {
            let sharded = estimates
                .iter()
                .filter_map(|e| e.estimate.as_ref())
                .find(|e| e.fsdp_world_size.is_some());
            let line = sharded.map_or(String::new(), |e| {
                output::sharding(e.fsdp_world_size, e.fsdp_reshard_after_forward)
            });
            print(line + &output::catalogue(estimates))?
        }
        _ => {
            if let Some(e) = &estimates[0].estimate {
                print(output::estimate(e))?;
            }
        }
    }
    if !matches!(target, Target::Memory) && estimates.iter().any(|e| e.estimate.is_some()) {
        eprintln!("note: {MODEL_NOTE}");
    }
    Ok(())
}
