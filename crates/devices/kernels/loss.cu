// loss.cu: fused softmax cross-entropy forward and backward, one warp per row.
//
// Launch: block (256, 1, 1) = 8 warps; grid (min(ceil(rows/8), 2^20), 1, 1); warps loop over
// rows past the grid. Lanes stride over the classes; the row's max and sum of exponentials meet
// through warp shuffles. Numerically stable: exponents are taken of (logit - row max).
// Writes row_loss[r] = log(sum exp(z - max)) - (z[label] - max) (f32) and replaces the logits
// (stored as `storage` says) by the gradient of the mean loss, (softmax - onehot) * inv_rows.

extern "C" __global__ void softmax_cross_entropy(void* logits, const unsigned int* labels, float* row_loss,
                                                 long long rows, long long classes, float inv_rows, int storage) {
    const int lane = threadIdx.x % 32;
    const long long warps_per_block = blockDim.x / 32;
    const long long first = blockIdx.x * warps_per_block + threadIdx.x / 32;
    for (long long r = first; r < rows; r += (long long)gridDim.x * warps_per_block) {
        const long long row = r * classes;
        float max = __int_as_float(0xff800000);  // -infinity, without math.h
        for (long long c = lane; c < classes; c += 32) max = fmaxf(max, load_value(logits, row + c, storage));
        for (int offset = 16; offset > 0; offset /= 2) max = fmaxf(max, __shfl_xor_sync(0xffffffff, max, offset));
        float sum = 0.0f;
        for (long long c = lane; c < classes; c += 32) sum += expf(load_value(logits, row + c, storage) - max);
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
        const long long label = labels[r];
        // Every lane reads the label's logit before any lane overwrites it.
        const float label_logit = load_value(logits, row + label, storage);
        __syncwarp();
        if (lane == 0) row_loss[r] = logf(sum) - (label_logit - max);
        for (long long c = lane; c < classes; c += 32) {
            const float p = expf(load_value(logits, row + c, storage) - max) / sum;
            store_value(logits, row + c, storage, (p - (c == label ? 1.0f : 0.0f)) * inv_rows);
        }
    }
}
