// fill.cu: deterministic synthetic inputs, labels and parameter initialisation, on the device.
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride loops over 64-bit
// indices. The stream is synthetic.cuh's, the one in crates/engine/src/synthetic.rs, so host and
// device generate the same bits; a 16-bit buffer stores them rounded (storage.cuh), and labels
// are taken from the values as stored.

// out[i] = uniform in [-1, 1) from (key, i), times scale
extern "C" __global__ void fill_uniform(void* out, long long n, unsigned long long key, float scale, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(out, i, storage, uniform(key, i) * scale);
    }
}

// out[i] = token(key, i, vocab): the stream's 64 bits modulo vocab (synthetic.rs's `token`), as
// int64 ids when `wide`, else as u32 labels
extern "C" __global__ void fill_tokens(void* out, int wide, long long n, unsigned long long key, long long vocab) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const unsigned long long token =
            mix64(key + (unsigned long long)(i + 1) * 0x9e3779b97f4a7c15ULL) % (unsigned long long)vocab;
        if (wide) {
            ((long long*)out)[i] = (long long)token;
        } else {
            ((unsigned int*)out)[i] = (unsigned int)token;
        }
    }
}

// labels[r] = argmax of the row's first min(classes, features) inputs (lowest index on ties)
extern "C" __global__ void fill_labels(unsigned int* labels, const void* inputs, long long rows, long long features,
                                       long long classes, int storage) {
    const long long considered = classes < features ? classes : features;
    for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < rows; r += (long long)gridDim.x * blockDim.x) {
        const long long row = r * features;
        long long best = 0;
        float best_value = load_value(inputs, row, storage);
        for (long long c = 1; c < considered; ++c) {
            const float value = load_value(inputs, row + c, storage);
            if (value > best_value) {
                best = c;
                best_value = value;
            }
        }
        labels[r] = (unsigned int)best;
    }
}
