// A forward pass's new keys and values written into a layer's KV cache in place, the keys turned
// by their rotary angle on the way (see src/cache_write.rs, whose CPU form is the specification).
// store [2, blocks, kv_heads, block, d]: keys, then values, the positions found through the block
// table `blocks` [slots, table_width] or, without one, block s being slot s's (kv_blocks.cuh). Token
// i's key and value are
// kv_heads·d columns of rows [tokens, row_width] (the projections' output) from columns k_at and
// v_at; cos, sin [tokens, d/2]; spans [tokens, 3] of (slot, first, last), the token's own position
// being `last`. One thread per (token, KV head, channel pair), grid-striding;
// the rotation in f32, rounded once to T.

#include "dtypes.cuh"
#include "kv_blocks.cuh"
#include <stdint.h>

template <typename T>
__device__ void cache_write_rotated(T *__restrict__ store, const T *__restrict__ rows,
                                    const T *__restrict__ cos, const T *__restrict__ sin,
                                    const uint32_t *__restrict__ spans,
                                    const uint32_t *__restrict__ blocks, uint64_t tokens,
                                    int cache_blocks, int table_width, int kv_heads, int block,
                                    int head_dim, int row_width, int k_at, int v_at) {
    const int half = head_dim / 2;
    const uint64_t n = tokens * kv_heads * half;
    const size_t values = (size_t)cache_blocks * kv_heads * block * head_dim;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const int c = i % half;
        const int head = (i / half) % kv_heads;
        const uint64_t token = i / half / kv_heads;
        const size_t slot = spans[3 * token];
        const size_t position = spans[3 * token + 2];
        const size_t from = token * row_width + (size_t)head * head_dim + c;
        const T *k = rows + k_at + from;
        const T *v = rows + v_at + from;
        const size_t to =
            kv_row(slot_blocks_of(blocks, slot, table_width), slot, position, head, kv_heads, block,
                   head_dim) +
            c;
        const float k1 = to_float(k[0]), k2 = to_float(k[half]);
        const float cs = to_float(cos[token * half + c]), sn = to_float(sin[token * half + c]);
        store[to] = from_float<T>(__fsub_rn(__fmul_rn(k1, cs), __fmul_rn(k2, sn)));
        store[to + half] = from_float<T>(__fadd_rn(__fmul_rn(k1, sn), __fmul_rn(k2, cs)));
        store[values + to] = v[0];
        store[values + to + half] = v[half];
    }
}

#define CACHE_WRITE(NAME, T)                                                                       \
    extern "C" __global__ void NAME(T *store, const T *rows, const T *cos, const T *sin,           \
                                    const uint32_t *spans, const uint32_t *blocks, uint64_t tokens, \
                                    int cache_blocks, int table_width, int kv_heads, int block,    \
                                    int head_dim, int row_width, int k_at, int v_at) {             \
        cache_write_rotated<T>(store, rows, cos, sin, spans, blocks, tokens, cache_blocks,         \
                               table_width, kv_heads, block, head_dim, row_width, k_at, v_at);     \
    }

CACHE_WRITE(cache_write_rotated_f32, float)
CACHE_WRITE(cache_write_rotated_bf16, __nv_bfloat16)
CACHE_WRITE(cache_write_rotated_f16, __half)
