// The C entry points the Rust side calls: one per kernel instantiation, taking the launch's grid
// and block sizes (one-dimensional, as every kernel of this project is launched) and then the
// kernel's own arguments in its order.

#pragma once

#include "emulator.h"

#define EMULATED(NAME, SIGNATURE, ARGS)                                                               \
    extern "C" int optune_emu_##NAME(unsigned grid, unsigned block, SIGNATURE) {                      \
        return emu::launch(#NAME, {grid, 1, 1}, {block, 1, 1}, [&] { NAME(ARGS); });               \
    }
// A parenthesised list passed as one macro argument.
#define PARAMS(...) __VA_ARGS__
