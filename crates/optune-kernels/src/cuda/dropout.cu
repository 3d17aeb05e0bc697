// Dropout whose mask is a function of the element's index in a counter-based stream (see
// src/dropout.rs, whose CPU form is the specification): element i of a call at stream position
// `position` is kept when the high 32 bits of SplitMix64's output for counter position + i under
// `key` are below `threshold` (keep probability · 2^32), and then scaled by `scale` (1 / keep) in
// f32 and rounded once to T; dropped elements are +0. Nothing is stored between the forward pass
// and the backward pass, which applies the same mask to the gradient. Elementwise, blocks of
// threads striding over the n elements.

#include "dtypes.cuh"
#include <stdint.h>

__device__ __forceinline__ uint32_t dropout_bits(uint64_t key, uint64_t counter) {
    uint64_t z = key + counter * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 32);
}

template <typename T>
__device__ void dropout(const T *__restrict__ x, T *__restrict__ out, uint64_t n, uint64_t key,
                        uint64_t position, uint64_t threshold, float scale) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const bool keep = dropout_bits(key, position + i) < threshold;
        out[i] = from_float<T>(keep ? to_float(x[i]) * scale : 0.0f);
    }
}

#define DROPOUT(SUFFIX, T)                                                                     \
    extern "C" __global__ void dropout_##SUFFIX(const T *x, T *out, uint64_t n, uint64_t key,  \
                                                uint64_t position, uint64_t threshold,         \
                                                float scale) {                                 \
        dropout<T>(x, out, n, key, position, threshold, scale);                                \
    }

DROPOUT(f32, float)
DROPOUT(bf16, __nv_bfloat16)
DROPOUT(f16, __half)
