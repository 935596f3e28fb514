//! The `cuda` device: the training step with hand-written kernels, through cudarc and NVRTC.
//!
//! - [`compile`]: the embedded `kernels/*.cu` sources and NVRTC.
//! - `launch`: one launcher per kernel family, implementing [`crate::step::Kernels`].
//! - [`shapes`]: every kernel's launch shape, as pure functions of the problem size.
//!
//! Libraries are loaded at run time; their absence is an error, never a panic. An allocation that
//! fails with `CUDA_ERROR_OUT_OF_MEMORY` is [`DeviceError::OutOfMemory`]; every other driver error
//! is a fault, after which the context is rebuilt before the next probe.

pub mod compile;
mod launch;
pub mod shapes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use crate::device::{Device, DeviceError, DeviceInfo, DeviceKind, StepReport};
use crate::plan::Plan;
use crate::step;

/// Memory a probe may leave behind (allocator bookkeeping) before it counts as a leak.
const LEAK_TOLERANCE_BYTES: u64 = 256 << 20;

/// Why a CUDA device could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// `libcuda` is not on the loader path.
    #[error("the CUDA driver library (libcuda.so) was not found: this machine has no NVIDIA driver, or it is not on the loader path")]
    DriverMissing,
    /// The driver reported an error.
    #[error("CUDA driver error during {during}: {message}")]
    Driver {
        /// What headroom was doing.
        during: &'static str,
        /// The driver's error name and text.
        message: String,
    },
    /// The device index does not exist.
    #[error("there is no CUDA device {index} (this machine has {count})")]
    NoSuchDevice {
        /// The index asked for.
        index: u32,
        /// Devices present.
        count: u32,
    },
    /// The kernels did not compile.
    #[error(transparent)]
    Compile(#[from] compile::CompileError),
}

fn driver(during: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Driver {
        during,
        message: e.to_string(),
    }
}

/// Whether `libcuda` can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// Number of CUDA devices; an error if the driver is missing or fails.
pub fn device_count() -> Result<u32, CudaError> {
    if !driver_available() {
        return Err(CudaError::DriverMissing);
    }
    CudaContext::device_count()
        .map(|n| n.max(0) as u32)
        .map_err(driver("counting devices"))
}

/// PTX of every kernel family, compiled once per process per architecture.
fn compiled_ptx(arch: &str) -> Result<Arc<Vec<Ptx>>, CudaError> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Vec<Ptx>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().expect("PTX cache lock").get(arch) {
        return Ok(Arc::clone(ptx));
    }
    let ptx: Vec<Ptx> = compile::SOURCES
        .iter()
        .map(|source| compile::compile(source, arch))
        .collect::<Result<_, _>>()?;
    let ptx = Arc::new(ptx);
    cache
        .lock()
        .expect("PTX cache lock")
        .insert(arch.to_string(), Arc::clone(&ptx));
    Ok(ptx)
}

/// A CUDA context on one GPU with the kernels loaded.
pub struct CudaDevice {
    index: u32,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    multiprocessors: u32,
    name: String,
    compute_capability: (i32, i32),
    /// A fault poisons the context: it is rebuilt before the next probe.
    poisoned: bool,
}

