//! One training step, written once against the [`Kernels`] a device provides: an
//! [`Executor`] runs a [`Program`] (the plan's step compiled for one batch size) instruction
//! by instruction, holding each buffer from its allocation to its free.

use crate::plan::program::{
    BatchStatistics, Instr, OptimizerState, Program, RunningStatistics, Scale, Slot,
};
use crate::plan::{
    Activation, Convolution, OptimizerKind, Plan, Planes, Pooling, Storage,
    LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL,
};

/// Momentum coefficient of `sgd_momentum`.
pub const MOMENTUM: f32 = 0.9;
/// Adam's first-moment decay.
pub const ADAM_BETA1: f32 = 0.9;
/// Adam's second-moment decay.
pub const ADAM_BETA2: f32 = 0.999;
/// Adam's denominator guard.
pub const ADAM_EPSILON: f32 = 1e-8;
/// AdamW's decoupled weight decay.
pub const ADAMW_WEIGHT_DECAY: f32 = 0.01;

/// The scalars of one optimizer step; which update applies follows from the [`OptimizerState`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateRule {
    /// Step size.
    pub learning_rate: f32,
    /// Adam's bias corrections `1 / (1 - beta^t)` for the first and second moment.
    pub bias_correction: (f32, f32),
    /// Decoupled weight decay (AdamW), 0 otherwise.
    pub weight_decay: f32,
    /// What each gradient is multiplied by before use: `1 / loss scale` under loss scaling, else 1.
    pub grad_scale: f32,
}

impl UpdateRule {
    /// The rule of `kind` for step `step` (counted from 1).
    pub fn new(kind: OptimizerKind, learning_rate: f32, step: u32) -> UpdateRule {
        let t = step.max(1) as i32;
        UpdateRule {
            learning_rate,
            bias_correction: (
                1.0 / (1.0 - ADAM_BETA1.powi(t)),
                1.0 / (1.0 - ADAM_BETA2.powi(t)),
            ),
            weight_decay: if kind == OptimizerKind::Adamw {
                ADAMW_WEIGHT_DECAY
            } else {
                0.0
            },
            grad_scale: 1.0,
        }
    }
}

/// A device buffer of values that knows how it stores them.
pub trait Stored {
    /// How the buffer stores its values.
    fn storage(&self) -> Storage;
}

/// Creates the buffers of a step on one device; every buffer starts zeroed.
pub trait Allocate {
    /// A device buffer of values (f32, bf16 or f16).
    type Values: Stored;
    /// A device buffer of `u32`.
    type U32;
    /// A device buffer of one-byte dropout masks.
    type Mask;
    /// A device buffer of `i64` places of pooling maxima.
    type Index;
    /// Out-of-memory or a device fault.
    type Error;
    /// A zeroed buffer of `len` values stored as `storage`; a length whose bytes pass `u64` is
    /// out of memory.
    fn zeroed(&mut self, len: u64, storage: Storage) -> Result<Self::Values, Self::Error>;
    /// A zeroed buffer of `len` `u32` values.
    fn u32_zeroed(&mut self, len: u64) -> Result<Self::U32, Self::Error>;
    /// A zeroed mask of `len` bytes.
    fn mask_zeroed(&mut self, len: u64) -> Result<Self::Mask, Self::Error>;
    /// A zeroed buffer of `len` `i64` places.
    fn index_zeroed(&mut self, len: u64) -> Result<Self::Index, Self::Error>;
}

