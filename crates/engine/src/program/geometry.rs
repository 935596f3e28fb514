//! What the kernels are told of a layer: a convolution's and a pooling's geometry, batch norm's
//! planes, a non-linearity. The modules build them from a job's layers; the instructions carry
//! them to the kernels.

use super::SavedAs;

/// A 2-D convolution's geometry over one sample's `in_channels x height x width`, as
/// `nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups)` computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Convolution {
    /// Channels of the input.
    pub in_channels: u64,
    /// Rows of the input.
    pub height: u64,
    /// Columns of the input.
    pub width: u64,
    /// Channels of the output (filters).
    pub out_channels: u64,
    /// Side of the square kernel.
    pub kernel: u64,
    /// Step between windows.
    pub stride: u64,
    /// Zeros on every side.
    pub padding: u64,
    /// Spacing between the kernel's taps.
    pub dilation: u64,
    /// Groups of channels: each output channel reads `in_channels / groups` of them.
    pub groups: u64,
}

impl Convolution {
    /// Rows of the output.
    pub fn out_height(&self) -> u64 {
        window_count(
            self.height,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
        )
        .unwrap_or(0)
    }

    /// Columns of the output.
    pub fn out_width(&self) -> u64 {
        window_count(
            self.width,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
        )
        .unwrap_or(0)
    }

    /// Values of one sample's input.
    pub fn inputs(&self) -> u64 {
        self.in_channels * self.height * self.width
    }

    /// Values of one sample's output.
    pub fn outputs(&self) -> u64 {
        self.out_channels * self.out_height() * self.out_width()
    }

    /// Weights: `out_channels x (in_channels / groups) x kernel x kernel`.
    pub fn weights(&self) -> u64 {
        self.out_channels * self.fan_in()
    }

    /// Inputs each output reads: `(in_channels / groups) x kernel x kernel`.
    pub fn fan_in(&self) -> u64 {
        self.in_channels / self.groups * self.kernel * self.kernel
    }

    /// Positions of a channel of the output.
    pub fn spatial(&self) -> u64 {
        self.out_height() * self.out_width()
    }
}

/// Windows of `kernel` taps `dilation` apart, every `stride`, along a side of `size` padded by
/// `padding` on both ends: `(size + 2 padding - dilation (kernel - 1) - 1) / stride + 1`
/// (PyTorch's floor rule), or `None` when the window is wider than the padded side (or the
/// stride is 0).
pub fn window_count(
    size: u64,
    kernel: u64,
    stride: u64,
    padding: u64,
    dilation: u64,
) -> Option<u64> {
    let padded = size.checked_add(padding.checked_mul(2)?)?;
    let span = dilation
        .checked_mul(kernel.checked_sub(1)?)?
        .checked_add(1)?;
    (span <= padded && stride > 0).then(|| (padded - span) / stride + 1)
}

/// Which value a pooling window keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// The largest, its place kept for backward (`nn.MaxPool2d`).
    Max,
    /// The mean (`nn.AvgPool2d`).
    Average,
}

/// Square pooling windows over one sample's `channels x height x width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// Which value a window keeps.
    pub kind: PoolKind,
    /// Channels.
    pub channels: u64,
    /// Rows of the input.
    pub height: u64,
    /// Columns of the input.
    pub width: u64,
    /// Side of the window.
    pub kernel: u64,
    /// Step between windows.
    pub stride: u64,
    /// Padding on every side: at most half the (dilated) window.
    pub padding: u64,
    /// Spacing between a window's taps (max pooling; 1 for average pooling).
    pub dilation: u64,
    /// Rows of the output.
    pub out_height: u64,
    /// Columns of the output.
    pub out_width: u64,
    /// Average pooling: whether the padding counts in a window's divisor.
    pub count_include_pad: bool,
}

impl Pooling {
    /// Values of one sample's input.
    pub fn inputs(&self) -> u64 {
        self.channels * self.height * self.width
    }

    /// Values of one sample's output.
    pub fn outputs(&self) -> u64 {
        self.channels * self.out_height * self.out_width
    }

