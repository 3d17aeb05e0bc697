#include "sampling.cu"
#include "kernels.h"

#define SAMPLE_ROWS_EMULATED(NAME, T)                                                              \
    EMULATED(NAME,                                                                                 \
             PARAMS(const T *logits, const float *uniforms, float *out, int vocab,                 \
                    float temperature, int top_k, float top_p, float floor_nats, int steps),       \
             PARAMS(logits, uniforms, out, vocab, temperature, top_k, top_p, floor_nats, steps))

SAMPLE_ROWS_EMULATED(sample_rows_f32, float)
SAMPLE_ROWS_EMULATED(sample_rows_bf16, __nv_bfloat16)
SAMPLE_ROWS_EMULATED(sample_rows_f16, __half)
