//! The launchers: [`Kernels`] on the GPU, one file per kernel family of
//! `crates/devices/kernels/`, with the launch shapes of [`super::shapes`]. Every launch goes
//! through [`launch!`], and every buffer argument through [`holds`], [`holds_mut`],
//! [`elements_up_to`] or [`elements_up_to_mut`], which check in debug builds that the buffer has
//! every element the launch addresses. Values live in [`DeviceValues`]: bytes and their
//! storage, whose code every kernel takes.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};

use super::kernel::Kernel;
use super::shapes::{self, GemmShape};
use super::CudaDevice;
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::Storage;
use headroom_engine::step::{Allocate, Kernels, Stored};

/// Launches `kernel` on the device's stream with `config` and the arguments in order, and
/// classifies a driver error. Scalars are passed as references to locals that outlive the call.
macro_rules! launch {
    ($device:expr, $kernel:expr, $config:expr; $($arg:expr),+ $(,)?) => {{
        let kernel: Kernel = $kernel;
        let mut builder = $device
            .stream
            .launch_builder(&$device.functions[kernel.index()]);
        $(builder.arg($arg);)+
        // SAFETY: the arguments follow the kernel's signature in kernels/*.cu (the CUDA stand-in
        // unpacks them by that signature in every test run), and every buffer holds what the
        // launch shape addresses (`holds` checks it in debug builds).
        let launched = unsafe { builder.launch($config) };
        drop(builder);
        launched
            .map(|_| ())
            .map_err(|e| $device.classify(kernel.name(), 0, e))
    }};
}

mod attention;
mod conv;
mod dropout;
mod elementwise;
mod embedding;
mod fill;
mod gemm;
mod loss;
mod norm;
mod optimizer;
mod pool;
mod reduce;
mod scores;

/// A device buffer of values: its bytes, and how they store values. Kernels take the pointer
/// and the storage's code (`kernels/storage.cuh`).
#[derive(Debug)]
pub struct DeviceValues {
    bytes: CudaSlice<u8>,
    storage: Storage,
    len: u64,
}

impl Stored for DeviceValues {
    fn storage(&self) -> Storage {
        self.storage
    }
}

/// `buffer`, which a launch reads up to element `len`.
fn holds(buffer: &DeviceValues, len: u64) -> &CudaSlice<u8> {
    debug_assert!(
        len <= buffer.len,
        "a launch addresses {len} elements of a {}-element buffer",
        buffer.len
    );
    &buffer.bytes
}

/// `buffer`, which a launch writes up to element `len`.
fn holds_mut(buffer: &mut DeviceValues, len: u64) -> &mut CudaSlice<u8> {
    debug_assert!(
        len <= buffer.len,
        "a launch addresses {len} elements of a {}-element buffer",
        buffer.len
    );
    &mut buffer.bytes
}

/// A label or mask buffer, which a launch reads up to element `len`.
fn elements_up_to<T>(buffer: &CudaSlice<T>, len: u64) -> &CudaSlice<T> {
    debug_assert!(
        len <= buffer.len() as u64,
        "a launch addresses {len} elements of {}",
        buffer.len()
    );
    buffer
}

/// A label or mask buffer, which a launch writes up to element `len`.
fn elements_up_to_mut<T>(buffer: &mut CudaSlice<T>, len: u64) -> &mut CudaSlice<T> {
    debug_assert!(
        len <= buffer.len() as u64,
        "a launch addresses {len} elements of {}",
        buffer.len()
    );
    buffer
}

/// The bytes of `len` elements of `element_bytes` each, if a device of `total_bytes` could hold
/// them; otherwise the bytes asked for (saturated), which is out of memory before any driver call.
pub(super) fn allocation_bytes(
    len: u64,
    element_bytes: u64,
    total_bytes: u64,
) -> Result<usize, u64> {
    let bytes = len.checked_mul(element_bytes).ok_or(u64::MAX)?;
    if bytes > total_bytes {
        return Err(bytes);
    }
    usize::try_from(bytes).map_err(|_| bytes)
}

