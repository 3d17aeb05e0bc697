#include "cache_write.cu"
#include "kernels.h"

EMULATED(cache_write_rotated_f32)
EMULATED(cache_write_rotated_bf16)
EMULATED(cache_write_rotated_f16)
