// activation.cuh: the non-linearities and their derivatives, prepended to every kernel file
// (elementwise.cu and norm.cu use them). activation: 0 relu, 1 gelu (tanh form), 2 tanh.

#ifndef HEADROOM_ACTIVATION_CUH
#define HEADROOM_ACTIVATION_CUH

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_CUBIC 0.044715f

__device__ __forceinline__ float activate(int activation, float x) {
    if (activation == 0) return fmaxf(x, 0.0f);
    if (activation == 2) return tanhf(x);
    return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)));
}

__device__ __forceinline__ float activation_derivative(int activation, float x) {
    if (activation == 0) return x > 0.0f ? 1.0f : 0.0f;
    if (activation == 2) {
        const float t = tanhf(x);
        return 1.0f - t * t;
    }
    const float t = tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
}

#endif
