//! What the commands print for people: probe lines, the result summary, the estimate, memory
//! tables. `--json` prints the same values as JSON instead.

use bytesize::ByteSize;

use crate::plan::{Estimate, MemoryBreakdown};
use crate::result::{Probe, TuneResult};

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
        .collect()
}

/// The human summary of a result.
pub fn summary(result: &TuneResult) -> String {
    let ratio = if result.predicted_max_batch_size > 0 {
        format!(
            "{:.3}",
            result.max_batch_size as f64 / result.predicted_max_batch_size as f64
        )
    } else {
        "n/a".into()
    };
    format!(
        "max batch size          {} (limited by {})\n\
         recommended batch size  {} ({}% headroom)\n\
         predicted max           {} (measured / predicted = {ratio})\n\
         device                  {} {} ({}, {} total)\n\
         search                  {} probes in {:.2} s\n\
         memory at batch {}:\n{}",
        result.max_batch_size,
        result.limited_by,
        result.recommended_batch_size,
        (result.headroom * 100.0).round(),
        result.predicted_max_batch_size,
        result.device.kind,
        result.device.index,
        result.device.name,
        human(result.device.total_bytes),
        result.probes.len(),
        result.elapsed_seconds,
        result.recommended_batch_size,
        memory_table(&result.memory),
    )
}

/// The human form of an estimate.
pub fn estimate(e: &Estimate) -> String {
    format!(
        "parameters              {}\n\
         fixed                   {}\n\
         per sample              {}\n\
         predicted max batch     {} in {}\n\
         recommended batch size  {}\n\
         memory at batch {}:\n{}",
        e.parameter_count,
        human(e.fixed_bytes),
        human(e.bytes_per_sample),
        e.predicted_max_batch_size,
        human(e.memory_bytes),
        e.recommended_batch_size,
        e.recommended_batch_size,
        memory_table(&e.memory)
    )
}
