//! The kernels a device provides, one trait per family, as `crates/devices/kernels/*.cu` and the
//! host device's modules have them: [`Fill`], [`Gemm`], [`Elementwise`], [`Reduce`], [`Conv`],
//! [`Pool`], [`Norm`], [`Lookup`], [`Attend`], [`Scores`], [`DropoutKernels`], [`Loss`] and
//! [`Optimizer`];
//! [`Kernels`] is all of
//! them and the device's clock.
//!
//! Matrices are row-major; `rows` is the batch size (times the positions a layer is applied
//! at). Every operation reads each buffer as its storage says, computes in f32, and rounds
//! what it stores to the storage of the buffer it writes (to nearest, ties to even). The
//! operands of a product share one storage.

use super::UpdateRule;
use crate::modules::activation::Nonlinearity;
use crate::modules::adaptive_avg_pool2d::AdaptivePooling;
use crate::modules::batch_norm::Planes;
use crate::modules::conv2d::Convolution;
use crate::modules::layer_norm::NormalizedRows;
use crate::modules::pooling::Pooling;
use crate::plan::Storage;
use crate::program::geometry::{Attention, BatchedProduct, HeadGroups, Rotary};
use crate::program::{
    Affine, AttentionGradients, AttentionSaved, BatchStatistics, LayerAffine, OptimizerState,
    RowStatistics, RunningStatistics, SavedAs,
};

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
    /// A device buffer of `i64` places of pooling maxima (and batch norm's step count).
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

/// fill.cu: the synthetic batch and first parameters.
pub trait Fill: Allocate {
    /// `out[i] = uniform(key, i) * scale`, the stream of [`crate::synthetic::uniform`].
    fn fill_uniform(
        &mut self,
        out: &mut Self::Values,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), Self::Error>;
    /// Labels of the learnable task of [`crate::synthetic::fill_labels`].
    fn fill_labels(
        &mut self,
        labels: &mut Self::U32,
        inputs: &Self::Values,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), Self::Error>;
    /// `ids[i] = token(key, i, vocab)`, the stream of [`crate::synthetic::token`], as int64.
    fn fill_token_ids(
        &mut self,
        ids: &mut Self::Index,
        len: u64,
        key: u64,
        vocab: u64,
    ) -> Result<(), Self::Error>;
    /// `labels[i] = token(key, i, classes)`, as u32: labels drawn, not computed.
    fn fill_token_labels(
        &mut self,
        labels: &mut Self::U32,
        len: u64,
        key: u64,
        classes: u64,
    ) -> Result<(), Self::Error>;
}

/// embedding.cu: looking token ids up in a table, and the table's gradient; a ViT's patch
/// tokens and the first token of each sample.
pub trait Lookup: Allocate {
    /// `out[n, 0, :] = class`, `out[n, 1 + t, c] = planes[n, c, t]` over `rows` samples of
    /// `tokens` patches of `dim` values.
    fn patch_tokens_forward(
        &mut self,
        planes: &Self::Values,
        class: &Self::Values,
        out: &mut Self::Values,
        rows: u64,
        tokens: u64,
        dim: u64,
    ) -> Result<(), Self::Error>;
    /// `dplanes[n, c, t] = dout[n, 1 + t, c]`; `dclass[c]` the sum of `dout[n, 0, c]` over the
    /// samples in order.
    #[allow(clippy::too_many_arguments)]
    fn patch_tokens_backward(
        &mut self,
        dout: &Self::Values,
        dplanes: &mut Self::Values,
        dclass: &mut Self::Values,
        rows: u64,
        tokens: u64,
        dim: u64,
    ) -> Result<(), Self::Error>;
    /// `y[n, :] = x[n, 0, :]` over `rows` samples of `positions x dim` values.
    fn first_token_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), Self::Error>;
    /// `dx[n, 0, :] = dy[n, :]`, every other position 0.
    fn first_token_backward(
        &mut self,
        dy: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), Self::Error>;
    /// `y[n, :] = mean over t of x[n, t, :]` over `rows` samples of `positions x dim` values.
    fn mean_tokens_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), Self::Error>;
    /// `dx[n, t, :] = dy[n, :] / positions` at every position.
    fn mean_tokens_backward(
        &mut self,
        dy: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), Self::Error>;
    /// `y[i, :] = weight[ids[i], :]` over `tokens` ids, `dim` values each.
    fn embedding_forward(
        &mut self,
        ids: &Self::Index,
        weight: &Self::Values,
        y: &mut Self::Values,
        tokens: u64,
        dim: u64,
    ) -> Result<(), Self::Error>;
    /// The whole `vocab x dim` gradient `dw`: zero, then `dy[i, :]` added into row `ids[i]` for
    /// every token in order (none into row `padding`), each sum rounded to `dw`'s storage.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &mut self,
        dy: &Self::Values,
        ids: &Self::Index,
        dw: &mut Self::Values,
        tokens: u64,
        dim: u64,
        vocab: u64,
        padding: Option<u64>,
    ) -> Result<(), Self::Error>;
}