/// The operations of a training step, as one device implements them (host code or CUDA kernels).
///
/// Matrices are row-major; `rows` is the batch size. Shapes follow the plan's [`crate::plan::Layer`]:
/// `x` is `rows x inputs`, `w` is `outputs x inputs`, `y` is `rows x outputs`. Every operation
/// reads each buffer as its storage says, computes in f32, and rounds what it stores to the
/// storage of the buffer it writes (to nearest, ties to even). The operands of a product share
/// one storage.
pub trait Kernels: Allocate {
    /// Waits until all work queued on the device is done (for timing and fault detection).
    fn synchronize(&mut self) -> Result<(), Self::Error>;
    /// Marks where a timed step begins in the device's queue (a GPU records an event).
    fn start_timing(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Waits for the work queued since [`Kernels::start_timing`] and returns how long it took by
    /// the device's own clock (a GPU's events), or `None` when the device has none and the
    /// host's clock around the step counts.
    fn stop_timing(&mut self) -> Result<Option<f64>, Self::Error> {
        self.synchronize().map(|()| None)
    }
    /// `out[i] = uniform(key, i) * scale`, the synthetic stream of [`synthetic::uniform`].
    fn fill_uniform(
        &mut self,
        out: &mut Self::Values,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), Self::Error>;
    /// Labels of the learnable task of [`synthetic::fill_labels`].
    fn fill_labels(
        &mut self,
        labels: &mut Self::U32,
        inputs: &Self::Values,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), Self::Error>;
    /// `y = x * w^T`.
    fn linear_forward(
        &mut self,
        x: &Self::Values,
        w: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), Self::Error>;
    /// Training-mode dropout of `len` values: `mask[i] = keeps(key, i, p)`
    /// ([`synthetic::keeps`]), `y[i] = x[i] / (1 - p)` where kept, else 0.
    #[allow(clippy::too_many_arguments)]
    fn dropout_forward(
        &mut self,
        x: &Self::Values,
        mask: &mut Self::Mask,
        y: &mut Self::Values,
        len: u64,
        p: f32,
        key: u64,
    ) -> Result<(), Self::Error>;
    /// Dropout's backward, in place: `grad[i] = grad[i] / (1 - p)` where `mask[i]` kept, else 0.
    fn dropout_backward(
        &mut self,
        grad: &mut Self::Values,
        mask: &Self::Mask,
        len: u64,
        p: f32,
    ) -> Result<(), Self::Error>;
    /// `dw = dy^T * x`.
    fn weight_gradient(
        &mut self,
        dy: &Self::Values,
        x: &Self::Values,
        dw: &mut Self::Values,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), Self::Error>;
    /// `dx = dy * w`.
    fn input_gradient(
        &mut self,
        dy: &Self::Values,
        w: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), Self::Error>;
    /// `y = x (*) w`: `conv`'s convolution of `rows` samples (`x` is `rows x conv.inputs()`,
    /// `y` is `rows x conv.outputs()`, NCHW), without bias.
    fn conv2d_forward(
        &mut self,
        x: &Self::Values,
        w: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), Self::Error>;
    /// The gradient of a convolution's input from its output's gradient `dy` and filters `w`.
    fn conv2d_input_gradient(
        &mut self,
        dy: &Self::Values,
        w: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), Self::Error>;
    /// The gradient of a convolution's filters from its output's gradient `dy` and input `x`,
    /// rounded to `dw`'s storage.
    fn conv2d_weight_gradient(
        &mut self,
        dy: &Self::Values,
        x: &Self::Values,
        dw: &mut Self::Values,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), Self::Error>;
    /// Max pooling: each window's largest value (a NaN if any; the first of equal ones) and
    /// its place in its plane (`row * width + column`).
    fn max_pool_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        indices: &mut Self::Index,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), Self::Error>;
    /// Max pooling's backward: each input gathers the gradient of the windows whose maximum
    /// it was.
    fn max_pool_backward(
        &mut self,
        dy: &Self::Values,
        indices: &Self::Index,
        dx: &mut Self::Values,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), Self::Error>;
    /// Average pooling: each window's sum over `kernel x kernel` (padding counted).
    fn avg_pool_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), Self::Error>;
    /// Average pooling's backward: each input gathers the gradient of every window holding
    /// it, over `kernel x kernel`.
    fn avg_pool_backward(
        &mut self,
        dy: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), Self::Error>;
    /// Batch norm in training mode over `planes`: per channel the batch's mean and
    /// `1 / sqrt(variance + eps)` (biased variance, [`crate::plan::BATCH_NORM_EPS`]) into
    /// `saved`, `y = (x - mean) * invstd * scale + bias (+ residual)` rounded to `x`'s storage
    /// (a residual block's shortcut added when given), the running
    /// statistics moved towards the batch's by [`crate::plan::BATCH_NORM_MOMENTUM`] (unbiased
    /// variance) and their step count raised by one; then `post = activation(y)` from the stored
    /// `y` when `post` is given.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward(
        &mut self,
        x: &Self::Values,
        scale: &Self::Values,
        bias: &Self::Values,
        residual: Option<&Self::Values>,
        y: &mut Self::Values,
        post: Option<&mut Self::Values>,
        saved: &mut BatchStatistics<Self::Values>,
        running: &mut RunningStatistics<Self::Values, Self::Index>,
        planes: &Planes,
        activation: Activation,
    ) -> Result<(), Self::Error>;
    /// Batch norm's backward from its output's gradient `dy`, its input `x` and what forward
    /// saved: with `xhat = (x - mean) * invstd` and `m` values per channel,
    /// `dbias = sum dy`, `dscale = sum dy * xhat` and
    /// `dx = scale * invstd * (dy - dbias / m - xhat * dscale / m)`, each rounded to its
    /// buffer's storage.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &mut self,
        dy: &Self::Values,
        x: &Self::Values,
        scale: &Self::Values,
        saved: BatchStatistics<&Self::Values>,
        dx: &mut Self::Values,
        dscale: &mut Self::Values,
        dbias: &mut Self::Values,
        planes: &Planes,
    ) -> Result<(), Self::Error>;
    /// `y = activation(x)`.
    fn activation_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        len: u64,
        activation: Activation,
    ) -> Result<(), Self::Error>;
    /// `into += from`, rounded to `into`'s storage: two gradients of one buffer summed.
    fn accumulate(
        &mut self,
        from: &Self::Values,
        into: &mut Self::Values,
        len: u64,
    ) -> Result<(), Self::Error>;
    /// `pre[i, j, k] += bias[j]` over `rows x cols x spatial`, then `post = activation(pre)`
    /// when `post` is given.
    #[allow(clippy::too_many_arguments)]
    fn bias_activation(
        &mut self,
        pre: &mut Self::Values,
        bias: &Self::Values,
        post: Option<&mut Self::Values>,
        rows: u64,
        cols: u64,
        spatial: u64,
        activation: Activation,
    ) -> Result<(), Self::Error>;
    /// `out = grad * activation'(...)` from what the activation saved: its output for relu and
    /// tanh (`relu' = [out > 0]`, `tanh' = 1 - out^2`), its input for gelu.
    fn activation_gradient(
        &mut self,
        grad: &Self::Values,
        saved: &Self::Values,
        out: &mut Self::Values,
        len: u64,
        activation: Activation,
    ) -> Result<(), Self::Error>;
    /// `pre = grad_post * activation'(pre)`: the gradient replaces the pre-activation in place.
    fn activation_backward(
        &mut self,
        grad_post: &Self::Values,
        pre: &mut Self::Values,
        len: u64,
        activation: Activation,
    ) -> Result<(), Self::Error>;
    /// `db[j] = sum_{i, k} dy[i, j, k]` over `rows x cols x spatial`.
    fn bias_gradient(
        &mut self,
        dy: &Self::Values,
        db: &mut Self::Values,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), Self::Error>;
    /// Per row: `row_loss = -log softmax(logits)[label]`, and the logits are replaced by the
    /// gradient of the mean loss, `(softmax - onehot) / rows`.
    fn softmax_cross_entropy(
        &mut self,
        logits: &mut Self::Values,
        labels: &Self::U32,
        row_loss: &mut Self::Values,
        rows: u64,
        classes: u64,
    ) -> Result<(), Self::Error>;
    /// The mean of `values`, reduced on the device into `accumulator` (one value) and read back.
    fn mean(
        &mut self,
        values: &Self::Values,
        len: u64,
        accumulator: &mut Self::Values,
    ) -> Result<f32, Self::Error>;
    /// `to = from * scale`, rounded to `to`'s storage (autocast's casts; the loss scale).
    fn convert(
        &mut self,
        from: &Self::Values,
        to: &mut Self::Values,
        len: u64,
        scale: f32,
    ) -> Result<(), Self::Error>;
    /// Whether any of `buffers` (each with its length) holds an infinity or a NaN; `flag` is
    /// the one-value buffer the device gathers the answer in.
    fn any_nonfinite(
        &mut self,
        buffers: &[(&Self::Values, u64)],
        flag: &mut Self::Values,
    ) -> Result<bool, Self::Error>;
    /// One optimizer update of `param` from `grad`; `state` decides which.
    fn optimizer_step(
        &mut self,
        param: &mut Self::Values,
        grad: &Self::Values,
        state: &mut OptimizerState<Self::Values>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), Self::Error>;
}

