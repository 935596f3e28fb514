//! Rotary position embedding on an attention block's queries and keys (`rope_theta`), as
//! Hugging Face's Llama computes it: `q * cos + rotate_half(q) * sin` over the heads viewed out
//! of the projection (`[batch, heads, positions, head_dim]`), with `cos` and `sin` tables of
//! `[positions, head_dim]` that the model makes once a forward, in its parameters' type, and
//! every layer's products save.
//!
//! headroom's kernel (attention.cu's `rotary_forward`) computes the angles as it goes and writes
//! the embedded values in one pass; PyTorch's composite allocates more, which the PyTorch
//! profile holds for its bytes ([`Graph::pytorch_only`]):
//! - forward: `q * cos` and `rotate_half(q) * sin` (in the tables' type where wider: f32 under
//!   autocast), the negated half and the `cat` of `rotate_half` between them, their sum (the
//!   result); the projection's output is let go once the keys are embedded too;
//! - backward: `dy * sin` cast back to the input's type, `rotate_half`'s two `slice_backward`s
//!   (full-size zeros each, the negated half between), `dy * cos` likewise, all summed where
//!   autograd sums gradients meeting at one tensor (in place untraced), `dy` let go before the
//!   last sum;
//! - the heads' `view(...).transpose(1, 2)`: its backward copies the (now contiguous)
//!   gradient back into the projection's layout (`reshape` of a transposed tensor).

use crate::memory::{Element, Part, Storage};
use crate::program::geometry::Rotary;
use crate::program::graph::{Backward, Graph, Pass, Tensor};
use crate::program::{Instr, Scale};

/// `q` (or `k`, `v`), a projection's output, seen as heads: a view whose backward copies the
/// gradient into the projection's layout where `copies` (where the gradient arrives laid out
/// otherwise), else hands it on. A reference the caller owns.
pub fn heads_view(graph: &mut Graph, x: Tensor, copies: bool) -> Tensor {
    let view = graph.alias(x);
    graph.record(HeadsViewBackward { copies }, &[x], &[], &[view]);
    view
}

/// The model's `cos` and `sin` tables for `shape`'s positions and head width (PyTorch's step
/// only), made at the first layer that asks and shared by the rest of the forward.
pub fn tables(graph: &mut Graph, shape: &Rotary) -> Vec<Tensor> {
    let name = format!(
        "rotary {}x{} theta {}",
        shape.sequence, shape.head_dim, shape.theta
    );
    let storage = graph.precision().master();
    let len = shape.sequence.saturating_mul(shape.head_dim);
    graph.shared(&name, |graph| {
        (0..2)
            .filter_map(|_| graph.pytorch_only(Part::Activations, len, Element::Value(storage)))
            .collect()
    })
}

/// `x` embedded: a new tensor in the wider of `x`'s type and the tables', recorded with its
/// backward (which holds `tables` until it has used each). A reference the caller owns.
pub fn embed(graph: &mut Graph, x: Tensor, tables: &[Tensor], shape: Rotary) -> Tensor {
    let input = graph.storage(x);
    let wide = widest(input, graph.precision().master());
    let len = shape.values();
    let temporary = |graph: &mut Graph, len: u64, storage: Storage| {
        graph.pytorch_only(Part::Activations, len, Element::Value(storage))
    };
    let by_cos = temporary(graph, len, wide);
    let negated = temporary(graph, len / 2, input);
    let rotated = temporary(graph, len, input);
    graph.release_optional(negated);
    let by_sin = temporary(graph, len, wide);
    graph.release_optional(rotated);
    let y = graph.output(len, wide);
    graph.emit(Instr::RotaryForward {
        x: graph.slot(x),
        y: graph.slot(y),
        shape,
    });
    graph.release_optional(by_cos);
    graph.release_optional(by_sin);
    // Each product keeps its table until its own backward has run (the last to run frees it),
    // so the node holds references of its own rather than saving them whole.
    let backward = RotaryBackward {
        shape,
        input,
        tables: tables.to_vec(),
    };
    if graph.record(backward, &[x], &[], &[y]).is_some() {
        for &table in tables {
            graph.retain(table);
        }
    }
    y
}

