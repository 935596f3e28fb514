//! The one error every command returns, and the exit code each kind of failure leaves.

use std::path::PathBuf;

use headroom_devices::cuda::CudaError;
use headroom_devices::select::DeviceSpec;
use headroom_engine::catalogue::UnknownGpu;
use headroom_engine::plan::DoesNotFit;
use headroom_engine::{DeviceError, JobError, TuneError};
use headroom_service::config::ConfigError;
use headroom_service::plot::PlotError;
use headroom_service::probe_worker::client::WorkerError;
use headroom_service::problem::Problem;
use headroom_service::ServeError;

use super::remote::RemoteError;

/// Any failure not listed below.
pub const EXIT_FAILURE: u8 = 1;
/// The job or the arguments are invalid.
pub const EXIT_INVALID: u8 = 2;
/// The model does not fit at batch size 1.
pub const EXIT_DOES_NOT_FIT: u8 = 3;

/// Why a command failed. [`CliError::exit_code`] decides the process's exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The job file or standard input could not be read.
    #[error("cannot read the job {name}: {source}")]
    ReadJob {
        /// The file, or `on standard input`.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// The job is larger than any job.
    #[error("the job {name} is over 1 MiB; a job is a few hundred bytes")]
    JobTooLarge {
        /// The file, or `on standard input`.
        name: String,
    },
    /// The job does not validate.
    #[error("invalid job {name}: {source}")]
    InvalidJob {
        /// The file, or `on standard input`.
        name: String,
        /// The field at fault and why.
        source: JobError,
    },
    /// A command-line value that clap's types cannot check.
    #[error("{0}")]
    Argument(String),
    /// A GPU name the catalogue does not resolve.
    #[error(transparent)]
    Gpu(#[from] UnknownGpu),
    /// The service's settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file the command was asked to write cannot be written (checked before any work).
    #[error("cannot write {what} to {}: {source}", .path.display())]
    Unwritable {
        /// What was to be written.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Writing a file failed once the answer was there.
    #[error("cannot write {what} to {}: {source}", .path.display())]
    Write {
        /// What was to be written.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The plot could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The device asked for could not be opened.
    #[error("cannot open device {device}: {source}")]
    OpenDevice {
        /// The device.
        device: DeviceSpec,
        /// The driver's or the library's error.
        source: CudaError,
    },
    /// The probe worker process failed: it did not start, crashed, or a probe hung.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// This binary's own path, which runs the probe worker, could not be found.
    #[error("cannot find this binary to start its probe worker: {0}")]
    WorkerProgram(std::io::Error),
    /// Standard output could not be written (its reader gone: a closed pipe).
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
    /// The model does not fit at batch size 1 (the memory model said so).
    #[error(transparent)]
    DoesNotFit(#[from] DoesNotFit),
    /// The search gave no answer.
    #[error(transparent)]
    Tune(#[from] TuneError),
    /// A single probe failed with a fault.
    #[error("probe at batch size {batch_size}: {source}")]
    Probe {
        /// The batch size probed.
        batch_size: u64,
        /// The device's error.
        source: DeviceError,
    },
    /// Talking to a server failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The server answered with a problem.
    #[error("the server answered: {}", .0.detail)]
    Refused(Box<Problem>),
    /// The service could not start or stopped with an error.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Something the command needs from the system failed (the async runtime, a socket).
    #[error("{what}: {source}")]
    System {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Checks of `doctor` failed; the report says which.
    #[error("{0} check(s) failed")]
    ChecksFailed(usize),
}

impl CliError {
    /// The exit code: 2 for an invalid job or arguments, 3 when the model does not fit at batch
    /// size 1, 1 for everything else.
    /// Whether the failure is only that standard output's reader went away (`| head`): the
    /// process ends quietly and successfully, its reader having had what it wanted.
    pub fn is_closed_output(&self) -> bool {
        matches!(self, CliError::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::ReadJob { .. }
            | CliError::JobTooLarge { .. }
            | CliError::InvalidJob { .. }
            | CliError::Argument(_)
            | CliError::Unwritable { .. }
            | CliError::Gpu(_)
            | CliError::Config(_) => EXIT_INVALID,
            CliError::DoesNotFit(_) | CliError::Tune(TuneError::DoesNotFit(_)) => EXIT_DOES_NOT_FIT,
            CliError::Refused(problem) if problem.is_does_not_fit() => EXIT_DOES_NOT_FIT,
            CliError::Refused(problem) if matches!(problem.status, 400 | 413 | 415 | 422) => {
                EXIT_INVALID
            }
            _ => EXIT_FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_exit_code() {
        let invalid = CliError::Argument("--memory must be more than 0 bytes".into());
        assert_eq!(invalid.exit_code(), EXIT_INVALID);
        let does_not_fit = DoesNotFit {
            fixed_bytes: 1,
            batch_one_bytes: 2,
            free_bytes: 0,
        };
        assert_eq!(
            CliError::from(TuneError::from(does_not_fit)).exit_code(),
            EXIT_DOES_NOT_FIT
        );
        assert_eq!(CliError::from(does_not_fit).exit_code(), EXIT_DOES_NOT_FIT);
        // A server's answer, by its problem type.
        let refused = |err: &TuneError| CliError::Refused(Box::new(Problem::of_search(err)));
        let remote = refused(&TuneError::from(does_not_fit));
        assert_eq!(remote.exit_code(), EXIT_DOES_NOT_FIT);
        let fault = TuneError::Fault {
            batch_size: 8,
            message: "illegal address".into(),
        };
        assert_eq!(refused(&fault).exit_code(), EXIT_FAILURE);
        assert_eq!(CliError::from(fault).exit_code(), EXIT_FAILURE);
        assert_eq!(CliError::ChecksFailed(2).exit_code(), EXIT_FAILURE);
    }
}