/// `GradScaler`'s state under `16-mixed`: the loss scale and the clean steps since it changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// What the loss (so every gradient) is multiplied by.
    pub scale: f32,
    /// Steps without overflow since the scale last changed.
    pub clean_steps: u32,
}

/// What became of a step's update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The optimizer updated every parameter.
    Applied,
    /// Loss scaling found an infinity or NaN among the gradients: no parameter changed, and the
    /// scale was halved.
    Skipped,
}

/// A buffer an executor holds: values, or labels.
pub enum Held<K: Allocate> {
    /// Values of some storage.
    Values(K::Values),
    /// `u32` labels.
    Labels(K::U32),
    /// A dropout mask.
    Mask(K::Mask),
    /// Places of pooling maxima.
    Index(K::Index),
}

/// Runs programs on one device's kernels: holds every live buffer in its slot, and the loss
/// scaler's state between steps.
pub struct Executor<K: Allocate> {
    slots: Vec<Option<Held<K>>>,
    /// Loss scaling: the scale and its clean steps.
    pub loss_scale: Option<LossScale>,
    /// The step running, counted from 1 (0 in setup): each draws its own dropout masks.
    step: u32,
}

impl<K: Kernels> Executor<K> {
    /// Runs `program`'s setup: its persistent buffers, the initial parameters and the batch.
    pub fn setup(kernels: &mut K, program: &Program) -> Result<Self, K::Error> {
        let mut executor = Executor {
            slots: (0..program.slots).map(|_| None).collect(),
            loss_scale: program.scales_loss.then_some(LossScale {
                scale: LOSS_SCALE_INITIAL,
                clean_steps: 0,
            }),
            step: 0,
        };
        executor.run(kernels, &program.setup, None)?;
        Ok(executor)
    }

