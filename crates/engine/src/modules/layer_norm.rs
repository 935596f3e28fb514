//! `nn.LayerNorm` over the last dimension (norm.cu, a block per row): each row (a sample, or one
//! position of a sequence) normalized by its own mean and biased variance, then scaled and
//! shifted per feature (`elementwise_affine`; the shift unless `bias=False`). PyTorch's
//! `native_layer_norm` writes its output, then each row's mean and `rstd` (f32 on CUDA, its
//! accumulation type), and saves its input, those two and its parameters; backward makes the
//! input's gradient, then the scale's, then the shift's. Under CUDA's autocast `layer_norm` runs
//! in f32: a 16-bit input is cast to f32 first (that copy is what it saves) and its output is
//! f32, which the next product casts back to half.
//!
//! RMS norm ([`super::rms_norm`]) is this module without the centering: no mean, no shift.

use serde::{Deserialize, Serialize};

use super::check::product;
use super::{LayerError, Module, Parameter, Parameters, Path, Token, Values};
use crate::memory::Storage;
use crate::program::framework::Framework;
pub use crate::program::geometry::NormalizedRows;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Instr, LayerAffine, RowStatistics, Scale};

/// `nn.LayerNorm`'s arguments; `normalized_shape` is the input's last dimension.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerNormSpec {
    /// Added to the variance (1e-5).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Whether a scale (and shift) per feature is learnt (true).
    #[serde(default = "yes")]
    pub elementwise_affine: bool,
    /// Whether the shift is learnt, when `elementwise_affine` (true).
    #[serde(default = "yes")]
    pub bias: bool,
}

fn yes() -> bool {
    true
}

fn default_eps() -> f64 {
    1e-5
}

impl LayerNormSpec {
    /// Layer norm over the last dimension of a sample of `input` shape.
    pub fn build(&self, input: &[u64], at: &Path) -> Result<LayerNorm, LayerError> {
        let Some((&features, leading)) = input.split_last() else {
            return Err(at.error("layer_norm needs an input with at least one dimension"));
        };
        let eps = super::check::eps(at, self.eps)?;
        Ok(LayerNorm {
            features,
            positions: product(leading, at)?,
            scale: self.elementwise_affine,
            shift: self.elementwise_affine && self.bias,
            eps,
            rms: None,
            composite: false,
            shape: input.to_vec(),
        })
    }
}

/// A layer norm layer, or an RMS norm one.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub(super) features: u64,
    /// Rows per sample: the product of the leading dimensions.
    pub(super) positions: u64,
    pub(super) scale: bool,
    pub(super) shift: bool,
    pub(super) eps: f32,
    /// For RMS norm (rows not centred), where it is in the job.
    pub(super) rms: Option<Path>,
    /// Whether PyTorch computes it as Hugging Face's composite (RMS norm only).
    pub(super) composite: bool,
    pub(super) shape: Vec<u64>,
}

