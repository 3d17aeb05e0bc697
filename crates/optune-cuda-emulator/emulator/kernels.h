// The C entry points the Rust side calls, one per kernel instantiation (EMULATED(name)): each takes
// the launch's grid and block sizes (one-dimensional, as every kernel of this project is launched),
// the order to run blocks and threads in (see launch_erased) and the kernel's arguments as a CUDA launch passes them to the driver (cuLaunchKernel's
// kernelParams): a pointer to each argument's bytes. The driver copies as many bytes as the
// kernel's parameter takes and reads them as its type, whatever the caller meant; here each
// argument's size and kind (pointer, signed or unsigned integer, float) must also be the
// parameter's, so that an argument list that would launch wrongly on a GPU is an error, not a
// misread value.

#pragma once

#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emulator.h"

// One argument's bytes as the caller holds them, its size and its kind: 'p' a pointer, 'i' a
// signed integer, 'u' an unsigned one, 'f' a float.
struct EmulatedArgument {
    const void *bytes;
    size_t size;
    char kind;
};

namespace emu {

template <typename P> constexpr char kind_of() {
    return std::is_pointer<P>::value          ? 'p'
           : std::is_floating_point<P>::value ? 'f'
           : std::is_signed<P>::value         ? 'i'
                                              : 'u';
}

template <typename P> P read_argument(const EmulatedArgument &argument) {
    P value;
    std::memcpy(&value, argument.bytes, sizeof value);
    return value;
}

template <typename... P, size_t... I>
int launch_unpacked(const char *name, unsigned grid, unsigned block, bool reversed,
                    void (*kernel)(P...), const EmulatedArgument *arguments,
                    std::index_sequence<I...>) {
    std::tuple<P...> values{read_argument<P>(arguments[I])...};
    return launch(name, {grid, 1, 1}, {block, 1, 1}, reversed,
                  [&] { std::apply(kernel, values); });
}

template <typename... P>
int launch_packed(const char *name, unsigned grid, unsigned block, bool reversed,
                  void (*kernel)(P...), const EmulatedArgument *arguments, int count) {
    static_assert(sizeof...(P) > 0, "every kernel takes arguments");
    constexpr size_t sizes[] = {sizeof(P)...};
    constexpr char kinds[] = {kind_of<P>()...};
    if (count != int(sizeof...(P))) {
        return refuse(std::string(name) + ": " + std::to_string(count) + " arguments for " +
                      std::to_string(sizeof...(P)) + " parameters");
    }
    for (size_t i = 0; i < sizeof...(P); ++i) {
        if (arguments[i].size != sizes[i] || arguments[i].kind != kinds[i]) {
            return refuse(std::string(name) + ": argument " + std::to_string(i) + " is " +
                          std::to_string(arguments[i].size) + " bytes of kind '" +
                          arguments[i].kind + "' for a parameter of " +
                          std::to_string(sizes[i]) + " bytes of kind '" + kinds[i] + "'");
        }
    }
    return launch_unpacked(name, grid, block, reversed, kernel, arguments,
                           std::index_sequence_for<P...>{});
}

}  // namespace emu

#define EMULATED(NAME)                                                                             \
    extern "C" int optune_emu_##NAME(unsigned grid, unsigned block, int reversed,                  \
                                     const EmulatedArgument *arguments, int count) {               \
        return emu::launch_packed(#NAME, grid, block, reversed != 0, &NAME, arguments, count);    \
    }
