//! Launch shapes of every kernel family, as pure functions of the problem size: the CUDA
//! launchers use them, and so does the CPU emulation of the kernels in the tests.
//!
//! Grid y and z stay under 65,535 and the batch goes on grid x (kernels loop past the grid), so
//! batches with more than 2^31 elements work.

use cudarc::driver::LaunchConfig;

use super::kernel::Kernel;

/// Largest grid x of the grid-stride kernels: enough blocks to fill any GPU.
const MAX_STRIDE_BLOCKS: u64 = 1 << 20;
/// Largest grid y or z.
const MAX_GRID_YZ: u64 = 65_535;
/// Side of the GEMM's output tile (`BM` = `BN` in gemm.cu).
const GEMM_TILE: u64 = 128;
/// Depth of the GEMM's shared-memory slices (`BK` in gemm.cu).
const GEMM_DEPTH: u64 = 8;
/// Fewest rows of K one split of a split-K GEMM handles.
const MIN_SPLIT_K: u64 = 1024;
/// Blocks per multiprocessor the reductions and split-K GEMMs aim for.
const BLOCKS_PER_MULTIPROCESSOR: u64 = 8;

fn blocks(n: u64, per_block: u64, cap: u64) -> u32 {
    n.div_ceil(per_block).clamp(1, cap) as u32
}

fn config(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// elementwise.cu, optimizer.cu, fill.cu: 256 threads, grid-stride over `n` elements.
pub fn elementwise(n: u64) -> LaunchConfig {
    config((blocks(n, 256, MAX_STRIDE_BLOCKS), 1, 1), (256, 1, 1))
}

/// Which of gemm.cu's three products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// `C = A * B^T` (`gemm_nt`).
    Nt,
    /// `C = A^T * B` (`gemm_tn`).
    Tn,
    /// `C = A * B` (`gemm_nn`).
    Nn,
}

impl Product {
    /// The kernel that computes it.
    pub fn kernel(self) -> Kernel {
        match self {
            Product::Nt => Kernel::GemmNt,
            Product::Tn => Kernel::GemmTn,
            Product::Nn => Kernel::GemmNn,
        }
    }
}

/// One product: `C (m x n) = op(A) * op(B)` over depth `k`, with the operands' leading dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Which product.
    pub product: Product,
    /// Rows of C.
    pub m: u64,
    /// Columns of C.
    pub n: u64,
    /// Depth of the product.
    pub k: u64,
    /// Leading dimension of A as stored.
    pub lda: u64,
    /// Leading dimension of B as stored.
    pub ldb: u64,
}

impl GemmShape {
    /// Forward: `Y (rows x outputs) = X (rows x inputs) * W^T`.
    pub fn forward(rows: u64, inputs: u64, outputs: u64) -> GemmShape {
        GemmShape {
            product: Product::Nt,
            m: rows,
            n: outputs,
            k: inputs,
            lda: inputs,
            ldb: inputs,
        }
    }

    /// Weight gradient: `dW (outputs x inputs) = dY^T * X`, with the batch as depth.
    pub fn weight_gradient(rows: u64, inputs: u64, outputs: u64) -> GemmShape {
        GemmShape {
            product: Product::Tn,
            m: outputs,
            n: inputs,
            k: rows,
            lda: outputs,
            ldb: inputs,
        }
    }

    /// Elements of A and B as stored, which the product reads.
    pub fn operand_lengths(&self) -> (u64, u64) {
        match self.product {
            Product::Nt => (self.m * self.lda, self.n * self.ldb),
            Product::Tn => (self.k * self.lda, self.k * self.ldb),
            Product::Nn => (self.m * self.lda, self.k * self.ldb),
        }
    }

    /// Input gradient: `dX (rows x inputs) = dY (rows x outputs) * W`.
    pub fn input_gradient(rows: u64, inputs: u64, outputs: u64) -> GemmShape {
        GemmShape {
            product: Product::Nn,
            m: rows,
            n: inputs,
            k: outputs,
            lda: outputs,
            ldb: inputs,
        }
    }
}

