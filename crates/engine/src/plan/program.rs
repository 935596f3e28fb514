//! A training step as a program: every buffer it allocates and frees and every kernel it runs, in
//! order, compiled from a [`Plan`] for one batch size. The memory model walks the program's
//! allocations ([`Program::peak`]) and every device runs the same program
//! ([`crate::step::Executor`]), so the bytes modelled are the bytes a probe asks for, in the
//! order it asks for them.
//!
//! Two frameworks compile differently ([`Framework`]):
//!
//! - `pytorch` follows what PyTorch does for the same model, optimizer and precision, step by
//!   step as its autograd and `foreach` optimizers allocate and free: the loader's batch, each
//!   layer's output, autocast's copies (kept while backward needs them), autograd's saved
//!   tensors freed after their last use in backward, gradients created in backward and freed by
//!   `zero_grad(set_to_none=True)`, and the temporaries of the optimizer's update. Where
//!   headroom's kernels need less than PyTorch's (a fused update needs no `sqrt(v)` list; the
//!   fused loss needs no separate one-hot gradient) the program still holds PyTorch's buffer for
//!   as long as PyTorch holds it, so that a probe's peak is PyTorch's peak.
//! - `headroom` allocates every buffer once, before the first step, and keeps it: the step of
//!   headroom's own kernels, as earlier versions modelled it.

use serde::{Deserialize, Serialize};

use super::{
    Activation, Allocator, Buffer, Convolution, Element, Layer, MemoryBreakdown, Part, Plan,
    Planes, PoolKind, Pooling, Storage,
};
use crate::synthetic;

/// Whose training step the answer describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framework {
    /// PyTorch's: its order of allocations and frees, its optimizers' temporaries.
    #[default]
    Pytorch,
    /// headroom's own kernels, every buffer held for the whole step.
    Headroom,
}

impl Framework {
    /// The framework of results stored before jobs named one: headroom's own step.
    pub fn before_profiles() -> Framework {
        Framework::Headroom
    }

    /// Its name in a job.
    pub fn name(self) -> &'static str {
        match self {
            Framework::Pytorch => "pytorch",
            Framework::Headroom => "headroom",
        }
    }
}

impl std::fmt::Display for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A buffer of a program: where an executor keeps it between its allocation and its free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(pub usize);

/// The part of a training step an instruction belongs to, for saying when memory peaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// Before the first step: parameters, optimizer state, the batch.
    Setup,
    /// The forward pass and the loss.
    Forward,
    /// Backward.
    Backward,
    /// The optimizer's update (and, for PyTorch, `zero_grad`).
    Optimizer,
}

impl std::fmt::Display for Moment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Moment::Setup => "setup before the forward pass",
            Moment::Forward => "forward pass",
            Moment::Backward => "backward pass",
            Moment::Optimizer => "optimizer step",
        })
    }
}

/// What a conversion multiplies by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// A plain cast.
    One,
    /// The loss scale in force (`16-mixed`), 1 without loss scaling.
    Loss,
}

/// One instruction of a program. Sizes are in elements; `rows` is the batch size.
#[derive(Debug, Clone, PartialEq)]
pub enum Instr {
    /// Allocate `buffer`, zeroed, into `slot`.
    Alloc {
        /// Where it goes.
        slot: Slot,
        /// What it is.
        buffer: Buffer,
    },
    /// Free the buffer in `slot`.
    Free(Slot),
    /// What follows belongs to this moment of the step.
    Enter(Moment),
    /// `out[i] = uniform(key, i) * scale`.
    FillUniform {
        /// The buffer filled.
        out: Slot,
        /// Its length.
        len: u64,
        /// The stream's key.
        key: u64,
        /// The scale.
        scale: f32,
    },
    /// The labels of the synthetic task.
    FillLabels {
        /// The labels written.
        labels: Slot,
        /// The inputs they depend on.
        inputs: Slot,
        /// Samples.
        rows: u64,
        /// Input features.
        features: u64,
        /// Classes.
        classes: u64,
    },
    /// `to = from * scale`, rounded to `to`'s storage.
    Convert {
        /// Read.
        from: Slot,
        /// Written.
        to: Slot,
        /// Elements.
        len: u64,
        /// The factor.
        scale: Scale,
    },
    /// `y = x * w^T`.
    LinearForward {
        /// `rows x inputs`.
        x: Slot,
        /// `outputs x inputs`.
        w: Slot,
        /// `rows x outputs`.
        y: Slot,
        /// Batch size.
        rows: u64,
        /// Input width.
        inputs: u64,
        /// Output width.
        outputs: u64,
    },
    /// `y = x (*) w`, a convolution of an NCHW batch (its bias added by
    /// [`Instr::BiasActivation`]).
    ConvForward {
        /// `rows x inputs`.
        x: Slot,
        /// The filters.
        w: Slot,
        /// `rows x outputs`.
        y: Slot,
        /// Batch size.
        rows: u64,
        /// Its geometry.
        conv: Convolution,
    },
    /// A convolution's input gradient `dx` from `dy` and the filters.
    ConvInputGradient {
        /// `rows x outputs`.
        dy: Slot,
        /// The filters.
        w: Slot,
        /// `rows x inputs`.
        dx: Slot,
        /// Batch size.
        rows: u64,
        /// Its geometry.
        conv: Convolution,
    },
    /// A convolution's filter gradient `dw` from `dy` and its input.
    ConvWeightGradient {
        /// `rows x outputs`.
        dy: Slot,
        /// `rows x inputs`.
        x: Slot,
        /// The filters' gradient.
        dw: Slot,
        /// Batch size.
        rows: u64,
        /// Its geometry.
        conv: Convolution,
    },
    /// Pooling: `y` from `x`, and where each maximum was when it keeps the largest.
    PoolForward {
        /// Read.
        x: Slot,
        /// Written.
        y: Slot,
        /// Max pooling's 64-bit places of the maxima.
        indices: Option<Slot>,
        /// Batch size.
        rows: u64,
        /// Its geometry and kind.
        pool: Pooling,
    },
    /// Pooling's backward: `dx` from `dy` (through the maxima's places for max pooling).
    PoolBackward {
        /// The gradient of the pooled output.
        dy: Slot,
        /// Max pooling's places of the maxima.
        indices: Option<Slot>,
        /// The gradient of its input, written.
        dx: Slot,
        /// Batch size.
        rows: u64,
        /// Its geometry and kind.
        pool: Pooling,
    },
    /// `pre += bias` (bias `j` over position `k` of `rows x cols x spatial`), then
    /// `post = activation(pre)` when `post` is given.
    BiasActivation {
        /// The product, biased in place.
        pre: Slot,
        /// The bias.
        bias: Slot,
        /// The activation's output, if any.
        post: Option<Slot>,
        /// Batch size.
        rows: u64,
        /// Biases: a linear layer's width, a convolution's output channels.
        cols: u64,
        /// Positions each bias is added at: 1, or a convolution's output height x width.
        spatial: u64,
        /// The non-linearity.
        activation: Activation,
    },
    /// Batch norm in training mode: per channel the batch's mean and `1 / sqrt(variance + eps)`
    /// (biased variance) into `saved`, `y = (x - mean) * invstd * scale + bias (+ residual)`,
    /// the running
    /// statistics moved towards the batch's by [`super::BATCH_NORM_MOMENTUM`] (the unbiased
    /// variance) and their step count raised; then `post = activation(y)` when `post` is given.
    BatchNormForward {
        /// Read.
        x: Slot,
        /// Per channel, the parameters' storage.
        scale: Slot,
        /// Per channel, the parameters' storage.
        bias: Slot,
        /// A residual block's shortcut, added to `y` (as `x` is stored), if any.
        residual: Option<Slot>,
        /// Written, as `x` is stored.
        y: Slot,
        /// The activation's output, if any.
        post: Option<Slot>,
        /// Written: what backward reads.
        saved: BatchStatistics<Slot>,
        /// Updated.
        running: RunningStatistics<Slot>,
        /// The batch's shape.
        planes: Planes,
        /// The non-linearity written to `post` (none without it).
        activation: Activation,
    },
    /// Batch norm's backward: `dx`, and the gradients of its scale and bias, from `dy`, its
    /// input `x` and what forward saved.
    BatchNormBackward {
        /// The gradient of its output.
        dy: Slot,
        /// Its input.
        x: Slot,
        /// Its scale.
        scale: Slot,
        /// What forward saved.
        saved: BatchStatistics<Slot>,
        /// The gradient of its input, written.
        dx: Slot,
        /// Written.
        dscale: Slot,
        /// Written.
        dbias: Slot,
        /// The batch's shape.
        planes: Planes,
    },
    /// `y = activation(x)`.
    Activation {
        /// Read.
        x: Slot,
        /// Written.
        y: Slot,
        /// Elements.
        len: u64,
        /// The non-linearity.
        activation: Activation,
    },
    /// `into += from`: a residual block's two gradients of its input summed.
    Accumulate {
        /// Read.
        from: Slot,
        /// Added to.
        into: Slot,
        /// Elements.
        len: u64,
    },
    /// `pre = grad_post * activation'(pre)`, in place.
    ActivationBackward {
        /// The gradient of the activation's output.
        grad_post: Slot,
        /// The pre-activation, replaced by its gradient.
        pre: Slot,
        /// Elements.
        len: u64,
        /// The non-linearity.
        activation: Activation,
    },
    /// `out = grad * activation'(...)` from what PyTorch saves: the output for relu and tanh,
    /// the input for gelu.
    ActivationGradient {
        /// The gradient of the activation's output.
        grad: Slot,
        /// What the activation saved.
        saved: Slot,
        /// The gradient of its input, written.
        out: Slot,
        /// Elements.
        len: u64,
        /// The non-linearity.
        activation: Activation,
    },
    /// Training-mode dropout: `mask[i]` keeps value `i` with probability `1 - p`, from the
    /// step's sub-stream of `key` ([`synthetic::keeps`]); `y = x / (1 - p)` where kept, else 0.
    DropoutForward {
        /// Read.
        x: Slot,
        /// Written: one byte a value.
        mask: Slot,
        /// Written.
        y: Slot,
        /// Elements.
        len: u64,
        /// Probability of dropping a value.
        p: f32,
        /// The mask's stream; each step draws its own sub-stream of it.
        key: u64,
    },
    /// Dropout's backward, in place: `grad = grad / (1 - p)` where the mask kept, else 0.
    DropoutBackward {
        /// The gradient of dropout's output in, of its input out.
        grad: Slot,
        /// What the forward kept.
        mask: Slot,
        /// Elements.
        len: u64,
        /// Probability of dropping a value.
        p: f32,
    },
    /// `dw = dy^T * x`.
    WeightGradient {
        /// `rows x outputs`.
        dy: Slot,
        /// `rows x inputs`.
        x: Slot,
        /// `outputs x inputs`.
        dw: Slot,
        /// Batch size.
        rows: u64,
        /// Input width.
        inputs: u64,
        /// Output width.
        outputs: u64,
    },
    /// `dx = dy * w`.
    InputGradient {
        /// `rows x outputs`.
        dy: Slot,
        /// `outputs x inputs`.
        w: Slot,
        /// `rows x inputs`.
        dx: Slot,
        /// Batch size.
        rows: u64,
        /// Input width.
        inputs: u64,
        /// Output width.
        outputs: u64,
    },
    /// `db[j] = sum_{i, k} dy[i, j, k]`.
    BiasGradient {
        /// `rows x cols x spatial`.
        dy: Slot,
        /// `cols`.
        db: Slot,
        /// Batch size.
        rows: u64,
        /// Biases.
        cols: u64,
        /// Positions of each bias.
        spatial: u64,
    },
    /// Per-sample losses, and the logits replaced by the gradient of the mean loss.
    SoftmaxCrossEntropy {
        /// Logits in, their gradient out.
        logits: Slot,
        /// The labels.
        labels: Slot,
        /// Per-sample losses, f32.
        row_loss: Slot,
        /// Batch size.
        rows: u64,
        /// Classes.
        classes: u64,
    },
    /// Under loss scaling: whether any gradient overflowed (`flag` gathers the answer); the
    /// updates that follow are skipped if so.
    CheckOverflow {
        /// Every gradient, with its length.
        gradients: Vec<(Slot, u64)>,
        /// One value.
        flag: Slot,
    },
    /// One optimizer update of `param` from `grad`.
    OptimizerStep {
        /// Updated in place.
        param: Slot,
        /// Its gradient.
        grad: Slot,
        /// What the optimizer keeps for it.
        state: OptimizerState<Slot>,
        /// Elements.
        len: u64,
    },
}

