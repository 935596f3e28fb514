//! dropout.cu: training-mode dropout and its backward.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{elements_up_to, elements_up_to_mut, holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::DropoutKernels;
use headroom_engine::synthetic;

impl DropoutKernels for CudaDevice {
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
        dy: &DeviceValues,
        mask: &CudaSlice<u8>,
        dx: &mut DeviceValues,
        len: u64,
        p: f32,
    ) -> Result<(), DeviceError> {
        let (n, storage) = (len as i64, dx.storage.code());
        let scale = synthetic::dropout_scale(p);
        launch!(self, Kernel::DropoutBackward, shapes::elementwise(len);
            holds(dy, len), elements_up_to(mask, len), holds_mut(dx, len), &n, &scale, &storage)
    }
}
