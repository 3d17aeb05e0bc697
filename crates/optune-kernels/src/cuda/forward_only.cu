// Ops of forward passes that need no gradient, one kernel each (see src/forward_only.rs, whose
// CPU forms are the specification):
// * add_rms_norm: the residual add and the RMS norm after it. out [2, rows, hidden]: out[0] the
//   sum x + delta rounded to T (the new residual stream), out[1] that sum normalised and scaled by
//   weight. One block of THREADS threads per row; statistics in f32.
// * silu_mul: the SwiGLU gate silu(gate) · up, in f32, rounded once to T, of rows [rows, 2 · width]
//   holding the gate's projection, then the up projection's (as one stacked product gives them);
//   out [rows, width].
// * head_rms_norm: Qwen3's RMS norms of each query and key head, on rows [tokens, heads_per_row
//   · d] holding q's heads, then k's, then the rest (v): out the same rows with each of the first
//   q_heads heads normalised and scaled by q_weight [d], each of the next k_heads by k_weight,
//   the rest copied. One warp per (token, head), HEAD_WARPS to a block; statistics in f32.

#include "dtypes.cuh"
#include <stdint.h>

#define THREADS 256

template <typename T>
__device__ void add_rms_norm(const T *__restrict__ x, const T *__restrict__ delta,
                             const T *__restrict__ weight, T *__restrict__ out, int rows,
                             int hidden, float eps) {
    const size_t row = blockIdx.x;
    const size_t at = row * hidden;
    T *sum = out + at;
    T *normed = out + (size_t)rows * hidden + at;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += THREADS) {
        // The stream keeps T's precision: the statistics see the sum as it is stored.
        const T s = from_float<T>(to_float(x[at + i]) + to_float(delta[at + i]));
        sum[i] = s;
        const float f = to_float(s);
        squares += f * f;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    }
    __shared__ float warp_squares[THREADS / 32];
    if (threadIdx.x % 32 == 0) warp_squares[threadIdx.x / 32] = squares;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) total += warp_squares[w];
    const float inverse = 1.0f / sqrtf(total / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += THREADS) {
        normed[i] = from_float<T>(to_float(sum[i]) * inverse * to_float(weight[i]));
    }
}

template <typename T>
__device__ void silu_mul(const T *__restrict__ gate_up, T *__restrict__ out, uint64_t n,
                         int width) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t row = i / width;
        const T *gate = gate_up + row * 2 * width + i % width;
        const float g = to_float(gate[0]);
        out[i] = from_float<T>(g / (1.0f + expf(-g)) * to_float(gate[width]));
    }
}

#define HEAD_WARPS 4

template <typename T>
__device__ void head_rms_norm(const T *__restrict__ rows, const T *__restrict__ q_weight,
                              const T *__restrict__ k_weight, T *__restrict__ out, uint64_t units,
                              int heads_per_row, int q_heads, int k_heads, int d, float eps) {
    // Uniform across a warp: a warp whose unit is past the end leaves whole, before any shuffle.
    const uint64_t unit = blockIdx.x * (uint64_t)HEAD_WARPS + threadIdx.x / 32;
    if (unit >= units) return;
    const int lane = threadIdx.x % 32;
    const int head = (int)(unit % heads_per_row);
    const T *in = rows + unit * d;
    T *to = out + unit * d;
    if (head >= q_heads + k_heads) {
        for (int i = lane; i < d; i += 32) to[i] = in[i];
        return;
    }
    const T *weight = head < q_heads ? q_weight : k_weight;
    float squares = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float f = to_float(in[i]);
        squares += f * f;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    }
    const float inverse = 1.0f / sqrtf(squares / (float)d + eps);
    for (int i = lane; i < d; i += 32) {
        to[i] = from_float<T>(to_float(in[i]) * inverse * to_float(weight[i]));
    }
}

#define FORWARD_ONLY(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                          \
        add_rms_norm_##SUFFIX(const T *x, const T *delta, const T *weight, T *out, int rows,       \
                              int hidden, float eps) {                                             \
        add_rms_norm<T>(x, delta, weight, out, rows, hidden, eps);                                 \
    }                                                                                              \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gate_up, T *out, uint64_t n,           \
                                                 int width) {                                      \
        silu_mul<T>(gate_up, out, n, width);                                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * HEAD_WARPS)                                  \
        head_rms_norm_##SUFFIX(const T *rows, const T *q_weight, const T *k_weight, T *out,        \
                               uint64_t units, int heads_per_row, int q_heads, int k_heads, int d, \
                               float eps) {                                                        \
        head_rms_norm<T>(rows, q_weight, k_weight, out, units, heads_per_row, q_heads, k_heads, d, \
                         eps);                                                                     \
    }

FORWARD_ONLY(f32, float)
FORWARD_ONLY(bf16, __nv_bfloat16)
FORWARD_ONLY(f16, __half)
