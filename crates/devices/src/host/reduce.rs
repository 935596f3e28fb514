//! reduce.cu on the host: bias gradients, the mean loss and the overflow check, summed in f64.

use super::values::{chunks, HostValues};
use super::{usize_of, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Reduce;

/// Adds each column of `dy` (rows of `sums.len()` values) to `sums`.
fn add_column_sums(dy: &[f32], sums: &mut [f64]) {
    for row in dy.chunks_exact(sums.len()) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
}

/// The mean of `values`, accumulated in f64.
pub fn mean(values: &[f32]) -> f32 {
    (values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len().max(1) as f64) as f32
}

impl Reduce for HostDevice {
    fn bias_gradient(
        &mut self,
        dy: &HostValues,
        db: &mut HostValues,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), DeviceError> {
        let (cols, spatial) = (usize_of(cols), usize_of(spatial));
        let mut sums = vec![0.0f64; cols * spatial];
        for range in chunks(usize_of(rows) * cols * spatial, cols * spatial) {
            add_column_sums(&dy.read(range), &mut sums);
        }
        let sums: Vec<f32> = sums
            .chunks_exact(spatial)
            .map(|plane| plane.iter().sum::<f64>() as f32)
            .collect();
        db.write(0, &sums);
        Ok(())
    }

    fn mean(
        &mut self,
        values: &HostValues,
        len: u64,
        accumulator: &mut HostValues,
    ) -> Result<f32, DeviceError> {
        let mean = mean(&values.read(0..usize_of(len)));
        accumulator.write(0, &[mean]);
        Ok(mean)
    }

    fn any_nonfinite(
        &mut self,
        buffers: &[(&HostValues, u64)],
        flag: &mut HostValues,
    ) -> Result<bool, DeviceError> {
        let found = buffers.iter().any(|&(values, len)| {
            chunks(usize_of(len), 1).any(|r| values.read(r).iter().any(|v| !v.is_finite()))
        });
        flag.write(0, &[f32::from(u8::from(found))]);
        Ok(found)
    }
}
