//! The launchers: [`Kernels`] on the GPU, one section per kernel family in `kernels/`, with the
//! launch shapes of [`super::shapes`].

use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};

use super::shapes::{self, activation_code, GemmShape};
use super::CudaDevice;
use crate::device::DeviceError;
use crate::job::{Activation, OptimizerKind};
use crate::step::{
    Allocate, Kernels, UpdateRule, ADAMW_WEIGHT_DECAY, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON,
    MOMENTUM,
};

impl CudaDevice {
    fn function(&self, name: &'static str) -> Result<&CudaFunction, DeviceError> {
        self.functions
            .get(name)
            .ok_or_else(|| DeviceError::Fault(format!("kernel {name} is not loaded")))
    }

    fn launch_failed(
        &mut self,
        kernel: &'static str,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> DeviceError + '_ {
        move |e| self.classify(kernel, 0, e)
    }

    /// A zeroed buffer; out-of-memory here is what ends a probe.
    fn zeroed<T: DeviceRepr + ValidAsZeroBits>(
        &mut self,
        len: u64,
    ) -> Result<CudaSlice<T>, DeviceError> {
        let result = self.stream.alloc_zeros::<T>(len as usize);
        let bytes = len.saturating_mul(std::mem::size_of::<T>() as u64);
        result.map_err(|e| self.classify("allocating", bytes, e))
    }

    fn download<T: DeviceRepr>(
        &mut self,
        buffer: &CudaSlice<T>,
        len: u64,
    ) -> Result<Vec<T>, DeviceError> {
        let result = self.stream.clone_dtoh(&buffer.slice(..len as usize));
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

    // ---- gemm.cu -------------------------------------------------------------------------------

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
        let (m, n, k, lda, ldb, k_chunk) = (
            shape.m as i64,
            shape.n as i64,
            shape.k as i64,
            shape.lda as i64,
            shape.ldb as i64,
            launch_shape.k_chunk as i64,
        );
        let kernel = shape.product.kernel();
        let function = self.function(kernel)?;
        let mut launch = self.stream.launch_builder(function);
        launch
            .arg(a)
            .arg(b)
            .arg(c)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&lda)
            .arg(&ldb)
            .arg(&k_chunk)
            .arg(&accumulate);
        // SAFETY: the argument list matches gemm.cu's signature and every buffer holds the
        // elements its shape addresses (the plan sized them).
        let launched = unsafe { launch.launch(launch_shape.config) };
        launched.map(|_| ()).map_err(self.launch_failed(kernel))
    }

    // ---- elementwise.cu ------------------------------------------------------------------------

