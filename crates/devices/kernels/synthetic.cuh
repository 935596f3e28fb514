// synthetic.cuh: the counter-based stream of crates/engine/src/synthetic.rs (splitmix64's
// finaliser over a counter), prepended to every kernel file after storage.cuh. Every float step
// is exact, so host and device draw the same bits.

#ifndef HEADROOM_SYNTHETIC_CUH
#define HEADROOM_SYNTHETIC_CUH

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// The i-th value of the stream `key`, uniform in [-1, 1) with 24 bits.
__device__ __forceinline__ float uniform(unsigned long long key, long long i) {
    const unsigned long long bits = mix64(key + (unsigned long long)(i + 1) * 0x9e3779b97f4a7c15ULL) >> 40;
    return (float)bits * (1.0f / 8388608.0f) - 1.0f;
}

#endif
