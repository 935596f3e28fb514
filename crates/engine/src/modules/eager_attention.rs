//! Attention as PyTorch's eager path computes it (`attn_implementation="eager"`: Hugging Face's
//! `eager_attention_forward`, which Llama's family shares), one operation at a time, as
//! autograd records and frees them:
//!
//! ```text
//! k, v = repeat_kv(k), repeat_kv(v)                # grouped-query attention: copies
//! w = torch.matmul(q, k.transpose(2, 3)) * scaling  # the scores, [batch, heads, t, t]
//! w = w + causal_mask                               # the model's mask, in its dtype
//! w = softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)   # the f32 softmax saved
//! w = dropout(w)                                    # a one-byte mask saved
//! o = torch.matmul(w, v).transpose(1, 2).contiguous()
//! ```
//!
//! Every tensor this computes is a tensor PyTorch allocates, at the same moment and freed at
//! the same one: the repeated heads, autocast's casts, the scores, scaled, masked, their f32
//! softmax and its cast, the dropped probabilities, the output, and each one's gradient. What
//! only PyTorch's layouts need is held for its bytes in PyTorch's profile
//! ([`Graph::pytorch_only`]): the operands `reshape` copies into `[batch * heads, ...]`
//! matrices (a projection's heads, unless a dimension of one lets it view them) and their
//! gradient's copy back, the product's `[batch, heads, t, head_dim]` output before its
//! transposed copy, and the mask, since headroom's kernels read each operand through
//! [`Strides`] and mask the scores themselves.

use super::dropout;
use crate::memory::{Element, Part, Storage};
use crate::program::geometry::{Attention, BatchedProduct, HeadGroups, Strides};
use crate::program::graph::{Backward, Graph, Pass, PassThrough, Tensor};
use crate::program::{Instr, Scale};

/// Whether `reshape` copies a projection's heads into `[batch * heads, positions, head_dim]`
/// matrices (and the output's gradient back out of them): only when no dimension it merges or
/// moves is 1, where the strides line up and it views them.
fn reshape_copies(shape: &Attention) -> bool {
    shape.batch > 1 && shape.heads > 1 && shape.sequence > 1
}

/// Whether `.transpose(1, 2).contiguous()` copies the output: unless the heads or the positions
/// are one, where the transposed view is already contiguous.
fn transpose_copies(shape: &Attention) -> bool {
    shape.heads > 1 && shape.sequence > 1
}

/// Whether the gradients of the queries', keys' and values' heads views are copied back into
/// the projections' layout, as the layouts autograd hands them in leave them: the queries'
/// (and the values' under multi-head attention) arrive as `[batch, heads, positions, head_dim]`;
/// the keys' as the transposed scores' product, which views as the projection's unless a
/// batch of several positions of several values must be flattened for its matrix product;
/// grouped-query attention's as the sum over each key/value head's query heads.
pub fn view_copies(shape: &Attention) -> [bool; 3] {
    let transposed = transpose_copies(shape);
    match shape.kv_heads == shape.heads {
        true => {
            let key = shape.batch > 1 && shape.sequence > 1 && shape.head_dim > 1;
            [transposed, key, transposed]
        }
        false => {
            let summed = shape.kv_heads > 1 && shape.sequence > 1;
            [transposed, summed, summed]
        }
    }
}

/// How a tensor of `[batch, positions, heads, head_dim]` values lies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// A projection's output viewed as heads: `[batch, positions, heads, head_dim]` in memory,
    /// which `reshape` copies.
    Heads,
    /// `[batch, heads, positions, head_dim]` in memory (a repetition's output), which it views.
    Contiguous,
}

/// A `positions x head_dim` matrix a head, of `heads` heads, as it lies.
fn strides(layout: Layout, shape: &Attention, heads: u64) -> Strides {
    match layout {
        Layout::Heads => Strides::heads(shape.sequence, heads, shape.head_dim),
        Layout::Contiguous => Strides::contiguous(heads, shape.sequence, shape.head_dim),
    }
}

