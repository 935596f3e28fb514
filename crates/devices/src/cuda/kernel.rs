//! Every kernel headroom launches, named once. The launchers, the compilation and its checks go
//! through [`Kernel`] and [`Family`], so a misspelt kernel is a compile error, and a kernel
//! added to a `.cu` file without an entry here is a test failure.

/// One file of `kernels/`: a family of kernels compiled together into one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `gemm.cu`: the three products of a linear layer.
    Gemm,
    /// `elementwise.cu`: bias, activations and their gradients, sums, conversions between
    /// storages.
    Elementwise,
    /// `reduce.cu`: column sums, the mean, the overflow check.
    Reduce,
    /// `loss.cu`: softmax cross-entropy.
    Loss,
    /// `optimizer.cu`: the update rules.
    Optimizer,
    /// `fill.cu`: synthetic data and initial parameters.
    Fill,
    /// `dropout.cu`: training-mode dropout and its backward.
    Dropout,
    /// `conv.cu`: 2-D convolution and its two gradients.
    Conv,
    /// `pool.cu`: max, average and adaptive average pooling and their backward.
    Pool,
    /// `norm.cu`: batch norm in training mode and its backward, and layer norm.
    Norm,
    /// `embedding.cu`: token ids looked up in a table, and the table's gradient; patch tokens
    /// and the first token.
    Embedding,
    /// `attention.cu`: fused scaled dot-product attention and its backward.
    Attention,
    /// `scores.cu`: eager attention's batched products, mask, softmax and head repetition.
    Scores,
}

impl Family {
    /// Every family, in compilation order.
    pub const ALL: [Family; 13] = [
        Family::Gemm,
        Family::Elementwise,
        Family::Reduce,
        Family::Loss,
        Family::Optimizer,
        Family::Fill,
        Family::Dropout,
        Family::Conv,
        Family::Pool,
        Family::Norm,
        Family::Embedding,
        Family::Attention,
        Family::Scores,
    ];

    /// The file name under `kernels/`.
    pub fn file(self) -> &'static str {
        match self {
            Family::Gemm => "gemm.cu",
            Family::Elementwise => "elementwise.cu",
            Family::Reduce => "reduce.cu",
            Family::Loss => "loss.cu",
            Family::Optimizer => "optimizer.cu",
            Family::Fill => "fill.cu",
            Family::Dropout => "dropout.cu",
            Family::Conv => "conv.cu",
            Family::Pool => "pool.cu",
            Family::Norm => "norm.cu",
            Family::Embedding => "embedding.cu",
            Family::Attention => "attention.cu",
            Family::Scores => "scores.cu",
        }
    }

    /// The headers of `kernels/` every family's source begins with, in order.
    pub const HEADERS: [&'static str; 5] = [
        "storage.cuh",
        "synthetic.cuh",
        "window.cuh",
        "block.cuh",
        "activation.cuh",
    ];

    /// The CUDA C++ source, embedded in the binary: the [`Family::HEADERS`] (`storage.cuh`: how
    /// values of each storage are read and written; `synthetic.cuh`: the counter-based stream;
    /// `window.cuh`: convolution and pooling windows; `block.cuh`: sums across a block;
    /// `activation.cuh`: the non-linearities), then the
    /// family's file.
    pub fn source(self) -> &'static str {
        macro_rules! with_storage {
            ($file:literal) => {
                concat!(
                    include_str!("../../kernels/storage.cuh"),
                    include_str!("../../kernels/synthetic.cuh"),
                    include_str!("../../kernels/window.cuh"),
                    include_str!("../../kernels/block.cuh"),
                    include_str!("../../kernels/activation.cuh"),
                    include_str!(concat!("../../kernels/", $file))
                )
            };
        }
        match self {
            Family::Gemm => with_storage!("gemm.cu"),
            Family::Elementwise => with_storage!("elementwise.cu"),
            Family::Reduce => with_storage!("reduce.cu"),
            Family::Loss => with_storage!("loss.cu"),
            Family::Optimizer => with_storage!("optimizer.cu"),
            Family::Fill => with_storage!("fill.cu"),
            Family::Dropout => with_storage!("dropout.cu"),
            Family::Conv => with_storage!("conv.cu"),
            Family::Pool => with_storage!("pool.cu"),
            Family::Norm => with_storage!("norm.cu"),
            Family::Embedding => with_storage!("embedding.cu"),
            Family::Attention => with_storage!("attention.cu"),
            Family::Scores => with_storage!("scores.cu"),
        }
    }

    /// The kernels this family defines.
    pub fn kernels(self) -> impl Iterator<Item = Kernel> {
        Kernel::ALL.into_iter().filter(move |k| k.family() == self)
    }

    /// The names of the `extern "C" __global__` functions the source defines, in order.
    pub fn entry_points(self) -> Vec<&'static str> {
        entry_points(self.source())
    }
}

