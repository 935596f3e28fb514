//! `nn.BatchNorm2d` and `nn.BatchNorm1d` in training mode (norm.cu, a block per channel): each
//! channel normalized by its mean and biased variance over the batch (and its positions), then
//! scaled and shifted (`affine`); the running mean and unbiased variance move by `momentum`
//! and their step count rises. It writes its output, then the batch's mean and inverse deviation
//! per channel (f32, as CUDA's `batch_norm` keeps them), and saves its input and those two for
//! backward, which makes the input's gradient, then the scale's and the shift's. In the mixed
//! precisions it reads its f32 parameters as they are (autocast casts none of them), so its
//! parameters' gradients are f32.

use serde::{Deserialize, Serialize};

use super::check::product;
use super::{LayerError, Module, Parameter, ParameterKind, Parameters, Path, Token, Values};
use crate::memory::Storage;
pub use crate::program::geometry::Planes;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Affine, BatchStatistics, Instr, RunningStatistics};

/// `nn.BatchNorm2d`'s and `nn.BatchNorm1d`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNormSpec {
    /// Whether a scale and shift are learnt (true).
    #[serde(default = "yes")]
    pub affine: bool,
    /// Added to the variance (1e-5).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// The weight of a step's statistics in the running ones (0.1).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
}

fn yes() -> bool {
    true
}

fn default_eps() -> f64 {
    1e-5
}

fn default_momentum() -> f64 {
    0.1
}

impl BatchNormSpec {
    /// Batch norm over a sample of `input` shape: `[channels, height, width]` for `dims` 2,
    /// `[features]` or `[channels, length]` for `dims` 1.
    pub fn build(&self, input: &[u64], at: &Path, dims: usize) -> Result<BatchNorm, LayerError> {
        let (channels, spatial) = match (dims, input) {
            (2, &[c, h, w]) => (c, product(&[h, w], at)?),
            (1, &[c]) => (c, 1),
            (1, &[c, length]) => (c, length),
            _ => {
                let wants = match dims {
                    2 => "a [channels, height, width] input",
                    _ => "a [features] or [channels, length] input",
                };
                return Err(at.error(format!(
                    "batch_norm{dims}d needs {wants}, and {} reaches it",
                    super::check::show(input)
                )));
            }
        };
        let eps = super::check::eps(at, self.eps)?;
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(at.error_at(
                "momentum",
                format!("must be in [0, 1], got {}", self.momentum),
            ));
        }
        Ok(BatchNorm {
            channels,
            spatial,
            affine: self.affine,
            eps,
            momentum: self.momentum as f32,
            dims,
            shape: input.to_vec(),
        })
    }
}

/// A batch norm layer.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    channels: u64,
    spatial: u64,
    affine: bool,
    eps: f32,
    momentum: f32,
    dims: usize,
    shape: Vec<u64>,
}

impl BatchNorm {
    fn planes(&self, rows: u64) -> Planes {
        Planes {
            rows,
            channels: self.channels,
            spatial: self.spatial,
            eps: self.eps,
            momentum: self.momentum,
        }
    }
}

impl Module for BatchNorm {
    fn output_shape(&self) -> &[u64] {
        &self.shape
    }

    fn parameters(&self) -> Vec<Parameter> {
        let c = self.channels;
        let statistic = Parameter::buffer(c, ParameterKind::Statistic);
        let learnt = match self.affine {
            true => vec![Parameter::trained(c, 1.0), Parameter::trained(c, 1.0)],
            false => Vec::new(),
        };
        let count = Parameter::buffer(1, ParameterKind::Count);
        learnt
            .into_iter()
            .chain([statistic, statistic, count])
            .collect()
    }

