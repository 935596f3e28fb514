//! embedding.cu on the host: token ids looked up in a table, and the table's gradient, a row at
//! a time in token order (each sum rounded to the gradient's storage, as the kernel rounds).

use super::values::{chunks, HostValues};
use super::{usize_of, HostBuffer, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::step::Lookup;

impl Lookup for HostDevice {
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
