//! The `headroom` command line: parses the arguments, runs the command, exits with its code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Finds the largest training batch size a device can hold for a model, and a safe one to use.
#[derive(Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 success, 1 any other failure, 2 an invalid job or arguments, \
                  3 the model does not fit at batch size 1."
)]
pub struct Args {
    #[command(subcommand)]
    command: cli::Command,
}

fn main() -> ExitCode {
    // Load kernel code when a module loads, not at its first launch: a probe that has filled the
    // device must not find the GPU unable to load the next kernel. Set before CUDA initialises.
    if std::env::var_os("CUDA_MODULE_LOADING").is_none() {
        std::env::set_var("CUDA_MODULE_LOADING", "EAGER");
    }
    match Args::parse().command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_closed_output() => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
