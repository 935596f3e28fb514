//! Kernel checks written once, run against any device's [`Kernels`]: each operation on random
//! inputs with awkward sizes (1, 7, 129, 784, 1000), in every storage a precision uses, outputs
//! poisoned with NaN beforehand so an unwritten element fails, compared with a reference
//! computed here within a tolerance ([`tolerance`]). One check per kernel family (fill, gemm,
//! reduce, loss, optimizer, dropout: [`kernels`]; biases, activations and sums:
//! [`elementwise`]; convolution: [`conv`]; pooling: [`pool`]; batch norm: [`norm`]; fused attention: [`attention`]; eager
//! attention: [`scores`]), then a few
//! training steps in every precision and the loss scaler's skipped steps ([`training`]).
//!
//! The references restate each operation's semantics from its definition, in f64 where it
//! sums or uses a transcendental function ([`reference`]; the matrix products a naive f64
//! product), rounding where the storage rounds, and never call the host's own arithmetic: the
//! checks mean something even when the device under test is the host itself. The training check
//! compares a device's whole steps with the host's, and so says nothing of the host itself.

mod attention;
mod conv;
mod elementwise;
mod embedding;
mod kernels;
mod norm;
mod pool;
mod reference;
mod scores;
mod training;

pub use kernels::check_kernels;
pub use training::check_training;

use half::{bf16, f16};

use headroom_engine::plan::Storage;
use headroom_engine::synthetic;

/// Every storage, for the checks of one storage at a time.
const STORAGES: [Storage; 3] = [Storage::F32, Storage::Bf16, Storage::F16];

/// Operand and result storage of the products the precisions run: f32 everywhere (`32-true`),
/// 16-bit everywhere (the forward and input-gradient products of every other precision, and
/// bf16-true's weight gradient), 16-bit operands into f32 (the weight gradient when mixed).
const PRODUCTS: [(Storage, Storage); 5] = [
    (Storage::F32, Storage::F32),
    (Storage::Bf16, Storage::Bf16),
    (Storage::Bf16, Storage::F32),
    (Storage::F16, Storage::F16),
    (Storage::F16, Storage::F32),
];

/// Largest accepted relative error of f32 results (absolute below magnitude 1).
pub const TOLERANCE: f64 = 1e-4;

/// The accepted error of a result stored as `storage`: [`TOLERANCE`], plus one unit in the last
/// place of a 16-bit storage. Device and reference do the same f32 arithmetic on the same
/// inputs, but may sum in another order, so a value within an f32 rounding of a 16-bit
/// rounding boundary can be stored one unit apart: 2^-7 relative for bfloat16 (8 significant
/// bits), 2^-10 for IEEE half (11).
pub fn tolerance(storage: Storage) -> f64 {
    TOLERANCE
        + match storage {
            Storage::F32 => 0.0,
            Storage::Bf16 => 1.0 / 128.0,
            Storage::F16 => 1.0 / 1024.0,
        }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Check {
    /// What was checked, with its sizes and storage.
    pub name: String,
    /// Largest error seen, relative to `max(1, |reference|)`.
    pub max_error: f64,
    /// The error allowed.
    pub tolerance: f64,
    /// Whether it stayed within the tolerance and every element was written.
    pub passed: bool,
}

/// `value` as `storage` stores it: rounded to nearest, ties to even.
pub fn round(value: f32, storage: Storage) -> f32 {
    match storage {
        Storage::F32 => value,
        Storage::Bf16 => bf16::from_f32(value).to_f32(),
        Storage::F16 => f16::from_f32(value).to_f32(),
    }
}

/// `values` as `storage` stores them.
pub fn rounded(values: &[f32], storage: Storage) -> Vec<f32> {
    values.iter().map(|&v| round(v, storage)).collect()
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let key = synthetic::stream_key(seed, 0xc0ffee);
    (0..len)
        .map(|i| synthetic::uniform(key, i as u64, 1.0))
        .collect()
}

fn poison(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

/// Compares within `tolerance`; an unwritten (NaN) element or a length mismatch fails.
fn compare(name: String, got: &[f32], want: &[f32], tolerance: f64) -> Check {
    let mut max_error = if got.len() == want.len() {
        0.0f64
    } else {
        f64::INFINITY
    };
    for (&g, &w) in got.iter().zip(want) {
        let error = (g as f64 - w as f64).abs() / (w.abs() as f64).max(1.0);
        // NaN (a poisoned, unwritten element) must fail.
        let error = if error.is_nan() { f64::INFINITY } else { error };
        max_error = max_error.max(error);
    }
    Check {
        passed: max_error <= tolerance,
        name,
        max_error,
        tolerance,
    }
}

/// Compares bit for bit, a NaN matching any NaN: for conversions, which must round exactly.
fn compare_bits(name: String, got: &[f32], want: &[f32]) -> Check {
    let same = |g: &f32, w: &f32| g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
    let differing = got.iter().zip(want).filter(|(g, w)| !same(g, w)).count();
    let max_error = if got.len() == want.len() && differing == 0 {
        0.0
    } else {
        f64::INFINITY
    };
    Check {
        passed: max_error == 0.0,
        name,
        max_error,
        tolerance: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostDevice;

    #[test]
    fn the_host_passes_every_kernel_check() {
        let checks = check_kernels(&mut HostDevice::default()).unwrap();
        assert!(checks.len() > 100, "{}", checks.len());
        for check in &checks {
            assert!(check.passed, "{check:?}");
        }
    }

    #[test]
    fn the_host_passes_the_training_check() {
        for check in check_training(&mut HostDevice::default()).unwrap() {
            assert!(check.passed && check.max_error == 0.0, "{check:?}");
        }
    }

    #[test]
    fn comparison_fails_on_unwritten_and_wrong_elements() {
        assert!(compare("ok".into(), &[1.0, 2.0], &[1.0, 2.00001], TOLERANCE).passed);
        assert!(!compare("nan".into(), &[f32::NAN, 2.0], &[1.0, 2.0], TOLERANCE).passed);
        assert!(!compare("off".into(), &[1.0, 2.1], &[1.0, 2.0], TOLERANCE).passed);
        assert!(!compare("short".into(), &[1.0], &[1.0, 2.0], TOLERANCE).passed);
        assert!(compare_bits("nan".into(), &[f32::NAN, 0.0], &[-f32::NAN, 0.0]).passed);
        assert!(!compare_bits("zero".into(), &[-0.0], &[0.0]).passed);
    }

    #[test]
    fn rounding_is_to_nearest_even_in_each_storage() {
        assert_eq!(round(1.0 + 1.0 / 256.0, Storage::Bf16), 1.0);
        assert_eq!(round(1.0 + 3.0 / 256.0, Storage::Bf16), 1.0 + 4.0 / 256.0);
        assert_eq!(round(1.0 + 1.0 / 2048.0, Storage::F16), 1.0);
        assert_eq!(round(65520.0, Storage::F16), f32::INFINITY);
        assert_eq!(round(1.5e-8, Storage::F16), 0.0);
        assert_eq!(round(0.1, Storage::F32), 0.1);
    }
}
