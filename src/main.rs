//! The `headroom` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{CommandFactory, Parser, Subcommand};
use headroom::cli;
use headroom::config::LogFormat;
use headroom::device::host::DEFAULT_BUDGET_BYTES;
use headroom::device::select::DeviceSpec;

/// Finds the largest training batch size a device can hold for a model, and a safe one to use.
#[derive(Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 success, 1 any other failure, 2 an invalid job or arguments, \
                  3 the model does not fit at batch size 1."
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Probe a device with real training steps and report the largest and recommended batch size.
    Tune {
        /// The job description (JSON), e.g. examples/cifar10-mlp-adam.json; `-` reads standard input.
        job: PathBuf,
        /// auto (CUDA when present, else host), host, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// Memory budget of the host device, e.g. 256MiB or 2GiB.
        #[arg(long, default_value_t = ByteSize(DEFAULT_BUDGET_BYTES))]
        host_memory: ByteSize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Also write the recommended batch size alone to this file (for scripts).
        #[arg(long, value_name = "PATH")]
        batch_size_file: Option<PathBuf>,
        /// Draw memory and throughput against batch size to this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        /// Send the job to a running `headroom serve` at this URL instead of probing here.
        #[arg(long)]
        server: Option<String>,
        /// Bearer token for --server.
        #[arg(long, env = "HEADROOM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// With --server: give up waiting after this many seconds (the job goes on there).
        #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
        timeout: u64,
    },
    /// The memory model alone, no probe: the predicted largest batch for an amount of free
    /// memory, for a GPU of the catalogue (--gpu), or for every GPU of it (neither).
    Estimate {
        /// The job description (JSON); `-` reads standard input.
        job: PathBuf,
        /// Free device memory, charged exactly, e.g. 80GiB.
        #[arg(long, conflicts_with = "gpu")]
        memory: Option<ByteSize>,
        /// A GPU of the catalogue, e.g. H100 or "A100 40GB"; an unknown name lists them.
        #[arg(long)]
        gpu: Option<String>,
        /// Draw memory against batch size to this SVG file (with --memory or --gpu).
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        /// Print the estimate as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run single probes at given batch sizes and report fit or OOM, throughput and TFLOP/s.
    Probe {
        /// The job description (JSON); `-` reads standard input.
        job: PathBuf,
        /// Batch sizes to probe, e.g. --batch-size 1024,65536.
        #[arg(long = "batch-size", value_delimiter = ',', required = true)]
        batch_sizes: Vec<u64>,
        /// auto, host, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// Memory budget of the host device.
        #[arg(long, default_value_t = ByteSize(DEFAULT_BUDGET_BYTES))]
        host_memory: ByteSize,
        /// The device's f32 peak, to report the share reached.
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Print the measurements as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve POST /tune, jobs, devices and Prometheus metrics over HTTP.
    Serve {
        /// Config file (see config/default.toml); HEADROOM_* variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 0.0.0.0:8080.
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
        /// Device to serve (repeatable): auto, host, cuda:N.
        #[arg(long = "device")]
        devices: Vec<DeviceSpec>,
        /// Memory budget of the host device.
        #[arg(long)]
        host_memory: Option<ByteSize>,
        /// Bearer token required for /tune and /jobs.
        #[arg(long)]
        token: Option<String>,
        /// Log format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Check this node: CUDA libraries, devices, kernel compilation, every kernel against the host.
    Doctor {
        /// Memory budget of the host device.
        #[arg(long, default_value_t = ByteSize(DEFAULT_BUDGET_BYTES))]
        host_memory: ByteSize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g. `headroom completions bash > /etc/bash_completion.d/headroom`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    // Load kernel code when a module loads, not at its first launch: a probe that has filled the
    // device must not find the GPU unable to load the next kernel. Set before CUDA initialises.
    if std::env::var_os("CUDA_MODULE_LOADING").is_none() {
        std::env::set_var("CUDA_MODULE_LOADING", "EAGER");
    }
    match Args::parse().command {
        Command::Tune {
            job,
            device,
            server: Some(server),
            token,
            json,
            batch_size_file,
            plot,
            timeout,
            ..
        } => match cli::read_job(&job) {
            Ok(job) => cli::remote::tune_remote_command(
                &server,
                &job,
                device,
                token.as_deref(),
                &cli::TuneOutput {
                    json,
                    batch_size_file,
                    plot,
                },
                Duration::from_secs(timeout),
            ),
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::from(cli::EXIT_INVALID)
            }
        },
        Command::Tune {
            job,
            device,
            host_memory,
            json,
            batch_size_file,
            plot,
            server: None,
            ..
        } => cli::tune::tune_command(
            &job,
            device,
            host_memory.0,
            &cli::TuneOutput {
                json,
                batch_size_file,
                plot,
            },
        ),
        Command::Serve {
            config,
            bind,
            devices,
            host_memory,
            token,
            log_format,
        } => cli::serve::serve_command(
            config.as_deref(),
            cli::serve::ServeOverrides {
                bind,
                host_memory: host_memory.map(|b| b.0),
                token,
                log_format,
                devices,
            },
        ),
        Command::Estimate {
            job,
            memory,
            gpu,
            plot,
            json,
        } => {
            let target = match (memory, gpu) {
                (Some(memory), _) => cli::estimate::Target::Memory(memory.0),
                (None, Some(gpu)) => cli::estimate::Target::Gpu(gpu),
                (None, None) => cli::estimate::Target::Catalogue,
            };
            cli::estimate::estimate_command(&job, target, json, plot)
        }
        Command::Probe {
            job,
            batch_sizes,
            device,
            host_memory,
            peak_tflops,
            json,
        } => {
            cli::probe::probe_command(&job, device, host_memory.0, &batch_sizes, peak_tflops, json)
        }
        Command::Doctor { host_memory, json } => cli::doctor::doctor_command(host_memory.0, json),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "headroom",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
    }
}
