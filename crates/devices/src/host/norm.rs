//! norm.cu on the host: batch norm in training mode, and layer norm. A channel's values are
//! spread over every sample of an NCHW batch, so batch norm reads the batch in blocks of whole
//! samples (all of it when it is f32) and works plane by plane: per-channel sums gathered in f64
//! over eight lanes, channels over every core, then the values written from the f32 statistics,
//! as the kernels compute them, samples over every core. Layer norm's rows are read a chunk of
//! whole rows at a time ([`chunks`]), their statistics likewise gathered in f64.

use headroom_engine::device::DeviceError;
use headroom_engine::modules::batch_norm::Planes;
use headroom_engine::modules::layer_norm::NormalizedRows;
use headroom_engine::plan::Storage;
use headroom_engine::program::{
    Affine, BatchStatistics, LayerAffine, RowStatistics, RunningStatistics,
};
use headroom_engine::step::{Norm, Stored};

use std::ops::Range;

use rayon::prelude::*;

use super::values::{chunks, row_blocks, HostValues};
use super::{usize_of, HostBuffer, HostDevice};

/// The shape of `planes` in host sizes: values of a sample, of a channel plane, channels, samples.
struct Sizes {
    sample: usize,
    spatial: usize,
    channels: usize,
    samples: usize,
}

impl Sizes {
    fn of(planes: &Planes) -> Sizes {
        let (channels, spatial) = (usize_of(planes.channels), usize_of(planes.spatial));
        let sample = channels * spatial;
        Sizes {
            sample,
            spatial,
            channels,
            samples: usize_of(planes.values()) / sample.max(1),
        }
    }

    /// The batch in blocks of whole samples: all of it when every operand is f32 (nothing to
    /// widen), about [`values::CHUNK`](super::values::CHUNK) values otherwise.
    fn blocks(&self, all_f32: bool) -> impl Iterator<Item = Range<usize>> + '_ {
        row_blocks(self.samples, self.sample, all_f32)
            .map(|rows| rows.start * self.sample..rows.end * self.sample)
    }

    /// Adds to each channel's sum `plane_sum(planes, channel)` over the channel's planes in a
    /// block of whole samples (`operands` read side by side), channels in parallel; each
    /// channel adds its planes in sample order, so every run sums alike.
    fn add_channel_sums<const N: usize, S: Send + std::ops::AddAssign>(
        &self,
        operands: [&[f32]; N],
        sums: &mut [S],
        plane_sum: impl Fn([&[f32]; N], usize) -> S + Sync,
    ) {
        let samples = operands[0].len() / self.sample.max(1);
        sums.par_iter_mut()
            .enumerate()
            .with_min_len((1 << 14) / (samples * self.spatial).max(1))
            .for_each(|(c, sum)| {
                for n in 0..samples {
                    let at = n * self.sample + c * self.spatial;
                    *sum += plane_sum(operands.map(|o| &o[at..at + self.spatial]), c);
                }
            });
    }

    /// Writes `out` plane by plane from the planes of `operands` at the same places and the
    /// plane's channel, samples in parallel.
    fn map_planes<const N: usize>(
        &self,
        operands: [&[f32]; N],
        out: &mut [f32],
        plane: impl Fn([&[f32]; N], &mut [f32], usize) + Sync,
    ) {
        out.par_chunks_mut(self.sample)
            .enumerate()
            .for_each(|(n, sample)| {
                for (c, out) in sample.chunks_mut(self.spatial).enumerate() {
                    let at = n * self.sample + c * self.spatial;
                    plane(operands.map(|o| &o[at..at + self.spatial]), out, c);
                }
            });
    }
}

/// `sum(term(x[i]))` in f64, over eight lanes the compiler can vectorise.
fn lane_sum(x: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut eights = x.chunks_exact(8);
    for eight in &mut eights {
        for (lane, &v) in lanes.iter_mut().zip(eight) {
            *lane += term(v);
        }
    }
    let tail: f64 = eights.remainder().iter().map(|&v| term(v)).sum();
    lanes.iter().sum::<f64>() + tail
}

