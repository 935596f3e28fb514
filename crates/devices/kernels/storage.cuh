// storage.cuh: how kernels read and write values of any storage, prepended to every kernel file.
//
// Storage codes (src/plan.rs Storage::code): 0 f32, 1 bfloat16, 2 IEEE half. 16-bit values are
// their bit patterns in unsigned short, converted here without CUDA's fp16/bf16 headers (NVRTC
// from PyPI does not find them): widening is exact, narrowing rounds to nearest, ties to even,
// overflows to infinity and keeps NaN a (quiet) NaN, bit for bit as the host's `half` crate.
// A value is loaded as f32, computed on in f32 and stored rounded.

#ifndef HEADROOM_STORAGE_CUH
#define HEADROOM_STORAGE_CUH

#define STORAGE_F32 0
#define STORAGE_BF16 1
#define STORAGE_F16 2

__device__ __forceinline__ float bf16_to_float(unsigned short h) { return __uint_as_float((unsigned int)h << 16); }

__device__ __forceinline__ unsigned short float_to_bf16(float f) {
    const unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x0040u);  // quiet NaN
    const unsigned int lsb = (x >> 16) & 1u;
    return (unsigned short)((x + 0x7fffu + lsb) >> 16);
}

__device__ __forceinline__ float f16_to_float(unsigned short h) {
    const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    const unsigned int exponent = ((unsigned int)h >> 10) & 0x1fu;
    const unsigned int mantissa = (unsigned int)h & 0x3ffu;
    if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        // Zero or subnormal: mantissa x 2^-24, exact in f32.
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ unsigned short float_to_f16(float f) {
    const unsigned int x = __float_as_uint(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int exponent = (x >> 23) & 0xffu;
    const unsigned int mantissa = x & 0x7fffffu;
    if (exponent == 0xffu) return (unsigned short)(sign | 0x7c00u | (mantissa ? 0x0200u | (mantissa >> 13) : 0u));
    const int unbiased = (int)exponent - 127;
    if (unbiased > 15) return (unsigned short)(sign | 0x7c00u);
    if (unbiased < -14) {
        // Subnormal in f16: (1.mantissa) x 2^unbiased = m x 2^-24, m rounded to nearest even.
        if (unbiased < -25) return (unsigned short)sign;
        const unsigned int significand = mantissa | 0x800000u;
        const int shift = -unbiased - 1;  // 14 to 24
        unsigned int m = significand >> shift;
        const unsigned int rest = significand & ((1u << shift) - 1u);
        const unsigned int half = 1u << (shift - 1);
        if (rest > half || (rest == half && (m & 1u))) ++m;
        return (unsigned short)(sign | m);  // m = 0x400 is the smallest normal, as it should be
    }
    unsigned int e = (unsigned int)(unbiased + 15);
    unsigned int m = mantissa >> 13;
    const unsigned int rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (m & 1u))) ++m;
    if (m == 0x400u) {
        m = 0;
        ++e;
    }
    if (e >= 31u) return (unsigned short)(sign | 0x7c00u);
    return (unsigned short)(sign | (e << 10) | m);
}

// values[i] as f32.
__device__ __forceinline__ float load_value(const void* values, long long i, int storage) {
    if (storage == STORAGE_F32) return ((const float*)values)[i];
    const unsigned short bits = ((const unsigned short*)values)[i];
    return storage == STORAGE_BF16 ? bf16_to_float(bits) : f16_to_float(bits);
}

// values[i] = v, rounded to the storage.
__device__ __forceinline__ void store_value(void* values, long long i, int storage, float v) {
    if (storage == STORAGE_F32) {
        ((float*)values)[i] = v;
    } else {
        ((unsigned short*)values)[i] = storage == STORAGE_BF16 ? float_to_bf16(v) : float_to_f16(v);
    }
}

#endif
