//! `headroom tune`: runs the search on a device here and prints the result.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;

use super::output::{human, probe_line, summary};
use super::{answer, job_and_device};
use crate::device::select::DeviceSpec;
use crate::result::Probe;
use crate::search::tune;

/// Probes `device` for the job at `job_path`; every probe is printed on stderr as it finishes.
pub fn tune_command(job_path: &Path, device: DeviceSpec, host_memory: u64, json: bool) -> ExitCode {
    let (job, mut opened) = match job_and_device(job_path, device, host_memory) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let info = opened.device.info();
    eprintln!(
        "tuning on {} {} ({}): {} free of {}",
        info.kind,
        info.index,
        info.name,
        human(info.free_bytes),
        human(info.total_bytes)
    );
    let mut print_probe = |probe: &Probe| {
        eprintln!("{}", probe_line(probe));
        ControlFlow::Continue(())
    };
    answer(
        tune(&job, opened.device.as_mut(), &mut print_probe),
        json,
        summary,
    )
}
