#include "forward_only.cu"
#include "kernels.h"

EMULATED(add_rms_norm_f32)
EMULATED(silu_mul_f32)
EMULATED(head_rms_norm_f32)
EMULATED(add_rms_norm_bf16)
EMULATED(silu_mul_bf16)
EMULATED(head_rms_norm_bf16)
EMULATED(add_rms_norm_f16)
EMULATED(silu_mul_f16)
EMULATED(head_rms_norm_f16)
