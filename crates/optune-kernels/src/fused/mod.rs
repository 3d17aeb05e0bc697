//! Fused CPU kernels with their own backward for the training path.
//!
//! Each op is a candle `CustomOp` whose `bwd` returns the gradients of its inputs, so autograd sees
//! one node where the generic version builds several to tens (and candle's backward pays a zeroed
//! buffer and an add for every input of every node), and the forward makes one pass over memory
//! instead of one per elementwise op. The ops run on the CPU in f32 (row kernels compiled for
//! AVX2/FMA when the CPU has them, matrix products by `gemm`, the crate candle itself uses) and f64
//! (for gradient checks); [`crate::ops`] takes the generic form on other devices and dtypes, which
//! is also what the tests compare against (f64 finite differences for every op, f32 against the
//! generic ops). A CUDA kernel can slot in behind the same op boundary (`cuda_fwd`).
//!
//! * [`token_logprobs`]: `log softmax(rows · Wᵀ)[target]` per row, in chunks of rows so that only
//!   one `chunk × vocab` block of logits ever exists; the backward recomputes each block's logits.
//! * [`rms_norm`], [`silu_mul`] (the SwiGLU gate), [`linear`] (`x · Wᵀ` as one node).
//! * [`rotary_heads`]: the split of a projection into heads fused with the rotary embedding.
//! * [`attention`]: grouped-query `softmax(scale · q kᵀ + mask) v`; scores and probabilities exist
//!   one (batch, KV head) block at a time and are recomputed by the backward.
//! * [`rotary_heads_grad`], [`attention_grads`]: those two ops' backward passes as functions,
//!   for the node that keeps the projections alone and runs both ops inside
//!   ([`crate::ops::rotary_attention`], the training path's).

use crate::grad_buffers::{self, GradBuffer};
use crate::matmul::{
    matmul_bf16, matmul_bf16_packed, Bf16Source, Mat, PackedRhs, ProductPrecision,
};
use crate::storage::contiguous;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use half::bf16;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

pub use attention::{attention, attention_grads};
pub use embedding::embedding;
pub use linear::linear;
pub use lora_linear::lora_linear;
pub use rms_norm::rms_norm;
pub use rotary::{rotary_heads, rotary_heads_grad};
pub use silu_mul::silu_mul;
pub use token_logprobs::{token_logprobs, KEPT_LOGITS_BYTES};

// ---------------------------------------------------------------------------------------------
// Element types and row kernels.

/// f32 or f64. The row kernels below are written once, generic over this trait; f32 runs them
/// compiled for AVX2+FMA when the CPU has it (see `dispatch!`), f64 (gradient checks) as they are.
trait Real:
    WithDType
    + Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// `e^x`: the library's for f64, [`crate::simd::exp_f32`] (a polynomial that vectorises) for
    /// f32.
    fn exp_fast(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// The values of a storage made by [`Real::storage`].
    fn storage_values(s: CpuStorage) -> Option<Vec<Self>>;

    /// `ln Σ e^x` of a row.
    fn log_sum_exp(row: &[Self]) -> Self;
}

/// `Real` for one float type; the two differ in `exp` and `ln Σ e^x` alone.
macro_rules! impl_real {
    ($t:ident, $variant:ident, exp: $exp:expr, log_sum_exp: $lse:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = $t::NEG_INFINITY;
            #[allow(clippy::unnecessary_cast)]
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                $t::ln(self)
            }
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn storage_values(s: CpuStorage) -> Option<Vec<Self>> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn log_sum_exp(row: &[Self]) -> Self {
                $lse(row)
            }
        }
    };
}

impl_real!(f64, F64, exp: f64::exp, log_sum_exp: kernels::log_sum_exp::<f64>);
// f32 sums the exponentials with the host kernel (f64 partial sums in a fixed order), shared
// with the sampler.
impl_real!(f32, F32, exp: crate::simd::exp_f32, log_sum_exp: |row: &[f32]| {
    crate::host::log_sum_exp(row) as f32
});

/// The row kernels, generic; written so that LLVM vectorises them (independent lanes instead of
/// ordered float reductions).
mod kernels {
    use super::Real;

    const LANES: usize = 16;