/// The type a product of `a` and `b` values takes (PyTorch's promotion).
fn widest(a: Storage, b: Storage) -> Storage {
    match a == Storage::F32 || b == Storage::F32 {
        true => Storage::F32,
        false => a,
    }
}

/// The heads view's backward: the gradient copied into the projection's layout, or handed on
/// as it is where it arrives in that layout already.
#[derive(Debug)]
struct HeadsViewBackward {
    copies: bool,
}

impl Backward for HeadsViewBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None];
        };
        if !self.copies {
            return vec![Some(pass.pass_through(dy))];
        }
        let len = pass.elements(dy);
        let dx = pass.gradient(0, len, pass.storage(dy));
        pass.emit(Instr::Convert {
            from: pass.slot(dy),
            to: pass.slot(dx),
            len,
            scale: Scale::One,
        });
        vec![Some(dx)]
    }
}

/// Rotary embedding's backward, with PyTorch's temporaries in its order (see the module's
/// documentation).
#[derive(Debug)]
struct RotaryBackward {
    shape: Rotary,
    /// How the input is stored: its gradient's type.
    input: Storage,
    /// `cos` and `sin`, held (PyTorch's step only).
    tables: Vec<Tensor>,
}

impl RotaryBackward {
    /// A temporary of `len` in `wide`, cast to the input's type where that differs (autograd
    /// casts a gradient to its input's type).
    fn product(&self, pass: &mut Pass<'_>, len: u64, wide: Storage) -> Option<Tensor> {
        let product = pass.pytorch_only(len, wide);
        if wide == self.input {
            return product;
        }
        let cast = pass.pytorch_only(len, self.input);
        pass.release_optional(product);
        cast
    }

    /// The sum autograd makes where gradients meet: nothing new in place, else a new tensor
    /// (held for its bytes: the real gradient is the first, kept throughout).
    fn sum(&self, pass: &mut Pass<'_>, len: u64) {
        if !pass.sums_in_place() {
            if let Some(sum) = pass.pytorch_only(len, self.input) {
                pass.release(sum);
            }
        }
    }
}

impl Backward for RotaryBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let (Some(dy), true) = (grads[0], pass.needs(0)) else {
            return vec![None];
        };
        let (len, wide) = (self.shape.values(), pass.storage(dy));
        let by_sin = self.product(pass, len, wide);
        if let Some(&sin) = self.tables.get(1) {
            pass.release(sin);
        }
        // The two halves' slice_backward: the first's is the gradient headroom's kernel writes.
        let dx = pass.gradient(0, len, self.input);
        let negated = pass.pytorch_only(len / 2, self.input);
        pass.release_optional(by_sin);
        let second_half = pass.pytorch_only(len, self.input);
        pass.release_optional(negated);
        self.sum(pass, len);
        pass.release_optional(second_half);
        let by_cos = self.product(pass, len, wide);
        pass.emit(Instr::RotaryBackward {
            dy: pass.slot(dy),
            dx: pass.slot(dx),
            shape: self.shape,
        });
        pass.consume(dy);
        if let Some(&cos) = self.tables.first() {
            pass.release(cos);
        }
        self.sum(pass, len);
        pass.release_optional(by_cos);
        vec![Some(dx)]
    }
}

/// Rotary embedding from its definition in f64, over `[batch, sequence, heads, head_dim]`
/// values.
pub fn reference(x: &[f64], shape: &Rotary) -> Vec<f64> {
    let (t, h, d) = (shape.sequence, shape.heads, shape.head_dim);
    let half = (d / 2) as usize;
    x.chunks_exact(d as usize)
        .enumerate()
        .flat_map(|(row, head)| {
            let position = row as u64 / h % t;
            (0..d as usize).map(move |i| {
                let angle = f64::from(shape.angle(position, i as u64));
                let rotated = match i < half {
                    true => -head[i + half],
                    false => head[i - half],
                };
                head[i] * angle.cos() + rotated * angle.sin()
            })
        })
        .collect()
}
