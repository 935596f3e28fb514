// dropout.cu: training-mode dropout, forward and backward.
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride loops over 64-bit
// element indices. The mask is one byte a value, as PyTorch's bool mask. Value i is kept when
// the stream's uniform(key, i) >= threshold (synthetic.cuh; threshold = 2p - 1 and
// scale = 1 / (1 - p), both computed on the host in f32 exactly as crates/engine/src/synthetic.rs
// and the host device do), so every device draws the same mask. Values and gradients share
// `storage`.

// mask[i] = kept; y[i] = kept ? x[i] * scale : 0
extern "C" __global__ void dropout_forward(const void* x, unsigned char* mask, void* y, long long n, float threshold,
                                           float scale, unsigned long long key, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const bool kept = uniform(key, i) >= threshold;
        mask[i] = kept ? 1 : 0;
        store_value(y, i, storage, kept ? load_value(x, i, storage) * scale : 0.0f);
    }
}

// dx[i] = mask[i] ? dy[i] * scale : 0
extern "C" __global__ void dropout_backward(const void* dy, const unsigned char* mask, void* dx, long long n,
                                            float scale, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(dx, i, storage, mask[i] ? load_value(dy, i, storage) * scale : 0.0f);
    }
}