    fn launch_bias(
        &mut self,
        pre: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        post: Option<&mut CudaSlice<f32>>,
        rows: u64,
        cols: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (rows_arg, cols_arg, code) = (rows as i64, cols as i64, activation_code(activation));
        let kernel = if post.is_some() {
            "bias_activation"
        } else {
            "bias_add"
        };
        let function = self.function(kernel)?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(pre).arg(bias);
        if let Some(post) = post {
            launch.arg(post).arg(&rows_arg).arg(&cols_arg).arg(&code);
        } else {
            launch.arg(&rows_arg).arg(&cols_arg);
        }
        // SAFETY: arguments match elementwise.cu; buffers hold rows x cols values.
        let launched = unsafe { launch.launch(shapes::elementwise(rows * cols)) };
        launched.map(|_| ()).map_err(self.launch_failed(kernel))
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

impl Kernels for CudaDevice {
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        // Stream-ordered allocations may report out-of-memory here rather than at the call.
        let result = self.stream.synchronize();
        result.map_err(|e| self.classify("synchronising", 0, e))
    }

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

    // ---- fill.cu -------------------------------------------------------------------------------

    fn fill_uniform(
        &mut self,
        out: &mut CudaSlice<f32>,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        let n = len as i64;
        let function = self.function("fill_uniform")?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(out).arg(&n).arg(&key).arg(&scale);
        // SAFETY: arguments match fill.cu; `out` holds `len` values.
        let launched = unsafe { launch.launch(shapes::elementwise(len)) };
        launched
            .map(|_| ())
            .map_err(self.launch_failed("fill_uniform"))
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
        let function = self.function("fill_labels")?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(labels).arg(inputs).arg(&r).arg(&f).arg(&c);
        // SAFETY: arguments match fill.cu; inputs hold rows x features values.
        let launched = unsafe { launch.launch(shapes::elementwise(rows)) };
        launched
            .map(|_| ())
            .map_err(self.launch_failed("fill_labels"))
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
        self.launch_bias(pre, bias, post, rows, cols, activation)
    }

    fn activation_backward(
        &mut self,
        grad_post: &CudaSlice<f32>,
        pre: &mut CudaSlice<f32>,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let (n, code) = (len as i64, activation_code(activation));
        let function = self.function("activation_backward")?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(grad_post).arg(pre).arg(&n).arg(&code);
        // SAFETY: arguments match elementwise.cu; both buffers hold `len` values.
        let launched = unsafe { launch.launch(shapes::elementwise(len)) };
        launched
            .map(|_| ())
            .map_err(self.launch_failed("activation_backward"))
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
        let function = self.function("column_sum")?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(dy).arg(db).arg(&r).arg(&c).arg(&per_chunk);
        // SAFETY: arguments match reduce.cu; dy holds rows x cols values, db holds cols.
        let launched = unsafe { launch.launch(config) };
        launched
            .map(|_| ())
            .map_err(self.launch_failed("column_sum"))
    }

    fn mean(
        &mut self,
        values: &CudaSlice<f32>,
        len: u64,
        accumulator: &mut CudaSlice<f32>,
    ) -> Result<f32, DeviceError> {
        self.zero(accumulator)?;
        let n = len as i64;
        let config = shapes::mean(len);
        let function = self.function("mean")?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(values).arg(&*accumulator).arg(&n);
        // SAFETY: arguments match reduce.cu; values hold `len` floats, the accumulator one.
        let launched = unsafe { launch.launch(config) };
        launched.map(|_| ()).map_err(self.launch_failed("mean"))?;
        Ok(self.read_f32(accumulator, 1)?[0])
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
        let config = shapes::softmax_cross_entropy(rows);
        let function = self.function("softmax_cross_entropy")?;
        let mut launch = self.stream.launch_builder(function);
        launch
            .arg(logits)
            .arg(labels)
            .arg(row_loss)
            .arg(&r)
            .arg(&c)
            .arg(&inv_rows);
        // SAFETY: arguments match loss.cu; logits hold rows x classes, labels and losses rows.
        let launched = unsafe { launch.launch(config) };
        launched
            .map(|_| ())
            .map_err(self.launch_failed("softmax_cross_entropy"))
    }

    // ---- optimizer.cu --------------------------------------------------------------------------

    fn optimizer_step(
        &mut self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        state: &mut [CudaSlice<f32>],
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        let n = len as i64;
        let lr = rule.learning_rate;
        let config = shapes::elementwise(len);
        let kernel = match rule.kind {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::SgdMomentum => "sgd_momentum",
            OptimizerKind::Adam | OptimizerKind::Adamw => "adam",
        };
        let decay = if rule.kind == OptimizerKind::Adamw {
            ADAMW_WEIGHT_DECAY
        } else {
            0.0
        };
        let (c1, c2) = rule.bias_correction;
        let function = self.function(kernel)?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(param).arg(grad);
        match state {
            [] => {
                launch.arg(&n).arg(&lr);
            }
            [velocity] => {
                launch.arg(velocity).arg(&n).arg(&lr).arg(&MOMENTUM);
            }
            [m, v] => {
                launch
                    .arg(m)
                    .arg(v)
                    .arg(&n)
                    .arg(&lr)
                    .arg(&ADAM_BETA1)
                    .arg(&ADAM_BETA2)
                    .arg(&ADAM_EPSILON)
                    .arg(&c1)
                    .arg(&c2)
                    .arg(&decay);
            }
            _ => {
                return Err(DeviceError::Fault(format!(
                    "{kernel} takes at most two state buffers"
                )))
            }
        }
        // SAFETY: arguments match optimizer.cu for the kernel chosen from the same rule kind
        // that sized `state`; every buffer holds `len` values.
        let launched = unsafe { launch.launch(config) };
        launched.map(|_| ()).map_err(self.launch_failed(kernel))
    }
}
