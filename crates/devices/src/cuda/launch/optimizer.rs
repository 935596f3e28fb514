//! optimizer.cu: SGD, SGD with momentum, Adam and AdamW.

use cudarc::driver::PushKernelArg;

use super::{holds, holds_mut, DeviceValues};
use crate::cuda::kernel::Kernel;
use crate::cuda::{shapes, CudaDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::program::OptimizerState;
use headroom_engine::step::{
    Optimizer, UpdateRule, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, MOMENTUM,
};

impl Optimizer for CudaDevice {
    fn optimizer_step(
        &mut self,
        param: &mut DeviceValues,
        grad: &DeviceValues,
        state: &mut OptimizerState<DeviceValues>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        let (n, lr, unscale) = (len as i64, rule.learning_rate, rule.grad_scale);
        let storage = param.storage.code();
        let config = shapes::elementwise(len);
        let (c1, c2) = rule.bias_correction;
        match state {
            OptimizerState::Sgd => launch!(self, Kernel::Sgd, config;
                holds_mut(param, len), holds(grad, len), &n, &lr, &unscale, &storage),
            OptimizerState::Momentum { velocity } => launch!(self, Kernel::SgdMomentum, config;
                holds_mut(param, len), holds(grad, len), holds_mut(velocity, len),
                &n, &lr, &MOMENTUM, &unscale, &storage),
            OptimizerState::Adam { m, v } => launch!(self, Kernel::Adam, config;
                holds_mut(param, len), holds(grad, len), holds_mut(m, len), holds_mut(v, len),
                &n, &lr, &ADAM_BETA1, &ADAM_BETA2, &ADAM_EPSILON, &c1, &c2, &rule.weight_decay,
                &unscale, &storage),
        }
    }
}