    /// An average window's divisor, as PyTorch's `avg_pool2d` counts it: the window within the
    /// padded input (all of it with `count_include_pad`), or only its places inside the input.
    pub fn divisor(&self, i: u64, j: u64) -> u64 {
        let side = |index: u64, size: u64| {
            let start = (index * self.stride) as i64 - self.padding as i64;
            let end = (start + self.kernel as i64).min((size + self.padding) as i64);
            let padded = (end - start).max(0) as u64;
            let inside = (end.min(size as i64) - start.max(0)).max(0) as u64;
            (padded, inside)
        };
        let ((rows, inside_rows), (cols, inside_cols)) =
            (side(i, self.height), side(j, self.width));
        match self.count_include_pad {
            true => rows * cols,
            false => inside_rows * inside_cols,
        }
    }
}

/// Adaptive average pooling over one sample's `channels x height x width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptivePooling {
    /// Channels.
    pub channels: u64,
    /// Rows of the input.
    pub height: u64,
    /// Columns of the input.
    pub width: u64,
    /// Rows of the output.
    pub out_height: u64,
    /// Columns of the output.
    pub out_width: u64,
}

impl AdaptivePooling {
    /// Values of one sample's input.
    pub fn inputs(&self) -> u64 {
        self.channels * self.height * self.width
    }

    /// Values of one sample's output.
    pub fn outputs(&self) -> u64 {
        self.channels * self.out_height * self.out_width
    }
}

/// The input places window `i` of `windows` covers along a side of `size`.
pub fn window(i: u64, windows: u64, size: u64) -> std::ops::Range<u64> {
    (i * size / windows)..((i + 1) * size).div_ceil(windows)
}

/// A batch seen as `rows x channels x spatial` values: what batch norm normalizes, one channel
/// over every sample and position at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planes {
    /// Samples.
    pub rows: u64,
    /// Channels.
    pub channels: u64,
    /// Positions of a channel in one sample (height x width, or a 1-D input's length).
    pub spatial: u64,
    /// Added to the variance.
    pub eps: f32,
    /// The weight of the step's statistics in the running ones.
    pub momentum: f32,
}

impl Planes {
    /// Values in all.
    pub fn values(&self) -> u64 {
        self.rows * self.channels * self.spatial
    }

    /// Values of one channel over the batch: what its statistics average.
    pub fn per_channel(&self) -> u64 {
        self.rows * self.spatial
    }
}

/// A batch seen as `rows x features` values: what layer norm normalizes, one row (a sample, or
/// one position of a sequence) at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormalizedRows {
    /// Rows: the batch times the positions of a sample.
    pub rows: u64,
    /// Values of a row (the last dimension).
    pub features: u64,
    /// Added to the variance.
    pub eps: f32,
}

impl NormalizedRows {
    /// Values in all.
    pub fn values(&self) -> u64 {
        self.rows * self.features
    }
}

/// Rotary position embedding over `[batch, sequence, heads, head_dim]` queries or keys, as
/// Hugging Face's `apply_rotary_pos_emb` computes it: feature `i` of position `t` with its
/// partner across the half (`rotate_half`: `-x[i + d/2]` for the first half, `x[i - d/2]` for
/// the second), `y = x * cos(t w) + rotate_half(x) * sin(t w)`, `w = theta^(-2 (i mod d/2) / d)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotary {
    /// Sequences.
    pub batch: u64,
    /// Positions of a sequence.
    pub sequence: u64,
    /// Heads of a position.
    pub heads: u64,
    /// Values of a head's row; even.
    pub head_dim: u64,
    /// The base of the angles' wavelengths (`rope_theta`).
    pub theta: f32,
}

impl Rotary {
    /// Values rotated (saturating, as [`Attention`]'s sizes).
    pub fn values(&self) -> u64 {
        [self.sequence, self.heads, self.head_dim]
            .iter()
            .fold(self.batch, |n, &m| n.saturating_mul(m))
    }

    /// The angle of feature `i` at position `t`, in f32 as PyTorch computes the tables.
    pub fn angle(&self, t: u64, i: u64) -> f32 {
        let half = self.head_dim / 2;
        let exponent = (2 * (i % half)) as f32 / self.head_dim as f32;
        t as f32 * (1.0 / self.theta.powf(exponent))
    }
}