impl CudaDevice {
    /// Opens device `index`: creates its context, compiles (or reuses) the kernels and loads them.
    pub fn open(index: u32) -> Result<CudaDevice, CudaError> {
        let count = device_count()?;
        if index >= count {
            return Err(CudaError::NoSuchDevice { index, count });
        }
        let context = CudaContext::new(index as usize).map_err(driver("creating the context"))?;
        // One stream only: cudarc's cross-stream event tracking is not needed.
        // SAFETY: no other stream of this context ever touches our buffers.
        unsafe { context.disable_event_tracking() };
        let compute_capability = context
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let ptx = compiled_ptx(&compile::arch_for(
            compute_capability.0,
            compute_capability.1,
        ))?;
        let mut functions = HashMap::new();
        for (source, ptx) in compile::SOURCES.iter().zip(ptx.iter()) {
            let module = context
                .load_module(ptx.clone())
                .map_err(driver("loading a kernel module"))?;
            for &kernel in source.kernels {
                let function = module
                    .load_function(kernel)
                    .map_err(driver("loading a kernel"))?;
                functions.insert(kernel, function);
            }
        }
        let multiprocessors = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))?
            .max(1) as u32;
        let name = context.name().map_err(driver("reading the device name"))?;
        let stream = context.default_stream();
        Ok(CudaDevice {
            index,
            context,
            stream,
            functions,
            multiprocessors,
            name,
            compute_capability,
            poisoned: false,
        })
    }

    /// The compute capability, e.g. (9, 0) for an H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Free and total bytes as the driver reports them.
    pub fn memory(&self) -> Result<(u64, u64), DeviceError> {
        self.context
            .mem_get_info()
            .map(|(free, total)| (free as u64, total as u64))
            .map_err(|e| DeviceError::Fault(format!("cuMemGetInfo: {e}")))
    }

    /// Maps a driver error: out-of-memory from an allocation or the synchronise after it is
    /// [`DeviceError::OutOfMemory`], everything else a fault that poisons the context.
    fn classify(&mut self, during: &str, requested_bytes: u64, error: DriverError) -> DeviceError {
        if error.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let free_bytes = self.memory().map_or(0, |(free, _)| free);
            return DeviceError::OutOfMemory {
                requested_bytes,
                free_bytes,
            };
        }
        self.poisoned = true;
        DeviceError::Fault(format!("{during}: {error}"))
    }

    /// Waits for the stream, then hands pooled memory back to the driver, so the next probe and
    /// `cuMemGetInfo` see it free.
    fn release_pooled_memory(&mut self) -> Result<(), DeviceError> {
        self.stream
            .synchronize()
            .map_err(|e| self.classify("synchronising after a probe", 0, e))?;
        if self.context.has_async_alloc() {
            let mut pool = std::ptr::null_mut();
            // SAFETY: plain driver calls on this context's device; the pool handle is the
            // device's default pool, which lives as long as the device.
            let trimmed = unsafe {
                sys::cuDeviceGetDefaultMemPool(&mut pool, self.context.cu_device())
                    .result()
                    .and_then(|()| sys::cuMemPoolTrimTo(pool, 0).result())
            };
            trimmed.map_err(|e| self.classify("trimming the memory pool", 0, e))?;
        }
        Ok(())
    }

    /// Replaces a poisoned context by a fresh one.
    fn rebuild(&mut self) -> Result<(), DeviceError> {
        let cu_device = self.context.cu_device();
        self.functions.clear();
        // SAFETY: resets this process's primary context on the device after a sticky error; our
        // buffers are gone (probes own them) and the context is re-created below.
        let reset = unsafe { sys::cuDevicePrimaryCtxReset_v2(cu_device).result() };
        reset
            .map_err(|e| DeviceError::Fault(format!("resetting the context after a fault: {e}")))?;
        *self = CudaDevice::open(self.index).map_err(|e| DeviceError::Fault(e.to_string()))?;
        Ok(())
    }

    fn prepare(&mut self) -> Result<u64, DeviceError> {
        if self.poisoned {
            self.rebuild()?;
        }
        self.release_pooled_memory()?;
        Ok(self.memory()?.0)
    }

    fn check_returned(&mut self, baseline_free: u64) -> Result<(), DeviceError> {
        self.release_pooled_memory()?;
        let (free, _) = self.memory()?;
        if free + LEAK_TOLERANCE_BYTES < baseline_free {
            return Err(DeviceError::Fault(format!(
                "device memory did not come back after the probe: {} bytes free before, {free} after",
                baseline_free
            )));
        }
        Ok(())
    }
}

impl Device for CudaDevice {
    fn info(&self) -> DeviceInfo {
        let (free_bytes, total_bytes) = self.memory().unwrap_or((0, 0));
        DeviceInfo {
            kind: DeviceKind::Cuda,
            index: self.index,
            name: self.name.clone(),
            total_bytes,
            free_bytes,
        }
    }

    fn run_steps(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: u32,
        seed: u64,
    ) -> Result<StepReport, DeviceError> {
        let baseline_free = self.prepare()?;
        let probe = step::run_probe(self, plan, batch_size, steps, seed);
        let report = match probe {
            Ok((buffers, run)) => {
                let held = self
                    .memory()
                    .map(|(free, _)| baseline_free.saturating_sub(free));
                drop(buffers);
                held.map(|device_bytes| StepReport {
                    step_seconds: run.step_seconds,
                    device_bytes,
                    final_loss: run.final_loss,
                })
            }
            Err(e) => Err(e),
        };
        if !self.poisoned {
            self.check_returned(baseline_free)?;
        }
        report
    }

    fn trained_parameters(
        &mut self,
        plan: &Plan,
        batch_size: u64,
        steps: u32,
        seed: u64,
    ) -> Result<Vec<f32>, DeviceError> {
        let baseline_free = self.prepare()?;
        let parameters = step::trained_parameters(self, plan, batch_size, steps, seed);
        if !self.poisoned {
            self.check_returned(baseline_free)?;
        }
        parameters
    }
}
