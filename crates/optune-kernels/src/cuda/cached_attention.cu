// Attention of queries over a KV cache, each query over its own slot's cached positions (see
// src/cached_attention.rs): the decode step (one query per slot) and the prefill of packed prompt
// chunks (many queries per slot) alike. Two families: the per-token kernels below (one block
// per query and group of its heads, or per chunk of its span), which a pass of decoding tokens
// takes, and the tiled kernel further down (one block per tile of 2 to 16 prompt tokens and
// head), which takes the prompt tokens of a pass that has some, the per-token kernels taking its
// other tokens in a second launch; `shape_for` in the Rust file chooses.
//
// A block of the per-token kernels attends for one, two or four query heads of one query that
// share a KV head (g2_, g4_: GQA models such as Mistral-7B, 4 query heads per KV head, or
// TinyLlama, 8), so that each key and value it loads serves all of them. A query's span of
// positions may also be split into `splits` chunks of `chunk` positions, one block each (a decode
// step of few sequences launches too few blocks to keep the GPU's memory busy otherwise: 32 at
// batch 1 on a 7B, each walking ~2,000 positions after a long prompt). Block b is head group
// b % groups of chunk (b / groups) % splits of query b / (groups · splits): the groups of one
// query's chunk run side by side. Each lane loads its heads' query channels lane, lane+32, ...,
// turned by the query's rotary angle (rotate-half layout: channel c < d/2 pairs with c + d/2) and
// scaled, in f32. Warp w then takes IN_FLIGHT consecutive positions of the chunk at a time,
// starting at its w-th group of them and stepping over the other warps' groups: it loads all
// their keys and values before it reduces any (independent loads in flight), sums the lanes'
// partial dot products of each (head, position) over the warp, and folds each head's scores
// into its online softmax, holding the running output for its channels. The warps' results
// are merged at the end through shared memory. Unsplit
// (cached_attention_[g2_|g4_|wide_]*), the block writes its heads' outputs; split
// (cached_attention_split_*), each head's chunk record (max, sum, unnormalised output) to
// `partial`, and cached_attention_merge_* combines a query head's chunks. The wide_ forms take
// heads up to 256 channels, one to a block; the others up to 128. Everything is accumulated in
// f32 whatever the storage type. A query with last < first (an idle slot) gets zeros. Keys and
// values are read once, in place, from the cache's blocks [blocks, kv_heads, block, head_dim],
// each position found through the block table `blocks` [slots, table_width] (a paged cache) or,
// without one (a null pointer), block s being slot s's whole span (kv_blocks.cuh).
// The queries are the first heads·head_dim columns of rows [queries, row_width] (the
// projections' output, q first, then what else was projected with it); out is [queries, heads,
// head_dim] (the layout the output projection reads); partial [queries, heads, splits,
// head_dim + 2] f32; cos and sin [queries, head_dim / 2]; spans [queries, 3] of (slot, first,
// last).

#include "dtypes.cuh"
#include "kv_blocks.cuh"
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

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    }
    return x;
}

