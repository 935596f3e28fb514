// conv.cu: 2-D convolution of NCHW batches with groups and dilation, forward and both gradients,
// computed directly (no im2col workspace: a step's memory is PyTorch's, whose cuDNN picks
// workspace-free algorithms when memory is short). The bias is added by elementwise.cu's
// bias_add and summed by reduce.cu's channel_sum.
//
// Geometry (window.cuh): x is rows x in_channels x height x width; w is out_channels x
// (in_channels / groups) x kernel x kernel; y is rows x out_channels x out_height x out_width,
// with `stride` between windows, taps `dilation` apart and `padding` zeros on every side; output
// channel o reads the input channels of its group, o / (out_channels / groups). Every index is
// 64-bit.
//
// conv2d_forward, conv2d_input_gradient: block (256, 1, 1); grid (min(ceil(n/256), 2^20), 1, 1);
//   grid-stride over the outputs (inputs); each thread sums its window in f32, in the order
//   channel, kernel row, kernel column, and stores the sum rounded.
// conv2d_weight_gradient: block (256, 1, 1); grid (min(weights, 2^20), 1, 1); a block per
//   weight (looping past the grid), its threads striding over rows x out_height x out_width, the
//   partial sums added by block.cuh's block_sum; written rounded to dw's storage.

// y[n, o, i, j] = sum_{c, a, b} x[n, g cpg + c, i stride - padding + a dilation, ...] * w[o, c, a, b]
extern "C" __global__ void conv2d_forward(const void* x, const void* w, void* y, long long rows, long long in_channels,
                                          long long height, long long width, long long out_channels,
                                          long long kernel, long long stride, long long padding, long long dilation,
                                          long long groups, long long out_height, long long out_width, int storage) {
    const long long n = rows * out_channels * out_height * out_width;
    const long long per_group_in = in_channels / groups;
    const long long per_group_out = out_channels / groups;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long j = e % out_width;
        const long long i = (e / out_width) % out_height;
        const long long o = (e / (out_width * out_height)) % out_channels;
        const long long sample = e / (out_width * out_height * out_channels);
        const long long first = o / per_group_out * per_group_in;
        float sum = 0.0f;
        for (long long c = 0; c < per_group_in; ++c) {
            const long long plane = (sample * in_channels + first + c) * height;
            const long long filter = (o * per_group_in + c) * kernel;
            window_taps(i, j, height, width, kernel, stride, padding, dilation,
                        [&](long long a, long long b, long long r, long long s) {
                            sum += load_value(x, (plane + r) * width + s, storage) *
                                   load_value(w, (filter + a) * kernel + b, storage);
                        });
        }
        store_value(y, e, storage, sum);
    }
}

// dx[n, ch, r, s] = sum over the group's outputs whose window holds (r, s): dy[n, o, i, j] * w[o, c, a, b]
extern "C" __global__ void conv2d_input_gradient(const void* dy, const void* w, void* dx, long long rows,
                                                 long long in_channels, long long height, long long width,
                                                 long long out_channels, long long kernel, long long stride,
                                                 long long padding, long long dilation, long long groups,
                                                 long long out_height, long long out_width, int storage) {
    const long long n = rows * in_channels * height * width;
    const long long per_group_in = in_channels / groups;
    const long long per_group_out = out_channels / groups;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long s = e % width;
        const long long r = (e / width) % height;
        const long long channel = (e / (width * height)) % in_channels;
        const long long sample = e / (width * height * in_channels);
        const long long group = channel / per_group_in;
        const long long c = channel % per_group_in;
        float sum = 0.0f;
        for (long long o = group * per_group_out; o < (group + 1) * per_group_out; ++o) {
            const long long plane = (sample * out_channels + o) * out_height;
            const long long filter = (o * per_group_in + c) * kernel;
            windows_holding(r, s, out_height, out_width, kernel, stride, padding, dilation,
                            [&](long long a, long long b, long long i, long long j) {
                                sum += load_value(dy, (plane + i) * out_width + j, storage) *
                                       load_value(w, (filter + a) * kernel + b, storage);
                            });
        }
        store_value(dx, e, storage, sum);
    }
}

// dw[o, c, a, b] = sum_{n, i, j} dy[n, o, i, j] * x[n, g cpg + c, i stride - padding + a dilation, ...]
extern "C" __global__ void conv2d_weight_gradient(const void* dy, const void* x, void* dw, long long rows,
                                                  long long in_channels, long long height, long long width,
                                                  long long out_channels, long long kernel, long long stride,
                                                  long long padding, long long dilation, long long groups,
                                                  long long out_height, long long out_width, int storage,
                                                  int dw_storage) {
    const long long per_group_in = in_channels / groups;
    const long long per_group_out = out_channels / groups;
    const long long weights = out_channels * per_group_in * kernel * kernel;
    const long long positions = rows * out_height * out_width;
    for (long long e = blockIdx.x; e < weights; e += gridDim.x) {
        const long long b = e % kernel;
        const long long a = (e / kernel) % kernel;
        const long long c = (e / (kernel * kernel)) % per_group_in;
        const long long o = e / (kernel * kernel * per_group_in);
        const long long channel = o / per_group_out * per_group_in + c;
        float sum = 0.0f;
        for (long long p = threadIdx.x; p < positions; p += blockDim.x) {
            const long long j = p % out_width;
            const long long i = (p / out_width) % out_height;
            const long long sample = p / (out_width * out_height);
            const long long r = i * stride - padding + a * dilation;
            const long long s = j * stride - padding + b * dilation;
            if (r < 0 || r >= height || s < 0 || s >= width) continue;
            sum += load_value(dy, ((sample * out_channels + o) * out_height + i) * out_width + j, storage) *
                   load_value(x, ((sample * in_channels + channel) * height + r) * width + s, storage);
        }
        const float total = block_sum(sum);
        if (threadIdx.x == 0) store_value(dw, e, dw_storage, total);
    }
}
