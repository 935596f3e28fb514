//! The `cuda` device: the training step with hand-written kernels, through cudarc and NVRTC.
//!
//! - [`kernel`]: every kernel and kernel family, named once.
//! - [`compile`]: NVRTC compilation of the embedded `kernels/*.cu`.
//! - `launch`: the launchers, implementing [`headroom_engine::step::Kernels`].
//! - [`shapes`]: every kernel's launch shape, as pure functions of the problem size.
//!
//! Libraries are loaded at run time; their absence is an error, never a panic. A driver error
//! of `CUDA_ERROR_OUT_OF_MEMORY` is [`DeviceError::OutOfMemory`]; every other driver error is a
//! fault, which poisons the context: it is rebuilt as soon as the probe's buffers are gone.
//! Memory is counted in the device's default memory pool, which holds this process's
//! allocations alone, so another process allocating during a probe is neither part of the
//! probe's bytes nor taken for a leak.

pub mod compile;
pub mod drill;
pub mod kernel;
pub mod kernel_cache;
mod launch;
pub mod shapes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUmemPool_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use compile::KernelForm;
use headroom_engine::device::{DeviceError, DeviceInfo, DeviceKind, Probing};
use kernel::{Family, Kernel};

/// Memory a probe may leave behind before it counts as a leak, on a device without memory pools
/// (counted device-wide there, where other processes move it too). With pools none: the pool's
/// live allocations are counted exactly.
const DEVICE_WIDE_LEAK_TOLERANCE: u64 = 64 << 20;

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