/// An operand of a product: its tensor, its layout, and its matrices as stored (`rows x cols`),
/// read transposed or not.
#[derive(Debug, Clone, Copy)]
struct Operand {
    tensor: Tensor,
    strides: Strides,
    /// Whether `reshape` copies it (a projection's heads), or views it.
    copied: bool,
    rows: u64,
    cols: u64,
    transposed: bool,
}

impl Operand {
    fn values(&self, shape: &Attention) -> u64 {
        shape
            .batch
            .saturating_mul(shape.heads)
            .saturating_mul(self.rows)
            .saturating_mul(self.cols)
    }

    /// Its strides as the product reads it.
    fn read(&self) -> Strides {
        match self.transposed {
            true => self.strides.transposed(),
            false => self.strides,
        }
    }

    /// `rows x cols` as the product reads it.
    fn read_shape(&self) -> (u64, u64) {
        match self.transposed {
            true => (self.cols, self.rows),
            false => (self.rows, self.cols),
        }
    }
}

/// Eager attention of `[q, k, v]` (`[batch, positions, heads or kv_heads, head_dim]`,
/// references the caller keeps, as Hugging Face's attention keeps its locals until it
/// returns): its output `[batch, positions, heads, head_dim]`, a reference the caller owns.
/// With `cached`, the keys and values are the key/value cache's copies, contiguous in PyTorch:
/// the products read them without copying. The softmax is Llama's, `softmax(w, dtype=float32)`
/// cast back to the queries' type, with `upcast_softmax`; else GPT-2's, `softmax(w)` in the
/// scores' type (f32 under CUDA's autocast either way), cast to the values' where it differs.
pub fn attention(
    graph: &mut Graph,
    [q, k, v]: [Tensor; 3],
    shape: Attention,
    (cached, upcast_softmax): (bool, bool),
) -> Tensor {
    let (t, d, heads) = (shape.sequence, shape.head_dim, shape.heads);
    // The probabilities' type: the queries' (Llama's `.to(query.dtype)`), or the values'
    // (GPT-2's `.type(value.dtype)`); the two differ where rotary embedding made the queries f32.
    let probabilities_storage = match upcast_softmax {
        true => graph.storage(q),
        false => graph.storage(v),
    };
    if shape.causal {
        causal_mask(graph, t);
    }
    let groups = HeadGroups {
        batch: shape.batch,
        positions: t,
        kv_heads: shape.kv_heads,
        groups: heads / shape.kv_heads,
        head_dim: d,
    };
    let [keys, values] = [k, v].map(|kv| match groups.groups {
        1 => {
            graph.retain(kv);
            (kv, Layout::Heads)
        }
        _ => (repeat(graph, kv, groups), Layout::Contiguous),
    });
    // `reshape` copies a projection's heads, except the cache's copies of the keys and values,
    // which PyTorch lays out contiguously.
    let head = |(tensor, layout): (Tensor, Layout), transposed: bool| Operand {
        tensor,
        strides: strides(layout, &shape, heads),
        copied: layout == Layout::Heads && reshape_copies(&shape) && (tensor == q || !cached),
        rows: t,
        cols: d,
        transposed,
    };
    let probabilities_of = |tensor: Tensor| Operand {
        tensor,
        strides: Strides::contiguous(heads, t, t),
        copied: false,
        rows: t,
        cols: t,
        transposed: false,
    };
    let scores = matmul(
        graph,
        [head((q, Layout::Heads), false), head(keys, true)],
        Layout::Contiguous,
        &shape,
    );
    let mut w = graph.times(scores, shape.scale());
    graph.release(scores);
    if shape.causal {
        let masked = mask(graph, w, &shape);
        graph.release(w);
        w = masked;
    }
    let rows = shape.batch.saturating_mul(heads).saturating_mul(t);
    let probabilities = softmax(graph, w, (rows, t), upcast_softmax);
    let cast = match graph.storage(probabilities) == probabilities_storage {
        true => probabilities,
        false => {
            let cast = graph.cast(probabilities, probabilities_storage, Scale::One);
            graph.release(probabilities);
            cast
        }
    };
    graph.release(w);
    w = cast;
    if let Some(dropout) = shape.dropout {
        let len = graph.elements(w);
        let dropped = dropout::drop(graph, w, len, dropout.p, dropout.key);
        graph.release(w);
        w = dropped;
    }
    let o = matmul(
        graph,
        [probabilities_of(w), head(values, false)],
        Layout::Heads,
        &shape,
    );
    for local in [keys.0, values.0, w] {
        graph.release(local);
    }
    o
}

