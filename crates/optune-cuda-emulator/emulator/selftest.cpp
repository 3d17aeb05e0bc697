// Kernels that test the emulator itself (src/lib.rs's tests): a block reduction through shared
// memory and __syncthreads, a warp reduction through shuffles, a shuffle that half of its warp
// never reaches, and a read past the end of a buffer.

#include "kernels.h"

__global__ void selftest_block_sum(const float *x, float *out) {
    __shared__ float partial[1024];
    const unsigned t = threadIdx.x;
    partial[t] = x[blockIdx.x * blockDim.x + t];
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        __syncthreads();
        if (t < half) partial[t] += partial[t + half];
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

__global__ void selftest_warp_sum(const float *x, float *out) {
    float v = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[threadIdx.x] = v;
}

__global__ void selftest_diverged_shuffle(float *out) {
    if (threadIdx.x % 32 < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    }
}

// Thread t reads x[t + n]: for a buffer of n elements, every read is past its end.
__global__ void selftest_read_past_the_end(const float *x, float *out, int n) {
    out[threadIdx.x] = x[threadIdx.x + n];
}

EMULATED(selftest_block_sum, PARAMS(const float *x, float *out), PARAMS(x, out))
EMULATED(selftest_warp_sum, PARAMS(const float *x, float *out), PARAMS(x, out))
EMULATED(selftest_diverged_shuffle, PARAMS(float *out), PARAMS(out))
EMULATED(selftest_read_past_the_end, PARAMS(const float *x, float *out, int n), PARAMS(x, out, n))