    #[inline(always)]
    pub fn max<T: Real>(row: &[T]) -> T {
        let mut acc = [T::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        tail.iter()
            .chain(&acc)
            .fold(T::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }

    #[inline(always)]
    pub fn sum<T: Real>(row: &[T]) -> T {
        let mut acc = [T::ZERO; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += c[i];
            }
        }
        tail.iter().chain(&acc).fold(T::ZERO, |s, &x| s + x)
    }

    /// `Σ a·b`.
    #[inline(always)]
    pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
        let mut acc = [T::ZERO; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .fold(T::ZERO, |s, (&x, &y)| s + x * y);
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().fold(tail, |s, &x| s + x)
    }

    #[inline(always)]
    pub fn sum_exp<T: Real>(row: &[T], shift: T) -> T {
        let mut acc = [T::ZERO; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += (c[i] - shift).exp_fast();
            }
        }
        tail.iter()
            .map(|&x| (x - shift).exp_fast())
            .chain(acc)
            .fold(T::ZERO, |s, x| s + x)
    }

    /// `ln Σ e^x`; f64 only (gradient checks): f32 takes [`crate::host::log_sum_exp`].
    #[inline(always)]
    pub fn log_sum_exp<T: Real>(row: &[T]) -> T {
        let max = max(row);
        max + sum_exp(row, max).ln()
    }

    /// `row ← scale · e^(row − shift)`.
    #[inline(always)]
    pub fn scaled_exp<T: Real>(row: &mut [T], shift: T, scale: T) {
        for x in row.iter_mut() {
            *x = scale * (*x - shift).exp_fast();
        }
    }

    /// `dst = softmax(scale · src + mask)`.
    #[inline(always)]
    pub fn softmax<T: Real>(src: &[T], mask: &[T], scale: T, dst: &mut [T]) {
        for ((d, &s), &m) in dst.iter_mut().zip(src).zip(mask) {
            *d = scale * s + m;
        }
        let max = max(dst);
        for d in dst.iter_mut() {
            *d = (*d - max).exp_fast();
        }
        let inv = T::ONE / sum(dst);
        for d in dst.iter_mut() {
            *d *= inv;
        }
    }

    #[inline(always)]
    fn sigmoid<T: Real>(x: T) -> T {
        T::ONE / (T::ONE + (-x).exp_fast())
    }

    /// `out = silu(gate) · up`, `silu(x) = x σ(x)`.
    #[inline(always)]
    pub fn silu_mul<T: Real>(gate: &[T], up: &[T], out: &mut [T]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }

    /// Gradients of `silu(gate) · up`: `∂gate = grad · up · σ(gate)(1 + gate(1 − σ(gate)))`,
    /// `∂up = grad · silu(gate)`.
    #[inline(always)]
    pub fn silu_mul_grad<T: Real>(
        gate: &[T],
        up: &[T],
        grad: &[T],
        d_gate: &mut [T],
        d_up: &mut [T],
    ) {
        for i in 0..gate
            .len()
            .min(up.len())
            .min(grad.len())
            .min(d_gate.len())
            .min(d_up.len())
        {
            let (g, u, dy) = (gate[i], up[i], grad[i]);
            let s = sigmoid(g);
            d_gate[i] = dy * u * s * (T::ONE + g * (T::ONE - s));
            d_up[i] = dy * g * s;
        }
    }
}

/// The row kernels' entry points, compiled for the widest instruction set of this CPU.
mod simd {
    use super::{kernels, Real};
    use crate::simd::with_widest_isa;

    with_widest_isa!(pub scaled_exp<T: Real> => kernels::scaled_exp::<T>; (row: &mut [T], shift: T, scale: T) -> ());
    with_widest_isa!(pub softmax<T: Real> => kernels::softmax::<T>; (src: &[T], mask: &[T], scale: T, dst: &mut [T]) -> ());
    with_widest_isa!(pub silu_mul<T: Real> => kernels::silu_mul::<T>; (gate: &[T], up: &[T], out: &mut [T]) -> ());
    with_widest_isa!(pub silu_mul_grad<T: Real> => kernels::silu_mul_grad::<T>;
        (gate: &[T], up: &[T], grad: &[T], d_gate: &mut [T], d_up: &mut [T]) -> ());
}

// ---------------------------------------------------------------------------------------------
// Storage access and matrix products.

/// Whether f32 data takes bf16 products (the process asked for them).
fn bf16_f32_products(s: &CpuStorage) -> bool {
    s.dtype() == DType::F32 && crate::matmul::f32_product_precision() == ProductPrecision::Bf16
}

/// f32 results of a bf16 op, rounded to bf16 storage.
fn bf16_storage(values: &[f32]) -> CpuStorage {
    CpuStorage::BF16(values.par_iter().map(|&x| bf16::from_f32(x)).collect())
}

