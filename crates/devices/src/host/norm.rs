//! norm.cu on the host: batch norm in training mode, and layer norm. A channel's
//! values are spread over every sample of an NCHW batch, so each pass reads the batch a chunk of
//! whole samples at a time ([`chunks`]) and gathers per-channel sums in f64; the values written
//! are computed in f32 from the f32 statistics, as the kernels compute them. Layer norm's rows
//! are read a chunk of whole rows at a time, their statistics likewise gathered in f64.

use headroom_engine::device::DeviceError;
use headroom_engine::modules::batch_norm::Planes;
use headroom_engine::modules::layer_norm::NormalizedRows;
use headroom_engine::program::{
    Affine, BatchStatistics, LayerAffine, RowStatistics, RunningStatistics,
};
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

/// A row's mean (0 unless `centered`) and `1 / sqrt(biased variance + eps)`, summed in f64.
fn row_statistics(row: &[f32], eps: f32, centered: bool) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = match centered {
        true => row.iter().map(|&v| f64::from(v)).sum::<f64>() / n,
        false => 0.0,
    };
    let variance = row
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (
        mean as f32,
        (1.0 / (variance + f64::from(eps)).sqrt()) as f32,
    )
}

/// `values`' first `n` values, or `fill` where there is no buffer.
fn per_feature(values: Option<&HostValues>, n: usize, fill: f32) -> Vec<f32> {
    values.map_or_else(|| vec![fill; n], |v| v.read(0..n).into_owned())
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

    fn layer_norm_forward(
        &mut self,
        x: &HostValues,
        affine: Option<LayerAffine<&HostValues>>,
        y: &mut HostValues,
        saved: &mut RowStatistics<HostValues>,
        rows: &NormalizedRows,
    ) -> Result<(), DeviceError> {
        let n = usize_of(rows.features);
        let scale = per_feature(affine.map(|a| a.scale), n, 1.0);
        let shift = per_feature(affine.and_then(|a| a.shift), n, 0.0);
        let centered = saved.mean.is_some();
        let (mut means, mut rstds) = (Vec::new(), Vec::new());
        for range in chunks(usize_of(rows.values()), n) {
            let x = x.read(range.clone());
            y.update(range, |y| {
                for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
                    let (mean, rstd) = row_statistics(x, rows.eps, centered);
                    means.push(mean);
                    rstds.push(rstd);
                    for (j, (y, &v)) in y.iter_mut().zip(x).enumerate() {
                        *y = (v - mean) * rstd * scale[j] + shift[j];
                    }
                }
            });
        }
        if let Some(saved_mean) = &mut saved.mean {
            saved_mean.write(0, &means);
        }
        saved.rstd.write(0, &rstds);
        Ok(())
    }

    fn layer_norm_backward(
        &mut self,
        dy: &HostValues,
        x: &HostValues,
        scale: Option<&HostValues>,
        saved: RowStatistics<&HostValues>,
        mut dx: Option<&mut HostValues>,
        affine: Option<LayerAffine<&mut HostValues>>,
        rows: &NormalizedRows,
    ) -> Result<(), DeviceError> {
        let n = usize_of(rows.features);
        let count = usize_of(rows.rows);
        let scale = per_feature(scale, n, 1.0);
        let centered = saved.mean.is_some();
        let mean = saved
            .mean
            .map_or_else(|| vec![0.0; count].into(), |m| m.read(0..count));
        let rstd = saved.rstd.read(0..count);
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0f64; n], vec![0.0f64; n]);
        for range in chunks(usize_of(rows.values()), n) {
            let first = range.start / n;
            let (dy, x) = (dy.read(range.clone()), x.read(range.clone()));
            let xhat = |r: usize, j: usize| (x[r * n + j] - mean[first + r]) * rstd[first + r];
            for (i, &g) in dy.iter().enumerate() {
                sum_dy[i % n] += f64::from(g);
                sum_dy_xhat[i % n] += f64::from(g) * f64::from(xhat(i / n, i % n));
            }
            let Some(dx) = dx.as_deref_mut() else {
                continue;
            };
            dx.update(range, |dx| {
                for (r, dx) in dx.chunks_exact_mut(n).enumerate() {
                    let h = |j: usize| scale[j] * dy[r * n + j];
                    let (mut sum_h, mut sum_h_xhat) = (0.0f64, 0.0f64);
                    for j in 0..n {
                        sum_h += f64::from(h(j));
                        sum_h_xhat += f64::from(h(j)) * f64::from(xhat(r, j));
                    }
                    let mean_h = if centered { sum_h / n as f64 } else { 0.0 };
                    let (mean_h, mean_h_xhat) = (mean_h as f32, (sum_h_xhat / n as f64) as f32);
                    for (j, dx) in dx.iter_mut().enumerate() {
                        *dx = rstd[first + r] * (h(j) - mean_h - xhat(r, j) * mean_h_xhat);
                    }
                }
            });
        }
        if let Some(affine) = affine {
            let to_f32 = |sums: &[f64]| -> Vec<f32> { sums.iter().map(|&s| s as f32).collect() };
            affine.scale.write(0, &to_f32(&sum_dy_xhat));
            if let Some(shift) = affine.shift {
                shift.write(0, &to_f32(&sum_dy));
            }
        }
        Ok(())
    }
}
