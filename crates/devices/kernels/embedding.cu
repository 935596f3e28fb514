// embedding.cu: looking token ids (int64) up in a table of vocab x dim values, and the table's
// gradient, as nn.Embedding trains. y and the table share `storage`; dy `storage`, dw
// `grad_storage`.

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