    fn forward(&self, graph: &mut Graph, x: Tensor, parameters: &mut Parameters<'_>) -> Tensor {
        let affine = self.affine.then(|| Affine {
            scale: parameters.take(),
            shift: parameters.take(),
        });
        let running = RunningStatistics {
            mean: parameters.take(),
            var: parameters.take(),
            steps: parameters.take(),
        };
        let planes = self.planes(graph.rows());
        let len = graph.times_rows(self.channels * self.spatial);
        let y = graph.output(len, graph.storage(x));
        let saved = BatchStatistics {
            mean: graph.output(self.channels, Storage::F32),
            invstd: graph.output(self.channels, Storage::F32),
        };
        graph.emit(Instr::BatchNormForward {
            x: graph.slot(x),
            affine: affine.map(|a| Affine {
                scale: graph.slot(a.scale),
                shift: graph.slot(a.shift),
            }),
            y: graph.slot(y),
            saved: BatchStatistics {
                mean: graph.slot(saved.mean),
                invstd: graph.slot(saved.invstd),
            },
            running: RunningStatistics {
                mean: graph.slot(running.mean),
                var: graph.slot(running.var),
                steps: graph.slot(running.steps),
            },
            planes,
        });
        let inputs: Vec<Tensor> = std::iter::once(x)
            .chain(affine.into_iter().flat_map(|a| [a.scale, a.shift]))
            .collect();
        let backward = BatchNormBackward {
            x,
            scale: affine.map(|a| a.scale),
            saved,
            planes,
        };
        graph.record(backward, &inputs, &[x, saved.mean, saved.invstd], &[y]);
        graph.release(saved.mean);
        graph.release(saved.invstd);
        y
    }

    fn reference(&self, x: &[f64], rows: usize, values: &mut Values<'_>, _: u64) -> Vec<f64> {
        let (scale, shift) = match self.affine {
            true => (Some(values.take()), Some(values.take())),
            false => (None, None),
        };
        for _ in 0..3 {
            values.take();
        }
        let (channels, spatial) = (self.channels as usize, self.spatial as usize);
        let per_sample = channels * spatial;
        let mut y = x[..rows * per_sample].to_vec();
        for c in 0..channels {
            let at = |r: usize, p: usize| r * per_sample + c * spatial + p;
            let places = || (0..rows).flat_map(|r| (0..spatial).map(move |p| (r, p)));
            let count = (rows * spatial) as f64;
            let mean = places().map(|(r, p)| x[at(r, p)]).sum::<f64>() / count;
            let variance = places()
                .map(|(r, p)| (x[at(r, p)] - mean).powi(2))
                .sum::<f64>()
                / count;
            let invstd = 1.0 / (variance + f64::from(self.eps)).sqrt();
            for (r, p) in places() {
                let normalized = (x[at(r, p)] - mean) * invstd;
                y[at(r, p)] =
                    normalized * scale.map_or(1.0, |s| s[c]) + shift.map_or(0.0, |s| s[c]);
            }
        }
        y
    }

    fn token(&self) -> Token {
        Token::Layer(match (self.dims, self.affine) {
            (1, true) => "bn1d".into(),
            (1, false) => "bn1d-noaffine".into(),
            (_, true) => "bn".into(),
            (_, false) => "bn-noaffine".into(),
        })
    }
}

/// Batch norm's backward.
#[derive(Debug)]
struct BatchNormBackward {
    x: Tensor,
    scale: Option<Tensor>,
    saved: BatchStatistics<Tensor>,
    planes: Planes,
}

impl Backward for BatchNormBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let inputs = 1 + 2 * usize::from(self.scale.is_some());
        let Some(dy) = grads[0] else {
            return vec![None; inputs];
        };
        let dx = pass
            .needs(0)
            .then(|| pass.gradient(0, pass.elements(self.x), pass.storage(dy)));
        let affine = self.scale.filter(|_| pass.needs(1)).map(|scale| {
            let (channels, storage) = (self.planes.channels, pass.storage(scale));
            Affine {
                scale: pass.gradient(1, channels, storage),
                shift: pass.gradient(2, channels, storage),
            }
        });
        pass.emit(Instr::BatchNormBackward {
            dy: pass.slot(dy),
            x: pass.slot(self.x),
            scale: self.scale.map(|s| pass.slot(s)),
            saved: BatchStatistics {
                mean: pass.slot(self.saved.mean),
                invstd: pass.slot(self.saved.invstd),
            },
            dx: dx.map(|dx| pass.slot(dx)),
            affine: affine.map(|a| Affine {
                scale: pass.slot(a.scale),
                shift: pass.slot(a.shift),
            }),
            planes: self.planes,
        });
        let mut gradients = vec![dx];
        gradients.extend(
            affine
                .into_iter()
                .flat_map(|a| [Some(a.scale), Some(a.shift)]),
        );
        gradients.resize(inputs, None);
        gradients
    }
}