// Channel c of the query head whose vector starts at q[at], turned by the query's angles
// cos, sin[angles..] (rotate-half layout: channel c < d/2 pairs with c + d/2) and scaled, in f32.
template <typename T>
__device__ __forceinline__ float turned_query(const T *__restrict__ q, const T *__restrict__ cos,
                                              const T *__restrict__ sin, size_t at, size_t angles,
                                              int c, int half, float scale) {
    const bool low = c < half;
    const int j = low ? c : c - half;
    const float x = to_float(q[at + c]);
    const float partner = to_float(q[at + (low ? c + half : c - half)]);
    const float cs = to_float(cos[angles + j]), sn = to_float(sin[angles + j]);
    const float turned = low ? __fsub_rn(__fmul_rn(x, cs), __fmul_rn(partner, sn))
                             : __fadd_rn(__fmul_rn(partner, sn), __fmul_rn(x, cs));
    return __fmul_rn(turned, scale);
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

// Where the rows of positions start..start + IN_FLIGHT - 1 of one KV head of a slot begin (those
// past hi at row hi's).
__device__ __forceinline__ void row_starts(size_t (&row)[IN_FLIGHT],
                                           const uint32_t *__restrict__ slot_blocks, size_t slot,
                                           int kv_head, int kv_heads, int block, int64_t start,
                                           int64_t hi, int head_dim) {
#pragma unroll
    for (int p = 0; p < IN_FLIGHT; ++p) {
        const int64_t position = start + p <= hi ? start + p : hi;
        row[p] = kv_row(slot_blocks, slot, position, kv_head, kv_heads, block, head_dim);
    }
}

// Channels lane, lane + 32, ... of the rows starting at `row` (channels past the head re-read its
// last) of `cache`, as stored, into raw: unconditional loads, none converted or used here.
template <typename T, int PER_LANE>
__device__ __forceinline__ void load_rows(const T *__restrict__ cache,
                                          T (&raw)[IN_FLIGHT][PER_LANE],
                                          const size_t (&row)[IN_FLIGHT], int lane, int head_dim) {
#pragma unroll
    for (int p = 0; p < IN_FLIGHT; ++p) {
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            raw[p][i] = cache[row[p] + min(lane + 32 * i, head_dim - 1)];
        }
    }
}

// PER_LANE: channels per lane, head_dim up to 32 · PER_LANE (4: 128, as Llama's and Mistral's
// heads; 8: 256). Each lane holds 2 · IN_FLIGHT · PER_LANE loaded keys and values, so the narrow
// form needs fewer registers than the wide one and keeps more blocks resident. GROUP: query
// heads the block attends for at once, heads group·GROUP .. group·GROUP + GROUP - 1, all of one
// KV head (GROUP divides the heads of a KV head: `heads_per_block` in the Rust file), so that
// each key and value it loads serves GROUP heads, where a block per head would read them GROUP
// times (from L2, at best). W: what the block writes, T (the output, unsplit) or float (its
// chunk's records, split). The block attends for query `query_id`, chunk `split` of `splits`.
template <typename T, int PER_LANE, int GROUP, typename W, bool SPLIT>
__device__ void cached_attention(const T *__restrict__ q, const T *__restrict__ cos,
                                 const T *__restrict__ sin, const T *__restrict__ keys,
                                 const T *__restrict__ values, W *__restrict__ written,
                                 const uint32_t *__restrict__ spans,
                                 const uint32_t *__restrict__ blocks, size_t query_id, int group,
                                 int split, int heads, int kv_heads, int table_width, int block,
                                 int head_dim, int row_width, int splits, int chunk, float scale) {
    const int first_head = group * GROUP;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kv_head = first_head / (heads / kv_heads);
    const int half = head_dim / 2;
    // The query's angles in cos, sin [queries, d/2].
    const size_t angles = query_id * half;
    // spans: [queries, 3] of (slot, first, last), positions inclusive; this block's chunk of
    // them is lo..=hi (empty when lo > hi).
    const size_t slot = spans[3 * query_id];
    const int64_t first = spans[3 * query_id + 1];
    const int64_t last = spans[3 * query_id + 2];
    const int64_t lo = first + (int64_t)split * chunk;
    const int64_t hi = last < lo + chunk - 1 ? last : lo + chunk - 1;
    const uint32_t *slot_blocks = slot_blocks_of(blocks, slot, table_width);

    // Per head g of the block: its query channels, running output, max and sum.
    float query[GROUP][PER_LANE];
    float acc[GROUP][PER_LANE];
    float running_max[GROUP];
    float running_sum[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        // Where head first_head + g's vector starts in the rows.
        const size_t at = query_id * row_width + (size_t)(first_head + g) * head_dim;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const int c = lane + 32 * i;
            acc[g][i] = 0.0f;
            query[g][i] =
                c < head_dim ? turned_query(q, cos, sin, at, angles, c, half, scale) : 0.0f;
        }
        running_max[g] = -CUDART_INF_F;
        running_sum[g] = 0.0f;
    }
    // Warp-uniform: every lane of a warp takes the same groups and positions.
    for (int64_t start = lo + (int64_t)warp * IN_FLIGHT; start <= hi;
         start += WARPS * IN_FLIGHT) {
        // Every load unconditional, as stored, and converted only after all of them are issued,
        // the keys' first (the scores need them first): a predicated load converted at once
        // makes the compiler wait on it before the next one (seen in the sm_90 SASS of the bf16
        // forms: 6 memory round trips per group instead of 1). A position past the chunk
        // re-reads its last row and a channel past the head its last channel; neither is ever
        // used (the weights skip dead positions, and channels past the head are scored against
        // a query of 0 and not written out).
        T key_raw[IN_FLIGHT][PER_LANE];
        T value_raw[IN_FLIGHT][PER_LANE];
        size_t row[IN_FLIGHT];
        row_starts(row, slot_blocks, slot, kv_head, kv_heads, block, start, hi, head_dim);
        load_rows(keys, key_raw, row, lane, head_dim);
        load_rows(values, value_raw, row, lane, head_dim);
        float key[IN_FLIGHT][PER_LANE];
        float value[IN_FLIGHT][PER_LANE];
#pragma unroll
        for (int p = 0; p < IN_FLIGHT; ++p) {
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                key[p][i] = to_float(key_raw[p][i]);
                value[p][i] = to_float(value_raw[p][i]);
            }
        }
        // score[g][p]: head g's score of position start + p, summed over the warp as soon as it
        // is made (summing them all at the end, or several at once, makes the compiler wait on
        // the loads in two to four rounds instead of one: sm_90 SASS).
        float score[GROUP][IN_FLIGHT];
