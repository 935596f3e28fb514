// pool.cu: 2-D max and average pooling of NCHW batches, forward and backward.
//
// Geometry (window.cuh): x is rows x channels x height x width; y is rows x channels x out_height x out_width,
// windows of kernel x kernel with `stride` between them and `padding` on every side (at most half
// the kernel, so every window holds a value). Max pooling pads with -infinity, keeps a NaN as the
// maximum and the first of equal maxima, and writes each maximum's place in its plane
// (row * width + column) as a 64-bit index, as PyTorch's max_pool2d_with_indices does; average
// pooling divides by kernel x kernel, padding included (PyTorch's count_include_pad).
//
// Launch: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1); grid-stride over the outputs
// (forward) or the inputs (backward: each input gathers the gradient of every window holding it,
// in window order, so no atomics and the same sums on every run).

// y[n, c, i, j] = max over the window; indices[n, c, i, j] = where it is
extern "C" __global__ void max_pool2d_forward(const void* x, void* y, long long* indices, long long rows,
                                              long long channels, long long height, long long width, long long kernel,
                                              long long stride, long long padding, long long out_height,
                                              long long out_width, int storage) {
    const long long n = rows * channels * out_height * out_width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long j = e % out_width;
        const long long i = (e / out_width) % out_height;
        const long long plane = e / (out_width * out_height) * height * width;
        float best = 0.0f;  // replaced by the window's first value
        long long at = -1;
        window_taps(i, j, height, width, kernel, stride, padding, [&](long long, long long, long long r, long long s) {
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
                                               long long out_height, long long out_width, int storage) {
    const long long n = rows * channels * height * width;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long s = e % width;
        const long long r = (e / width) % height;
        const long long plane = e / (width * height) * out_height * out_width;
        float sum = 0.0f;
        windows_holding(r, s, out_height, out_width, kernel, stride, padding,
                        [&](long long, long long, long long i, long long j) {
                            const long long out = plane + i * out_width + j;
                            if (indices[out] == r * width + s) sum += load_value(dy, out, storage);
                        });
        store_value(dx, e, storage, sum);
    }
}

// y[n, c, i, j] = sum over the window / (kernel * kernel)
extern "C" __global__ void avg_pool2d_forward(const void* x, void* y, long long rows, long long channels,
                                              long long height, long long width, long long kernel, long long stride,
                                              long long padding, long long out_height, long long out_width,
                                              int storage) {
    const long long n = rows * channels * out_height * out_width;
    const float area = (float)(kernel * kernel);
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long j = e % out_width;
        const long long i = (e / out_width) % out_height;
        const long long plane = e / (out_width * out_height) * height * width;
        float sum = 0.0f;
        window_taps(i, j, height, width, kernel, stride, padding,
                    [&](long long, long long, long long r, long long s) { sum += load_value(x, plane + r * width + s, storage); });
        store_value(y, e, storage, sum / area);
    }
}

// dx[n, c, r, s] = sum of dy over the windows holding (r, s), / (kernel * kernel)
extern "C" __global__ void avg_pool2d_backward(const void* dy, void* dx, long long rows, long long channels,
                                               long long height, long long width, long long kernel, long long stride,
                                               long long padding, long long out_height, long long out_width,
                                               int storage) {
    const long long n = rows * channels * height * width;
    const float area = (float)(kernel * kernel);
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long s = e % width;
        const long long r = (e / width) % height;
        const long long plane = e / (width * height) * out_height * out_width;
        float sum = 0.0f;
        windows_holding(r, s, out_height, out_width, kernel, stride, padding,
                        [&](long long, long long, long long i, long long j) {
                            sum += load_value(dy, plane + i * out_width + j, storage);
                        });
        store_value(dx, e, storage, sum / area);
    }
}
