//! The kernel checks' own references: each operation restated in f64 from its definition, so
//! that a check of the host device compares the host with something other than itself. Results
//! are returned in f32, to be rounded to the storage under test.

use headroom_engine::modules::activation::Nonlinearity;
use headroom_engine::program::{OptimizerState, SavedAs};
use headroom_engine::step::{UpdateRule, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, MOMENTUM};

/// `sqrt(2 / pi)`, of GELU's tanh approximation.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic term's coefficient of GELU's tanh approximation.
const GELU_CUBIC: f64 = 0.044_715;

/// Whether the non-linearity's derivative follows from its saved tensor `saved_as`: from its
/// input always; from its output only where the function is monotone with a known inverse
/// slope (not gelu or silu, which PyTorch never saves so).
pub fn recoverable(nonlinearity: Nonlinearity, saved_as: SavedAs) -> bool {
    saved_as == SavedAs::Input
        || !matches!(
            nonlinearity,
            Nonlinearity::GeluTanh | Nonlinearity::GeluErf | Nonlinearity::Silu
        )
}

/// The non-linearity's derivative from its saved input or output `s`, differentiated by hand.
pub fn derivative(nonlinearity: Nonlinearity, s: f64, saved_as: SavedAs) -> f64 {
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let step = |above: bool| f64::from(u8::from(above));
    match (nonlinearity, saved_as) {
        (Nonlinearity::Relu, _) => step(s > 0.0),
        (Nonlinearity::Relu6, _) => step(s > 0.0 && s < 6.0),
        (Nonlinearity::LeakyRelu { slope }, _) => match s > 0.0 {
            true => 1.0,
            false => f64::from(slope),
        },
        (Nonlinearity::Tanh, SavedAs::Output) => 1.0 - s * s,
        (Nonlinearity::Tanh, SavedAs::Input) => 1.0 - s.tanh().powi(2),
        (Nonlinearity::Sigmoid, SavedAs::Output) => s * (1.0 - s),
        (Nonlinearity::Sigmoid, SavedAs::Input) => sigmoid(s) * (1.0 - sigmoid(s)),
        (Nonlinearity::Silu, _) => sigmoid(s) * (1.0 + s * (1.0 - sigmoid(s))),
        (Nonlinearity::GeluTanh, _) => {
            let t = (SQRT_2_OVER_PI * (s + GELU_CUBIC * s.powi(3))).tanh();
            0.5 * (1.0 + t)
                + 0.5 * s * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * s * s)
        }
        (Nonlinearity::GeluErf, _) => {
            let density = (-0.5 * s * s).exp() / (2.0 * std::f64::consts::PI).sqrt();
            0.5 * (1.0 + libm::erf(s / std::f64::consts::SQRT_2)) + s * density
        }
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
