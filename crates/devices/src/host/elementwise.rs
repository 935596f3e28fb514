//! elementwise.cu on the host: biases, the activations and their gradients, sums and
//! conversions, every element computed as one thread would, spread over every core.

use rayon::prelude::*;

use super::values::{chunks, HostValues};
use super::{map_chunks, task_rows, usize_of, HostDevice, TASK};
use headroom_engine::device::DeviceError;
use headroom_engine::modules::activation::Nonlinearity;
use headroom_engine::program::SavedAs;
use headroom_engine::step::Elementwise;

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
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Runs `$body` with `$n` bound to `$nonlinearity`, written out once per common activation with
/// `$n` a constant, so that the element loops inside fold the `match` of [`activate`] and
/// [`derivative`] away and vectorise (ReLU's loops run at memory speed).
macro_rules! specialized {
    ($nonlinearity:expr, |$n:ident| $body:expr) => {
        match $nonlinearity {
            Nonlinearity::Relu => {
                let $n = Nonlinearity::Relu;
                $body
            }
            Nonlinearity::Relu6 => {
                let $n = Nonlinearity::Relu6;
                $body
            }
            Nonlinearity::GeluErf => {
                let $n = Nonlinearity::GeluErf;
                $body
            }
            other => {
                let $n = other;
                $body
            }
        }
    };
}

/// The activation at `x`.
#[inline(always)]
pub fn activate(nonlinearity: Nonlinearity, x: f32) -> f32 {
    match nonlinearity {
        Nonlinearity::Relu => x.max(0.0),
        Nonlinearity::GeluTanh => {
            0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)))
        }
        Nonlinearity::GeluErf => 0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2)),
        Nonlinearity::Tanh => tanh(x),
        Nonlinearity::Sigmoid => sigmoid(x),
        Nonlinearity::Silu => x * sigmoid(x),
        Nonlinearity::LeakyRelu { slope } => match x > 0.0 {
            true => x,
            false => slope * x,
        },
        // As the kernel's `fminf(fmaxf(x, 0), 6)`: a NaN gives 0, where `clamp` would keep it.
        #[allow(clippy::manual_clamp)]
        Nonlinearity::Relu6 => x.max(0.0).min(6.0),
    }
}

/// The activation's derivative from what it saved: its input `s`, or its output `s` for the
/// ones that save it (relu, tanh, sigmoid, and leaky relu and relu6 in place).
#[inline(always)]
pub fn derivative(nonlinearity: Nonlinearity, s: f32, saved_as: SavedAs) -> f32 {
    match (nonlinearity, saved_as) {
        (Nonlinearity::Relu, _) => f32::from(u8::from(s > 0.0)),
        (Nonlinearity::Tanh, SavedAs::Output) => 1.0 - s * s,
        (Nonlinearity::Tanh, SavedAs::Input) => 1.0 - tanh(s) * tanh(s),
        (Nonlinearity::Sigmoid, SavedAs::Output) => s * (1.0 - s),
        (Nonlinearity::Sigmoid, SavedAs::Input) => sigmoid(s) * (1.0 - sigmoid(s)),
        (Nonlinearity::GeluTanh, _) => {
            let t = tanh(SQRT_2_OVER_PI * (s + GELU_CUBIC * s * s * s));
            0.5 * (1.0 + t)
                + 0.5 * s * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * s * s)
        }
        (Nonlinearity::GeluErf, _) => {
            0.5 * (1.0 + libm::erff(s * FRAC_1_SQRT_2)) + s * FRAC_1_SQRT_2PI * (-0.5 * s * s).exp()
        }
        (Nonlinearity::Silu, _) => {
            let g = sigmoid(s);
            g * (1.0 + s * (1.0 - g))
        }
        (Nonlinearity::LeakyRelu { slope }, _) => match s > 0.0 {
            true => 1.0,
            false => slope,
        },
        (Nonlinearity::Relu6, _) => f32::from(u8::from(s > 0.0 && s < 6.0)),
    }
}

/// `y = nonlinearity(x)`.
pub fn activate_all(x: &[f32], y: &mut [f32], nonlinearity: Nonlinearity) {
    specialized!(nonlinearity, |n| y
        .par_chunks_mut(TASK)
        .zip(x.par_chunks(TASK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = activate(n, x);
            }
        }))
}

/// `out = grad * nonlinearity'(saved)`.
pub fn activation_gradient(
    grad: &[f32],
    saved: &[f32],
    out: &mut [f32],
    nonlinearity: Nonlinearity,
    saved_as: SavedAs,
) {
    specialized!(nonlinearity, |n| out
        .par_chunks_mut(TASK)
        .zip(grad.par_chunks(TASK).zip(saved.par_chunks(TASK)))
        .for_each(|(out, (grad, saved))| {
            for ((o, &g), &s) in out.iter_mut().zip(grad).zip(saved) {
                *o = g * derivative(n, s, saved_as);
            }
        }))
}

