//! gemm.cu on the host: the products of a linear layer, in the `gemm` crate's f32 kernels (the
//! widest vectors the CPU has) over every core; 16-bit operands widened by blocks of rows.

pub(super) use gemm_common::Parallelism;

use super::values::{row_blocks, HostValues};
use super::{row_product, usize_of, HostDevice};
use headroom_engine::device::DeviceError;
use headroom_engine::plan::Storage;
use headroom_engine::step::{Gemm, Stored};

/// `c (m x n) = a (m x k) * b (k x n)`, plus `c` when `accumulate`; each operand given by its
/// row and column strides; spread over `parallelism`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
    c: &mut [f32],
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm operand too small"
    );
    // The kernels prefer a column-major destination: `c` is row-major, so the product is
    // computed as its transpose, `c^T = b^T a^T` (what the `gemm` crate's front does).
    let product = gemm_f32::gemm::f32::get_gemm_fn();
    // SAFETY: the assertion above keeps every strided access inside the slices; every stride
    // is positive.
    unsafe {
        product(
            n,
            m,
            k,
            c.as_mut_ptr(),
            n as isize,
            1,
            accumulate,
            b.as_ptr(),
            b_strides.0,
            b_strides.1,
            a.as_ptr(),
            a_strides.0,
            a_strides.1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Every thread of rayon's pool for the products, as for the element-wise passes (the pool's
/// size is read once; `available_parallelism` would read the cgroup limits on every product).
pub(super) fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    }
}

/// `y (rows x outputs) = x (rows x inputs) * w^T`, `w` being `outputs x inputs`.
pub fn linear_forward(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
) {
    gemm(
        rows,
        inputs,
        outputs,
        x,
        (inputs as isize, 1),
        w,
        (1, inputs as isize),
        y,
        false,
        parallelism(),
    );
}

/// `dw (outputs x inputs) = dy^T * x`, added to `dw` when `accumulate`.
pub fn weight_gradient(
    dy: &[f32],
    x: &[f32],
    dw: &mut [f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
    accumulate: bool,
) {
    gemm(
        outputs,
        rows,
        inputs,
        dy,
        (1, outputs as isize),
        x,
        (inputs as isize, 1),
        dw,
        accumulate,
        parallelism(),
    );
}

/// `dx (rows x inputs) = dy (rows x outputs) * w`.
pub fn input_gradient(
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
) {
    gemm(
        rows,
        outputs,
        inputs,
        dy,
        (outputs as isize, 1),
        w,
        (inputs as isize, 1),
        dx,
        false,
        parallelism(),
    );
}

impl Gemm for HostDevice {
    fn linear_forward(
        &mut self,
        x: &HostValues,
        w: &HostValues,
        y: &mut HostValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        let (rows, inputs, outputs) = (usize_of(rows), usize_of(inputs), usize_of(outputs));
        row_product(
            (x, inputs),
            (w, outputs * inputs),
            (y, outputs),
            rows,
            |x, w, y, rows| linear_forward(x, w, y, rows, inputs, outputs),
        );
        Ok(())
    }

    fn weight_gradient(
        &mut self,
        dy: &HostValues,
        x: &HostValues,
        dw: &mut HostValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        let (rows, inputs, outputs) = (usize_of(rows), usize_of(inputs), usize_of(outputs));
        let all_f32 = [dy, x, &*dw].iter().all(|v| v.storage() == Storage::F32);
        let weights = outputs * inputs;
        if all_f32 {
            dw.update(0..weights, |dw| {
                weight_gradient(
                    &dy.read(0..rows * outputs),
                    &x.read(0..rows * inputs),
                    dw,
                    rows,
                    inputs,
                    outputs,
                    false,
                )
            });
            return Ok(());
        }
        // The sum over rows, by blocks, in f32; rounded once at the end.
        let mut sum = vec![0.0f32; weights];
        for (n, block) in row_blocks(rows, inputs.max(outputs), false).enumerate() {
            let dy = dy.read(block.start * outputs..block.end * outputs);
            let x = x.read(block.start * inputs..block.end * inputs);
            weight_gradient(&dy, &x, &mut sum, block.len(), inputs, outputs, n > 0);
        }
        dw.write(0, &sum);
        Ok(())
    }

    fn input_gradient(
        &mut self,
        dy: &HostValues,
        w: &HostValues,
        dx: &mut HostValues,
        rows: u64,
        inputs: u64,
        outputs: u64,
    ) -> Result<(), DeviceError> {
        let (rows, inputs, outputs) = (usize_of(rows), usize_of(inputs), usize_of(outputs));
        row_product(
            (dy, outputs),
            (w, outputs * inputs),
            (dx, inputs),
            rows,
            |dy, w, dx, rows| input_gradient(dy, w, dx, rows, inputs, outputs),
        );
        Ok(())
    }
}