/// What batch norm's forward saves for its backward: per channel, f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStatistics<F> {
    /// The batch's mean.
    pub mean: F,
    /// `1 / sqrt(variance + eps)`, the biased variance.
    pub invstd: F,
}

/// What batch norm keeps between steps (`running_mean`, `running_var`, `num_batches_tracked`),
/// each step moved towards the batch's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningStatistics<F, I = F> {
    /// Per channel, the parameters' storage.
    pub mean: F,
    /// Per channel, the parameters' storage.
    pub var: F,
    /// One int64: steps taken.
    pub steps: I,
}

/// A compiled training step at one batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// The batch size it trains.
    pub batch_size: u64,
    /// How many slots an executor needs.
    pub slots: usize,
    /// Once per probe, before the first step: persistent buffers and their first values.
    pub setup: Vec<Instr>,
    /// Every training step; it frees whatever it allocates.
    pub step: Vec<Instr>,
    /// Every parameter, layer by layer in PyTorch's order (weights, batch norm's scales, biases),
    /// with its length.
    pub parameters: Vec<(Slot, u64)>,
    /// Their gradients, in the same order, alive when the optimizer's moment begins.
    pub gradients: Vec<(Slot, u64)>,
    /// The input batch as the loader delivers it, and its labels.
    pub inputs: (Slot, Slot),
    /// The per-sample losses of the last step and the one-value accumulator of their mean.
    pub loss: (Slot, Slot),
    /// Whether the step scales the loss (`16-mixed`).
    pub scales_loss: bool,
}

/// The most memory a program holds at one instruction, and what holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    /// Bytes, each buffer rounded as the allocator rounds it.
    pub bytes: u64,
    /// The exact bytes of each part at that instruction.
    pub memory: MemoryBreakdown,
    /// The moment of the step it falls in.
    pub moment: Moment,
    /// Which allocation it follows (its place among the program's allocations, setup first),
    /// for comparing programs of one plan at other batch sizes.
    pub allocation: usize,
}

impl Program {
    /// The step's instructions before `moment` begins (all of them if it never does).
    pub fn until(&self, moment: Moment) -> &[Instr] {
        let end = self
            .step
            .iter()
            .position(|instr| *instr == Instr::Enter(moment))
            .unwrap_or(self.step.len());
        &self.step[..end]
    }

    /// The program's highest memory: setup, then one step, each buffer rounded by `allocator`.
    /// `None` past `u64`.
    pub fn peak(&self, allocator: Allocator) -> Option<Peak> {
        self.peak_where(allocator, |_, _| true)
    }

    /// The memory held right after the `allocation`-th allocation (counted from 0), exactly.
    pub fn memory_at(&self, allocation: usize) -> Option<MemoryBreakdown> {
        self.peak_where(Allocator::Exact, |n, _| n == allocation)
            .map(|peak| peak.memory)
    }

    /// The highest memory among the instants (the allocation's number and its rounded bytes)
    /// that `counts` accepts.
    fn peak_where(
        &self,
        allocator: Allocator,
        counts: impl Fn(usize, u64) -> bool,
    ) -> Option<Peak> {
        let mut live: Vec<Option<(Buffer, u64)>> = vec![None; self.slots];
        let mut memory = MemoryBreakdown::default();
        let mut bytes = 0u64;
        let mut moment = Moment::Setup;
        let mut allocations = 0usize;
        let mut best: Option<Peak> = None;
        for instr in self.setup.iter().chain(&self.step) {
            match instr {
                Instr::Enter(next) => moment = *next,
                Instr::Alloc { slot, buffer } => {
                    let exact = buffer.bytes()?;
                    let charged = allocator.charge(exact)?;
                    *memory.part_mut(buffer.part) = memory.part(buffer.part).checked_add(exact)?;
                    memory.total = memory.total.checked_add(exact)?;
                    bytes = bytes.checked_add(charged)?;
                    live[slot.0] = Some((*buffer, charged));
                    if counts(allocations, bytes) && best.is_none_or(|b| bytes > b.bytes) {
                        best = Some(Peak {
                            bytes,
                            memory,
                            moment,
                            allocation: allocations,
                        });
                    }
                    allocations += 1;
                }
                Instr::Free(slot) => {
                    let (buffer, charged) = live[slot.0]
                        .take()
                        .expect("a program frees only what it allocated");
                    let exact = buffer.bytes()?;
                    *memory.part_mut(buffer.part) -= exact;
                    memory.total -= exact;
                    bytes -= charged;
                }
                _ => {}
            }
        }
        best
    }
}

