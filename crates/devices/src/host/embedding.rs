//! embedding.cu on the host: token ids looked up in a table, and the table's gradient, a row at
//! a time in token order (each sum rounded to the gradient's storage, as the kernel rounds); a
//! ViT's patch tokens and the first token, a sample at a time.

use super::values::{chunks, HostValues};
use super::{usize_of, HostBuffer, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Lookup;

impl Lookup for HostDevice {
    fn patch_tokens_forward(
        &mut self,
        planes: &HostValues,
        class: &HostValues,
        out: &mut HostValues,
        rows: u64,
        tokens: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let (t, d) = (usize_of(tokens), usize_of(dim));
        let class = class.read(0..d);
        for n in 0..usize_of(rows) {
            let planes = planes.read(n * d * t..(n + 1) * d * t);
            let mut sample = class.to_vec();
            sample.extend((0..t * d).map(|k| planes[(k % d) * t + k / d]));
            out.write(n * (t + 1) * d, &sample);
        }
        Ok(())
    }

    fn patch_tokens_backward(
        &mut self,
        dout: &HostValues,
        dplanes: &mut HostValues,
        dclass: &mut HostValues,
        rows: u64,
        tokens: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let (t, d) = (usize_of(tokens), usize_of(dim));
        let mut class = vec![0.0f32; d];
        for n in 0..usize_of(rows) {
            let sample = dout.read(n * (t + 1) * d..(n + 1) * (t + 1) * d);
            class
                .iter_mut()
                .zip(&sample[..d])
                .for_each(|(c, g)| *c += g);
            let planes: Vec<f32> = (0..d * t)
                .map(|k| sample[(k % t + 1) * d + k / t])
                .collect();
            dplanes.write(n * d * t, &planes);
        }
        dclass.write(0, &class);
        Ok(())
    }

    fn first_token_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let (p, d) = (usize_of(positions), usize_of(dim));
        for n in 0..usize_of(rows) {
            let first = x.read(n * p * d..n * p * d + d);
            y.write(n * d, &first);
        }
        Ok(())
    }

    fn first_token_backward(
        &mut self,
        dy: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let (p, d) = (usize_of(positions), usize_of(dim));
        for n in 0..usize_of(rows) {
            let mut sample = vec![0.0f32; p * d];
            sample[..d].copy_from_slice(&dy.read(n * d..(n + 1) * d));
            dx.write(n * p * d, &sample);
        }
        Ok(())
    }

    fn mean_tokens_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let (p, d) = (usize_of(positions), usize_of(dim));
        for n in 0..usize_of(rows) {
            let sample = x.read(n * p * d..(n + 1) * p * d);
            let mean: Vec<f32> = (0..d)
                .map(|j| {
                    let sum: f32 = (0..p).map(|t| sample[t * d + j]).sum();
                    sum / p as f32
                })
                .collect();
            y.write(n * d, &mean);
        }
        Ok(())
    }

    fn mean_tokens_backward(
        &mut self,
        dy: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        positions: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let (p, d) = (usize_of(positions), usize_of(dim));
        for n in 0..usize_of(rows) {
            let share: Vec<f32> = dy
                .read(n * d..(n + 1) * d)
                .iter()
                .map(|g| g / p as f32)
                .collect();
            dx.write(n * p * d, &share.repeat(p));
        }
        Ok(())
    }

    fn embedding_forward(
        &mut self,
        ids: &HostBuffer<i64>,
        weight: &HostValues,
        y: &mut HostValues,
        tokens: u64,
        dim: u64,
    ) -> Result<(), DeviceError> {
        let dim = usize_of(dim);
        for (i, &id) in ids[..usize_of(tokens)].iter().enumerate() {
            let row = weight.read(id as usize * dim..(id as usize + 1) * dim);
            y.write(i * dim, &row);
        }
        Ok(())
    }

    fn embedding_backward(
        &mut self,
        dy: &HostValues,
        ids: &HostBuffer<i64>,
        dw: &mut HostValues,
        tokens: u64,
        dim: u64,
        vocab: u64,
        padding: Option<u64>,
    ) -> Result<(), DeviceError> {
        let dim = usize_of(dim);
        for range in chunks(usize_of(vocab) * dim, 1) {
            dw.update(range, |dw| dw.fill(0.0));
        }
        for (i, &id) in ids[..usize_of(tokens)].iter().enumerate() {
            if padding == Some(id as u64) {
                continue;
            }
            let gradient = dy.read(i * dim..(i + 1) * dim);
            dw.update(id as usize * dim..(id as usize + 1) * dim, |row| {
                for (w, &g) in row.iter_mut().zip(gradient.iter()) {
                    *w += g;
                }
            });
        }
        Ok(())
    }
}
