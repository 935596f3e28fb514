//! The checks layers share: the error naming a field, extents, images and products that must
//! stay far inside `u64`.

use super::{Path, MAX_EXTENT};

/// The most elements one sample of any tensor may hold, and the most parameters a layer may
/// have: 2^53, where counts stay exact everywhere, far past any device.
pub const MAX_ELEMENTS: u64 = 1 << 53;

/// A layer list that cannot be built: the field at fault (`model.layers[2].conv2d.kernel_size`)
/// and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong and what would work.
    pub reason: String,
}

impl LayerError {
    /// The error `reason` at `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> LayerError {
        LayerError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// `value` of `field` within `[least, MAX_EXTENT]`.
pub fn extent(at: &Path, field: &str, value: u64, least: u64) -> Result<u64, LayerError> {
    if value < least || value > MAX_EXTENT {
        return Err(at.error_at(
            field,
            format!("must be between {least} and {MAX_EXTENT}, got {value}"),
        ));
    }
    Ok(value)
}

/// A norm's `eps`, checked positive and finite, as the f32 the kernels add.
pub fn eps(at: &Path, value: f64) -> Result<f32, LayerError> {
    match value.is_finite() && value > 0.0 {
        true => Ok(value as f32),
        false => Err(at.error_at("eps", format!("must be a positive number, got {value}"))),
    }
}

/// The `[channels, height, width]` of an image input, or an error saying what reached `kind`.
pub fn image(shape: &[u64], at: &Path, kind: &str) -> Result<[u64; 3], LayerError> {
    match *shape {
        [c, h, w] => Ok([c, h, w]),
        _ => Err(at.error(format!(
            "{kind} needs a [channels, height, width] input, and {} reaches it{}",
            show(shape),
            if shape.len() == 1 {
                " (it comes after a flatten or linear layer)"
            } else {
                ""
            }
        ))),
    }
}

/// The product of `values`, at most [`MAX_ELEMENTS`].
pub fn product(values: &[u64], at: &Path) -> Result<u64, LayerError> {
    values
        .iter()
        .try_fold(1u64, |acc, &v| acc.checked_mul(v))
        .filter(|&p| p <= MAX_ELEMENTS)
        .ok_or_else(|| at.error("its sizes multiply past 2^53: far larger than any device"))
}

/// `a + b`, at most [`MAX_ELEMENTS`].
pub fn sum(a: u64, b: u64, at: &Path) -> Result<u64, LayerError> {
    a.checked_add(b)
        .filter(|&s| s <= MAX_ELEMENTS)
        .ok_or_else(|| at.error("its parameters add up past 2^53: far larger than any device"))
}

/// A shape as `[3, 32, 32]`.
pub fn show(shape: &[u64]) -> String {
    let each: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", each.join(", "))
}