/// Builds a program: allocates slots, and puts instructions into the setup or the step.
struct Builder {
    slots: usize,
    setup: Vec<Instr>,
    step: Vec<Instr>,
    in_setup: bool,
}

/// What a program is besides its instructions, known once they are written.
struct Ending {
    batch_size: u64,
    parameters: Vec<(Slot, u64)>,
    gradients: Vec<(Slot, u64)>,
    inputs: (Slot, Slot),
    loss: (Slot, Slot),
    scales_loss: bool,
}

impl Builder {
    /// The program these instructions make.
    fn finish(self, ending: Ending) -> Program {
        Program {
            batch_size: ending.batch_size,
            slots: self.slots,
            setup: self.setup,
            step: self.step,
            parameters: ending.parameters,
            gradients: ending.gradients,
            inputs: ending.inputs,
            loss: ending.loss,
            scales_loss: ending.scales_loss,
        }
    }

    fn new() -> Builder {
        Builder {
            slots: 0,
            setup: vec![Instr::Enter(Moment::Setup)],
            step: Vec::new(),
            in_setup: true,
        }
    }

    fn push(&mut self, instr: Instr) {
        if self.in_setup {
            self.setup.push(instr);
        } else {
            self.step.push(instr);
        }
    }

    fn alloc(&mut self, part: Part, elements: u64, element: Element) -> Slot {
        let slot = Slot(self.slots);
        self.slots += 1;
        self.push(Instr::Alloc {
            slot,
            buffer: Buffer {
                part,
                elements,
                element,
            },
        });
        slot
    }

    fn value(&mut self, part: Part, elements: u64, storage: Storage) -> Slot {
        self.alloc(part, elements, Element::Value(storage))
    }

    fn free(&mut self, slot: Slot) {
        self.push(Instr::Free(slot));
    }

    fn enter(&mut self, moment: Moment) {
        self.in_setup = false;
        self.push(Instr::Enter(moment));
    }
}

/// The dropout after a hidden layer's activation: its output, its mask, its probability.
#[derive(Debug, Clone, Copy)]
struct Dropped {
    output: Slot,
    mask: Slot,
    p: f32,
}

impl Dropped {
    /// Dropout of probability `p` over `elements` values stored as `storage`: its output, then
    /// its one-byte mask.
    fn allocate(b: &mut Builder, elements: u64, storage: Storage, p: f32) -> Dropped {
        Dropped {
            output: b.value(Part::Activations, elements, storage),
            mask: b.alloc(Part::Activations, elements, Element::Mask),
            p,
        }
    }

    /// Dropout of `activated` (`len` values) after hidden layer `layer`, its masks drawn from
    /// `seed`.
    fn forward(&self, activated: Slot, seed: u64, layer: usize, len: u64) -> Instr {
        Instr::DropoutForward {
            x: activated,
            mask: self.mask,
            y: self.output,
            len,
            p: self.p,
            key: synthetic::stream_key(seed, synthetic::dropout_stream(layer)),
        }
    }

    /// Dropout's backward of `grad` (`len` values), in place.
    fn backward(&self, grad: Slot, len: u64) -> Instr {
        Instr::DropoutBackward {
            grad,
            mask: self.mask,
            len,
            p: self.p,
        }
    }
}

/// A batch norm's parameters: its scale and shift, and its running statistics.
#[derive(Debug, Clone, Copy)]
struct NormParameters {
    scale: Slot,
    bias: Slot,
    running: RunningStatistics<Slot>,
}

/// The batch norm after a convolution: its output and what it saves for backward.
#[derive(Debug, Clone, Copy)]
struct Normalized {
    output: Slot,
    saved: BatchStatistics<Slot>,
    planes: Planes,
}

impl Normalized {
    /// Batch norm of `layer`'s output (or its shortcut's convolution's, the same shape) at
    /// `rows` samples stored as `storage`: its output, then the batch's means and inverse
    /// deviations (f32, as PyTorch saves them on a GPU).
    fn allocate(b: &mut Builder, layer: &Layer, rows: u64, storage: Storage) -> Option<Normalized> {
        let planes = Planes {
            rows,
            channels: layer.biases(),
            spatial: layer.spatial(),
        };
        Some(Normalized {
            output: b.value(Part::Activations, rows.checked_mul(layer.outputs)?, storage),
            saved: BatchStatistics {
                mean: b.value(Part::Activations, planes.channels, Storage::F32),
                invstd: b.value(Part::Activations, planes.channels, Storage::F32),
            },
            planes,
        })
    }

    /// [`Normalized::allocate`] for a layer that has batch norm.
    fn allocate_for(
        b: &mut Builder,
        layer: &Layer,
        rows: u64,
        storage: Storage,
    ) -> Option<Option<Normalized>> {
        match layer.norm {
            true => Normalized::allocate(b, layer, rows, storage).map(Some),
            false => Some(None),
        }
    }

    /// Batch norm of `x` with `params`, plus `residual` if given, into `y`; then `post`'s
    /// activation into its slot when given.
    fn forward(
        &self,
        x: Slot,
        params: NormParameters,
        (residual, y): (Option<Slot>, Slot),
        post: Option<(Slot, Activation)>,
    ) -> Instr {
        Instr::BatchNormForward {
            x,
            scale: params.scale,
            bias: params.bias,
            residual,
            y,
            post: post.map(|(slot, _)| slot),
            saved: self.saved,
            running: params.running,
            planes: self.planes,
            activation: post.map(|(_, activation)| activation).unwrap_or_default(),
        }
    }

    /// Batch norm's backward from `dy` and its input `x`: `dx`, then its scale's and bias's
    /// gradients `(dscale, dbias)`.
    fn backward(
        &self,
        dy: Slot,
        x: Slot,
        params: NormParameters,
        dx: Slot,
        (dscale, dbias): (Slot, Slot),
    ) -> Instr {
        Instr::BatchNormBackward {
            dy,
            x,
            scale: params.scale,
            saved: self.saved,
            dx,
            dscale,
            dbias,
            planes: self.planes,
        }
    }
}

/// A residual block's projected shortcut: the 1x1 convolution's output and its batch norm.
#[derive(Debug, Clone, Copy)]
struct Projected {
    output: Slot,
    norm: Normalized,
    conv: Convolution,
}

impl Projected {
    /// The projection of `layer`'s block at `rows` samples stored as `storage`, if it has one:
    /// the convolution's output, then its batch norm's.
    fn allocate(
        b: &mut Builder,
        layer: &Layer,
        rows: u64,
        storage: Storage,
    ) -> Option<Option<Projected>> {
        let Some(conv) = layer.projection() else {
            return Some(None);
        };
        let output = b.value(Part::Activations, rows.checked_mul(layer.outputs)?, storage);
        Some(Some(Projected {
            output,
            norm: Normalized::allocate(b, layer, rows, storage)?,
            conv,
        }))
    }

    /// The convolution of the block's input `x` with `w`, then its batch norm with `params`.
    fn forward(&self, x: Slot, w: Slot, params: NormParameters, rows: u64) -> [Instr; 2] {
        [
            Instr::ConvForward {
                x,
                w,
                y: self.output,
                rows,
                conv: self.conv,
            },
            self.norm
                .forward(self.output, params, (None, self.norm.output), None),
        ]
    }
}

/// The pooling after a convolution's activation: its output and, for max pooling, the places
/// of the maxima (PyTorch's int64 indices).
#[derive(Debug, Clone, Copy)]
struct Pooled {
    output: Slot,
    indices: Option<Slot>,
    pool: Pooling,
}