    /// Runs one training step (`step` counts from 1) of `program` on `plan`'s update rule.
    pub fn step(
        &mut self,
        kernels: &mut K,
        plan: &Plan,
        program: &Program,
        step: u32,
    ) -> Result<Update, K::Error> {
        let rule = UpdateRule::new(plan.optimizer, plan.learning_rate, step);
        self.step = step;
        self.run(kernels, &program.step, Some(rule))
    }

    /// Runs `instrs`, the optimizer's with `rule`; an overflow under loss scaling skips the
    /// updates that follow it (allocations and frees still run). Dropout draws the masks of the
    /// step [`Executor::step`] last began (step 0 before any).
    pub fn run(
        &mut self,
        kernels: &mut K,
        instrs: &[Instr],
        rule: Option<UpdateRule>,
    ) -> Result<Update, K::Error> {
        let mut update = Update::Applied;
        let mut rule = rule.unwrap_or(UpdateRule::new(OptimizerKind::Sgd, 0.0, 1));
        for instr in instrs {
            match instr {
                Instr::CheckOverflow { gradients, flag } => {
                    match self.check_overflow(kernels, gradients, *flag)? {
                        Some(scale) => rule.grad_scale = 1.0 / scale,
                        None => update = Update::Skipped,
                    }
                }
                Instr::OptimizerStep { .. } if update == Update::Skipped => {}
                _ => self.execute(kernels, instr, rule)?,
            }
        }
        Ok(update)
    }

    /// The mean of the per-sample losses of the last step, reduced on the device.
    pub fn mean_loss(&mut self, kernels: &mut K, program: &Program) -> Result<f32, K::Error> {
        let (row_loss, accumulator) = program.loss;
        let mut sum = self.take(accumulator);
        let mean = kernels.mean(self.values(row_loss), program.batch_size, &mut sum);
        self.put(accumulator, sum);
        mean
    }

    /// The values buffer in `slot`.
    ///
    /// # Panics
    /// If the slot holds no values: a program reads only what it has allocated.
    pub fn values(&self, slot: Slot) -> &K::Values {
        match &self.slots[slot.0] {
            Some(Held::Values(values)) => values,
            _ => panic!("slot {} holds no values", slot.0),
        }
    }

    /// The label buffer in `slot`.
    ///
    /// # Panics
    /// If the slot holds no labels.
    pub fn labels(&self, slot: Slot) -> &K::U32 {
        match &self.slots[slot.0] {
            Some(Held::Labels(labels)) => labels,
            _ => panic!("slot {} holds no labels", slot.0),
        }
    }

    fn take_mask(&mut self, slot: Slot) -> K::Mask {
        match self.slots[slot.0].take() {
            Some(Held::Mask(mask)) => mask,
            _ => panic!("slot {} holds no mask", slot.0),
        }
    }

    fn take_index(&mut self, slot: Slot) -> K::Index {
        match self.slots[slot.0].take() {
            Some(Held::Index(indices)) => indices,
            _ => panic!("slot {} holds no indices", slot.0),
        }
    }

    fn take(&mut self, slot: Slot) -> K::Values {
        match self.slots[slot.0].take() {
            Some(Held::Values(values)) => values,
            _ => panic!("slot {} holds no values", slot.0),
        }
    }

    fn put(&mut self, slot: Slot, values: K::Values) {
        self.slots[slot.0] = Some(Held::Values(values));
    }

    /// Runs `update` with the buffer of `slot` taken out to be written, and puts it back.
    fn writing<T>(
        &mut self,
        slot: Slot,
        update: impl FnOnce(&Self, &mut K::Values) -> Result<T, K::Error>,
    ) -> Result<T, K::Error> {
        let mut out = self.take(slot);
        let result = update(self, &mut out);
        self.put(slot, out);
        result
    }