/// Scaled dot-product self-attention over a batch of sequences, as attention.cu runs it:
/// queries `[batch, sequence, heads, head_dim]`, keys and values `[batch, sequence, kv_heads,
/// head_dim]` (query head `h` reads key/value head `h / (heads / kv_heads)`), scores scaled by
/// `1 / sqrt(head_dim)` (SDPA's default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    /// Sequences.
    pub batch: u64,
    /// Positions of a sequence (queries and keys alike).
    pub sequence: u64,
    /// Query heads.
    pub heads: u64,
    /// Key/value heads; they divide `heads`.
    pub kv_heads: u64,
    /// Values of a head's row.
    pub head_dim: u64,
    /// Whether query `i` sees only keys `0..=i`.
    pub causal: bool,
    /// Dropout on the probabilities (SDPA's `dropout_p`), if any.
    pub dropout: Option<AttentionDropout>,
}

/// Dropout on attention's probabilities as the fused kernels apply it: no mask is stored, each
/// kept probability is redrawn from the counter-based stream wherever it is used (forward and
/// backward), as FlashAttention-2 regenerates its Philox mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionDropout {
    /// Probability of dropping each probability, in (0, 1).
    pub p: f32,
    /// The stream of this step's masks ([`crate::synthetic::stream_key`]).
    pub key: u64,
}

impl AttentionDropout {
    /// Index of probability `(b, h, i, j)` in the stream: its place in a `[batch, heads,
    /// sequence, sequence]` matrix, as SDPA's math path lays its mask out.
    pub fn index(&self, shape: &Attention, [b, h, i, j]: [u64; 4]) -> u64 {
        let row = (b.wrapping_mul(shape.heads).wrapping_add(h))
            .wrapping_mul(shape.sequence)
            .wrapping_add(i);
        row.wrapping_mul(shape.sequence).wrapping_add(j)
    }

    /// What probability `(b, h, i, j)` is multiplied by: `1 / (1 - p)` if kept, else 0.
    pub fn factor(&self, shape: &Attention, at: [u64; 4]) -> f32 {
        match crate::synthetic::keeps(self.key, self.index(shape, at), self.p) {
            true => crate::synthetic::dropout_scale(self.p),
            false => 0.0,
        }
    }
}

impl Attention {
    /// The same attention drawing step `step`'s dropout masks: the sub-stream
    /// [`crate::synthetic::stream_key`]`(key, step)`, as dropout layers draw theirs.
    pub fn at_step(self, step: u64) -> Attention {
        let dropout = self.dropout.map(|d| AttentionDropout {
            key: crate::synthetic::stream_key(d.key, step),
            ..d
        });
        Attention { dropout, ..self }
    }

    /// The kernels' dropout arguments: the stream's keep threshold, the kept values' scale
    /// and the key; without dropout a threshold of -1 (the stream's least value: all kept)
    /// and a scale of 1.
    pub fn dropout_arguments(&self) -> (f32, f32, u64) {
        match self.dropout {
            Some(d) => (
                crate::synthetic::keep_threshold(d.p),
                crate::synthetic::dropout_scale(d.p),
                d.key,
            ),
            None => (-1.0, 1.0, 0),
        }
    }

    /// Values of the queries (and of the output). The sizes saturate: a step whose sizes pass
    /// `u64` is discarded by the graph ([`crate::program::graph::Graph::overflowed`]).
    pub fn query_values(&self) -> u64 {
        self.rows().saturating_mul(self.head_dim)
    }

    /// Values of the keys (and of the values).
    pub fn key_values(&self) -> u64 {
        [self.sequence, self.kv_heads, self.head_dim]
            .iter()
            .fold(self.batch, |n, &m| n.saturating_mul(m))
    }

    /// Rows of the log-sum-exp: one per query row of every head.
    pub fn rows(&self) -> u64 {
        self.batch
            .saturating_mul(self.sequence)
            .saturating_mul(self.heads)
    }