impl Pooled {
    /// `pool` over `rows` samples stored as `storage`: its output, then its indices.
    fn allocate(b: &mut Builder, rows: u64, pool: Pooling, storage: Storage) -> Option<Pooled> {
        let elements = rows.checked_mul(pool.outputs())?;
        Some(Pooled {
            output: b.value(Part::Activations, elements, storage),
            indices: (pool.kind == PoolKind::Max)
                .then(|| b.alloc(Part::Activations, elements, Element::Index)),
            pool,
        })
    }

    fn forward(&self, x: Slot, rows: u64) -> Instr {
        Instr::PoolForward {
            x,
            y: self.output,
            indices: self.indices,
            rows,
            pool: self.pool,
        }
    }

    fn backward(&self, dy: Slot, dx: Slot, rows: u64) -> Instr {
        Instr::PoolBackward {
            dy,
            indices: self.indices,
            dx,
            rows,
            pool: self.pool,
        }
    }
}

/// `layer`'s product of `x` and `w` into `y`: a linear layer's or a convolution's.
fn product(layer: &Layer, x: Slot, w: Slot, y: Slot, rows: u64) -> Instr {
    match layer.conv {
        Some(conv) => Instr::ConvForward {
            x,
            w,
            y,
            rows,
            conv,
        },
        None => Instr::LinearForward {
            x,
            w,
            y,
            rows,
            inputs: layer.inputs,
            outputs: layer.outputs,
        },
    }
}

/// `layer`'s weight gradient from `dy` and its input `x`.
fn weight_gradient(layer: &Layer, dy: Slot, x: Slot, dw: Slot, rows: u64) -> Instr {
    match layer.conv {
        Some(conv) => Instr::ConvWeightGradient {
            dy,
            x,
            dw,
            rows,
            conv,
        },
        None => Instr::WeightGradient {
            dy,
            x,
            dw,
            rows,
            inputs: layer.inputs,
            outputs: layer.outputs,
        },
    }
}

/// `layer`'s input gradient from `dy` and its weights `w`.
fn input_gradient(layer: &Layer, dy: Slot, w: Slot, dx: Slot, rows: u64) -> Instr {
    match layer.conv {
        Some(conv) => Instr::ConvInputGradient {
            dy,
            w,
            dx,
            rows,
            conv,
        },
        None => Instr::InputGradient {
            dy,
            w,
            dx,
            rows,
            inputs: layer.inputs,
            outputs: layer.outputs,
        },
    }
}

/// `layer`'s bias added to `pre`, then `activation` into `post` when given.
fn bias_activation(
    layer: &Layer,
    pre: Slot,
    bias: Slot,
    post: Option<Slot>,
    rows: u64,
    activation: Activation,
) -> Instr {
    Instr::BiasActivation {
        pre,
        bias,
        post,
        rows,
        cols: layer.biases(),
        spatial: layer.spatial(),
        activation,
    }
}

/// `layer`'s bias gradient from `dy`.
fn bias_gradient(layer: &Layer, dy: Slot, db: Slot, rows: u64) -> Instr {
    Instr::BiasGradient {
        dy,
        db,
        rows,
        cols: layer.biases(),
        spatial: layer.spatial(),
    }
}

/// One parameter buffer and what the optimizer keeps for it.
#[derive(Debug, Clone, Copy)]
struct Tensor {
    slot: Slot,
    state: OptimizerState<Slot>,
    len: u64,
}

/// One layer's persistent buffers.
struct Parameters {
    weight: Slot,
    bias: Slot,
    /// Batch norm's scale (its shift is `bias`) and running statistics, when normalized.
    norm: Option<NormParameters>,
    /// The shortcut's convolution weights and batch norm, when it has them.
    projection: Option<(Slot, NormParameters)>,
    /// Every parameter in PyTorch's order, each with its optimizer state.
    tensors: Vec<Tensor>,
}

/// autocast's half copies of one layer's parameters, in a mixed precision: its weights, its
/// bias unless batch norm's (autocast leaves batch norm alone), its shortcut's convolution
/// weights.
#[derive(Debug, Clone, Copy)]
struct Casts {
    weight: Slot,
    bias: Option<Slot>,
    projection: Option<Slot>,
}

/// What [`Plan::allocate_parameters`] allocated.
#[derive(Default)]
struct Kept {
    layers: Vec<Parameters>,
    /// headroom's step: every gradient, kept.
    gradients: Vec<(Slot, u64)>,
    /// headroom's mixed step: the half copies, kept.
    casts: Vec<Casts>,
}

impl Plan {
    /// The training step at `batch_size` as this plan's framework runs it; `None` when a
    /// buffer's size passes `u64`.
    /// Its synthetic batch and initial parameters come from `seed`.
    pub fn program(&self, batch_size: u64, seed: u64) -> Option<Program> {
        match self.framework {
            Framework::Pytorch => self.pytorch_program(batch_size, seed),
            Framework::Headroom => self.headroom_program(batch_size, seed),
        }
    }

    /// The parameters and optimizer state of every layer: per layer its weights, batch norm's
    /// scales, biases and running statistics, its shortcut's convolution weights, batch norm
    /// scales, biases and running statistics, then the state of each parameter. headroom's step
    /// also keeps each layer's gradients (after its parameters) and, when mixed, the half copies
    /// of [`Casts`] (after its state).
    fn allocate_parameters(&self, b: &mut Builder) -> Kept {
        let (master, compute) = (self.precision.master(), self.precision.compute());
        let states = self.optimizer.state_per_parameter();
        let headroom = self.framework == Framework::Headroom;
        let mut kept = Kept::default();
        for layer in &self.layers {
            // A batch norm's scale, shift and running statistics, in PyTorch's order.
            let norm = |b: &mut Builder| {
                let channels = layer.biases();
                NormParameters {
                    scale: b.value(Part::Parameters, channels, master),
                    bias: b.value(Part::Parameters, channels, master),
                    running: RunningStatistics {
                        mean: b.value(Part::Parameters, channels, master),
                        var: b.value(Part::Parameters, channels, master),
                        steps: b.alloc(Part::Parameters, 1, Element::Index),
                    },
                }
            };
            let weight = b.value(Part::Parameters, layer.weights(), master);
            let (bias, norm_params) = match layer.norm {
                true => {
                    let params = norm(b);
                    (params.bias, Some(params))
                }
                false => (b.value(Part::Parameters, layer.biases(), master), None),
            };
            let projection = layer.projection().map(|conv| {
                let weight = b.value(Part::Parameters, conv.weights(), master);
                (weight, norm(b))
            });
            let lengths = layer.parameter_lengths();
            if headroom {
                for &len in &lengths {
                    kept.gradients
                        .push((b.value(Part::Gradients, len, master), len));
                }
            }
            let own = [Some(weight), norm_params.map(|n| n.scale), Some(bias)];
            let shortcut = projection.map(|(w, n)| [w, n.scale, n.bias]);
            let slots = own
                .into_iter()
                .flatten()
                .chain(shortcut.into_iter().flatten());
            let tensors = slots
                .zip(lengths)
                .map(|(slot, len)| {
                    let mut state = (0..states).map(|_| b.value(Part::OptimizerState, len, master));
                    let state = match states {
                        0 => OptimizerState::Sgd,
                        1 => OptimizerState::Momentum {
                            velocity: state.next().expect("one"),
                        },
                        _ => OptimizerState::Adam {
                            m: state.next().expect("two"),
                            v: state.next().expect("two"),
                        },
                    };
                    Tensor { slot, state, len }
                })
                .collect();
            if headroom && self.precision.is_mixed() {
                kept.casts.push(Casts {
                    weight: b.value(Part::Parameters, layer.weights(), compute),
                    bias: (!layer.norm).then(|| b.value(Part::Parameters, layer.biases(), compute)),
                    projection: layer
                        .projection()
                        .map(|conv| b.value(Part::Parameters, conv.weights(), compute)),
                });
            }
            kept.layers.push(Parameters {
                weight,
                bias,
                norm: norm_params,
                projection,
                tensors,
            });
        }
        kept
    }

