// norm.cu: batch norm in training mode over NCHW batches (rows x channels x spatial values),
// forward and backward, as nn.BatchNorm2d and nn.BatchNorm1d train: statistics over every sample and position of a
// channel, the biased variance to normalize, the unbiased one into the running variance; and layer norm
// (nn.LayerNorm over the last dimension), whose statistics are per row of `features` values.
//
// Launch: block (256, 1, 1); grid (min(channels, 65535), 1, 1): a block per channel (looping past
// the grid), its threads striding over the channel's rows x spatial values with 64-bit indices;
// the sums go through block.cuh's block_sum, so every run adds in the same order. x, y, dy and
// dx share `storage`; scale, shift and the running statistics `param_storage`; dscale and dshift
// `grad_storage`; the saved mean and invstd are f32 (PyTorch saves them so). A buffer a flag
// says is absent is not read or written (the launcher passes another live one).

// Where value p (0 <= p < rows x spatial) of channel c is.
__device__ __forceinline__ long long channel_value(long long p, long long c, long long channels, long long spatial) {
    return ((p / spatial) * channels + c) * spatial + p % spatial;
}

// save_mean[c], save_invstd[c] = the batch's mean and 1 / sqrt(biased variance + eps);
// y = (x - mean) * invstd * scale[c] + shift[c] (scale 1, shift 0 without has_affine);
// running_* += momentum * (batch's - running_*); steps[0] += 1
extern "C" __global__ void batch_norm_forward(const void* x, const void* scale, const void* shift, int has_affine,
                                              void* y, float* save_mean, float* save_invstd, void* running_mean,
                                              void* running_var, long long* steps, long long rows, long long channels,
                                              long long spatial, float eps, float momentum, int storage,
                                              int param_storage) {
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
        const float g = has_affine ? load_value(scale, c, param_storage) : 1.0f;
        const float b = has_affine ? load_value(shift, c, param_storage) : 0.0f;
        for (long long p = threadIdx.x; p < m; p += blockDim.x) {
            const long long i = channel_value(p, c, channels, spatial);
            store_value(y, i, storage, (load_value(x, i, storage) - mean) * invstd * g + b);
        }
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) steps[0] += 1;
}

// With xhat = (x - mean) * invstd: dshift[c] = sum dy, dscale[c] = sum dy * xhat (when
// has_affine_grad), dx = scale[c] * invstd * (dy - dshift / m - xhat * dscale / m) (when has_dx;
// scale 1 without has_scale), m = rows x spatial
extern "C" __global__ void batch_norm_backward(const void* dy, const void* x, const void* scale, int has_scale,
                                               const float* save_mean, const float* save_invstd, void* dx, int has_dx,
                                               void* dscale, void* dshift, int has_affine_grad, long long rows,
                                               long long channels, long long spatial, int storage, int param_storage,
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
        if (threadIdx.x == 0 && has_affine_grad) {
            store_value(dshift, c, grad_storage, sum_dy);
            store_value(dscale, c, grad_storage, sum_dy_xhat);
        }
        if (!has_dx) continue;
        const float k = (has_scale ? load_value(scale, c, param_storage) : 1.0f) * invstd;
        for (long long p = threadIdx.x; p < m; p += blockDim.x) {
            const long long i = channel_value(p, c, channels, spatial);
            const float xhat = (load_value(x, i, storage) - mean) * invstd;
            store_value(dx, i, storage, k * (load_value(dy, i, storage) - sum_dy / (float)m - xhat * sum_dy_xhat / (float)m));
        }
    }
}

// Layer norm, and RMS norm (layer norm without centering). Launch: block (256, 1, 1); grid (min(rows, 65535), 1, 1) for the forward and the
// input's gradient (a block per row of `features` values, looping past the grid), grid
// (min(features, 65535), 1, 1) for the parameters' gradients (a block per feature, its threads
// striding over the rows). x, y, dy and dx share `storage`; scale and shift `param_storage`,
// their gradients `grad_storage`; the saved mean and rstd are f32, one per row (CUDA's
// layer_norm keeps them in the accumulation type).