/// The newest CUDA version the driver supports, e.g. (13, 0); `None` without a driver.
pub fn driver_version() -> Option<(i32, i32)> {
    if !driver_available() {
        return None;
    }
    let mut version = 0;
    // SAFETY: writes one int; needs no initialised driver.
    let read = unsafe { sys::cuDriverGetVersion(&mut version).result() };
    read.ok().map(|()| (version / 1000, version % 1000 / 10))
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

/// Every kernel family compiled in `form` for a device of compute capability `capability`,
/// once per process.
fn compiled(form: KernelForm, (major, minor): (i32, i32)) -> Result<Arc<Vec<Ptx>>, CudaError> {
    type Images = HashMap<(KernelForm, i32, i32), Arc<Vec<Ptx>>>;
    static CACHE: OnceLock<Mutex<Images>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let lock = || {
        cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    if let Some(images) = lock().get(&(form, major, minor)) {
        return Ok(Arc::clone(images));
    }
    let images: Vec<Ptx> = Family::ALL
        .iter()
        .map(|&family| match form {
            KernelForm::Cubin => {
                compile::compile_cubin(family, &format!("sm_{major}{minor}")).map(Ptx::from_binary)
            }
            KernelForm::Ptx => compile::compile(family, &compile::arch_for(major, minor)),
        })
        .collect::<Result<_, _>>()?;
    let images = Arc::new(images);
    lock().insert((form, major, minor), Arc::clone(&images));
    Ok(images)
}

/// Every kernel, loaded in `form` into `context`, in [`Kernel::ALL`]'s order.
fn load_kernels(
    context: &Arc<CudaContext>,
    form: KernelForm,
    capability: (i32, i32),
) -> Result<Vec<CudaFunction>, CudaError> {
    let images = compiled(form, capability)?;
    let mut loaded = HashMap::new();
    for (&family, image) in Family::ALL.iter().zip(images.iter()) {
        let module = context
            .load_module(image.clone())
            .map_err(driver("loading a kernel module"))?;
        for kernel in family.kernels() {
            let function = module
                .load_function(kernel.name())
                .map_err(driver("loading a kernel"))?;
            loaded.insert(kernel, function);
        }
    }
    Ok(Kernel::ALL
        .iter()
        .map(|kernel| {
            loaded
                .remove(kernel)
                .expect("every family's kernels are loaded")
        })
        .collect())
}

/// A device UUID as NVML and DCGM write it: `GPU-` and 32 hex digits in groups of 8-4-4-4-12.
fn gpu_uuid(uuid: &sys::CUuuid) -> String {
    let hex: String = uuid
        .bytes
        .iter()
        .map(|&b| format!("{:02x}", b as u8))
        .collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A CUDA context on one GPU with the kernels loaded.
pub struct CudaDevice {
    index: u32,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Indexed by [`Kernel::index`].
    functions: Vec<CudaFunction>,
    multiprocessors: u32,
    name: String,
    uuid: String,
    total_bytes: u64,
    compute_capability: (i32, i32),
    /// How the kernels were loaded.
    kernel_form: KernelForm,
    /// Why the CUBIN was not used, when PTX was loaded instead.
    cubin_refused: Option<String>,
    /// The first fault, after which the driver fails every call of this process: NVIDIA documents
    /// that only a new process recovers, so the device refuses further probes.
    fault: Option<String>,
    /// Without pools: the most device memory seen used since the probe began.
    sampled_peak: u64,
    /// With pools: the pool's figures around the last probe.
    pool: PoolFigures,
    /// The event recorded where the step being timed began.
    step_started: Option<CudaEvent>,
}

/// The default memory pool around one probe, bytes: what the leak check reads, kept so that a
/// GPU run can show what a real pool keeps after a trim (`headroom doctor`, `scripts/gpu-check.sh`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolFigures {
    /// Reserved when the probe began, after a trim.
    pub reserved_before: u64,
    /// Live allocations when the probe began.
    pub used_before: u64,
    /// The most reserved during the probe (`RESERVED_MEM_HIGH`).
    pub reserved_peak: u64,
    /// Reserved once the probe's buffers were freed, before the trim.
    pub reserved_before_trim: u64,
    /// Reserved after trimming to zero: what the pool keeps.
    pub reserved_after_trim: u64,
    /// Live allocations after the probe: above `used_before` is a leak.
    pub used_after: u64,
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
        // Machine code for this GPU first: any driver that supports the GPU loads it. PTX from a
        // newer NVRTC than the driver is refused at load, so it is only the fallback.
        let (functions, kernel_form, cubin_refused) =
            match load_kernels(&context, KernelForm::Cubin, compute_capability) {
                Ok(functions) => (functions, KernelForm::Cubin, None),
                Err(cubin) => {
                    let functions = load_kernels(&context, KernelForm::Ptx, compute_capability)?;
                    (functions, KernelForm::Ptx, Some(cubin.to_string()))
                }
            };
        let multiprocessors = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))?
            .max(1) as u32;
        let name = context.name().map_err(driver("reading the device name"))?;
        let uuid = gpu_uuid(&context.uuid().map_err(driver("reading the device UUID"))?);
        let total_bytes = context
            .total_mem()
            .map_err(driver("reading the memory size"))? as u64;
        let stream = context.default_stream();
        Ok(CudaDevice {
            index,
            context,
            stream,
            functions,
            multiprocessors,
            name,
            uuid,
            total_bytes,
            compute_capability,
            kernel_form,
            cubin_refused,
            fault: None,
            sampled_peak: 0,
            pool: PoolFigures::default(),
            step_started: None,
        })
    }

    /// How the kernels were loaded, and why not as CUBIN when they were loaded as PTX.
    pub fn kernel_form(&self) -> (KernelForm, Option<&str>) {
        (self.kernel_form, self.cubin_refused.as_deref())
    }

    /// The default pool's figures around the last probe; `None` on a device without pools.
    pub fn pool_figures(&self) -> Option<PoolFigures> {
        self.default_pool().map(|_| self.pool)
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
    /// [`DeviceError::OutOfMemory`], everything else a fault that ends this process's use of the
    /// device.
    fn classify(&mut self, during: &str, requested_bytes: u64, error: DriverError) -> DeviceError {
        if error.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return DeviceError::OutOfMemory {
                requested_bytes,
                free_bytes: self.memory().map_or(0, |(free, _)| free),
            };
        }
        let message = format!("{during}: {error}");
        self.fault.get_or_insert_with(|| message.clone());
        DeviceError::Fault(message)
    }

    /// The device's default memory pool, where cudarc allocates when the device has pools.
    fn default_pool(&self) -> Option<sys::CUmemoryPool> {
        if !self.context.has_async_alloc() {
            return None;
        }
        let mut pool = std::ptr::null_mut();
        // SAFETY: a plain query of this context's device; the handle lives as long as the device.
        let found =
            unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.context.cu_device()).result() };
        found.ok().map(|()| pool)
    }

    /// Waits for the stream, then hands pooled memory back to the driver, so the next probe and
    /// `cuMemGetInfo` see it free; returns what the pool reserved before the trim.
    fn release_pooled_memory(&mut self) -> Result<u64, DeviceError> {
        let synchronized = self.stream.synchronize();
        synchronized.map_err(|e| self.classify("synchronising after a probe", 0, e))?;
        let Some(pool) = self.default_pool() else {
            return Ok(0);
        };
        let reserved = self.pool_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
        )?;
        // SAFETY: trims the pool of this context's device; no allocation of ours is live.
        let trimmed = unsafe { sys::cuMemPoolTrimTo(pool, 0).result() };
        trimmed.map_err(|e| self.classify("trimming the memory pool", 0, e))?;
        Ok(reserved)
    }

    /// Bytes this process holds on the device now: the default pool's reservation, or without
    /// pools the device's used memory (other processes' included).
    fn held_bytes(&mut self) -> Result<u64, DeviceError> {
        match self.default_pool() {
            Some(pool) => self.pool_attribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
            ),
            None => self
                .memory()
                .map(|(free, total)| total.saturating_sub(free)),
        }
    }

    /// Without pools, the device's used memory after an allocation, kept if it is the most
    /// since the probe began (the driver then counts nothing for this process alone).
    pub(super) fn sample_peak(&mut self) {
        if self.default_pool().is_none() {
            if let Ok((free, total)) = self.memory() {
                self.sampled_peak = self.sampled_peak.max(total.saturating_sub(free));
            }
        }
    }

    /// A `u64` attribute of `pool`.
    fn pool_attribute(
        &mut self,
        pool: sys::CUmemoryPool,
        attribute: CUmemPool_attribute,
    ) -> Result<u64, DeviceError> {
        let mut value = 0u64;
        // SAFETY: the pool's byte attributes are u64s, written into `value`.
        let read = unsafe {
            sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast()).result()
        };
        read.map(|()| value)
            .map_err(|e| self.classify("reading the memory pool", 0, e))
    }

    /// Checks that the probe's memory came back. With pools, every byte of the pool's live
    /// allocations (`USED_MEM_CURRENT`, exact): what a trim leaves reserved is the pool's own
    /// keeping, not a leak, and NVIDIA does not promise a trim to zero returns everything.
    /// Without pools, the device's used memory within a tolerance.
    fn check_returned(&mut self, before: u64) -> Result<(), DeviceError> {
        if let Some(pool) = self.default_pool() {
            self.pool.reserved_peak =
                self.pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?;
        }
        let reserved_before_trim = self.release_pooled_memory()?;
        let after = self.held_bytes()?;
        if let Some(pool) = self.default_pool() {
            let used =
                self.pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
            self.pool.reserved_before_trim = reserved_before_trim;
            self.pool.reserved_after_trim = after;
            self.pool.used_after = used;
            if used > self.pool.used_before {
                return Err(DeviceError::Fault(format!(
                    "device memory did not come back after the probe: the pool held {} bytes of \
                     allocations before and {used} after (reserved {before} before, {after} after \
                     trimming)",
                    self.pool.used_before
                )));
            }
            return Ok(());
        }
        if after > before.saturating_add(DEVICE_WIDE_LEAK_TOLERANCE) {
            return Err(DeviceError::Fault(format!(
                "device memory did not come back after the probe: {before} bytes held before, {after} after"
            )));
        }
        Ok(())
    }
}

