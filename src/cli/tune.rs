//! `headroom tune`: runs the search on a device here (or, with `--server`, on a running
//! service) and prints the result.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use headroom_devices::host::DEFAULT_BUDGET_BYTES;
use headroom_devices::select::DeviceSpec;
use headroom_engine::job::Job;
use headroom_engine::result::{Probe, TuneResult};
use serde::Serialize;

use super::input::{check_host_budget, model_line, JobSource, OutputFile};
use super::output::{self, human, print, print_line, probe_line};
use super::{remote, CliError};
use headroom_service::probe_worker::client::{ProbeWorker, Watchdog, WorkerCommand};

/// Arguments of `headroom tune`.
#[derive(clap::Args)]
pub struct TuneArgs {
    #[command(flatten)]
    job: JobSource,
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
    /// With --server: the GPU by its UUID (`GPU-...`) instead of --device.
    #[arg(long, value_name = "GPU-UUID", requires = "server")]
    gpu_uuid: Option<String>,
    /// Bearer token for --server.
    #[arg(long, env = "HEADROOM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// With --server: give up waiting after this many seconds (the job goes on there).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    timeout: u64,
}

/// Tunes the job here, or on the server given, and delivers the answer.
pub fn run(args: TuneArgs) -> Result<(), CliError> {
    let outputs = TuneOutput {
        json: args.json,
        batch_size_file: args
            .batch_size_file
            .map(|path| OutputFile::check("the batch size", path))
            .transpose()?,
        plot: args
            .plot
            .map(|path| OutputFile::check("the plot", path))
            .transpose()?,
    };
    let job = args.job.read()?;
    if let (Some(line), false) = (model_line(&job), args.json) {
        print_line(line)?;
    }
    if let Some(server) = &args.server {
        let timeout = Duration::from_secs(args.timeout);
        let target = remote::Target {
            device: args.device,
            gpu_uuid: args.gpu_uuid.clone(),
        };
        let answer = remote::tune_remote(server, &job, &target, args.token.as_deref(), timeout)?;
        return outputs.deliver(&answer, &answer.result, &job);
    }
    let budget = check_host_budget(args.host_memory.0)?;
    // The device is opened and probed in a worker process, as the service does: a GPU fault,
    // hang or driver crash ends the worker with an error here, not this process with a signal.
    let command = WorkerCommand::new("", budget).map_err(CliError::WorkerProgram)?;
    let mut worker = ProbeWorker::start(&command, args.device, WORKER_START)?;
    if let Some(reason) = worker.fallback_reason() {
        eprintln!("note: using the host device ({reason})");
    }
    let info = worker.info().clone();
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
    let result = worker.tune(&job, &Watchdog::DEFAULT, &mut print_probe)??;
    worker.stop(Duration::from_secs(5));
    outputs.deliver(&result, &result, &job)
}

/// How long a worker may take to open its device (a GPU compiles its kernels the first time).
const WORKER_START: Duration = Duration::from_secs(300);

/// How `tune` reports its answer: the summary or JSON on stdout, and optionally the recommended
/// batch size alone in a file, for scripts (a Slurm prolog, an init container), and the charts.
pub struct TuneOutput {
    /// JSON instead of the summary.
    pub json: bool,
    /// Where to write the recommended batch size and a newline.
    pub batch_size_file: Option<OutputFile>,
    /// Where to draw the memory and throughput charts (SVG).
    pub plot: Option<OutputFile>,
}

impl TuneOutput {
    /// Draws the plot of `result`, writes the batch-size file and prints `answer` (the result,
    /// or a server's answer around it) for `job`.
    pub fn deliver(
        &self,
        answer: &impl Serialize,
        result: &TuneResult,
        job: &Job,
    ) -> Result<(), CliError> {
        if let Some(plot) = &self.plot {
            plot.write(&headroom_service::plot::tune_svg(result, job.plan())?)?;
        }
        if let Some(file) = &self.batch_size_file {
            file.write(&format!("{}\n", result.recommended_batch_size))?;
        }
        if self.json {
            print_line(serde_json::to_string_pretty(answer).expect("results serialise"))?;
        } else {
            print(output::summary(result, job.search.knee_tolerance))?;
        }
        Ok(())
    }
}