/// The causal mask Hugging Face's model makes once a forward for every eager layer
/// (`create_causal_mask`: `torch.where` over a lower-triangular boolean matrix, `[batch, 1, t,
/// t]` in the model's dtype), kept until the model's forward ends. Held for its bytes: the
/// kernels mask the scores themselves.
fn causal_mask(graph: &mut Graph, t: u64) {
    let rows = graph.rows();
    let name = format!("causal mask {rows}x{t}");
    let master = graph.precision().master();
    graph.shared(&name, |graph| {
        let square = t.saturating_mul(t);
        let boolean =
            |graph: &mut Graph| graph.pytorch_only(Part::Activations, square, Element::Mask);
        let ones = boolean(graph);
        let lower = boolean(graph);
        graph.release_optional(ones);
        let values = rows.saturating_mul(square);
        let mask = graph.pytorch_only(Part::Activations, values, Element::Value(master));
        graph.release_optional(lower);
        mask.into_iter().collect()
    });
}

/// `repeat_kv`: each key/value head copied for the query heads it serves, `[batch, heads,
/// positions, head_dim]`. A reference the caller owns.
fn repeat(graph: &mut Graph, x: Tensor, shape: HeadGroups) -> Tensor {
    let y = graph.output(shape.repeated(), graph.storage(x));
    graph.emit(Instr::RepeatHeads {
        from: graph.slot(x),
        to: graph.slot(y),
        shape,
    });
    graph.record(RepeatBackward { shape }, &[x], &[], &[y]);
    y
}