/// One `extern "C" __global__` entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `C = A * B^T`: forward.
    GemmNt,
    /// `C = A^T * B`: weight gradient.
    GemmTn,
    /// `C = A * B`: input gradient.
    GemmNn,
    /// `y += bias`.
    BiasAdd,
    /// `y = activation(x)`.
    ActivationForward,
    /// `y = activation(y)`.
    ActivationInPlace,
    /// `out = grad * activation'(...)` from what the activation saved.
    ActivationGradient,
    /// `out = a + b`.
    Add,
    /// `into += from`.
    Accumulate,
    /// `to = from * scale` between storages.
    Convert,
    /// A range of values copied between offsets (FSDP's shards).
    CopyRange,
    /// Column sums: a linear layer's bias gradient.
    ColumnSum,
    /// Sums per channel of an NCHW batch: a convolution's bias gradient.
    ChannelSum,
    /// The mean of a vector.
    Mean,
    /// Whether a buffer holds an infinity or a NaN.
    Nonfinite,
    /// Fused softmax cross-entropy, forward and backward.
    SoftmaxCrossEntropy,
    /// SGD.
    Sgd,
    /// SGD with momentum.
    SgdMomentum,
    /// Adam and AdamW.
    Adam,
    /// The synthetic uniform stream.
    FillUniform,
    /// The synthetic labels.
    FillLabels,
    /// Dropout: the mask and the kept values, scaled.
    DropoutForward,
    /// Dropout's backward.
    DropoutBackward,
    /// A convolution's output.
    Conv2dForward,
    /// A convolution's input gradient.
    Conv2dInputGradient,
    /// A convolution's filter gradient.
    Conv2dWeightGradient,
    /// Max pooling and the places of the maxima.
    MaxPool2dForward,
    /// Max pooling's backward.
    MaxPool2dBackward,
    /// Average pooling.
    AvgPool2dForward,
    /// Average pooling's backward.
    AvgPool2dBackward,
    /// Adaptive average pooling.
    AdaptiveAvgPool2dForward,
    /// Adaptive average pooling's backward.
    AdaptiveAvgPool2dBackward,
    /// Batch norm: the batch's statistics, the normalized output, the running statistics.
    BatchNormForward,
    /// Batch norm's backward.
    BatchNormBackward,
    /// The elementwise product.
    Multiply,
    /// A scale per feature.
    ScaleFeatures,
    /// Token ids or drawn labels.
    FillTokens,
    /// Token ids looked up in a table.
    EmbeddingForward,
    /// The table's gradient.
    EmbeddingBackward,
    /// Layer norm: each row's statistics and the normalized output.
    LayerNormForward,
    /// Layer norm's input gradient, a row at a time.
    LayerNormInputGradient,
    /// Layer norm's scale and shift gradients, a feature at a time.
    LayerNormParameterGradient,
    /// A ViT's patch tokens after its class token.
    PatchTokensForward,
    /// Their backward: the planes' gradient and the class token's.
    PatchTokensBackward,
    /// The first token of each sample.
    FirstTokenForward,
    /// Its backward.
    FirstTokenBackward,
    /// The mean over each sample's positions.
    MeanTokensForward,
    /// Its backward.
    MeanTokensBackward,
    /// Fused attention: the output and each query row's log-sum-exp.
    AttentionForward,
    /// Fused attention's query gradient, a query row a thread.
    AttentionBackwardQuery,
    /// Fused attention's key and value gradients, a key row a thread.
    AttentionBackwardKey,
    /// Rotary position embedding.
    RotaryForward,
    /// Its backward.
    RotaryBackward,
    /// Eager attention's batched product.
    BatchedProduct,
    /// The causal mask over the scores.
    CausalMask,
    /// Each row's softmax.
    SoftmaxRows,
    /// Its backward.
    SoftmaxRowsBackward,
    /// Key/value heads repeated for their query heads.
    RepeatHeads,
    /// Their gradients summed back.
    SumHeadGroups,
}

