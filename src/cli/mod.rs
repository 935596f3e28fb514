//! The commands behind the `headroom` binary, one file each, and what they print.
//!
//! - [`tune`]: probe a device here; [`remote`]: send the job to a running service.
//! - [`estimate`]: the memory model alone. [`probe`]: single probes with throughput.
//! - [`doctor`]: what this node has, and every kernel against the host.
//! - [`serve`]: the HTTP service. [`output`]: the human-readable answers.
//!
//! Exit codes: 0 success, 1 any other failure, 2 an invalid job or arguments, 3 the model does
//! not fit at batch size 1.

pub mod doctor;
pub mod estimate;
pub mod output;
pub mod probe;
pub mod remote;
pub mod serve;
pub mod tune;

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use crate::device::host;
use crate::device::select::{self, DeviceSpec};
use crate::job::Job;
use output::human;

/// Any failure not listed below.
pub const EXIT_FAILURE: u8 = 1;
/// The job or the arguments are invalid.
pub const EXIT_INVALID: u8 = 2;
/// The model does not fit at batch size 1.
pub const EXIT_DOES_NOT_FIT: u8 = 3;

/// Largest job file read, bytes: a job is a few hundred bytes.
const MAX_JOB_FILE_BYTES: u64 = 1 << 20;

/// Prints `error: message` on stderr and returns `code`.
fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

/// Reads and validates a job file, or the job on standard input when `path` is `-`.
pub fn read_job(path: &Path) -> Result<Job, String> {
    let (name, reader): (String, Box<dyn std::io::Read>) = if path == Path::new("-") {
        (
            "on standard input".into(),
            Box::new(std::io::stdin().lock()),
        )
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read job file {}: {e}", path.display()))?;
        (path.display().to_string(), Box::new(file))
    };
    let mut text = String::new();
    reader
        .take(MAX_JOB_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the job {name}: {e}"))?;
    if text.len() as u64 > MAX_JOB_FILE_BYTES {
        return Err(format!(
            "the job {name} is over 1 MiB; a job is a few hundred bytes"
        ));
    }
    Job::from_json(&text).map_err(|e| format!("invalid job {name}: {e}"))
}

/// Reads the job, checks the host budget and opens the device: the start of every command that
/// probes. Says so on stderr when `auto` fell back to the host.
fn job_and_device(
    job_path: &Path,
    device: DeviceSpec,
    host_memory: u64,
) -> Result<(Job, select::Opened), ExitCode> {
    let job = read_job(job_path).map_err(|message| fail(EXIT_INVALID, message))?;
    let budget = check_host_budget(host_memory).map_err(|message| fail(EXIT_INVALID, message))?;
    let opened = select::open(device, budget).map_err(|message| {
        fail(
            EXIT_FAILURE,
            format!("cannot open device {device}: {message}"),
        )
    })?;
    if let Some(reason) = &opened.fallback_reason {
        eprintln!("note: using the host device ({reason})");
    }
    Ok((job, opened))
}

/// How `tune` reports its answer: the summary or JSON on stdout, and optionally the recommended
/// batch size alone in a file, for scripts (a Slurm prolog, an init container).
#[derive(Debug, Clone, Default)]
pub struct TuneOutput {
    /// JSON instead of the summary.
    pub json: bool,
    /// Where to write the recommended batch size and a newline.
    pub batch_size_file: Option<std::path::PathBuf>,
    /// Where to draw the memory and throughput charts (SVG).
    pub plot: Option<std::path::PathBuf>,
}

impl TuneOutput {
    /// Prints the result of `job`, writes the batch-size file and draws the plot (into `plot`,
    /// created before the tune).
    fn deliver(
        &self,
        result: &crate::result::TuneResult,
        job: &Job,
        plot: Option<PlotFile>,
    ) -> ExitCode {
        if let Some(plot) = plot {
            let drawn = crate::plot::tune_svg(result, job.plan()).and_then(|svg| plot.write(&svg));
            if let Err(message) = drawn {
                return fail(EXIT_FAILURE, message);
            }
        }
        if let Some(path) = &self.batch_size_file {
            let written = std::fs::write(path, format!("{}\n", result.recommended_batch_size));
            if let Err(e) = written {
                return fail(
                    EXIT_FAILURE,
                    format!("cannot write the batch size to {}: {e}", path.display()),
                );
            }
        }
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(result).expect("results serialise")
            );
        } else {
            print!("{}", output::summary(result, job.search.knee_tolerance));
        }
        ExitCode::SUCCESS
    }
}

/// A file a chart goes to, created when the command starts so that an unwritable path fails
/// before any work is done.
pub struct PlotFile {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl PlotFile {
    /// Creates (or truncates) `path`.
    pub fn create(path: std::path::PathBuf) -> Result<PlotFile, String> {
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot write the plot to {}: {e}", path.display()))?;
        Ok(PlotFile { path, file })
    }

    /// Writes the chart.
    pub fn write(mut self, svg: &str) -> Result<(), String> {
        use std::io::Write;
        self.file
            .write_all(svg.as_bytes())
            .map_err(|e| format!("cannot write the plot to {}: {e}", self.path.display()))
    }
}

/// Checks a host budget against the machine: a budget past physical memory would let the host
/// device commit more than exists.
pub fn check_host_budget(bytes: u64) -> Result<u64, String> {
    if bytes == 0 {
        return Err("--host-memory must be more than 0 bytes".into());
    }
    match host::system_memory_bytes() {
        Some(physical) if bytes > physical => Err(format!(
            "--host-memory {} is more than this machine's {} of memory",
            human(bytes),
            human(physical)
        )),
        _ => Ok(bytes),
    }
}
