//! The launchers: [`Kernels`] on the GPU, one section per kernel family in `kernels/`, with the
//! launch shapes of [`super::shapes`]. Every launch goes through [`launch!`], and every buffer
//! argument through [`holds`], [`holds_mut`], [`elements_up_to`] or [`elements_up_to_mut`],
//! which check in debug builds that the buffer has every element the launch addresses. Values
//! live in [`DeviceValues`]: bytes and their storage, whose code every kernel takes.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};

use super::kernel::Kernel;
use super::shapes::{self, activation_code, GemmShape};
use super::CudaDevice;
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::program::{BatchStatistics, OptimizerState, RunningStatistics};
use headroom_engine::plan::{
    Activation, Convolution, Planes, Pooling, Storage, BATCH_NORM_EPS, BATCH_NORM_MOMENTUM,
};
use headroom_engine::step::{
    Allocate, Kernels, Stored, UpdateRule, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, MOMENTUM,
};
use headroom_engine::synthetic;

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

/// conv.cu's geometry arguments: rows, in_channels, height, width, out_channels, kernel, stride,
/// padding, out_height, out_width.
fn conv_geometry(rows: u64, conv: &Convolution) -> [i64; 10] {
    [
        rows,
        conv.in_channels,
        conv.height,
        conv.width,
        conv.out_channels,
        conv.kernel,
        conv.stride,
        conv.padding,
        conv.out_height(),
        conv.out_width(),
    ]
    .map(|v| v as i64)
}

