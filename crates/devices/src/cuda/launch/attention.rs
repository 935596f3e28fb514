//! attention.cu: the fused forward, and its backward in two kernels (the queries' gradient;
//! the keys' and values'); rotary position embedding and its backward.

use cudarc::driver::PushKernelArg;

use super::{holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::program::geometry::{Attention, Rotary};
use headroom_engine::program::{AttentionGradients, AttentionSaved};
use headroom_engine::step::Attend;

/// The kernels' shape arguments: batch, sequence, heads, kv_heads, head_dim.
fn sizes(shape: &Attention) -> [i64; 5] {
    [
        shape.batch,
        shape.sequence,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
    ]
    .map(|v| v as i64)
}

impl Attend for CudaDevice {
    fn attention_forward(
        &mut self,
        q: &DeviceValues,
        k: &DeviceValues,
        v: &DeviceValues,
        o: &mut DeviceValues,
        lse: &mut DeviceValues,
        shape: &Attention,
    ) -> Result<(), DeviceError> {
        let (queries, keys, rows) = (shape.query_values(), shape.key_values(), shape.rows());
        let [b, t, h, kvh, d] = sizes(shape);
        let (causal, scale, storage) = (i32::from(shape.causal), shape.scale(), q.storage.code());
        let (threshold, keep_scale, key) = shape.dropout_arguments();
        launch!(self, Kernel::AttentionForward, shapes::attention(shape.batch, shape.sequence, shape.heads);
            holds(q, queries), holds(k, keys), holds(v, keys), holds_mut(o, queries),
            holds_mut(lse, rows), &b, &t, &h, &kvh, &d, &causal, &scale, &threshold, &keep_scale,
            &key, &storage)
    }

    fn attention_backward(
        &mut self,
        saved: AttentionSaved<&DeviceValues>,
        dout: &DeviceValues,
        grads: AttentionGradients<&mut DeviceValues>,
        shape: &Attention,
    ) -> Result<(), DeviceError> {
        let (queries, keys, rows) = (shape.query_values(), shape.key_values(), shape.rows());
        let [b, t, h, kvh, d] = sizes(shape);
        let (causal, scale, storage) = (
            i32::from(shape.causal),
            shape.scale(),
            saved.q.storage.code(),
        );
        let (threshold, keep_scale, key) = shape.dropout_arguments();
        let s = saved;
        launch!(self, Kernel::AttentionBackwardQuery,
            shapes::attention(shape.batch, shape.sequence, shape.heads);
            holds(s.q, queries), holds(s.k, keys), holds(s.v, keys), holds(s.o, queries),
            holds(dout, queries), holds(s.lse, rows), holds_mut(grads.dq, queries),
            &b, &t, &h, &kvh, &d, &causal, &scale, &threshold, &keep_scale, &key, &storage)?;
        launch!(self, Kernel::AttentionBackwardKey,
            shapes::attention(shape.batch, shape.sequence, shape.kv_heads);
            holds(s.q, queries), holds(s.k, keys), holds(s.v, keys), holds(s.o, queries),
            holds(dout, queries), holds(s.lse, rows), holds_mut(grads.dk, keys),
            holds_mut(grads.dv, keys), &b, &t, &h, &kvh, &d, &causal, &scale, &threshold,
            &keep_scale, &key, &storage)
    }

    fn rotary_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        shape: &Rotary,
    ) -> Result<(), DeviceError> {
        self.rotary(Kernel::RotaryForward, x, y, shape)
    }

    fn rotary_backward(
        &mut self,
        dy: &DeviceValues,
        dx: &mut DeviceValues,
        shape: &Rotary,
    ) -> Result<(), DeviceError> {
        self.rotary(Kernel::RotaryBackward, dy, dx, shape)
    }
}

impl CudaDevice {
    /// Either rotary kernel: they share their arguments.
    fn rotary(
        &mut self,
        kernel: Kernel,
        from: &DeviceValues,
        to: &mut DeviceValues,
        shape: &Rotary,
    ) -> Result<(), DeviceError> {
        let len = shape.values();
        let [n, t, h, d] = [len, shape.sequence, shape.heads, shape.head_dim].map(|v| v as i64);
        let (storage, out_storage) = (from.storage.code(), to.storage.code());
        launch!(self, kernel, shapes::elementwise(len);
            holds(from, len), holds_mut(to, len), &n, &t, &h, &d, &shape.theta, &storage,
            &out_storage)
    }
}