/// attention.cu: scaled dot-product self-attention as the fused path trains it, keeping no
/// `sequence x sequence` buffer.
pub trait Attend: Allocate {
    /// `o = softmax(q k^T * scale, causal if asked) v`, and `lse` (f32) the log of each query
    /// row's softmax sum: `log(sum_j exp(s_ij))`.
    fn attention_forward(
        &mut self,
        q: &Self::Values,
        k: &Self::Values,
        v: &Self::Values,
        o: &mut Self::Values,
        lse: &mut Self::Values,
        shape: &Attention,
    ) -> Result<(), Self::Error>;
    /// The queries', keys' and values' gradients from the output's (`dout`), each probability
    /// recomputed as `exp(s_ij - lse_i)`; a key's gradients sum over the query heads sharing it.
    fn attention_backward(
        &mut self,
        saved: AttentionSaved<&Self::Values>,
        dout: &Self::Values,
        grads: AttentionGradients<&mut Self::Values>,
        shape: &Attention,
    ) -> Result<(), Self::Error>;
    /// Rotary position embedding: `y = x * cos + rotate_half(x) * sin` ([`Rotary`]).
    fn rotary_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        shape: &Rotary,
    ) -> Result<(), Self::Error>;
    /// Its backward: `dx = dy * cos + rotate_half^T(dy * sin)`.
    fn rotary_backward(
        &mut self,
        dy: &Self::Values,
        dx: &mut Self::Values,
        shape: &Rotary,
    ) -> Result<(), Self::Error>;
}

/// scores.cu: eager attention's kernels, the scores materialized as PyTorch's eager path
/// (`attn_implementation="eager"`) computes them.
pub trait Scores: Allocate {
    /// `c = a b` for every sample and head, the three in one storage ([`BatchedProduct`]).
    fn batched_product(
        &mut self,
        a: &Self::Values,
        b: &Self::Values,
        c: &mut Self::Values,
        shape: &BatchedProduct,
    ) -> Result<(), Self::Error>;
    /// `to = from` with minus infinity above each matrix's diagonal (a key after its query),
    /// over `matrices` of `positions x positions`, rounded to `to`'s storage.
    fn causal_mask(
        &mut self,
        from: &Self::Values,
        to: &mut Self::Values,
        matrices: u64,
        positions: u64,
    ) -> Result<(), Self::Error>;
    /// Each row's softmax into the f32 `p`.
    fn softmax_rows(
        &mut self,
        x: &Self::Values,
        p: &mut Self::Values,
        rows: u64,
        cols: u64,
    ) -> Result<(), Self::Error>;
    /// `dx = p (dp - sum_j p dp)` per row, `p` and `dp` f32, rounded to `dx`'s storage.
    fn softmax_rows_backward(
        &mut self,
        p: &Self::Values,
        dp: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        cols: u64,
    ) -> Result<(), Self::Error>;
    /// Key/value heads repeated for their query heads ([`HeadGroups`]).
    fn repeat_heads(
        &mut self,
        from: &Self::Values,
        to: &mut Self::Values,
        shape: &HeadGroups,
    ) -> Result<(), Self::Error>;
    /// Each key/value head's gradient summed over the query heads it served.
    fn sum_head_groups(
        &mut self,
        from: &Self::Values,
        to: &mut Self::Values,
        shape: &HeadGroups,
    ) -> Result<(), Self::Error>;
}

/// gemm.cu: the products of a linear layer. `x` is `rows x inputs`, `w` is `outputs x inputs`,
/// `y` is `rows x outputs`.
pub trait Gemm: Allocate {
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
}