// save_mean[r], save_rstd[r] = row r's mean and 1 / sqrt(biased variance + eps);
// y = (x - mean) * rstd * scale[j] + shift[j] (scale 1 without has_scale, shift 0 without has_shift).
// Without centered (RMS norm) the mean is 0 and save_mean is neither read nor written.
extern "C" __global__ void layer_norm_forward(const void* x, const void* scale, int has_scale, const void* shift,
                                              int has_shift, void* y, float* save_mean, float* save_rstd,
                                              int centered, long long rows, long long features, float eps,
                                              int storage, int param_storage) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long row = r * features;
        float sum = 0.0f;
        if (centered)
            for (long long j = threadIdx.x; j < features; j += blockDim.x) sum += load_value(x, row + j, storage);
        const float mean = centered ? block_sum(sum) / (float)features : 0.0f;
        float squares = 0.0f;
        for (long long j = threadIdx.x; j < features; j += blockDim.x) {
            const float d = load_value(x, row + j, storage) - mean;
            squares += d * d;
        }
        const float rstd = 1.0f / sqrtf(block_sum(squares) / (float)features + eps);
        if (threadIdx.x == 0) {
            if (centered) save_mean[r] = mean;
            save_rstd[r] = rstd;
        }
        for (long long j = threadIdx.x; j < features; j += blockDim.x) {
            const float g = has_scale ? load_value(scale, j, param_storage) : 1.0f;
            const float b = has_shift ? load_value(shift, j, param_storage) : 0.0f;
            store_value(y, row + j, storage, (load_value(x, row + j, storage) - mean) * rstd * g + b);
        }
    }
}

// With xhat = (x - mean) * rstd and h = scale[j] * dy (dy without has_scale), per row:
// dx = rstd * (h - sum(h) / features - xhat * sum(h * xhat) / features);
// without centered (RMS norm) the mean is 0 and the sum(h) term drops out.
extern "C" __global__ void layer_norm_input_gradient(const void* dy, const void* x, const void* scale, int has_scale,
                                                     const float* save_mean, const float* save_rstd, int centered,
                                                     void* dx, long long rows, long long features, int storage,
                                                     int param_storage) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long row = r * features;
        const float mean = centered ? save_mean[r] : 0.0f;
        const float rstd = save_rstd[r];
        float sum_h = 0.0f;
        float sum_h_xhat = 0.0f;
        for (long long j = threadIdx.x; j < features; j += blockDim.x) {
            const float g = has_scale ? load_value(scale, j, param_storage) : 1.0f;
            const float h = g * load_value(dy, row + j, storage);
            sum_h += h;
            sum_h_xhat += h * ((load_value(x, row + j, storage) - mean) * rstd);
        }
        sum_h = centered ? block_sum(sum_h) / (float)features : 0.0f;
        sum_h_xhat = block_sum(sum_h_xhat) / (float)features;
        for (long long j = threadIdx.x; j < features; j += blockDim.x) {
            const float g = has_scale ? load_value(scale, j, param_storage) : 1.0f;
            const float xhat = (load_value(x, row + j, storage) - mean) * rstd;
            store_value(dx, row + j, storage, rstd * (g * load_value(dy, row + j, storage) - sum_h - xhat * sum_h_xhat));
        }
    }
}

// Per feature j, over the rows: dscale[j] = sum dy * xhat, dshift[j] = sum dy (when has_dshift);
// without centered (RMS norm) the mean is 0 and save_mean is not read.
extern "C" __global__ void layer_norm_parameter_gradient(const void* dy, const void* x, const float* save_mean,
                                                         const float* save_rstd, int centered, void* dscale,
                                                         void* dshift, int has_dshift, long long rows,
                                                         long long features, int storage, int grad_storage) {
    for (long long j = blockIdx.x; j < features; j += gridDim.x) {
        float sum_dy = 0.0f;
        float sum_dy_xhat = 0.0f;
        for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
            const long long i = r * features + j;
            const float g = load_value(dy, i, storage);
            const float mean = centered ? save_mean[r] : 0.0f;
            sum_dy += g;
            sum_dy_xhat += g * ((load_value(x, i, storage) - mean) * save_rstd[r]);
        }
        sum_dy = block_sum(sum_dy);
        sum_dy_xhat = block_sum(sum_dy_xhat);
        if (threadIdx.x == 0) {
            store_value(dscale, j, grad_storage, sum_dy_xhat);
            if (has_dshift) store_value(dshift, j, grad_storage, sum_dy);
        }
    }
}