impl Kernel {
    /// Every kernel; a kernel's position here is its index in a loaded device's table.
    pub const ALL: [Kernel; 59] = [
        Kernel::GemmNt,
        Kernel::GemmTn,
        Kernel::GemmNn,
        Kernel::BiasAdd,
        Kernel::ActivationForward,
        Kernel::ActivationInPlace,
        Kernel::ActivationGradient,
        Kernel::Add,
        Kernel::Accumulate,
        Kernel::Convert,
        Kernel::CopyRange,
        Kernel::ColumnSum,
        Kernel::ChannelSum,
        Kernel::Mean,
        Kernel::Nonfinite,
        Kernel::SoftmaxCrossEntropy,
        Kernel::Sgd,
        Kernel::SgdMomentum,
        Kernel::Adam,
        Kernel::FillUniform,
        Kernel::FillLabels,
        Kernel::DropoutForward,
        Kernel::DropoutBackward,
        Kernel::Conv2dForward,
        Kernel::Conv2dInputGradient,
        Kernel::Conv2dWeightGradient,
        Kernel::MaxPool2dForward,
        Kernel::MaxPool2dBackward,
        Kernel::AvgPool2dForward,
        Kernel::AvgPool2dBackward,
        Kernel::AdaptiveAvgPool2dForward,
        Kernel::AdaptiveAvgPool2dBackward,
        Kernel::BatchNormForward,
        Kernel::BatchNormBackward,
        Kernel::LayerNormForward,
        Kernel::LayerNormInputGradient,
        Kernel::LayerNormParameterGradient,
        Kernel::Multiply,
        Kernel::ScaleFeatures,
        Kernel::FillTokens,
        Kernel::EmbeddingForward,
        Kernel::EmbeddingBackward,
        Kernel::PatchTokensForward,
        Kernel::PatchTokensBackward,
        Kernel::FirstTokenForward,
        Kernel::FirstTokenBackward,
        Kernel::MeanTokensForward,
        Kernel::MeanTokensBackward,
        Kernel::AttentionForward,
        Kernel::AttentionBackwardQuery,
        Kernel::AttentionBackwardKey,
        Kernel::RotaryForward,
        Kernel::RotaryBackward,
        Kernel::BatchedProduct,
        Kernel::CausalMask,
        Kernel::SoftmaxRows,
        Kernel::SoftmaxRowsBackward,
        Kernel::RepeatHeads,
        Kernel::SumHeadGroups,
    ];

