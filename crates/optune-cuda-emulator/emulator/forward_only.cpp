#include "forward_only.cu"
#include "kernels.h"

#define FORWARD_ONLY_EMULATED(SUFFIX, T)                                                           \
    EMULATED(add_rms_norm_##SUFFIX,                                                                \
             PARAMS(const T *x, const T *delta, const T *weight, T *out, int rows, int hidden,     \
                    float eps),                                                                    \
             PARAMS(x, delta, weight, out, rows, hidden, eps))                                     \
    EMULATED(silu_mul_##SUFFIX, PARAMS(const T *gate_up, T *out, uint64_t n, int width),          \
             PARAMS(gate_up, out, n, width))

FORWARD_ONLY_EMULATED(f32, float)
FORWARD_ONLY_EMULATED(bf16, __nv_bfloat16)
FORWARD_ONLY_EMULATED(f16, __half)
