// window.cuh: the windows of 2-D convolution and pooling over one NCHW plane, prepended to every
// kernel file (conv.cu and pool.cu use it). A window is kernel x kernel taps `dilation` apart,
// one every `stride`, with `padding` on every side of a height x width input and an
// out_height x out_width output.

#ifndef HEADROOM_WINDOW_CUH
#define HEADROOM_WINDOW_CUH

// tap(a, b, r, s) for each tap (a, b) of output (i, j)'s window inside the input, (r, s) being
// the input place it reads; row-major over the window.
template <typename Tap>
__device__ __forceinline__ void window_taps(long long i, long long j, long long height, long long width,
                                            long long kernel, long long stride, long long padding, long long dilation,
                                            Tap tap) {
    for (long long a = 0; a < kernel; ++a) {
        const long long r = i * stride - padding + a * dilation;
        if (r < 0 || r >= height) continue;
        for (long long b = 0; b < kernel; ++b) {
            const long long s = j * stride - padding + b * dilation;
            if (s < 0 || s >= width) continue;
            tap(a, b, r, s);
        }
    }
}

// hit(a, b, i, j) for each output (i, j) whose window holds input place (r, s), at the window's
// tap (a, b); row-major over (a, b).
template <typename Hit>
__device__ __forceinline__ void windows_holding(long long r, long long s, long long out_height, long long out_width,
                                                long long kernel, long long stride, long long padding,
                                                long long dilation, Hit hit) {
    for (long long a = 0; a < kernel; ++a) {
        const long long row = r + padding - a * dilation;  // i * stride
        if (row < 0 || row % stride != 0 || row / stride >= out_height) continue;
        for (long long b = 0; b < kernel; ++b) {
            const long long col = s + padding - b * dilation;  // j * stride
            if (col < 0 || col % stride != 0 || col / stride >= out_width) continue;
            hit(a, b, row / stride, col / stride);
        }
    }
}

#endif