#pragma unroll
        for (int p = 0; p < IN_FLIGHT; ++p) {
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < PER_LANE; ++i) dot += query[g][i] * key[p][i];
                score[g][p] = warp_sum(dot);
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float new_max = running_max[g];
#pragma unroll
            for (int p = 0; p < IN_FLIGHT; ++p) {
                if (start + p <= hi) new_max = fmaxf(new_max, score[g][p]);
            }
            const float rescale = __expf(running_max[g] - new_max);
            running_sum[g] *= rescale;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) acc[g][i] *= rescale;
#pragma unroll
            for (int p = 0; p < IN_FLIGHT; ++p) {
                if (start + p > hi) continue;
                const float weight = __expf(score[g][p] - new_max);
                running_sum[g] += weight;
#pragma unroll
                for (int i = 0; i < PER_LANE; ++i) acc[g][i] += weight * value[p][i];
            }
            running_max[g] = new_max;
        }
    }

    __shared__ float warp_max[WARPS][GROUP];
    __shared__ float warp_sum_of[WARPS][GROUP];
    __shared__ float warp_acc[WARPS][GROUP][32 * PER_LANE];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        if (lane == 0) {
            warp_max[warp][g] = running_max[g];
            warp_sum_of[warp][g] = running_sum[g];
        }
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const int c = lane + 32 * i;
            if (c < head_dim) warp_acc[warp][g][c] = acc[g][i];
        }
    }
    __syncthreads();
    // Warp w writes heads w, w + WARPS, ... of the block.
    for (int g = warp; g < GROUP; g += WARPS) {
        float overall_max = -CUDART_INF_F;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) overall_max = fmaxf(overall_max, warp_max[w][g]);
        float total = 0.0f;
        float factor[WARPS];
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            // A warp that saw no position holds -inf and contributes nothing.
            factor[w] = chunk_weight(warp_max[w][g], overall_max);
            total += warp_sum_of[w][g] * factor[w];
        }
        const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
        const size_t query_head = query_id * heads + first_head + g;
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
            for (int w = 0; w < WARPS; ++w) sum += warp_acc[w][g][c] * factor[w];
            if constexpr (SPLIT) {
                record[2 + c] = sum;
            } else {
                written[query_head * head_dim + c] = from_float<T>(sum * inverse);
            }
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

