// A CPU emulation of the CUDA execution model, just enough to run kernels/*.cu unchanged.
//
// Every CUDA thread of a block is a fiber (a user-space stack switched by hand, no system call),
// so __syncthreads, __syncwarp and warp shuffles are cheap barriers between fibers; blocks run
// in parallel on a small pool of OS threads, one block per OS thread at a time, so __shared__
// memory is a thread_local static and atomicAdd is std::atomic_ref. Kernels are compiled with
// the host compiler: they are checked for arithmetic, indexing, bounds and tiling, never for
// speed, coalescing or what only hardware has (docs/gpu-runs.md lists what waits for a GPU).
//
// Used by the CUDA stand-in (tests/standin/), which resolves cuLaunchKernel to these kernels.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __launch_bounds__(...)

namespace emulation {

// Barriers and warp exchange of the block running on this OS thread.
void sync_block();
void sync_warp();
float shuffle_xor(float value, int offset);

// A launch's grid and block; `body` runs once per CUDA thread with threadIdx/blockIdx set.
struct Grid {
    dim3 grid, block;
};
void run_grid(const Grid& shape, void (*body)(const void*), const void* context);

// Checks a pointer argument of a launch: its index and value. False refuses the launch.
using PointerCheck = bool (*)(unsigned index, const void* pointer, void* context);

// A kernel as the stand-in driver sees it: its name and a launcher that unpacks cuLaunchKernel's
// `kernelParams` into the kernel's own parameter types. Returns the index of a refused pointer
// argument, or -1 after running the grid.
struct Kernel {
    const char* name;
    unsigned parameters;
    int (*launch)(const Grid& shape, void** params, PointerCheck check, void* check_context);
};

// The kernel of kernels/*.cu with this name, or nullptr.
const Kernel* find_kernel(const char* name);

// The trampoline of one kernel, generated from its signature: copies each parameter out of
// `params` as the type the kernel declares, checks every pointer, then runs the grid.
template <auto Entry>
struct Trampoline;

template <typename... Args, void (*Entry)(Args...)>
struct Trampoline<Entry> {
    using Values = std::tuple<std::decay_t<Args>...>;

    static void body(const void* context) { std::apply(Entry, *static_cast<const Values*>(context)); }

    template <std::size_t... I>
    static Values unpack(void** params, std::index_sequence<I...>) {
        return Values{*static_cast<std::decay_t<Args>*>(params[I])...};
    }

    template <typename T>
    static bool accepted(unsigned index, const T& value, PointerCheck check, void* context) {
        if constexpr (std::is_pointer_v<T>) {
            return check(index, static_cast<const void*>(value), context);
        } else {
            return true;
        }
    }

    template <std::size_t... I>
    static int refused(const Values& values, PointerCheck check, void* context, std::index_sequence<I...>) {
        int index = -1;
        ((index < 0 && !accepted(I, std::get<I>(values), check, context) ? (void)(index = static_cast<int>(I))
                                                                          : (void)0),
         ...);
        return index;
    }

    static int launch(const Grid& shape, void** params, PointerCheck check, void* check_context) {
        const Values values = unpack(params, std::index_sequence_for<Args...>{});
        const int bad = refused(values, check, check_context, std::index_sequence_for<Args...>{});
        if (bad >= 0) return bad;
        run_grid(shape, &body, &values);
        return -1;
    }
};

}  // namespace emulation

inline void __syncthreads() { emulation::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emulation::sync_warp(); }
inline float __shfl_xor_sync(unsigned, float value, int offset) { return emulation::shuffle_xor(value, offset); }
inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline float __int_as_float(int bits) {
    float value;
    __builtin_memcpy(&value, &bits, sizeof value);
    return value;
}
inline unsigned int __float_as_uint(float value) {
    unsigned int bits;
    __builtin_memcpy(&bits, &value, sizeof bits);
    return bits;
}
inline float __uint_as_float(unsigned int bits) {
    float value;
    __builtin_memcpy(&value, &bits, sizeof value);
    return value;
}
using std::max;
using std::min;
