//! `headroom tune`: runs the search on a device here and prints the result.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;

use super::output::{human, probe_line};
use super::{
    fail, job_and_device, PlotFile, TuneOutput, EXIT_DOES_NOT_FIT, EXIT_FAILURE, EXIT_INVALID,
};
use crate::device::select::DeviceSpec;
use crate::result::Probe;
use crate::search::{tune, TuneError};

/// Probes `device` for the job at `job_path`; every probe is printed on stderr as it finishes.
pub fn tune_command(
    job_path: &Path,
    device: DeviceSpec,
    host_memory: u64,
    output: &TuneOutput,
) -> ExitCode {
    let (job, mut opened) = match job_and_device(job_path, device, host_memory) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let plot = match output.plot.clone().map(PlotFile::create).transpose() {
        Ok(plot) => plot,
        Err(message) => return fail(EXIT_INVALID, message),
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
    match tune(&job, opened.device.as_mut(), &mut print_probe) {
        Ok(result) => output.deliver(&result, &job, plot),
        Err(err @ TuneError::DoesNotFit(_)) => fail(EXIT_DOES_NOT_FIT, err),
        Err(err) => fail(EXIT_FAILURE, err),
    }
}
