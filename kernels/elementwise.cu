// elementwise.cu: bias + activation forward, an activation alone, a sum of two gradients,
// activation backward (in place, or from what PyTorch's activations save), and conversions
// between storages (autocast's casts, the loss scale).
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride loops over
// 64-bit element indices, so any n works. activation: activation.cuh's codes.
// Every buffer of one launch shares `storage` (storage.cuh), except convert's two.

// pre[i, j, k] += bias[j], over rows x cols x spatial (a linear layer's spatial is 1, a
// convolution's its output height x width)
extern "C" __global__ void bias_add(void* pre, const void* bias, long long rows, long long cols, long long spatial,
                                    int storage) {
    const long long n = rows * cols * spatial;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(pre, i, storage, load_value(pre, i, storage) + load_value(bias, i / spatial % cols, storage));
    }
}

// pre[i, j, k] += bias[j]; post[i, j, k] = activation(pre[i, j, k]), from the stored (rounded) pre
extern "C" __global__ void bias_activation(void* pre, const void* bias, void* post, long long rows, long long cols,
                                           long long spatial, int activation, int storage) {
    const long long n = rows * cols * spatial;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(pre, i, storage, load_value(pre, i, storage) + load_value(bias, i / spatial % cols, storage));
        store_value(post, i, storage, activate(activation, load_value(pre, i, storage)));
    }
}

// y[i] = activation(x[i])
extern "C" __global__ void activation_forward(const void* x, void* y, long long n, int activation, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(y, i, storage, activate(activation, load_value(x, i, storage)));
    }
}

// into[i] += from[i]: two gradients of one buffer summed
extern "C" __global__ void accumulate(const void* from, void* into, long long n, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(into, i, storage, load_value(into, i, storage) + load_value(from, i, storage));
    }
}

// pre[i] = grad_post[i] * activation'(pre[i])
extern "C" __global__ void activation_backward(const void* grad_post, void* pre, long long n, int activation,
                                               int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float z = load_value(pre, i, storage);
        store_value(pre, i, storage, load_value(grad_post, i, storage) * activation_derivative(activation, z));
    }
}

// out[i] = grad[i] * activation'(...), from what the activation saved: its output for relu and
// tanh (relu' = [out > 0], tanh' = 1 - out^2), its input for gelu
extern "C" __global__ void activation_gradient(const void* grad, const void* saved, void* out, long long n,
                                               int activation, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float s = load_value(saved, i, storage);
        float derivative;
        if (activation == 0) derivative = s > 0.0f ? 1.0f : 0.0f;
        else if (activation == 2) derivative = 1.0f - s * s;
        else derivative = activation_derivative(activation, s);
        store_value(out, i, storage, load_value(grad, i, storage) * derivative);
    }
}

// to[i] = from[i] * scale, rounded to to's storage
extern "C" __global__ void convert(const void* from, void* to, long long n, float scale, int from_storage,
                                   int to_storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store_value(to, i, to_storage, load_value(from, i, from_storage) * scale);
    }
}
