// elementwise.cu: a bias added, an activation (in place or not) and its gradient from what it
// saved, a sum of two tensors, a gradient added into another, and conversions between storages
// (autocast's casts, the loss scale), and ranges copied between buffers of one storage.
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride loops over
// 64-bit element indices, so any n works. activation, param: activation.cuh's codes.
// Every buffer of one launch shares `storage` (storage.cuh), except convert's two.

// y[i, j, k] += bias[j], over rows x cols x spatial (a linear layer's spatial is 1, a
// convolution's its output height x width)
extern "C" __global__ void bias_add(void* y, const void* bias, long long rows, long long cols, long long spatial,
                                    int storage) {
    const long long n = rows * cols * spatial;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(y, i, storage, load_value(y, i, storage) + load_value(bias, i / spatial % cols, storage));
    }
}

// y[i] = activation(x[i])
extern "C" __global__ void activation_forward(const void* x, void* y, long long n, int activation, float param,
                                              int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(y, i, storage, activate(activation, param, load_value(x, i, storage)));
    }
}

// y[i] = activation(y[i]), in place
extern "C" __global__ void activation_in_place(void* y, long long n, int activation, float param, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(y, i, storage, activate(activation, param, load_value(y, i, storage)));
    }
}

// out[i] = grad[i] * activation'(...), from what the activation saved: its input, or its output
// when saved_is_output
extern "C" __global__ void activation_gradient(const void* grad, const void* saved, void* out, long long n,
                                               int activation, float param, int saved_is_output, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float derivative = activation_derivative(activation, param, load_value(saved, i, storage), saved_is_output);
        store_value(out, i, storage, load_value(grad, i, storage) * derivative);
    }
}

// out[i] = a[i] + b[i]
extern "C" __global__ void add(const void* a, const void* b, void* out, long long n, int a_storage, int b_storage,
                               int out_storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(out, i, out_storage, load_value(a, i, a_storage) + load_value(b, i, b_storage));
    }
}

// out[i] = a[i] * b[i]: a gated MLP's product, and its factors' gradients
extern "C" __global__ void multiply(const void* a, const void* b, void* out, long long n, int a_storage, int b_storage,
                                    int out_storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(out, i, out_storage, load_value(a, i, a_storage) * load_value(b, i, b_storage));
    }
}

// y[i] = x[i] * scale[i % features]: a learnt scale per feature (Hugging Face's RMS norm's
// weight times its normalized rows), and that product's input gradient
extern "C" __global__ void scale_features(const void* x, const void* scale, void* y, long long n, long long features,
                                          int x_storage, int scale_storage, int y_storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(y, i, y_storage, load_value(x, i, x_storage) * load_value(scale, i % features, scale_storage));
    }
}

// into[i] += from[i]: two gradients of one tensor summed, or a residual block's in-place sum
extern "C" __global__ void accumulate(const void* from, void* into, long long n, int from_storage, int into_storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(into, i, into_storage, load_value(into, i, into_storage) + load_value(from, i, from_storage));
    }
}

// to[to_offset + i] = from[from_offset + i]: FSDP's shards copied into and out of its
// all-gather and reduce-scatter buffers
extern "C" __global__ void copy_range(const void* from, long long from_offset, void* to, long long to_offset,
                                      long long n, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(to, to_offset + i, storage, load_value(from, from_offset + i, storage));
    }
}

// to[i] = from[i] * scale, rounded to to's storage
extern "C" __global__ void convert(const void* from, void* to, long long n, float scale, int from_storage,
                                   int to_storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(to, i, to_storage, load_value(from, i, from_storage) * scale);
    }
}