    /// Initial weights, scales and biases, then the synthetic batch and its labels, from
    /// `seed`'s streams. Batch norm's scales start uniform in `[-1, 1)` where PyTorch starts
    /// them at 1, and its shifts as biases do: a step's memory and work do not depend on them.
    fn fill(
        &self,
        b: &mut Builder,
        layers: &[Parameters],
        (inputs, labels): (Slot, Slot),
        rows: u64,
        seed: u64,
    ) {
        for (i, (layer, params)) in self.layers.iter().zip(layers).enumerate() {
            let scale = synthetic::init_scale(layer.fan_in());
            let mut fill = |out, len, stream, scale| {
                b.push(Instr::FillUniform {
                    out,
                    len,
                    key: synthetic::stream_key(seed, stream),
                    scale,
                })
            };
            fill(
                params.weight,
                layer.weights(),
                synthetic::weight_stream(i),
                scale,
            );
            if let Some(norm) = params.norm {
                fill(norm.scale, layer.scales(), synthetic::scale_stream(i), 1.0);
            }
            fill(
                params.bias,
                layer.biases(),
                synthetic::bias_stream(i),
                scale,
            );
            if let (Some(conv), Some((weight, norm))) = (layer.projection(), params.projection) {
                let stream = |part| synthetic::shortcut_stream(i, part);
                let scale = synthetic::init_scale(conv.fan_in());
                fill(weight, conv.weights(), stream(0), scale);
                fill(norm.scale, conv.out_channels, stream(1), 1.0);
                fill(norm.bias, conv.out_channels, stream(2), scale);
            }
        }
        let features = self.input_features();
        b.push(Instr::FillUniform {
            out: inputs,
            len: rows * features,
            key: synthetic::stream_key(seed, synthetic::INPUT_STREAM),
            scale: 1.0,
        });
        b.push(Instr::FillLabels {
            labels,
            inputs,
            rows,
            features,
            classes: self.num_classes(),
        });
    }

    /// The optimizer's update of every parameter, after the overflow check under loss scaling.
    fn update(
        &self,
        b: &mut Builder,
        layers: &[Parameters],
        gradients: &[(Slot, u64)],
        overflow: Option<Slot>,
    ) {
        if let Some(flag) = overflow {
            b.push(Instr::CheckOverflow {
                gradients: gradients.to_vec(),
                flag,
            });
        }
        let tensors = layers.iter().flat_map(|params| &params.tensors);
        for (tensor, &(grad, _)) in tensors.zip(gradients) {
            b.push(Instr::OptimizerStep {
                param: tensor.slot,
                grad,
                state: tensor.state,
                len: tensor.len,
            });
        }
    }

    /// headroom's own step: every buffer allocated before the first step, in this order: per
    /// layer its parameters, their gradients, optimizer state and, when mixed, the half copies
    /// of weights and biases; the inputs, the labels and, when mixed, the half copy of the
    /// inputs; each hidden layer's pre-activation (with batch norm, the convolution's output,
    /// then batch norm's output and statistics) and post-activation (and, with pooling after
    /// it, the pooled output and the maxima's places; with dropout after it, dropout's output
    /// and mask); the logits (overwritten by their gradient), when mixed their f32 copy; the
    /// per-sample loss, the backward scratch, the one-value mean loss and, with loss scaling,
    /// the one-value overflow flag.
    fn headroom_program(&self, rows: u64, seed: u64) -> Option<Program> {
        let per_row = |width: u64| rows.checked_mul(width);
        let (master, compute) = (self.precision.master(), self.precision.compute());
        let mixed = self.precision.is_mixed();
        let mut b = Builder::new();
        let Kept {
            layers,
            gradients,
            casts,
        } = self.allocate_parameters(&mut b);
        let features = per_row(self.input_features())?;
        let inputs = b.value(Part::BatchData, features, master);
        let labels = b.alloc(Part::BatchData, rows, Element::Label);
        let inputs_cast = mixed.then(|| b.value(Part::BatchData, features, compute));
        let mut hidden = Vec::new();
        let mut normed = Vec::new();
        let mut projected = Vec::new();
        // Per block's first layer, where the gradient its shortcut carries waits: the
        // identity's is the gradient of batch norm's output itself; a projection's is written
        // by the projection's backward.
        let mut pending = vec![None; self.layers.len()];
        let mut pooled = Vec::new();
        let mut dropped = Vec::new();
        for (i, layer) in self.layers[..self.layers.len() - 1].iter().enumerate() {
            let elements = per_row(layer.outputs)?;
            let pre = b.value(Part::Activations, elements, compute);
            let norm = Normalized::allocate_for(&mut b, layer, rows, compute)?;
            normed.push(norm);
            hidden.push((pre, b.value(Part::Activations, elements, compute)));
            let projection = Projected::allocate(&mut b, layer, rows, compute)?;
            projected.push(projection);
            if let Some(shortcut) = layer.shortcut {
                pending[shortcut.from] = Some(match projection {
                    Some(_) => {
                        let inputs = per_row(self.layers[shortcut.from].inputs)?;
                        b.value(Part::Activations, inputs, compute)
                    }
                    None => norm.expect("a residual block ends in batch norm").output,
                });
            }
            pooled.push(match layer.pool {
                Some(pool) => Some(Pooled::allocate(&mut b, rows, pool, compute)?),
                None => None,
            });
            dropped.push(
                self.dropout_after(i)
                    .map(|p| Dropped::allocate(&mut b, elements, compute, p)),
            );
        }
        let classes = self.num_classes();
        let logits = b.value(Part::Activations, per_row(classes)?, compute);
        let logits_f32 = mixed.then(|| b.value(Part::Activations, rows * classes, Storage::F32));
        let row_loss = b.value(Part::Activations, rows, Storage::F32);
        let scratch = match self.scratch_width() {
            0 => None,
            width => Some(b.value(Part::Activations, per_row(width)?, compute)),
        };
        let loss_sum = b.value(Part::Activations, 1, Storage::F32);
        let overflow = self
            .precision
            .scales_loss()
            .then(|| b.value(Part::Activations, 1, Storage::F32));
        self.fill(&mut b, &layers, (inputs, labels), rows, seed);

        b.enter(Moment::Forward);
        for ((layer, params), cast) in self.layers.iter().zip(&layers).zip(&casts) {
            b.push(convert(params.weight, cast.weight, layer.weights()));
            if let Some(bias) = cast.bias {
                b.push(convert(params.bias, bias, layer.biases()));
            }
            if let (Some(to), Some((from, _)), Some(conv)) =
                (cast.projection, params.projection, layer.projection())
            {
                b.push(convert(from, to, conv.weights()));
            }
        }
        if let Some(cast) = inputs_cast {
            b.push(convert(inputs, cast, features));
        }
        let operands = |i: usize| match casts.get(i) {
            Some(cast) => (cast.weight, cast.bias.unwrap_or(layers[i].bias)),
            None => (layers[i].weight, layers[i].bias),
        };
        let projection_weight = |i: usize| {
            casts
                .get(i)
                .and_then(|cast| cast.projection)
                .or(layers[i].projection.map(|(weight, _)| weight))
                .expect("a projected shortcut has weights")
        };
        let last = self.layers.len() - 1;
        let input_of = |i: usize| match i {
            0 => inputs_cast.unwrap_or(inputs),
            _ => layer_input(&hidden, &pooled, &dropped, i),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let (weight, bias) = operands(i);
            if let Some(d) = i.checked_sub(1).and_then(|h| dropped[h]) {
                b.push(d.forward(hidden[i - 1].1, seed, i - 1, rows * layer.inputs));
            }
            let (output, post) = match i < last {
                true => (hidden[i].0, Some(hidden[i].1)),
                false => (logits, None),
            };
            b.push(product(layer, input_of(i), weight, output, rows));
            let residual = layer.shortcut.map(|shortcut| {
                let x = input_of(shortcut.from);
                match projected[i] {
                    Some(p) => {
                        let params = layers[i].projection.expect("projected").1;
                        for instr in p.forward(x, projection_weight(i), params, rows) {
                            b.push(instr);
                        }
                        p.norm.output
                    }
                    None => x,
                }
            });
            b.push(match (normed.get(i).copied().flatten(), layers[i].norm) {
                (Some(n), Some(params)) => {
                    let post = post.map(|slot| (slot, self.activation));
                    n.forward(output, params, (residual, n.output), post)
                }
                _ => bias_activation(layer, output, bias, post, rows, self.activation),
            });
            if let Some(p) = pooled.get(i).copied().flatten() {
                b.push(p.forward(hidden[i].1, rows));
            }
        }
        let len = rows * classes;
        match logits_f32 {
            Some(wide) => {
                b.push(convert(logits, wide, len));
                b.push(cross_entropy(wide, labels, row_loss, rows, classes));
                b.push(Instr::Convert {
                    from: wide,
                    to: logits,
                    len,
                    scale: Scale::Loss,
                });
            }
            None => b.push(cross_entropy(logits, labels, row_loss, rows, classes)),
        }

        b.enter(Moment::Backward);
        let first_gradient = first_gradients(&self.layers);
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let grads = &gradients[first_gradient[i]..first_gradient[i + 1]];
            if let Some(d) = dropped.get(i).copied().flatten() {
                b.push(d.backward(
                    scratch.expect("hidden layers have a scratch"),
                    rows * layer.outputs,
                ));
            }
            let norm = normed.get(i).copied().flatten();
            if i < last {
                let scratch = scratch.expect("hidden layers have a scratch");
                // The pooling's backward writes the activation's gradient over its output,
                // which the next layer no longer reads (it read the pooled output).
                let grad_post = match pooled[i] {
                    Some(p) => {
                        b.push(p.backward(scratch, hidden[i].1, rows));
                        hidden[i].1
                    }
                    None => scratch,
                };
                b.push(Instr::ActivationBackward {
                    grad_post,
                    pre: norm.map_or(hidden[i].0, |n| n.output),
                    len: rows * layer.outputs,
                    activation: self.activation,
                });
                // A projected shortcut's backward: its batch norm's writes over its output, read
                // by now; its gradients are the layer's last three.
                if let (Some(p), Some(n), Some(shortcut)) = (projected[i], norm, layer.shortcut) {
                    let (weight, params) = layers[i].projection.expect("projected");
                    let [dw, dscale, dbias] = [3, 2, 1].map(|back| grads[grads.len() - back].0);
                    let x = input_of(shortcut.from);
                    b.push(p.norm.backward(
                        n.output,
                        p.output,
                        params,
                        p.norm.output,
                        (dscale, dbias),
                    ));
                    b.push(Instr::ConvWeightGradient {
                        dy: p.norm.output,
                        x,
                        dw,
                        rows,
                        conv: p.conv,
                    });
                    if let Some(dx) = pending[shortcut.from] {
                        let w = casts.get(i).and_then(|c| c.projection).unwrap_or(weight);
                        b.push(Instr::ConvInputGradient {
                            dy: p.norm.output,
                            w,
                            dx,
                            rows,
                            conv: p.conv,
                        });
                    }
                }
                // Batch norm's backward writes its input's gradient over the activation's
                // output, read by now.
                if let (Some(n), Some(params)) = (norm, layers[i].norm) {
                    b.push(n.backward(
                        n.output,
                        hidden[i].0,
                        params,
                        hidden[i].1,
                        (grads[1].0, grads[2].0),
                    ));
                }
            }
            let grad_out = match (i < last, norm) {
                (false, _) => logits,
                (true, Some(_)) => hidden[i].1,
                (true, None) => hidden[i].0,
            };
            b.push(weight_gradient(
                layer,
                grad_out,
                input_of(i),
                grads[0].0,
                rows,
            ));
            if norm.is_none() {
                b.push(bias_gradient(layer, grad_out, grads[1].0, rows));
            }
            if i > 0 {
                let scratch = scratch.expect("hidden layers have a scratch");
                b.push(input_gradient(
                    layer,
                    grad_out,
                    operands(i).0,
                    scratch,
                    rows,
                ));
                if let Some(from) = pending[i] {
                    b.push(Instr::Accumulate {
                        from,
                        into: scratch,
                        len: rows * layer.inputs,
                    });
                }
            }
        }

