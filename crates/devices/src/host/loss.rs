//! loss.cu on the host: the softmax cross-entropy, row by row, stable for any logits.

use rayon::prelude::*;

use super::values::{chunks, HostValues};
use super::{task_rows, usize_of, HostBuffer, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Loss;

/// Numerically stable softmax cross-entropy per row; the logits become the gradient of the
/// mean loss over the whole batch, `inv_rows` being one over its size.
pub fn softmax_cross_entropy(
    logits: &mut [f32],
    labels: &[u32],
    row_loss: &mut [f32],
    classes: usize,
    inv_rows: f32,
) {
    let rows = task_rows(classes);
    logits
        .par_chunks_mut(rows * classes)
        .zip(labels.par_chunks(rows))
        .zip(row_loss.par_chunks_mut(rows))
        .for_each(|((logits, labels), row_loss)| {
            for ((row, &label), loss) in logits
                .chunks_exact_mut(classes)
                .zip(labels)
                .zip(row_loss.iter_mut())
            {
                *loss = softmax_cross_entropy_row(row, label as usize, inv_rows);
            }
        });
}

/// One row of [`softmax_cross_entropy`]: returns its loss, leaves its gradient in `row`.
fn softmax_cross_entropy_row(row: &mut [f32], label: usize, scale: f32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    let loss = sum.ln() - (row[label] - max);
    for (j, v) in row.iter_mut().enumerate() {
        let p = (*v - max).exp() / sum;
        *v = (p - if j == label { 1.0 } else { 0.0 }) * scale;
    }
    loss
}

impl Loss for HostDevice {
    fn softmax_cross_entropy(
        &mut self,
        logits: &mut HostValues,
        labels: &HostBuffer<u32>,
        row_loss: &mut HostValues,
        rows: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (rows, classes) = (usize_of(rows), usize_of(classes));
        let inv_rows = 1.0 / rows as f32;
        for range in chunks(rows * classes, classes) {
            let first = range.start / classes;
            let here = first..first + range.len() / classes;
            logits.update(range, |logits| {
                row_loss.update(here.clone(), |loss| {
                    softmax_cross_entropy(logits, &labels[here], loss, classes, inv_rows)
                })
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_cross_entropy_by_hand() {
        // logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> loss ln(4/3)
        let mut logits = vec![0.0, 3f32.ln(), 0.0, 0.0];
        let mut loss = vec![0.0; 2];
        softmax_cross_entropy(&mut logits, &[1, 0], &mut loss, 2, 0.5);
        assert!((loss[0] - (4.0f32 / 3.0).ln()).abs() < 1e-6);
        assert!((loss[1] - 2f32.ln()).abs() < 1e-6);
        let want = [0.25 / 2.0, -0.25 / 2.0, -0.5 / 2.0, 0.5 / 2.0];
        for (g, w) in logits.iter().zip(want) {
            assert!((g - w).abs() <= 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn softmax_is_stable_for_huge_logits() {
        let mut logits = vec![1e30, -1e30, 0.0];
        let mut loss = vec![0.0];
        softmax_cross_entropy(&mut logits, &[0], &mut loss, 3, 1.0);
        assert_eq!(loss[0], 0.0);
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
