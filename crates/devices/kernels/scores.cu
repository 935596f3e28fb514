// scores.cu: eager attention, the scores materialized as PyTorch's eager path computes them
// (Hugging Face's eager_attention_forward): batched products over (sample, head) pairs read
// through strides, the causal mask, the softmax of each row and its backward, and grouped-query
// attention's repetition of key/value heads and its sum. Every sum is f32; what is stored is
// rounded once to its buffer's storage (storage.cuh). All indices are 64-bit.

// -infinity (NVRTC without headers has no INFINITY): a masked score.
#define SCORES_MINUS_INFINITY __int_as_float((int)0xff800000u)
// Side of the batched product's output tile; the block is SCORES_TILE x SCORES_TILE threads.
#define SCORES_TILE 16

// c = a b for every (sample, head) pair: a is rows x inner, b inner x cols, c rows x cols; element
// (r, k) of pair (n, h) of x lies at n * x_batch + h * x_head + r * x_row + k * x_col, so a
// projection's heads and transposed operands are read in place. The three share `storage`.
// Launch: block (16, 16, 1); grid (column tiles, row tiles, pairs), each capped and looped over.
extern "C" __global__ void batched_product(const void* a, const void* b, void* c, long long batch, long long heads,
                                           long long rows, long long inner, long long cols, long long a_batch,
                                           long long a_head, long long a_row, long long a_col, long long b_batch,
                                           long long b_head, long long b_row, long long b_col, long long c_batch,
                                           long long c_head, long long c_row, long long c_col, int storage) {
    __shared__ float a_tile[SCORES_TILE][SCORES_TILE + 1];
    __shared__ float b_tile[SCORES_TILE][SCORES_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long pairs = batch * heads;
    const long long row_tiles = (rows + SCORES_TILE - 1) / SCORES_TILE;
    const long long col_tiles = (cols + SCORES_TILE - 1) / SCORES_TILE;
    for (long long pair = blockIdx.z; pair < pairs; pair += gridDim.z) {
        const long long n = pair / heads, h = pair % heads;
        const long long a0 = n * a_batch + h * a_head, b0 = n * b_batch + h * b_head;
        const long long c0 = n * c_batch + h * c_head;
        for (long long row_tile = blockIdx.y; row_tile < row_tiles; row_tile += gridDim.y) {
            for (long long col_tile = blockIdx.x; col_tile < col_tiles; col_tile += gridDim.x) {
                const long long i = row_tile * SCORES_TILE + ty, j = col_tile * SCORES_TILE + tx;
                float sum = 0.0f;
                for (long long k0 = 0; k0 < inner; k0 += SCORES_TILE) {
                    const long long ka = k0 + tx, kb = k0 + ty;
                    a_tile[ty][tx] = i < rows && ka < inner ? load_value(a, a0 + i * a_row + ka * a_col, storage) : 0.0f;
                    b_tile[ty][tx] = kb < inner && j < cols ? load_value(b, b0 + kb * b_row + j * b_col, storage) : 0.0f;
                    __syncthreads();
                    for (int k = 0; k < SCORES_TILE; ++k) sum += a_tile[ty][k] * b_tile[k][tx];
                    __syncthreads();
                }
                if (i < rows && j < cols) store_value(c, c0 + i * c_row + j * c_col, storage, sum);
            }
        }
    }
}

// to = from over `matrices` of positions x positions, -infinity where the key (column) follows the
// query (row): the causal mask added, each buffer in its own storage.
extern "C" __global__ void causal_mask(const void* from, void* to, long long matrices, long long positions,
                                       int from_storage, int to_storage) {
    const long long n = matrices * positions * positions;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long i = e / positions % positions, j = e % positions;
        store_value(to, e, to_storage, j > i ? SCORES_MINUS_INFINITY : load_value(from, e, from_storage));
    }
}

// p = softmax of each row of x (x_storage), p in p_storage (f32 as Llama's eager attention asks, or
// the scores' type as GPT-2's). Launch: block (256, 1, 1), a block per row, looped past the grid.
extern "C" __global__ void softmax_rows(const void* x, void* p, long long rows, long long cols, int x_storage,
                                        int p_storage) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long at = row * cols;
        float max = SCORES_MINUS_INFINITY;
        for (long long j = threadIdx.x; j < cols; j += blockDim.x) max = fmaxf(max, load_value(x, at + j, x_storage));
        max = block_max(max);
        float sum = 0.0f;
        for (long long j = threadIdx.x; j < cols; j += blockDim.x) sum += expf(load_value(x, at + j, x_storage) - max);
        sum = block_sum(sum);
        for (long long j = threadIdx.x; j < cols; j += blockDim.x)
            store_value(p, at + j, p_storage, expf(load_value(x, at + j, x_storage) - max) / sum);
    }
}

// dx = p (dp - sum_j p dp) per row, p and dp in p_storage, dx in dx_storage. Launch as softmax_rows.
extern "C" __global__ void softmax_rows_backward(const void* p, const void* dp, void* dx, long long rows,
                                                 long long cols, int p_storage, int dx_storage) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long at = row * cols;
        float dot = 0.0f;
        for (long long j = threadIdx.x; j < cols; j += blockDim.x)
            dot += load_value(p, at + j, p_storage) * load_value(dp, at + j, p_storage);
        dot = block_sum(dot);
        for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
            const float p_j = load_value(p, at + j, p_storage), dp_j = load_value(dp, at + j, p_storage);
            store_value(dx, at + j, dx_storage, p_j * (dp_j - dot));
        }
    }
}

// to [batch, kv_heads * groups, positions, head_dim] from [batch, positions, kv_heads, head_dim]:
// query head h reads key/value head h / groups (repeat_kv). Grid-stride over `to`.
extern "C" __global__ void repeat_heads(const void* from, void* to, long long batch, long long positions,
                                        long long kv_heads, long long groups, long long head_dim, int storage) {
    const long long heads = kv_heads * groups, n = batch * heads * positions * head_dim;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long d = e % head_dim, s = e / head_dim % positions, h = e / (head_dim * positions) % heads;
        const long long b = e / (head_dim * positions * heads);
        store_value(to, e, storage, load_value(from, ((b * positions + s) * kv_heads + h / groups) * head_dim + d, storage));
    }
}

// repeat_heads' backward: to [batch, positions, kv_heads, head_dim] is the sum of `from`'s rows of
// the query heads g * groups .. g * groups + groups - 1, in that order. Grid-stride over `to`.
extern "C" __global__ void sum_head_groups(const void* from, void* to, long long batch, long long positions,
                                           long long kv_heads, long long groups, long long head_dim, int storage) {
    const long long heads = kv_heads * groups, n = batch * positions * kv_heads * head_dim;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long d = e % head_dim, g = e / head_dim % kv_heads, s = e / (head_dim * kv_heads) % positions;
        const long long b = e / (head_dim * kv_heads * positions);
        float sum = 0.0f;
        for (long long r = 0; r < groups; ++r)
            sum += load_value(from, ((b * heads + g * groups + r) * positions + s) * head_dim + d, storage);
        store_value(to, e, storage, sum);
    }
}
