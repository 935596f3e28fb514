//! One training step, written once against the [`Kernels`] a device provides: an
//! [`Executor`] runs a [`Program`] (the plan's step compiled for one batch size) instruction
//! by instruction, holding each buffer from its allocation to its free.
//!
//! - [`kernels`]: the kernel families a device implements.

pub mod kernels;

pub use kernels::{
    Allocate, Attend, Conv, DropoutKernels, Elementwise, Fill, Gemm, Kernels, Lookup, Loss, Norm,
    Optimizer, Pool, Reduce, Scores, Stored,
};

use crate::plan::{
    Element, OptimizerKind, Plan, Storage, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL,
};
use crate::program::{
    Affine, AttentionGradients, AttentionSaved, BatchStatistics, Instr, LayerAffine,
    OptimizerState, Program, RowStatistics, RunningStatistics, Scale, Slot,
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

    /// The mean of the per-row losses of the last step, reduced on the device.
    pub fn mean_loss(&mut self, kernels: &mut K, program: &Program) -> Result<f32, K::Error> {
        let (row_loss, accumulator) = program.loss;
        let mut sum = self.take(accumulator);
        let mean = kernels.mean(self.values(row_loss), program.loss_rows, &mut sum);
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

    /// The int64 buffer in `slot` (token ids, pooling's maxima).
    ///
    /// # Panics
    /// If the slot holds something else.
    pub fn indices(&self, slot: Slot) -> &K::Index {
        match &self.slots[slot.0] {
            Some(Held::Index(indices)) => indices,
            _ => panic!("slot {} holds no indices", slot.0),
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

    fn take_values(&mut self, slot: Option<Slot>) -> Option<K::Values> {
        slot.map(|slot| self.take(slot))
    }

    fn put_values(&mut self, slot: Option<Slot>, values: Option<K::Values>) {
        if let (Some(slot), Some(values)) = (slot, values) {
            self.put(slot, values);
        }
    }

    /// Runs one instruction: allocations here, kernels by their family.
    fn execute(
        &mut self,
        kernels: &mut K,
        instr: &Instr,
        rule: UpdateRule,
    ) -> Result<(), K::Error> {
        match *instr {
            Instr::Alloc { slot, buffer } => {
                let held = match buffer.element {
                    Element::Value(storage) => {
                        Held::Values(kernels.zeroed(buffer.elements, storage)?)
                    }
                    Element::Label => Held::Labels(kernels.u32_zeroed(buffer.elements)?),
                    Element::Mask => Held::Mask(kernels.mask_zeroed(buffer.elements)?),
                    Element::Index => Held::Index(kernels.index_zeroed(buffer.elements)?),
                };
                self.slots[slot.0] = Some(held);
            }
            Instr::Free(slot) => {
                self.slots[slot.0] = None;
            }
            Instr::Enter(_) => {}
            Instr::FillUniform { .. } | Instr::FillLabels { .. } | Instr::FillTokens { .. } => {
                self.fill(kernels, instr)?
            }
            Instr::EmbeddingForward { .. }
            | Instr::EmbeddingBackward { .. }
            | Instr::PatchTokensForward { .. }
            | Instr::PatchTokensBackward { .. }
            | Instr::FirstTokenForward { .. }
            | Instr::FirstTokenBackward { .. }
            | Instr::MeanTokensForward { .. }
            | Instr::MeanTokensBackward { .. } => self.lookup(kernels, instr)?,
            Instr::AttentionForward { .. }
            | Instr::AttentionBackward { .. }
            | Instr::RotaryForward { .. }
            | Instr::RotaryBackward { .. } => self.attention(kernels, instr)?,
            Instr::BatchedProduct { .. }
            | Instr::CausalMask { .. }
            | Instr::SoftmaxRows { .. }
            | Instr::SoftmaxRowsBackward { .. }
            | Instr::RepeatHeads { .. }
            | Instr::SumHeadGroups { .. } => self.scores(kernels, instr)?,
            Instr::Convert { .. }
            | Instr::CopyRange { .. }
            | Instr::LinearForward { .. }
            | Instr::WeightGradient { .. }
            | Instr::InputGradient { .. }
            | Instr::BiasAdd { .. }
            | Instr::Activation { .. }
            | Instr::ActivationGradient { .. }
            | Instr::Add { .. }
            | Instr::Multiply { .. }
            | Instr::ScaleFeatures { .. }
            | Instr::Accumulate { .. }
            | Instr::BiasGradient { .. } => self.values_kernel(kernels, instr)?,
            Instr::ConvForward { .. }
            | Instr::ConvInputGradient { .. }
            | Instr::ConvWeightGradient { .. }
            | Instr::PoolForward { .. }
            | Instr::PoolBackward { .. }
            | Instr::AdaptivePoolForward { .. }
            | Instr::AdaptivePoolBackward { .. } => self.image_kernel(kernels, instr)?,
            Instr::BatchNormForward { .. } | Instr::BatchNormBackward { .. } => {
                self.batch_norm(kernels, instr)?
            }
            Instr::LayerNormForward { .. } | Instr::LayerNormBackward { .. } => {
                self.layer_norm(kernels, instr)?
            }
            Instr::DropoutForward { .. }
            | Instr::DropoutBackward { .. }
            | Instr::SoftmaxCrossEntropy { .. }
            | Instr::OptimizerStep { .. } => self.training_kernel(kernels, instr, rule)?,
            Instr::CheckOverflow { .. } => unreachable!("run handles the overflow check"),
        }
        Ok(())
    }

    /// fill.cu: the synthetic batch and first parameters.
    fn fill(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
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
            Instr::FillTokens {
                out,
                len,
                key,
                vocab,
            } => match self.slots[out.0].take() {
                Some(Held::Index(mut ids)) => {
                    let filled = kernels.fill_token_ids(&mut ids, len, key, vocab);
                    self.slots[out.0] = Some(Held::Index(ids));
                    filled?
                }
                Some(Held::Labels(mut labels)) => {
                    let filled = kernels.fill_token_labels(&mut labels, len, key, vocab);
                    self.slots[out.0] = Some(Held::Labels(labels));
                    filled?
                }
                _ => panic!("slot {} holds no ids or labels", out.0),
            },
            _ => unreachable!("{instr:?} is not a fill"),
        }
        Ok(())
    }

    /// attention.cu: the fused forward and its backward, rotary embedding and its backward.
    fn attention(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
            Instr::AttentionForward {
                q,
                k,
                v,
                o,
                lse,
                shape,
            } => {
                let shape = shape.at_step(u64::from(self.step));
                let mut lse_buffer = self.take(lse);
                let done = self.writing(o, |this, o| {
                    let (q, k, v) = (this.values(q), this.values(k), this.values(v));
                    kernels.attention_forward(q, k, v, o, &mut lse_buffer, &shape)
                });
                self.put(lse, lse_buffer);
                done?
            }
            Instr::AttentionBackward {
                saved,
                dout,
                grads,
                shape,
            } => {
                let shape = shape.at_step(u64::from(self.step));
                let mut dq = self.take(grads.dq);
                let mut dk = self.take(grads.dk);
                let mut dv = self.take(grads.dv);
                let saved_values = AttentionSaved {
                    q: self.values(saved.q),
                    k: self.values(saved.k),
                    v: self.values(saved.v),
                    o: self.values(saved.o),
                    lse: self.values(saved.lse),
                };
                let gradients = AttentionGradients {
                    dq: &mut dq,
                    dk: &mut dk,
                    dv: &mut dv,
                };
                let done =
                    kernels.attention_backward(saved_values, self.values(dout), gradients, &shape);
                self.put(grads.dq, dq);
                self.put(grads.dk, dk);
                self.put(grads.dv, dv);
                done?
            }
            Instr::RotaryForward { x, y, shape } => self.writing(y, |this, y| {
                kernels.rotary_forward(this.values(x), y, &shape)
            })?,
            Instr::RotaryBackward { dy, dx, shape } => self.writing(dx, |this, dx| {
                kernels.rotary_backward(this.values(dy), dx, &shape)
            })?,
            _ => unreachable!("{instr:?} is not attention"),
        }
        Ok(())
    }

    /// scores.cu: eager attention's products, mask, softmax and head repetition.
    fn scores(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
            Instr::BatchedProduct { a, b, c, shape } => self.writing(c, |this, c| {
                kernels.batched_product(this.values(a), this.values(b), c, &shape)
            })?,
            Instr::CausalMask {
                from,
                to,
                matrices,
                positions,
            } => self.writing(to, |this, to| {
                kernels.causal_mask(this.values(from), to, matrices, positions)
            })?,
            Instr::SoftmaxRows { x, p, rows, cols } => self.writing(p, |this, p| {
                kernels.softmax_rows(this.values(x), p, rows, cols)
            })?,
            Instr::SoftmaxRowsBackward {
                p,
                dp,
                dx,
                rows,
                cols,
            } => self.writing(dx, |this, dx| {
                kernels.softmax_rows_backward(this.values(p), this.values(dp), dx, rows, cols)
            })?,
            Instr::RepeatHeads { from, to, shape } => self.writing(to, |this, to| {
                kernels.repeat_heads(this.values(from), to, &shape)
            })?,
            Instr::SumHeadGroups { from, to, shape } => self.writing(to, |this, to| {
                kernels.sum_head_groups(this.values(from), to, &shape)
            })?,
            _ => unreachable!("{instr:?} is not eager attention's"),
        }
        Ok(())
    }

    /// embedding.cu: the lookup and the table's gradient, patch tokens, the first token.
    fn lookup(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
            Instr::EmbeddingForward {
                ids,
                weight,
                y,
                tokens,
                dim,
            } => {
                let held = self.take_index(ids);
                let done = self.writing(y, |this, y| {
                    kernels.embedding_forward(&held, this.values(weight), y, tokens, dim)
                });
                self.slots[ids.0] = Some(Held::Index(held));
                done?
            }
            Instr::EmbeddingBackward {
                dy,
                ids,
                dw,
                tokens,
                dim,
                vocab,
                padding,
            } => {
                let held = self.take_index(ids);
                let done = self.writing(dw, |this, dw| {
                    kernels.embedding_backward(
                        this.values(dy),
                        &held,
                        dw,
                        tokens,
                        dim,
                        vocab,
                        padding,
                    )
                });
                self.slots[ids.0] = Some(Held::Index(held));
                done?
            }
            Instr::PatchTokensForward {
                planes,
                class,
                out,
                rows,
                tokens,
                dim,
            } => self.writing(out, |this, out| {
                let (planes, class) = (this.values(planes), this.values(class));
                kernels.patch_tokens_forward(planes, class, out, rows, tokens, dim)
            })?,
            Instr::PatchTokensBackward {
                dout,
                dplanes,
                dclass,
                rows,
                tokens,
                dim,
            } => {
                let mut class_buffer = self.take(dclass);
                let done = self.writing(dplanes, |this, dplanes| {
                    let dout = this.values(dout);
                    kernels.patch_tokens_backward(
                        dout,
                        dplanes,
                        &mut class_buffer,
                        rows,
                        tokens,
                        dim,
                    )
                });
                self.put(dclass, class_buffer);
                done?
            }
            Instr::FirstTokenForward {
                x,
                y,
                rows,
                positions,
                dim,
            } => self.writing(y, |this, y| {
                kernels.first_token_forward(this.values(x), y, rows, positions, dim)
            })?,
            Instr::FirstTokenBackward {
                dy,
                dx,
                rows,
                positions,
                dim,
            } => self.writing(dx, |this, dx| {
                kernels.first_token_backward(this.values(dy), dx, rows, positions, dim)
            })?,
            Instr::MeanTokensForward {
                x,
                y,
                rows,
                positions,
                dim,
            } => self.writing(y, |this, y| {
                kernels.mean_tokens_forward(this.values(x), y, rows, positions, dim)
            })?,
            Instr::MeanTokensBackward {
                dy,
                dx,
                rows,
                positions,
                dim,
            } => self.writing(dx, |this, dx| {
                kernels.mean_tokens_backward(this.values(dy), dx, rows, positions, dim)
            })?,
            _ => unreachable!("{instr:?} is not an embedding"),
        }
        Ok(())
    }

    /// Products, conversions, biases, activations and sums.
    fn values_kernel(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
            Instr::Convert {
                from,
                to,
                len,
                scale,
            } => {
                let factor = match (scale, &self.loss_scale) {
                    (Scale::Loss, Some(scaler)) => scaler.scale,
                    (Scale::By(factor), _) => factor,
                    _ => 1.0,
                };
                self.writing(to, |this, to| {
                    kernels.convert(this.values(from), to, len, factor)
                })?
            }
            Instr::CopyRange {
                from,
                from_offset,
                to,
                to_offset,
                len,
            } => self.writing(to, |this, to| {
                kernels.copy_range((this.values(from), from_offset), (to, to_offset), len)
            })?,
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
            Instr::BiasAdd {
                y,
                bias,
                rows,
                cols,
                spatial,
            } => self.writing(y, |this, y| {
                kernels.bias_add(y, this.values(bias), rows, cols, spatial)
            })?,
            Instr::Activation {
                x,
                y,
                len,
                nonlinearity,
            } if x == y => {
                self.writing(y, |_, y| kernels.activation_in_place(y, len, nonlinearity))?
            }
            Instr::Activation {
                x,
                y,
                len,
                nonlinearity,
            } => self.writing(y, |this, y| {
                kernels.activation_forward(this.values(x), y, len, nonlinearity)
            })?,
            Instr::ActivationGradient {
                grad,
                saved,
                out,
                len,
                nonlinearity,
                saved_as,
            } => self.writing(out, |this, out| {
                kernels.activation_gradient(
                    this.values(grad),
                    this.values(saved),
                    out,
                    len,
                    nonlinearity,
                    saved_as,
                )
            })?,
            Instr::Add { a, b, out, len } => self.writing(out, |this, out| {
                kernels.add(this.values(a), this.values(b), out, len)
            })?,
            Instr::Multiply { a, b, out, len } => self.writing(out, |this, out| {
                kernels.multiply(this.values(a), this.values(b), out, len)
            })?,
            Instr::ScaleFeatures {
                x,
                scale,
                y,
                rows,
                features,
            } => self.writing(y, |this, y| {
                kernels.scale_features(this.values(x), this.values(scale), y, rows, features)
            })?,
            Instr::Accumulate { from, into, len } => self.writing(into, |this, into| {
                kernels.accumulate(this.values(from), into, len)
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
            _ => unreachable!("{instr:?} is not a product or an elementwise kernel"),
        }
        Ok(())
    }

    /// Convolutions and poolings.
    fn image_kernel(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
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
            Instr::AdaptivePoolForward { x, y, rows, pool } => self.writing(y, |this, y| {
                kernels.adaptive_pool_forward(this.values(x), y, rows, &pool)
            })?,
            Instr::AdaptivePoolBackward { dy, dx, rows, pool } => self
                .writing(dx, |this, dx| {
                    kernels.adaptive_pool_backward(this.values(dy), dx, rows, &pool)
                })?,
            _ => unreachable!("{instr:?} is not a convolution or a pooling"),
        }
        Ok(())
    }

    /// Batch norm's forward and backward.
    fn batch_norm(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
            Instr::BatchNormForward {
                x,
                affine,
                y,
                saved,
                running,
                planes,
            } => {
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
                    let affine = affine.map(|a| Affine {
                        scale: this.values(a.scale),
                        shift: this.values(a.shift),
                    });
                    kernels.batch_norm_forward(
                        this.values(x),
                        affine,
                        y,
                        &mut saved_buffers,
                        &mut running_buffers,
                        &planes,
                    )
                });
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
                affine,
                planes,
            } => {
                let mut dx_buffer = self.take_values(dx);
                let mut dscale = self.take_values(affine.map(|a| a.scale));
                let mut dshift = self.take_values(affine.map(|a| a.shift));
                let gradients = match (&mut dscale, &mut dshift) {
                    (Some(scale), Some(shift)) => Some(Affine { scale, shift }),
                    _ => None,
                };
                let saved = BatchStatistics {
                    mean: self.values(saved.mean),
                    invstd: self.values(saved.invstd),
                };
                let done = kernels.batch_norm_backward(
                    self.values(dy),
                    self.values(x),
                    scale.map(|s| self.values(s)),
                    saved,
                    dx_buffer.as_mut(),
                    gradients,
                    &planes,
                );
                self.put_values(dx, dx_buffer);
                self.put_values(affine.map(|a| a.scale), dscale);
                self.put_values(affine.map(|a| a.shift), dshift);
                done?
            }
            _ => unreachable!("{instr:?} is not batch norm"),
        }
        Ok(())
    }

    /// Layer norm's forward and backward.
    fn layer_norm(&mut self, kernels: &mut K, instr: &Instr) -> Result<(), K::Error> {
        match *instr {
            Instr::LayerNormForward {
                x,
                affine,
                y,
                saved,
                rows,
            } => {
                let mut saved_buffers = RowStatistics {
                    mean: self.take_values(saved.mean),
                    rstd: self.take(saved.rstd),
                };
                let done = self.writing(y, |this, y| {
                    let affine = affine.map(|a| LayerAffine {
                        scale: this.values(a.scale),
                        shift: a.shift.map(|s| this.values(s)),
                    });
                    kernels.layer_norm_forward(this.values(x), affine, y, &mut saved_buffers, &rows)
                });
                self.put_values(saved.mean, saved_buffers.mean);
                self.put(saved.rstd, saved_buffers.rstd);
                done?
            }
            Instr::LayerNormBackward {
                dy,
                x,
                scale,
                saved,
                dx,
                affine,
                rows,
            } => {
                let mut dx_buffer = self.take_values(dx);
                let mut dscale = self.take_values(affine.map(|a| a.scale));
                let mut dshift = self.take_values(affine.and_then(|a| a.shift));
                let gradients = dscale.as_mut().map(|scale| LayerAffine {
                    scale,
                    shift: dshift.as_mut(),
                });
                let saved_values = RowStatistics {
                    mean: saved.mean.map(|m| self.values(m)),
                    rstd: self.values(saved.rstd),
                };
                let done = kernels.layer_norm_backward(
                    self.values(dy),
                    self.values(x),
                    scale.map(|s| self.values(s)),
                    saved_values,
                    dx_buffer.as_mut(),
                    gradients,
                    &rows,
                );
                self.put_values(dx, dx_buffer);
                self.put_values(affine.map(|a| a.scale), dscale);
                self.put_values(affine.and_then(|a| a.shift), dshift);
                done?
            }
            _ => unreachable!("{instr:?} is not layer norm"),
        }
        Ok(())
    }

    /// Dropout, the loss and the optimizer's update.
    fn training_kernel(
        &mut self,
        kernels: &mut K,
        instr: &Instr,
        rule: UpdateRule,
    ) -> Result<(), K::Error> {
        match *instr {
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
            Instr::DropoutBackward {
                dy,
                mask,
                dx,
                len,
                p,
            } => {
                let held = self.take_mask(mask);
                let done = self.writing(dx, |this, dx| {
                    kernels.dropout_backward(this.values(dy), &held, dx, len, p)
                });
                self.slots[mask.0] = Some(Held::Mask(held));
                done?
            }
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
            _ => unreachable!("{instr:?} is not dropout, the loss or an update"),
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
