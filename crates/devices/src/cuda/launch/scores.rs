//! scores.cu: eager attention's batched products, causal mask, row softmax and its backward,
//! and the repetition of key/value heads and its sum.

use cudarc::driver::PushKernelArg;

use super::{holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::program::geometry::{BatchedProduct, HeadGroups, Strides};
use headroom_engine::step::Scores;

/// A layout's four strides, as the kernel takes them.
fn strides(s: &Strides) -> [i64; 4] {
    [s.batch, s.head, s.row, s.col].map(|v| v as i64)
}

impl Scores for CudaDevice {
    fn batched_product(
        &mut self,
        a: &DeviceValues,
        b: &DeviceValues,
        c: &mut DeviceValues,
        shape: &BatchedProduct,
    ) -> Result<(), DeviceError> {
        let (a_len, b_len, c_len) = shape.spans();
        let [n, h, rows, inner, cols] = [
            shape.batch,
            shape.heads,
            shape.rows,
            shape.inner,
            shape.cols,
        ]
        .map(|v| v as i64);
        let [ab, ah, ar, ac] = strides(&shape.a);
        let [bb, bh, br, bc] = strides(&shape.b);
        let [cb, ch, cr, cc] = strides(&shape.c);
        let storage = a.storage.code();
        let config = shapes::batched_product(
            shape.batch.saturating_mul(shape.heads),
            shape.rows,
            shape.cols,
        );
        launch!(self, Kernel::BatchedProduct, config;
            holds(a, a_len), holds(b, b_len), holds_mut(c, c_len), &n, &h, &rows, &inner, &cols,
            &ab, &ah, &ar, &ac, &bb, &bh, &br, &bc, &cb, &ch, &cr, &cc, &storage)
    }

    fn causal_mask(
        &mut self,
        from: &DeviceValues,
        to: &mut DeviceValues,
        matrices: u64,
        positions: u64,
    ) -> Result<(), DeviceError> {
        let len = matrices * positions * positions;
        let (m, t) = (matrices as i64, positions as i64);
        let (from_storage, to_storage) = (from.storage.code(), to.storage.code());
        launch!(self, Kernel::CausalMask, shapes::elementwise(len);
            holds(from, len), holds_mut(to, len), &m, &t, &from_storage, &to_storage)
    }

    fn softmax_rows(
        &mut self,
        x: &DeviceValues,
        p: &mut DeviceValues,
        rows: u64,
        cols: u64,
    ) -> Result<(), DeviceError> {
        let len = rows * cols;
        let (r, c, x_storage, p_storage) =
            (rows as i64, cols as i64, x.storage.code(), p.storage.code());
        launch!(self, Kernel::SoftmaxRows, shapes::block_per_row(rows);
            holds(x, len), holds_mut(p, len), &r, &c, &x_storage, &p_storage)
    }

    fn softmax_rows_backward(
        &mut self,
        p: &DeviceValues,
        dp: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        cols: u64,
    ) -> Result<(), DeviceError> {
        let len = rows * cols;
        let (r, c, p_storage, dx_storage) = (
            rows as i64,
            cols as i64,
            p.storage.code(),
            dx.storage.code(),
        );
        launch!(self, Kernel::SoftmaxRowsBackward, shapes::block_per_row(rows);
            holds(p, len), holds(dp, len), holds_mut(dx, len), &r, &c, &p_storage, &dx_storage)
    }

    fn repeat_heads(
        &mut self,
        from: &DeviceValues,
        to: &mut DeviceValues,
        shape: &HeadGroups,
    ) -> Result<(), DeviceError> {
        let lengths = (shape.grouped(), shape.repeated());
        self.head_groups(Kernel::RepeatHeads, (from, to), lengths, shape)
    }

    fn sum_head_groups(
        &mut self,
        from: &DeviceValues,
        to: &mut DeviceValues,
        shape: &HeadGroups,
    ) -> Result<(), DeviceError> {
        let lengths = (shape.repeated(), shape.grouped());
        self.head_groups(Kernel::SumHeadGroups, (from, to), lengths, shape)
    }
}

impl CudaDevice {
    /// `repeat_heads` or `sum_head_groups` from `from` (`from_len` values) into `to` (`to_len`),
    /// a thread per value written.
    fn head_groups(
        &mut self,
        kernel: Kernel,
        (from, to): (&DeviceValues, &mut DeviceValues),
        (from_len, to_len): (u64, u64),
        shape: &HeadGroups,
    ) -> Result<(), DeviceError> {
        let [b, t, kv, g, d] = [
            shape.batch,
            shape.positions,
            shape.kv_heads,
            shape.groups,
            shape.head_dim,
        ]
        .map(|v| v as i64);
        let storage = from.storage.code();
        launch!(self, kernel, shapes::elementwise(to_len);
            holds(from, from_len), holds_mut(to, to_len), &b, &t, &kv, &g, &d, &storage)
    }
}
