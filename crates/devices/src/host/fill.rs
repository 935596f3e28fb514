//! fill.cu on the host: the synthetic batch, its labels and the first parameters, from the
//! counter-based streams of [`headroom_engine::synthetic`].

use rayon::prelude::*;

use super::values::{chunks, HostValues};
use super::{usize_of, HostBuffer, HostDevice, TASK};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Fill;
use headroom_engine::synthetic;

/// `out[i] = synthetic::uniform(key, first + i, scale)`.
pub fn fill_uniform(out: &mut [f32], first: usize, key: u64, scale: f32) {
    out.par_chunks_mut(TASK).enumerate().for_each(|(n, out)| {
        let first = first + n * TASK;
        for (i, value) in out.iter_mut().enumerate() {
            *value = synthetic::uniform(key, (first + i) as u64, scale);
        }
    });
}

impl Fill for HostDevice {
    fn fill_uniform(
        &mut self,
        out: &mut HostValues,
        len: u64,
        key: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            out.update(range.clone(), |out| {
                fill_uniform(out, range.start, key, scale)
            });
        }
        Ok(())
    }

    fn fill_labels(
        &mut self,
        labels: &mut HostBuffer<u32>,
        inputs: &HostValues,
        rows: u64,
        features: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        let (rows, features) = (usize_of(rows), usize_of(features));
        for range in chunks(rows * features, features) {
            let first_row = range.start / features;
            let rows_here = range.len() / features;
            synthetic::fill_labels(
                &mut labels[first_row..first_row + rows_here],
                &inputs.read(range),
                features,
                usize_of(classes),
            );
        }
        Ok(())
    }
}
