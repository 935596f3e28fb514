//! fill.cu: the synthetic batch, its labels and the first parameters.

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

use super::{elements_up_to, elements_up_to_mut, holds, holds_mut, DeviceValues};
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

    fn fill_token_ids(
        &mut self,
        ids: &mut CudaSlice<i64>,
        len: u64,
        key: u64,
        vocab: u64,
    ) -> Result<(), DeviceError> {
        self.fill_tokens(ids, true, len, key, vocab)
    }

    fn fill_token_labels(
        &mut self,
        labels: &mut CudaSlice<u32>,
        len: u64,
        key: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        self.fill_tokens(labels, false, len, key, classes)
    }
}

impl CudaDevice {
    /// fill.cu's `fill_tokens` into int64 ids (`wide`) or u32 labels.
    fn fill_tokens<T: DeviceRepr>(
        &mut self,
        out: &mut CudaSlice<T>,
        wide: bool,
        len: u64,
        key: u64,
        vocab: u64,
    ) -> Result<(), DeviceError> {
        let (wide, n, vocab) = (i32::from(wide), len as i64, vocab as i64);
        launch!(self, Kernel::FillTokens, shapes::elementwise(len);
            elements_up_to_mut(out, len), &wide, &n, &key, &vocab)
    }
}