    /// The function's name in its source and in the PTX.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::GemmNt => "gemm_nt",
            Kernel::GemmTn => "gemm_tn",
            Kernel::GemmNn => "gemm_nn",
            Kernel::BiasAdd => "bias_add",
            Kernel::ActivationForward => "activation_forward",
            Kernel::ActivationInPlace => "activation_in_place",
            Kernel::ActivationGradient => "activation_gradient",
            Kernel::Add => "add",
            Kernel::Accumulate => "accumulate",
            Kernel::Convert => "convert",
            Kernel::CopyRange => "copy_range",
            Kernel::ColumnSum => "column_sum",
            Kernel::ChannelSum => "channel_sum",
            Kernel::Mean => "mean",
            Kernel::Nonfinite => "nonfinite",
            Kernel::SoftmaxCrossEntropy => "softmax_cross_entropy",
            Kernel::Sgd => "sgd",
            Kernel::SgdMomentum => "sgd_momentum",
            Kernel::Adam => "adam",
            Kernel::FillUniform => "fill_uniform",
            Kernel::FillLabels => "fill_labels",
            Kernel::DropoutForward => "dropout_forward",
            Kernel::DropoutBackward => "dropout_backward",
            Kernel::Conv2dForward => "conv2d_forward",
            Kernel::Conv2dInputGradient => "conv2d_input_gradient",
            Kernel::Conv2dWeightGradient => "conv2d_weight_gradient",
            Kernel::MaxPool2dForward => "max_pool2d_forward",
            Kernel::MaxPool2dBackward => "max_pool2d_backward",
            Kernel::AvgPool2dForward => "avg_pool2d_forward",
            Kernel::AvgPool2dBackward => "avg_pool2d_backward",
            Kernel::AdaptiveAvgPool2dForward => "adaptive_avg_pool2d_forward",
            Kernel::AdaptiveAvgPool2dBackward => "adaptive_avg_pool2d_backward",
            Kernel::BatchNormForward => "batch_norm_forward",
            Kernel::BatchNormBackward => "batch_norm_backward",
            Kernel::Multiply => "multiply",
            Kernel::ScaleFeatures => "scale_features",
            Kernel::FillTokens => "fill_tokens",
            Kernel::EmbeddingForward => "embedding_forward",
            Kernel::EmbeddingBackward => "embedding_backward",
            Kernel::LayerNormForward => "layer_norm_forward",
            Kernel::LayerNormInputGradient => "layer_norm_input_gradient",
            Kernel::LayerNormParameterGradient => "layer_norm_parameter_gradient",
            Kernel::PatchTokensForward => "patch_tokens_forward",
            Kernel::PatchTokensBackward => "patch_tokens_backward",
            Kernel::FirstTokenForward => "first_token_forward",
            Kernel::FirstTokenBackward => "first_token_backward",
            Kernel::MeanTokensForward => "mean_tokens_forward",
            Kernel::MeanTokensBackward => "mean_tokens_backward",
            Kernel::AttentionForward => "attention_forward",
            Kernel::AttentionBackwardQuery => "attention_backward_query",
            Kernel::AttentionBackwardKey => "attention_backward_key",
            Kernel::RotaryForward => "rotary_forward",
            Kernel::RotaryBackward => "rotary_backward",
            Kernel::BatchedProduct => "batched_product",
            Kernel::CausalMask => "causal_mask",
            Kernel::SoftmaxRows => "softmax_rows",
            Kernel::SoftmaxRowsBackward => "softmax_rows_backward",
            Kernel::RepeatHeads => "repeat_heads",
            Kernel::SumHeadGroups => "sum_head_groups",
        }
    }

    /// The file that defines it.
    pub fn family(self) -> Family {
        match self {
            Kernel::GemmNt | Kernel::GemmTn | Kernel::GemmNn => Family::Gemm,
            Kernel::BiasAdd
            | Kernel::ActivationForward
            | Kernel::ActivationInPlace
            | Kernel::ActivationGradient
            | Kernel::Add
            | Kernel::Multiply
            | Kernel::ScaleFeatures
            | Kernel::Accumulate
            | Kernel::Convert
            | Kernel::CopyRange => Family::Elementwise,
            Kernel::ColumnSum | Kernel::ChannelSum | Kernel::Mean | Kernel::Nonfinite => {
                Family::Reduce
            }
            Kernel::SoftmaxCrossEntropy => Family::Loss,
            Kernel::Sgd | Kernel::SgdMomentum | Kernel::Adam => Family::Optimizer,
            Kernel::FillUniform | Kernel::FillLabels | Kernel::FillTokens => Family::Fill,
            Kernel::EmbeddingForward
            | Kernel::EmbeddingBackward
            | Kernel::PatchTokensForward
            | Kernel::PatchTokensBackward
            | Kernel::FirstTokenForward
            | Kernel::FirstTokenBackward
            | Kernel::MeanTokensForward
            | Kernel::MeanTokensBackward => Family::Embedding,
            Kernel::AttentionForward
            | Kernel::AttentionBackwardQuery
            | Kernel::AttentionBackwardKey
            | Kernel::RotaryForward
            | Kernel::RotaryBackward => Family::Attention,
            Kernel::BatchedProduct
            | Kernel::CausalMask
            | Kernel::SoftmaxRows
            | Kernel::SoftmaxRowsBackward
            | Kernel::RepeatHeads
            | Kernel::SumHeadGroups => Family::Scores,
            Kernel::DropoutForward | Kernel::DropoutBackward => Family::Dropout,
            Kernel::Conv2dForward | Kernel::Conv2dInputGradient | Kernel::Conv2dWeightGradient => {
                Family::Conv
            }
            Kernel::MaxPool2dForward
            | Kernel::MaxPool2dBackward
            | Kernel::AvgPool2dForward
            | Kernel::AvgPool2dBackward
            | Kernel::AdaptiveAvgPool2dForward
            | Kernel::AdaptiveAvgPool2dBackward => Family::Pool,
            Kernel::BatchNormForward
            | Kernel::BatchNormBackward
            | Kernel::LayerNormForward
            | Kernel::LayerNormInputGradient
            | Kernel::LayerNormParameterGradient => Family::Norm,
        }
    }

    /// Its index among [`Kernel::ALL`].
    pub fn index(self) -> usize {
        Kernel::ALL
            .iter()
            .position(|&k| k == self)
            .expect("every kernel is in Kernel::ALL")
    }
}

