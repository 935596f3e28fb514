//! `headroom estimate`: the memory model's answer, no probe: for a given amount of free memory,
//! for one card of the GPU catalogue, or for every card.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{fail, output, read_job, PlotFile, EXIT_DOES_NOT_FIT, EXIT_FAILURE, EXIT_INVALID};
use crate::catalogue::{self, GpuEstimate, MODEL_NOTE};

/// What to estimate for.
#[derive(Debug, Clone)]
pub enum Target {
    /// This much free memory, charged exactly.
    Memory(u64),
    /// A card of the catalogue, its allocator's rounding included.
    Gpu(String),
    /// Every card of the catalogue.
    Catalogue,
}

/// Prints the estimate for `target` (JSON with `json`) and draws it to `plot`.
pub fn estimate_command(
    job_path: &Path,
    target: Target,
    json: bool,
    plot: Option<PathBuf>,
) -> ExitCode {
    let job = match read_job(job_path) {
        Ok(job) => job,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    let plot = match plot.map(PlotFile::create).transpose() {
        Ok(plot) => plot,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    let estimates = match &target {
        Target::Memory(bytes) => vec![catalogue::estimate_free(&job, *bytes)],
        Target::Gpu(name) => match catalogue::find(name) {
            Ok(gpu) => vec![catalogue::estimate_for(&job, gpu.name, gpu.memory_bytes())],
            Err(message) => return fail(EXIT_INVALID, message),
        },
        Target::Catalogue => catalogue::every_gpu(&job),
    };
    if let Some(plot) = plot {
        let [single] = &estimates[..] else {
            return fail(
                EXIT_INVALID,
                "--plot draws one estimate: give --memory or --gpu",
            );
        };
        if let Some(e) = &single.estimate {
            let svg = crate::plot::estimate_svg(
                job.plan(),
                e.memory_bytes,
                e.predicted_max_batch_size,
                e.recommended_batch_size,
            );
            if let Err(message) = svg.and_then(|svg| plot.write(&svg)) {
                return fail(EXIT_FAILURE, message);
            }
        }
    }
    report(&target, &estimates, json)
}

fn report(target: &Target, estimates: &[GpuEstimate], json: bool) -> ExitCode {
    let single = !matches!(target, Target::Catalogue);
    if json {
        // For an amount of memory the estimate itself; for a card, the card and its estimate.
        let value = match target {
            Target::Memory(_) => estimates[0].estimate.as_ref().map(serde_json::to_value),
            Target::Gpu(_) => Some(serde_json::to_value(&estimates[0])),
            Target::Catalogue => Some(serde_json::to_value(
                serde_json::json!({"note": MODEL_NOTE, "estimates": estimates}),
            )),
        };
        if let Some(value) = value {
            println!(
                "{}",
                serde_json::to_string_pretty(&value.expect("estimates serialise"))
                    .expect("JSON prints")
            );
        }
    } else if single {
        if let Some(e) = &estimates[0].estimate {
            print!("{}", output::estimate(e));
        }
    } else {
        print!("{}", output::catalogue(estimates));
    }
    match (single, &estimates[0].does_not_fit) {
        (true, Some(reason)) => fail(EXIT_DOES_NOT_FIT, reason),
        _ => {
            if !json && matches!(target, Target::Gpu(_) | Target::Catalogue) {
                eprintln!("note: {MODEL_NOTE}");
            }
            ExitCode::SUCCESS
        }
    }
}
