// The CUDA toolkit header math_constants.h, as far as the emulator provides it.
#pragma once
#include "../emulator.h"
