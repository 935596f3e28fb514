// elementwise.cu: bias + activation forward, activation backward.
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride loops over
// 64-bit element indices, so any n works. activation: 0 relu, 1 gelu (tanh form), 2 tanh.

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_CUBIC 0.044715f

__device__ __forceinline__ float activate(int activation, float x) {
    if (activation == 0) return fmaxf(x, 0.0f);
    if (activation == 2) return tanhf(x);
    return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)));
}

__device__ __forceinline__ float activation_derivative(int activation, float x) {
    if (activation == 0) return x > 0.0f ? 1.0f : 0.0f;
    if (activation == 2) {
        const float t = tanhf(x);
        return 1.0f - t * t;
    }
    const float t = tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
}

// pre[i, j] += bias[j]
extern "C" __global__ void bias_add(float* pre, const float* bias, long long rows, long long cols) {
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        pre[i] += bias[i % cols];
    }
}

// pre[i, j] += bias[j]; post[i, j] = activation(pre[i, j])
extern "C" __global__ void bias_activation(float* pre, const float* bias, float* post, long long rows, long long cols,
                                           int activation) {
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float z = pre[i] + bias[i % cols];
        pre[i] = z;
        post[i] = activate(activation, z);
    }
}

// pre[i] = grad_post[i] * activation'(pre[i])
extern "C" __global__ void activation_backward(const float* grad_post, float* pre, long long n, int activation) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        pre[i] = grad_post[i] * activation_derivative(activation, pre[i]);
    }
}
