//! The `host` device: the training step on the CPU, inside a byte budget, the reference every
//! kernel is checked against. It stores values as the plan's precision says and computes in
//! f32, rounding what it stores to 16 bits where the GPU does ([`values`]).
//!
//! Every buffer is charged to a [`Ledger`] before it is allocated; a charge past the budget, or
//! an allocation the system refuses, is [`DeviceError::OutOfMemory`]. Nothing is allocated for a
//! batch that does not fit. Widening 16-bit values takes scratch outside the budget: a layer's
//! weights in f32 at most, and chunks of [`values::CHUNK`] values; a convolution also unfolds
//! one sample's windows per thread ([`image`]).

pub mod image;
pub mod norm;
pub mod ops;
pub mod values;

use std::ops::{Deref, DerefMut, Range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::transfer::Transfer;
use headroom_engine::device::{DeviceError, DeviceInfo, DeviceKind, Probing};
use headroom_engine::plan::program::{BatchStatistics, OptimizerState, RunningStatistics};
use headroom_engine::plan::{Activation, Convolution, Planes, Pooling, Storage};
use headroom_engine::step::{Allocate, Kernels, Stored, UpdateRule};
use headroom_engine::synthetic;
use values::{chunks, row_blocks, HostValues};

/// Default budget of the host device: 256 MiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 256 << 20;

/// Bytes charged against a budget, and the most charged at once since the peak restarted.
#[derive(Debug)]
pub struct Ledger {
    budget: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Ledger {
    fn new(budget: u64) -> Ledger {
        Ledger {
            budget,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    fn charge(&self, bytes: u64) -> Result<(), DeviceError> {
        let before = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= self.budget)
            })
            .map_err(|used| DeviceError::OutOfMemory {
                requested_bytes: bytes,
                free_bytes: self.budget.saturating_sub(used),
            })?;
        self.peak.fetch_max(before + bytes, Ordering::SeqCst);
        Ok(())
    }

    /// Starts the peak anew from what is charged now, which it returns.
    fn restart_peak(&self) -> u64 {
        let used = self.used();
        self.peak.store(used, Ordering::SeqCst);
        used
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

/// A zeroed host buffer whose bytes stay charged to the ledger until it is dropped.
#[derive(Debug)]
pub struct HostBuffer<T> {
    data: Vec<T>,
    ledger: Arc<Ledger>,
}

impl<T: Copy + Default> HostBuffer<T> {
    fn zeroed(ledger: &Arc<Ledger>, len: u64) -> Result<Self, DeviceError> {
        let bytes =
            len.checked_mul(std::mem::size_of::<T>() as u64)
                .ok_or(DeviceError::OutOfMemory {
                    requested_bytes: u64::MAX,
                    free_bytes: ledger.budget.saturating_sub(ledger.used()),
                })?;
        ledger.charge(bytes)?;
        let refused = DeviceError::OutOfMemory {
            requested_bytes: bytes,
            free_bytes: ledger.budget.saturating_sub(ledger.used()),
        };
        let Ok(len) = usize::try_from(len) else {
            ledger.release(bytes);
            return Err(refused);
        };
        let mut data = Vec::new();
        if data.try_reserve_exact(len).is_err() {
            ledger.release(bytes);
            return Err(refused);
        }
        data.resize(len, T::default());
        Ok(HostBuffer {
            data,
            ledger: Arc::clone(ledger),
        })
    }
}

impl<T: Copy + Default> HostBuffer<T> {
    fn copied(ledger: &Arc<Ledger>, values: &[T]) -> Result<Self, DeviceError> {
        let mut buffer = HostBuffer::zeroed(ledger, values.len() as u64)?;
        buffer.copy_from_slice(values);
        Ok(buffer)
    }
}

impl<T> Drop for HostBuffer<T> {
    fn drop(&mut self) {
        self.ledger
            .release((self.data.len() * std::mem::size_of::<T>()) as u64);
    }
}

impl<T> Deref for HostBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T> DerefMut for HostBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

/// The CPU device.
#[derive(Debug, Clone)]
pub struct HostDevice {
    ledger: Arc<Ledger>,
}

impl HostDevice {
    /// A host device that may hold at most `budget_bytes` at once.
    pub fn new(budget_bytes: u64) -> HostDevice {
        HostDevice {
            ledger: Arc::new(Ledger::new(budget_bytes)),
        }
    }

    /// Bytes charged right now (zero between probes).
    pub fn used_bytes(&self) -> u64 {
        self.ledger.used()
    }
}

impl Default for HostDevice {
    fn default() -> Self {
        HostDevice::new(DEFAULT_BUDGET_BYTES)
    }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("host buffers are indexed by usize")
}

impl Allocate for HostDevice {
    type Values = HostValues;
    type U32 = HostBuffer<u32>;
    type Mask = HostBuffer<u8>;
    type Index = HostBuffer<i64>;
    type Error = DeviceError;

    fn zeroed(&mut self, len: u64, storage: Storage) -> Result<HostValues, DeviceError> {
        HostValues::zeroed(&self.ledger, len, storage)
    }

    fn u32_zeroed(&mut self, len: u64) -> Result<Self::U32, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }

    fn mask_zeroed(&mut self, len: u64) -> Result<Self::Mask, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }

    fn index_zeroed(&mut self, len: u64) -> Result<Self::Index, DeviceError> {
        HostBuffer::zeroed(&self.ledger, len)
    }
}

/// `bias` repeated over `spatial` positions: the per-row bias of a convolution's output seen as
/// rows of `bias.len() x spatial` values.
fn spread(bias: &[f32], spatial: usize) -> Vec<f32> {
    bias.iter()
        .flat_map(|&b| std::iter::repeat_n(b, spatial))
        .collect()
}

/// `y (rows x y_width)` from `a (rows x a_width)` by blocks of rows whose widest operand spans
/// about [`values::CHUNK`] values (one block when both are f32, which needs no widening): `op`
/// takes a block's rows, its `a` and its `y`.
fn row_map(
    (a, a_width): (&HostValues, usize),
    (y, y_width): (&mut HostValues, usize),
    rows: usize,
    mut op: impl FnMut(Range<usize>, &[f32], &mut [f32]),
) {
    let all_f32 = a.storage() == Storage::F32 && y.storage() == Storage::F32;
    for block in row_blocks(rows, a_width.max(y_width), all_f32) {
        let a = a.read(block.start * a_width..block.end * a_width);
        y.update(block.start * y_width..block.end * y_width, |y| {
            op(block, &a, y)
        });
    }
}

/// `y (rows x y_width) = a (rows x a_width) * b` by blocks of rows ([`row_map`]), `b` (`b_len`
/// values, stored as `a` is) widened once: the forward and input-gradient products.
/// `product` takes a block's rows.
fn row_product(
    a: (&HostValues, usize),
    (b, b_len): (&HostValues, usize),
    y: (&mut HostValues, usize),
    rows: usize,
    product: impl Fn(&[f32], &[f32], &mut [f32], usize),
) {
    let b = b.read(0..b_len);
    row_map(a, y, rows, |block, a, y| product(a, &b, y, block.len()));
}

impl Kernels for HostDevice {
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn fill_uniform(
        &mut self,
        out: &mut HostValues,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            out.update(range.clone(), |out| {
                ops::fill_uniform(out, range.start, key, scale)
            });
        }
        Ok(())
    }

    fn fill_labels(
        &mut self,
        labels: &mut Self::U32,
        inputs: &HostValues,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (rows, features) = (usize_of(rows), usize_of(features));
        for range in chunks(rows * features, features) {
            let first_row = range.start / features;
            let rows_here = range.len() / features;
            synthetic::fill_labels(
                &mut labels[first_row..first_row + rows_here],
                &inputs.read(range),
                features,
                usize_of(classes),
            );
        }
        Ok(())
    }

    fn linear_forward(
        &mut self,
        x: &HostValues,
        w: &HostValues,
        y: &mut HostValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        let (rows, inputs, outputs) = (usize_of(rows), usize_of(inputs), usize_of(outputs));
        row_product(
            (x, inputs),
            (w, outputs * inputs),
            (y, outputs),
            rows,
            |x, w, y, rows| ops::linear_forward(x, w, y, rows, inputs, outputs),
        );
        Ok(())
    }

    fn weight_gradient(
        &mut self,
        dy: &HostValues,
        x: &HostValues,
        dw: &mut HostValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        let (rows, inputs, outputs) = (usize_of(rows), usize_of(inputs), usize_of(outputs));
        let all_f32 = [dy, x, &*dw].iter().all(|v| v.storage() == Storage::F32);
        let weights = outputs * inputs;
        if all_f32 {
            dw.update(0..weights, |dw| {
                ops::weight_gradient(
                    &dy.read(0..rows * outputs),
                    &x.read(0..rows * inputs),
                    dw,
                    rows,
                    inputs,
                    outputs,
                    false,
                )
            });
            return Ok(());
        }
        // The sum over rows, by blocks, in f32; rounded once at the end.
        let mut sum = vec![0.0f32; weights];
        for (n, block) in row_blocks(rows, inputs.max(outputs), false).enumerate() {
            let dy = dy.read(block.start * outputs..block.end * outputs);
            let x = x.read(block.start * inputs..block.end * inputs);
            ops::weight_gradient(&dy, &x, &mut sum, block.len(), inputs, outputs, n > 0);
        }
        dw.write(0, &sum);
        Ok(())
    }

    fn input_gradient(
        &mut self,
        dy: &HostValues,
        w: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        let (rows, inputs, outputs) = (usize_of(rows), usize_of(inputs), usize_of(outputs));
        row_product(
            (dy, outputs),
            (w, outputs * inputs),
            (dx, inputs),
            rows,
            |dy, w, dx, rows| ops::input_gradient(dy, w, dx, rows, inputs, outputs),
        );
        Ok(())
    }

    fn conv2d_forward(
        &mut self,
        x: &HostValues,
        w: &HostValues,
        y: &mut HostValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(conv.inputs()), usize_of(conv.outputs()));
        row_product(
            (x, inputs),
            (w, usize_of(conv.weights())),
            (y, outputs),
            usize_of(rows),
            |x, w, y, _| image::conv2d_forward(x, w, y, conv),
        );
        Ok(())
    }

    fn conv2d_input_gradient(
        &mut self,
        dy: &HostValues,
        w: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(conv.inputs()), usize_of(conv.outputs()));
        row_product(
            (dy, outputs),
            (w, usize_of(conv.weights())),
            (dx, inputs),
            usize_of(rows),
            |dy, w, dx, _| image::conv2d_input_gradient(dy, w, dx, conv),
        );
        Ok(())
    }

    fn conv2d_weight_gradient(
        &mut self,
        dy: &HostValues,
        x: &HostValues,
        dw: &mut HostValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(conv.inputs()), usize_of(conv.outputs()));
        let all_f32 = dy.storage() == Storage::F32 && x.storage() == Storage::F32;
        // The sum over samples, by blocks, in f32; rounded once at the end.
        let mut sum = vec![0.0f32; usize_of(conv.weights())];
        for block in row_blocks(usize_of(rows), inputs.max(outputs), all_f32) {
            let dy = dy.read(block.start * outputs..block.end * outputs);
            let x = x.read(block.start * inputs..block.end * inputs);
            image::add_conv2d_weight_gradient(&dy, &x, &mut sum, conv);
        }
        dw.write(0, &sum);
        Ok(())
    }

    fn max_pool_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        indices: &mut HostBuffer<i64>,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((x, inputs), (y, outputs), usize_of(rows), |block, x, y| {
            let places = &mut indices[block.start * outputs..block.end * outputs];
            image::max_pool_forward(x, y, places, pool)
        });
        Ok(())
    }

    fn max_pool_backward(
        &mut self,
        dy: &HostValues,
        indices: &HostBuffer<i64>,
        dx: &mut HostValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map(
            (dy, outputs),
            (dx, inputs),
            usize_of(rows),
            |block, dy, dx| {
                let places = &indices[block.start * outputs..block.end * outputs];
                image::max_pool_backward(dy, places, dx, pool)
            },
        );
        Ok(())
    }

    fn avg_pool_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((x, inputs), (y, outputs), usize_of(rows), |_, x, y| {
            image::avg_pool_forward(x, y, pool)
        });
        Ok(())
    }

    fn avg_pool_backward(
        &mut self,
        dy: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let (inputs, outputs) = (usize_of(pool.inputs()), usize_of(pool.outputs()));
        row_map((dy, outputs), (dx, inputs), usize_of(rows), |_, dy, dx| {
            image::avg_pool_backward(dy, dx, pool)
        });
        Ok(())
    }

    fn batch_norm_forward(
        &mut self,
        x: &HostValues,
        scale: &HostValues,
        bias: &HostValues,
        residual: Option<&HostValues>,
        y: &mut HostValues,
        post: Option<&mut HostValues>,
        saved: &mut BatchStatistics<HostValues>,
        running: &mut RunningStatistics<HostValues, HostBuffer<i64>>,
        planes: &Planes,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        norm::forward(
            x, scale, bias, residual, y, post, saved, running, planes, activation,
        )
    }

    fn activation_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let x = x.read(range.clone());
            y.update(range, |y| ops::activate_all(&x, y, activation));
        }
        Ok(())
    }

    fn accumulate(
        &mut self,
        from: &HostValues,
        into: &mut HostValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let from = from.read(range.clone());
            into.update(range, |into| {
                for (into, from) in into.iter_mut().zip(from.iter()) {
                    *into += from;
                }
            });
        }
        Ok(())
    }

    fn batch_norm_backward(
        &mut self,
        dy: &HostValues,
        x: &HostValues,
        scale: &HostValues,
        saved: BatchStatistics<&HostValues>,
        dx: &mut HostValues,
        dscale: &mut HostValues,
        dbias: &mut HostValues,
        planes: &Planes,
    ) -> Result<(), DeviceError> {
        norm::backward(dy, x, scale, saved, dx, dscale, dbias, planes)
    }

    fn bias_activation(
        &mut self,
        pre: &mut HostValues,
        bias: &HostValues,
        mut post: Option<&mut HostValues>,
        rows: u64,
        cols: u64,
        spatial: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        let bias = spread(&bias.read(0..usize_of(cols)), usize_of(spatial));
        let cols = bias.len();
        for range in chunks(usize_of(rows) * cols, cols) {
            if let (Storage::F32, Some(post)) = (pre.storage(), post.as_deref_mut()) {
                pre.update(range.clone(), |pre| {
                    post.update(range, |post| {
                        ops::bias_activate(pre, &bias, post, cols, activation)
                    })
                });
                continue;
            }
            pre.update(range.clone(), |pre| ops::bias_add(pre, &bias, cols));
            if let Some(post) = post.as_deref_mut() {
                // The activation reads the pre-activation as stored.
                let stored = pre.read(range.clone());
                post.update(range, |post| ops::activate_all(&stored, post, activation));
            }
        }
        Ok(())
    }

    fn activation_backward(
        &mut self,
        grad_post: &HostValues,
        pre: &mut HostValues,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let grad = grad_post.read(range.clone());
            pre.update(range, |pre| {
                ops::activation_backward(&grad, pre, activation)
            });
        }
        Ok(())
    }

    fn dropout_forward(
        &mut self,
        x: &HostValues,
        mask: &mut HostBuffer<u8>,
        y: &mut HostValues,
        len: u64,
        p: f32,
        key: u64,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let x = x.read(range.clone());
            let mask = &mut mask[range.clone()];
            y.update(range.clone(), |y| {
                ops::dropout_forward(&x, mask, y, range.start, p, key)
            });
        }
        Ok(())
    }

    fn dropout_backward(
        &mut self,
        grad: &mut HostValues,
        mask: &HostBuffer<u8>,
        len: u64,
        p: f32,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let mask = &mask[range.clone()];
            grad.update(range, |grad| ops::dropout_backward(grad, mask, p));
        }
        Ok(())
    }

    fn activation_gradient(
        &mut self,
        grad: &HostValues,
        saved: &HostValues,
        out: &mut HostValues,
        len: u64,
        activation: Activation,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let (grad, saved) = (grad.read(range.clone()), saved.read(range.clone()));
            out.update(range, |out| {
                ops::activation_gradient(&grad, &saved, out, activation)
            });
        }
        Ok(())
    }

    fn bias_gradient(
        &mut self,
        dy: &HostValues,
        db: &mut HostValues,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), DeviceError> {
        let (cols, spatial) = (usize_of(cols), usize_of(spatial));
        let mut sums = vec![0.0f64; cols * spatial];
        for range in chunks(usize_of(rows) * cols * spatial, cols * spatial) {
            ops::add_column_sums(&dy.read(range), &mut sums);
        }
        let sums: Vec<f32> = sums
            .chunks_exact(spatial)
            .map(|plane| plane.iter().sum::<f64>() as f32)
            .collect();
        db.write(0, &sums);
        Ok(())
    }

    fn softmax_cross_entropy(
        &mut self,
        logits: &mut HostValues,
        labels: &Self::U32,
        row_loss: &mut HostValues,
        rows: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (rows, classes) = (usize_of(rows), usize_of(classes));
        let inv_rows = 1.0 / rows as f32;
        for range in chunks(rows * classes, classes) {
            let first = range.start / classes;
            let here = first..first + range.len() / classes;
            logits.update(range, |logits| {
                row_loss.update(here.clone(), |loss| {
                    ops::softmax_cross_entropy(logits, &labels[here], loss, classes, inv_rows)
                })
            });
        }
        Ok(())
    }

    fn mean(
        &mut self,
        values: &HostValues,
        len: u64,
        accumulator: &mut HostValues,
    ) -> Result<f32, DeviceError> {
        let mean = ops::mean(&values.read(0..usize_of(len)));
        accumulator.write(0, &[mean]);
        Ok(mean)
    }

    fn convert(
        &mut self,
        from: &HostValues,
        to: &mut HostValues,
        len: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let from = from.read(range.clone());
            to.update(range, |to| ops::scaled_copy(&from, to, scale));
        }
        Ok(())
    }

    fn any_nonfinite(
        &mut self,
        buffers: &[(&HostValues, u64)],
        flag: &mut HostValues,
    ) -> Result<bool, DeviceError> {
        let found = buffers.iter().any(|&(values, len)| {
            chunks(usize_of(len), 1).any(|r| values.read(r).iter().any(|v| !v.is_finite()))
        });
        flag.write(0, &[f32::from(u8::from(found))]);
        Ok(found)
    }

    fn optimizer_step(
        &mut self,
        param: &mut HostValues,
        grad: &HostValues,
        state: &mut OptimizerState<HostValues>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let grad = grad.read(range.clone());
            param.update(range.clone(), |param| match state {
                OptimizerState::Sgd => ops::optimizer_step(param, &grad, OptimizerState::Sgd, rule),
                OptimizerState::Momentum { velocity } => velocity.update(range, |velocity| {
                    ops::optimizer_step(param, &grad, OptimizerState::Momentum { velocity }, rule)
                }),
                OptimizerState::Adam { m, v } => m.update(range.clone(), |m| {
                    v.update(range, |v| {
                        ops::optimizer_step(param, &grad, OptimizerState::Adam { m, v }, rule)
                    })
                }),
            });
        }
        Ok(())
    }
}