/// pool.cu's geometry arguments: rows, channels, height, width, kernel, stride, padding,
/// out_height, out_width.
fn pool_geometry(rows: u64, pool: &Pooling) -> [i64; 9] {
    [
        rows,
        pool.channels,
        pool.height,
        pool.width,
        pool.kernel,
        pool.stride,
        pool.padding,
        pool.out_height(),
        pool.out_width(),
    ]
    .map(|v| v as i64)
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

    // ---- fill.cu -------------------------------------------------------------------------------

    fn fill_uniform(
        &mut self,
        out: &mut DeviceValues,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, out.storage.code());
        launch!(self, Kernel::FillUniform, shapes::elementwise(len);
            holds_mut(out, len), &n, &key, &scale, &storage)
    }

    fn fill_labels(
        &mut self,
        labels: &mut CudaSlice<u32>,
        inputs: &DeviceValues,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (r, f, c) = (rows as i64, features as i64, classes as i64);
        let storage = inputs.storage.code();
        launch!(self, Kernel::FillLabels, shapes::elementwise(rows);
            elements_up_to(labels, rows), holds(inputs, rows * features), &r, &f, &c, &storage)
    }

    // ---- dropout.cu ----------------------------------------------------------------------------

    fn dropout_forward(
        &mut self,
        x: &DeviceValues,
        mask: &mut CudaSlice<u8>,
        y: &mut DeviceValues,
        len: u64,
        p: f32,
        key: u64,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, y.storage.code());
        let (threshold, scale) = (synthetic::keep_threshold(p), synthetic::dropout_scale(p));
        launch!(self, Kernel::DropoutForward, shapes::elementwise(len);
            holds(x, len), elements_up_to_mut(mask, len), holds_mut(y, len), &n, &threshold, &scale,
            &key, &storage)
    }

    fn dropout_backward(
        &mut self,
        grad: &mut DeviceValues,
        mask: &CudaSlice<u8>,
        len: u64,
        p: f32,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, grad.storage.code());
        let scale = synthetic::dropout_scale(p);
        launch!(self, Kernel::DropoutBackward, shapes::elementwise(len);
            holds_mut(grad, len), elements_up_to(mask, len), &n, &scale, &storage)
    }

    // ---- gemm.cu -------------------------------------------------------------------------------

    fn linear_forward(
        &mut self,
        x: &DeviceValues,
        w: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(x, w, y, GemmShape::forward(rows, inputs, outputs))
    }

    fn weight_gradient(
        &mut self,
        dy: &DeviceValues,
        x: &DeviceValues,
        dw: &mut DeviceValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, x, dw, GemmShape::weight_gradient(rows, inputs, outputs))
    }

    fn input_gradient(
        &mut self,
        dy: &DeviceValues,
        w: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, w, dx, GemmShape::input_gradient(rows, inputs, outputs))
    }

    // ---- elementwise.cu ------------------------------------------------------------------------

    fn conv2d_forward(
        &mut self,
        x: &DeviceValues,
        w: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let g = conv_geometry(rows, conv);
        let storage = x.storage.code();
        launch!(self, Kernel::Conv2dForward, shapes::elementwise(rows * conv.outputs());
            holds(x, rows * conv.inputs()), holds(w, conv.weights()),
            holds_mut(y, rows * conv.outputs()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5], &g[6],
            &g[7], &g[8], &g[9], &storage)
    }

    fn conv2d_input_gradient(
        &mut self,
        dy: &DeviceValues,
        w: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let g = conv_geometry(rows, conv);
        let storage = dy.storage.code();
        launch!(self, Kernel::Conv2dInputGradient, shapes::elementwise(rows * conv.inputs());
            holds(dy, rows * conv.outputs()), holds(w, conv.weights()),
            holds_mut(dx, rows * conv.inputs()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5], &g[6],
            &g[7], &g[8], &g[9], &storage)
    }

    fn conv2d_weight_gradient(
        &mut self,
        dy: &DeviceValues,
        x: &DeviceValues,
        dw: &mut DeviceValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let g = conv_geometry(rows, conv);
        let (storage, dw_storage) = (dy.storage.code(), dw.storage.code());
        launch!(self, Kernel::Conv2dWeightGradient, shapes::conv2d_weight_gradient(conv.weights());
            holds(dy, rows * conv.outputs()), holds(x, rows * conv.inputs()),
            holds_mut(dw, conv.weights()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5], &g[6],
            &g[7], &g[8], &g[9], &storage, &dw_storage)
    }

    fn max_pool_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        indices: &mut CudaSlice<i64>,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let g = pool_geometry(rows, pool);
        let (outputs, storage) = (rows * pool.outputs(), x.storage.code());
        launch!(self, Kernel::MaxPool2dForward, shapes::elementwise(outputs);
            holds(x, rows * pool.inputs()), holds_mut(y, outputs),
            elements_up_to_mut(indices, outputs), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5],
            &g[6], &g[7], &g[8], &storage)
    }

    fn max_pool_backward(
        &mut self,
        dy: &DeviceValues,
        indices: &CudaSlice<i64>,
        dx: &mut DeviceValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let g = pool_geometry(rows, pool);
        let (outputs, storage) = (rows * pool.outputs(), dy.storage.code());
        launch!(self, Kernel::MaxPool2dBackward, shapes::elementwise(rows * pool.inputs());
            holds(dy, outputs), elements_up_to(indices, outputs),
            holds_mut(dx, rows * pool.inputs()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5],
            &g[6], &g[7], &g[8], &storage)
    }

    fn avg_pool_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let g = pool_geometry(rows, pool);
        let (outputs, storage) = (rows * pool.outputs(), x.storage.code());
        launch!(self, Kernel::AvgPool2dForward, shapes::elementwise(outputs);
            holds(x, rows * pool.inputs()), holds_mut(y, outputs), &g[0], &g[1], &g[2], &g[3],
            &g[4], &g[5], &g[6], &g[7], &g[8], &storage)
    }

    fn avg_pool_backward(
        &mut self,
        dy: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let g = pool_geometry(rows, pool);
        let storage = dy.storage.code();
        launch!(self, Kernel::AvgPool2dBackward, shapes::elementwise(rows * pool.inputs());
            holds(dy, rows * pool.outputs()), holds_mut(dx, rows * pool.inputs()), &g[0], &g[1],
            &g[2], &g[3], &g[4], &g[5], &g[6], &g[7], &g[8], &storage)
    }

    // ---- norm.cu -------------------------------------------------------------------------------

    fn batch_norm_forward(
        &mut self,
        x: &DeviceValues,
        scale: &DeviceValues,
        bias: &DeviceValues,
        residual: Option<&DeviceValues>,
        y: &mut DeviceValues,
        post: Option<&mut DeviceValues>,
        saved: &mut BatchStatistics<DeviceValues>,
        running: &mut RunningStatistics<DeviceValues, CudaSlice<i64>>,
        planes: &Planes,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (len, channels) = (planes.values(), planes.channels);
        let (r, c, k) = (planes.rows as i64, channels as i64, planes.spatial as i64);
        let (eps, momentum) = (BATCH_NORM_EPS, BATCH_NORM_MOMENTUM);
        let (code, storage, param_storage) = (
            activation_code(activation),
            x.storage.code(),
            scale.storage.code(),
        );
        let (has_residual, has_post) = (i32::from(residual.is_some()), i32::from(post.is_some()));
        let config = shapes::block_per_channel(channels);
        let steps = elements_up_to_mut(&mut running.steps, 1);
        // Without a residual or an activation the kernel reads no `residual` and writes no
        // `post`; each is then given `x`, live and unused.
        let residual = holds(residual.unwrap_or(x), len);
        match post {
            Some(post) => launch!(self, Kernel::BatchNormForward, config;
                holds(x, len), holds(scale, channels), holds(bias, channels), residual,
                &has_residual, holds_mut(y, len), holds_mut(post, len),
                holds_mut(&mut saved.mean, channels), holds_mut(&mut saved.invstd, channels),
                holds_mut(&mut running.mean, channels), holds_mut(&mut running.var, channels),
                steps, &r, &c, &k, &eps, &momentum, &has_post, &code, &storage, &param_storage),
            None => launch!(self, Kernel::BatchNormForward, config;
                holds(x, len), holds(scale, channels), holds(bias, channels), residual,
                &has_residual, holds_mut(y, len), holds(x, len),
                holds_mut(&mut saved.mean, channels), holds_mut(&mut saved.invstd, channels),
                holds_mut(&mut running.mean, channels), holds_mut(&mut running.var, channels),
                steps, &r, &c, &k, &eps, &momentum, &has_post, &code, &storage, &param_storage),
        }
    }

    fn batch_norm_backward(
        &mut self,
        dy: &DeviceValues,
        x: &DeviceValues,
        scale: &DeviceValues,
        saved: BatchStatistics<&DeviceValues>,
        dx: &mut DeviceValues,
        dscale: &mut DeviceValues,
        dbias: &mut DeviceValues,
        planes: &Planes,
    ) -> Result<(), DeviceError> {
        let (len, channels) = (planes.values(), planes.channels);
        let (r, c, k) = (planes.rows as i64, channels as i64, planes.spatial as i64);
        let (storage, param_storage, grad_storage) = (
            dy.storage.code(),
            scale.storage.code(),
            dscale.storage.code(),
        );
        launch!(self, Kernel::BatchNormBackward, shapes::block_per_channel(channels);
            holds(dy, len), holds(x, len), holds(scale, channels), holds(saved.mean, channels),
            holds(saved.invstd, channels), holds_mut(dx, len), holds_mut(dscale, channels),
            holds_mut(dbias, channels), &r, &c, &k, &storage, &param_storage, &grad_storage)
    }

    fn bias_activation(
        &mut self,
        pre: &mut DeviceValues,
        bias: &DeviceValues,
        post: Option<&mut DeviceValues>,
        rows: u64,
        cols: u64,
        spatial: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let len = rows * cols * spatial;
        let (r, c, k) = (rows as i64, cols as i64, spatial as i64);
        let (code, storage) = (activation_code(activation), pre.storage.code());
        let config = shapes::elementwise(len);
        match post {
            Some(post) => launch!(self, Kernel::BiasActivation, config;
                holds_mut(pre, len), holds(bias, cols), holds_mut(post, len), &r, &c, &k, &code,
                &storage),
            None => launch!(self, Kernel::BiasAdd, config;
                holds_mut(pre, len), holds(bias, cols), &r, &c, &k, &storage),
        }
    }

    fn activation_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (n, code, storage) = (len as i64, activation_code(activation), y.storage.code());
        launch!(self, Kernel::ActivationForward, shapes::elementwise(len);
            holds(x, len), holds_mut(y, len), &n, &code, &storage)
    }

    fn accumulate(
        &mut self,
        from: &DeviceValues,
        into: &mut DeviceValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, into.storage.code());
        launch!(self, Kernel::Accumulate, shapes::elementwise(len);
            holds(from, len), holds_mut(into, len), &n, &storage)
    }

    fn activation_backward(
        &mut self,
        grad_post: &DeviceValues,
        pre: &mut DeviceValues,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (n, code, storage) = (len as i64, activation_code(activation), pre.storage.code());
        launch!(self, Kernel::ActivationBackward, shapes::elementwise(len);
            holds(grad_post, len), holds_mut(pre, len), &n, &code, &storage)
    }

    fn activation_gradient(
        &mut self,
        grad: &DeviceValues,
        saved: &DeviceValues,
        out: &mut DeviceValues,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (n, code, storage) = (len as i64, activation_code(activation), out.storage.code());
        launch!(self, Kernel::ActivationGradient, shapes::elementwise(len);
            holds(grad, len), holds(saved, len), holds_mut(out, len), &n, &code, &storage)
    }

    fn convert(
        &mut self,
        from: &DeviceValues,
        to: &mut DeviceValues,
        len: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        let n = len as i64;
        let (from_storage, to_storage) = (from.storage.code(), to.storage.code());
        launch!(self, Kernel::Convert, shapes::elementwise(len);
            holds(from, len), holds_mut(to, len), &n, &scale, &from_storage, &to_storage)
    }

    // ---- reduce.cu -----------------------------------------------------------------------------

    fn bias_gradient(
        &mut self,
        dy: &DeviceValues,
        db: &mut DeviceValues,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), DeviceError> {
        if spatial > 1 {
            let (r, c, k) = (rows as i64, cols as i64, spatial as i64);
            let (in_storage, out_storage) = (dy.storage.code(), db.storage.code());
            return launch!(self, Kernel::ChannelSum, shapes::block_per_channel(cols);
                holds(dy, rows * cols * spatial), holds_mut(db, cols), &r, &c, &k, &in_storage,
                &out_storage);
        }
        let may_split = db.storage == Storage::F32;
        let (config, rows_per_chunk) =
            shapes::column_sum(rows, cols, self.multiprocessors, may_split);
        let accumulate = i32::from(config.grid_dim.0 > 1);
        if accumulate == 1 {
            self.zero(db)?;
        }
        let (r, c, per_chunk) = (rows as i64, cols as i64, rows_per_chunk as i64);
        let (in_storage, out_storage) = (dy.storage.code(), db.storage.code());
        launch!(self, Kernel::ColumnSum, config;
            holds(dy, rows * cols), holds_mut(db, cols), &r, &c, &per_chunk, &accumulate,
            &in_storage, &out_storage)
    }

    fn mean(
        &mut self,
        values: &DeviceValues,
        len: u64,
        accumulator: &mut DeviceValues,
    ) -> Result<f32, DeviceError> {
        self.zero(accumulator)?;
        let n = len as i64;
        launch!(self, Kernel::Mean, shapes::mean(len);
            holds(values, len), holds_mut(accumulator, 1), &n)?;
        Ok(self.read_values(accumulator, 1)?[0])
    }

    fn any_nonfinite(
        &mut self,
        buffers: &[(&DeviceValues, u64)],
        flag: &mut DeviceValues,
    ) -> Result<bool, DeviceError> {
        self.zero(flag)?;
        for &(values, len) in buffers {
            let (n, storage) = (len as i64, values.storage.code());
            launch!(self, Kernel::Nonfinite, shapes::elementwise(len);
                holds(values, len), &n, &storage, holds_mut(flag, 1))?;
        }
        Ok(self.read_values(flag, 1)?[0] != 0.0)
    }

    // ---- loss.cu -------------------------------------------------------------------------------

    fn softmax_cross_entropy(
        &mut self,
        logits: &mut DeviceValues,
        labels: &CudaSlice<u32>,
        row_loss: &mut DeviceValues,
        rows: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (r, c, inv_rows) = (rows as i64, classes as i64, 1.0f32 / rows as f32);
        let storage = logits.storage.code();
        launch!(self, Kernel::SoftmaxCrossEntropy, shapes::softmax_cross_entropy(rows);
            holds_mut(logits, rows * classes), elements_up_to(labels, rows), holds_mut(row_loss, rows),
            &r, &c, &inv_rows, &storage)
    }

    // ---- optimizer.cu --------------------------------------------------------------------------

    fn optimizer_step(
        &mut self,
        param: &mut DeviceValues,
        grad: &DeviceValues,
        state: &mut OptimizerState<DeviceValues>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        let (n, lr, unscale) = (len as i64, rule.learning_rate, rule.grad_scale);
        let storage = param.storage.code();
        let config = shapes::elementwise(len);
        let (c1, c2) = rule.bias_correction;
        match state {
            OptimizerState::Sgd => launch!(self, Kernel::Sgd, config;
                holds_mut(param, len), holds(grad, len), &n, &lr, &unscale, &storage),
            OptimizerState::Momentum { velocity } => launch!(self, Kernel::SgdMomentum, config;
                holds_mut(param, len), holds(grad, len), holds_mut(velocity, len),
                &n, &lr, &MOMENTUM, &unscale, &storage),
            OptimizerState::Adam { m, v } => launch!(self, Kernel::Adam, config;
                holds_mut(param, len), holds(grad, len), holds_mut(m, len), holds_mut(v, len),
                &n, &lr, &ADAM_BETA1, &ADAM_BETA2, &ADAM_EPSILON, &c1, &c2, &rule.weight_decay,
                &unscale, &storage),
        }
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