        b.enter(Moment::Optimizer);
        self.update(&mut b, &layers, &gradients, overflow);
        Some(b.finish(Ending {
            batch_size: rows,
            parameters: parameter_slots(&layers),
            gradients,
            inputs: (inputs, labels),
            loss: (row_loss, loss_sum),
            scales_loss: overflow.is_some(),
        }))
    }

    /// PyTorch's step for the same model, as its autograd and `foreach` optimizers allocate and
    /// free (the module doc says what is held where headroom's kernels need less). The batch is
    /// generated once, in setup, and kept: PyTorch holds a new batch for the whole of each step,
    /// so the peak is the same. Per-sample losses (4 bytes a sample) are headroom's own; PyTorch's
    /// labels are int64 where headroom's are 4 bytes; scalars (the loss, its gradient) are left
    /// out.
    fn pytorch_program(&self, rows: u64, seed: u64) -> Option<Program> {
        let per_row = |width: u64| rows.checked_mul(width);
        let (master, compute) = (self.precision.master(), self.precision.compute());
        let mixed = self.precision.is_mixed();
        let mut b = Builder::new();
        let layers = self.allocate_parameters(&mut b).layers;
        let features = per_row(self.input_features())?;
        // The loader delivers f32; bf16-true casts the batch and lets the f32 one go.
        let loaded = b.value(Part::BatchData, features, Storage::F32);
        let labels = b.alloc(Part::BatchData, rows, Element::Label);
        let classes = self.num_classes();
        let row_loss = b.value(Part::Activations, rows, Storage::F32);
        let loss_sum = b.value(Part::Activations, 1, Storage::F32);
        let overflow = self
            .precision
            .scales_loss()
            .then(|| b.value(Part::Activations, 1, Storage::F32));
        self.fill(&mut b, &layers, (loaded, labels), rows, seed);
        let inputs = if master == Storage::F32 {
            loaded
        } else {
            let cast = b.value(Part::BatchData, features, master);
            b.push(convert(loaded, cast, features));
            b.free(loaded);
            cast
        };

        b.enter(Moment::Forward);
        let last = self.layers.len() - 1;
        let mut casts: Vec<Casts> = Vec::new();
        let mut inputs_cast = None;
        // Per hidden layer: the product (kept for gelu's or batch norm's backward) and the
        // activation, what the activation read (the product, batch norm's output or a block's
        // sum), batch norm and a block's projected shortcut before it, and the pooling or
        // dropout after it.
        let mut hidden: Vec<(Slot, Slot)> = Vec::new();
        let mut activation_inputs: Vec<Slot> = Vec::new();
        let mut normed: Vec<Option<Normalized>> = Vec::new();
        let mut projected: Vec<Option<Projected>> = Vec::new();
        let mut pooled: Vec<Option<Pooled>> = Vec::new();
        let mut dropped: Vec<Option<Dropped>> = Vec::new();
        let mut logits = None;
        for (i, (layer, params)) in self.layers.iter().zip(&layers).enumerate() {
            let (weight, bias) = if mixed {
                // Autocast casts a layer's bias, then its weights; batch norm runs on its own
                // (f32) parameters.
                let bias = (!layer.norm).then(|| {
                    let bias = b.value(Part::Parameters, layer.biases(), compute);
                    b.push(convert(params.bias, bias, layer.biases()));
                    bias
                });
                let weight = b.value(Part::Parameters, layer.weights(), compute);
                b.push(convert(params.weight, weight, layer.weights()));
                casts.push(Casts {
                    weight,
                    bias,
                    projection: None,
                });
                (weight, bias.unwrap_or(params.bias))
            } else {
                (params.weight, params.bias)
            };
            if i == 0 && mixed {
                let cast = b.value(Part::BatchData, features, compute);
                b.push(convert(inputs, cast, features));
                inputs_cast = Some(cast);
            }
            let first_input = inputs_cast.unwrap_or(inputs);
            let block_input = |from: usize,
                               hidden: &[(Slot, Slot)],
                               pooled: &[Option<Pooled>],
                               dropped: &[Option<Dropped>]| match from
            {
                0 => first_input,
                _ => layer_input(hidden, pooled, dropped, from),
            };
            let input = block_input(i, &hidden, &pooled, &dropped);
            let output = b.value(Part::Activations, per_row(layer.outputs)?, compute);
            b.push(product(layer, input, weight, output, rows));
            if i == last {
                b.push(bias_activation(
                    layer,
                    output,
                    bias,
                    None,
                    rows,
                    self.activation,
                ));
                logits = Some(output);
                continue;
            }
            // Batch norm writes its output, then the batch's statistics, and saves its input.
            let norm = Normalized::allocate_for(&mut b, layer, rows, compute)?;
            let len = rows * layer.outputs;
            let (projection, activated) = match (layer.shortcut, norm, params.norm) {
                (Some(shortcut), Some(n), Some(norm_params)) => {
                    // `body(x) + shortcut(x)`: the shortcut after the body (a projection: its
                    // weights' half copy when mixed, its output, its batch norm's), then the
                    // sum; neither addend is saved. The sum's batch norm is computed with the
                    // addition, so batch norm's own output is held unwritten for its bytes.
                    let x = block_input(shortcut.from, &hidden, &pooled, &dropped);
                    let projection = Projected::allocate(&mut b, layer, rows, compute)?;
                    let residual = match (projection, params.projection) {
                        (Some(p), Some((weight, projection_params))) => {
                            let weight = match mixed {
                                true => {
                                    let cast = b.value(Part::Parameters, p.conv.weights(), compute);
                                    b.push(convert(weight, cast, p.conv.weights()));
                                    casts[i].projection = Some(cast);
                                    cast
                                }
                                false => weight,
                            };
                            for instr in p.forward(x, weight, projection_params, rows) {
                                b.push(instr);
                            }
                            p.norm.output
                        }
                        _ => x,
                    };
                    let sum = b.value(Part::Activations, len, compute);
                    b.push(n.forward(output, norm_params, (Some(residual), sum), None));
                    b.free(n.output);
                    if let Some(p) = projection {
                        b.free(p.norm.output);
                    }
                    let activated = b.value(Part::Activations, len, compute);
                    b.push(Instr::Activation {
                        x: sum,
                        y: activated,
                        len,
                        activation: self.activation,
                    });
                    activation_inputs.push(sum);
                    (projection, activated)
                }
                (_, norm, norm_params) => {
                    let activated = b.value(Part::Activations, len, compute);
                    b.push(match (norm, norm_params) {
                        (Some(n), Some(norm_params)) => n.forward(
                            output,
                            norm_params,
                            (None, n.output),
                            Some((activated, self.activation)),
                        ),
                        _ => bias_activation(
                            layer,
                            output,
                            bias,
                            Some(activated),
                            rows,
                            self.activation,
                        ),
                    });
                    activation_inputs.push(norm.map_or(output, |n| n.output));
                    (None, activated)
                }
            };
            if self.activation != Activation::Gelu {
                // relu and tanh save their output, gelu its input.
                b.free(activation_inputs[i]);
            }
            // Pooling writes its output, then (max) its int64 indices, and saves its input.
            let p = match layer.pool {
                Some(pool) => Some(Pooled::allocate(&mut b, rows, pool, compute)?),
                None => None,
            };
            if let Some(p) = p {
                b.push(p.forward(activated, rows));
            }
            // Dropout (`native_dropout`, as PyTorch runs it on a GPU) writes its output, then a
            // one-byte mask, and saves only the mask: gelu's output goes once it is read.
            let d = self
                .dropout_after(i)
                .map(|p| Dropped::allocate(&mut b, rows * layer.outputs, compute, p));
            if let Some(d) = d {
                b.push(d.forward(activated, seed, i, rows * layer.outputs));
                if self.activation == Activation::Gelu {
                    b.free(activated);
                }
            }
            hidden.push((output, activated));
            normed.push(norm);
            projected.push(projection);
            pooled.push(p);
            dropped.push(d);
        }
        let logits = logits.expect("the last layer writes the logits");
        // The loss in f32 (bf16 under bf16-true): log_softmax of the logits, autocast's f32
        // copy of them first when mixed. Its output holds the gradient once the fused kernel
        // has run; PyTorch keeps the log-probabilities there until backward.
        let len = rows * classes;
        let loss_storage = if mixed { Storage::F32 } else { compute };
        let widened = mixed.then(|| {
            let wide = b.value(Part::Activations, len, Storage::F32);
            b.push(convert(logits, wide, len));
            wide
        });
        let log_probs = b.value(Part::Activations, len, loss_storage);
        b.push(convert(widened.unwrap_or(logits), log_probs, len));
        b.push(cross_entropy(log_probs, labels, row_loss, rows, classes));
        if let Some(wide) = widened {
            b.free(wide);
        }
        b.free(logits);
        // Leaving autocast frees its copies that backward does not need: every bias, and the
        // weights backward does not keep.
        for (i, cast) in casts.iter().enumerate() {
            if let Some(bias) = cast.bias {
                b.free(bias);
            }
            if !self.backward_keeps_weight_cast(i) {
                b.free(cast.weight);
            }
        }

        b.enter(Moment::Backward);
        // nll_loss's backward writes a dense one-hot gradient, and log_softmax's backward the
        // gradient of the logits from it; the fused kernel already wrote the latter.
        let one_hot = b.value(Part::Activations, len, loss_storage);
        let mut grad_out = b.value(Part::Activations, len, loss_storage);
        b.push(convert(log_probs, grad_out, len));
        b.free(one_hot);
        b.free(log_probs);
        if mixed {
            let half = b.value(Part::Activations, len, compute);
            b.push(Instr::Convert {
                from: grad_out,
                to: half,
                len,
                scale: Scale::Loss,
            });
            b.free(grad_out);
            grad_out = half;
        }
        let mut gradients = vec![Vec::new(); self.layers.len()];
        // Per block's first layer, the gradient its shortcut carried, waiting for the body's.
        let mut pending: Vec<Option<Slot>> = vec![None; self.layers.len()];
        let first_input = inputs_cast.unwrap_or(inputs);
        let input_of = |i: usize| match i {
            0 => first_input,
            _ => layer_input(&hidden, &pooled, &dropped, i),
        };
        // Mixed precision: the weights' gradients come out half and are cast to the f32
        // master's.
        let gradient_storage = if mixed { compute } else { master };
        let gradient_part = if mixed {
            Part::Activations
        } else {
            Part::Gradients
        };
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let weight = if mixed {
                casts[i].weight
            } else {
                layers[i].weight
            };
            // A block's shortcut: autograd runs the projection's branch (made after the body)
            // first, its batch norm's backward and then its convolution's, whose input
            // gradient waits for the body's; the identity's gradient waits as it is.
            let shortcut = layer.shortcut.filter(|_| i < last);
            let mut projection_gradients = Vec::new();
            if let (Some(shortcut), Some(p)) = (shortcut, projected.get(i).copied().flatten()) {
                let (master_weight, params) = layers[i].projection.expect("projected");
                let channels = p.conv.out_channels;
                let dxp = b.value(Part::Activations, rows * layer.outputs, compute);
                let dscale = b.value(Part::Gradients, channels, master);
                let dbias = b.value(Part::Gradients, channels, master);
                b.push(
                    p.norm
                        .backward(grad_out, p.output, params, dxp, (dscale, dbias)),
                );
                for slot in [p.output, p.norm.saved.mean, p.norm.saved.invstd] {
                    b.free(slot);
                }
                let w = casts
                    .get(i)
                    .and_then(|c| c.projection)
                    .unwrap_or(master_weight);
                let dx = b.value(
                    Part::Activations,
                    rows * self.layers[shortcut.from].inputs,
                    compute,
                );
                b.push(Instr::ConvInputGradient {
                    dy: dxp,
                    w,
                    dx,
                    rows,
                    conv: p.conv,
                });
                pending[shortcut.from] = Some(dx);
                let dw = b.value(gradient_part, p.conv.weights(), gradient_storage);
                b.push(Instr::ConvWeightGradient {
                    dy: dxp,
                    x: input_of(shortcut.from),
                    dw,
                    rows,
                    conv: p.conv,
                });
                b.free(dxp);
                let mut dw = (dw, p.conv.weights());
                if mixed {
                    b.free(w);
                    dw = widened_gradient(&mut b, dw);
                }
                projection_gradients = vec![dw, (dscale, channels), (dbias, channels)];
            }
            let identity = shortcut.filter(|s| s.projection.is_none());
            if let Some(shortcut) = identity {
                pending[shortcut.from] = Some(grad_out);
            }
            // Batch norm's backward writes its input's gradient, then its scale's and bias's
            // (as its parameters are stored), and lets what it saved go.
            let norm_gradients = match (normed.get(i).copied().flatten(), layers[i].norm) {
                (Some(n), Some(params)) => {
                    let dx = b.value(Part::Activations, rows * layer.outputs, compute);
                    let dscale = b.value(Part::Gradients, layer.scales(), master);
                    let dbias = b.value(Part::Gradients, layer.biases(), master);
                    b.push(n.backward(grad_out, hidden[i].0, params, dx, (dscale, dbias)));
                    if identity.is_none() {
                        b.free(grad_out);
                    }
                    for slot in [hidden[i].0, n.saved.mean, n.saved.invstd] {
                        b.free(slot);
                    }
                    grad_out = dx;
                    Some([(dscale, layer.scales()), (dbias, layer.biases())])
                }
                _ => None,
            };
            let input = input_of(i);
            let mut dx = (i > 0).then(|| {
                let dx = b.value(Part::Activations, rows * layer.inputs, compute);
                b.push(input_gradient(layer, grad_out, weight, dx, rows));
                dx
            });
            let dw = b.value(gradient_part, layer.weights(), gradient_storage);
            b.push(weight_gradient(layer, grad_out, input, dw, rows));
            let mut layer_gradients = vec![(dw, layer.weights())];
            if norm_gradients.is_none() {
                let db = b.value(gradient_part, layer.biases(), gradient_storage);
                b.push(bias_gradient(layer, grad_out, db, rows));
                layer_gradients.push((db, layer.biases()));
            }
            b.free(grad_out);
            if mixed && self.backward_keeps_weight_cast(i) {
                b.free(weight);
            }
            if let Some(cast) = inputs_cast.filter(|_| i == 0) {
                b.free(cast);
            }
            // What only this layer's backward kept, its input: the pooled output, dropout's
            // output, or (gelu saved the product) the activation's.
            if let Some(h) = i.checked_sub(1) {
                match (pooled[h], dropped[h]) {
                    (Some(p), _) => b.free(p.output),
                    (None, Some(d)) => b.free(d.output),
                    (None, None) if self.activation == Activation::Gelu => b.free(hidden[h].1),
                    (None, None) => {}
                }
            }
            // The body's gradient of a block's input is added, in place, to the one its
            // shortcut carried, and goes.
            if let (Some(body), Some(carried)) = (dx, pending[i]) {
                b.push(Instr::Accumulate {
                    from: body,
                    into: carried,
                    len: rows * layer.inputs,
                });
                b.free(body);
                dx = Some(carried);
            }
            if mixed {
                for gradient in &mut layer_gradients {
                    *gradient = widened_gradient(&mut b, *gradient);
                }
            }
            if let Some([dscale, dbias]) = norm_gradients {
                layer_gradients.insert(1, dscale);
                layer_gradients.push(dbias);
            }
            layer_gradients.extend(projection_gradients);
            gradients[i] = layer_gradients;
            if let Some(mut dx) = dx {
                let below = &self.layers[i - 1];
                if let Some(p) = pooled[i - 1] {
                    // The pooling's backward writes the gradient of its input, then lets the
                    // indices go; gelu's output was saved by the pooling alone.
                    let grad = b.value(Part::Activations, rows * below.outputs, compute);
                    b.push(p.backward(dx, grad, rows));
                    b.free(dx);
                    if let Some(indices) = p.indices {
                        b.free(indices);
                    }
                    if self.activation == Activation::Gelu {
                        b.free(hidden[i - 1].1);
                    }
                    dx = grad;
                }
                if let Some(d) = dropped[i - 1] {
                    // native_dropout_backward writes a new gradient, then lets the mask go.
                    let len = rows * layer.inputs;
                    let grad = b.value(Part::Activations, len, compute);
                    b.push(convert(dx, grad, len));
                    b.push(d.backward(grad, len));
                    b.free(dx);
                    b.free(d.mask);
                    dx = grad;
                }
                let saved = match self.activation {
                    Activation::Gelu => activation_inputs[i - 1],
                    _ => hidden[i - 1].1,
                };
                let len = rows * below.outputs;
                let grad = b.value(Part::Activations, len, compute);
                b.push(Instr::ActivationGradient {
                    grad: dx,
                    saved,
                    out: grad,
                    len,
                    activation: self.activation,
                });
                b.free(dx);
                b.free(saved);
                grad_out = grad;
            }
        }

        b.enter(Moment::Optimizer);
        // Adam's foreach update computes `sqrt(v)` of every parameter into a list of new tensors
        // before it applies the update; the fused kernel needs none, and the probe holds their
        // bytes while it updates.
        let gradients: Vec<(Slot, u64)> = gradients.into_iter().flatten().collect();
        let held: Vec<Slot> = match self.optimizer.state_per_parameter() {
            2 => gradients
                .iter()
                .map(|&(_, len)| b.value(Part::OptimizerState, len, master))
                .collect(),
            _ => Vec::new(),
        };
        self.update(&mut b, &layers, &gradients, overflow);
        for slot in held.into_iter().rev() {
            b.free(slot);
        }
        // zero_grad(set_to_none=True).
        for &(slot, _) in &gradients {
            b.free(slot);
        }
        Some(b.finish(Ending {
            batch_size: rows,
            parameters: parameter_slots(&layers),
            gradients,
            inputs: (inputs, labels),
            loss: (row_loss, loss_sum),
            scales_loss: overflow.is_some(),
        }))
    }
}

