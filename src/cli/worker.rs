//! `headroom worker` (hidden): the probe worker process the service starts for each device
//! (`headroom_service::probe_worker`). Not for people: it speaks JSON lines on its standard
//! input and output.

use super::CliError;
use headroom_devices::select::DeviceSpec;
use headroom_service::probe_worker::child::{self, Exit};

/// Arguments of `headroom worker`.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The device to open: host or cuda:N (a GPU worker is started seeing only its GPU, as 0).
    #[arg(long, default_value = "host")]
    device: DeviceSpec,
    /// Memory budget of the host device, bytes.
    #[arg(long, default_value_t = 256 << 20)]
    host_memory: u64,
    /// Print how many CUDA devices the driver lists, and exit.
    #[arg(long)]
    count_cuda: bool,
    /// Fault CUDA device 0 on purpose, print what the driver answered after, and exit 3 (the
    /// fault was told apart from out-of-memory) or 0 (it was not): for `scripts/gpu-check.sh`.
    #[arg(long)]
    fault_drill: bool,
}

/// Runs the worker until the service closes its input, or the device faults.
pub fn run(args: WorkerArgs) -> Result<(), CliError> {
    let exit = if args.count_cuda {
        child::count_cuda()
    } else if args.fault_drill {
        child::fault_drill()
    } else {
        child::run(args.device, args.host_memory)
    };
    match exit {
        Exit::Done => Ok(()),
        other => std::process::exit(other as i32),
    }
}
