// Attention of queries over a KV cache, each query over its own slot's cached positions (see
// src/cached_attention.rs): the decode step (one query per slot) and the prefill of packed prompt
// chunks (many queries per slot) alike.
//
// A query's span of positions may be split into `splits` chunks of `chunk` positions, one block
// each (a decode step of few sequences launches too few blocks to keep the GPU's memory busy
// otherwise: 32 at batch 1 on a 7B, each walking ~2,000 positions after a long prompt). Block b is
// head b % heads of chunk (b / heads) % splits of query b / (heads · splits): the heads of one
// query's chunk, and among them those sharing a KV head, run side by side and read its keys and
// values while they are in L2. Each lane loads the query's channels lane, lane+32, ... of the
// head, turned by the query's rotary angle (rotate-half layout: channel c < d/2 pairs with
// c + d/2) and scaled, in f32. Warp w then takes IN_FLIGHT consecutive positions of the chunk at a
// time, starting at its w-th group of them and stepping over the other warps' groups: it loads
// all their keys and values before it reduces any (independent loads in flight), and folds their
// scores into an online softmax, holding the running output for its channels; a key's score is
// the warp's sum of the lanes' partial dot products. The warps' results are merged at the end
// through shared memory. Unsplit (cached_attention_[wide_]*), the block writes the query head's
// output; split (cached_attention_split_[wide_]*), it writes its chunk's (max, sum, unnormalised
// output) to `partial`, and cached_attention_merge_* combines a query head's chunks. The wide_
// forms take heads up to 256 channels, the others up to 128. Everything is
// accumulated in f32 whatever the storage type. A query with last < first (an idle slot) gets
// zeros. Keys and values are read once, in place, from the cache laid out [slots, kv_heads,
// capacity, head_dim]. The queries are the first heads·head_dim columns of rows [queries,
// row_width] (the projections' output, q first, then what else was projected with it); out is
// [queries, heads, head_dim] (the layout the output projection reads); partial [queries, heads,
// splits, head_dim + 2] f32; cos and sin [queries, head_dim / 2]; spans [queries, 3] of (slot,
// first, last).

#include "dtypes.cuh"
#include <math_constants.h>
#include <stdint.h>

#define WARPS 4
// Consecutive positions a warp loads before it reduces their scores.
#define IN_FLIGHT 4
// Threads of a merging block, each one channel at a time.
#define MERGE_THREADS 128

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}

// A chunk's record in `partial`: its max score, its sum of weights e^(score - max), then its
// output weighted likewise, not yet divided by the sum.
__device__ __forceinline__ size_t record_at(size_t query_head, int split, int splits,
                                            int head_dim) {
    return (query_head * splits + split) * (size_t)(head_dim + 2);
}

// The weight of a chunk's (or a warp's) result whose max is `chunk_max` against the largest max:
// e^(difference), and 0 for one that saw no position (max -inf; also when none saw one, where the
// difference would be NaN).
__device__ __forceinline__ float chunk_weight(float chunk_max, float overall_max) {
    return chunk_max == -CUDART_INF_F ? 0.0f : __expf(chunk_max - overall_max);
}

// PER_LANE: channels per lane, head_dim up to 32 · PER_LANE (4: 128, as Llama's and Mistral's
// heads; 8: 256). Each lane holds 2 · IN_FLIGHT · PER_LANE loaded keys and values, so the narrow
// form needs half the registers of the wide one and keeps more blocks resident. W: what the block
// writes, T (the output, unsplit) or float (its chunk's record, split).
template <typename T, int PER_LANE, typename W, bool SPLIT>
__device__ void cached_attention(const T *__restrict__ q, const T *__restrict__ cos,
                                 const T *__restrict__ sin, const T *__restrict__ keys,
                                 const T *__restrict__ values, W *__restrict__ written,
                                 const uint32_t *__restrict__ spans,
                                 int heads, int kv_heads, int capacity, int head_dim,
                                 int row_width, int splits, int chunk, float scale) {
    const int head = blockIdx.x % heads;
    const int split = (blockIdx.x / heads) % splits;
    const size_t query_id = blockIdx.x / heads / splits;
    const size_t query_head = query_id * heads + head;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kv_head = head / (heads / kv_heads);
    const int half = head_dim / 2;
    // Where this query head's vector starts in the rows and in out [queries, heads, d], and the
    // query's angles in cos, sin [queries, d/2].
    const size_t at = query_id * row_width + (size_t)head * head_dim;
    const size_t angles = query_id * half;
    // spans: [queries, 3] of (slot, first, last), positions inclusive; this block's chunk of
    // them is lo..=hi (empty when lo > hi).
    const size_t slot = spans[3 * query_id];
    const int64_t first = spans[3 * query_id + 1];
    const int64_t last = spans[3 * query_id + 2];
    const int64_t lo = first + (int64_t)split * chunk;
    const int64_t hi = last < lo + chunk - 1 ? last : lo + chunk - 1;
    const size_t cache_base = (slot * kv_heads + kv_head) * (size_t)capacity * head_dim;

    float query[PER_LANE];
    float acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
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
    // Warp-uniform: every lane of a warp takes the same groups and positions.
    for (int64_t group = lo + (int64_t)warp * IN_FLIGHT; group <= hi;
         group += WARPS * IN_FLIGHT) {
        float key[IN_FLIGHT][PER_LANE];
        float value[IN_FLIGHT][PER_LANE];
#pragma unroll
        for (int p = 0; p < IN_FLIGHT; ++p) {
            const bool live = group + p <= hi;
            const size_t row = cache_base + (size_t)(group + p) * head_dim;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                const int c = lane + 32 * i;
                const bool read = live && c < head_dim;
                key[p][i] = read ? to_float(keys[row + c]) : 0.0f;
                value[p][i] = read ? to_float(values[row + c]) : 0.0f;
            }
        }
        float score[IN_FLIGHT];
#pragma unroll
        for (int p = 0; p < IN_FLIGHT; ++p) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) dot += query[i] * key[p][i];
            score[p] = warp_sum(dot);
        }
        float new_max = running_max;
