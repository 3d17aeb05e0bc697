// One token from each row of logits (see src/sampling.rs: its CPU form is the specification,
// and it sums in this kernel's order). One block of LANES threads per row; thread 0 adds the
// lanes' partial sums in lane order, so that every sum is the CPU form's to the last bit of
// `expf`. Out: [rows, 2] of (token id, log softmax(logits)[token]).

#include "dtypes.cuh"
#include <math_constants.h>
#include <stdint.h>

#define LANES 256

// The lanes' values added in lane order by thread 0, handed to every lane.
__device__ float lanes_total(float mine, float *shared) {
    __syncthreads();
    shared[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int t = 0; t < LANES; ++t) total += shared[t];
        shared[LANES] = total;
    }
    __syncthreads();
    return shared[LANES];
}

__device__ float lanes_max(float mine, float *shared) {
    __syncthreads();
    shared[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float top = -CUDART_INF_F;
        for (int t = 0; t < LANES; ++t) top = fmaxf(top, shared[t]);
        shared[LANES] = top;
    }
    __syncthreads();
    return shared[LANES];
}

__device__ int lanes_min(int mine, int *shared) {
    __syncthreads();
    shared[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        int least = shared[0];
        for (int t = 1; t < LANES; ++t) least = min(least, shared[t]);
        shared[LANES] = least;
    }
    __syncthreads();
    return shared[LANES];
}

// Σ of the weights of the tokens whose shifted logit is at or above `threshold`.
template <typename T>
__device__ float mass_from(const T *l, int vocab, float top, float temperature, float threshold,
                           float *shared) {
    float mine = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += LANES) {
        const float shifted = to_float(l[i]) - top;
        if (shifted >= threshold) mine += expf(shifted / temperature);
    }
    return lanes_total(mine, shared);
}

// How many tokens have a shifted logit at or above `threshold`, as a float.
template <typename T>
__device__ float count_from(const T *l, int vocab, float top, float threshold, float *shared) {
    float mine = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += LANES) {
        if (to_float(l[i]) - top >= threshold) mine += 1.0f;
    }
    return lanes_total(mine, shared);
}

template <typename T>
__device__ void sample_rows(const T *__restrict__ logits, const float *__restrict__ uniforms,
                            float *__restrict__ out, int vocab, float temperature, int top_k,
                            float top_p, float min_p_threshold, float floor_nats, int steps) {
    __shared__ float shared[LANES + 1];
    __shared__ int shared_int[LANES + 1];
    const int lane = threadIdx.x;
    const size_t row = blockIdx.x;
    const T *l = logits + row * (size_t)vocab;

    float top = -CUDART_INF_F;
    for (int i = lane; i < vocab; i += LANES) top = fmaxf(top, to_float(l[i]));
    top = lanes_max(top, shared);
    float z = 0.0f;
    for (int i = lane; i < vocab; i += LANES) z += expf(to_float(l[i]) - top);
    const float log_z = logf(lanes_total(z, shared));
    // The most likely token, ties to the lowest id.
    int best = vocab;
    for (int i = lane; i < vocab; i += LANES) {
        if (to_float(l[i]) == top) {
            best = i;
            break;
        }
    }
    best = lanes_min(best, shared_int);
    if (best >= vocab) best = 0;
    if (temperature <= 0.0f) {
        if (lane == 0) {
            out[2 * row] = (float)best;
            out[2 * row + 1] = (to_float(l[best]) - top) - log_z;
        }
        return;
    }

    float threshold = -floor_nats * fmaxf(temperature, 1e-3f);
    if (top_k > 0 && top_k < vocab) {
        float low = threshold, high = 1.0f;
        for (int s = 0; s < steps; ++s) {
            const float mid = (low + high) * 0.5f;
            if (count_from(l, vocab, top, mid, shared) >= (float)top_k) {
                low = mid;
            } else {
                high = mid;
            }
        }
        threshold = low;
    }
    if (top_p < 1.0f) {
        const float target = mass_from(l, vocab, top, temperature, threshold, shared) * top_p;
        float low = threshold, high = 1.0f;
        for (int s = 0; s < steps; ++s) {
            const float mid = (low + high) * 0.5f;
            if (mass_from(l, vocab, top, temperature, mid, shared) >= target) {
                low = mid;
            } else {
                high = mid;
            }
        }
        threshold = low;
    }
    // Min-p: at least min_p of the top token's tempered probability (-inf without it).
    threshold = fmaxf(threshold, min_p_threshold);

    // The draw: each lane's kept weight over its contiguous chunk of ids, then thread 0 finds the
    // chunk where the running weight passes u · total, and the id within it.
    const int chunk = (vocab + LANES - 1) / LANES;
    const int start = lane * chunk;
    const int end = min(start + chunk, vocab);
    float mine = 0.0f;
    for (int i = start; i < end; ++i) {
        const float shifted = to_float(l[i]) - top;
        if (shifted >= threshold) mine += expf(shifted / temperature);
    }
    __syncthreads();
    shared[lane] = mine;
    __syncthreads();
    if (lane != 0) return;
    float total = 0.0f;
    for (int t = 0; t < LANES; ++t) total += shared[t];
    const float target = uniforms[row] * total;
    int token = best;
    float before = 0.0f;
    for (int t = 0; t < LANES; ++t) {
        if (before + shared[t] > target) {
            float running = before;
            for (int i = t * chunk; i < min((t + 1) * chunk, vocab); ++i) {
                const float shifted = to_float(l[i]) - top;
                if (shifted >= threshold) running += expf(shifted / temperature);
                if (running > target) {
                    token = i;
                    break;
                }
            }
            break;
        }
        before += shared[t];
    }
    out[2 * row] = (float)token;
    out[2 * row + 1] = (to_float(l[token]) - top) - log_z;
}

#define SAMPLE_ROWS(NAME, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(LANES)                                            \
        NAME(const T *logits, const float *uniforms, float *out, int vocab, float temperature,     \
             int top_k, float top_p, float min_p_threshold, float floor_nats, int steps) {         \
        sample_rows<T>(logits, uniforms, out, vocab, temperature, top_k, top_p, min_p_threshold,  \
                       floor_nats, steps);                                                         \
    }

SAMPLE_ROWS(sample_rows_f32, float)
SAMPLE_ROWS(sample_rows_bf16, __nv_bfloat16)
SAMPLE_ROWS(sample_rows_f16, __half)
