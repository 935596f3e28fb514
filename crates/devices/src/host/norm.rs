//! norm.cu on the host: batch norm in training mode. A channel's
//! values are spread over every sample of an NCHW batch, so each pass reads the batch a chunk of
//! whole samples at a time ([`chunks`]) and gathers per-channel sums in f64; the values written
//! are computed in f32 from the f32 statistics, as the kernels compute them.

use headroom_engine::device::DeviceError;
use headroom_engine::modules::batch_norm::Planes;
use headroom_engine::program::{Affine, BatchStatistics, RunningStatistics};
use headroom_engine::step::Norm;

use super::values::{chunks, HostValues};
use super::{usize_of, HostBuffer, HostDevice};

/// The shape of `planes` in host sizes: values of a sample, of a channel plane, channels, all.
struct Sizes {
    sample: usize,
    spatial: usize,
    channels: usize,
    len: usize,
}

impl Sizes {
    fn of(planes: &Planes) -> Sizes {
        let (channels, spatial) = (usize_of(planes.channels), usize_of(planes.spatial));
        Sizes {
            sample: channels * spatial,
            spatial,
            channels,
            len: usize_of(planes.values()),
        }
    }

    /// Calls `visit(range, channel_of)` for chunks of whole samples, where `channel_of(i)` is
    /// the channel of the chunk's `i`-th value.
    fn each_chunk(&self, mut visit: impl FnMut(std::ops::Range<usize>, &dyn Fn(usize) -> usize)) {
        let (spatial, channels) = (self.spatial, self.channels);
        for range in chunks(self.len, self.sample) {
            visit(range, &|i| i / spatial % channels);
        }
    }
}

/// Per channel, the sum of `term(value, channel)` over the batch `values`.
fn channel_sums(values: &HostValues, sizes: &Sizes, term: impl Fn(f32, usize) -> f64) -> Vec<f64> {
    let mut sums = vec![0.0f64; sizes.channels];
    sizes.each_chunk(|range, channel_of| {
        for (i, &v) in values.read(range).iter().enumerate() {
            let c = channel_of(i);
            sums[c] += term(v, c);
        }
    });
    sums
}

impl Norm for HostDevice {
    fn batch_norm_forward(
        &mut self,
        x: &HostValues,
        affine: Option<Affine<&HostValues>>,
        y: &mut HostValues,
        saved: &mut BatchStatistics<HostValues>,
        running: &mut RunningStatistics<HostValues, HostBuffer<i64>>,
        planes: &Planes,
    ) -> Result<(), DeviceError> {
        let sizes = Sizes::of(planes);
        let count = planes.per_channel() as f64;
        let mean: Vec<f64> = channel_sums(x, &sizes, |v, _| f64::from(v))
            .into_iter()
            .map(|sum| sum / count)
            .collect();
        let variance: Vec<f64> = channel_sums(x, &sizes, |v, c| (f64::from(v) - mean[c]).powi(2))
            .into_iter()
            .map(|sum| sum / count)
            .collect();
        let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let invstd: Vec<f32> = variance
            .iter()
            .map(|&v| (1.0 / (v + f64::from(planes.eps)).sqrt()) as f32)
            .collect();
        saved.mean.write(0, &mean32);
        saved.invstd.write(0, &invstd);
        // The running variance is the unbiased one (n / (n - 1)), as PyTorch keeps it.
        let unbiased = count / (count - 1.0).max(1.0);
        let momentum = planes.momentum;
        let moved = |old: &[f32], batch: &mut dyn Iterator<Item = f32>| -> Vec<f32> {
            old.iter()
                .zip(batch)
                .map(|(&r, b)| (1.0 - momentum) * r + momentum * b)
                .collect()
        };
        let channels = 0..sizes.channels;
        let running_mean = moved(
            &running.mean.read(channels.clone()),
            &mut mean32.iter().copied(),
        );
        let running_var = moved(
            &running.var.read(channels.clone()),
            &mut variance.iter().map(|&v| (v * unbiased) as f32),
        );
        running.mean.write(0, &running_mean);
        running.var.write(0, &running_var);
        running.steps[0] += 1;
        let (scale, shift) = match affine {
            Some(a) => (
                a.scale.read(channels.clone()).into_owned(),
                a.shift.read(channels).into_owned(),
            ),
            None => (vec![1.0; sizes.channels], vec![0.0; sizes.channels]),
        };
        sizes.each_chunk(|range, channel_of| {
            let x = x.read(range.clone());
            y.update(range, |y| {
                for (i, (y, &v)) in y.iter_mut().zip(x.iter()).enumerate() {
                    let c = channel_of(i);
                    *y = (v - mean32[c]) * invstd[c] * scale[c] + shift[c];
                }
            });
        });
        Ok(())
    }

    fn batch_norm_backward(
        &mut self,
        dy: &HostValues,
        x: &HostValues,
        scale: Option<&HostValues>,
        saved: BatchStatistics<&HostValues>,
        dx: Option<&mut HostValues>,
        affine: Option<Affine<&mut HostValues>>,
        planes: &Planes,
    ) -> Result<(), DeviceError> {
        let sizes = Sizes::of(planes);
        let channels = 0..sizes.channels;
        let (mean, invstd) = (
            saved.mean.read(channels.clone()),
            saved.invstd.read(channels.clone()),
        );
        let scale = match scale {
            Some(scale) => scale.read(channels).into_owned(),
            None => vec![1.0; sizes.channels],
        };
        let xhat = |x: f32, c: usize| (x - mean[c]) * invstd[c];
        // Both sums in one pass over the batch.
        let (mut sum_dy, mut sum_dy_xhat) =
            (vec![0.0f64; sizes.channels], vec![0.0f64; sizes.channels]);
        sizes.each_chunk(|range, channel_of| {
            let (dy, x) = (dy.read(range.clone()), x.read(range));
            for (i, (&g, &v)) in dy.iter().zip(x.iter()).enumerate() {
                let c = channel_of(i);
                sum_dy[c] += f64::from(g);
                sum_dy_xhat[c] += f64::from(g) * f64::from(xhat(v, c));
            }
        });
        let to_f32 = |sums: &[f64]| -> Vec<f32> { sums.iter().map(|&s| s as f32).collect() };
        let (sum_dy, sum_dy_xhat) = (to_f32(&sum_dy), to_f32(&sum_dy_xhat));
        if let Some(affine) = affine {
            affine.shift.write(0, &sum_dy);
            affine.scale.write(0, &sum_dy_xhat);
        }
        let Some(dx) = dx else {
            return Ok(());
        };
        let count = planes.per_channel() as f32;
        sizes.each_chunk(|range, channel_of| {
            let (dy, x) = (dy.read(range.clone()), x.read(range.clone()));
            dx.update(range, |dx| {
                for (i, dx) in dx.iter_mut().enumerate() {
                    let c = channel_of(i);
                    *dx = scale[c]
                        * invstd[c]
                        * (dy[i] - sum_dy[c] / count - xhat(x[i], c) * sum_dy_xhat[c] / count);
                }
            });
        });
        Ok(())
    }
}