/// `(sum(dy), sum(dy * xhat))` in f64 over a plane, `xhat = (x - mean) * invstd` in f32 as the
/// kernel computes it.
fn gradient_sums(dy: &[f32], x: &[f32], mean: f32, invstd: f32) -> GradientSums {
    let (mut sum_dy, mut sum_dy_xhat) = ([0.0f64; 8], [0.0f64; 8]);
    let (mut dys, mut xs) = (dy.chunks_exact(8), x.chunks_exact(8));
    for (dy, x) in (&mut dys).zip(&mut xs) {
        for l in 0..8 {
            sum_dy[l] += f64::from(dy[l]);
            sum_dy_xhat[l] += f64::from(dy[l]) * f64::from((x[l] - mean) * invstd);
        }
    }
    let mut sums = GradientSums {
        dy: sum_dy.iter().sum(),
        dy_xhat: sum_dy_xhat.iter().sum(),
    };
    for (&g, &v) in dys.remainder().iter().zip(xs.remainder()) {
        sums.dy += f64::from(g);
        sums.dy_xhat += f64::from(g) * f64::from((v - mean) * invstd);
    }
    sums
}

/// A channel's sums for batch norm's backward.
#[derive(Clone, Copy, Default)]
struct GradientSums {
    dy: f64,
    dy_xhat: f64,
}

impl std::ops::AddAssign for GradientSums {
    fn add_assign(&mut self, other: GradientSums) {
        self.dy += other.dy;
        self.dy_xhat += other.dy_xhat;
    }
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
        let all_f32 = x.storage() == Storage::F32 && y.storage() == Storage::F32;
        let mut sums = vec![0.0f64; sizes.channels];
        for block in sizes.blocks(all_f32) {
            let x = x.read(block);
            sizes.add_channel_sums([&x], &mut sums, |[x], _| lane_sum(x, f64::from));
        }
        let mean: Vec<f64> = sums.iter().map(|sum| sum / count).collect();
        let mut squares = vec![0.0f64; sizes.channels];
        for block in sizes.blocks(all_f32) {
            let x = x.read(block);
            sizes.add_channel_sums([&x], &mut squares, |[x], c| {
                lane_sum(x, |v| (f64::from(v) - mean[c]).powi(2))
            });
        }
        let variance: Vec<f64> = squares.iter().map(|sum| sum / count).collect();
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
        for block in sizes.blocks(all_f32) {
            let x = x.read(block.clone());
            y.update(block, |y| {
                sizes.map_planes([&x], y, |[x], y, c| {
                    for (y, &v) in y.iter_mut().zip(x) {
                        *y = (v - mean32[c]) * invstd[c] * scale[c] + shift[c];
                    }
                })
            });
        }
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
        let all_f32 = [Some(dy), Some(x), dx.as_deref()]
            .into_iter()
            .flatten()
            .all(|v| v.storage() == Storage::F32);
        // Both sums in one pass over the batch.
        let mut sums = vec![GradientSums::default(); sizes.channels];
        for block in sizes.blocks(all_f32) {
            let (dy, x) = (dy.read(block.clone()), x.read(block));
            sizes.add_channel_sums([&dy, &x], &mut sums, |[dy, x], c| {
                gradient_sums(dy, x, mean[c], invstd[c])
            });
        }
        let sum_dy: Vec<f32> = sums.iter().map(|s| s.dy as f32).collect();
        let sum_dy_xhat: Vec<f32> = sums.iter().map(|s| s.dy_xhat as f32).collect();
        if let Some(affine) = affine {
            affine.shift.write(0, &sum_dy);
            affine.scale.write(0, &sum_dy_xhat);
        }
        let Some(dx) = dx else {
            return Ok(());
        };
        let count = planes.per_channel() as f32;
        for block in sizes.blocks(all_f32) {
            let (dy, x) = (dy.read(block.clone()), x.read(block.clone()));
            dx.update(block, |dx| {
                sizes.map_planes([&dy, &x], dx, |[dy, x], dx, c| {
                    let (mean_dy, mean_dy_xhat) = (sum_dy[c] / count, sum_dy_xhat[c] / count);
                    for ((dx, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
                        let xhat = (v - mean[c]) * invstd[c];
                        *dx = scale[c] * invstd[c] * (g - mean_dy - xhat * mean_dy_xhat);
                    }
                })
            });
        }
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
