#include "cached_attention.cu"
#include "kernels.h"

#define CACHED_ATTENTION_EMULATED(NAME, T)                                                         \
    EMULATED(NAME,                                                                                 \
             PARAMS(const T *q, const T *cos, const T *sin, const T *keys, const T *values,        \
                    T *out, const uint32_t *spans, int heads, int kv_heads, int capacity,          \
                    int head_dim, int row_width, float scale),                                     \
             PARAMS(q, cos, sin, keys, values, out, spans, heads, kv_heads, capacity, head_dim,   \
                    row_width, scale))

CACHED_ATTENTION_EMULATED(cached_attention_f32, float)
CACHED_ATTENTION_EMULATED(cached_attention_bf16, __nv_bfloat16)
CACHED_ATTENTION_EMULATED(cached_attention_f16, __half)
