//! The training-step operations on plain slices: the reference every CUDA kernel is checked
//! against. Matrix products go to the `gemm` crate (the widest vectors the CPU has); the
//! element-wise parts are written here and spread over every core with rayon, each element
//! computed exactly as one thread would.

use rayon::prelude::*;

use headroom_engine::plan::program::OptimizerState;
use headroom_engine::plan::Activation;
use headroom_engine::step::{UpdateRule, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, MOMENTUM};
use headroom_engine::synthetic;

/// `c (m x n) = a (m x k) * b (k x n)`, plus `c` when `accumulate`; each operand given by its
/// row and column strides; spread over `parallelism`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
    c: &mut [f32],
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm operand too small"
    );
    // SAFETY: the assertion above keeps every strided access inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_strides.1,
            a_strides.0,
            b.as_ptr(),
            b_strides.1,
            b_strides.0,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Every thread of rayon's pool for the products, as for the element-wise passes (the pool's
/// size is read once; `available_parallelism` would read the cgroup limits on every product).
fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// `y (rows x outputs) = x (rows x inputs) * w^T`, `w` being `outputs x inputs`.
pub fn linear_forward(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
) {
    gemm(
        rows,
        inputs,
        outputs,
        x,
        (inputs as isize, 1),
        w,
        (1, inputs as isize),
        y,
        false,
        parallelism(),
    );
}

/// `dw (outputs x inputs) = dy^T * x`, added to `dw` when `accumulate`.
pub fn weight_gradient(
    dy: &[f32],
    x: &[f32],
    dw: &mut [f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
    accumulate: bool,
) {
    gemm(
        outputs,
        rows,
        inputs,
        dy,
        (1, outputs as isize),
        x,
        (inputs as isize, 1),
        dw,
        accumulate,
        parallelism(),
    );
}

/// `dx (rows x inputs) = dy (rows x outputs) * w`.
pub fn input_gradient(
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
) {
    gemm(
        rows,
        outputs,
        inputs,
        dy,
        (outputs as isize, 1),
        w,
        (inputs as isize, 1),
        dx,
        false,
        parallelism(),
    );
}

/// tanh as a 13/6-degree rational function of the input clamped to [-9, 9] (past which f32's
/// tanh is ±1): Eigen's interpolant, the one XLA's CPU backend uses. Within 4 units of f32's
/// relative precision of the true value (3.3 measured; CUDA's `tanhf` is within 2 ulp), with no
/// branch, so the element-wise loops vectorise.
pub fn tanh(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        4.893_524_6e-3,
        6.372_619_3e-4,
        1.485_722_4e-5,
        5.122_297e-8,
        -8.604_672e-11,
        2.000_188e-13,
        -2.760_768_5e-16,
    ];
    const BETA: [f32; 4] = [4.893_525e-3, 2.268_434_6e-3, 1.185_347_1e-4, 1.198_258_4e-6];
    let x = x.clamp(-9.0, 9.0);
    let x2 = x * x;
    let p = ALPHA.iter().rev().fold(0.0, |acc, &a| acc * x2 + a);
    let q = BETA.iter().rev().fold(0.0, |acc, &b| acc * x2 + b);
    (x * p / q).clamp(-1.0, 1.0)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// The activation function.
pub fn activate(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Relu => x.max(0.0),
        Activation::Tanh => tanh(x),
        Activation::Gelu => 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x))),
    }
}

/// The activation's derivative at `x`.
pub fn activation_derivative(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Tanh => {
            let t = tanh(x);
            1.0 - t * t
        }
        Activation::Gelu => {
            let t = tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
            0.5 * (1.0 + t)
                + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
        }
    }
}

/// Elements a rayon task takes at least: enough to outweigh handing work to another core.
const TASK: usize = 16 * 1024;

/// Whole rows of `cols` values making up about one task.
fn task_rows(cols: usize) -> usize {
    (TASK / cols.max(1)).max(1)
}

