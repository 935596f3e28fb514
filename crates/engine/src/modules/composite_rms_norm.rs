//! Hugging Face's `LlamaRMSNorm` (Mistral's and Qwen2's are the same code) as PyTorch runs it:
//! not the fused `rms_norm` but its composite, in f32:
//!
//! ```python
//! x = x.to(torch.float32)
//! variance = x.pow(2).mean(-1, keepdim=True)
//! h = x * torch.rsqrt(variance + eps)
//! return self.weight * h.to(input_dtype)
//! ```
//!
//! Over a 16-bit input (`bf16-true`; under a mixed precision only without a weight) the first line
//! makes an f32 copy and the last a 16-bit one, each a cast autograd records. Autograd saves the
//! f32 input (`pow`'s and the first product's), the `rsqrt` (a value a row) and `h` as the weight's
//! product reads it (for the weight's gradient); backward runs the weight's product (its gradient
//! unreduced, then summed over the rows; `h`'s), the first product (the input's first share; the
//! `rsqrt`'s gradient, summed over the features), then `rsqrt`, `mean` and `pow` (the input's
//! second share). Both shares meet in the input's gradient.
//!
//! headroom records those nodes with PyTorch's buffers and their lifetimes, and computes the
//! values with its kernels: `h` is norm.cu's unscaled norm, the weight's product and `h`'s
//! gradient a scale per feature, the weight's gradient the rows' sum of `dy * h`, as PyTorch
//! computes them; the fused backward of the unscaled norm turns `h`'s gradient into the input's
//! whole gradient, written into the first share, and the second share is zeros in PyTorch's
//! buffer. Only the PyTorch profile takes this path; headroom's own step runs the fused norm.

use super::Path;
use crate::memory::Storage;
use crate::program::geometry::NormalizedRows;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Instr, RowStatistics, Scale};

/// The composite's forward over `x` (`positions` rows a sample of `features`, `eps` added to
/// the mean square), scaled by `weight` if it learns one, recorded; `at` is where the norm is
/// in the job.
pub fn forward(
    graph: &mut Graph,
    x: Tensor,
    weight: Option<Tensor>,
    (positions, features, eps): (u64, u64, f32),
    at: &Path,
) -> Tensor {
    let input = graph.storage(x);
    if graph.precision().is_mixed() && input != Storage::F32 && weight.is_some() {
        graph.refuse(
            at.field("implementation"),
            "\"composite\" (Hugging Face's LlamaRMSNorm) over a 16-bit input under a mixed \
             precision multiplies it by an f32 weight, which headroom does not model: put it on \
             the f32 residual stream (inside a residual block, after the embedding)"
                .into(),
        );
    }
    let x = match input {
        Storage::F32 => {
            graph.retain(x);
            x
        }
        _ => graph.cast(x, Storage::F32, Scale::One),
    };
    let rows = NormalizedRows {
        rows: graph.times_rows(positions),
        features,
        eps,
    };
    let (len, per_row) = (graph.elements(x), rows.rows);
    // variance = x.pow(2).mean(-1, keepdim=True): the square goes once the mean is taken; the
    // variance lives to the end of forward (a local).
    let square = graph.output(len, Storage::F32);
    let variance = graph.output(per_row, Storage::F32);
    graph.release(square);
    let shifted = graph.output(per_row, Storage::F32);
    let rstd = graph.output(per_row, Storage::F32);
    graph.release(shifted);
    graph.record(SecondShare { len }, &[x], &[x], &[rstd]);
    let h = graph.output(len, Storage::F32);
    graph.emit(Instr::LayerNormForward {
        x: graph.slot(x),
        affine: None,
        y: graph.slot(h),
        saved: RowStatistics {
            mean: None,
            rstd: graph.slot(rstd),
        },
        rows,
    });
    graph.record(FirstShare { x, rstd, rows }, &[x, rstd], &[x, rstd], &[h]);
    graph.release(x);
    graph.release(rstd);
    let h_as_input = match input {
        Storage::F32 => {
            graph.retain(h);
            h
        }
        _ => graph.cast(h, input, Scale::One),
    };
    // The variance and `h` are locals until forward returns.
    let locals = [variance, h];
    let Some(weight) = weight else {
        for t in locals {
            graph.release(t);
        }
        return h_as_input;
    };
    let y = graph.output(len, input);
    graph.emit(Instr::ScaleFeatures {
        x: graph.slot(h_as_input),
        scale: graph.slot(weight),
        y: graph.slot(y),
        rows: rows.rows,
        features: rows.features,
    });
    // The product saves `h` for the weight's gradient and the weight for `h`'s, each only
    // where that gradient is needed.
    let saved: Vec<Tensor> = [
        (h_as_input, graph.requires_grad(weight)),
        (weight, graph.requires_grad(h_as_input)),
    ]
    .into_iter()
    .filter_map(|(tensor, kept)| kept.then_some(tensor))
    .collect();
    let scaled = Scaled {
        weight,
        h: h_as_input,
        rows,
    };
    graph.record(scaled, &[weight, h_as_input], &saved, &[y]);
    graph.release(h_as_input);
    for t in locals {
        graph.release(t);
    }
    y
}

