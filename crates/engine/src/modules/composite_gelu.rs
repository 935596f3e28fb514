//! Hugging Face's `NewGELUActivation` (GPT-2's `gelu_new`) as PyTorch runs it: not the fused
//! `gelu(approximate="tanh")` but its composite,
//!
//! ```python
//! 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
//! ```
//!
//! evaluated left to right: `0.5 * x` first, then `pow` (on CUDA's autocast f32 list: under a
//! mixed precision it reads an f32 copy of a 16-bit input), three products and sums by Python
//! numbers, `tanh`, and the last product, whose result takes the wider type (f32 under autocast).
//! Autograd saves `pow`'s input, `tanh`'s output and both factors of the last product: four
//! tensors the size of the input where the fused GELU saves one.
//!
//! headroom records those nodes with PyTorch's buffers and their lifetimes, and computes the
//! values with its kernels: the output is elementwise.cu's tanh GELU of `pow`'s input, and the
//! whole input gradient rides on the `0.5 * x` path (the last product writes `h`'s gradient as
//! the activation's gradient, and `0.5 * x`'s backward copies it); every other path carries
//! zeros in PyTorch's buffers. Only the PyTorch profile takes this path; headroom's own step
//! runs the fused GELU.

use crate::memory::Storage;
use crate::program::geometry::Nonlinearity;
use crate::program::graph::{Backward, CastBackward, Graph, Pass, PassThrough, Tensor};
use crate::program::{Instr, SavedAs, Scale};

/// `sqrt(2 / pi)`, the scale inside the `tanh`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// The composite's forward over `x` (`len` values, batch included), recorded; returns the
/// output, a reference the caller owns.
pub fn forward(graph: &mut Graph, x: Tensor, len: u64) -> Tensor {
    let input = graph.storage(x);
    // `0.5 * x`, in the input's type.
    let h = graph.output(len, input);
    graph.record(Halved, &[x], &[], &[h]);
    // `pow`'s operand (an f32 copy under autocast), saved.
    let cubed_from = graph.wide_operand(x);
    let wide = graph.storage(cubed_from);
    let cube = graph.output(len, wide);
    graph.record(Cubed { len }, &[cubed_from], &[cubed_from], &[cube]);
    let scaled_cube = times(graph, cube, 0.044_715);
    graph.release(cube);
    // `x + ...`: the wider type.
    let inner = graph.output(len, wide);
    graph.record(Sum { input }, &[x, scaled_cube], &[], &[inner]);
    graph.release(scaled_cube);
    let argument = times(graph, inner, SQRT_2_OVER_PI);
    graph.release(inner);
    let tanh = graph.output(len, wide);
    graph.record(Tanh, &[argument], &[tanh], &[tanh]);
    graph.release(argument);
    // `1.0 + tanh`: its gradient passes through.
    let one_plus = graph.output(len, wide);
    graph.record(PassThrough, &[tanh], &[], &[one_plus]);
    graph.release(tanh);
    // `h * (1 + tanh)`: the output, in the wider type.
    let y = graph.output(len, wide);
    graph.emit(Instr::Activation {
        x: graph.slot(cubed_from),
        y: graph.slot(y),
        len,
        nonlinearity: Nonlinearity::GeluTanh,
    });
    let product = Product {
        operand: cubed_from,
        input,
        len,
    };
    // Saved: both factors, and `pow`'s operand (which `pow` saves until later anyway) for the
    // derivative.
    graph.record(product, &[h, one_plus], &[h, one_plus, cubed_from], &[y]);
    for tensor in [h, one_plus, cubed_from] {
        graph.release(tensor);
    }
    y
}

/// The last product's backward: `h`'s gradient written as the whole activation's (the GELU's
/// derivative at `pow`'s operand, saved), converted to `h`'s type as autograd converts it after
/// the node has run; `(1 + tanh)`'s gradient zeros.
#[derive(Debug)]
struct Product {
    operand: Tensor,
    input: Storage,
    len: u64,
}

impl Backward for Product {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None, None];
        };
        let wide = pass.storage(dy);
        let d_one_plus = zeros(pass, 1, self.len, wide);
        let dh = pass.gradient(0, self.len, wide);
        pass.emit(Instr::ActivationGradient {
            grad: pass.slot(dy),
            saved: pass.slot(self.operand),
            out: pass.slot(dh),
            len: self.len,
            nonlinearity: Nonlinearity::GeluTanh,
            saved_as: SavedAs::Input,
        });
        pass.applied();
        let converted = pass.gradient_as(0, dh, self.input);
        pass.release(dh);
        vec![Some(converted), Some(d_one_plus)]
    }
}

/// `0.5 * x`'s backward: the gradient times 0.5 in PyTorch, a copy here (it carries the whole
/// gradient already).
#[derive(Debug)]
struct Halved;

impl Backward for Halved {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dh) = grads[0] else {
            return vec![None];
        };
        let (len, storage) = (pass.elements(dh), pass.storage(dh));
        let dx = pass.gradient(0, len, storage);
        pass.emit(Instr::Convert {
            from: pass.slot(dh),
            to: pass.slot(dx),
            len,
            scale: Scale::One,
        });
        vec![Some(dx)]
    }
}

/// `tanh`'s backward: a new gradient, zeros here.
#[derive(Debug)]
struct Tanh;

impl Backward for Tanh {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(grad) = grads[0] else {
            return vec![None];
        };
        let (len, storage) = (pass.elements(grad), pass.storage(grad));
        vec![Some(zeros(pass, 0, len, storage))]
    }
}

/// `pow`'s backward, `grad * (3 * x.pow(2))`: `x.pow(2)` and `3 * x.pow(2)` live until the
/// product is made (C++ temporaries); the product, zeros here, is the gradient.
#[derive(Debug)]
struct Cubed {
    len: u64,
}

impl Backward for Cubed {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(grad) = grads[0] else {
            return vec![None];
        };
        let storage = pass.storage(grad);
        let temporaries = [(); 2].map(|_| pass.gradient(0, self.len, storage));
        let dx = zeros(pass, 0, self.len, storage);
        for tensor in temporaries {
            pass.release(tensor);
        }
        vec![Some(dx)]
    }
}

/// `tensor * factor` (a Python number) as PyTorch allocates it, recorded (backward scales the
/// gradient); its values are not computed (nothing reads them).
fn times(graph: &mut Graph, tensor: Tensor, factor: f32) -> Tensor {
    let (len, storage) = (graph.elements(tensor), graph.storage(tensor));
    let scaled = graph.output(len, storage);
    let backward = CastBackward {
        elements: len,
        to: storage,
        scale: Scale::By(factor),
    };
    graph.record(backward, &[tensor], &[], &[scaled]);
    scaled
}

/// `x + 0.044715 * x^3`'s backward: the gradient to both, converted to the input's type for `x`
/// after the node has run.
#[derive(Debug)]
struct Sum {
    input: Storage,
}

impl Backward for Sum {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(grad) = grads[0] else {
            return vec![None, None];
        };
        let to_cube = pass.pass_through(grad);
        pass.applied();
        vec![Some(pass.gradient_as(0, grad, self.input)), Some(to_cube)]
    }
}

/// A new gradient for input `k`, zeros.
fn zeros(pass: &mut Pass<'_>, k: usize, len: u64, storage: Storage) -> Tensor {
    let out = pass.gradient(k, len, storage);
    pass.emit(Instr::FillUniform {
        out: pass.slot(out),
        len,
        key: 0,
        scale: 0.0,
    });
    out
}