/// `pre += bias` per row.
pub fn bias_add(pre: &mut [f32], bias: &[f32], cols: usize) {
    pre.par_chunks_mut(task_rows(cols) * cols).for_each(|rows| {
        for row in rows.chunks_exact_mut(cols) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// `post = activation(pre)`.
pub fn activate_all(pre: &[f32], post: &mut [f32], activation: Activation) {
    post.par_chunks_mut(TASK)
        .zip(pre.par_chunks(TASK))
        .for_each(|(post, pre)| {
            for (p, &z) in post.iter_mut().zip(pre) {
                *p = activate(activation, z);
            }
        });
}

/// `pre += bias` per row and `post = activation(pre)` in one pass, when `pre` is stored as
/// computed (f32).
pub fn bias_activate(
    pre: &mut [f32],
    bias: &[f32],
    post: &mut [f32],
    cols: usize,
    activation: Activation,
) {
    let task = task_rows(cols) * cols;
    pre.par_chunks_mut(task)
        .zip(post.par_chunks_mut(task))
        .for_each(|(pre, post)| {
            for (pre, post) in pre.chunks_exact_mut(cols).zip(post.chunks_exact_mut(cols)) {
                for ((z, p), b) in pre.iter_mut().zip(post.iter_mut()).zip(bias) {
                    *z += b;
                    *p = activate(activation, *z);
                }
            }
        });
}

/// `pre = grad_post * activation'(pre)`.
pub fn activation_backward(grad_post: &[f32], pre: &mut [f32], activation: Activation) {
    pre.par_chunks_mut(TASK)
        .zip(grad_post.par_chunks(TASK))
        .for_each(|(pre, grad_post)| {
            for (z, &g) in pre.iter_mut().zip(grad_post) {
                *z = g * activation_derivative(activation, *z);
            }
        });
}

/// `out = grad * activation'(...)` from what the activation saved: its output for relu and tanh,
/// its input for gelu.
pub fn activation_gradient(grad: &[f32], saved: &[f32], out: &mut [f32], activation: Activation) {
    out.par_chunks_mut(TASK)
        .zip(grad.par_chunks(TASK).zip(saved.par_chunks(TASK)))
        .for_each(|(out, (grad, saved))| {
            for ((o, &g), &s) in out.iter_mut().zip(grad).zip(saved) {
                *o = g * derivative_from_saved(activation, s);
            }
        });
}

/// Training-mode dropout of values `first..` of a buffer: `mask[i]` is whether
/// [`synthetic::keeps`] keeps value `first + i`, `y[i] = x[i] * scale` where kept, else 0.
pub fn dropout_forward(x: &[f32], mask: &mut [u8], y: &mut [f32], first: usize, p: f32, key: u64) {
    let scale = synthetic::dropout_scale(p);
    y.par_chunks_mut(TASK)
        .zip(mask.par_chunks_mut(TASK).zip(x.par_chunks(TASK)))
        .enumerate()
        .for_each(|(n, (y, (mask, x)))| {
            let first = first + n * TASK;
            for (i, ((y, m), &x)) in y.iter_mut().zip(mask).zip(x).enumerate() {
                let kept = synthetic::keeps(key, (first + i) as u64, p);
                *m = u8::from(kept);
                *y = if kept { x * scale } else { 0.0 };
            }
        });
}

/// Dropout's backward, in place: `grad[i] *= scale` where `mask[i]` kept, else 0.
pub fn dropout_backward(grad: &mut [f32], mask: &[u8], p: f32) {
    let scale = synthetic::dropout_scale(p);
    grad.par_chunks_mut(TASK)
        .zip(mask.par_chunks(TASK))
        .for_each(|(grad, mask)| {
            for (g, &m) in grad.iter_mut().zip(mask) {
                *g = if m != 0 { *g * scale } else { 0.0 };
            }
        });
}

/// The derivative of `activation` from what it saves: relu's and tanh's output, gelu's input.
pub fn derivative_from_saved(activation: Activation, saved: f32) -> f32 {
    match activation {
        Activation::Relu => f32::from(u8::from(saved > 0.0)),
        Activation::Tanh => 1.0 - saved * saved,
        Activation::Gelu => activation_derivative(activation, saved),
    }
}

/// `out[i] = synthetic::uniform(key, first + i, scale)`.
pub fn fill_uniform(out: &mut [f32], first: usize, key: u64, scale: f32) {
    out.par_chunks_mut(TASK).enumerate().for_each(|(n, out)| {
        let first = first + n * TASK;
        for (i, value) in out.iter_mut().enumerate() {
            *value = headroom_engine::synthetic::uniform(key, (first + i) as u64, scale);
        }
    });
}

/// `to = from * scale`.
pub fn scaled_copy(from: &[f32], to: &mut [f32], scale: f32) {
    to.par_chunks_mut(TASK)
        .zip(from.par_chunks(TASK))
        .for_each(|(to, from)| {
            for (t, &f) in to.iter_mut().zip(from) {
                *t = f * scale;
            }
        });
}

/// Adds each column of `dy` (rows of `sums.len()` values) to `sums`: the bias gradient,
/// accumulated in f64.
pub fn add_column_sums(dy: &[f32], sums: &mut [f64]) {
    for row in dy.chunks_exact(sums.len()) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
}

/// `db[j] = sum over rows of dy[i, j]`, accumulated in f64.
pub fn bias_gradient(dy: &[f32], db: &mut [f32], cols: usize) {
    let mut sums = vec![0.0f64; cols];
    add_column_sums(dy, &mut sums);
    for (d, s) in db.iter_mut().zip(sums) {
        *d = s as f32;
    }
}

/// Numerically stable softmax cross-entropy per row; the logits become the gradient of the
/// mean loss over the whole batch, `inv_rows` being one over its size.
pub fn softmax_cross_entropy(
    logits: &mut [f32],
    labels: &[u32],
    row_loss: &mut [f32],
    classes: usize,
    inv_rows: f32,
) {
    let rows = task_rows(classes);
    logits
        .par_chunks_mut(rows * classes)
        .zip(labels.par_chunks(rows))
        .zip(row_loss.par_chunks_mut(rows))
        .for_each(|((logits, labels), row_loss)| {
            for ((row, &label), loss) in logits
                .chunks_exact_mut(classes)
                .zip(labels)
                .zip(row_loss.iter_mut())
            {
                *loss = softmax_cross_entropy_row(row, label as usize, inv_rows);
            }
        });
}

/// One row of [`softmax_cross_entropy`]: returns its loss, leaves its gradient in `row`.
fn softmax_cross_entropy_row(row: &mut [f32], label: usize, scale: f32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    let loss = sum.ln() - (row[label] - max);
    for (j, v) in row.iter_mut().enumerate() {
        let p = (*v - max).exp() / sum;
        *v = (p - if j == label { 1.0 } else { 0.0 }) * scale;
    }
    loss
}

/// The mean of `values`, accumulated in f64.
pub fn mean(values: &[f32]) -> f32 {
    (values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64) as f32
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_engine::plan::OptimizerKind;

    // The matrix products are checked against a naive f64 product in `crate::parity`.

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn activation_derivatives_match_finite_differences() {
        for activation in [Activation::Relu, Activation::Gelu, Activation::Tanh] {
            for x in [-2.5f32, -0.7, -0.1, 0.2, 0.9, 3.0] {
                let h = 1e-3f32;
                let numeric =
                    (activate(activation, x + h) - activate(activation, x - h)) / (2.0 * h);
                let analytic = activation_derivative(activation, x);
                assert!(
                    (numeric - analytic).abs() < 1e-3,
                    "{activation:?} at {x}: {numeric} vs {analytic}"
                );
            }
        }
    }

    #[test]
    fn tanh_is_within_a_few_units_of_the_true_value() {
        let near = (-200_000..=200_000).map(|i| i as f32 * 1e-4);
        let far = (-40..=40).map(|e| 2f32.powi(e)).flat_map(|x| [x, -x]);
        let mut worst = 0.0f64;
        for x in near.chain(far).chain([1e-30, 9.5, 1e30, f32::INFINITY]) {
            let want = (x as f64).tanh();
            let got = tanh(x) as f64;
            assert!(got.abs() <= 1.0, "{x}: {got}");
            if want != 0.0 {
                worst = worst.max((got - want).abs() / want.abs() / f64::from(f32::EPSILON));
            }
        }
        assert_eq!(tanh(0.0), 0.0);
        assert!(worst <= 4.0, "{worst} units of f32::EPSILON");
    }

    #[test]
    fn softmax_cross_entropy_by_hand() {
        // logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> loss ln(4/3)
        let mut logits = vec![0.0, 3f32.ln(), 0.0, 0.0];
        let mut loss = vec![0.0; 2];
        softmax_cross_entropy(&mut logits, &[1, 0], &mut loss, 2, 0.5);
        assert!((loss[0] - (4.0f32 / 3.0).ln()).abs() < 1e-6);
        assert!((loss[1] - 2f32.ln()).abs() < 1e-6);
        let want = [0.25 / 2.0, -0.25 / 2.0, -0.5 / 2.0, 0.5 / 2.0];
        assert_close(&logits, &want);
    }

    #[test]
    fn softmax_is_stable_for_huge_logits() {
        let mut logits = vec![1e30, -1e30, 0.0];
        let mut loss = vec![0.0];
        softmax_cross_entropy(&mut logits, &[0], &mut loss, 3, 1.0);
        assert_eq!(loss[0], 0.0);
        assert!(logits.iter().all(|v| v.is_finite()));
    }

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
