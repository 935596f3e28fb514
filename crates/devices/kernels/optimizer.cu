// optimizer.cu: SGD, SGD with momentum, Adam and AdamW updates, element-wise.
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride loops over 64-bit
// indices. Adam's bias corrections c1 = 1/(1-beta1^t), c2 = 1/(1-beta2^t) come from the host;
// weight_decay is 0 for Adam and the decoupled decay for AdamW. Each gradient is multiplied by
// grad_scale first (1 / loss scale under loss scaling, else 1). Parameters, gradients and
// state share `storage` (storage.cuh); the update is computed in f32 and stored rounded.

extern "C" __global__ void sgd(void* param, const void* grad, long long n, float lr, float grad_scale, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = load_value(grad, i, storage) * grad_scale;
        store_value(param, i, storage, load_value(param, i, storage) - lr * g);
    }
}

extern "C" __global__ void sgd_momentum(void* param, const void* grad, void* velocity, long long n, float lr,
                                        float momentum, float grad_scale, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = load_value(grad, i, storage) * grad_scale;
        const float v = momentum * load_value(velocity, i, storage) + g;
        store_value(velocity, i, storage, v);
        store_value(param, i, storage, load_value(param, i, storage) - lr * v);
    }
}

extern "C" __global__ void adam(void* param, const void* grad, void* m, void* v, long long n, float lr,
                                float beta1, float beta2, float epsilon, float c1, float c2, float weight_decay,
                                float grad_scale, int storage) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = load_value(grad, i, storage) * grad_scale;
        const float mi = beta1 * load_value(m, i, storage) + (1.0f - beta1) * g;
        const float vi = beta2 * load_value(v, i, storage) + (1.0f - beta2) * g * g;
        store_value(m, i, storage, mi);
        store_value(v, i, storage, vi);
        const float p = load_value(param, i, storage);
        store_value(param, i, storage, p - lr * (weight_decay * p + (mi * c1) / (sqrtf(vi * c2) + epsilon)));
    }
}
