//! elementwise.cu: biases, activations and their gradients, sums, conversions.

use cudarc::driver::PushKernelArg;

use super::{holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::modules::activation::Nonlinearity;
use headroom_engine::program::SavedAs;
use headroom_engine::step::Elementwise;

impl Elementwise for CudaDevice {
    fn bias_add(
        &mut self,
        y: &mut DeviceValues,
        bias: &DeviceValues,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), DeviceError> {
        let len = rows * cols * spatial;
        let (r, c, k) = (rows as i64, cols as i64, spatial as i64);
        let storage = y.storage.code();
        launch!(self, Kernel::BiasAdd, shapes::elementwise(len);
            holds_mut(y, len), holds(bias, cols), &r, &c, &k, &storage)
    }

    fn activation_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        len: u64,
        nonlinearity: Nonlinearity,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, y.storage.code());
        let (code, param) = (nonlinearity.code(), nonlinearity.parameter());
        launch!(self, Kernel::ActivationForward, shapes::elementwise(len);
            holds(x, len), holds_mut(y, len), &n, &code, &param, &storage)
    }

    fn activation_in_place(
        &mut self,
        y: &mut DeviceValues,
        len: u64,
        nonlinearity: Nonlinearity,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, y.storage.code());
        let (code, param) = (nonlinearity.code(), nonlinearity.parameter());
        launch!(self, Kernel::ActivationInPlace, shapes::elementwise(len);
            holds_mut(y, len), &n, &code, &param, &storage)
    }

    fn activation_gradient(
        &mut self,
        grad: &DeviceValues,
        saved: &DeviceValues,
        out: &mut DeviceValues,
        len: u64,
        nonlinearity: Nonlinearity,
        saved_as: SavedAs,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, out.storage.code());
        let (code, param) = (nonlinearity.code(), nonlinearity.parameter());
        let saved_is_output = i32::from(saved_as == SavedAs::Output);
        launch!(self, Kernel::ActivationGradient, shapes::elementwise(len);
            holds(grad, len), holds(saved, len), holds_mut(out, len), &n, &code, &param,
            &saved_is_output, &storage)
    }

    fn add(
        &mut self,
        a: &DeviceValues,
        b: &DeviceValues,
        out: &mut DeviceValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        self.binary(Kernel::Add, a, b, out, len)
    }

    fn multiply(
        &mut self,
        a: &DeviceValues,
        b: &DeviceValues,
        out: &mut DeviceValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        self.binary(Kernel::Multiply, a, b, out, len)
    }

    fn scale_features(
        &mut self,
        x: &DeviceValues,
        scale: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        features: u64,
    ) -> Result<(), DeviceError> {
        let len = rows.saturating_mul(features);
        let [n, f] = [len, features].map(|v| v as i64);
        let storages = [x.storage, scale.storage, y.storage].map(|s| s.code());
        launch!(self, Kernel::ScaleFeatures, shapes::elementwise(len);
            holds(x, len), holds(scale, features), holds_mut(y, len), &n, &f, &storages[0],
            &storages[1], &storages[2])
    }

    fn accumulate(
        &mut self,
        from: &DeviceValues,
        into: &mut DeviceValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        let (n, from_storage, into_storage) =
            (len as i64, from.storage.code(), into.storage.code());
        launch!(self, Kernel::Accumulate, shapes::elementwise(len);
            holds(from, len), holds_mut(into, len), &n, &from_storage, &into_storage)
    }

    fn copy_range(
        &mut self,
        (from, from_offset): (&DeviceValues, u64),
        (to, to_offset): (&mut DeviceValues, u64),
        len: u64,
    ) -> Result<(), DeviceError> {
        let [n, from_at, to_at] = [len, from_offset, to_offset].map(|v| v as i64);
        let storage = from.storage.code();
        launch!(self, Kernel::CopyRange, shapes::elementwise(len);
            holds(from, from_offset + len), &from_at, holds_mut(to, to_offset + len), &to_at, &n,
            &storage)
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
}

impl CudaDevice {
    /// `out = a op b` by `kernel` (`add`, `multiply`): the operands and the output each in its
    /// own storage.
    fn binary(
        &mut self,
        kernel: Kernel,
        a: &DeviceValues,
        b: &DeviceValues,
        out: &mut DeviceValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        let n = len as i64;
        let storages = [a.storage.code(), b.storage.code(), out.storage.code()];
        launch!(self, kernel, shapes::elementwise(len);
            holds(a, len), holds(b, len), holds_mut(out, len), &n, &storages[0], &storages[1],
            &storages[2])
    }
}