impl Module for LayerNorm {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn parameters(&self) -> Vec<Parameter> {
        let learnt = usize::from(self.scale) + usize::from(self.shift);
        vec![Parameter::trained(self.features, 1.0); learnt]
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        if let (Some(at), true, Framework::Pytorch) = (&self.rms, self.composite, graph.framework())
        {
            let weight = self.scale.then(|| parameters.take());
            let rows = (self.positions, self.features, self.eps);
            return super::composite_rms_norm::forward(graph, x, weight, rows, at);
        }
        let affine = self.scale.then(|| LayerAffine {
            scale: parameters.take(),
            shift: self.shift.then(|| parameters.take()),
        });
        let sixteen_bit_input = graph.precision().is_mixed() && graph.storage(x) != Storage::F32;
        if let (Some(at), Some(_), true) = (&self.rms, &affine, sixteen_bit_input) {
            // PyTorch's fused rms_norm needs the input's type to be the weight's.
            if graph.framework() == Framework::Pytorch {
                let error = composite_refusal(at);
                graph.refuse(error.field, error.reason);
            }
        }
        // CUDA's autocast runs layer_norm in f32 (it leaves rms_norm be).
        let x = match sixteen_bit_input && self.rms.is_none() {
            true => graph.cast(x, Storage::F32, Scale::One),
            false => {
                graph.retain(x);
                x
            }
        };
        let rows = graph.times_rows(self.positions);
        let rows = NormalizedRows {
            rows,
            features: self.features,
            eps: self.eps,
        };
        let len = graph.elements(x);
        let y = graph.output(len, graph.storage(x));
        let saved = RowStatistics {
            mean: self
                .rms
                .is_none()
                .then(|| graph.output(rows.rows, Storage::F32)),
            rstd: graph.output(rows.rows, Storage::F32),
        };
        graph.emit(Instr::LayerNormForward {
            x: graph.slot(x),
            affine: affine.map(|a| LayerAffine {
                scale: graph.slot(a.scale),
                shift: a.shift.map(|s| graph.slot(s)),
            }),
            y: graph.slot(y),
            saved: RowStatistics {
                mean: saved.mean.map(|m| graph.slot(m)),
                rstd: graph.slot(saved.rstd),
            },
            rows,
        });
        let parameters: Vec<Tensor> = affine
            .into_iter()
            .flat_map(|a| std::iter::once(a.scale).chain(a.shift))
            .collect();
        let inputs: Vec<Tensor> = std::iter::once(x).chain(parameters.clone()).collect();
        let saved_tensors: Vec<Tensor> = std::iter::once(x)
            .chain(saved.mean)
            .chain([saved.rstd])
            .chain(parameters)
            .collect();
        let backward = LayerNormBackward {
            x,
            affine,
            saved,
            rows,
        };
        graph.record(backward, &inputs, &saved_tensors, &[y]);
        if let Some(mean) = saved.mean {
            graph.release(mean);
        }
        graph.release(saved.rstd);
        graph.release(x);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, _: u64) -> Vec<f64> {
        let scale = self.scale.then(|| values.take());
        let shift = self.shift.then(|| values.take());
        let n = self.features as usize;
        x[..rows * self.positions as usize * n]
            .chunks_exact(n)
            .flat_map(|row| {
                let mean = match self.rms {
                    None => row.iter().sum::<f64>() / n as f64,
                    Some(_) => 0.0,
                };
                let variance = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
                let rstd = 1.0 / (variance + f64::from(self.eps)).sqrt();
                row.iter().enumerate().map(move |(j, v)| {
                    (v - mean) * rstd * scale.map_or(1.0, |s| s[j]) + shift.map_or(0.0, |s| s[j])
                })
            })
            .collect()
    }

    fn token(&self) -> Token {
        Token::Layer(
            match (&self.rms, self.scale, self.shift) {
                (Some(_), true, _) if self.composite => "rms-composite",
                (Some(_), false, _) if self.composite => "rms-composite-noaffine",
                (Some(_), true, _) => "rms",
                (Some(_), false, _) => "rms-noaffine",
                (None, true, true) => "ln",
                (None, true, false) => "ln-nobias",
                (None, false, _) => "ln-noaffine",
            }
            .into(),
        )
    }
}

/// Why a learnt RMS norm over a 16-bit input under a mixed precision is refused.
fn composite_refusal(at: &Path) -> LayerError {
    at.error(
        "under a mixed precision this rms_norm reads a 16-bit input (the output of the layer \
         before it) with an f32 weight, which PyTorch runs as a composite of pow, mean, rsqrt \
         and products that headroom does not model; put it on the f32 residual stream (inside a \
         residual block, after the embedding), give it elementwise_affine: false, or train in \
         32-true or bf16-true",
    )
}

/// Layer norm's backward.
#[derive(Debug)]
struct LayerNormBackward {
    x: Tensor,
    affine: Option<LayerAffine<Tensor>>,
    saved: RowStatistics<Tensor>,
    rows: NormalizedRows,
}

impl Backward for LayerNormBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let learnt = self
            .affine
            .map_or(0, |a| 1 + usize::from(a.shift.is_some()));
        let Some(dy) = grads[0] else {
            return vec![None; 1 + learnt];
        };
        let dx = pass
            .needs(0)
            .then(|| pass.gradient(0, pass.elements(self.x), pass.storage(dy)));
        let affine = self.affine.filter(|_| pass.needs(1)).map(|a| {
            let (features, storage) = (self.rows.features, pass.storage(a.scale));
            LayerAffine {
                scale: pass.gradient(1, features, storage),
                shift: a.shift.map(|_| pass.gradient(2, features, storage)),
            }
        });
        pass.emit(Instr::LayerNormBackward {
            dy: pass.slot(dy),
            x: pass.slot(self.x),
            scale: self.affine.map(|a| pass.slot(a.scale)),
            saved: RowStatistics {
                mean: self.saved.mean.map(|m| pass.slot(m)),
                rstd: pass.slot(self.saved.rstd),
            },
            dx: dx.map(|dx| pass.slot(dx)),
            affine: affine.map(|a| LayerAffine {
                scale: pass.slot(a.scale),
                shift: a.shift.map(|s| pass.slot(s)),
            }),
            rows: self.rows,
        });
        let mut gradients = vec![dx];
        if let Some(a) = affine {
            gradients.push(Some(a.scale));
            gradients.extend(a.shift.map(Some));
        }
        gradients.resize(1 + learnt, None);
        gradients
    }
}