/// The `extern "C" __global__ void [__launch_bounds__(...)] NAME(` definitions of a source.
fn entry_points(source: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("extern \"C\" __global__ void") {
        let mut after = rest[at + "extern \"C\" __global__ void".len()..].trim_start();
        if let Some(bounds) = after.strip_prefix("__launch_bounds__(") {
            after = bounds[bounds.find(')').map_or(0, |i| i + 1)..].trim_start();
        }
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        names.push(&after[..end]);
        rest = &after[end..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_a_kernel_of_its_family_and_back() {
        for family in Family::ALL {
            let mut defined = family.entry_points();
            let mut listed: Vec<&str> = family.kernels().map(Kernel::name).collect();
            defined.sort_unstable();
            listed.sort_unstable();
            assert_eq!(defined, listed, "kernels/{}", family.file());
        }
        for (i, kernel) in Kernel::ALL.into_iter().enumerate() {
            assert_eq!(kernel.index(), i);
        }
    }

    #[test]
    fn every_source_is_the_headers_then_its_file() {
        let kernels = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let read = |name: &str| std::fs::read_to_string(kernels.join(name)).unwrap();
        for family in Family::ALL {
            let mut expected: String = Family::HEADERS.iter().map(|h| read(h)).collect();
            expected.push_str(&read(family.file()));
            assert!(family.source() == expected, "kernels/{}", family.file());
        }
    }

    #[test]
    fn entry_points_read_launch_bounds_and_line_breaks() {
        let source = "extern \"C\" __global__ void __launch_bounds__(THREADS)\nk_one(int a) {}\n\
                      extern \"C\" __global__ void k_two(float* b) {}";
        assert_eq!(entry_points(source), ["k_one", "k_two"]);
    }
}
