// Kernels that test the emulator itself (src/lib.rs's tests): a block reduction through shared
// memory and __syncthreads, a warp reduction through shuffles, a broadcast from a named lane, a
// shuffle that half of its warp never reaches, reads outside a buffer, a kernel leaving an output
// element unwritten, and a race: a read of shared memory another thread writes, with no barrier
// between.

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

// Lane l of each warp takes the value of lane (7 l + 3) mod 32 of its warp.
__global__ void selftest_warp_broadcast(const float *x, float *out) {
    const int lane = threadIdx.x % 32;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, x[threadIdx.x], (7 * lane + 3) % 32);
}

__global__ void selftest_diverged_shuffle(float *out) {
    if (threadIdx.x % 32 < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    }
}

// Thread t reads x[t + offset]: for a buffer of n elements, offset n reads past its end and -1
// (thread 0) before its start.
__global__ void selftest_read_at_offset(const float *x, float *out, int offset) {
    out[threadIdx.x] = x[int(threadIdx.x) + offset];
}

// Every thread but the block's last writes its element.
__global__ void selftest_write_all_but_last(float *out) {
    if (threadIdx.x + 1 < blockDim.x) out[threadIdx.x] = 1.0f;
}

// Thread t stores x[t] in shared memory and reads its neighbour's value with no barrier between:
// what it reads depends on whether the neighbour ran first.
__global__ void selftest_missing_barrier(const float *x, float *out) {
    __shared__ float values[1024];
    const unsigned t = threadIdx.x;
    values[t] = x[t];
    out[t] = values[(t + 1) % blockDim.x];
}

EMULATED(selftest_block_sum)
EMULATED(selftest_warp_sum)
EMULATED(selftest_warp_broadcast)
EMULATED(selftest_diverged_shuffle)
EMULATED(selftest_write_all_but_last)
EMULATED(selftest_read_at_offset)
EMULATED(selftest_missing_barrier)
