//! reduce.cu: bias gradients, the mean loss and the overflow check of loss scaling.

use cudarc::driver::PushKernelArg;

use super::{holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use crate::transfer::Transfer;
use headroom_engine::device::DeviceError;
use headroom_engine::plan::Storage;
use headroom_engine::step::Reduce;

impl Reduce for CudaDevice {
    fn bias_gradient(
        &mut self,
        dy: &DeviceValues,
        db: &mut DeviceValues,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), DeviceError> {
        let (in_storage, out_storage) = (dy.storage.code(), db.storage.code());
        if spatial > 1 {
            let (r, c, k) = (rows as i64, cols as i64, spatial as i64);
            return launch!(self, Kernel::ChannelSum, shapes::block_per_channel(cols);
                holds(dy, rows * cols * spatial), holds_mut(db, cols), &r, &c, &k, &in_storage,
                &out_storage);
        }
        let may_split = db.storage == Storage::F32;
        let (config, rows_per_chunk) =
            shapes::column_sum(rows, cols, self.multiprocessors, may_split);
        let accumulate = i32::from(config.grid_dim.0 > 1);
        if accumulate == 1 {
            self.zero(db)?;
        }
        let (r, c, per_chunk) = (rows as i64, cols as i64, rows_per_chunk as i64);
        launch!(self, Kernel::ColumnSum, config;
            holds(dy, rows * cols), holds_mut(db, cols), &r, &c, &per_chunk, &accumulate,
            &in_storage, &out_storage)
    }

    fn mean(
        &mut self,
        values: &DeviceValues,
        len: u64,
        accumulator: &mut DeviceValues,
    ) -> Result<f32, DeviceError> {
        self.zero(accumulator)?;
        let n = len as i64;
        launch!(self, Kernel::Mean, shapes::mean(len);
            holds(values, len), holds_mut(accumulator, 1), &n)?;
        Ok(self.read_values(accumulator, 1)?[0])
    }

    fn any_nonfinite(
        &mut self,
        buffers: &[(&DeviceValues, u64)],
        flag: &mut DeviceValues,
    ) -> Result<bool, DeviceError> {
        self.zero(flag)?;
        for &(values, len) in buffers {
            let (n, storage) = (len as i64, values.storage.code());
            launch!(self, Kernel::Nonfinite, shapes::elementwise(len);
                holds(values, len), &n, &storage, holds_mut(flag, 1))?;
        }
        Ok(self.read_values(flag, 1)?[0] != 0.0)
    }
}