#pragma unroll
        for (int p = 0; p < IN_FLIGHT; ++p) {
            if (group + p <= hi) new_max = fmaxf(new_max, score[p]);
        }
        const float rescale = __expf(running_max - new_max);
        running_sum *= rescale;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) acc[i] *= rescale;
#pragma unroll
        for (int p = 0; p < IN_FLIGHT; ++p) {
            if (group + p > hi) continue;
            const float weight = __expf(score[p] - new_max);
            running_sum += weight;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) acc[i] += weight * value[p][i];
        }
        running_max = new_max;
    }

    __shared__ float warp_max[WARPS];
    __shared__ float warp_sum_of[WARPS];
    __shared__ float warp_acc[WARPS][32 * PER_LANE];
    if (lane == 0) {
        warp_max[warp] = running_max;
        warp_sum_of[warp] = running_sum;
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
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
        factor[w] = chunk_weight(warp_max[w], overall_max);
        total += warp_sum_of[w] * factor[w];
    }
    const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
    W *record = written + (SPLIT ? record_at(query_head, split, splits, head_dim) : 0);
    if constexpr (SPLIT) {
        if (lane == 0) {
            record[0] = overall_max;
            record[1] = total;
        }
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (c >= head_dim) continue;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += warp_acc[w][c] * factor[w];
        if constexpr (SPLIT) {
            record[2 + c] = sum;
        } else {
            written[query_head * head_dim + c] = from_float<T>(sum * inverse);
        }
    }
}

// One block of MERGE_THREADS per query head: its chunks' records combined, each chunk's output
// and sum weighted by chunk_weight; a query head none of whose chunks saw a position (an idle
// slot) gets zeros.
template <typename T>
__device__ void merge_split_attention(const float *__restrict__ partial, T *__restrict__ out,
                                      int splits, int head_dim) {
    const size_t query_head = blockIdx.x;
    float overall_max = -CUDART_INF_F;
    for (int s = 0; s < splits; ++s) {
        overall_max = fmaxf(overall_max, partial[record_at(query_head, s, splits, head_dim)]);
    }
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float *record = partial + record_at(query_head, s, splits, head_dim);
        total += record[1] * chunk_weight(record[0], overall_max);
    }
    const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
    for (int c = threadIdx.x; c < head_dim; c += MERGE_THREADS) {
        float sum = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float *record = partial + record_at(query_head, s, splits, head_dim);
            sum += record[2 + c] * chunk_weight(record[0], overall_max);
        }
        out[query_head * head_dim + c] = from_float<T>(sum * inverse);
    }
}

#define ATTENTION_ENTRY(NAME, T, PER_LANE, W, SPLIT)                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        NAME(const T *q, const T *cos, const T *sin, const T *keys, const T *values, W *written,  \
             const uint32_t *spans, int heads, int kv_heads, int capacity, int head_dim,          \
             int row_width, int splits, int chunk, float scale) {                                  \
        cached_attention<T, PER_LANE, W, SPLIT>(q, cos, sin, keys, values, written, spans, heads, \
                                                kv_heads, capacity, head_dim, row_width, splits,  \
                                                chunk, scale);                                     \
    }

#define ATTENTION_ENTRIES(T, PER_LANE, SUFFIX)                                                     \
    ATTENTION_ENTRY(cached_attention_##SUFFIX, T, PER_LANE, T, false)                              \
    ATTENTION_ENTRY(cached_attention_split_##SUFFIX, T, PER_LANE, float, true)

// Per storage type: the attention kernels for heads up to 128 and up to 256 wide, whole and
// split, and the merging kernel.
#define CACHED_ATTENTION(T, SUFFIX)                                                                \
    ATTENTION_ENTRIES(T, 4, SUFFIX)                                                                \
    ATTENTION_ENTRIES(T, 8, wide_##SUFFIX)                                                         \
    extern "C" __global__ void __launch_bounds__(MERGE_THREADS) cached_attention_merge_##SUFFIX(  \
        const float *partial, T *out, int splits, int head_dim) {                                 \
        merge_split_attention<T>(partial, out, splits, head_dim);                                 \
    }

CACHED_ATTENTION(float, f32)
CACHED_ATTENTION(__nv_bfloat16, bf16)
CACHED_ATTENTION(__half, f16)