/// `torch.matmul` of `[batch, heads, ...]` operands (references the caller keeps): each cast to
/// autocast's type where stored otherwise (the right one first, as autocast's wrapper
/// evaluates its arguments), then each projection's heads copied by `reshape` (the left one
/// first), the product into a new tensor laid out as `out` says, the casts let go. With
/// [`Layout::Heads`] the product goes through `.transpose(1, 2).contiguous()`: in the PyTorch
/// profile, as PyTorch runs it (the `[batch, heads, t, d]` product, the casts and copies
/// nothing saved let go, then its transposed copy); in headroom's own step, written directly.
fn matmul(graph: &mut Graph, [a, b]: [Operand; 2], out: Layout, shape: &Attention) -> Tensor {
    let cast_b = graph.operand(b.tensor);
    let cast_a = graph.operand(a.tensor);
    let copied = |graph: &mut Graph, operand: Operand, cast: Tensor| {
        let len = operand.values(shape);
        let copy = match operand.copied {
            true => graph.pytorch_only(Part::Activations, len, Element::Value(graph.storage(cast))),
            false => None,
        };
        let Some(copy) = copy else {
            graph.retain(cast);
            return Operand {
                tensor: cast,
                ..operand
            };
        };
        graph.emit(Instr::Convert {
            from: graph.slot(cast),
            to: graph.slot(copy),
            len,
            scale: Scale::One,
        });
        graph.record(PassThrough, &[cast], &[], &[copy]);
        Operand {
            tensor: copy,
            ..operand
        }
    };
    let a = copied(graph, a, cast_a);
    let b = copied(graph, b, cast_b);
    let (rows, inner) = a.read_shape();
    let cols = b.read_shape().1;
    let storage = graph.storage(a.tensor);
    let c_strides = match out {
        Layout::Heads => strides(Layout::Heads, shape, shape.heads),
        Layout::Contiguous => Strides::contiguous(shape.heads, rows, cols),
    };
    let len = shape
        .batch
        .saturating_mul(shape.heads)
        .saturating_mul(rows)
        .saturating_mul(cols);
    // PyTorch's `bmm` writes `[batch, heads, t, d]`; `.contiguous()` copies it transposed
    // after `matmul` has let its operands' unsaved casts and copies go. The PyTorch profile
    // does the same; headroom's own step writes the transposed layout directly.
    let staged = match out == Layout::Heads && transpose_copies(shape) {
        true => graph.pytorch_only(Part::Activations, len, Element::Value(storage)),
        false => None,
    };
    let product = BatchedProduct {
        batch: shape.batch,
        heads: shape.heads,
        rows,
        inner,
        cols,
        a: a.read(),
        b: b.read(),
        c: c_strides,
    };
    let written = staged.unwrap_or_else(|| graph.output(len, storage));
    let written_strides = match staged {
        Some(_) => Strides::contiguous(shape.heads, rows, cols),
        None => c_strides,
    };
    graph.emit(Instr::BatchedProduct {
        a: graph.slot(a.tensor),
        b: graph.slot(b.tensor),
        c: graph.slot(written),
        shape: BatchedProduct {
            c: written_strides,
            ..product
        },
    });
    // The backward reads the output's gradient as the transposed copy lays it out: autograd
    // hands it through the copy and the transposed view unchanged.
    let backward = ProductBackward {
        a,
        b,
        product,
        copies_gradient: out == Layout::Heads && reshape_copies(shape),
    };
    // bmm saves each operand for the other's gradient, when that one is needed.
    let saved: Vec<Tensor> = [(a.tensor, b.tensor), (b.tensor, a.tensor)]
        .into_iter()
        .filter(|&(_, other)| graph.requires_grad(other))
        .map(|(kept, _)| kept)
        .collect();
    graph.record(backward, &[a.tensor, b.tensor], &saved, &[written]);
    for tensor in [a.tensor, b.tensor, cast_a, cast_b] {
        graph.release(tensor);
    }
    let Some(staged) = staged else {
        return written;
    };
    let c = graph.output(len, storage);
    graph.emit(Instr::SumHeadGroups {
        from: graph.slot(staged),
        to: graph.slot(c),
        shape: HeadGroups {
            batch: shape.batch,
            positions: rows,
            kv_heads: shape.heads,
            groups: 1,
            head_dim: cols,
        },
    });
    graph.record(PassThrough, &[staged], &[], &[c]);
    graph.release(staged);
    c
}

/// `w + causal_mask`: the sum in the wider of the scores' type and the mask's (f32 under
/// autocast), minus infinity where a key follows its query. A reference the caller owns.
fn mask(graph: &mut Graph, w: Tensor, shape: &Attention) -> Tensor {
    let len = graph.elements(w);
    let storage = graph.storage(w);
    let sum = match (storage, graph.precision().master()) {
        (Storage::F32, _) | (_, Storage::F32) => Storage::F32,
        (storage, _) => storage,
    };
    let masked = graph.output(len, sum);
    graph.emit(Instr::CausalMask {
        from: graph.slot(w),
        to: graph.slot(masked),
        matrices: shape.batch.saturating_mul(shape.heads),
        positions: shape.sequence,
    });
    graph.record(MaskBackward { to: storage }, &[w], &[], &[masked]);
    masked
}