impl CudaDevice {
    /// A zeroed buffer of `len` elements of `element_bytes` each, as a slice of `T`;
    /// out-of-memory here is what ends a probe.
    fn zeroed_slice<T: DeviceRepr + ValidAsZeroBits>(
        &mut self,
        len: u64,
        element_bytes: u64,
    ) -> Result<CudaSlice<T>, DeviceError> {
        let bytes =
            allocation_bytes(len, element_bytes, self.total_bytes).map_err(|requested_bytes| {
                DeviceError::OutOfMemory {
                    requested_bytes,
                    free_bytes: self.memory().map_or(0, |(free, _)| free),
                }
            })?;
        let result = self
            .stream
            .alloc_zeros::<T>(bytes / std::mem::size_of::<T>());
        let slice = result.map_err(|e| self.classify("allocating", bytes as u64, e))?;
        self.sample_peak();
        Ok(slice)
    }

    fn download<T: DeviceRepr>(
        &mut self,
        buffer: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>, DeviceError> {
        let result = self.stream.clone_dtoh(&buffer.slice(..len));
        result.map_err(|e| self.classify("copying to the host", 0, e))
    }

    fn upload<T: DeviceRepr>(&mut self, values: &[T]) -> Result<CudaSlice<T>, DeviceError> {
        let result = self.stream.clone_htod(values);
        let bytes = std::mem::size_of_val(values) as u64;
        result.map_err(|e| self.classify("copying to the device", bytes, e))
    }

    fn zero(&mut self, buffer: &mut DeviceValues) -> Result<(), DeviceError> {
        let result = self.stream.memset_zeros(&mut buffer.bytes);
        result.map_err(|e| self.classify("memset", 0, e))
    }

    /// Launches one product with its shape's launch (split-K where the depth is long and the
    /// output f32).
    fn gemm(
        &mut self,
        a: &DeviceValues,
        b: &DeviceValues,
        c: &mut DeviceValues,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        debug_assert_eq!(a.storage, b.storage, "a product's operands share a storage");
        let may_split = c.storage == Storage::F32;
        let launch_shape = shapes::gemm(&shape, self.multiprocessors, may_split);
        let accumulate = i32::from(launch_shape.accumulate);
        if launch_shape.accumulate {
            self.zero(c)?;
        }
        let (a_len, b_len) = shape.operand_lengths();
        let (m, n, k, lda, ldb, k_chunk) = (
            shape.m as i64,
            shape.n as i64,
            shape.k as i64,
            shape.lda as i64,
            shape.ldb as i64,
            launch_shape.k_chunk as i64,
        );
        let (ab_storage, c_storage) = (a.storage.code(), c.storage.code());
        launch!(self, shape.product.kernel(), launch_shape.config;
            holds(a, a_len), holds(b, b_len), holds_mut(c, shape.m * shape.n),
            &m, &n, &k, &lda, &ldb, &k_chunk, &accumulate, &ab_storage, &c_storage)
    }
}

impl Allocate for CudaDevice {
    type Values = DeviceValues;
    type U32 = CudaSlice<u32>;
    type Mask = CudaSlice<u8>;
    type Index = CudaSlice<i64>;
    type Error = DeviceError;

    fn zeroed(&mut self, len: u64, storage: Storage) -> Result<DeviceValues, DeviceError> {
        Ok(DeviceValues {
            bytes: self.zeroed_slice(len, storage.bytes())?,
            storage,
            len,
        })
    }

    fn u32_zeroed(&mut self, len: u64) -> Result<CudaSlice<u32>, DeviceError> {
        self.zeroed_slice(len, 4)
    }

    fn mask_zeroed(&mut self, len: u64) -> Result<CudaSlice<u8>, DeviceError> {
        self.zeroed_slice(len, 1)
    }