impl Transfer for HostDevice {
    fn read_values(&mut self, buffer: &HostValues, len: u64) -> Result<Vec<f32>, DeviceError> {
        Ok(buffer.read(0..usize_of(len)).into_owned())
    }

    fn read_u32(&mut self, buffer: &Self::U32, len: u64) -> Result<Vec<u32>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn read_mask(&mut self, buffer: &Self::Mask, len: u64) -> Result<Vec<u8>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn read_index(&mut self, buffer: &Self::Index, len: u64) -> Result<Vec<i64>, DeviceError> {
        Ok(buffer[..usize_of(len)].to_vec())
    }

    fn write_values(
        &mut self,
        values: &[f32],
        storage: Storage,
    ) -> Result<HostValues, DeviceError> {
        let mut buffer = HostValues::zeroed(&self.ledger, values.len() as u64, storage)?;
        buffer.write(0, values);
        Ok(buffer)
    }

    fn write_u32(&mut self, values: &[u32]) -> Result<Self::U32, DeviceError> {
        HostBuffer::copied(&self.ledger, values)
    }
}

impl Probing for HostDevice {
    fn describe(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Host,
            index: 0,
            name: format!(
                "host CPU ({} threads, reference)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            uuid: None,
            total_bytes: self.ledger.budget,
            free_bytes: self.ledger.budget.saturating_sub(self.ledger.used()),
        }
    }

    fn begin_probe(&mut self) -> Result<u64, DeviceError> {
        Ok(self.ledger.restart_peak())
    }

    fn peak_bytes(&mut self) -> Result<u64, DeviceError> {
        Ok(self.ledger.peak())
    }

    fn end_probe(&mut self, before: u64) -> Result<(), DeviceError> {
        match self.ledger.used() {
            used if used == before => Ok(()),
            used => Err(DeviceError::Fault(format!(
                "the host ledger holds {used} bytes after the probe, {before} before"
            ))),
        }
    }
}

/// This machine's physical memory, where the platform tells (Linux's `/proc/meminfo`).
pub fn system_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests;