/// `F.softmax(w, dim=-1, dtype=torch.float32)` (`upcast`) as CUDA runs it: a bf16 input
/// converted to an f32 copy first (let go once the softmax is made), an f16 one read by the f32
/// kernel itself (`half_to_float`). Else `F.softmax(w, dim=-1)`: in `w`'s type, except under
/// autocast, which runs it in f32 (a 16-bit input converted first). The output is saved for
/// backward. A reference the caller owns.
fn softmax(graph: &mut Graph, w: Tensor, (rows, cols): (u64, u64), upcast: bool) -> Tensor {
    let autocast = graph.precision().is_mixed();
    let converted = match (graph.storage(w), upcast || autocast) {
        (Storage::F32, _) | (_, false) => None,
        // `dtype=float32` takes f16 straight into the f32 kernel; autocast converts it first.
        (Storage::F16, true) if upcast => None,
        (_, true) => Some(graph.cast(w, Storage::F32, Scale::One)),
    };
    let x = converted.unwrap_or(w);
    let into = match upcast || autocast {
        true => Storage::F32,
        false => graph.storage(x),
    };
    let p = graph.output(graph.elements(x), into);
    graph.emit(Instr::SoftmaxRows {
        x: graph.slot(x),
        p: graph.slot(p),
        rows,
        cols,
    });
    let backward = SoftmaxBackward {
        p,
        rows,
        cols,
        input: graph.storage(x),
    };
    graph.record(backward, &[x], &[p], &[p]);
    graph.release_optional(converted);
    p
}

/// The mask's sum: the gradient converted back to the scores' type.
#[derive(Debug)]
struct MaskBackward {
    to: Storage,
}

impl Backward for MaskBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        vec![grads[0].map(|dy| pass.gradient_as(0, dy, self.to))]
    }
}

/// `repeat_kv`'s backward: each key/value head's gradient summed over its query heads.
#[derive(Debug)]
struct RepeatBackward {
    shape: HeadGroups,
}

impl Backward for RepeatBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None];
        };
        let dx = pass.gradient(0, self.shape.grouped(), pass.storage(dy));
        pass.emit(Instr::SumHeadGroups {
            from: pass.slot(dy),
            to: pass.slot(dx),
            shape: self.shape,
        });
        vec![Some(dx)]
    }
}

/// The softmax's backward (`_softmax_backward_data`): the input's gradient in the input's type.
#[derive(Debug)]
struct SoftmaxBackward {
    p: Tensor,
    rows: u64,
    cols: u64,
    input: Storage,
}

impl Backward for SoftmaxBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (Some(dp), true) = (grads[0], pass.needs(0)) else {
            return vec![None];
        };
        let dx = pass.gradient(0, pass.elements(dp), self.input);
        pass.emit(Instr::SoftmaxRowsBackward {
            p: pass.slot(self.p),
            dp: pass.slot(dp),
            dx: pass.slot(dx),
            rows: self.rows,
            cols: self.cols,
        });
        vec![Some(dx)]
    }
}

/// `bmm`'s backward: the right operand's gradient first, then the left's (as autograd's
/// generated code computes them), each laid out as its operand is stored. After the
/// transposed copy the output's gradient is copied first (`reshape` of its transposed view),
/// the original let go.
#[derive(Debug)]
struct ProductBackward {
    a: Operand,
    b: Operand,
    product: BatchedProduct,
    copies_gradient: bool,
}

impl ProductBackward {
    /// `c = x y` into a new gradient of input `k`, as `operand` is stored: `x`, `y` read with
    /// the strides given, `rows x inner` and `inner x cols`.
    fn gradient(
        &self,
        pass: &mut Pass<'_>,
        k: usize,
        [(x, x_strides), (y, y_strides)]: [(Tensor, Strides); 2],
        operand: &Operand,
        inner: u64,
    ) -> Tensor {
        let storage = pass.storage(x);
        let (rows, cols) = (operand.rows, operand.cols);
        let values = [self.product.batch, self.product.heads, rows, cols]
            .iter()
            .fold(1u64, |n, &m| n.saturating_mul(m));
        let grad = pass.gradient(k, values, storage);
        pass.emit(Instr::BatchedProduct {
            a: pass.slot(x),
            b: pass.slot(y),
            c: pass.slot(grad),
            shape: BatchedProduct {
                rows,
                inner,
                cols,
                a: x_strides,
                b: y_strides,
                c: operand.strides,
                ..self.product
            },
        });
        grad
    }
}

