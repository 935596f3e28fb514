// embedding.cu: tokens. Looking token ids (int64) up in a table of vocab x dim values, and the
// table's gradient, as nn.Embedding trains (y and the table share `storage`; dy `storage`, dw
// `grad_storage`); a ViT's patch tokens after its class token, and the first token of each
// sample, and their backward.

// y[i, j] = weight[ids[i], j] over tokens x dim values.
// Launch: block (256, 1, 1); grid (min(ceil(tokens x dim / 256), 2^20), 1, 1), grid-stride.
extern "C" __global__ void embedding_forward(const long long* ids, const void* weight, void* y, long long tokens,
                                             long long dim, int storage) {
    const long long n = tokens * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k / dim;
        store_value(y, k, storage, load_value(weight, ids[i] * dim + k % dim, storage));
    }
}

// dw = 0, then dy[i, :] added into row ids[i] for every token i in order, none into row `padding`
// (-1: no padding row); each sum rounded to dw's storage.
// Launch: block (256, 1, 1); grid (min(ceil(dim / 256), 2^20), 1, 1): a thread per column, so a
// column's sums are its thread's alone, in token order, the same on every run.
extern "C" __global__ void embedding_backward(const void* dy, const long long* ids, void* dw, long long tokens,
                                              long long dim, long long vocab, long long padding, int storage,
                                              int grad_storage) {
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < dim; j += (long long)gridDim.x * blockDim.x) {
        for (long long v = 0; v < vocab; ++v) store_value(dw, v * dim + j, grad_storage, 0.0f);
        for (long long i = 0; i < tokens; ++i) {
            const long long id = ids[i];
            if (id == padding) continue;
            const long long k = id * dim + j;
            store_value(dw, k, grad_storage, load_value(dw, k, grad_storage) + load_value(dy, i * dim + j, storage));
        }
    }
}

// A ViT's patch tokens: out[n, 0, :] = class_token; out[n, 1 + t, c] = planes[n, c, t] (a
// convolution's [channels, positions] output read as [positions, channels]). planes, class and
// out each have their own storage. Launch: block (256, 1, 1); grid (min(ceil(rows x (tokens + 1)
// x dim / 256), 2^20), 1, 1), grid-stride.
extern "C" __global__ void patch_tokens_forward(const void* planes, const void* class_token, void* out, long long rows,
                                                long long tokens, long long dim, int planes_storage,
                                                int class_storage, int out_storage) {
    const long long row = (tokens + 1) * dim;
    const long long n = rows * row;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        const long long sample = k / row, t = (k % row) / dim, c = k % dim;
        const float v = t == 0 ? load_value(class_token, c, class_storage)
                               : load_value(planes, (sample * dim + c) * tokens + t - 1, planes_storage);
        store_value(out, k, out_storage, v);
    }
}

// patch_tokens_forward's backward: dplanes[n, c, t] = dout[n, 1 + t, c]; dclass[c] = the sum of
// dout[n, 0, c] over the samples in order. Launch: block (256, 1, 1); grid (min(ceil(rows x
// tokens x dim / 256), 2^20), 1, 1), grid-stride; the first dim threads of the grid also sum
// one class column each.
extern "C" __global__ void patch_tokens_backward(const void* dout, void* dplanes, void* dclass, long long rows,
                                                 long long tokens, long long dim, int dout_storage,
                                                 int planes_storage, int class_storage) {
    const long long row = (tokens + 1) * dim;
    const long long n = rows * tokens * dim;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (long long k = first; k < n; k += (long long)gridDim.x * blockDim.x) {
        const long long sample = k / (tokens * dim), c = (k / tokens) % dim, t = k % tokens;
        store_value(dplanes, k, planes_storage, load_value(dout, sample * row + (t + 1) * dim + c, dout_storage));
    }
    for (long long c = first; c < dim; c += (long long)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (long long s = 0; s < rows; ++s) sum += load_value(dout, s * row + c, dout_storage);
        store_value(dclass, c, class_storage, sum);
    }
}

// The first token of each sample: y[n, :] = x[n, 0, :] over samples of positions x dim values.
// Launch: block (256, 1, 1); grid (min(ceil(rows x dim / 256), 2^20), 1, 1), grid-stride.
extern "C" __global__ void first_token_forward(const void* x, void* y, long long rows, long long positions,
                                               long long dim, int storage) {
    const long long n = rows * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        store_value(y, k, storage, load_value(x, (k / dim) * positions * dim + k % dim, storage));
    }
}

// The mean over each sample's positions: y[n, :] = sum over t of x[n, t, :] / positions, summed in
// f32 in position order. Launch: block (256, 1, 1); grid (min(ceil(rows x dim / 256), 2^20), 1, 1),
// grid-stride, a thread per output value.
extern "C" __global__ void mean_tokens_forward(const void* x, void* y, long long rows, long long positions,
                                               long long dim, int storage) {
    const long long n = rows * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        const long long first = (k / dim) * positions * dim + k % dim;
        float sum = 0.0f;
        for (long long t = 0; t < positions; ++t) sum += load_value(x, first + t * dim, storage);
        store_value(y, k, storage, sum / (float)positions);
    }
}

// mean_tokens_forward's backward: dx[n, t, :] = dy[n, :] / positions at every position.
// Launch: block (256, 1, 1); grid (min(ceil(rows x positions x dim / 256), 2^20), 1, 1), grid-stride.
extern "C" __global__ void mean_tokens_backward(const void* dy, void* dx, long long rows, long long positions,
                                                long long dim, int storage) {
    const long long row = positions * dim;
    const long long n = rows * row;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        store_value(dx, k, storage, load_value(dy, (k / row) * dim + k % dim, storage) / (float)positions);
    }
}

// first_token_forward's backward: dx[n, 0, :] = dy[n, :], every other position 0.
// Launch: block (256, 1, 1); grid (min(ceil(rows x positions x dim / 256), 2^20), 1, 1), grid-stride.
extern "C" __global__ void first_token_backward(const void* dy, void* dx, long long rows, long long positions,
                                                long long dim, int storage) {
    const long long row = positions * dim;
    const long long n = rows * row;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        const long long within = k % row;
        store_value(dx, k, storage, within < dim ? load_value(dy, (k / row) * dim + within, storage) : 0.0f);
    }
}
