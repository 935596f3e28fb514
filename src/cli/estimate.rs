//! `headroom estimate`: the memory model's answer for a given amount of free memory; no probe.

use std::path::Path;
use std::process::ExitCode;

use super::{answer, fail, output, read_job, EXIT_INVALID};
use crate::plan::Allocator;

/// The predicted largest and recommended batch of the job at `job_path` with `memory` bytes free
/// on a device that rounds allocations like the host (exactly).
pub fn estimate_command(job_path: &Path, memory: u64, json: bool) -> ExitCode {
    let job = match read_job(job_path) {
        Ok(job) => job,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    let estimate = job.plan().estimate(
        memory,
        Allocator::Exact,
        job.batch_cap(),
        job.headroom,
        job.search.multiple_of,
    );
    answer(estimate.map_err(Into::into), json, output::estimate)
}