impl Elementwise for HostDevice {
    fn bias_add(
        &mut self,
        y: &mut HostValues,
        bias: &HostValues,
        rows: u64,
        cols: u64,
        spatial: u64,
    ) -> Result<(), DeviceError> {
        // The bias repeated over a row's positions: a row of `cols x spatial` values.
        let bias: Vec<f32> = bias
            .read(0..usize_of(cols))
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, usize_of(spatial)))
            .collect();
        let width = bias.len();
        for range in chunks(usize_of(rows) * width, width) {
            y.update(range, |y| {
                y.par_chunks_mut(task_rows(width) * width).for_each(|rows| {
                    for row in rows.chunks_exact_mut(width) {
                        row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
                    }
                })
            });
        }
        Ok(())
    }

    fn activation_forward(
        &mut self,
        x: &HostValues,
        y: &mut HostValues,
        len: u64,
        nonlinearity: Nonlinearity,
    ) -> Result<(), DeviceError> {
        map_chunks(x, y, len, |x, y| activate_all(x, y, nonlinearity));
        Ok(())
    }

    fn activation_in_place(
        &mut self,
        y: &mut HostValues,
        len: u64,
        nonlinearity: Nonlinearity,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            y.update(range, |y| {
                specialized!(nonlinearity, |n| y
                    .par_chunks_mut(TASK)
                    .for_each(|y| y.iter_mut().for_each(|v| *v = activate(n, *v))))
            });
        }
        Ok(())
    }

    fn activation_gradient(
        &mut self,
        grad: &HostValues,
        saved: &HostValues,
        out: &mut HostValues,
        len: u64,
        nonlinearity: Nonlinearity,
        saved_as: SavedAs,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let (grad, saved) = (grad.read(range.clone()), saved.read(range.clone()));
            out.update(range, |out| {
                activation_gradient(&grad, &saved, out, nonlinearity, saved_as)
            });
        }
        Ok(())
    }

    fn add(
        &mut self,
        a: &HostValues,
        b: &HostValues,
        out: &mut HostValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        binary(a, b, out, len, |a, b| a + b);
        Ok(())
    }

    fn multiply(
        &mut self,
        a: &HostValues,
        b: &HostValues,
        out: &mut HostValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        binary(a, b, out, len, |a, b| a * b);
        Ok(())
    }

    fn scale_features(
        &mut self,
        x: &HostValues,
        scale: &HostValues,
        y: &mut HostValues,
        rows: u64,
        features: u64,
    ) -> Result<(), DeviceError> {
        let n = usize_of(features);
        let scale = scale.read(0..n);
        for range in chunks(usize_of(rows.saturating_mul(features)), n) {
            let x = x.read(range.clone());
            y.update(range, |y| {
                y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
                    for ((y, &x), &s) in y.iter_mut().zip(x).zip(scale.iter()) {
                        *y = x * s;
                    }
                })
            });
        }
        Ok(())
    }

    fn accumulate(
        &mut self,
        from: &HostValues,
        into: &mut HostValues,
        len: u64,
    ) -> Result<(), DeviceError> {
        for range in chunks(usize_of(len), 1) {
            let from = from.read(range.clone());
            into.update(range, |into| {
                into.par_chunks_mut(TASK)
                    .zip(from.par_chunks(TASK))
                    .for_each(|(into, from)| into.iter_mut().zip(from).for_each(|(i, &f)| *i += f))
            });
        }
        Ok(())
    }

    fn copy_range(
        &mut self,
        (from, from_offset): (&HostValues, u64),
        (to, to_offset): (&mut HostValues, u64),
        len: u64,
    ) -> Result<(), DeviceError> {
        let (from_offset, to_offset) = (usize_of(from_offset), usize_of(to_offset));
        for range in chunks(usize_of(len), 1) {
            let read = from.read(from_offset + range.start..from_offset + range.end);
            to.update(to_offset + range.start..to_offset + range.end, |to| {
                to.copy_from_slice(&read)
            });
        }
        Ok(())
    }

    fn convert(
        &mut self,
        from: &HostValues,
        to: &mut HostValues,
        len: u64,
        scale: f32,
    ) -> Result<(), DeviceError> {
        map_chunks(from, to, len, |from, to| {
            to.par_chunks_mut(TASK)
                .zip(from.par_chunks(TASK))
                .for_each(|(to, from)| to.iter_mut().zip(from).for_each(|(t, &f)| *t = f * scale))
        });
        Ok(())
    }
}

/// `out = op(a, b)` over the first `len` values, in chunks, every core busy.
fn binary(
    a: &HostValues,
    b: &HostValues,
    out: &mut HostValues,
    len: u64,
    op: impl Fn(f32, f32) -> f32 + Sync,
) {
    for range in chunks(usize_of(len), 1) {
        let (a, b) = (a.read(range.clone()), b.read(range.clone()));
        out.update(range, |out| {
            out.par_chunks_mut(TASK)
                .zip(a.par_chunks(TASK).zip(b.par_chunks(TASK)))
                .for_each(|(out, (a, b))| {
                    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                        *o = op(a, b);
                    }
                })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each derivative against a central difference of the activation itself, from its input
    /// and, where PyTorch saves it, from its output.
    #[test]
    fn derivatives_match_finite_differences() {
        let kinds = [
            Nonlinearity::Relu,
            Nonlinearity::GeluTanh,
            Nonlinearity::GeluErf,
            Nonlinearity::Tanh,
            Nonlinearity::Sigmoid,
            Nonlinearity::Silu,
            Nonlinearity::LeakyRelu { slope: 0.1 },
            Nonlinearity::Relu6,
        ];
        for kind in kinds {
            for x in [-7.5f32, -2.5, -0.7, -0.1, 0.2, 0.9, 3.0, 6.5] {
                let h = 1e-3f32;
                let numeric = (activate(kind, x + h) - activate(kind, x - h)) / (2.0 * h);
                let mut ways = vec![kind.saves(false)];
                if kind.has_inplace() {
                    ways.push(kind.saves(true));
                }
                for saved_as in ways {
                    let saved = match saved_as {
                        SavedAs::Input => x,
                        SavedAs::Output => activate(kind, x),
                    };
                    let analytic = derivative(kind, saved, saved_as);
                    assert!(
                        (numeric - analytic).abs() < 2e-3,
                        "{kind:?} at {x} from {saved_as:?}: {numeric} vs {analytic}"
                    );
                }
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
}
