#include "optimizer.cu"
#include "kernels.h"

#define OPTIMIZER_EMULATED(NAME, TARGET, A, B)                                                     \
    EMULATED(NAME,                                                                                 \
             PARAMS(TARGET, A, B, uint64_t n, int kind, float s0, float s1, float s2, float s3,    \
                    float s4, float s5, float s6),                                                 \
             PARAMS(target, a, b, n, kind, s0, s1, s2, s3, s4, s5, s6))

OPTIMIZER_EMULATED(optimizer_moments, float *target, const float *a, const float *b)
OPTIMIZER_EMULATED(optimizer_param, float *target, const float *a, const float *b)
