//! `nn.RMSNorm` over the last dimension: each row divided by its root mean square
//! (`x * rsqrt(mean(x²) + eps)`), then scaled per feature (`elementwise_affine`). It is layer
//! norm without the centering ([`LayerNorm`] runs both, norm.cu's kernels with the mean taken
//! as 0). On CUDA `rms_norm` takes the fused `_fused_rms_norm` when the input's type is the
//! weight's: it writes the output and an f32 `rstd` per row, and saves its input, `rstd` and
//! the weight. CUDA's autocast leaves it be (it is on none of its lists). Under a mixed
//! precision a 16-bit input (straight after a linear layer, not on a residual stream) meets an
//! f32 weight and PyTorch falls back to its composite of pow, mean, rsqrt and products, which
//! saves three f32 copies of the input; headroom refuses that case rather than answer for it
//! wrongly. With `"implementation": "composite"` it is Hugging Face's `LlamaRMSNorm` instead,
//! computed by hand in f32 ([`super::composite_rms_norm`]).

use serde::{Deserialize, Serialize};

use super::check::product;
use super::layer_norm::LayerNorm;
use super::{LayerError, Path};

/// `nn.RMSNorm`'s arguments; `normalized_shape` is the input's last dimension.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmsNormSpec {
    /// Added to the mean square; none is f32's machine epsilon (PyTorch's `eps=None`: the
    /// epsilon of the f32 it computes in).
    #[serde(default)]
    pub eps: Option<f64>,
    /// Whether a scale per feature is learnt (true).
    #[serde(default = "yes")]
    pub elementwise_affine: bool,
    /// How PyTorch computes it: `nn.RMSNorm`'s fused kernel (the default), or Hugging Face's
    /// `LlamaRMSNorm` by hand in f32.
    #[serde(default)]
    pub implementation: RmsNormImplementation,
}

/// How an RMS norm is computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RmsNormImplementation {
    /// `nn.RMSNorm`: `F.rms_norm`, fused on CUDA.
    #[default]
    Fused,
    /// Hugging Face's `LlamaRMSNorm` (Mistral's, Qwen2's): pow, mean, rsqrt and two products
    /// in f32 ([`super::composite_rms_norm`]).
    Composite,
}

fn yes() -> bool {
    true
}

impl RmsNormSpec {
    /// RMS norm over the last dimension of a sample of `input` shape.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<LayerNorm, LayerError> {
        let Some((&features, leading)) = input.split_last() else {
            return Err(at.error("rms_norm needs an input with at least one dimension"));
        };
        let eps = match self.eps {
            Some(eps) => super::check::eps(at, eps)?,
            None => f32::EPSILON,
        };
        Ok(LayerNorm {
            features,
            positions: product(leading, at)?,
            scale: self.elementwise_affine,
            shift: false,
            eps,
            rms: Some(at.clone()),
            composite: self.implementation == RmsNormImplementation::Composite,
            shape: input.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::Module;

    #[test]
    fn learns_a_scale_and_no_shift() {
        let at = Path::new("model.layers").index(3).of("rms_norm");
        let spec = RmsNormSpec {
            eps: None,
            elementwise_affine: true,
            implementation: RmsNormImplementation::Fused,
        };
        let norm = spec.build(&[7, 64], &at).unwrap();
        assert_eq!(norm.parameters().len(), 1);
        assert_eq!(norm.output_shape(), &[7, 64]);
        let bare = RmsNormSpec {
            elementwise_affine: false,
            ..spec
        };
        assert!(bare.build(&[64], &at).unwrap().parameters().is_empty());
    }

    #[test]
    fn refuses_a_bad_eps_by_name() {
        let at = Path::new("model.layers").index(1).of("rms_norm");
        let spec = RmsNormSpec {
            eps: Some(-1.0),
            elementwise_affine: true,
            implementation: RmsNormImplementation::Fused,
        };
        let error = spec.build(&[8], &at).unwrap_err();
        assert_eq!(error.field, "model.layers[1].rms_norm.eps");
    }

    #[test]
    fn normalizes_by_the_root_mean_square() {
        let at = Path::new("model.layers").index(0).of("rms_norm");
        let spec = RmsNormSpec {
            eps: Some(1e-6),
            elementwise_affine: false,
            implementation: RmsNormImplementation::Fused,
        };
        let norm = spec.build(&[2], &at).unwrap();
        let y = norm.reference(&[3.0, 4.0], 1, &mut crate::modules::Values::new(&[]), 0);
        let rms = (12.5f64 + 1e-6).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 4.0 / rms).abs() < 1e-6);
    }
}
