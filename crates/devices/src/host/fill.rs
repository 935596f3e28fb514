//! fill.cu on the host: the synthetic batch (values or token ids), its labels and the first
//! parameters, from the
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

    fn fill_token_ids(
        &mut self,
        ids: &mut HostBuffer<i64>,
        len: u64,
        key: u64,
        vocab: u64,
    ) -> Result<(), DeviceError> {
        fill_tokens(&mut ids[..usize_of(len)], key, |t| t as i64, vocab);
        Ok(())
    }

    fn fill_token_labels(
        &mut self,
        labels: &mut HostBuffer<u32>,
        len: u64,
        key: u64,
        classes: u64,
    ) -> Result<(), DeviceError> {
        fill_tokens(&mut labels[..usize_of(len)], key, |t| t as u32, classes);
        Ok(())
    }
}

/// `out[i] = as_element(synthetic::token(key, i, vocab))`.
fn fill_tokens<T: Send>(out: &mut [T], key: u64, as_element: impl Fn(u64) -> T + Sync, vocab: u64) {
    out.par_chunks_mut(TASK).enumerate().for_each(|(n, out)| {
        let first = n * TASK;
        for (i, element) in out.iter_mut().enumerate() {
            *element = as_element(synthetic::token(key, (first + i) as u64, vocab));
        }
    });
}