/// Where each layer's gradients begin among all the parameters' (one past the last at the end).
fn first_gradients(layers: &[Layer]) -> Vec<usize> {
    std::iter::once(0)
        .chain(layers.iter().scan(0, |end, layer| {
            *end += layer.parameter_lengths().len();
            Some(*end)
        }))
        .collect()
}

/// A half gradient `(slot, len)` cast to a new f32 one, the half one let go: what autocast's
/// cast of a weight does to its gradient in backward.
fn widened_gradient(b: &mut Builder, (slot, len): (Slot, u64)) -> (Slot, u64) {
    let full = b.value(Part::Gradients, len, Storage::F32);
    b.push(convert(slot, full, len));
    b.free(slot);
    (full, len)
}

/// What layer `i` (past the first) reads: the layer below's pooled output, its dropout's output,
/// or its activation.
fn layer_input(
    hidden: &[(Slot, Slot)],
    pooled: &[Option<Pooled>],
    dropped: &[Option<Dropped>],
    i: usize,
) -> Slot {
    match (pooled[i - 1], dropped[i - 1]) {
        (Some(p), _) => p.output,
        (None, Some(d)) => d.output,
        (None, None) => hidden[i - 1].1,
    }
}

fn convert(from: Slot, to: Slot, len: u64) -> Instr {
    Instr::Convert {
        from,
        to,
        len,
        scale: Scale::One,
    }
}

