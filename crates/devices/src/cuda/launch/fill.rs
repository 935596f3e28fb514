//! fill.cu: the synthetic batch, its labels and the first parameters.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{elements_up_to, holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Fill;

impl Fill for CudaDevice {
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
}
