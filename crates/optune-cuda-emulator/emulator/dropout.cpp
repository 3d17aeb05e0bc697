#include "dropout.cu"
#include "kernels.h"

EMULATED(dropout_f32)
EMULATED(dropout_bf16)
EMULATED(dropout_f16)