fn cross_entropy(logits: Slot, labels: Slot, row_loss: Slot, rows: u64, classes: u64) -> Instr {
    Instr::SoftmaxCrossEntropy {
        logits,
        labels,
        row_loss,
        rows,
        classes,
    }
}

fn parameter_slots(layers: &[Parameters]) -> Vec<(Slot, u64)> {
    layers
        .iter()
        .flat_map(|p| &p.tensors)
        .map(|t| (t.slot, t.len))
        .collect()
}

/// What an optimizer keeps per parameter buffer. The variant decides the update kernel and its
/// arguments, so the two cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerState<F> {
    /// Plain SGD keeps nothing.
    Sgd,
    /// Momentum's velocity.
    Momentum {
        /// The running velocity.
        velocity: F,
    },
    /// Adam's (and AdamW's) moments.
    Adam {
        /// First moment.
        m: F,
        /// Second moment.
        v: F,
    },
}

impl<F> OptimizerState<F> {
    /// The state's buffers, in allocation order.
    pub fn buffers(&self) -> Vec<&F> {
        match self {
            OptimizerState::Sgd => vec![],
            OptimizerState::Momentum { velocity } => vec![velocity],
            OptimizerState::Adam { m, v } => vec![m, v],
        }
    }
}

impl Plan {
    /// Whether PyTorch's backward keeps autocast's half copy of layer `i`'s weights (freed
    /// after that layer's backward) rather than letting it go when autocast ends: every layer
    /// but a linear first one, whose input needs no gradient, so its product saves no weights;
    /// a convolution saves its weights whatever needs a gradient.
    fn backward_keeps_weight_cast(&self, i: usize) -> bool {
        i > 0 || self.layers[i].conv.is_some()
    }
}