impl Backward for ProductBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None, None];
        };
        let p = self.product;
        let dc = match self.copies_gradient {
            true => {
                let len = pass.elements(dy);
                let copy = pass.pytorch_only(len, pass.storage(dy));
                match copy {
                    Some(copy) => {
                        pass.emit(Instr::Convert {
                            from: pass.slot(dy),
                            to: pass.slot(copy),
                            len,
                            scale: Scale::One,
                        });
                        pass.consume(dy);
                        copy
                    }
                    None => dy,
                }
            }
            false => dy,
        };
        let (a, b) = (self.a.tensor, self.b.tensor);
        // dA = dC B^T and dB = A^T dC, each written as its operand is stored: transposed
        // operands take the transposed products (dA^T = B dC^T, dB^T = dC^T A).
        let db = pass.needs(1).then(|| match self.b.transposed {
            false => self.gradient(pass, 1, [(a, p.a.transposed()), (dc, p.c)], &self.b, p.rows),
            true => self.gradient(pass, 1, [(dc, p.c.transposed()), (a, p.a)], &self.b, p.rows),
        });
        let da = pass.needs(0).then(|| match self.a.transposed {
            false => self.gradient(pass, 0, [(dc, p.c), (b, p.b.transposed())], &self.a, p.cols),
            true => self.gradient(pass, 0, [(b, p.b), (dc, p.c.transposed())], &self.a, p.cols),
        });
        if dc != dy {
            pass.release(dc);
        }
        vec![da, db]
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::program::{Instr, Slot};
    use crate::Job;

    /// The PyTorch profile's step of eager attention (rotary, so the queries are f32 and the
    /// probabilities cast for their product with the values) over 13 positions, `frozen` or not.
    fn step(frozen: bool) -> Vec<Instr> {
        let attention = json!({"self_attention": {
            "num_heads": 8, "head_dim": 8, "num_kv_heads": 4, "rope_theta": 10000.0,
            "implementation": "eager", "bias": false
        }});
        let first = match frozen {
            true => json!({"frozen": {"layers": [attention]}}),
            false => attention,
        };
        let job = Job::from_value(json!({
            "model": {"input_shape": [13, 33], "num_classes": 16, "layers": [
                first, {"flatten": {}}, {"linear": {"out_features": 16}}
            ]},
            "optimizer": {"name": "sgd"},
            "precision": "16-mixed"
        }))
        .unwrap();
        job.plan().program(5, 0).unwrap().step
    }

    /// The slots the probabilities-times-values product reads and writes, and what happens
    /// between it and the transposed copy of its output.
    fn around_the_transposed_copy(step: &[Instr]) -> (Slot, Vec<Slot>) {
        let copy = step
            .iter()
            .position(|i| matches!(i, Instr::SumHeadGroups { shape, .. } if shape.groups == 1))
            .expect("the output's transposed copy");
        let Instr::SumHeadGroups { from, .. } = step[copy] else {
            unreachable!()
        };
        let product = step[..copy]
            .iter()
            .rposition(|i| matches!(i, Instr::BatchedProduct { c, .. } if *c == from))
            .expect("the product");
        let Instr::BatchedProduct { a, .. } = step[product] else {
            unreachable!()
        };
        let freed = step[product..copy]
            .iter()
            .filter_map(|i| match i {
                Instr::Free(slot) => Some(*slot),
                _ => None,
            })
            .collect();
        (a, freed)
    }

    #[test]
    fn the_probabilities_cast_goes_before_the_output_is_copied_unless_saved() {
        // Frozen, nothing saves the cast: matmul lets it go before `.contiguous()` copies.
        let (cast, freed) = around_the_transposed_copy(&step(true));
        assert!(freed.contains(&cast), "{cast:?} not in {freed:?}");
        // Trained, bmm saves it for the values' gradient.
        let (cast, freed) = around_the_transposed_copy(&step(false));
        assert!(!freed.contains(&cast), "{cast:?} in {freed:?}");
    }
}
