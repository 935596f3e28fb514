//! The launchers: [`Kernels`] on the GPU, one section per kernel family in `kernels/`, with the
//! launch shapes of [`super::shapes`]. Every launch goes through [`launch!`], and every buffer
//! argument through [`holds`] or [`holds_mut`], which check in debug builds that the buffer has
//! every element the launch addresses.

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};

use super::kernel::Kernel;
use super::shapes::{self, activation_code, GemmShape};
use super::CudaDevice;
use crate::device::DeviceError;
use crate::parity::Transfer;
use crate::plan::Activation;
use crate::step::{
    Allocate, Kernels, OptimizerState, UpdateRule, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, MOMENTUM,
};

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

/// `buffer`, which a launch reads up to element `len`.
fn holds<T>(buffer: &CudaSlice<T>, len: u64) -> &CudaSlice<T> {
    debug_assert!(
        len <= buffer.len() as u64,
        "a launch addresses {len} elements of a {}-element buffer",
        buffer.len()
    );
    buffer
}

/// `buffer`, which a launch writes up to element `len`.
fn holds_mut<T>(buffer: &mut CudaSlice<T>, len: u64) -> &mut CudaSlice<T> {
    debug_assert!(
        len <= buffer.len() as u64,
        "a launch addresses {len} elements of a {}-element buffer",
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
    /// A zeroed buffer; out-of-memory here is what ends a probe.
    fn zeroed<T: DeviceRepr + ValidAsZeroBits>(
        &mut self,
        len: u64,
    ) -> Result<CudaSlice<T>, DeviceError> {
        let element_bytes = std::mem::size_of::<T>();
        let bytes = allocation_bytes(len, element_bytes as u64, self.total_bytes).map_err(
            |requested_bytes| DeviceError::OutOfMemory {
                requested_bytes,
                free_bytes: self.memory().map_or(0, |(free, _)| free),
            },
        )?;
        let result = self.stream.alloc_zeros::<T>(bytes / element_bytes);
        result.map_err(|e| self.classify("allocating", bytes as u64, e))
    }

    fn download<T: DeviceRepr>(
        &mut self,
        buffer: &CudaSlice<T>,
        len: u64,
    ) -> Result<Vec<T>, DeviceError> {
        let result = self
            .stream
            .clone_dtoh(&holds(buffer, len).slice(..len as usize));
        result.map_err(|e| self.classify("copying to the host", 0, e))
    }

    fn upload<T: DeviceRepr>(&mut self, values: &[T]) -> Result<CudaSlice<T>, DeviceError> {
        let result = self.stream.clone_htod(values);
        let bytes = std::mem::size_of_val(values) as u64;
        result.map_err(|e| self.classify("copying to the device", bytes, e))
    }

    fn zero(&mut self, buffer: &mut CudaSlice<f32>) -> Result<(), DeviceError> {
        let result = self.stream.memset_zeros(buffer);
        result.map_err(|e| self.classify("memset", 0, e))
    }

    /// Launches one product with its shape's launch (split-K where the depth is long).
    fn gemm(
        &mut self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
        shape: GemmShape,
    ) -> Result<(), DeviceError> {
        let launch_shape = shapes::gemm(&shape, self.multiprocessors);
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
        launch!(self, shape.product.kernel(), launch_shape.config;
            holds(a, a_len), holds(b, b_len), holds_mut(c, shape.m * shape.n),
            &m, &n, &k, &lda, &ldb, &k_chunk, &accumulate)
    }
}

impl Allocate for CudaDevice {
    type F32 = CudaSlice<f32>;
    type U32 = CudaSlice<u32>;
    type Error = DeviceError;

    fn f32_zeroed(&mut self, len: u64) -> Result<CudaSlice<f32>, DeviceError> {
        self.zeroed(len)
    }

    fn u32_zeroed(&mut self, len: u64) -> Result<CudaSlice<u32>, DeviceError> {
        self.zeroed(len)
    }
}

impl Transfer for CudaDevice {
    fn read_f32(&mut self, buffer: &CudaSlice<f32>, len: u64) -> Result<Vec<f32>, DeviceError> {
        self.download(buffer, len)
    }

    fn read_u32(&mut self, buffer: &CudaSlice<u32>, len: u64) -> Result<Vec<u32>, DeviceError> {
        self.download(buffer, len)
    }

    fn write_f32(&mut self, values: &[f32]) -> Result<CudaSlice<f32>, DeviceError> {
        self.upload(values)
    }

    fn write_u32(&mut self, values: &[u32]) -> Result<CudaSlice<u32>, DeviceError> {
        self.upload(values)
    }
}

impl Kernels for CudaDevice {
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        // Stream-ordered allocations may report out-of-memory here rather than at the call.
        let result = self.stream.synchronize();
        result.map_err(|e| self.classify("synchronising", 0, e))
    }

    // ---- fill.cu -------------------------------------------------------------------------------

    fn fill_uniform(
        &mut self,
        out: &mut CudaSlice<f32>,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        let n = len as i64;
        launch!(self, Kernel::FillUniform, shapes::elementwise(len);
            holds_mut(out, len), &n, &key, &scale)
    }

    fn fill_labels(
        &mut self,
        labels: &mut CudaSlice<u32>,
        inputs: &CudaSlice<f32>,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (r, f, c) = (rows as i64, features as i64, classes as i64);
        launch!(self, Kernel::FillLabels, shapes::elementwise(rows);
            holds_mut(labels, rows), holds(inputs, rows * features), &r, &f, &c)
    }

    // ---- gemm.cu -------------------------------------------------------------------------------

    fn linear_forward(
        &mut self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(x, w, y, GemmShape::forward(rows, inputs, outputs))
    }

    fn weight_gradient(
        &mut self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, x, dw, GemmShape::weight_gradient(rows, inputs, outputs))
    }

    fn input_gradient(
        &mut self,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, w, dx, GemmShape::input_gradient(rows, inputs, outputs))
    }

    // ---- elementwise.cu ------------------------------------------------------------------------

    fn bias_activation(
        &mut self,
        pre: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        post: Option<&mut CudaSlice<f32>>,
        rows: u64,
        cols: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let len = rows * cols;
        let (r, c, code) = (rows as i64, cols as i64, activation_code(activation));
        let config = shapes::elementwise(len);
        match post {
            Some(post) => launch!(self, Kernel::BiasActivation, config;
                holds_mut(pre, len), holds(bias, cols), holds_mut(post, len), &r, &c, &code),
            None => launch!(self, Kernel::BiasAdd, config;
                holds_mut(pre, len), holds(bias, cols), &r, &c),
        }
    }

    fn activation_backward(
        &mut self,
        grad_post: &CudaSlice<f32>,
        pre: &mut CudaSlice<f32>,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (n, code) = (len as i64, activation_code(activation));
        launch!(self, Kernel::ActivationBackward, shapes::elementwise(len);
            holds(grad_post, len), holds_mut(pre, len), &n, &code)
    }

    // ---- reduce.cu -----------------------------------------------------------------------------

    fn bias_gradient(
        &mut self,
        dy: &CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        rows: u64,
        cols: u64,
    ) -> Result<(), DeviceError> {
        self.zero(db)?;
        let (config, rows_per_chunk) = shapes::column_sum(rows, cols, self.multiprocessors);
        let (r, c, per_chunk) = (rows as i64, cols as i64, rows_per_chunk as i64);
        launch!(self, Kernel::ColumnSum, config;
            holds(dy, rows * cols), holds_mut(db, cols), &r, &c, &per_chunk)
    }

    fn mean(
        &mut self,
        values: &CudaSlice<f32>,
        len: u64,
        accumulator: &mut CudaSlice<f32>,
    ) -> Result<f32, DeviceError> {
        self.zero(accumulator)?;
        let n = len as i64;
        launch!(self, Kernel::Mean, shapes::mean(len);
            holds(values, len), holds_mut(accumulator, 1), &n)?;
        Ok(self.download(accumulator, 1)?[0])
    }

    // ---- loss.cu -------------------------------------------------------------------------------

    fn softmax_cross_entropy(
        &mut self,
        logits: &mut CudaSlice<f32>,
        labels: &CudaSlice<u32>,
        row_loss: &mut CudaSlice<f32>,
        rows: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (r, c, inv_rows) = (rows as i64, classes as i64, 1.0f32 / rows as f32);
        launch!(self, Kernel::SoftmaxCrossEntropy, shapes::softmax_cross_entropy(rows);
            holds_mut(logits, rows * classes), holds(labels, rows), holds_mut(row_loss, rows),
            &r, &c, &inv_rows)
    }

    // ---- optimizer.cu --------------------------------------------------------------------------

    fn optimizer_step(
        &mut self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        state: &mut OptimizerState<CudaSlice<f32>>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        let (n, lr) = (len as i64, rule.learning_rate);
        let config = shapes::elementwise(len);
        let (c1, c2) = rule.bias_correction;
        match state {
            OptimizerState::Sgd => launch!(self, Kernel::Sgd, config;
                holds_mut(param, len), holds(grad, len), &n, &lr),
            OptimizerState::Momentum { velocity } => launch!(self, Kernel::SgdMomentum, config;
                holds_mut(param, len), holds(grad, len), holds_mut(velocity, len),
                &n, &lr, &MOMENTUM),
            OptimizerState::Adam { m, v } => launch!(self, Kernel::Adam, config;
                holds_mut(param, len), holds(grad, len), holds_mut(m, len), holds_mut(v, len),
                &n, &lr, &ADAM_BETA1, &ADAM_BETA2, &ADAM_EPSILON, &c1, &c2, &rule.weight_decay),
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
