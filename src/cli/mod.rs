//! The commands behind the `headroom` binary, one file each with its own arguments, and what
//! they print.
//!
//! - [`tune`]: probe a device here, or through a running service ([`remote`]).
//! - [`estimate`]: the memory model alone. [`probe`]: single probes with throughput.
//! - [`doctor`]: what this node has, and every kernel against the host.
//! - [`serve`]: the HTTP service. [`completions`]: shell completion scripts.
//! - [`worker`]: the probe worker process the service starts per device (hidden).
//! - [`input`]: reading the job and opening the device; [`output`]: the human-readable answers.
//! - [`error`]: the one error every command returns, and its exit code.

pub mod completions;
pub mod doctor;
pub mod error;
pub mod estimate;
pub mod input;
pub mod output;
pub mod probe;
pub mod remote;
pub mod serve;
pub mod tune;
pub mod worker;

use clap::Subcommand;

pub use error::CliError;

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// Probe a device with real training steps and report the largest and recommended batch size.
    Tune(tune::TuneArgs),
    /// The memory model alone, no probe: the predicted largest batch for an amount of free
    /// memory, for a GPU of the catalogue (--gpu), or for every GPU of it (neither).
    Estimate(estimate::EstimateArgs),
    /// Run single probes at given batch sizes and report fit or OOM, throughput and TFLOP/s.
    Probe(probe::ProbeArgs),
    /// Serve POST /tune, jobs, devices and Prometheus metrics over HTTP.
    Serve(serve::ServeArgs),
    /// Check this node: CUDA libraries, devices, kernel compilation, every kernel against the host.
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script, e.g. `headroom completions bash > /etc/bash_completion.d/headroom`.
    Completions(completions::CompletionsArgs),
    /// The probe worker process `serve` starts for each device (not for direct use).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

impl Command {
    /// Runs the command.
    pub fn run(self) -> Result<(), CliError> {
        match self {
            Command::Tune(args) => tune::run(args),
            Command::Estimate(args) => estimate::run(args),
            Command::Probe(args) => probe::run(args),
            Command::Serve(args) => serve::run(args),
            Command::Doctor(args) => doctor::run(args),
            Command::Completions(args) => completions::run(args),
            Command::Worker(args) => worker::run(args),
        }
    }
}
