// reduce.cu: column sums (bias gradients), the mean of a vector, and the overflow check of loss
// scaling.
//
// column_sum: block (32, 8, 1); grid (row_chunks, min(ceil(cols/32), 65535), 1). threadIdx.x
//   walks 32 adjacent columns (coalesced), threadIdx.y strides rows within the block's chunk of
//   rows_per_chunk rows; partial sums meet in shared memory. With accumulate != 0 they are added
//   to out with atomicAdd (out f32 and zeroed first); otherwise (one row chunk: grid.x = 1) out
//   is written, rounded to out_storage. Blocks loop over column tiles past the grid.
// channel_sum: block (256, 1, 1); grid (min(channels, 65535), 1, 1): a block per channel
//   (looping past the grid) sums rows x spatial values of an NCHW batch, its threads striding
//   over them, partial sums added by block.cuh's block_sum; written rounded to out_storage.
//   A convolution's bias gradient.
// mean: block (256, 1, 1); grid (min(ceil(n/256), 4096), 1, 1); grid-stride partial sums,
//   block.cuh's block_sum, then atomicAdd(out, sum / n): out must be zeroed first.
// nonfinite: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); any infinity or NaN in the
//   values sets *flag to 1 (every writer writes the same value, so no atomics).

extern "C" __global__ void column_sum(const void* in, void* out, long long rows, long long cols,
                                      long long rows_per_chunk, int accumulate, int in_storage, int out_storage) {
    __shared__ float partial[8][33];
    const long long row_begin = blockIdx.x * rows_per_chunk;
    const long long row_end = min(rows, row_begin + rows_per_chunk);
    const long long col_tiles = (cols + 31) / 32;
    for (long long tile = blockIdx.y; tile < col_tiles; tile += gridDim.y) {
        const long long col = tile * 32 + threadIdx.x;
        float sum = 0.0f;
        if (col < cols) {
            for (long long r = row_begin + threadIdx.y; r < row_end; r += blockDim.y) {
                sum += load_value(in, r * cols + col, in_storage);
            }
        }
        partial[threadIdx.y][threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.y == 0 && col < cols) {
            float total = 0.0f;
            for (int y = 0; y < 8; ++y) total += partial[y][threadIdx.x];
            if (accumulate) atomicAdd(&((float*)out)[col], total);
            else store_value(out, col, out_storage, total);
        }
        __syncthreads();
    }
}

extern "C" __global__ void channel_sum(const void* in, void* out, long long rows, long long channels,
                                       long long spatial, int in_storage, int out_storage) {
    const long long per_channel = rows * spatial;
    for (long long c = blockIdx.x; c < channels; c += gridDim.x) {
        float sum = 0.0f;
        for (long long p = threadIdx.x; p < per_channel; p += blockDim.x) {
            sum += load_value(in, ((p / spatial) * channels + c) * spatial + p % spatial, in_storage);
        }
        const float total = block_sum(sum);
        if (threadIdx.x == 0) store_value(out, c, out_storage, total);
    }
}

extern "C" __global__ void mean(const float* in, float* out, long long n) {
    float sum = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        sum += in[i];
    }
    const float total = block_sum(sum);
    if (threadIdx.x == 0) atomicAdd(out, total / (float)n);
}

extern "C" __global__ void nonfinite(const void* in, long long n, int storage, float* flag) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = load_value(in, i, storage);
        if (v - v != 0.0f) *flag = 1.0f;  // inf - inf and NaN - NaN are NaN; finite - itself is 0
    }
}
