//! loss.cu: the softmax cross-entropy and its gradient.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{elements_up_to, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Loss;

impl Loss for CudaDevice {
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
            holds_mut(logits, rows * classes), elements_up_to(labels, rows),
            holds_mut(row_loss, rows), &r, &c, &inv_rows, &storage)
    }
}
