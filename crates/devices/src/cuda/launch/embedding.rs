//! embedding.cu: token ids looked up in a table, and the table's gradient; a ViT's patch tokens
//! and the first token.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{elements_up_to, holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Lookup;

impl Lookup for CudaDevice {
    fn patch_tokens_forward(
        &mut self,
        planes: &DeviceValues,
        class: &DeviceValues,
        out: &mut DeviceValues,
        rows: u64,
        tokens: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let len = rows * (tokens + 1) * dim;
        let [r, t, d] = [rows, tokens, dim].map(|n| n as i64);
        let storages = [planes.storage, class.storage, out.storage].map(|s| s.code());
        let [planes_storage, class_storage, out_storage] = storages;
        launch!(self, Kernel::PatchTokensForward, shapes::elementwise(len);
            holds(planes, rows * tokens * dim), holds(class, dim), holds_mut(out, len),
            &r, &t, &d, &planes_storage, &class_storage, &out_storage)
    }

    fn patch_tokens_backward(
        &mut self,
        dout: &DeviceValues,
        dplanes: &mut DeviceValues,
        dclass: &mut DeviceValues,
        rows: u64,
        tokens: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let len = rows * tokens * dim;
        let [r, t, d] = [rows, tokens, dim].map(|n| n as i64);
        let storages = [dout.storage, dplanes.storage, dclass.storage].map(|s| s.code());
        let [dout_storage, planes_storage, class_storage] = storages;
        // Enough threads for the planes and for a class column each.
        launch!(self, Kernel::PatchTokensBackward, shapes::elementwise(len.max(dim));
            holds(dout, rows * (tokens + 1) * dim), holds_mut(dplanes, len), holds_mut(dclass, dim),
            &r, &t, &d, &dout_storage, &planes_storage, &class_storage)
    }

    fn first_token_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let [r, p, d] = [rows, positions, dim].map(|n| n as i64);
        let storage = x.storage.code();
        launch!(self, Kernel::FirstTokenForward, shapes::elementwise(rows * dim);
            holds(x, rows * positions * dim), holds_mut(y, rows * dim), &r, &p, &d, &storage)
    }

    fn first_token_backward(
        &mut self,
        dy: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let len = rows * positions * dim;
        let [r, p, d] = [rows, positions, dim].map(|n| n as i64);
        let storage = dy.storage.code();
        launch!(self, Kernel::FirstTokenBackward, shapes::elementwise(len);
            holds(dy, rows * dim), holds_mut(dx, len), &r, &p, &d, &storage)
    }

    fn mean_tokens_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let [r, p, d] = [rows, positions, dim].map(|n| n as i64);
        let storage = x.storage.code();
        launch!(self, Kernel::MeanTokensForward, shapes::elementwise(rows * dim);
            holds(x, rows * positions * dim), holds_mut(y, rows * dim), &r, &p, &d, &storage)
    }

    fn mean_tokens_backward(
        &mut self,
        dy: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let len = rows * positions * dim;
        let [r, p, d] = [rows, positions, dim].map(|n| n as i64);
        let storage = dy.storage.code();
        launch!(self, Kernel::MeanTokensBackward, shapes::elementwise(len);
            holds(dy, rows * dim), holds_mut(dx, len), &r, &p, &d, &storage)
    }

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
