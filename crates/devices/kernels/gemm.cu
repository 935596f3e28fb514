// gemm.cu: tiled f32 matrix products C (M x N) = A (M x K) * B (K x N) for a linear layer.
//
// Three entry points, one per product of a layer (row-major; ld = leading dimension). A and B
// share one storage (ab_storage), C has its own (c_storage; storage.cuh): operands are widened
// to f32 as they are staged in shared memory, every sum is f32, and C is rounded once.
//   gemm_nt: C = A * B^T   forward      Y  = X  * W^T   (A: M x K, B stored N x K)
//   gemm_tn: C = A^T * B   weight grad  dW = dY^T * X   (A stored K x M, B: K x N)
//   gemm_nn: C = A * B     input grad   dX = dY * W     (A: M x K, B: K x N)
//
// Launch: block (256, 1, 1); grid (min(ceil(M/128), 2^31-1), min(ceil(N/128), 65535), splits).
// Blocks loop over tiles past the grid, so any M and N work. Each block computes a 128 x 128
// tile of C from 8-deep slices of A and B staged in shared memory; each thread keeps an 8 x 8
// register tile. Every load is bounds-checked: M, N and K need not be multiples of anything.
// grid.z splits K into chunks of k_chunk; with accumulate != 0 the partial tiles are added to C
// with atomicAdd (C must be f32 and zeroed first), otherwise C is overwritten (grid.z must then
// be 1: a 16-bit C is never split, so it is rounded once).
// All indices are 64-bit. ptxas (sm_90): 128-136 registers, no spills; forcing two blocks per SM
// with __launch_bounds__(256, 2) spills, so one 8-warp block per SM it is, with 64 FMAs per k step.

#define BM 128
#define BN 128
#define BK 8
#define TM 8
#define TN 8
#define THREADS 256

template <bool A_TRANSPOSED, bool B_TRANSPOSED>
__device__ __forceinline__ void gemm_tiles(const void* __restrict__ A, const void* __restrict__ B,
                                           void* __restrict__ C, long long M, long long N, long long K,
                                           long long lda, long long ldb, long long k_chunk, int accumulate,
                                           int ab_storage, int c_storage) {
    __shared__ float As[BK][BM];
    __shared__ float Bs[BK][BN];
    const int tid = threadIdx.x;
    const int thread_row = tid / (BN / TN);
    const int thread_col = tid % (BN / TN);
    const long long tiles_m = (M + BM - 1) / BM;
    const long long tiles_n = (N + BN - 1) / BN;
    const long long k_begin = (long long)blockIdx.z * k_chunk;
    const long long k_end = min(K, k_begin + k_chunk);

    for (long long tile_m = blockIdx.x; tile_m < tiles_m; tile_m += gridDim.x) {
        for (long long tile_n = blockIdx.y; tile_n < tiles_n; tile_n += gridDim.y) {
            const long long row0 = tile_m * BM;
            const long long col0 = tile_n * BN;
            float acc[TM][TN];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

            for (long long k0 = k_begin; k0 < k_end; k0 += BK) {
#pragma unroll
                for (int l = 0; l < (BM * BK) / THREADS; ++l) {
                    const int e = tid + l * THREADS;
                    // Consecutive threads walk the contiguous dimension of each operand.
                    const int m = A_TRANSPOSED ? e % BM : e / BK;
                    const int k = A_TRANSPOSED ? e / BM : e % BK;
                    const long long gm = row0 + m, gk = k0 + k;
                    float v = 0.0f;
                    if (gm < M && gk < k_end) v = load_value(A, A_TRANSPOSED ? gk * lda + gm : gm * lda + gk, ab_storage);
                    As[k][m] = v;
                }
#pragma unroll
                for (int l = 0; l < (BN * BK) / THREADS; ++l) {
                    const int e = tid + l * THREADS;
                    const int n = B_TRANSPOSED ? e / BK : e % BN;
                    const int k = B_TRANSPOSED ? e % BK : e / BN;
                    const long long gn = col0 + n, gk = k0 + k;
                    float v = 0.0f;
                    if (gn < N && gk < k_end) v = load_value(B, B_TRANSPOSED ? gn * ldb + gk : gk * ldb + gn, ab_storage);
                    Bs[k][n] = v;
                }
                __syncthreads();
#pragma unroll
                for (int k = 0; k < BK; ++k) {
                    float a[TM], b[TN];
#pragma unroll
                    for (int i = 0; i < TM; ++i) a[i] = As[k][thread_row * TM + i];
#pragma unroll
                    for (int j = 0; j < TN; ++j) b[j] = Bs[k][thread_col * TN + j];
#pragma unroll
                    for (int i = 0; i < TM; ++i)
#pragma unroll
                        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
                }
                __syncthreads();
            }

#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const long long r = row0 + thread_row * TM + i;
                if (r >= M) continue;
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                    const long long c = col0 + thread_col * TN + j;
                    if (c >= N) continue;
                    if (accumulate) atomicAdd(&((float*)C)[r * N + c], acc[i][j]);
                    else store_value(C, r * N + c, c_storage, acc[i][j]);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
gemm_nt(const void* A, const void* B, void* C, long long M, long long N, long long K, long long lda,
        long long ldb, long long k_chunk, int accumulate, int ab_storage, int c_storage) {
    gemm_tiles<false, true>(A, B, C, M, N, K, lda, ldb, k_chunk, accumulate, ab_storage, c_storage);
}

extern "C" __global__ void __launch_bounds__(THREADS)
gemm_tn(const void* A, const void* B, void* C, long long M, long long N, long long K, long long lda,
        long long ldb, long long k_chunk, int accumulate, int ab_storage, int c_storage) {
    gemm_tiles<true, false>(A, B, C, M, N, K, lda, ldb, k_chunk, accumulate, ab_storage, c_storage);
}

extern "C" __global__ void __launch_bounds__(THREADS)
gemm_nn(const void* A, const void* B, void* C, long long M, long long N, long long K, long long lda,
        long long ldb, long long k_chunk, int accumulate, int ab_storage, int c_storage) {
    gemm_tiles<false, false>(A, B, C, M, N, K, lda, ldb, k_chunk, accumulate, ab_storage, c_storage);
}
