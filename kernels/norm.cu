// norm.cu: batch norm in training mode over NCHW batches (rows x channels x spatial values),
// forward and backward, as nn.BatchNorm2d trains: statistics over every sample and position of a
// channel, the biased variance to normalize, the unbiased one into the running variance.
//
// Launch: block (256, 1, 1); grid (min(channels, 65535), 1, 1): a block per channel (looping past
// the grid), its threads striding over the channel's rows x spatial values with 64-bit indices;
// the sums go through block.cuh's block_sum, so every run adds in the same order. x, y, post, dy
// and dx share `storage`; scale, bias and the running statistics `param_storage`; dscale and
// dbias `grad_storage`; the saved mean and invstd are f32 (PyTorch saves them so).

// Where value p (0 <= p < rows x spatial) of channel c is.
__device__ __forceinline__ long long channel_value(long long p, long long c, long long channels, long long spatial) {
    return ((p / spatial) * channels + c) * spatial + p % spatial;
}

// save_mean[c], save_invstd[c] = the batch's mean and 1 / sqrt(biased variance + eps);
// y = (x - mean) * invstd * scale[c] + bias[c] (+ residual when has_residual: a residual block's
// shortcut); running_* += momentum * (batch's - running_*);
// post = activation(y) from the stored y when has_post; steps[0] += 1
extern "C" __global__ void batch_norm_forward(const void* x, const void* scale, const void* bias, const void* residual,
                                              int has_residual, void* y, void* post,
                                              float* save_mean, float* save_invstd, void* running_mean,
                                              void* running_var, long long* steps, long long rows,
                                              long long channels, long long spatial, float eps, float momentum,
                                              int has_post, int activation, int storage, int param_storage) {
    const long long m = rows * spatial;
    for (long long c = blockIdx.x; c < channels; c += gridDim.x) {
        float sum = 0.0f;
        for (long long p = threadIdx.x; p < m; p += blockDim.x) {
            sum += load_value(x, channel_value(p, c, channels, spatial), storage);
        }
        const float mean = block_sum(sum) / (float)m;
        float squares = 0.0f;
        for (long long p = threadIdx.x; p < m; p += blockDim.x) {
            const float d = load_value(x, channel_value(p, c, channels, spatial), storage) - mean;
            squares += d * d;
        }
        const float variance = block_sum(squares) / (float)m;
        const float invstd = 1.0f / sqrtf(variance + eps);
        if (threadIdx.x == 0) {
            save_mean[c] = mean;
            save_invstd[c] = invstd;
            const float unbiased = variance * ((float)m / (float)(m > 1 ? m - 1 : 1));
            store_value(running_mean, c, param_storage,
                        (1.0f - momentum) * load_value(running_mean, c, param_storage) + momentum * mean);
            store_value(running_var, c, param_storage,
                        (1.0f - momentum) * load_value(running_var, c, param_storage) + momentum * unbiased);
        }
        const float g = load_value(scale, c, param_storage);
        const float b = load_value(bias, c, param_storage);
        for (long long p = threadIdx.x; p < m; p += blockDim.x) {
            const long long i = channel_value(p, c, channels, spatial);
            float v = (load_value(x, i, storage) - mean) * invstd * g + b;
            if (has_residual) v += load_value(residual, i, storage);
            store_value(y, i, storage, v);
            if (has_post) store_value(post, i, storage, activate(activation, load_value(y, i, storage)));
        }
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) steps[0] += 1;
}

// With xhat = (x - mean) * invstd: dbias[c] = sum dy, dscale[c] = sum dy * xhat,
// dx = scale[c] * invstd * (dy - dbias / m - xhat * dscale / m), m = rows x spatial
extern "C" __global__ void batch_norm_backward(const void* dy, const void* x, const void* scale,
                                               const float* save_mean, const float* save_invstd, void* dx,
                                               void* dscale, void* dbias, long long rows, long long channels,
                                               long long spatial, int storage, int param_storage,
                                               int grad_storage) {
    const long long m = rows * spatial;
    for (long long c = blockIdx.x; c < channels; c += gridDim.x) {
        const float mean = save_mean[c];
        const float invstd = save_invstd[c];
        float sum_dy = 0.0f;
        float sum_dy_xhat = 0.0f;
        for (long long p = threadIdx.x; p < m; p += blockDim.x) {
            const long long i = channel_value(p, c, channels, spatial);
            const float g = load_value(dy, i, storage);
            sum_dy += g;
            sum_dy_xhat += g * ((load_value(x, i, storage) - mean) * invstd);
        }
        sum_dy = block_sum(sum_dy);
        sum_dy_xhat = block_sum(sum_dy_xhat);
        if (threadIdx.x == 0) {
            store_value(dbias, c, grad_storage, sum_dy);
            store_value(dscale, c, grad_storage, sum_dy_xhat);
        }
        const float k = load_value(scale, c, param_storage) * invstd;
        for (long long p = threadIdx.x; p < m; p += blockDim.x) {
            const long long i = channel_value(p, c, channels, spatial);
            const float xhat = (load_value(x, i, storage) - mean) * invstd;
            store_value(dx, i, storage, k * (load_value(dy, i, storage) - sum_dy / (float)m - xhat * sum_dy_xhat / (float)m));
        }
    }
}