/// Returns early from a `cpu_fwd` whose inputs are bf16 and whose op has no bf16 kernel: the
/// op's f32 kernel runs on widened copies (exact) and its result is rounded to bf16. These ops
/// are elementwise or per row (norms, gates, rotary, attention one head at a time), so the
/// copies cost a pass over memory, small next to the products, which have bf16 kernels
/// ([`LinearOp`], [`TokenLogprobs`]).
macro_rules! through_f32 {
    ($op:expr, ($s1:expr, $l1:expr) $(, ($s:expr, $l:expr))*) => {
        if $s1.dtype() == DType::BF16 {
            let widen = |s: &CpuStorage, l: &Layout| -> Result<(CpuStorage, Layout)> {
                Ok((s.to_dtype(l, DType::F32)?, Layout::contiguous(l.shape())))
            };
            let (out, shape) = $op.cpu_fwd(
                &widen($s1, $l1)?.0, &Layout::contiguous($l1.shape())
                $(, &widen($s, $l)?.0, &Layout::contiguous($l.shape()))*
            )?;
            return Ok((out.to_dtype(&Layout::contiguous(&shape), DType::BF16)?, shape));
        }
    };
}

/// `$run::<f32>(..)` or `$run::<f64>(..)` by `$dtype`, else an error naming `$op`.
macro_rules! by_dtype {
    ($op:expr, $dtype:expr, $run:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $run::<f32>($($arg),*)?,
            DType::F64 => $run::<f64>($($arg),*)?,
            other => bail!("{}: dtype {other:?} is not supported (f32, f64)", $op.name()),
        }
    };
}

/// `dst [m, n] (row-major) = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n]`, on rayon's pool;
/// f32 products in bf16 when the process asked for it ([`crate::matmul::ProductPrecision`]).
fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && crate::matmul::f32_product_precision() == ProductPrecision::Bf16
    {
        // SAFETY: T is f32 (checked above), so the buffer and operands are f32 data.
        let (dst, lhs, rhs) = unsafe {
            let dst = std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len());
            (dst, lhs.cast::<f32>(), rhs.cast::<f32>())
        };
        return matmul_bf16(m, n, k, dst, accumulate, lhs, rhs);
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_with(m, n, k, dst, accumulate, lhs, rhs, parallelism)
}

/// [`matmul`] on the calling thread (inside a parallel task).
fn matmul_serial<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    gemm_with(m, n, k, dst, accumulate, lhs, rhs, gemm::Parallelism::None)
}

#[allow(clippy::too_many_arguments)]
fn gemm_with<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    parallelism: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n);
    // SAFETY: dst holds m × n elements; the operands' strides were built from slices that hold
    // m × k and k × n elements (checked by the callers' shape checks).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { T::ONE } else { T::ZERO },
            T::ONE,
            false,
            false,
            false,
            parallelism,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Shared by the ops.

/// Elements per parallel task of the elementwise ops.
const ELEMENT_BLOCK: usize = 16 * 1024;

/// Which inputs of a two-input op need a gradient: those that track an op, i.e. lead back to a
/// variable. A frozen weight (LoRA's base, the reference) gets none, which saves its product.
#[derive(Clone, Copy)]
struct Wanted {
    first: bool,
    second: bool,
}

impl Wanted {
    fn of(first: &Tensor, second: &Tensor) -> Self {
        Self {
            first: first.track_op(),
            second: second.track_op(),
        }
    }

    fn none(self) -> bool {
        !self.first && !self.second
    }

    /// Elements of the packed gradients `[first | second]` (the unwanted part left out).
    fn packed_len(self, first: usize, second: usize) -> usize {
        (if self.first { first } else { 0 }) + (if self.second { second } else { 0 })
    }

    /// Splits packed gradients into those of `first` and `second`.
    fn unpack(
        self,
        packed: &Tensor,
        first: &Tensor,
        second: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = if self.first { first.elem_count() } else { 0 };
        let a = if self.first {
            Some(packed.narrow(0, 0, n)?.reshape(first.shape())?)
        } else {
            None
        };
        let b = if self.second {
            Some(
                packed
                    .narrow(0, n, second.elem_count())?
                    .reshape(second.shape())?,
            )
        } else {
            None
        };
        Ok((a, b))
    }
}

/// Both gradients of a two-input op: `grad_op` over `(a, b, grad)` writes them as one packed
/// `[∂a | ∂b]` buffer.
fn both_grads(
    a: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    grad_op: &impl CustomOp3,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let packed = a
        .detach()
        .apply_op3_no_bwd(&b.detach(), &grad.detach().contiguous()?, grad_op)?;
    let both = Wanted {
        first: true,
        second: true,
    };
    both.unpack(&packed, a, b)
}

// The ops, one module each: declared after the macros above (`by_dtype!`, `through_f32!`), which
// they use.
mod attention;
mod embedding;
mod linear;
mod lora_linear;
mod rms_norm;
mod rotary;
mod silu_mul;
#[cfg(test)]
pub(crate) mod tests;
mod token_logprobs;
