//! conv.cu: convolutions with groups and dilation, and their two gradients.

use cudarc::driver::PushKernelArg;

use super::{holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::modules::conv2d::Convolution;
use headroom_engine::step::Conv;

/// conv.cu's geometry arguments: rows, in_channels, height, width, out_channels, kernel, stride,
/// padding, dilation, groups, out_height, out_width.
fn geometry(rows: u64, conv: &Convolution) -> [i64; 12] {
    [
        rows,
        conv.in_channels,
        conv.height,
        conv.width,
        conv.out_channels,
        conv.kernel,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.out_height(),
        conv.out_width(),
    ]
    .map(|v| v as i64)
}

impl Conv for CudaDevice {
    fn conv2d_forward(
        &mut self,
        x: &DeviceValues,
        w: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let g = geometry(rows, conv);
        let storage = x.storage.code();
        launch!(self, Kernel::Conv2dForward, shapes::elementwise(rows * conv.outputs());
            holds(x, rows * conv.inputs()), holds(w, conv.weights()),
            holds_mut(y, rows * conv.outputs()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5], &g[6],
            &g[7], &g[8], &g[9], &g[10], &g[11], &storage)
    }

    fn conv2d_input_gradient(
        &mut self,
        dy: &DeviceValues,
        w: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let g = geometry(rows, conv);
        let storage = dy.storage.code();
        launch!(self, Kernel::Conv2dInputGradient, shapes::elementwise(rows * conv.inputs());
            holds(dy, rows * conv.outputs()), holds(w, conv.weights()),
            holds_mut(dx, rows * conv.inputs()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5], &g[6],
            &g[7], &g[8], &g[9], &g[10], &g[11], &storage)
    }

    fn conv2d_weight_gradient(
        &mut self,
        dy: &DeviceValues,
        x: &DeviceValues,
        dw: &mut DeviceValues,
        rows: u64,
        conv: &Convolution,
    ) -> Result<(), DeviceError> {
        let g = geometry(rows, conv);
        let (storage, dw_storage) = (dy.storage.code(), dw.storage.code());
        launch!(self, Kernel::Conv2dWeightGradient, shapes::conv2d_weight_gradient(conv.weights());
            holds(dy, rows * conv.outputs()), holds(x, rows * conv.inputs()),
            holds_mut(dw, conv.weights()), &g[0], &g[1], &g[2], &g[3], &g[4], &g[5], &g[6],
            &g[7], &g[8], &g[9], &g[10], &g[11], &storage, &dw_storage)
    }
}
