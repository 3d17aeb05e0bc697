#include "sampling.cu"
#include "kernels.h"

EMULATED(sample_rows_f32)
EMULATED(sample_rows_bf16)
EMULATED(sample_rows_f16)
