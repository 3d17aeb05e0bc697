#include "cache_write.cu"
#include "kernels.h"

#define CACHE_WRITE_EMULATED(NAME, T)                                                              \
    EMULATED(NAME,                                                                                 \
             PARAMS(T *store, const T *rows, const T *cos, const T *sin, const uint32_t *spans,    \
                    uint64_t tokens, int slots, int kv_heads, int capacity, int head_dim,          \
                    int row_width, int k_at, int v_at),                                            \
             PARAMS(store, rows, cos, sin, spans, tokens, slots, kv_heads, capacity, head_dim,    \
                    row_width, k_at, v_at))

CACHE_WRITE_EMULATED(cache_write_rotated_f32, float)
CACHE_WRITE_EMULATED(cache_write_rotated_bf16, __nv_bfloat16)
CACHE_WRITE_EMULATED(cache_write_rotated_f16, __half)
