// What a CUDA kernel source needs from the CUDA toolkit, for the CPU: the execution-space
// keywords, the thread and block builtins, __syncthreads, warp shuffles, the bf16/f16 storage
// types and the float intrinsics. Each emulated CUDA thread is a fiber of one OS thread (see
// emulator.cpp): a block's threads run one at a time, each until it reaches a barrier or ends, so
// a launch is deterministic and a barrier some threads can never reach is reported, not hung.
//
// Not emulated: the GPU's approximate fast-math functions (__expf is expf here), memory fences
// beyond __syncthreads, atomics, dynamic shared memory, and shared memory of concurrent blocks
// (blocks run one after another, so `__shared__` becomes a function-level static).

#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define CUDART_INF_F INFINITY

struct dim3 {
    unsigned x, y, z;
};
struct float4 {
    float x, y, z, w;
};

namespace emu {
// The running fiber's thread and block indices and the launch's dimensions.
const dim3 &thread_index();
const dim3 &block_index();
const dim3 &block_dim();
const dim3 &grid_dim();
// Blocks until every live thread of the block has arrived.
void sync_block();
// The value `value` of lane `lane ^ lane_mask` of the calling warp; all 32 lanes must take part.
float shfl_xor(unsigned mask, float value, int lane_mask);
// The value `value` of lane `source` of the calling warp; all 32 lanes must take part.
float shfl(unsigned mask, float value, int source);
}  // namespace emu

#define threadIdx (emu::thread_index())
#define blockIdx (emu::block_index())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())

inline void __syncthreads() { emu::sync_block(); }
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
    return emu::shfl_xor(mask, value, lane_mask);
}
inline float __shfl_sync(unsigned mask, float value, int source) {
    return emu::shfl(mask, value, source);
}

// Storage types: the bits, as the GPU and the `half` crate lay them out.
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
    const uint32_t bits = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Round to nearest even, as __float2bfloat16 does; NaN stays a quiet NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if (std::isnan(f)) return {uint16_t((bits >> 16) | 0x0040u)};
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return {uint16_t(bits >> 16)};
}

inline float __half2float(__half x) {
    _Float16 h;
    std::memcpy(&h, &x.bits, sizeof h);
    return float(h);
}

inline __half __float2half(float f) {
    const _Float16 h = _Float16(f);
    __half out;
    std::memcpy(&out.bits, &h, sizeof h);
    return out;
}

// Round-to-nearest intrinsics: plain IEEE operations on the host (built without contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {
// Runs `body` once per thread of a grid of blocks, block after block, each block's threads as
// fibers; 0 when every block ran to the end, else -1 with the reason in `last_error()`. With
// `reversed`, the blocks run last first and a block's threads are resumed last first: a result
// that changes with that order depends on how a GPU happens to schedule (a race).
int launch_erased(const char *kernel, dim3 grid, dim3 block, bool reversed, void (*body)(void *),
                  void *context);
const char *last_error();
// Sets the error last_error() returns, for a launch refused before it starts; -1.
int refuse(const std::string &message);

template <typename F> int launch(const char *kernel, dim3 grid, dim3 block, bool reversed, F &&body) {
    return launch_erased(
        kernel, grid, block, reversed, [](void *c) { (*static_cast<decltype(&body)>(c))(); },
        &body);
}
}  // namespace emu
