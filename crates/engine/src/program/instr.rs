//! The instruction set of a step: allocations and frees, and the kernels of each family
//! (`crates/devices/kernels/*.cu`, mirrored by the host device). Sizes are in elements; `rows` is
//! the batch size, or the batch times the positions a layer is applied at.

use super::geometry::{
    AdaptivePooling, Attention, BatchedProduct, Convolution, HeadGroups, Nonlinearity,
    NormalizedRows, Planes, Pooling, Rotary,
};
use crate::memory::Buffer;
pub use crate::memory::Moment;

/// A buffer of a program: where an executor keeps it between its allocation and its free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(pub usize);

/// What a conversion multiplies by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// A plain cast.
    One,
    /// The loss scale in force (`16-mixed`), 1 without loss scaling.
    Loss,
    /// A constant (eager attention's `* head_dim ** -0.5`).
    By(f32),
}

/// Which tensor an activation saved for its backward, as PyTorch's autograd saves it: its
/// output (relu, tanh, sigmoid, and the in-place ones) or its input (gelu, silu, leaky relu,
/// relu6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SavedAs {
    /// The activation's input.
    Input,
    /// The activation's output.
    Output,
}

/// Batch norm's learnt scale and shift (`affine`), or their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Affine<F> {
    /// Per channel, the scale (`weight`).
    pub scale: F,
    /// Per channel, the shift (`bias`).
    pub shift: F,
}

/// What batch norm's forward saves for its backward: per channel, f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStatistics<F> {
    /// The batch's mean.
    pub mean: F,
    /// `1 / sqrt(variance + eps)`, the biased variance.
    pub invstd: F,
}

/// Layer norm's learnt scale and, unless `bias=False`, shift (`elementwise_affine`), or their
/// gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerAffine<F> {
    /// Per feature, the scale (`weight`).
    pub scale: F,
    /// Per feature, the shift (`bias`).
    pub shift: Option<F>,
}

/// What layer norm's forward saves for its backward: per row, f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowStatistics<F> {
    /// The row's mean; none for RMS norm, which does not centre the rows.
    pub mean: Option<F>,
    /// `1 / sqrt(variance + eps)`, the biased variance.
    pub rstd: F,
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

/// What attention's forward saves for its backward: its inputs, its output and the f32
/// log-sum-exp per query row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSaved<F> {
    /// The queries.
    pub q: F,
    /// The keys.
    pub k: F,
    /// The values.
    pub v: F,
    /// The output.
    pub o: F,
    /// The log-sum-exp.
    pub lse: F,
}

/// The gradients attention's backward writes, or their buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionGradients<F> {
    /// The queries'.
    pub dq: F,
    /// The keys'.
    pub dk: F,
    /// The values'.
    pub dv: F,
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

