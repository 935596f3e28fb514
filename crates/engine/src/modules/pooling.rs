//! The geometry `nn.MaxPool2d` and `nn.AvgPool2d` share: square windows over each channel of
//! an NCHW sample, with PyTorch's rules for padding, dilation and `ceil_mode`.

use super::check::{extent, image, product, show};
use super::{LayerError, Path};
pub use crate::program::geometry::{PoolKind, Pooling};
use crate::program::graph::{Backward, Pass, Tensor};
use crate::program::Instr;

/// PyTorch's output side of a pooling (`pooling_output_shape`): windows of `kernel` taps
/// `dilation` apart every `stride` along `size` padded by `padding`, rounded down, or up with
/// `ceil_mode` (then a last window may reach past the padding, but must start before it ends);
/// `None` when no window fits.
pub fn pooled_side(
    size: u64,
    kernel: u64,
    stride: u64,
    padding: u64,
    dilation: u64,
    ceil_mode: bool,
) -> Option<u64> {
    let [size, kernel, stride, padding, dilation] =
        [size, kernel, stride, padding, dilation].map(i128::from);
    let span = dilation * (kernel - 1) + 1;
    let round_up = if ceil_mode { stride - 1 } else { 0 };
    let mut out = (size + 2 * padding - span + round_up).div_euclid(stride) + 1;
    if ceil_mode && (out - 1) * stride >= size + padding {
        out -= 1;
    }
    u64::try_from(out).ok().filter(|&out| out >= 1)
}

/// The arguments both poolings check, read from a job.
pub struct Windows {
    /// Side of the window.
    pub kernel: u64,
    /// Step between windows (the kernel when not given).
    pub stride: Option<u64>,
    /// Padding on every side.
    pub padding: u64,
    /// Spacing between taps.
    pub dilation: u64,
    /// Round the output's sides up.
    pub ceil_mode: bool,
}

impl Windows {
    /// The pooling of `kind` over a sample of `input` shape, `kind_name` naming it in errors.
    pub fn pooling(
        &self,
        kind: PoolKind,
        count_include_pad: bool,
        input: &[u64],
        at: &Path,
        kind_name: &str,
    ) -> Result<Pooling, LayerError> {
        let [channels, height, width] = image(input, at, kind_name)?;
        let kernel = extent(at, "kernel_size", self.kernel, 1)?;
        let stride = extent(at, "stride", self.stride.unwrap_or(kernel), 1)?;
        let dilation = extent(at, "dilation", self.dilation, 1)?;
        let padding = extent(at, "padding", self.padding, 0)?;
        let half = (dilation * (kernel - 1)).div_ceil(2);
        if padding > half {
            return Err(at.error_at(
                "padding",
                format!(
                    "must be at most half the window ({half}), as PyTorch requires, got {padding}"
                ),
            ));
        }
        let side = |size: u64, name: &str| {
            pooled_side(size, kernel, stride, padding, dilation, self.ceil_mode).ok_or_else(|| {
                at.error_at(
                    "kernel_size",
                    format!(
                        "{kernel} (dilation {dilation}) leaves no window on the input's {name} \
                         with padding {padding} and stride {stride} ({} reaches the layer)",
                        show(input)
                    ),
                )
            })
        };
        let (out_height, out_width) = (side(height, "height")?, side(width, "width")?);
        product(&[channels, out_height, out_width], at)?;
        Ok(Pooling {
            kind,
            channels,
            height,
            width,
            kernel,
            stride,
            padding,
            dilation,
            out_height,
            out_width,
            count_include_pad,
        })
    }
}

/// One sample's pooling in f64, from the definition: max (padding never wins) or average (its
/// divisor as [`Pooling::divisor`] says).
pub fn pool_reference(x: &[f64], p: &Pooling) -> Vec<f64> {
    let (h, w) = (p.height as i64, p.width as i64);
    let mut y = Vec::with_capacity(p.outputs() as usize);
    for c in 0..p.channels as i64 {
        for i in 0..p.out_height {
            for j in 0..p.out_width {
                let mut taps = Vec::new();
                for a in 0..p.kernel as i64 {
                    for b in 0..p.kernel as i64 {
                        let r = (i * p.stride) as i64 - p.padding as i64 + a * p.dilation as i64;
                        let q = (j * p.stride) as i64 - p.padding as i64 + b * p.dilation as i64;
                        if (0..h).contains(&r) && (0..w).contains(&q) {
                            taps.push(x[((c * h + r) * w + q) as usize]);
                        }
                    }
                }
                y.push(match p.kind {
                    // A dilated window wholly in the padding gives 0, as the kernels have it.
                    PoolKind::Max if taps.is_empty() => 0.0,
                    PoolKind::Max => taps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    PoolKind::Average => taps.iter().sum::<f64>() / p.divisor(i, j) as f64,
                });
            }
        }
    }
    y
}

/// `rows` samples' pooling in f64 ([`pool_reference`] of each).
pub fn pool_samples(x: &[f64], rows: usize, pool: &Pooling) -> Vec<f64> {
    x.chunks_exact(pool.inputs() as usize)
        .take(rows)
        .flat_map(|sample| pool_reference(sample, pool))
        .collect()
}

/// A pooling's backward: max pooling's gathers each window's gradient to the place of its
/// maximum (`indices`), average pooling's spreads it over the window.
#[derive(Debug)]
pub struct PoolBackward {
    /// The input, saved as PyTorch saves it (average pooling's backward reads only its shape).
    pub x: Tensor,
    /// Max pooling's places of the maxima.
    pub indices: Option<Tensor>,
    /// The geometry.
    pub pool: Pooling,
}

impl Backward for PoolBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (Some(dy), true) = (grads[0], pass.needs(0)) else {
            return vec![None];
        };
        let dx = pass.gradient(0, pass.elements(self.x), pass.storage(dy));
        pass.emit(Instr::PoolBackward {
            dy: pass.slot(dy),
            indices: self.indices.map(|indices| pass.slot(indices)),
            dx: pass.slot(dx),
            rows: pass.rows(),
            pool: self.pool,
        });
        vec![Some(dx)]
    }
}