/// elementwise.cu: biases, activations, sums and conversions.
pub trait Elementwise: Allocate {
    /// `y[i, j, k] += bias[j]` over `rows x cols x spatial`.
    fn bias_add(
        &mut self,
        y: &mut Self::Values,
        bias: &Self::Values,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), Self::Error>;
    /// `y = nonlinearity(x)`.
    fn activation_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        len: u64,
        nonlinearity: Nonlinearity,
    ) -> Result<(), Self::Error>;
    /// `y = nonlinearity(y)`, in place.
    fn activation_in_place(
        &mut self,
        y: &mut Self::Values,
        len: u64,
        nonlinearity: Nonlinearity,
    ) -> Result<(), Self::Error>;
    /// `out = grad * nonlinearity'(...)` from what the activation saved, its input or its
    /// output as `saved_as` says (relu' = `out > 0`, tanh' = `1 - out^2`, sigmoid' =
    /// `out (1 - out)`, leaky relu' = 1 where `out > 0`, else the slope, relu6' = `0 < out < 6`).
    #[allow(clippy::too_many_arguments)]
    fn activation_gradient(
        &mut self,
        grad: &Self::Values,
        saved: &Self::Values,
        out: &mut Self::Values,
        len: u64,
        nonlinearity: Nonlinearity,
        saved_as: SavedAs,
    ) -> Result<(), Self::Error>;
    /// `out = a + b`, rounded to `out`'s storage.
    fn add(
        &mut self,
        a: &Self::Values,
        b: &Self::Values,
        out: &mut Self::Values,
        len: u64,
    ) -> Result<(), Self::Error>;
    /// `out = a * b`, rounded to `out`'s storage.
    fn multiply(
        &mut self,
        a: &Self::Values,
        b: &Self::Values,
        out: &mut Self::Values,
        len: u64,
    ) -> Result<(), Self::Error>;
    /// `y[i, j] = x[i, j] * scale[j]` over `rows x features`, rounded to `y`'s storage.
    fn scale_features(
        &mut self,
        x: &Self::Values,
        scale: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        features: u64,
    ) -> Result<(), Self::Error>;
    /// `into += from`, rounded to `into`'s storage.
    fn accumulate(
        &mut self,
        from: &Self::Values,
        into: &mut Self::Values,
        len: u64,
    ) -> Result<(), Self::Error>;
    /// `to = from * scale`, rounded to `to`'s storage (autocast's casts; the loss scale).
    fn convert(
        &mut self,
        from: &Self::Values,
        to: &mut Self::Values,
        len: u64,
        scale: f32,
    ) -> Result<(), Self::Error>;
    /// `to.0[to.1..][..len] = from.0[from.1..][..len]`: values at offsets, one storage.
    fn copy_range(
        &mut self,
        from: (&Self::Values, u64),
        to: (&mut Self::Values, u64),
        len: u64,
    ) -> Result<(), Self::Error>;
}

/// reduce.cu: bias gradients, the mean loss, the overflow check of loss scaling.
pub trait Reduce: Allocate {
    /// `db[j] = sum_{i, k} dy[i, j, k]` over `rows x cols x spatial`.
    fn bias_gradient(
        &mut self,
        dy: &Self::Values,
        db: &mut Self::Values,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), Self::Error>;
    /// The mean of `values`, reduced on the device into `accumulator` (one value) and read back.
    fn mean(
        &mut self,
        values: &Self::Values,
        len: u64,
        accumulator: &mut Self::Values,
    ) -> Result<f32, Self::Error>;
    /// Whether any of `buffers` (each with its length) holds an infinity or a NaN; `flag` is
    /// the one-value buffer the device gathers the answer in.
    fn any_nonfinite(
        &mut self,
        buffers: &[(&Self::Values, u64)],
        flag: &mut Self::Values,
    ) -> Result<bool, Self::Error>;
}

/// conv.cu: convolutions of NCHW batches, `x` `rows x conv.inputs()`, `y` `rows x
/// conv.outputs()`, with groups and dilation, no bias.
pub trait Conv: Allocate {
    /// `y = x (*) w`.
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
}

/// pool.cu: max, average and adaptive average pooling of NCHW batches.
pub trait Pool: Allocate {
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
    /// Average pooling: each window's sum over its divisor ([`Pooling::divisor`]).
    fn avg_pool_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), Self::Error>;
    /// Average pooling's backward: each input gathers the gradient of every window holding
    /// it, over that window's divisor.
    fn avg_pool_backward(
        &mut self,
        dy: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), Self::Error>;
    /// Adaptive average pooling: each window's mean
    /// ([`crate::modules::adaptive_avg_pool2d::window`]).
    fn adaptive_pool_forward(
        &mut self,
        x: &Self::Values,
        y: &mut Self::Values,
        rows: u64,
        pool: &AdaptivePooling,
    ) -> Result<(), Self::Error>;
    /// Adaptive average pooling's backward: each input gathers the gradient of every window
    /// holding it, over that window's size.
    fn adaptive_pool_backward(
        &mut self,
        dy: &Self::Values,
        dx: &mut Self::Values,
        rows: u64,
        pool: &AdaptivePooling,
    ) -> Result<(), Self::Error>;
}

