//! `headroom completions`: a shell completion script on standard output.

use clap::CommandFactory;

use super::CliError;

/// Arguments of `headroom completions`.
#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell.
    shell: clap_complete::Shell,
}

/// Prints the completion script for the shell.
pub fn run(args: CompletionsArgs) -> Result<(), CliError> {
    clap_complete::generate(
        args.shell,
        &mut crate::Args::command(),
        "headroom",
        &mut std::io::stdout(),
    );
    Ok(())
}
