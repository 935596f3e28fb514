//! The geometry of the image layers a plan trains: a convolution over one sample's
//! `channels x height x width` (NCHW, as PyTorch lays a batch out) and the pooling after it.
//! The layer walk ([`crate::layers::walk`]) has checked that every window fits; a geometry
//! where none does has no outputs.

/// Batch norm's `eps`, added to the variance (`nn.BatchNorm2d`'s default).
pub const BATCH_NORM_EPS: f32 = 1e-5;
/// Batch norm's `momentum`: the weight of a step's statistics in the running ones
/// (`nn.BatchNorm2d`'s default).
pub const BATCH_NORM_MOMENTUM: f32 = 0.1;

/// An NCHW batch seen as `rows x channels x spatial` values: what batch norm normalizes, one
/// channel over every sample and position at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planes {
    /// Samples.
    pub rows: u64,
    /// Channels.
    pub channels: u64,
    /// Positions of a channel in one sample: height x width.
    pub spatial: u64,
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

/// A 2-D convolution with a square kernel, as `nn.Conv2d(in_channels, out_channels, kernel,
/// stride, padding)` computes it over one sample; its bias is one value per output channel.
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
}

impl Convolution {
    /// Rows of the output.
    pub fn out_height(&self) -> u64 {
        window_count(self.height, self.kernel, self.stride, self.padding).unwrap_or(0)
    }

    /// Columns of the output.
    pub fn out_width(&self) -> u64 {
        window_count(self.width, self.kernel, self.stride, self.padding).unwrap_or(0)
    }

    /// Values of one sample's input.
    pub fn inputs(&self) -> u64 {
        self.in_channels * self.height * self.width
    }

    /// Values of one sample's output.
    pub fn outputs(&self) -> u64 {
        self.out_channels * self.out_height() * self.out_width()
    }

    /// Weights: `out_channels x in_channels x kernel x kernel`.
    pub fn weights(&self) -> u64 {
        self.out_channels * self.fan_in()
    }

    /// Inputs each output reads: `in_channels x kernel x kernel`.
    pub fn fan_in(&self) -> u64 {
        self.in_channels * self.kernel * self.kernel
    }
}

/// The shortcut of a residual block: the block's input, added to its last layer's
/// batch-normalized output before the activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortcut {
    /// The block's first layer, whose input the shortcut carries: never the network's first
    /// ([`crate::plan::Plan::convolutional`] checks), so that input is an activation whose
    /// gradient backward computes.
    pub from: usize,
    /// A 1x1 convolution without bias, then batch norm, when the block changes the shape (as
    /// ResNet's downsampling blocks do); the identity when it does not.
    pub projection: Option<Convolution>,
}

/// Which value a pooling window keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// The largest, its place kept for backward (`nn.MaxPool2d`).
    Max,
    /// The mean, padding counted (`nn.AvgPool2d`).
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
    /// Padding on every side, at most half the kernel.
    pub padding: u64,
}

impl Pooling {
    /// Rows of the output.
    pub fn out_height(&self) -> u64 {
        window_count(self.height, self.kernel, self.stride, self.padding).unwrap_or(0)
    }

    /// Columns of the output.
    pub fn out_width(&self) -> u64 {
        window_count(self.width, self.kernel, self.stride, self.padding).unwrap_or(0)
    }

    /// Values of one sample's input.
    pub fn inputs(&self) -> u64 {
        self.channels * self.height * self.width
    }

    /// Values of one sample's output.
    pub fn outputs(&self) -> u64 {
        self.channels * self.out_height() * self.out_width()
    }
}

/// Windows of `kernel` every `stride` along a side of `size` padded by `padding` on both ends,
/// `(size + 2 padding - kernel) / stride + 1` (PyTorch's floor rule), or `None` when the kernel is
/// larger than the padded input (or the stride is 0).
pub fn window_count(size: u64, kernel: u64, stride: u64, padding: u64) -> Option<u64> {
    let padded = size.checked_add(padding.checked_mul(2)?)?;
    (kernel <= padded && stride > 0).then(|| (padded - kernel) / stride + 1)
}
