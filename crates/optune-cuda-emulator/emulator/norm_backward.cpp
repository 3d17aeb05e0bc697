#include "norm_backward.cu"
#include "kernels.h"

EMULATED(rms_norm_backward_f32)
EMULATED(rms_norm_backward_bf16)
EMULATED(rms_norm_backward_f16)
