// The RMS norm's backward pass in one kernel (see src/norm_backward.rs, whose CPU form is the
// specification). For y = n · weight with n = x / rms(x), rms(x) = sqrt(mean(x²) + eps), and g the
// gradient at y, over rows x, g [rows, hidden]:
// * out[0] = ∂x = (g·weight − n · mean(g·weight·n)) / rms(x);
// * out[1] = g·n, when weight_rows is set: the rows whose column sums are ∂weight (taken by a
//   matrix product after the kernel, which reads them row by row).
// One block of THREADS threads per row; in f32, each output rounded once to T.

#include "dtypes.cuh"
#include <stdint.h>

#define THREADS 256

template <typename T>
__device__ void rms_norm_backward(const T *__restrict__ x, const T *__restrict__ weight,
                                  const T *__restrict__ grad, T *__restrict__ out, int rows,
                                  int hidden, float eps, int weight_rows) {
    const size_t row = blockIdx.x;
    const size_t at = row * hidden;
    // Σ x² and Σ g·weight·x over the row: mean(g·weight·n) is the second over rms(x)·hidden.
    float squares = 0.0f;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += THREADS) {
        const float v = to_float(x[at + i]);
        squares += v * v;
        dot += to_float(grad[at + i]) * to_float(weight[i]) * v;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        squares += __shfl_xor_sync(0xffffffffu, squares, offset);
        dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    }
    __shared__ float warp_squares[THREADS / 32];
    __shared__ float warp_dots[THREADS / 32];
    if (threadIdx.x % 32 == 0) {
        warp_squares[threadIdx.x / 32] = squares;
        warp_dots[threadIdx.x / 32] = dot;
    }
    __syncthreads();
    float total_squares = 0.0f;
    float total_dot = 0.0f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) {
        total_squares += warp_squares[w];
        total_dot += warp_dots[w];
    }
    const float inverse = 1.0f / sqrtf(total_squares / (float)hidden + eps);
    const float projection = total_dot * inverse / (float)hidden;
    T *x_grad = out + at;
    T *rows_out = out + (size_t)rows * hidden + at;
    for (int i = threadIdx.x; i < hidden; i += THREADS) {
        const float g = to_float(grad[at + i]);
        const float n = to_float(x[at + i]) * inverse;
        x_grad[i] = from_float<T>((g * to_float(weight[i]) - n * projection) * inverse);
        if (weight_rows) rows_out[i] = from_float<T>(g * n);
    }
}

#define NORM_BACKWARD(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS)                                          \
        rms_norm_backward_##SUFFIX(const T *x, const T *weight, const T *grad, T *out, int rows,   \
                                   int hidden, float eps, int weight_rows) {                       \
        rms_norm_backward<T>(x, weight, grad, out, rows, hidden, eps, weight_rows);                \
    }

NORM_BACKWARD(f32, float)
NORM_BACKWARD(bf16, __nv_bfloat16)
NORM_BACKWARD(f16, __half)
