//! optimizer.cu on the host: SGD, SGD with momentum, Adam and AdamW, in f32 and rounded to the
//! parameters' storage.

use rayon::prelude::*;

use super::values::{chunks, HostValues};
use super::{usize_of, HostDevice, TASK};
use headroom_engine::device::DeviceError;
use headroom_engine::program::OptimizerState;
use headroom_engine::step::{
    Optimizer, UpdateRule, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, MOMENTUM,
};

/// One optimizer update; `state` decides which.
pub fn optimizer_step(
    param: &mut [f32],
    grad: &[f32],
    state: OptimizerState<&mut [f32]>,
    rule: UpdateRule,
) {
    let params = param.par_chunks_mut(TASK).zip(grad.par_chunks(TASK));
    match state {
        OptimizerState::Sgd => params.for_each(|(p, g)| sgd(p, g, rule)),
        OptimizerState::Momentum { velocity } => params
            .zip(velocity.par_chunks_mut(TASK))
            .for_each(|((p, g), v)| momentum(p, g, v, rule)),
        OptimizerState::Adam { m, v } => params
            .zip(m.par_chunks_mut(TASK))
            .zip(v.par_chunks_mut(TASK))
            .for_each(|(((p, g), m), v)| adam(p, g, m, v, rule)),
    }
}

fn sgd(param: &mut [f32], grad: &[f32], rule: UpdateRule) {
    for (p, &g) in param.iter_mut().zip(grad) {
        *p -= rule.learning_rate * (g * rule.grad_scale);
    }
}

fn momentum(param: &mut [f32], grad: &[f32], velocity: &mut [f32], rule: UpdateRule) {
    for ((p, &g), v) in param.iter_mut().zip(grad).zip(velocity) {
        *v = MOMENTUM * *v + g * rule.grad_scale;
        *p -= rule.learning_rate * *v;
    }
}

fn adam(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], rule: UpdateRule) {
    let (c1, c2) = rule.bias_correction;
    for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m).zip(v) {
        let g = g * rule.grad_scale;
        *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * g;
        *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * g * g;
        *p -= rule.learning_rate
            * (rule.weight_decay * *p + (*m * c1) / ((*v * c2).sqrt() + ADAM_EPSILON));
    }
}

impl Optimizer for HostDevice {
    fn optimizer_step(
        &mut self,
        param: &mut HostValues,
        grad: &HostValues,
        state: &mut OptimizerState<HostValues>,
        len: u64,
        rule: UpdateRule,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let grad = grad.read(range.clone());
            param.update(range.clone(), |param| match state {
                OptimizerState::Sgd => optimizer_step(param, &grad, OptimizerState::Sgd, rule),
                OptimizerState::Momentum { velocity } => velocity.update(range, |velocity| {
                    optimizer_step(param, &grad, OptimizerState::Momentum { velocity }, rule)
                }),
                OptimizerState::Adam { m, v } => m.update(range.clone(), |m| {
                    v.update(range, |v| {
                        optimizer_step(param, &grad, OptimizerState::Adam { m, v }, rule)
                    })
                }),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_engine::plan::OptimizerKind;

    fn one_update(kind: OptimizerKind, step: u32, state: OptimizerState<&mut [f32]>) -> f32 {
        let mut p = [1.0f32];
        optimizer_step(&mut p, &[0.5], state, UpdateRule::new(kind, 0.1, step));
        p[0]
    }

    fn adam<'a>(m: &'a mut [f32], v: &'a mut [f32]) -> OptimizerState<&'a mut [f32]> {
        OptimizerState::Adam { m, v }
    }

    #[test]
    fn sgd_by_hand() {
        assert_eq!(
            one_update(OptimizerKind::Sgd, 1, OptimizerState::Sgd),
            1.0 - 0.1 * 0.5
        );
    }

    #[test]
    fn momentum_by_hand() {
        let mut v = [0.2f32];
        let velocity = OptimizerState::Momentum {
            velocity: &mut v[..],
        };
        let p = one_update(OptimizerKind::SgdMomentum, 1, velocity);
        assert!((v[0] - (0.9 * 0.2 + 0.5)).abs() < 1e-7);
        assert!((p - (1.0 - 0.1 * 0.68)).abs() < 1e-7);
    }

    #[test]
    fn adam_first_step_moves_by_the_learning_rate() {
        let (mut m, mut v) = ([0.0f32], [0.0f32]);
        let p = one_update(OptimizerKind::Adam, 1, adam(&mut m, &mut v));
        // m = 0.05, v = 0.00025; corrected: 0.5 and 0.25 -> step = lr * 0.5 / (0.5 + eps)
        assert!((m[0] - 0.05).abs() < 1e-7);
        assert!((v[0] - 0.000_25).abs() < 1e-8); // (1 - 0.999) is inexact in f32
        assert!((p - (1.0 - 0.1 * 0.5 / (0.5 + 1e-8))).abs() < 1e-6, "{p}");
    }

    #[test]
    fn adam_second_step_by_hand() {
        let (mut m, mut v) = ([0.05f32], [0.000_25f32]);
        let p = one_update(OptimizerKind::Adam, 2, adam(&mut m, &mut v));
        let m2 = 0.9 * 0.05 + 0.1 * 0.5; // 0.095
        let v2 = 0.999 * 0.000_25 + 0.001 * 0.25; // 0.00049975
        let m_hat = m2 / (1.0 - 0.81);
        let v_hat: f64 = v2 / (1.0 - 0.998_001);
        let want = 1.0 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((p as f64 - want).abs() < 1e-5, "{p} vs {want}");
    }

    #[test]
    fn adamw_decays_the_weight_as_well() {
        let (mut m, mut v) = ([0.0f32], [0.0f32]);
        let p = one_update(OptimizerKind::Adamw, 1, adam(&mut m, &mut v));
        let want = 1.0 - 0.1 * (0.01 * 1.0 + 0.5 / (0.5 + 1e-8));
        assert!((p - want).abs() < 1e-6, "{p} vs {want}");
    }
}