    /// `GradScaler`'s check: `None` when a gradient overflowed (the step is skipped and the
    /// scale halved), else the scale the gradients were made with (doubled for the next step
    /// after enough clean ones).
    fn check_overflow(
        &mut self,
        kernels: &mut K,
        gradients: &[(Slot, u64)],
        flag: Slot,
    ) -> Result<Option<f32>, K::Error> {
        let overflowed = self.writing(flag, |this, flag| {
            let buffers: Vec<(&K::Values, u64)> = gradients
                .iter()
                .map(|&(slot, len)| (this.values(slot), len))
                .collect();
            kernels.any_nonfinite(&buffers, flag)
        })?;
        let Some(scaler) = &mut self.loss_scale else {
            return Ok(Some(1.0));
        };
        if overflowed {
            *scaler = LossScale {
                scale: scaler.scale * 0.5,
                clean_steps: 0,
            };
            return Ok(None);
        }
        let used = scaler.scale;
        scaler.clean_steps += 1;
        if scaler.clean_steps == LOSS_SCALE_GROWTH_INTERVAL {
            *scaler = LossScale {
                scale: used * 2.0,
                clean_steps: 0,
            };
        }
        Ok(Some(used))
    }

    fn execute(
        &mut self,
        kernels: &mut K,
        instr: &Instr,
        rule: UpdateRule,
    ) -> Result<(), K::Error> {
        match *instr {
            Instr::Alloc { slot, buffer } => {
                let held = match buffer.element {
                    crate::plan::Element::Value(storage) => {
                        Held::Values(kernels.zeroed(buffer.elements, storage)?)
                    }
                    crate::plan::Element::Label => {
                        Held::Labels(kernels.u32_zeroed(buffer.elements)?)
                    }
                    crate::plan::Element::Mask => Held::Mask(kernels.mask_zeroed(buffer.elements)?),
                    crate::plan::Element::Index => {
                        Held::Index(kernels.index_zeroed(buffer.elements)?)
                    }
                };
                self.slots[slot.0] = Some(held);
            }
            Instr::Free(slot) => {
                self.slots[slot.0] = None;
            }
            Instr::Enter(_) => {}
            Instr::FillUniform {
                out,
                len,
                key,
                scale,
            } => self.writing(out, |_, out| kernels.fill_uniform(out, len, key, scale))?,
            Instr::FillLabels {
                labels,
                inputs,
                rows,
                features,
                classes,
            } => {
                let Some(Held::Labels(mut held)) = self.slots[labels.0].take() else {
                    panic!("slot {} holds no labels", labels.0)
                };
                let filled =
                    kernels.fill_labels(&mut held, self.values(inputs), rows, features, classes);
                self.slots[labels.0] = Some(Held::Labels(held));
                filled?
            }
            Instr::Convert {
                from,
                to,
                len,
                scale,
            } => {
                let factor = match (scale, &self.loss_scale) {
                    (Scale::Loss, Some(scaler)) => scaler.scale,
                    _ => 1.0,
                };
                self.writing(to, |this, to| {
                    kernels.convert(this.values(from), to, len, factor)
                })?
            }
            Instr::DropoutForward {
                x,
                mask,
                y,
                len,
                p,
                key,
            } => {
                let mut held = self.take_mask(mask);
                let step_key = crate::synthetic::stream_key(key, u64::from(self.step));
                let done = self.writing(y, |this, y| {
                    kernels.dropout_forward(this.values(x), &mut held, y, len, p, step_key)
                });
                self.slots[mask.0] = Some(Held::Mask(held));
                done?
            }
            Instr::DropoutBackward { grad, mask, len, p } => {
                let held = self.take_mask(mask);
                let done = self.writing(grad, |_, grad| {
                    kernels.dropout_backward(grad, &held, len, p)
                });
                self.slots[mask.0] = Some(Held::Mask(held));
                done?
            }
            Instr::LinearForward {
                x,
                w,
                y,
                rows,
                inputs,
                outputs,
            } => self.writing(y, |this, y| {
                kernels.linear_forward(this.values(x), this.values(w), y, rows, inputs, outputs)
            })?,
            Instr::ConvForward {
                x,
                w,
                y,
                rows,
                conv,
            } => self.writing(y, |this, y| {
                kernels.conv2d_forward(this.values(x), this.values(w), y, rows, &conv)
            })?,
            Instr::ConvInputGradient {
                dy,
                w,
                dx,
                rows,
                conv,
            } => self.writing(dx, |this, dx| {
                kernels.conv2d_input_gradient(this.values(dy), this.values(w), dx, rows, &conv)
            })?,
            Instr::ConvWeightGradient {
                dy,
                x,
                dw,
                rows,
                conv,
            } => self.writing(dw, |this, dw| {
                kernels.conv2d_weight_gradient(this.values(dy), this.values(x), dw, rows, &conv)
            })?,
            Instr::PoolForward {
                x,
                y,
                indices,
                rows,
                pool,
            } => match indices {
                Some(slot) => {
                    let mut held = self.take_index(slot);
                    let done = self.writing(y, |this, y| {
                        kernels.max_pool_forward(this.values(x), y, &mut held, rows, &pool)
                    });
                    self.slots[slot.0] = Some(Held::Index(held));
                    done?
                }
                None => self.writing(y, |this, y| {
                    kernels.avg_pool_forward(this.values(x), y, rows, &pool)
                })?,
            },
            Instr::PoolBackward {
                dy,
                indices,
                dx,
                rows,
                pool,
            } => match indices {
                Some(slot) => {
                    let held = self.take_index(slot);
                    let done = self.writing(dx, |this, dx| {
                        kernels.max_pool_backward(this.values(dy), &held, dx, rows, &pool)
                    });
                    self.slots[slot.0] = Some(Held::Index(held));
                    done?
                }
                None => self.writing(dx, |this, dx| {
                    kernels.avg_pool_backward(this.values(dy), dx, rows, &pool)
                })?,
            },
            Instr::BiasActivation {
                pre,
                bias,
                post,
                rows,
                cols,
                spatial,
                activation,
            } => {
                let mut post_buffer = post.map(|slot| self.take(slot));
                let done = self.writing(pre, |this, pre| {
                    kernels.bias_activation(
                        pre,
                        this.values(bias),
                        post_buffer.as_mut(),
                        rows,
                        cols,
                        spatial,
                        activation,
                    )
                });
                if let (Some(slot), Some(buffer)) = (post, post_buffer) {
                    self.put(slot, buffer);
                }
                done?
            }
            Instr::BatchNormForward {
                x,
                scale,
                bias,
                residual,
                y,
                post,
                saved,
                running,
                planes,
                activation,
            } => {
                let mut post_buffer = post.map(|slot| self.take(slot));
                let mut saved_buffers = BatchStatistics {
                    mean: self.take(saved.mean),
                    invstd: self.take(saved.invstd),
                };
                let mut running_buffers = RunningStatistics {
                    mean: self.take(running.mean),
                    var: self.take(running.var),
                    steps: self.take_index(running.steps),
                };
                let done = self.writing(y, |this, y| {
                    kernels.batch_norm_forward(
                        this.values(x),
                        this.values(scale),
                        this.values(bias),
                        residual.map(|slot| this.values(slot)),
                        y,
                        post_buffer.as_mut(),
                        &mut saved_buffers,
                        &mut running_buffers,
                        &planes,
                        activation,
                    )
                });
                if let (Some(slot), Some(buffer)) = (post, post_buffer) {
                    self.put(slot, buffer);
                }
                self.put(saved.mean, saved_buffers.mean);
                self.put(saved.invstd, saved_buffers.invstd);
                self.put(running.mean, running_buffers.mean);
                self.put(running.var, running_buffers.var);
                self.slots[running.steps.0] = Some(Held::Index(running_buffers.steps));
                done?
            }
            Instr::BatchNormBackward {
                dy,
                x,
                scale,
                saved,
                dx,
                dscale,
                dbias,
                planes,
            } => {
                let mut dscale_buffer = self.take(dscale);
                let mut dbias_buffer = self.take(dbias);
                let done = self.writing(dx, |this, dx| {
                    let saved = BatchStatistics {
                        mean: this.values(saved.mean),
                        invstd: this.values(saved.invstd),
                    };
                    kernels.batch_norm_backward(
                        this.values(dy),
                        this.values(x),
                        this.values(scale),
                        saved,
                        dx,
                        &mut dscale_buffer,
                        &mut dbias_buffer,
                        &planes,
                    )
                });
                self.put(dscale, dscale_buffer);
                self.put(dbias, dbias_buffer);
                done?
            }
            Instr::Activation {
                x,
                y,
                len,
                activation,
            } => self.writing(y, |this, y| {
                kernels.activation_forward(this.values(x), y, len, activation)
            })?,
            Instr::Accumulate { from, into, len } => self.writing(into, |this, into| {
                kernels.accumulate(this.values(from), into, len)
            })?,
            Instr::ActivationBackward {
                grad_post,
                pre,
                len,
                activation,
            } => self.writing(pre, |this, pre| {
                kernels.activation_backward(this.values(grad_post), pre, len, activation)
            })?,
            Instr::ActivationGradient {
                grad,
                saved,
                out,
                len,
                activation,
            } => self.writing(out, |this, out| {
                kernels.activation_gradient(
                    this.values(grad),
                    this.values(saved),
                    out,
                    len,
                    activation,
                )
            })?,
            Instr::WeightGradient {
                dy,
                x,
                dw,
                rows,
                inputs,
                outputs,
            } => self.writing(dw, |this, dw| {
                kernels.weight_gradient(this.values(dy), this.values(x), dw, rows, inputs, outputs)
            })?,
            Instr::InputGradient {
                dy,
                w,
                dx,
                rows,
                inputs,
                outputs,
            } => self.writing(dx, |this, dx| {
                kernels.input_gradient(this.values(dy), this.values(w), dx, rows, inputs, outputs)
            })?,
            Instr::BiasGradient {
                dy,
                db,
                rows,
                cols,
                spatial,
            } => self.writing(db, |this, db| {
                kernels.bias_gradient(this.values(dy), db, rows, cols, spatial)
            })?,
            Instr::SoftmaxCrossEntropy {
                logits,
                labels,
                row_loss,
                rows,
                classes,
            } => {
                let mut losses = self.take(row_loss);
                let done = self.writing(logits, |this, logits| {
                    kernels.softmax_cross_entropy(
                        logits,
                        this.labels(labels),
                        &mut losses,
                        rows,
                        classes,
                    )
                });
                self.put(row_loss, losses);
                done?
            }
            Instr::OptimizerStep {
                param,
                grad,
                state,
                len,
            } => {
                let mut owned = match state {
                    OptimizerState::Sgd => OptimizerState::Sgd,
                    OptimizerState::Momentum { velocity } => OptimizerState::Momentum {
                        velocity: self.take(velocity),
                    },
                    OptimizerState::Adam { m, v } => OptimizerState::Adam {
                        m: self.take(m),
                        v: self.take(v),
                    },
                };
                let done = self.writing(param, |this, param| {
                    kernels.optimizer_step(param, this.values(grad), &mut owned, len, rule)
                });
                match (state, owned) {
                    (
                        OptimizerState::Momentum { velocity },
                        OptimizerState::Momentum { velocity: buffer },
                    ) => self.put(velocity, buffer),
                    (OptimizerState::Adam { m, v }, OptimizerState::Adam { m: mb, v: vb }) => {
                        self.put(m, mb);
                        self.put(v, vb);
                    }
                    _ => {}
                }
                done?
            }
            Instr::CheckOverflow { .. } => unreachable!("run handles the overflow check"),
        }
        Ok(())
    }
}

