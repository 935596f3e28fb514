// block.cuh: sums and maxima across the threads of a block, prepended to every kernel file
// (reduce.cu and conv.cu use the sum, scores.cu both).

#ifndef HEADROOM_BLOCK_CUH
#define HEADROOM_BLOCK_CUH

// The sum of every thread's `value` over a block of 256 threads (block (256, 1, 1)), added as a
// tree in shared memory, the same order on every run. Every thread of the block calls it and gets
// the sum; it synchronises before returning, so a loop may call it again.
__device__ __forceinline__ float block_sum(float value) {
    __shared__ float partial[256];
    partial[threadIdx.x] = value;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    const float sum = partial[0];
    __syncthreads();
    return sum;
}

// The largest of every thread's `value` over a block of 256 threads, as block_sum combines them.
__device__ __forceinline__ float block_max(float value) {
    __shared__ float partial[256];
    partial[threadIdx.x] = value;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + half]);
        __syncthreads();
    }
    const float max = partial[0];
    __syncthreads();
    return max;
}

#endif
