#include "cached_attention.cu"
#include "kernels.h"

EMULATED(cached_attention_f32)
EMULATED(cached_attention_bf16)
EMULATED(cached_attention_f16)