impl Probing for CudaDevice {
    fn describe(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Cuda,
            index: self.index,
            name: self.name.clone(),
            uuid: Some(self.uuid.clone()),
            total_bytes: self.total_bytes,
            free_bytes: self.memory().map_or(0, |(free, _)| free),
        }
    }

    fn begin_probe(&mut self) -> Result<u64, DeviceError> {
        if let Some(fault) = &self.fault {
            return Err(DeviceError::Fault(format!(
                "an earlier fault ({fault}) left this process's CUDA context unusable; the driver \
                 recovers only in a new process"
            )));
        }
        self.release_pooled_memory()?;
        let held = self.held_bytes()?;
        match self.default_pool() {
            Some(pool) => {
                // The high watermark resets to what the pool reserves now.
                let zero = 0u64;
                // SAFETY: the attribute takes a u64, read from `zero`.
                let reset = unsafe {
                    sys::cuMemPoolSetAttribute(
                        pool,
                        CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                        (&zero as *const u64).cast_mut().cast(),
                    )
                    .result()
                };
                reset.map_err(|e| self.classify("resetting the pool's high watermark", 0, e))?;
                let used_before = self
                    .pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
                self.pool = PoolFigures {
                    reserved_before: held,
                    used_before,
                    ..PoolFigures::default()
                };
            }
            None => self.sampled_peak = held,
        }
        Ok(held)
    }

    fn peak_bytes(&mut self) -> Result<u64, DeviceError> {
        match self.default_pool() {
            Some(pool) => {
                self.pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)
            }
            None => Ok(self.sampled_peak),
        }
    }

    fn end_probe(&mut self, before: u64) -> Result<(), DeviceError> {
        // After a fault the driver answers nothing truthfully; the probe's error says enough.
        match self.fault {
            Some(_) => Ok(()),
            None => self.check_returned(before),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_read_as_nvml_writes_them() {
        let mut uuid = sys::CUuuid { bytes: [0; 16] };
        for (i, byte) in uuid.bytes.iter_mut().enumerate() {
            *byte = (i * 17) as u8 as _;
        }
        assert_eq!(gpu_uuid(&uuid), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }
}