    /// What the scores are multiplied by.
    pub fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }
}

/// Where a batch of matrices lies in a buffer: element `(row, col)` of the matrix of sample `b`
/// and head `h` is at `b * batch + h * head + row * row_stride + col * col_stride` (elements).
/// Strides describe PyTorch's views without copying them: a `[batch, positions, heads,
/// head_dim]` projection read a head at a time, or a matrix read transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    /// From one sample to the next.
    pub batch: u64,
    /// From one head to the next.
    pub head: u64,
    /// From one row to the next.
    pub row: u64,
    /// From one column to the next.
    pub col: u64,
}

impl Strides {
    /// `[batch, heads, rows, cols]` stored in that order.
    pub fn contiguous(heads: u64, rows: u64, cols: u64) -> Strides {
        let matrix = rows.saturating_mul(cols);
        Strides {
            batch: matrix.saturating_mul(heads),
            head: matrix,
            row: cols,
            col: 1,
        }
    }

    /// Head `h` of a `[batch, positions, heads, head_dim]` tensor (a projection's output viewed
    /// as heads): `positions x head_dim` matrices.
    pub fn heads(positions: u64, heads: u64, head_dim: u64) -> Strides {
        let row = heads.saturating_mul(head_dim);
        Strides {
            batch: row.saturating_mul(positions),
            head: head_dim,
            row,
            col: 1,
        }
    }

    /// The same matrices read transposed.
    pub fn transposed(self) -> Strides {
        Strides {
            row: self.col,
            col: self.row,
            ..self
        }
    }

    /// One past the largest offset of `batch x heads` matrices of `rows x cols` (saturating).
    pub fn span(&self, batch: u64, heads: u64, rows: u64, cols: u64) -> u64 {
        let last = |n: u64, stride: u64| n.saturating_sub(1).saturating_mul(stride);
        [
            last(batch, self.batch),
            last(heads, self.head),
            last(rows, self.row),
            last(cols, self.col),
        ]
        .iter()
        .fold(1, |n: u64, &m| n.saturating_add(m))
    }
}

/// A product of a batch of matrices, one pair a sample and head (`torch.bmm` over PyTorch's
/// `[batch * heads, ...]` views): `c = a b`, `a` being `rows x inner`, `b` `inner x cols` and
/// `c` `rows x cols`, each laid out by its [`Strides`]; `c`'s rows are contiguous (`col` 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchedProduct {
    /// Samples.
    pub batch: u64,
    /// Heads of a sample.
    pub heads: u64,
    /// Rows of `a` and `c`.
    pub rows: u64,
    /// Columns of `a`, rows of `b`.
    pub inner: u64,
    /// Columns of `b` and `c`.
    pub cols: u64,
    /// `a`'s layout.
    pub a: Strides,
    /// `b`'s layout.
    pub b: Strides,
    /// `c`'s layout.
    pub c: Strides,
}

impl BatchedProduct {
    /// The values each operand's buffer must hold: `(a, b, c)`.
    pub fn spans(&self) -> (u64, u64, u64) {
        let (n, h) = (self.batch, self.heads);
        (
            self.a.span(n, h, self.rows, self.inner),
            self.b.span(n, h, self.inner, self.cols),
            self.c.span(n, h, self.rows, self.cols),
        )
    }
}

/// Key/value heads repeated for the query heads they serve (Hugging Face's `repeat_kv`):
/// `[batch, positions, kv_heads, head_dim]` in, `[batch, kv_heads * groups, positions,
/// head_dim]` out, query head `h` reading key/value head `h / groups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadGroups {
    /// Samples.
    pub batch: u64,
    /// Positions of a sample.
    pub positions: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// Query heads a key/value head serves.
    pub groups: u64,
    /// Values of a head's row.
    pub head_dim: u64,
}

impl HeadGroups {
    /// Values of the key/value heads (saturating).
    pub fn grouped(&self) -> u64 {
        [self.positions, self.kv_heads, self.head_dim]
            .iter()
            .fold(self.batch, |n, &m| n.saturating_mul(m))
    }

