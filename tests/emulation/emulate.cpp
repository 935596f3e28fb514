// A CPU emulation of the CUDA execution model, just enough to run kernels/*.cu unchanged: every
// thread of a block is a std::thread, blocks run one after another, __shared__ memory is a static
// (shared by the block's threads), __syncthreads and __syncwarp are barriers, warp shuffles go
// through a per-warp exchange buffer, and atomicAdd is std::atomic_ref.
//
// It checks the kernels' arithmetic, indexing, bounds and tiling logic on the CPU. It does not
// model what only a GPU has (memory coalescing, grid limits, timing): docs/gpu-runs.md says what a
// real GPU run must still prove. Built and driven by tests/emulation.rs.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static thread_local std::barrier<>* block_barrier;
static thread_local std::barrier<>* warp_barrier;
static thread_local float* warp_exchange;
static thread_local unsigned lane_id;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline void __syncwarp() { warp_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float value, int offset) {
    warp_exchange[lane_id] = value;
    warp_barrier->arrive_and_wait();
    const float other = warp_exchange[lane_id ^ offset];
    warp_barrier->arrive_and_wait();
    return other;
}
inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline float __int_as_float(int bits) { return std::bit_cast<float>(bits); }
using std::max;
using std::min;

#include "../../kernels/elementwise.cu"
#include "../../kernels/fill.cu"
#include "../../kernels/gemm.cu"
#include "../../kernels/loss.cu"
#include "../../kernels/optimizer.cu"
#include "../../kernels/reduce.cu"

/// One launch at a time: the grid, block and __shared__ statics are process-wide.
static std::mutex one_launch;

/// Runs `kernel` over the grid with one std::thread per CUDA thread of a block. The threads walk
/// the blocks together, in order; for kernels with __shared__ memory they meet at a barrier after
/// each block, so blocks never overlap and a static stands in for the block's shared memory.
template <typename Kernel>
static void launch(const unsigned* grid, const unsigned* block, Kernel kernel, bool uses_shared_memory = false) {
    std::lock_guard<std::mutex> guard(one_launch);
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    const unsigned threads = block[0] * block[1] * block[2];
    const unsigned warps = (threads + 31) / 32;
    std::barrier<> block_sync(threads);
    std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
    std::vector<std::vector<float>> exchange(warps, std::vector<float>(32));
    for (unsigned w = 0; w < warps; ++w) warp_sync.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w * 32)));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = {t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
            block_barrier = &block_sync;
            warp_barrier = warp_sync[t / 32].get();
            warp_exchange = exchange[t / 32].data();
            lane_id = t % 32;
            for (unsigned bz = 0; bz < grid[2]; ++bz)
                for (unsigned by = 0; by < grid[1]; ++by)
                    for (unsigned bx = 0; bx < grid[0]; ++bx) {
                        blockIdx = {bx, by, bz};
                        kernel();
                        // Only kernels with __shared__ memory need blocks kept apart.
                        if (uses_shared_memory) block_sync.arrive_and_wait();
                    }
        });
    }
    for (auto& thread : pool) thread.join();
}

#define G const unsigned *grid, const unsigned *block
extern "C" {
void emu_gemm(G, int product, const float* A, const float* B, float* C, long long M, long long N, long long K,
              long long lda, long long ldb, long long k_chunk, int accumulate) {
    launch(grid, block, [=] {
        if (product == 0) gemm_nt(A, B, C, M, N, K, lda, ldb, k_chunk, accumulate);
        if (product == 1) gemm_tn(A, B, C, M, N, K, lda, ldb, k_chunk, accumulate);
        if (product == 2) gemm_nn(A, B, C, M, N, K, lda, ldb, k_chunk, accumulate);
    }, true);
}
void emu_bias_add(G, float* pre, const float* bias, long long rows, long long cols) {
    launch(grid, block, [=] { bias_add(pre, bias, rows, cols); });
}
void emu_bias_activation(G, float* pre, const float* bias, float* post, long long rows, long long cols, int activation) {
    launch(grid, block, [=] { bias_activation(pre, bias, post, rows, cols, activation); });
}
void emu_activation_backward(G, const float* grad, float* pre, long long n, int activation) {
    launch(grid, block, [=] { activation_backward(grad, pre, n, activation); });
}
void emu_column_sum(G, const float* in, float* out, long long rows, long long cols, long long per_chunk) {
    launch(grid, block, [=] { column_sum(in, out, rows, cols, per_chunk); }, true);
}
void emu_mean(G, const float* in, float* out, long long n) {
    launch(grid, block, [=] { mean(in, out, n); }, true);
}
void emu_softmax_cross_entropy(G, float* logits, const unsigned* labels, float* loss, long long rows, long long classes,
                               float inv_rows) {
    launch(grid, block, [=] { softmax_cross_entropy(logits, labels, loss, rows, classes, inv_rows); });
}
void emu_sgd(G, float* p, const float* g, long long n, float lr) {
    launch(grid, block, [=] { sgd(p, g, n, lr); });
}
void emu_sgd_momentum(G, float* p, const float* g, float* v, long long n, float lr, float momentum) {
    launch(grid, block, [=] { sgd_momentum(p, g, v, n, lr, momentum); });
}
void emu_adam(G, float* p, const float* g, float* m, float* v, long long n, float lr, float b1, float b2, float eps,
              float c1, float c2, float decay) {
    launch(grid, block, [=] { adam(p, g, m, v, n, lr, b1, b2, eps, c1, c2, decay); });
}
void emu_fill_uniform(G, float* out, long long n, unsigned long long key, float scale) {
    launch(grid, block, [=] { fill_uniform(out, n, key, scale); });
}
void emu_fill_labels(G, unsigned* labels, const float* inputs, long long rows, long long features, long long classes) {
    launch(grid, block, [=] { fill_labels(labels, inputs, rows, features, classes); });
}
}
