//! gemm.cu: the three products of a linear layer, through [`CudaDevice::gemm`].

use super::DeviceValues;
use crate::cuda::shapes::GemmShape;
use crate::cuda::CudaDevice;
use headroom_engine::device::DeviceError;
use headroom_engine::step::Gemm;

impl Gemm for CudaDevice {
    fn linear_forward(
        &mut self,
        x: &DeviceValues,
        w: &DeviceValues,
        y: &mut DeviceValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(x, w, y, GemmShape::forward(rows, inputs, outputs))
    }

    fn weight_gradient(
        &mut self,
        dy: &DeviceValues,
        x: &DeviceValues,
        dw: &mut DeviceValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, x, dw, GemmShape::weight_gradient(rows, inputs, outputs))
    }

    fn input_gradient(
        &mut self,
        dy: &DeviceValues,
        w: &DeviceValues,
        dx: &mut DeviceValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        self.gemm(dy, w, dx, GemmShape::input_gradient(rows, inputs, outputs))
    }
}