/// How a product is launched.
#[derive(Debug, Clone, Copy)]
pub struct GemmLaunch {
    /// Grid and block.
    pub config: LaunchConfig,
    /// Depth each grid-z slice covers.
    pub k_chunk: u64,
    /// Whether slices add into C with atomics (C must be zeroed first).
    pub accumulate: bool,
}

/// A long depth (the batch, for weight gradients) is split over grid z so that a handful of
/// output tiles still fills the GPU's `multiprocessors`, unless the output may not be split
/// (`may_split` false: a 16-bit output, which must be rounded once).
pub fn gemm(shape: &GemmShape, multiprocessors: u32, may_split: bool) -> GemmLaunch {
    let grid_x = shape.m.div_ceil(GEMM_TILE).clamp(1, i32::MAX as u64);
    let grid_y = shape.n.div_ceil(GEMM_TILE).clamp(1, MAX_GRID_YZ);
    let wanted_blocks = BLOCKS_PER_MULTIPROCESSOR * multiprocessors as u64;
    let splits = (wanted_blocks / (grid_x * grid_y))
        .min(shape.k.div_ceil(MIN_SPLIT_K))
        .min(if may_split { MAX_GRID_YZ } else { 1 })
        .clamp(1, MAX_GRID_YZ);
    let k_chunk = shape.k.div_ceil(splits).div_ceil(GEMM_DEPTH) * GEMM_DEPTH;
    let splits = shape.k.div_ceil(k_chunk.max(1)).max(1);
    GemmLaunch {
        config: config((grid_x as u32, grid_y as u32, splits as u32), (256, 1, 1)),
        k_chunk,
        accumulate: splits > 1,
    }
}

/// reduce.cu's `column_sum`: 32 columns x 8 row lanes per block; returns the rows per chunk.
/// Rows are split into chunks (added up with atomics) only when `may_split`.
pub fn column_sum(
    rows: u64,
    cols: u64,
    multiprocessors: u32,
    may_split: bool,
) -> (LaunchConfig, u64) {
    let column_tiles = cols.div_ceil(32).clamp(1, MAX_GRID_YZ);
    let wanted_chunks = match may_split {
        true => (BLOCKS_PER_MULTIPROCESSOR * multiprocessors as u64 / column_tiles).max(1),
        false => 1,
    };
    let rows_per_chunk = rows.div_ceil(wanted_chunks).max(64);
    let chunks = rows.div_ceil(rows_per_chunk).max(1);
    (
        config((chunks as u32, column_tiles as u32, 1), (32, 8, 1)),
        rows_per_chunk,
    )
}

/// A block of 256 threads per item (a filter's weight, a channel), at most `cap` blocks
/// (blocks loop past the grid): conv.cu's `conv2d_weight_gradient`, reduce.cu's `channel_sum`,
/// norm.cu's kernels.
fn block_per_item(items: u64, cap: u64) -> LaunchConfig {
    config((items.clamp(1, cap) as u32, 1, 1), (256, 1, 1))
}

/// conv.cu's `conv2d_weight_gradient`: a block per weight, at most 2^20.
pub fn conv2d_weight_gradient(weights: u64) -> LaunchConfig {
    block_per_item(weights, MAX_STRIDE_BLOCKS)
}

/// reduce.cu's `channel_sum` and norm.cu's kernels: a block per channel, at most 65,535.
pub fn block_per_channel(channels: u64) -> LaunchConfig {
    block_per_item(channels, MAX_GRID_YZ)
}

/// reduce.cu's `mean`: at most 4096 blocks of 256 threads.
pub fn mean(n: u64) -> LaunchConfig {
    config((blocks(n, 256, 4096), 1, 1), (256, 1, 1))
}

