#include "optimizer.cu"
#include "kernels.h"

EMULATED(optimizer_moments)
EMULATED(optimizer_param)