    fn index_zeroed(&mut self, len: u64) -> Result<CudaSlice<i64>, DeviceError> {
        self.zeroed_slice(len, 8)
    }
}

impl Transfer for CudaDevice {
    fn read_values(&mut self, buffer: &DeviceValues, len: u64) -> Result<Vec<f32>, DeviceError> {
        let bytes = self.download(holds(buffer, len), (len * buffer.storage.bytes()) as usize)?;
        Ok(widen(&bytes, buffer.storage))
    }

    fn read_u32(&mut self, buffer: &CudaSlice<u32>, len: u64) -> Result<Vec<u32>, DeviceError> {
        self.download(elements_up_to(buffer, len), len as usize)
    }

    fn read_index(&mut self, buffer: &CudaSlice<i64>, len: u64) -> Result<Vec<i64>, DeviceError> {
        self.download(buffer, len as usize)
    }

    fn read_mask(&mut self, buffer: &CudaSlice<u8>, len: u64) -> Result<Vec<u8>, DeviceError> {
        self.download(elements_up_to(buffer, len), len as usize)
    }

    fn write_values(
        &mut self,
        values: &[f32],
        storage: Storage,
    ) -> Result<DeviceValues, DeviceError> {
        Ok(DeviceValues {
            bytes: self.upload(&narrow(values, storage))?,
            storage,
            len: values.len() as u64,
        })
    }

    fn write_u32(&mut self, values: &[u32]) -> Result<CudaSlice<u32>, DeviceError> {
        self.upload(values)
    }

    fn write_index(&mut self, values: &[i64]) -> Result<CudaSlice<i64>, DeviceError> {
        self.upload(values)
    }
}

/// Values stored as `storage`, little-endian bytes, as f32.
fn widen(bytes: &[u8], storage: Storage) -> Vec<f32> {
    match storage {
        Storage::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Storage::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Storage::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// `values` stored as `storage` (rounded to nearest even), little-endian bytes.
fn narrow(values: &[f32], storage: Storage) -> Vec<u8> {
    match storage {
        Storage::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Storage::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Storage::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

impl Kernels for CudaDevice {
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        // Stream-ordered allocations may report out-of-memory here rather than at the call.
        let result = self.stream.synchronize();
        result.map_err(|e| self.classify("synchronising", 0, e))
    }

    fn start_timing(&mut self) -> Result<(), DeviceError> {
        let recorded = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        self.step_started = Some(recorded.map_err(|e| self.classify("recording an event", 0, e))?);
        Ok(())
    }

    fn stop_timing(&mut self) -> Result<Option<f64>, DeviceError> {
        let Some(started) = self.step_started.take() else {
            return self.synchronize().map(|()| None);
        };
        let ended = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let ended = ended.map_err(|e| self.classify("recording an event", 0, e))?;
        // The stream's own synchronise first: it is where an out-of-memory of stream-ordered
        // allocations shows, and the event's wait would report it as a fault.
        self.synchronize()?;
        let elapsed = started.elapsed_ms(&ended);
        let milliseconds = elapsed.map_err(|e| self.classify("timing a step", 0, e))?;
        Ok(Some(f64::from(milliseconds) / 1000.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_sizes_that_overflow_or_exceed_the_device_are_refused() {
        let total = 80 << 30;
        assert_eq!(allocation_bytes(1000, 4, total), Ok(4000));
        assert_eq!(allocation_bytes(20 << 30, 4, total), Ok(80 << 30));
        assert_eq!(
            allocation_bytes((20 << 30) + 1, 4, total),
            Err((80 << 30) + 4)
        );
        // A saturated product of user sizes, and one whose byte count wraps in 64 bits.
        assert_eq!(allocation_bytes(u64::MAX, 4, total), Err(u64::MAX));
        assert_eq!(allocation_bytes(1 << 62, 4, total), Err(u64::MAX));
        assert_eq!(allocation_bytes((1 << 62) + 1, 4, u64::MAX), Err(u64::MAX));
    }
}
