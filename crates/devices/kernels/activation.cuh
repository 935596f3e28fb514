// activation.cuh: the non-linearities and their derivatives, prepended to every kernel file
// (elementwise.cu uses them). activation: 0 relu, 1 gelu (tanh form), 2 tanh, 3 gelu (erf, exact),
// 4 sigmoid, 5 silu, 6 leaky relu (param: the negative slope), 7 relu6.

#ifndef HEADROOM_ACTIVATION_CUH
#define HEADROOM_ACTIVATION_CUH

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_CUBIC 0.044715f
#define FRAC_1_SQRT_2 0.70710678f
#define FRAC_1_SQRT_2PI 0.3989423f

__device__ __forceinline__ float sigmoid_of(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float activate(int activation, float param, float x) {
    switch (activation) {
        case 0: return fmaxf(x, 0.0f);
        case 1: return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)));
        case 2: return tanhf(x);
        case 3: return 0.5f * x * (1.0f + erff(x * FRAC_1_SQRT_2));
        case 4: return sigmoid_of(x);
        case 5: return x * sigmoid_of(x);
        case 6: return x > 0.0f ? x : param * x;
        default: return fminf(fmaxf(x, 0.0f), 6.0f);
    }
}

// The derivative from what the activation saved: its input s, or its output s when
// saved_is_output (relu, tanh, sigmoid, and leaky relu and relu6 run in place).
__device__ __forceinline__ float activation_derivative(int activation, float param, float s, int saved_is_output) {
    switch (activation) {
        case 0: return s > 0.0f ? 1.0f : 0.0f;
        case 1: {
            const float t = tanhf(SQRT_2_OVER_PI * (s + GELU_CUBIC * s * s * s));
            return 0.5f * (1.0f + t) + 0.5f * s * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * s * s);
        }
        case 2: {
            const float t = saved_is_output ? s : tanhf(s);
            return 1.0f - t * t;
        }
        case 3: return 0.5f * (1.0f + erff(s * FRAC_1_SQRT_2)) + s * FRAC_1_SQRT_2PI * expf(-0.5f * s * s);
        case 4: {
            const float g = saved_is_output ? s : sigmoid_of(s);
            return g * (1.0f - g);
        }
        case 5: {
            const float g = sigmoid_of(s);
            return g * (1.0f + s * (1.0f - g));
        }
        case 6: return s > 0.0f ? 1.0f : param;
        default: return s > 0.0f && s < 6.0f ? 1.0f : 0.0f;
    }
}

#endif
