// pool.cu: 2-D max, average and adaptive average pooling of NCHW batches, forward and backward.
//
// Geometry (window.cuh): x is rows x channels x height x width; y is rows x channels x out_height x out_width,
// windows of kernel x kernel taps (max pooling: `dilation` apart) with `stride` between them and
// `padding` on every side (at most half the window, so every window holds a value); the output's
// sides are the caller's (PyTorch's rule, ceil_mode included). Max pooling pads with -infinity,
// keeps a NaN as the maximum and the first of equal maxima, and writes each maximum's place in
// its plane (row * width + column) as a 64-bit index, as PyTorch's max_pool2d_with_indices does;
// average pooling divides by the window within the padded input (count_include_pad) or by its
// places inside the input, as PyTorch's avg_pool2d counts them. Adaptive average pooling's window
// i of n over a side of size s spans floor(i s / n) to ceil((i + 1) s / n).
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride over the outputs
// (forward) or the inputs (backward: each input gathers the gradient of every window holding it,
// in window order, so no atomics and the same sums on every run).

// y[n, c, i, j] = max over the window; indices[n, c, i, j] = where it is
extern "C" __global__ void max_pool2d_forward(const void* x, void* y, long long* indices, long long rows,
                                              long long channels, long long height, long long width, long long kernel,
                                              long long stride, long long padding, long long dilation,
                                              long long out_height, long long out_width, int storage) {
    const long long n = rows * channels * out_height * out_width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long j = e % out_width;
        const long long i = (e / out_width) % out_height;
        const long long plane = e / (out_width * out_height) * height * width;
        float best = 0.0f;  // replaced by the window's first value; 0 (and place -1) for a window wholly in the padding
        long long at = -1;
        window_taps(i, j, height, width, kernel, stride, padding, dilation,
                    [&](long long, long long, long long r, long long s) {
                        const float v = load_value(x, plane + r * width + s, storage);
                        if (at < 0 || v > best || (v != v && best == best)) {
                            best = v;
                            at = r * width + s;
                        }
                    });
        store_value(y, e, storage, best);
        indices[e] = at;
    }
}

// dx[n, c, r, s] = sum of dy over the windows whose maximum was (r, s)
extern "C" __global__ void max_pool2d_backward(const void* dy, const long long* indices, void* dx, long long rows,
                                               long long channels, long long height, long long width,
                                               long long kernel, long long stride, long long padding,
                                               long long dilation, long long out_height, long long out_width,
                                               int storage) {
    const long long n = rows * channels * height * width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long s = e % width;
        const long long r = (e / width) % height;
        const long long plane = e / (width * height) * out_height * out_width;
        float sum = 0.0f;
        windows_holding(r, s, out_height, out_width, kernel, stride, padding, dilation,
                        [&](long long, long long, long long i, long long j) {
                            const long long out = plane + i * out_width + j;
                            if (indices[out] == r * width + s) sum += load_value(dy, out, storage);
                        });
        store_value(dx, e, storage, sum);
    }
}

// The divisor of average window (i, j), as PyTorch's avg_pool2d counts it.
__device__ __forceinline__ float average_divisor(long long i, long long j, long long height, long long width,
                                                 long long kernel, long long stride, long long padding,
                                                 int count_include_pad) {
    long long row_start = i * stride - padding, col_start = j * stride - padding;
    long long row_end = min(row_start + kernel, height + padding), col_end = min(col_start + kernel, width + padding);
    if (count_include_pad) return (float)((row_end - row_start) * (col_end - col_start));
    row_start = max(row_start, 0LL);
    col_start = max(col_start, 0LL);
    row_end = min(row_end, height);
    col_end = min(col_end, width);
    return (float)((row_end - row_start) * (col_end - col_start));
}

// y[n, c, i, j] = sum over the window / its divisor
extern "C" __global__ void avg_pool2d_forward(const void* x, void* y, long long rows, long long channels,
                                              long long height, long long width, long long kernel, long long stride,
                                              long long padding, long long out_height, long long out_width,
                                              int count_include_pad, int storage) {
    const long long n = rows * channels * out_height * out_width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long j = e % out_width;
        const long long i = (e / out_width) % out_height;
        const long long plane = e / (out_width * out_height) * height * width;
        float sum = 0.0f;
        window_taps(i, j, height, width, kernel, stride, padding, 1,
                    [&](long long, long long, long long r, long long s) { sum += load_value(x, plane + r * width + s, storage); });
        store_value(y, e, storage,
                    sum / average_divisor(i, j, height, width, kernel, stride, padding, count_include_pad));
    }
}

// dx[n, c, r, s] = sum of dy / divisor over the windows holding (r, s)
extern "C" __global__ void avg_pool2d_backward(const void* dy, void* dx, long long rows, long long channels,
                                               long long height, long long width, long long kernel, long long stride,
                                               long long padding, long long out_height, long long out_width,
                                               int count_include_pad, int storage) {
    const long long n = rows * channels * height * width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long s = e % width;
        const long long r = (e / width) % height;
        const long long plane = e / (width * height) * out_height * out_width;
        float sum = 0.0f;
        windows_holding(r, s, out_height, out_width, kernel, stride, padding, 1,
                        [&](long long, long long, long long i, long long j) {
                            sum += load_value(dy, plane + i * out_width + j, storage) /
                                   average_divisor(i, j, height, width, kernel, stride, padding, count_include_pad);
                        });
        store_value(dx, e, storage, sum);
    }
}

// y[n, c, i, j] = mean of the adaptive window (i, j)
extern "C" __global__ void adaptive_avg_pool2d_forward(const void* x, void* y, long long rows, long long channels,
                                                       long long height, long long width, long long out_height,
                                                       long long out_width, int storage) {
    const long long n = rows * channels * out_height * out_width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long j = e % out_width;
        const long long i = (e / out_width) % out_height;
        const long long plane = e / (out_width * out_height) * height * width;
        const long long r0 = i * height / out_height, r1 = ((i + 1) * height + out_height - 1) / out_height;
        const long long s0 = j * width / out_width, s1 = ((j + 1) * width + out_width - 1) / out_width;
        float sum = 0.0f;
        for (long long r = r0; r < r1; ++r)
            for (long long s = s0; s < s1; ++s) sum += load_value(x, plane + r * width + s, storage);
        store_value(y, e, storage, sum / (float)((r1 - r0) * (s1 - s0)));
    }
}

// dx[n, c, r, s] = sum of dy / window size over the adaptive windows holding (r, s)
extern "C" __global__ void adaptive_avg_pool2d_backward(const void* dy, void* dx, long long rows, long long channels,
                                                        long long height, long long width, long long out_height,
                                                        long long out_width, int storage) {
    const long long n = rows * channels * height * width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long s = e % width;
        const long long r = (e / width) % height;
        const long long plane = e / (width * height) * out_height * out_width;
        float sum = 0.0f;
        for (long long i = 0; i < out_height; ++i) {
            const long long r0 = i * height / out_height, r1 = ((i + 1) * height + out_height - 1) / out_height;
            if (r < r0 || r >= r1) continue;
            for (long long j = 0; j < out_width; ++j) {
                const long long s0 = j * width / out_width, s1 = ((j + 1) * width + out_width - 1) / out_width;
                if (s < s0 || s >= s1) continue;
                sum += load_value(dy, plane + i * out_width + j, storage) / (float)((r1 - r0) * (s1 - s0));
            }
        }
        store_value(dx, e, storage, sum);
    }
}
