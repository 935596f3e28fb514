//! What the commands print for people: probe lines, the result summary, the estimate, memory
//! tables. `--json` prints the same values as JSON instead.

use bytesize::ByteSize;

use headroom_engine::catalogue::GpuEstimate;
use headroom_engine::estimate::Estimate;
use headroom_engine::frontier::SequencePoint;
use headroom_engine::plan::MemoryBreakdown;
use headroom_engine::result::{Probe, TuneResult};

use super::CliError;

/// Writes `text` to standard output. A reader that has gone (`| head` closed the pipe) is
/// [`CliError::Stdout`], on which the process ends quietly, as its reader expects.
pub fn print(text: impl std::fmt::Display) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    write!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(CliError::Stdout)
}

/// [`print`] with a line break after `text`.
pub fn print_line(text: impl std::fmt::Display) -> Result<(), CliError> {
    print(format_args!("{text}\n"))
}

/// Bytes in binary units, e.g. `253.3 MiB`.
pub fn human(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

/// One line per probe, as it happens.
pub fn probe_line(probe: &Probe) -> String {
    format!(
        "  probe batch {:>12}  {:<5} {:>10.4} s/step {:>14.0} samples/s {:>12}",
        probe.batch_size,
        probe.outcome.to_string(),
        probe.step_seconds,
        probe.samples_per_second,
        human(probe.device_bytes)
    )
}

fn memory_table(memory: &MemoryBreakdown) -> String {
    let peak = memory.peak_at.map_or(String::new(), |moment| {
        format!("  (peak in the {moment})\n")
    });
    let rows = [
        ("parameters", memory.parameters),
        ("gradients", memory.gradients),
        ("optimizer state", memory.optimizer_state),
        ("batch data", memory.batch_data),
        ("activations", memory.activations),
        ("total", memory.total),
    ];
    rows.iter()
        .map(|(name, bytes)| format!("  {name:<16} {:>12}\n", human(*bytes)))
        .collect::<String>()
        + &peak
}

/// The memory of a step at one batch size.
pub fn memory_at(batch_size: u64, memory: &MemoryBreakdown) -> String {
    format!("memory at batch {batch_size}:\n{}", memory_table(memory))
}

/// The human summary of a result; `knee_tolerance` is the job's `search.knee_tolerance`.
pub fn summary(result: &TuneResult, knee_tolerance: f64) -> String {
    let ratio = if result.predicted_max_batch_size > 0 {
        format!(
            "{:.3}",
            result.max_batch_size as f64 / result.predicted_max_batch_size as f64
        )
    } else {
        "n/a".into()
    };
    // The fitted curve at the knee; with one size measured, that size's own speed.
    let at_knee = match result.throughput_fit {
        Some(fit) => fit.samples_per_second(result.throughput_batch_size as f64),
        None => result
            .throughput
            .iter()
            .find(|p| p.batch_size == result.throughput_batch_size)
            .map_or(0.0, |p| p.fitted_samples_per_second),
    };
    let interval = result
        .throughput_knee
        .filter(|k| k.low < k.high)
        .map_or(String::new(), |k| {
            format!("; could be {}-{}", k.low, k.high)
        });
    let accumulation = result.accumulation.as_ref().map_or(String::new(), |a| {
        let steps = if a.steps == 1 { "step" } else { "steps" };
        let gpus = if a.world_size == 1 { "GPU" } else { "GPUs" };
        format!(
            "accumulation            micro batch {} x {} {steps} x {} {gpus} = {} (target {}{})\n",
            a.micro_batch_size,
            a.steps,
            a.world_size,
            a.global_batch_size,
            a.target_batch_size,
            a.note.as_ref().map_or(String::new(), |n| format!("; {n}")),
        )
    });
    format!(
        "max batch size          {} (limited by {})\n\
         recommended batch size  {} ({}% headroom{})\n\
         throughput knee         {} (doubling it gains under {}%; {:.0} samples/s fitted{interval})\n\
         {accumulation}\
         predicted max           {} (measured / predicted = {ratio})\n\
         device                  {} {} ({}, {} total)\n\
         precision               {}\n\
         framework               {}\n\
         {}\
         search                  {} probes in {:.2} s\n\
         memory at batch {}:\n{}",
        result.max_batch_size,
        result.limited_by,
        result.recommended_batch_size,
        (result.headroom * 100.0).round(),
        tokens(result.recommended_tokens, "; "),
        result.throughput_batch_size,
        (knee_tolerance * 100.0).round(),
        at_knee,
        result.predicted_max_batch_size,
        result.device.kind,
        result.device.index,
        result.device.name,
        human(result.device.total_bytes),
        result.precision,
        result.framework.name(),
        sharding(result.fsdp_world_size, result.fsdp_reshard_after_forward),
        result.probes.len(),
        result.elapsed_seconds,
        result.recommended_batch_size,
        memory_table(&result.memory),
    ) + &note(result.throughput_note.as_deref())
        + &note(result.precision_note.as_deref())
}

/// The sharding line: FSDP over `world` GPUs, its blocks resharded after forward unless
/// `reshard_after_forward` says not (answers stored before it was said did), or nothing.
pub fn sharding(world: Option<u64>, reshard_after_forward: Option<bool>) -> String {
    world.map_or(String::new(), |world| {
        let kept = match reshard_after_forward {
            Some(false) => ", blocks kept gathered from forward to backward",
            _ => "",
        };
        format!(
            "sharding                FSDP over {world} GPUs{kept}: the batch and memory are one \
             GPU's\n"
        )
    })
}

/// `tokens` in a batch of sequences after `before`, or nothing for a batch of values.
fn tokens(tokens: Option<u64>, before: &str) -> String {
    tokens.map_or(String::new(), |t| format!("{before}{t} tokens"))
}

/// A model's parameter count, and how many of them train when some are frozen.
pub fn parameters(all: u64, trainable: u64) -> String {
    match all == trainable {
        true => all.to_string(),
        false => format!("{all} ({trainable} trainable)"),
    }
}

/// A note as a closing line, or nothing.
fn note(text: Option<&str>) -> String {
    text.map_or(String::new(), |n| format!("note: {n}\n"))
}

/// The human form of an estimate.
pub fn estimate(e: &Estimate) -> String {
    format!(
        "parameters              {}\n\
         precision               {}\n\
         framework               {}\n\
         {}\
         fixed                   {}\n\
         per sample              {}\n\
         predicted max batch     {} in {}\n\
         recommended batch size  {}{}\n\
         memory at batch {}:\n{}",
        parameters(e.parameter_count, e.trainable_parameter_count),
        e.precision,
        e.framework.name(),
        sharding(e.fsdp_world_size, e.fsdp_reshard_after_forward),
        human(e.fixed_bytes),
        human(e.bytes_per_sample),
        e.predicted_max_batch_size,
        human(e.memory_bytes),
        e.recommended_batch_size,
        tokens(e.recommended_tokens, " sequences, "),
        e.recommended_batch_size,
        memory_table(&e.memory)
    ) + &sequence_lengths(&e.sequence_lengths)
        + &note(e.precision_note.as_deref())
}

/// The largest batch at each sequence length, as a table; nothing for a model over values.
fn sequence_lengths(points: &[SequencePoint]) -> String {
    if points.is_empty() {
        return String::new();
    }
    let mut text = format!(
        "by sequence length:\n  {:>10} {:>12} {:>14} {:>12} {:>14}\n",
        "sequence", "max batch", "tokens", "recommended", "tokens"
    );
    for p in points {
        text.push_str(&format!(
            "  {:>10} {:>12} {:>14} {:>12} {:>14}\n",
            p.sequence_length,
            p.predicted_max_batch_size,
            p.tokens,
            p.recommended_batch_size,
            p.recommended_tokens
        ));
    }
    text
}

/// The table of estimates over the GPU catalogue.
pub fn catalogue(estimates: &[GpuEstimate]) -> String {
    let mut text = format!(
        "{:<12} {:>12} {:>16} {:>16}\n",
        "GPU", "memory", "max batch", "recommended"
    );
    for row in estimates {
        let (max, recommended) = match &row.estimate {
            Some(e) => (
                match e.limited_by {
                    headroom_engine::result::LimitedBy::Memory => {
                        e.predicted_max_batch_size.to_string()
                    }
                    _ => format!("{} (cap)", e.predicted_max_batch_size),
                },
                e.recommended_batch_size.to_string(),
            ),
            None => ("does not fit".into(), "-".into()),
        };
        let probed = headroom_engine::catalogue::CATALOGUE
            .iter()
            .find(|gpu| gpu.name == row.gpu)
            .is_none_or(|gpu| gpu.can_probe());
        text.push_str(&format!(
            "{:<12} {:>12} {:>16} {:>16}{}\n",
            row.gpu,
            human(row.total_bytes),
            max,
            recommended,
            if probed { "" } else { "  *" }
        ));
    }
    if text.contains("  *\n") {
        let (major, minor) = headroom_engine::catalogue::OLDEST_PROBED;
        text.push_str(&format!(
            "* headroom cannot probe this card: CUDA 13 compiles its kernels for compute \
             capability {major}.{minor} and newer; the estimate still holds\n"
        ));
    }
    text
}