/// The median of `times` (not empty) and their interquartile range relative to it: a robust
/// figure for a step, and how much the middle half of the steps disagreed (one step slowed by
/// the machine moves neither).
pub fn median_and_spread(times: &[f64]) -> (f64, f64) {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = quantile(&sorted, 0.5);
    let spread = if median > 0.0 {
        (quantile(&sorted, 0.75) - quantile(&sorted, 0.25)) / median
    } else {
        0.0
    };
    (median, spread)
}

/// The `q` quantile of `sorted` (not empty), interpolated linearly between its values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (below, above) = (at.floor() as usize, at.ceil() as usize);
    sorted[below] + (at - below as f64) * (sorted[above] - sorted[below])
}

/// How long a probe trains: at least `at_least` steps, then, when there is a warm-up step to
/// leave out (`at_least` of 2 or more), more while the timed steps add up to less than
/// `min_timed_seconds` and fewer than [`MAX_TIMED_STEPS`] are timed. A step of a small batch
/// takes microseconds, and one such step timed alone is mostly noise; a probe of one step (the
/// quickest check a job can ask for) stays one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Steps {
    /// Steps run whatever they take (the first is a warm-up when there are several).
    pub at_least: u32,
    /// Keep stepping until the timed steps add up to this many seconds (0: never).
    pub min_timed_seconds: f64,
}

