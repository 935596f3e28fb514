//! embedding.cu: token ids looked up in a table, and the table's gradient.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{elements_up_to, holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Lookup;

impl Lookup for CudaDevice {
    fn embedding_forward(
        &mut self,
        ids: &CudaSlice<i64>,
        weight: &DeviceValues,
        y: &mut DeviceValues,
        tokens: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let len = tokens * dim;
        let (t, d, storage) = (tokens as i64, dim as i64, weight.storage.code());
        // The table's extent is the caller's: every id is below its rows.
        launch!(self, Kernel::EmbeddingForward, shapes::elementwise(len);
            elements_up_to(ids, tokens), holds(weight, dim), holds_mut(y, len), &t, &d, &storage)
    }

    fn embedding_backward(
        &mut self,
        dy: &DeviceValues,
        ids: &CudaSlice<i64>,
        dw: &mut DeviceValues,
        tokens: u64,
        dim: u64,
        vocab: u64,
        padding: Option<u64>,
    ) -> Result<(), DeviceError> {
        let [t, d, v] = [tokens, dim, vocab].map(|n| n as i64);
        let padding = padding.map_or(-1, |p| p as i64);
        let (storage, grad_storage) = (dy.storage.code(), dw.storage.code());
        launch!(self, Kernel::EmbeddingBackward, shapes::elementwise(dim);
            holds(dy, tokens * dim), elements_up_to(ids, tokens), holds_mut(dw, vocab * dim),
            &t, &d, &v, &padding, &storage, &grad_storage)
    }
}
