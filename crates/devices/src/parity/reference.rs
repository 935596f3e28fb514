//! The kernel checks' own references: each operation restated in f64 from its definition, so
//! that a check of the host device compares the host with something other than itself. Results
//! are returned in f32, to be rounded to the storage under test.

use headroom_engine::plan::program::OptimizerState;
use headroom_engine::plan::Activation;
use headroom_engine::step::{UpdateRule, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, MOMENTUM};

/// `sqrt(2 / pi)`, of GELU's tanh approximation.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic term's coefficient of GELU's tanh approximation.
const GELU_CUBIC: f64 = 0.044_715;

/// The activation at `x`.
pub fn activate(activation: Activation, x: f64) -> f64 {
    match activation {
        Activation::Relu => x.max(0.0),
        Activation::Tanh => x.tanh(),
        Activation::Gelu => {
            0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_CUBIC * x.powi(3))).tanh())
        }
    }
}

/// The activation's derivative at its input `x`.
pub fn derivative(activation: Activation, x: f64) -> f64 {
    match activation {
        Activation::Relu => f64::from(u8::from(x > 0.0)),
        Activation::Tanh => 1.0 - x.tanh().powi(2),
        Activation::Gelu => {
            let t = (SQRT_2_OVER_PI * (x + GELU_CUBIC * x.powi(3))).tanh();
            0.5 * (1.0 + t)
                + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
        }
    }
}

/// The activation's derivative from what PyTorch saves for it: relu's and tanh's output, gelu's
/// input.
pub fn derivative_from_saved(activation: Activation, saved: f64) -> f64 {
    match activation {
        Activation::Relu => f64::from(u8::from(saved > 0.0)),
        Activation::Tanh => 1.0 - saved * saved,
        Activation::Gelu => derivative(activation, saved),
    }
}

/// Each column's sum of `values`, rows of `cols`.
pub fn column_sums(values: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0.0f64; cols];
    for row in values.chunks_exact(cols) {
        for (sum, &v) in sums.iter_mut().zip(row) {
            *sum += f64::from(v);
        }
    }
    sums.into_iter().map(|s| s as f32).collect()
}

/// The mean of `values`.
pub fn mean(values: &[f32]) -> f32 {
    let sum: f64 = values.iter().copied().map(f64::from).sum();
    (sum / values.len().max(1) as f64) as f32
}

/// Each row's softmax cross-entropy loss against its label, and the gradient of the mean loss
/// over the rows with respect to the logits.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows = labels.len();
    let mut losses = Vec::with_capacity(rows);
    let mut gradient = Vec::with_capacity(logits.len());
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let max = row
            .iter()
            .map(|&v| f64::from(v))
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
        let log_sum = max + sum.ln();
        losses.push((log_sum - f64::from(row[label as usize])) as f32);
        for (j, &v) in row.iter().enumerate() {
            let p = (f64::from(v) - log_sum).exp();
            let target = f64::from(u8::from(j == label as usize));
            gradient.push(((p - target) / rows as f64) as f32);
        }
    }
    (losses, gradient)
}

/// One update of `param` by `grad` under `rule`, the state `state` holds (none for SGD):
/// PyTorch's SGD, SGD with momentum (`v = mu v + g`, `p -= lr v`) and Adam with decoupled
/// weight decay (`p -= lr (wd p + m_hat / (sqrt(v_hat) + eps))`).
pub fn optimizer_step(
    param: &mut [f32],
    grad: &[f32],
    state: OptimizerState<&mut [f32]>,
    rule: UpdateRule,
) {
    let lr = f64::from(rule.learning_rate);
    let scaled = |g: f32| f64::from(g) * f64::from(rule.grad_scale);
    match state {
        OptimizerState::Sgd => {
            for (p, &g) in param.iter_mut().zip(grad) {
                *p = (f64::from(*p) - lr * scaled(g)) as f32;
            }
        }
        OptimizerState::Momentum { velocity } => {
            for ((p, &g), v) in param.iter_mut().zip(grad).zip(velocity) {
                let next = f64::from(MOMENTUM) * f64::from(*v) + scaled(g);
                *v = next as f32;
                *p = (f64::from(*p) - lr * next) as f32;
            }
        }
        OptimizerState::Adam { m, v } => {
            let (beta1, beta2) = (f64::from(ADAM_BETA1), f64::from(ADAM_BETA2));
            let (c1, c2) = rule.bias_correction;
            for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m).zip(v) {
                let g = scaled(g);
                let first = beta1 * f64::from(*m) + (1.0 - beta1) * g;
                let second = beta2 * f64::from(*v) + (1.0 - beta2) * g * g;
                *m = first as f32;
                *v = second as f32;
                let step = first * f64::from(c1)
                    / ((second * f64::from(c2)).sqrt() + f64::from(ADAM_EPSILON));
                let decay = f64::from(rule.weight_decay) * f64::from(*p);
                *p = (f64::from(*p) - lr * (decay + step)) as f32;
            }
        }
    }
}