/// One instruction of a program.
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
    /// fill.cu: `out[i] = uniform(key, i) * scale`.
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
    /// fill.cu: the labels of the synthetic task.
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
    /// fill.cu: token ids (int64) or labels (u32), uniform in `[0, vocab)` from the stream `key`
    /// ([`crate::synthetic::token`]).
    FillTokens {
        /// Written: int64 ids or u32 labels.
        out: Slot,
        /// Tokens.
        len: u64,
        /// The stream.
        key: u64,
        /// Ids are below it.
        vocab: u64,
    },
    /// embedding.cu: `y[i, :] = weight[ids[i], :]`.
    EmbeddingForward {
        /// The token ids (int64).
        ids: Slot,
        /// The table, `vocab x dim`.
        weight: Slot,
        /// Written, as the table is stored.
        y: Slot,
        /// Tokens.
        tokens: u64,
        /// Values a token.
        dim: u64,
    },
    /// embedding.cu: the table's gradient, `dw[v, :] = sum of dy[i, :] over the tokens i with
    /// id v` (none for `padding`).
    EmbeddingBackward {
        /// The gradient of the looked-up rows.
        dy: Slot,
        /// The token ids (int64).
        ids: Slot,
        /// Written whole: the table's gradient.
        dw: Slot,
        /// Tokens.
        tokens: u64,
        /// Values a token.
        dim: u64,
        /// Rows of the table.
        vocab: u64,
        /// The id whose row gets no gradient (`padding_idx`).
        padding: Option<u64>,
    },
    /// embedding.cu: a ViT's tokens, the class token's first: `out[n, 0, :] = class`,
    /// `out[n, 1 + t, c] = planes[n, c, t]`.
    PatchTokensForward {
        /// The convolution's output, `[rows, dim, tokens]`.
        planes: Slot,
        /// The class token, `dim` values.
        class: Slot,
        /// Written: `[rows, tokens + 1, dim]`.
        out: Slot,
        /// Samples.
        rows: u64,
        /// Patches a sample.
        tokens: u64,
        /// Values a token.
        dim: u64,
    },
    /// embedding.cu: `PatchTokensForward`'s backward: the planes' gradient, and the class
    /// token's summed over the samples.
    PatchTokensBackward {
        /// The gradient of the tokens.
        dout: Slot,
        /// Written: `[rows, dim, tokens]`.
        dplanes: Slot,
        /// Written: `dim` values.
        dclass: Slot,
        /// Samples.
        rows: u64,
        /// Patches a sample.
        tokens: u64,
        /// Values a token.
        dim: u64,
    },
    /// embedding.cu: `y[n, :] = x[n, 0, :]`.
    FirstTokenForward {
        /// `[rows, positions, dim]`.
        x: Slot,
        /// Written: `[rows, dim]`.
        y: Slot,
        /// Samples.
        rows: u64,
        /// Positions a sample.
        positions: u64,
        /// Values a position.
        dim: u64,
    },
    /// embedding.cu: `dx[n, 0, :] = dy[n, :]`, 0 elsewhere.
    FirstTokenBackward {
        /// `[rows, dim]`.
        dy: Slot,
        /// Written: `[rows, positions, dim]`.
        dx: Slot,
        /// Samples.
        rows: u64,
        /// Positions a sample.
        positions: u64,
        /// Values a position.
        dim: u64,
    },
    /// embedding.cu: `y[n, :] = mean over t of x[n, t, :]` (summed in f32).
    MeanTokensForward {
        /// `[rows, positions, dim]`.
        x: Slot,
        /// Written: `[rows, dim]`.
        y: Slot,
        /// Samples.
        rows: u64,
        /// Positions a sample.
        positions: u64,
        /// Values a position.
        dim: u64,
    },
    /// embedding.cu: `dx[n, t, :] = dy[n, :] / positions` at every position.
    MeanTokensBackward {
        /// `[rows, dim]`.
        dy: Slot,
        /// Written: `[rows, positions, dim]`.
        dx: Slot,
        /// Samples.
        rows: u64,
        /// Positions a sample.
        positions: u64,
        /// Values a position.
        dim: u64,
    },
    /// elementwise.cu: `to = from * scale`, rounded to `to`'s storage.
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
    /// elementwise.cu: `len` values from `from` at `from_offset` to `to` at `to_offset`, both
    /// of one storage (FSDP's shards into and out of its collectives' buffers).
    CopyRange {
        /// Read.
        from: Slot,
        /// Where the values read start.
        from_offset: u64,
        /// Written.
        to: Slot,
        /// Where the values written start.
        to_offset: u64,
        /// Elements.
        len: u64,
    },
    /// gemm.cu: `y = x * w^T`.
    LinearForward {
        /// `rows x inputs`.
        x: Slot,
        /// `outputs x inputs`.
        w: Slot,
        /// `rows x outputs`.
        y: Slot,
        /// Rows.
        rows: u64,
        /// Input width.
        inputs: u64,
        /// Output width.
        outputs: u64,
    },
    /// gemm.cu: `dw = dy^T * x`.
    WeightGradient {
        /// `rows x outputs`.
        dy: Slot,
        /// `rows x inputs`.
        x: Slot,
        /// `outputs x inputs`.
        dw: Slot,
        /// Rows.
        rows: u64,
        /// Input width.
        inputs: u64,
        /// Output width.
        outputs: u64,
    },
    /// gemm.cu: `dx = dy * w`.
    InputGradient {
        /// `rows x outputs`.
        dy: Slot,
        /// `outputs x inputs`.
        w: Slot,
        /// `rows x inputs`.
        dx: Slot,
        /// Rows.
        rows: u64,
        /// Input width.
        inputs: u64,
        /// Output width.
        outputs: u64,
    },
    /// elementwise.cu: `y[i, j, k] += bias[j]` over `rows x cols x spatial`.
    BiasAdd {
        /// Added to.
        y: Slot,
        /// The bias.
        bias: Slot,
        /// Rows.
        rows: u64,
        /// Biases: a linear layer's width, a convolution's output channels.
        cols: u64,
        /// Positions each bias is added at: 1, or a convolution's output height x width.
        spatial: u64,
    },
    /// elementwise.cu: `y = nonlinearity(x)` (`y` may be `x`: in place).
    Activation {
        /// Read.
        x: Slot,
        /// Written.
        y: Slot,
        /// Elements.
        len: u64,
        /// The function.
        nonlinearity: Nonlinearity,
    },
    /// elementwise.cu: `out = grad * nonlinearity'(...)` from what the activation saved.
    ActivationGradient {
        /// The gradient of the activation's output.
        grad: Slot,
        /// What the activation saved.
        saved: Slot,
        /// The gradient of its input, written.
        out: Slot,
        /// Elements.
        len: u64,
        /// The function.
        nonlinearity: Nonlinearity,
        /// Whether `saved` is the activation's input or its output.
        saved_as: SavedAs,
    },
    /// elementwise.cu: `out = a + b`.
    Add {
        /// Read.
        a: Slot,
        /// Read.
        b: Slot,
        /// Written.
        out: Slot,
        /// Elements.
        len: u64,
    },
    /// elementwise.cu: `out = a * b`.
    Multiply {
        /// Read.
        a: Slot,
        /// Read.
        b: Slot,
        /// Written.
        out: Slot,
        /// Elements.
        len: u64,
    },
    /// elementwise.cu: `y[i, j] = x[i, j] * scale[j]`: a learnt scale per feature (Hugging
    /// Face's RMS norm's weight), and that product's input gradient.
    ScaleFeatures {
        /// Read: `rows x features`.
        x: Slot,
        /// Read: `features`.
        scale: Slot,
        /// Written: `rows x features`.
        y: Slot,
        /// Rows.
        rows: u64,
        /// Features.
        features: u64,
    },
    /// elementwise.cu: `into += from`: two gradients of one tensor summed in place, or a
    /// residual block's in-place sum.
    Accumulate {
        /// Read.
        from: Slot,
        /// Added to.
        into: Slot,
        /// Elements.
        len: u64,
    },
    /// reduce.cu: `db[j] = sum_{i, k} dy[i, j, k]`.
    BiasGradient {
        /// `rows x cols x spatial`.
        dy: Slot,
        /// `cols`.
        db: Slot,
        /// Rows.
        rows: u64,
        /// Biases.
        cols: u64,
        /// Positions of each bias.
        spatial: u64,
    },
    /// conv.cu: `y = x (*) w`, a convolution of an NCHW batch (its bias added by
    /// [`Instr::BiasAdd`]).
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
    /// conv.cu: a convolution's input gradient `dx` from `dy` and the filters.
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
    /// conv.cu: a convolution's filter gradient `dw` from `dy` and its input.
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
    /// pool.cu: pooling `y` from `x`, and where each maximum was when it keeps the largest.
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
    /// pool.cu: pooling's backward, `dx` from `dy` (through the maxima's places for max pooling).
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
    /// pool.cu: adaptive average pooling.
    AdaptivePoolForward {
        /// Read.
        x: Slot,
        /// Written.
        y: Slot,
        /// Batch size.
        rows: u64,
        /// Its geometry.
        pool: AdaptivePooling,
    },
    /// pool.cu: adaptive average pooling's backward.
    AdaptivePoolBackward {
        /// The gradient of the pooled output.
        dy: Slot,
        /// The gradient of its input, written.
        dx: Slot,
        /// Batch size.
        rows: u64,
        /// Its geometry.
        pool: AdaptivePooling,
    },
    /// norm.cu: batch norm in training mode: per channel the batch's mean and
    /// `1 / sqrt(variance + eps)` (biased variance) into `saved`,
    /// `y = (x - mean) * invstd * scale + shift`, the running statistics moved towards the
    /// batch's by `momentum` (the unbiased variance) and their step count raised.
    BatchNormForward {
        /// Read.
        x: Slot,
        /// The learnt scale and shift, if affine (the parameters' storage).
        affine: Option<Affine<Slot>>,
        /// Written, as `x` is stored.
        y: Slot,
        /// Written: what backward reads.
        saved: BatchStatistics<Slot>,
        /// Updated.
        running: RunningStatistics<Slot>,
        /// The batch's shape.
        planes: Planes,
    },
    /// norm.cu: batch norm's backward: `dx`, and the gradients of its scale and shift, from `dy`,
    /// its input `x` and what forward saved.
    BatchNormBackward {
        /// The gradient of its output.
        dy: Slot,
        /// Its input.
        x: Slot,
        /// Its scale, if affine.
        scale: Option<Slot>,
        /// What forward saved.
        saved: BatchStatistics<Slot>,
        /// The gradient of its input, written, when needed.
        dx: Option<Slot>,
        /// The scale's and shift's gradients, written, if affine.
        affine: Option<Affine<Slot>>,
        /// The batch's shape.
        planes: Planes,
    },
    /// norm.cu: layer norm over the last dimension: per row its mean and
    /// `1 / sqrt(variance + eps)` (biased variance) into `saved`,
    /// `y = (x - mean) * rstd * scale + shift`; RMS norm where `saved` has no mean (the mean
    /// taken as 0: `rstd = 1 / sqrt(mean(x²) + eps)`).
    LayerNormForward {
        /// Read.
        x: Slot,
        /// The learnt scale and shift, if any (the parameters' storage).
        affine: Option<LayerAffine<Slot>>,
        /// Written, as `x` is stored.
        y: Slot,
        /// Written: what backward reads.
        saved: RowStatistics<Slot>,
        /// The batch's shape.
        rows: NormalizedRows,
    },
    /// norm.cu: layer norm's backward: `dx`, and the gradients of its scale and shift, from
    /// `dy`, its input `x` and what forward saved.
    LayerNormBackward {
        /// The gradient of its output.
        dy: Slot,
        /// Its input.
        x: Slot,
        /// Its scale, if any.
        scale: Option<Slot>,
        /// What forward saved.
        saved: RowStatistics<Slot>,
        /// The gradient of its input, written, when needed.
        dx: Option<Slot>,
        /// The scale's and shift's gradients, written, if it has them.
        affine: Option<LayerAffine<Slot>>,
        /// The batch's shape.
        rows: NormalizedRows,
    },
    /// attention.cu: `o = softmax(q k^T * scale, causal if asked) v`, and the f32 log-sum-exp of
    /// each query row's scores, which backward recomputes the softmax from.
    AttentionForward {
        /// The queries.
        q: Slot,
        /// The keys.
        k: Slot,
        /// The values.
        v: Slot,
        /// Written: the output, as the queries.
        o: Slot,
        /// Written: f32, `[batch, sequence, heads]`.
        lse: Slot,
        /// The shape.
        shape: Attention,
    },
    /// attention.cu: the gradients of the queries, keys and values from the output's, the
    /// scores recomputed tile by tile.
    AttentionBackward {
        /// What forward read and wrote: queries, keys, values, output, log-sum-exp.
        saved: AttentionSaved<Slot>,
        /// The gradient of the output.
        dout: Slot,
        /// Written: the queries', keys' and values' gradients.
        grads: AttentionGradients<Slot>,
        /// The shape.
        shape: Attention,
    },
    /// scores.cu: `c = a b` for every sample and head ([`BatchedProduct`]), all three in one
    /// storage (eager attention's `torch.matmul`s and their gradients).
    BatchedProduct {
        /// Read.
        a: Slot,
        /// Read.
        b: Slot,
        /// Written.
        c: Slot,
        /// The matrices and their layouts.
        shape: BatchedProduct,
    },
    /// scores.cu: `to = from`, minus infinity where a query row's key comes after it (the
    /// causal mask added, rounded to `to`'s storage), over `matrices` of `positions x
    /// positions`.
    CausalMask {
        /// Read.
        from: Slot,
        /// Written.
        to: Slot,
        /// Matrices (samples times heads).
        matrices: u64,
        /// Their side.
        positions: u64,
    },
    /// scores.cu: each row's softmax, `p = exp(x - max) / sum`, summed in f32 and stored in
    /// `p`'s storage (f32 for `F.softmax(x, dtype=torch.float32)`).
    SoftmaxRows {
        /// Read.
        x: Slot,
        /// Written.
        p: Slot,
        /// Rows.
        rows: u64,
        /// Values a row.
        cols: u64,
    },
    /// scores.cu: the softmax's backward, `dx = p (dp - sum_j p dp)` per row, from the saved
    /// `p` and `dp` (stored alike), rounded to `dx`'s storage.
    SoftmaxRowsBackward {
        /// The softmax's output.
        p: Slot,
        /// Its gradient.
        dp: Slot,
        /// Written.
        dx: Slot,
        /// Rows.
        rows: u64,
        /// Values a row.
        cols: u64,
    },
    /// scores.cu: key/value heads repeated for the query heads they serve ([`HeadGroups`]).
    RepeatHeads {
        /// Read: `[batch, positions, kv_heads, head_dim]`.
        from: Slot,
        /// Written: `[batch, heads, positions, head_dim]`.
        to: Slot,
        /// The heads.
        shape: HeadGroups,
    },
    /// scores.cu: the repetition's backward, each key/value head's gradient summed over the
    /// query heads it served.
    SumHeadGroups {
        /// Read: `[batch, heads, positions, head_dim]`.
        from: Slot,
        /// Written: `[batch, positions, kv_heads, head_dim]`.
        to: Slot,
        /// The heads.
        shape: HeadGroups,
    },
    /// attention.cu: rotary position embedding, `y = x * cos + rotate_half(x) * sin`
    /// ([`Rotary`]); `y` may be stored wider than `x` (f32 tables under autocast promote it).
    RotaryForward {
        /// Read: queries or keys.
        x: Slot,
        /// Written.
        y: Slot,
        /// The shape and angles.
        shape: Rotary,
    },
    /// attention.cu: rotary embedding's backward, `dx = dy * cos + rotate_half^T(dy * sin)`,
    /// in `dx`'s storage.
    RotaryBackward {
        /// The gradient of the output.
        dy: Slot,
        /// Written: the gradient of the input.
        dx: Slot,
        /// The shape and angles.
        shape: Rotary,
    },
    /// dropout.cu: training-mode dropout: `mask[i]` keeps value `i` with probability `1 - p`,
    /// from the step's sub-stream of `key` ([`crate::synthetic::keeps`]); `y = x / (1 - p)`
    /// where kept, else 0.
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
    /// dropout.cu: dropout's backward: `dx = dy / (1 - p)` where the mask kept, else 0.
    DropoutBackward {
        /// The gradient of dropout's output.
        dy: Slot,
        /// What the forward kept.
        mask: Slot,
        /// The gradient of its input, written.
        dx: Slot,
        /// Elements.
        len: u64,
        /// Probability of dropping a value.
        p: f32,
    },
    /// loss.cu: per-sample losses, and the logits replaced by the gradient of the mean loss.
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
    /// reduce.cu: under loss scaling, whether any gradient overflowed (`flag` gathers the
    /// answer); the updates that follow are skipped if so.
    CheckOverflow {
        /// Every gradient, with its length.
        gradients: Vec<(Slot, u64)>,
        /// One value.
        flag: Slot,
    },
    /// optimizer.cu: one optimizer update of `param` from `grad`.
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