/// `self.weight * h`'s backward: `h`'s gradient (`dy * weight`) and the weight's (`dy * h`,
/// then summed over the rows as autograd reduces a broadcast input's).
#[derive(Debug)]
struct Scaled {
    weight: Tensor,
    h: Tensor,
    rows: NormalizedRows,
}

impl Backward for Scaled {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None, None];
        };
        let (len, storage) = (pass.elements(dy), pass.storage(dy));
        let NormalizedRows { rows, features, .. } = self.rows;
        let dh = pass.needs(1).then(|| {
            let dh = pass.gradient(1, len, storage);
            pass.emit(Instr::ScaleFeatures {
                x: pass.slot(dy),
                scale: pass.slot(self.weight),
                y: pass.slot(dh),
                rows,
                features,
            });
            dh
        });
        let unreduced = pass.needs(0).then(|| {
            let product = pass.gradient(1, len, storage);
            pass.emit(Instr::Multiply {
                a: pass.slot(dy),
                b: pass.slot(self.h),
                out: pass.slot(product),
                len,
            });
            product
        });
        pass.applied();
        let dw = unreduced.map(|product| {
            let dw = pass.gradient(0, features, pass.storage(self.weight));
            pass.emit(Instr::BiasGradient {
                dy: pass.slot(product),
                db: pass.slot(dw),
                rows,
                cols: features,
                spatial: 1,
            });
            pass.release(product);
            dw
        });
        vec![dw, dh]
    }
}

/// `x * rstd`'s backward: the input's first share (`dh * rstd`), into which the fused
/// backward of the unscaled norm writes the input's whole gradient, and `rstd`'s gradient
/// (`dh * x` summed over the features), read by nothing headroom computes.
#[derive(Debug)]
struct FirstShare {
    x: Tensor,
    rstd: Tensor,
    rows: NormalizedRows,
}

impl Backward for FirstShare {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dh) = grads[0] else {
            return vec![None, None];
        };
        let len = pass.elements(dh);
        let share = pass.gradient(0, len, Storage::F32);
        pass.emit(Instr::LayerNormBackward {
            dy: pass.slot(dh),
            x: pass.slot(self.x),
            scale: None,
            saved: RowStatistics {
                mean: None,
                rstd: pass.slot(self.rstd),
            },
            dx: Some(pass.slot(share)),
            affine: None,
            rows: self.rows,
        });
        let unreduced = pass.gradient(1, len, Storage::F32);
        pass.applied();
        let drstd = pass.gradient(1, self.rows.rows, Storage::F32);
        pass.release(unreduced);
        vec![Some(share), Some(drstd)]
    }
}

/// `rsqrt`, `+ eps`, `mean` and `pow`'s backward: the input's second share, zeros here (the
/// first share holds the whole gradient).
#[derive(Debug)]
struct SecondShare {
    len: u64,
}

impl Backward for SecondShare {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(drstd) = grads[0] else {
            return vec![None];
        };
        let per_row = pass.elements(drstd);
        // rsqrt: -0.5 * grad * rstd.pow(3).
        let cube = pass.gradient(0, per_row, Storage::F32);
        let halved = pass.gradient(0, per_row, Storage::F32);
        let dvariance = pass.gradient(0, per_row, Storage::F32);
        pass.release(halved);
        pass.release(cube);
        pass.consume(drstd);
        // mean: the gradient spread over the features, divided by their number.
        let dsquare = pass.gradient(0, self.len, Storage::F32);
        pass.release(dvariance);
        // pow: grad * (2 * x.pow(1)).
        let power = pass.gradient(0, self.len, Storage::F32);
        let doubled = pass.gradient(0, self.len, Storage::F32);
        let share = pass.gradient(0, self.len, Storage::F32);
        pass.emit(Instr::FillUniform {
            out: pass.slot(share),
            len: self.len,
            key: 0,
            scale: 0.0,
        });
        pass.release(doubled);
        pass.release(power);
        pass.release(dsquare);
        vec![Some(share)]
    }
}