/// The most steps a probe times to reach [`Steps::min_timed_seconds`].
pub const MAX_TIMED_STEPS: usize = 64;

impl Steps {
    /// Exactly `steps` steps, however short.
    pub fn exactly(steps: u32) -> Steps {
        Steps {
            at_least: steps,
            min_timed_seconds: 0.0,
        }
    }

    /// Whether a probe that has run `run` steps, the ones timed taking `timed` seconds each,
    /// runs another.
    pub fn another(&self, run: u32, timed: &[f64]) -> bool {
        run < self.at_least.max(1)
            || (self.at_least > 1
                && timed.len() < MAX_TIMED_STEPS
                && timed.iter().sum::<f64>() < self.min_timed_seconds)
    }
}

/// What [`run_probe`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeRun {
    /// Median seconds per step, the first (warm-up) step left out when there are several.
    pub step_seconds: f64,
    /// The timed steps' interquartile range relative to their median.
    pub step_seconds_spread: f64,
    /// Steps timed (the warm-up step left out).
    pub timed_steps: u32,
    /// Mean loss of the last step.
    pub final_loss: f32,
}

/// Compiles `plan`'s step at `rows`, runs its setup and its `steps`, and returns the executor
/// with every buffer it still holds (so the caller can measure the memory and read parameters
/// before they are freed). A batch whose sizes pass `u64` asks the device for `u64::MAX`
/// elements, which every device refuses as out of memory.
pub fn run_probe<K: Kernels>(
    kernels: &mut K,
    plan: &Plan,
    rows: u64,
    steps: Steps,
    seed: u64,
) -> Result<(Executor<K>, Program, ProbeRun), K::Error> {
    let Some(program) = plan.program(rows, seed) else {
        kernels.zeroed(u64::MAX, Storage::F32)?;
        unreachable!("no device holds u64::MAX values");
    };
    let mut executor = Executor::setup(kernels, &program)?;
    kernels.synchronize()?;
    let mut timed = Vec::with_capacity(steps.at_least as usize);
    let mut step = 0;
    while steps.another(step, timed.get(1..).unwrap_or_default()) {
        step += 1;
        let started = std::time::Instant::now();
        kernels.start_timing()?;
        executor.step(kernels, plan, &program, step)?;
        let device_seconds = kernels.stop_timing()?;
        timed.push(device_seconds.unwrap_or_else(|| started.elapsed().as_secs_f64()));
    }
    let measured = if timed.len() > 1 {
        &timed[1..]
    } else {
        &timed[..]
    };
    let (step_seconds, step_seconds_spread) = median_and_spread(measured);
    let final_loss = executor.mean_loss(kernels, &program)?;
    Ok((
        executor,
        program,
        ProbeRun {
            step_seconds,
            step_seconds_spread,
            timed_steps: measured.len() as u32,
            final_loss,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_step_is_the_median_of_its_timed_steps() {
        assert_eq!(median_and_spread(&[1.0]), (1.0, 0.0));
        assert_eq!(median_and_spread(&[3.0, 1.0, 2.0]), (2.0, 0.5));
        assert_eq!(median_and_spread(&[4.0, 1.0, 3.0, 2.0]), (2.5, 0.6));
        // One slow outlier moves neither the median nor the spread.
        assert_eq!(median_and_spread(&[1.0, 1.0, 1.0, 1.0, 9.0]), (1.0, 0.0));
    }

    #[test]
    fn the_update_rule_decays_only_for_adamw() {
        assert_eq!(
            UpdateRule::new(OptimizerKind::Adam, 0.1, 1).weight_decay,
            0.0
        );
        assert_eq!(
            UpdateRule::new(OptimizerKind::Adamw, 0.1, 1).weight_decay,
            ADAMW_WEIGHT_DECAY
        );
        let (c1, c2) = UpdateRule::new(OptimizerKind::Sgd, 0.1, 2).bias_correction;
        assert!((c1 - 1.0 / 0.19).abs() < 1e-5 && (c2 - 1.0 / (1.0 - 0.998_001)).abs() < 1e-1);
    }

    #[test]
    fn short_steps_are_timed_until_they_add_up_to_the_floor() {
        let steps = Steps {
            at_least: 2,
            min_timed_seconds: 0.01,
        };
        assert!(steps.another(0, &[]));
        assert!(steps.another(1, &[]), "the warm-up step is not timed");
        assert!(steps.another(2, &[0.004]));
        assert!(steps.another(3, &[0.004, 0.004]));
        assert!(!steps.another(4, &[0.004; 3]));
        assert!(
            !steps.another(65, &[1e-6; MAX_TIMED_STEPS]),
            "at most 64 timed"
        );
        assert!(!steps.another(2, &[0.5]), "a long step is timed once");
    }

    #[test]
    fn exactly_runs_the_steps_asked_for_and_at_least_one() {
        assert!(Steps::exactly(3).another(2, &[1e-9]));
        assert!(!Steps::exactly(3).another(3, &[1e-9, 1e-9]));
        assert!(Steps::exactly(0).another(0, &[]));
        assert!(!Steps::exactly(0).another(1, &[]));
        let one = Steps {
            at_least: 1,
            min_timed_seconds: 1.0,
        };
        assert!(!one.another(1, &[]), "one step asked for is one step run");
    }

    proptest! {
        /// Whatever the steps take, a probe stops after its own steps and at most 64 more, once
        /// the floor is reached or 64 steps are timed; a probe of one step runs one.
        #[test]
        fn a_probe_always_stops(
            at_least in 0u32..100,
            floor in 0.0f64..1.0,
            times in proptest::collection::vec(0.0f64..0.05, 200),
        ) {
            let steps = Steps { at_least, min_timed_seconds: floor };
            let mut timed: Vec<f64> = Vec::new();
            let mut run = 0;
            while steps.another(run, timed.get(1..).unwrap_or_default()) {
                timed.push(times[run as usize % times.len()]);
                run += 1;
            }
            prop_assert!(run as usize <= at_least.max(1) as usize + MAX_TIMED_STEPS);
            prop_assert!(run >= at_least.max(1));
            let after_warm_up = &timed[timed.len().min(1)..];
            prop_assert!(
                at_least <= 1 && run == 1
                    || after_warm_up.iter().sum::<f64>() >= floor
                    || after_warm_up.len() >= MAX_TIMED_STEPS
            );
        }
    }
}
