// One optimiser step of one f32 parameter, in two in-place kernels (see src/optimizer.rs, whose
// StepRule holds the same arithmetic, line for line, as the CPU's): optimizer_moments updates the
// moment buffers [buffers, n] from the parameter (before its update) and the gradient, then
// optimizer_param updates the parameter from the gradient and the new moments. kind: 0 AdamW,
// 1 RMSprop, 2 RMSprop with momentum; s: its scalars in StepRule's field order.

#include <stdint.h>

// Every operation through an IEEE round-to-nearest intrinsic: the crate's kernels are built with
// --use_fast_math, which would contract a·b + c into one FMA and approximate `/` and sqrt, and the
// parameter would then drift from the CPU's and torch's by more than rounding.

__device__ __forceinline__ float lerp_torch(float start, float end, float weight) {
    const float diff = __fsub_rn(end, start);
    return fabsf(weight) < 0.5f ? __fadd_rn(start, __fmul_rn(weight, diff))
                                : __fsub_rn(end, __fmul_rn(diff, __fsub_rn(1.0f, weight)));
}

extern "C" __global__ void optimizer_moments(float *__restrict__ moments, const float *__restrict__ param,
                                             const float *__restrict__ grad, uint64_t n, int kind,
                                             float s0, float s1, float s2, float s3, float s4, float s5,
                                             float s6) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const float g = grad[i];
        if (kind == 0) {
            // s: decay_factor, avg_weight, beta2, sq_weight, bias_correction2_sqrt, eps, neg_step_size
            moments[i] = lerp_torch(moments[i], g, s1);
            const float v = moments[n + i];
            moments[n + i] = __fadd_rn(__fmul_rn(v, s2), __fmul_rn(__fmul_rn(s3, g), g));
        } else {
            // s: weight_decay, alpha, sq_weight, eps, momentum, neg_lr
            const float d = s0 != 0.0f ? __fadd_rn(g, __fmul_rn(s0, param[i])) : g;
            const float sq = __fadd_rn(__fmul_rn(moments[i], s1), __fmul_rn(__fmul_rn(s2, d), d));
            moments[i] = sq;
            if (kind == 2) {
                const float avg = __fadd_rn(__fsqrt_rn(sq), s3);
                moments[n + i] = __fadd_rn(__fmul_rn(moments[n + i], s4), __fdiv_rn(d, avg));
            }
        }
    }
}

extern "C" __global__ void optimizer_param(float *__restrict__ param, const float *__restrict__ grad,
                                           const float *__restrict__ moments, uint64_t n, int kind,
                                           float s0, float s1, float s2, float s3, float s4, float s5,
                                           float s6) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const float p = param[i];
        if (kind == 0) {
            const float decayed = __fmul_rn(p, s0);
            const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(moments[n + i]), s4), s5);
            param[i] = __fadd_rn(decayed, __fdiv_rn(__fmul_rn(s6, moments[i]), denom));
        } else if (kind == 2) {
            param[i] = __fadd_rn(p, __fmul_rn(s5, moments[n + i]));
        } else {
            const float d = s0 != 0.0f ? __fadd_rn(grad[i], __fmul_rn(s0, p)) : grad[i];
            const float avg = __fadd_rn(__fsqrt_rn(moments[i]), s3);
            param[i] = __fadd_rn(p, __fdiv_rn(__fmul_rn(s5, d), avg));
        }
    }
}
