// Attention of queries over a KV cache, each query over its own slot's cached positions (see
// src/cached_attention.rs): the decode step (one query per slot) and the prefill of packed prompt
// chunks (many queries per slot) alike.
//
// One block per (query, query head), WARPS warps; block b is head b % heads of query b / heads, so
// the heads of one query, and among them those sharing a KV head, run side by side and read its
// keys and values while they are in L2 (with the head as the slow index, a group's other heads
// would come a whole grid row later). Each lane loads the query's channels lane, lane+32, ... of
// the head, turned by the query's rotary angle (rotate-half layout: channel c < d/2 pairs with
// c + d/2) and scaled, in f32. Warp w then walks the query's positions first+w, first+w+WARPS, ...
// up to last (inclusive) with an online softmax, holding the running output for its channels; a
// key's score is the warp's sum of the lanes' partial dot products. The warps' partial results
// are merged at the end through shared memory. Everything is accumulated in f32 whatever the
// storage type. A query with last < first (an idle slot) gets zeros. Keys and values are read
// once, in place, from the cache laid out [slots, kv_heads, capacity, head_dim]. The queries are
// the first heads·head_dim columns of rows [queries, row_width] (the projections' output, q
// first, then what else was projected with it); out is [queries, heads, head_dim] (the layout the
// output projection reads); cos and sin [queries, head_dim / 2]; spans [queries, 3] of (slot,
// first, last).

#include "dtypes.cuh"
#include <math_constants.h>
#include <stdint.h>

#define WARPS 4
// Channels per lane: head_dim up to 32 * 8 = 256.
#define MAX_PER_LANE 8

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}

template <typename T>
__device__ void cached_attention(const T *__restrict__ q, const T *__restrict__ cos,
                                 const T *__restrict__ sin, const T *__restrict__ keys,
                                 const T *__restrict__ values, T *__restrict__ out,
                                 const uint32_t *__restrict__ spans, int heads, int kv_heads,
                                 int capacity, int head_dim, int row_width, float scale) {
    const size_t query_id = blockIdx.x / heads;
    const int head = blockIdx.x % heads;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kv_head = head / (heads / kv_heads);
    const int half = head_dim / 2;
    // Where this query head's vector starts in the rows and in out [queries, heads, d], and the
    // query's angles in cos, sin [queries, d/2].
    const size_t at = query_id * row_width + (size_t)head * head_dim;
    const size_t out_at = (query_id * heads + head) * head_dim;
    const size_t angles = query_id * half;
    // spans: [queries, 3] of (slot, first, last), positions inclusive.
    const size_t slot = spans[3 * query_id];
    const uint32_t first = spans[3 * query_id + 1];
    const uint32_t last = spans[3 * query_id + 2];
    const size_t cache_base = (slot * kv_heads + kv_head) * (size_t)capacity * head_dim;

    float query[MAX_PER_LANE];
    float acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        const int c = lane + 32 * i;
        acc[i] = 0.0f;
        query[i] = 0.0f;
        if (c >= head_dim) continue;
        const bool low = c < half;
        const int j = low ? c : c - half;
        const float x = to_float(q[at + c]);
        const float partner = to_float(q[at + (low ? c + half : c - half)]);
        const float cs = to_float(cos[angles + j]), sn = to_float(sin[angles + j]);
        const float turned = low ? __fsub_rn(__fmul_rn(x, cs), __fmul_rn(partner, sn))
                                 : __fadd_rn(__fmul_rn(partner, sn), __fmul_rn(x, cs));
        query[i] = __fmul_rn(turned, scale);
    }
    float running_max = -CUDART_INF_F;
    float running_sum = 0.0f;
    for (uint32_t position = first + warp; position <= last && first <= last; position += WARPS) {
        const T *key = keys + cache_base + (size_t)position * head_dim;
        float partial = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i) {
            const int c = lane + 32 * i;
            if (c < head_dim) partial += query[i] * to_float(key[c]);
        }
        const float score = warp_sum(partial);
        const float new_max = fmaxf(running_max, score);
        const float rescale = __expf(running_max - new_max);
        const float weight = __expf(score - new_max);
        running_sum = running_sum * rescale + weight;
        const T *value = values + cache_base + (size_t)position * head_dim;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i) {
            const int c = lane + 32 * i;
            if (c < head_dim) acc[i] = acc[i] * rescale + weight * to_float(value[c]);
        }
        running_max = new_max;
    }

    __shared__ float warp_max[WARPS];
    __shared__ float warp_sum_of[WARPS];
    __shared__ float warp_acc[WARPS][32 * MAX_PER_LANE];
    if (lane == 0) {
        warp_max[warp] = running_max;
        warp_sum_of[warp] = running_sum;
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (c < head_dim) warp_acc[warp][c] = acc[i];
    }
    __syncthreads();
    if (warp != 0) return;
    float overall_max = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) overall_max = fmaxf(overall_max, warp_max[w]);
    float total = 0.0f;
    float factor[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        // A warp that saw no position holds -inf and contributes nothing.
        factor[w] = warp_max[w] == -CUDART_INF_F ? 0.0f : __expf(warp_max[w] - overall_max);
        total += warp_sum_of[w] * factor[w];
    }
    const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (c >= head_dim) continue;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += warp_acc[w][c] * factor[w];
        out[out_at + c] = from_float<T>(sum * inverse);
    }
}

#define CACHED_ATTENTION(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        NAME(const T *q, const T *cos, const T *sin, const T *keys, const T *values, T *out,      \
             const uint32_t *spans, int heads, int kv_heads, int capacity, int head_dim,          \
             int row_width, float scale) {                                                         \
        cached_attention<T>(q, cos, sin, keys, values, out, spans, heads, kv_heads, capacity,     \
                            head_dim, row_width, scale);                                           \
    }

CACHED_ATTENTION(cached_attention_f32, float)
CACHED_ATTENTION(cached_attention_bf16, __nv_bfloat16)
CACHED_ATTENTION(cached_attention_f16, __half)
