//! pool.cu: max, average and adaptive average pooling, and their backward.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{elements_up_to, elements_up_to_mut, holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::modules::adaptive_avg_pool2d::AdaptivePooling;
use headroom_engine::modules::pooling::Pooling;
use headroom_engine::step::Pool;

/// Pooling's geometry arguments: rows, channels, height, width, kernel, stride, padding,
/// dilation, out_height, out_width (average pooling takes all but the dilation).
fn geometry(rows: u64, pool: &Pooling) -> [i64; 10] {
    [
        rows,
        pool.channels,
        pool.height,
        pool.width,
        pool.kernel,
        pool.stride,
        pool.padding,
        pool.dilation,
        pool.out_height,
        pool.out_width,
    ]
    .map(|v| v as i64)
}

/// Adaptive pooling's geometry arguments: rows, channels, height, width, out_height, out_width.
fn adaptive_geometry(rows: u64, pool: &AdaptivePooling) -> [i64; 6] {
    [
        rows,
        pool.channels,
        pool.height,
        pool.width,
        pool.out_height,
        pool.out_width,
    ]
    .map(|v| v as i64)
}

impl Pool for CudaDevice {
    fn max_pool_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        indices: &mut CudaSlice<i64>,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let g = geometry(rows, pool);
        let (outputs, storage) = (rows * pool.outputs(), x.storage.code());
        launch!(self, Kernel::MaxPool2dForward, shapes::elementwise(outputs);
            holds(x, rows * pool.inputs()), holds_mut(y, outputs),
            elements_up_to_mut(indices, outputs), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5],
            &g[6], &g[7], &g[8], &g[9], &storage)
    }

    fn max_pool_backward(
        &mut self,
        dy: &DeviceValues,
        indices: &CudaSlice<i64>,
        dx: &mut DeviceValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let g = geometry(rows, pool);
        let (outputs, storage) = (rows * pool.outputs(), dy.storage.code());
        launch!(self, Kernel::MaxPool2dBackward, shapes::elementwise(rows * pool.inputs());
            holds(dy, outputs), elements_up_to(indices, outputs),
            holds_mut(dx, rows * pool.inputs()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5],
            &g[6], &g[7], &g[8], &g[9], &storage)
    }

    fn avg_pool_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        // Max pooling's arguments less the dilation (g[7]), which average pooling lacks.
        let g = geometry(rows, pool);
        let (outputs, storage) = (rows * pool.outputs(), x.storage.code());
        let count_include_pad = i32::from(pool.count_include_pad);
        launch!(self, Kernel::AvgPool2dForward, shapes::elementwise(outputs);
            holds(x, rows * pool.inputs()), holds_mut(y, outputs), &g[0], &g[1], &g[2], &g[3],
            &g[4], &g[5], &g[6], &g[8], &g[9], &count_include_pad, &storage)
    }

    fn avg_pool_backward(
        &mut self,
        dy: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        pool: &Pooling,
    ) -> Result<(), DeviceError> {
        let g = geometry(rows, pool);
        let storage = dy.storage.code();
        let count_include_pad = i32::from(pool.count_include_pad);
        launch!(self, Kernel::AvgPool2dBackward, shapes::elementwise(rows * pool.inputs());
            holds(dy, rows * pool.outputs()), holds_mut(dx, rows * pool.inputs()), &g[0], &g[1],
            &g[2], &g[3], &g[4], &g[5], &g[6], &g[8], &g[9], &count_include_pad, &storage)
    }

    fn adaptive_pool_forward(
        &mut self,
        x: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        pool: &AdaptivePooling,
    ) -> Result<(), DeviceError> {
        let g = adaptive_geometry(rows, pool);
        let (outputs, storage) = (rows * pool.outputs(), x.storage.code());
        launch!(self, Kernel::AdaptiveAvgPool2dForward, shapes::elementwise(outputs);
            holds(x, rows * pool.inputs()), holds_mut(y, outputs), &g[0], &g[1], &g[2], &g[3],
            &g[4], &g[5], &storage)
    }

    fn adaptive_pool_backward(
        &mut self,
        dy: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        pool: &AdaptivePooling,
    ) -> Result<(), DeviceError> {
        let g = adaptive_geometry(rows, pool);
        let storage = dy.storage.code();
        launch!(self, Kernel::AdaptiveAvgPool2dBackward, shapes::elementwise(rows * pool.inputs());
            holds(dy, rows * pool.outputs()), holds_mut(dx, rows * pool.inputs()), &g[0], &g[1],
            &g[2], &g[3], &g[4], &g[5], &storage)
    }
}