    /// Values once repeated (saturating).
    pub fn repeated(&self) -> u64 {
        self.grouped().saturating_mul(self.groups)
    }
}

/// An element-wise non-linearity, with its parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Nonlinearity {
    /// `max(x, 0)`.
    Relu,
    /// `x Phi(x)` in the tanh approximation (`approximate="tanh"`).
    GeluTanh,
    /// `x Phi(x)`, exactly, through the error function (`nn.GELU()`'s default).
    GeluErf,
    /// Hyperbolic tangent.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `x sigmoid(x)`.
    Silu,
    /// `x` where positive, else `slope x`.
    LeakyRelu {
        /// `negative_slope`.
        slope: f32,
    },
    /// `min(max(x, 0), 6)`.
    Relu6,
}

/// `sqrt(2 / pi)`, of GELU's tanh approximation.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic term's coefficient of GELU's tanh approximation.
const GELU_CUBIC: f64 = 0.044_715;

impl Nonlinearity {
    /// The code the kernels take for it (`kernels/activation.cuh`).
    pub fn code(self) -> i32 {
        match self {
            Nonlinearity::Relu => 0,
            Nonlinearity::GeluTanh => 1,
            Nonlinearity::Tanh => 2,
            Nonlinearity::GeluErf => 3,
            Nonlinearity::Sigmoid => 4,
            Nonlinearity::Silu => 5,
            Nonlinearity::LeakyRelu { .. } => 6,
            Nonlinearity::Relu6 => 7,
        }
    }

    /// Its parameter for the kernels: leaky relu's slope, else 0.
    pub fn parameter(self) -> f32 {
        match self {
            Nonlinearity::LeakyRelu { slope } => slope,
            _ => 0.0,
        }
    }

    /// Its name in a job's summary.
    pub fn name(self) -> &'static str {
        match self {
            Nonlinearity::Relu => "relu",
            Nonlinearity::GeluTanh => "gelu",
            Nonlinearity::GeluErf => "gelu_exact",
            Nonlinearity::Tanh => "tanh",
            Nonlinearity::Sigmoid => "sigmoid",
            Nonlinearity::Silu => "silu",
            Nonlinearity::LeakyRelu { .. } => "leaky_relu",
            Nonlinearity::Relu6 => "relu6",
        }
    }

    /// What PyTorch's autograd saves of it for backward (`derivatives.yaml`): the result of
    /// relu, tanh, sigmoid and in-place leaky relu, the input of the others; in place, relu6's
    /// input is a copy autograd makes first ([`Nonlinearity::clones_input_in_place`]).
    pub fn saves(self, inplace: bool) -> SavedAs {
        match self {
            Nonlinearity::Relu | Nonlinearity::Tanh | Nonlinearity::Sigmoid => SavedAs::Output,
            Nonlinearity::LeakyRelu { .. } if inplace => SavedAs::Output,
            _ => SavedAs::Input,
        }
    }

    /// Whether autograd copies the input before running it in place, because its backward
    /// reads the input (`hardtanh_`, relu6's, in `derivatives.yaml`): in place it then costs
    /// what it costs out of place.
    pub fn clones_input_in_place(self) -> bool {
        self == Nonlinearity::Relu6
    }

    /// Whether it may run in place (`inplace: true` in PyTorch's module).
    pub fn has_inplace(self) -> bool {
        matches!(
            self,
            Nonlinearity::Relu | Nonlinearity::Relu6 | Nonlinearity::LeakyRelu { .. }
        )
    }

    /// Its value at `x`, from the definition.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Nonlinearity::Relu => x.max(0.0),
            Nonlinearity::GeluTanh => {
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_CUBIC * x.powi(3))).tanh())
            }
            Nonlinearity::GeluErf => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Nonlinearity::Tanh => x.tanh(),
            Nonlinearity::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Nonlinearity::Silu => x / (1.0 + (-x).exp()),
            Nonlinearity::LeakyRelu { slope } => match x > 0.0 {
                true => x,
                false => f64::from(slope) * x,
            },
            Nonlinearity::Relu6 => x.clamp(0.0, 6.0),
        }
    }
}