/// loss.cu: one warp per row, 8 warps per block.
pub fn softmax_cross_entropy(rows: u64) -> LaunchConfig {
    config((blocks(rows, 8, MAX_STRIDE_BLOCKS), 1, 1), (256, 1, 1))
}

/// Rows a block of attention.cu takes, a thread each (`ATTENTION_ROWS`).
const ATTENTION_ROWS: u64 = 64;

/// attention.cu: a block per `ATTENTION_ROWS` rows of a sequence and (sample, head) pair, the
/// pairs past 65,535 looped over; `heads` are the query heads, or the key/value heads for the
/// key kernel.
pub fn attention(batch: u64, sequence: u64, heads: u64) -> LaunchConfig {
    let pairs = batch.saturating_mul(heads).clamp(1, MAX_GRID_YZ) as u32;
    config(
        (blocks(sequence, ATTENTION_ROWS, i32::MAX as u64), pairs, 1),
        (ATTENTION_ROWS as u32, 1, 1),
    )
}

/// Side of scores.cu's product tile (`SCORES_TILE`).
const SCORES_TILE: u64 = 16;

/// scores.cu's `batched_product`: a block of 16 x 16 threads per tile of the output, the
/// tiles and the (sample, head) pairs past the grid's limits looped over.
pub fn batched_product(pairs: u64, rows: u64, cols: u64) -> LaunchConfig {
    config(
        (
            blocks(cols, SCORES_TILE, MAX_GRID_YZ),
            blocks(rows, SCORES_TILE, MAX_GRID_YZ),
            pairs.clamp(1, MAX_GRID_YZ) as u32,
        ),
        (SCORES_TILE as u32, SCORES_TILE as u32, 1),
    )
}

/// scores.cu's softmax kernels: a block of 256 threads per row, at most 2^20.
pub fn block_per_row(rows: u64) -> LaunchConfig {
    block_per_item(rows, MAX_STRIDE_BLOCKS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any batch, any layer: grid y and z stay within CUDA's limits and the launch covers
        /// every tile and every row of depth.
        #[test]
        fn launch_shapes_respect_the_grid_limits(
            rows in 1u64..1 << 40,
            inputs in 1u64..1 << 24,
            outputs in 1u64..1 << 24,
            multiprocessors in 1u32..200,
            may_split in any::<bool>(),
        ) {
            for shape in [GemmShape::forward(rows, inputs, outputs), GemmShape::weight_gradient(rows, inputs, outputs), GemmShape::input_gradient(rows, inputs, outputs)] {
                let launch = gemm(&shape, multiprocessors, may_split);
                let (x, y, z) = launch.config.grid_dim;
                prop_assert!(x >= 1 && (x as u64) <= i32::MAX as u64);
                prop_assert!((1..=65_535).contains(&y) && (1..=65_535).contains(&z));
                prop_assert!(launch.k_chunk * z as u64 >= shape.k);
                prop_assert!(launch.k_chunk * (z as u64 - 1) < shape.k, "an empty split");
                prop_assert_eq!(launch.accumulate, z > 1);
                prop_assert!(may_split || z == 1);
            }
            let (sum, per_chunk) = column_sum(rows, outputs, multiprocessors, may_split);
            prop_assert!(sum.grid_dim.1 <= 65_535);
            prop_assert!(sum.grid_dim.0 as u64 * per_chunk >= rows);
            prop_assert!(may_split || sum.grid_dim.0 == 1);
            let attention = attention(rows, outputs, inputs);
            prop_assert!(attention.grid_dim.1 <= 65_535);
            prop_assert!(attention.grid_dim.0 as u64 * ATTENTION_ROWS >= outputs);
            for cfg in [elementwise(rows * 784), mean(rows), softmax_cross_entropy(rows)] {
                prop_assert!(cfg.grid_dim.0 >= 1 && cfg.grid_dim.1 == 1 && cfg.grid_dim.2 == 1);
            }
        }
    }
}