/// norm.cu: batch norm in training mode, and layer norm.
pub trait Norm: Allocate {
    /// Batch norm over `planes`: per channel the batch's mean and `1 / sqrt(variance + eps)`
    /// (biased variance) into `saved`, `y = (x - mean) * invstd * scale + shift` (scale 1, shift
    /// 0 without `affine`) rounded to `x`'s storage, the running statistics moved towards the
    /// batch's by `planes.momentum` (unbiased variance) and their step count raised by one.
    fn batch_norm_forward(
        &mut self,
        x: &Self::Values,
        affine: Option<Affine<&Self::Values>>,
        y: &mut Self::Values,
        saved: &mut BatchStatistics<Self::Values>,
        running: &mut RunningStatistics<Self::Values, Self::Index>,
        planes: &Planes,
    ) -> Result<(), Self::Error>;
    /// Batch norm's backward from its output's gradient `dy`, its input `x` and what forward
    /// saved: with `xhat = (x - mean) * invstd` and `m` values per channel, `dshift = sum dy`,
    /// `dscale = sum dy * xhat` and `dx = scale * invstd * (dy - dshift / m - xhat * dscale /
    /// m)`, each rounded to its buffer's storage; `dx` and the affine gradients only where
    /// given.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &mut self,
        dy: &Self::Values,
        x: &Self::Values,
        scale: Option<&Self::Values>,
        saved: BatchStatistics<&Self::Values>,
        dx: Option<&mut Self::Values>,
        affine: Option<Affine<&mut Self::Values>>,
        planes: &Planes,
    ) -> Result<(), Self::Error>;
    /// Layer norm over `rows`: per row its mean and `1 / sqrt(variance + eps)` (biased
    /// variance) into `saved`, `y = (x - mean) * rstd * scale + shift` (scale 1 and shift 0
    /// where absent), rounded to `x`'s storage.
    fn layer_norm_forward(
        &mut self,
        x: &Self::Values,
        affine: Option<LayerAffine<&Self::Values>>,
        y: &mut Self::Values,
        saved: &mut RowStatistics<Self::Values>,
        rows: &NormalizedRows,
    ) -> Result<(), Self::Error>;
    /// Layer norm's backward from its output's gradient `dy`, its input `x` and what forward
    /// saved: with `xhat = (x - mean) * rstd`, `h = scale * dy` and `n` features,
    /// `dx = rstd * (h - sum h / n - xhat * sum(h * xhat) / n)` per row, and per feature over
    /// the rows `dscale = sum dy * xhat`, `dshift = sum dy`; each rounded to its buffer's
    /// storage, and only where given.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &mut self,
        dy: &Self::Values,
        x: &Self::Values,
        scale: Option<&Self::Values>,
        saved: RowStatistics<&Self::Values>,
        dx: Option<&mut Self::Values>,
        affine: Option<LayerAffine<&mut Self::Values>>,
        rows: &NormalizedRows,
    ) -> Result<(), Self::Error>;
}

/// dropout.cu: training-mode dropout.
pub trait DropoutKernels: Allocate {
    /// `mask[i] = keeps(key, i, p)` ([`crate::synthetic::keeps`]), `y[i] = x[i] / (1 - p)`
    /// where kept, else 0.
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
    /// `dx[i] = dy[i] / (1 - p)` where `mask[i]` kept, else 0.
    fn dropout_backward(
        &mut self,
        dy: &Self::Values,
        mask: &Self::Mask,
        dx: &mut Self::Values,
        len: u64,
        p: f32,
    ) -> Result<(), Self::Error>;
}

/// loss.cu: the softmax cross-entropy.
pub trait Loss: Allocate {
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
}

/// optimizer.cu: the update rules.
pub trait Optimizer: Allocate {
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

/// Every kernel family of a device, and its clock.
pub trait Kernels:
    Fill
    + Gemm
    + Elementwise
    + Reduce
    + Conv
    + Pool
    + Norm
    + DropoutKernels
    + Loss
    + Optimizer
    + Lookup
    + Attend
    + Scores
{
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
}
