//! The fault drill: a deliberate illegal memory access in a throwaway process, and what the
//! driver answers afterwards. NVIDIA documents such a fault as sticky (every later call of the
//! process fails, and only a new process recovers); the drill records whether this driver does
//! so, for `scripts/gpu-check.sh` (`headroom worker --fault-drill`).

use cudarc::driver::PushKernelArg;
use serde::Serialize;

use super::kernel::Kernel;
use super::{shapes, CudaDevice};
use headroom_engine::device::{DeviceError, Probing};
use headroom_engine::plan::Storage;
use headroom_engine::step::{Allocate, Fill, Kernels};

/// A device address no allocation holds: the first page, which CUDA never maps.
const UNMAPPED_ADDRESS: u64 = 0x100;

/// What the driver answered at each step of the drill: "ok", or the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrillReport {
    /// Launching `fill_uniform` onto an unmapped address (launches are asynchronous).
    pub launch: String,
    /// The synchronise after it: where the fault shows.
    pub synchronize: String,
    /// Whether the fault was told apart from out-of-memory.
    pub classified_as_fault: bool,
    /// A new allocation afterwards.
    pub allocate_after: String,
    /// A correct kernel afterwards, synchronised.
    pub kernel_after: String,
    /// A probe afterwards: the device refuses it, naming the fault.
    pub probe_after: String,
    /// Whether every call after the fault failed, as NVIDIA documents.
    pub sticky: bool,
}

fn outcome(result: &Result<(), DeviceError>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

impl CudaDevice {
    /// Faults this process's context on purpose and reports what the driver does next. The
    /// context is unusable afterwards: run it only in a process of its own.
    pub fn fault_drill(&mut self) -> DrillReport {
        let (n, key, scale, storage) = (1i64 << 20, 1u64, 1.0f32, Storage::F32.code());
        let launch = launch_onto(self, UNMAPPED_ADDRESS, n, key, scale, storage);
        let synchronized = self.synchronize();
        let classified_as_fault = matches!(synchronized, Err(DeviceError::Fault(_)))
            || matches!(launch, Err(DeviceError::Fault(_)));
        let (allocate_after, kernel_after) = match self.zeroed(1024, Storage::F32) {
            Ok(mut buffer) => {
                let filled = self.fill_uniform(&mut buffer, 1024, key, scale);
                (Ok(()), filled.and_then(|()| self.synchronize()))
            }
            Err(e) => (Err(e.clone()), Err(e)),
        };
        let probe_after = self.begin_probe().map(drop);
        DrillReport {
            sticky: allocate_after.is_err() && kernel_after.is_err() && probe_after.is_err(),
            launch: outcome(&launch),
            synchronize: outcome(&synchronized),
            classified_as_fault,
            allocate_after: outcome(&allocate_after),
            kernel_after: outcome(&kernel_after),
            probe_after: outcome(&probe_after),
        }
    }
}

/// `fill_uniform` launched with `address` for its output: an access outside every allocation.
fn launch_onto(
    device: &mut CudaDevice,
    address: u64,
    n: i64,
    key: u64,
    scale: f32,
    storage: i32,
) -> Result<(), DeviceError> {
    let kernel = Kernel::FillUniform;
    let mut builder = device
        .stream
        .launch_builder(&device.functions[kernel.index()]);
    builder
        .arg(&address)
        .arg(&n)
        .arg(&key)
        .arg(&scale)
        .arg(&storage);
    // SAFETY: deliberately unsound on the device: the kernel writes to an unmapped address, which
    // the driver reports as an illegal address; no host memory is touched.
    let launched = unsafe { builder.launch(shapes::elementwise(n as u64)) };
    drop(builder);
    launched
        .map(|_| ())
        .map_err(|e| device.classify(kernel.name(), 0, e))
}