// Prompt tiles: 2 to TILE_QUERIES consecutive tokens of one slot at consecutive positions (a prompt
// chunk's), listed in tiles [tiles, 2] of (first query, count); the pass's other tokens (a decoding
// sequence's, an idle slot's) are left to the per-token kernels, launched after this one over a
// list of them. One block per (tile, head), the heads of a tile adjacent. The block turns its
// queries into shared memory, then walks the union of their spans TILE_KEYS positions at a time:
// all its threads load those keys and values into shared memory once for the whole tile (the
// per-token kernels read each key once per token: 16 times as much for a prompt). Warp w holds
// queries 4w..4w+3 of the tile: lane j scores position j against all four at once (one key channel
// read per four products), and each query folds the scores its own span admits into its online
// softmax. Heads up to TILE_HEAD channels (the shared arrays: 41 KB).
#define TILE_QUERIES 16
#define QUERIES_PER_WARP 4
#define TILE_KEYS 32
#define TILE_HEAD 128
static_assert(TILE_QUERIES == WARPS * QUERIES_PER_WARP && QUERIES_PER_WARP == 4,
              "a warp's queries are the four components of a float4");

template <typename T>
__device__ void tiled_attention(const T *__restrict__ q, const T *__restrict__ cos,
                                const T *__restrict__ sin, const T *__restrict__ keys,
                                const T *__restrict__ values, T *__restrict__ out,
                                const uint32_t *__restrict__ spans,
                                const uint32_t *__restrict__ tiles,
                                const uint32_t *__restrict__ blocks, int heads, int kv_heads,
                                int table_width, int block, int head_dim, int row_width,
                                float scale) {
    // Warp w's four queries, channel c: component k of tile_query[w][c] is query 4w + k's.
    __shared__ float4 tile_query[WARPS][TILE_HEAD];
    // One column of padding: lane j reads row j, channel c, at bank (j + c) mod 32.
    __shared__ float tile_key[TILE_KEYS][TILE_HEAD + 1];
    __shared__ float tile_value[TILE_KEYS][TILE_HEAD];
    const int head = blockIdx.x % heads;
    const size_t tile = blockIdx.x / heads;
    const size_t first_query = tiles[2 * tile];
    const int count = tiles[2 * tile + 1];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kv_head = head / (heads / kv_heads);
    const int half = head_dim / 2;
    const size_t slot = spans[3 * first_query];
    const uint32_t *slot_blocks = slot_blocks_of(blocks, slot, table_width);

    // The union lo..=hi of the tile's spans (empty when every span is).
    int64_t lo = INT64_MAX, hi = -1;
    for (int r = 0; r < count; ++r) {
        const int64_t first = spans[3 * (first_query + r) + 1];
        const int64_t last = spans[3 * (first_query + r) + 2];
        if (first > last) continue;
        lo = first < lo ? first : lo;
        hi = last > hi ? last : hi;
    }
    // The queries, zeros past the tile's count: warp w turns rows w, w + WARPS, ..., lane l its
    // channels l, l + 32, ... (no division by the head width per element).
    for (int r = warp; r < TILE_QUERIES; r += WARPS) {
        const size_t query = first_query + r;
        const size_t at = query * row_width + (size_t)head * head_dim;
        for (int c = lane; c < head_dim; c += 32) {
            reinterpret_cast<float *>(&tile_query[r / QUERIES_PER_WARP][c])[r % QUERIES_PER_WARP] =
                r < count ? turned_query(q, cos, sin, at, query * half, c, half, scale) : 0.0f;
        }
    }

    // This warp's queries' spans (an empty one past the tile's count) and softmax states.
    int64_t first[QUERIES_PER_WARP], last[QUERIES_PER_WARP];
    float running_max[QUERIES_PER_WARP], running_sum[QUERIES_PER_WARP];
    float acc[QUERIES_PER_WARP][TILE_HEAD / 32];
#pragma unroll
    for (int k = 0; k < QUERIES_PER_WARP; ++k) {
        const int r = warp * QUERIES_PER_WARP + k;
        first[k] = r < count ? (int64_t)spans[3 * (first_query + r) + 1] : 1;
        last[k] = r < count ? (int64_t)spans[3 * (first_query + r) + 2] : 0;
        running_max[k] = -CUDART_INF_F;
        running_sum[k] = 0.0f;
#pragma unroll
        for (int i = 0; i < TILE_HEAD / 32; ++i) acc[k][i] = 0.0f;
    }

    for (int64_t start = lo; start <= hi; start += TILE_KEYS) {
        const int rows = hi - start + 1 < TILE_KEYS ? int(hi - start + 1) : TILE_KEYS;
        // The previous keys and values are read (and, the first time, the queries written).
        __syncthreads();
        // Warp w loads rows w, w + WARPS, ...: a row's loads all issued (unconditional, as
        // stored; a channel past the head re-reads the last one) before any is converted, so
        // they are in flight together.
        for (int j = warp; j < rows; j += WARPS) {
            const size_t row =
                kv_row(slot_blocks, slot, start + j, kv_head, kv_heads, block, head_dim);
            T key_raw[TILE_HEAD / 32];
            T value_raw[TILE_HEAD / 32];
#pragma unroll
            for (int i = 0; i < TILE_HEAD / 32; ++i) {
                const int c = min(lane + 32 * i, head_dim - 1);
                key_raw[i] = keys[row + c];
                value_raw[i] = values[row + c];
            }
#pragma unroll
            for (int i = 0; i < TILE_HEAD / 32; ++i) {
                const int c = lane + 32 * i;
                if (c >= head_dim) continue;
                tile_key[j][c] = to_float(key_raw[i]);
                tile_value[j][c] = to_float(value_raw[i]);
            }
        }
        __syncthreads();
        // Warp-uniform: which of the warp's queries see any of these positions.
        bool sees[QUERIES_PER_WARP];
        bool any = false;
#pragma unroll
        for (int k = 0; k < QUERIES_PER_WARP; ++k) {
            sees[k] = first[k] <= last[k] && start <= last[k] && start + rows - 1 >= first[k];
            any = any || sees[k];
        }
        if (!any) continue;
        float dot[QUERIES_PER_WARP] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (lane < rows) {
            for (int c = 0; c < head_dim; ++c) {
                const float key = tile_key[lane][c];
                const float4 query = tile_query[warp][c];
                dot[0] += query.x * key;
                dot[1] += query.y * key;
                dot[2] += query.z * key;
                dot[3] += query.w * key;
            }
        }
        float weight[QUERIES_PER_WARP];
#pragma unroll
        for (int k = 0; k < QUERIES_PER_WARP; ++k) {
            weight[k] = 0.0f;
            if (!sees[k]) continue;
            // Inside the query's span, so inside the rows loaded (last ≤ hi).
            const int64_t position = start + lane;
            const bool live = position >= first[k] && position <= last[k];
            const float score = live ? dot[k] : -CUDART_INF_F;
            const float new_max = fmaxf(running_max[k], warp_max(score));
            const float rescale = chunk_weight(running_max[k], new_max);
            weight[k] = live ? __expf(score - new_max) : 0.0f;
            running_sum[k] = running_sum[k] * rescale + warp_sum(weight[k]);
#pragma unroll
            for (int i = 0; i < TILE_HEAD / 32; ++i) acc[k][i] *= rescale;
            running_max[k] = new_max;
        }
        for (int j = 0; j < rows; ++j) {
            float w[QUERIES_PER_WARP];
#pragma unroll
            for (int k = 0; k < QUERIES_PER_WARP; ++k) {
                w[k] = __shfl_sync(0xffffffffu, weight[k], j);
            }
#pragma unroll
            for (int i = 0; i < TILE_HEAD / 32; ++i) {
                const int c = lane + 32 * i;
                if (c >= head_dim) continue;
                const float value = tile_value[j][c];
#pragma unroll
                for (int k = 0; k < QUERIES_PER_WARP; ++k) acc[k][i] += w[k] * value;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < QUERIES_PER_WARP; ++k) {
        const int r = warp * QUERIES_PER_WARP + k;
        if (r >= count) continue;
        const float inverse = running_sum[k] > 0.0f ? 1.0f / running_sum[k] : 0.0f;
        const size_t out_at = ((first_query + r) * heads + head) * head_dim;
#pragma unroll
        for (int i = 0; i < TILE_HEAD / 32; ++i) {
            const int c = lane + 32 * i;
            if (c < head_dim) out[out_at + c] = from_float<T>(acc[k][i] * inverse);
        }
    }
}

// Block b attends for head group b % groups of chunk (b / groups) % splits of query i =
// b / (groups · splits), groups = heads / GROUP: the pass's query i, or with a list of `tokens`
// (the decoding tokens of a pass that also prefills, whose prompt tiles the tiled kernel takes)
// query tokens[i].
#define ATTENTION_ENTRY(NAME, T, PER_LANE, GROUP, W, SPLIT)                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        NAME(const T *q, const T *cos, const T *sin, const T *keys, const T *values, W *written,  \
             const uint32_t *spans, const uint32_t *tokens, const uint32_t *blocks, int heads,    \
             int kv_heads, int table_width, int block, int head_dim, int row_width, int splits,   \
             int chunk, float scale) {                                                             \
        const int groups = heads / GROUP;                                                          \
        const size_t index = blockIdx.x / groups / splits;                                         \
        cached_attention<T, PER_LANE, GROUP, W, SPLIT>(                                           \
            q, cos, sin, keys, values, written, spans, blocks, tokens ? tokens[index] : index,     \
            blockIdx.x % groups, (blockIdx.x / groups) % splits, heads, kv_heads, table_width,     \
            block, head_dim, row_width, splits, chunk, scale);                                     \
    }

#define ATTENTION_ENTRIES(T, PER_LANE, GROUP, SUFFIX)                                              \
    ATTENTION_ENTRY(cached_attention_##SUFFIX, T, PER_LANE, GROUP, T, false)                       \
    ATTENTION_ENTRY(cached_attention_split_##SUFFIX, T, PER_LANE, GROUP, float, true)

// Per storage type: the per-token attention kernels, whole and split, for heads up to 128 wide
// one, two or four query heads to a block (g2_, g4_) and for heads up to 256 one (wide_); the
// merging kernel; and the tiled kernel (heads up to 128).
#define CACHED_ATTENTION(T, SUFFIX)                                                                \
    ATTENTION_ENTRIES(T, 4, 1, SUFFIX)                                                             \
    ATTENTION_ENTRIES(T, 4, 2, g2_##SUFFIX)                                                        \
    ATTENTION_ENTRIES(T, 4, 4, g4_##SUFFIX)                                                        \
    ATTENTION_ENTRIES(T, 8, 1, wide_##SUFFIX)                                                      \
    extern "C" __global__ void __launch_bounds__(MERGE_THREADS) cached_attention_merge_##SUFFIX(  \
        const float *partial, T *out, int splits, int head_dim) {                                 \
        merge_split_attention<T>(partial, out, splits, head_dim);                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) cached_attention_tiled_##SUFFIX(     \
        const T *q, const T *cos, const T *sin, const T *keys, const T *values, T *out,           \
        const uint32_t *spans, const uint32_t *tiles, const uint32_t *blocks, int heads,          \
        int kv_heads, int table_width, int block, int head_dim, int row_width, float scale) {     \
        tiled_attention<T>(q, cos, sin, keys, values, out, spans, tiles, blocks, heads, kv_heads, \
                           table_width, block, head_dim, row_width, scale);                       \
    }

CACHED_ATTENTION(float, f32)
CACHED_ATTENTION(__nv_bfloat16, bf16)
CACHED_ATTENTION(__half, f16)
