// The CUDA toolkit header cuda_fp16.h, as far as the emulator provides it.
#pragma once
#include "../emulator.h"
