// optimizer.cu: SGD, SGD with momentum, Adam and AdamW updates, element-wise.
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride loops over 64-bit
// indices. Adam's bias corrections c1 = 1/(1-beta1^t), c2 = 1/(1-beta2^t) come from the host;
// weight_decay is 0 for Adam and the decoupled decay for AdamW.

extern "C" __global__ void sgd(float* param, const float* grad, long long n, float lr) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        param[i] -= lr * grad[i];
    }
}

extern "C" __global__ void sgd_momentum(float* param, const float* grad, float* velocity, long long n, float lr,
                                        float momentum) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = momentum * velocity[i] + grad[i];
        velocity[i] = v;
        param[i] -= lr * v;
    }
}

extern "C" __global__ void adam(float* param, const float* grad, float* m, float* v, long long n, float lr,
                                float beta1, float beta2, float epsilon, float c1, float c2, float weight_decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = grad[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float p = param[i];
        param[i] = p - lr * (weight_decay * p + (mi * c1) / (sqrtf(vi * c2) + epsilon));
    }
}
