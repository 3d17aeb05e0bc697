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
// Token log-probabilities through the vocabulary head.

/// `log softmax(rows · weightᵀ)[targets[i]]` for each row `i` of `rows [n, hidden]`, with
/// `weight [vocab, hidden]`: `[n]`, differentiable in both. At most `chunk × vocab` logits exist
/// at a time, in the forward and the backward pass. CPU, f32/f64, contiguous inputs.
pub fn token_logprobs(
    rows: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    // Logits kept for the backward pass save it recomputing them (a third of the head's
    // products), when a backward pass will come and they fit the bound.
    let differentiable = rows.track_op() || weight.track_op();
    let logits_bytes = rows.dim(0)? * weight.dim(0)? * rows.dtype().size_in_bytes().max(4);
    let op = TokenLogprobs {
        targets: targets.into(),
        chunk: chunk.max(1),
        kept: (differentiable && logits_bytes <= KEPT_LOGITS_BYTES).then(Default::default),
    };
    rows.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// The most logits (bytes) the head keeps from its forward pass for its backward pass; beyond
/// it the backward pass recomputes them a chunk at a time. SmolLM2's 4 pairs of ~255 tokens
/// are 200 MB.
pub const KEPT_LOGITS_BYTES: usize = 512 << 20;

/// The kept logits of the last backward pass, for the next forward pass to write into: at
/// hundreds of MB they lie above glibc's mmap threshold, and a fresh buffer would come from the
/// kernel zeroed page by page on every step.
static SPARE_LOGITS: Mutex<Option<CpuStorage>> = Mutex::new(None);

/// A buffer of `len` logits: the spare one when it is large enough.
fn logits_buffer<T: Real>(len: usize) -> Vec<T> {
    let spare = SPARE_LOGITS.lock().expect("not poisoned").take();
    match spare.and_then(T::storage_values) {
        Some(mut spare) if spare.capacity() >= len => {
            spare.resize(len, T::ZERO);
            spare
        }
        _ => vec![T::ZERO; len],
    }
}

struct TokenLogprobs {
    targets: Arc<[u32]>,
    chunk: usize,
    /// Where the forward pass leaves all its logits `[n, vocab]` for the backward pass, which
    /// takes them (absent: logits are recomputed).
    kept: Option<Mutex<Option<CpuStorage>>>,
}

impl TokenLogprobs {
    fn check(&self, rows: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
        let (n, h, v) = crate::op_rules::product_dims("token-logprobs", rows, weight)?;
        if self.targets.len() != n {
            bail!(
                "token-logprobs: {} targets for {n} rows",
                self.targets.len()
            );
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("token-logprobs: target {t} is outside the vocabulary of {v}");
        }
        Ok((n, h, v))
    }

    fn forward<T: Real>(&self, products: &impl HeadProducts<T>, n: usize, v: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; n];
        // Kept: all rows' logits, each chunk in its place; else one chunk's, reused.
        let keep = self.kept.is_some();
        let mut logits = if keep {
            logits_buffer(n * v)
        } else {
            vec![T::ZERO; self.chunk.min(n) * v]
        };
        for start in (0..n).step_by(self.chunk) {
            let c = self.chunk.min(n - start);
            let first = if keep { start } else { 0 };
            let logits = &mut logits[first * v..(first + c) * v];
            products.logits(start, c, logits);
            logits
                .par_chunks(v)
                .zip(out[start..start + c].par_iter_mut())
                .zip(self.targets[start..start + c].par_iter())
                .for_each(|((row, out), &t)| *out = row[t as usize] - T::log_sum_exp(row));
        }
        if let Some(kept) = &self.kept {
            *kept.lock().expect("not poisoned") = Some(T::storage(logits));
        }
        out
    }

    /// The logits the forward pass kept, taken (a second backward pass recomputes them).
    fn take_kept<T: Real>(&self) -> Option<Vec<T>> {
        let kept = self.kept.as_ref()?.lock().expect("not poisoned").take()?;
        T::storage_values(kept)
    }

    /// Gradients of `Σ grad[i] · logp[i]`, packed `[rows (n × h) | weight (v × h)]`, each part
    /// only if wanted.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        wanted: Wanted,
        products: &impl HeadProducts<T>,
        logp: &[T],
        grad: &[T],
        n: usize,
        h: usize,
        v: usize,
    ) -> Vec<T> {
        let mut out = vec![T::ZERO; wanted.packed_len(n * h, v * h)];
        let (grad_rows, grad_weight) = out.split_at_mut(if wanted.first { n * h } else { 0 });
        let grad_rows = wanted.first.then_some(grad_rows);
        let grad_weight = wanted.second.then_some((grad_weight, false));
        self.backward_into(products, logp, grad, (n, h, v), grad_rows, grad_weight);
        out
    }

    /// The gradients of `Σ grad[i] · logp[i]` into `grad_rows [n, h]` and `grad_weight [v, h]`
    /// (added to it when its flag says so), each when given. With `p = softmax(logits)`,
    /// `∂/∂logits = grad · (onehot(target) − p)`; the log-sum-exp of each row comes back as
    /// `logit[target] − logp`, so only the logits are recomputed.
    fn backward_into<T: Real>(
        &self,
        products: &(impl HeadProducts<T> + ?Sized),
        logp: &[T],
        grad: &[T],
        (n, h, v): (usize, usize, usize),
        mut grad_rows: Option<&mut [T]>,
        mut grad_weight: Option<(&mut [T], bool)>,
    ) {
        let kept = self.take_kept::<T>().filter(|kept| kept.len() == n * v);
        let recomputed = kept.is_none();
        let mut logits = kept.unwrap_or_else(|| vec![T::ZERO; self.chunk.min(n) * v]);
        for (i, start) in (0..n).step_by(self.chunk).enumerate() {
            let c = self.chunk.min(n - start);
            let block = if recomputed {
                let block = &mut logits[..c * v];
                products.logits(start, c, block);
                block
            } else {
                &mut logits[start * v..(start + c) * v]
            };
            block.par_chunks_mut(v).enumerate().for_each(|(r, row)| {
                let (t, g) = (self.targets[start + r] as usize, grad[start + r]);
                let lse = row[t] - logp[start + r];
                simd::scaled_exp(row, lse, -g);
                row[t] += g;
            });
            if let Some(grad_rows) = grad_rows.as_deref_mut() {
                products.grad_rows(block, c, &mut grad_rows[start * h..(start + c) * h]);
            }
            if let Some((grad_weight, accumulate)) = grad_weight.as_mut() {
                products.grad_weight(block, start, c, grad_weight, *accumulate || i > 0);
            }
        }
        if !recomputed {
            *SPARE_LOGITS.lock().expect("not poisoned") = Some(T::storage(logits));
        }
    }
}

/// The three products of the vocabulary head, over `rows [n, h]` and `weight [v, h]`.
trait HeadProducts<T> {
    /// `out [c, v] = rows[start..start + c] · weightᵀ`.
    fn logits(&self, start: usize, c: usize, out: &mut [T]);
    /// `out [c, h] = block [c, v] · weight`.
    fn grad_rows(&self, block: &[T], c: usize, out: &mut [T]);
    /// `out [v, h] = (accumulate ? out : 0) + block [c, v]ᵀ · rows[start..start + c]`.
    fn grad_weight(&self, block: &[T], start: usize, c: usize, out: &mut [T], accumulate: bool);
}

/// The head's products in the inputs' own precision (f32, f64).
struct NativeHead<'a, T> {
    rows: &'a [T],
    weight: &'a [T],
    h: usize,
    v: usize,
}

impl<T: Real> HeadProducts<T> for NativeHead<'_, T> {
    fn logits(&self, start: usize, c: usize, out: &mut [T]) {
        let (rows, h) = (&self.rows[start * self.h..], self.h);
        matmul(
            c,
            self.v,
            h,
            out,
            false,
            Mat::rows(rows, h),
            Mat::transposed(self.weight, h),
        );
    }
    fn grad_rows(&self, block: &[T], c: usize, out: &mut [T]) {
        let (h, v) = (self.h, self.v);
        matmul(
            c,
            h,
            v,
            out,
            false,
            Mat::rows(block, v),
            Mat::rows(self.weight, h),
        );
    }
    fn grad_weight(&self, block: &[T], start: usize, c: usize, out: &mut [T], accumulate: bool) {
        let (h, v) = (self.h, self.v);
        let rows = &self.rows[start * h..(start + c) * h];
        matmul(
            v,
            h,
            c,
            out,
            accumulate,
            Mat::transposed(block, v),
            Mat::rows(rows, h),
        );
    }
}

/// The head's products in bf16 (bf16 rows and weight, or f32 ones under bf16 products): bf16
/// operands (the f32 logit gradients rounded), f32 sums. The weight is packed once per op for
/// the products that read it whole, not once per chunk of rows.
struct Bf16Head<'a, S> {
    rows: &'a [S],
    h: usize,
    v: usize,
    /// `weightᵀ [h, v]`, for the logits.
    weight_t: PackedRhs,
    /// `weight [v, h]`, for the rows' gradient (when wanted).
    weight: Option<PackedRhs>,
}

impl<'a, S: Bf16Source + WithDType> Bf16Head<'a, S> {
    /// The products over the (rows, weight) storages of op `name`; the weight packed for the
    /// rows' gradient too when `grad_rows`.
    fn read(
        name: &str,
        [(rows, rows_layout), (weight, weight_layout)]: [(&'a CpuStorage, &Layout); 2],
        h: usize,
        v: usize,
        grad_rows: bool,
    ) -> Result<Self> {
        let rows = contiguous::<S>(rows, rows_layout, name, "rows")?;
        let weight = contiguous::<S>(weight, weight_layout, name, "weight")?;
        Ok(Self {
            rows,
            h,
            v,
            weight_t: PackedRhs::new(h, v, Mat::transposed(weight, h)),
            weight: grad_rows.then(|| PackedRhs::new(v, h, Mat::rows(weight, h))),
        })
    }
}

impl<S: Bf16Source> HeadProducts<f32> for Bf16Head<'_, S> {
    fn logits(&self, start: usize, c: usize, out: &mut [f32]) {
        let rows = Mat::rows(&self.rows[start * self.h..], self.h);
        matmul_bf16_packed(c, out, false, rows, &self.weight_t);
    }
    fn grad_rows(&self, block: &[f32], c: usize, out: &mut [f32]) {
        let weight = self
            .weight
            .as_ref()
            .expect("packed when the rows' gradient is wanted");
        matmul_bf16_packed(c, out, false, Mat::rows(block, self.v), weight);
    }
    fn grad_weight(
        &self,
        block: &[f32],
        start: usize,
        c: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let (h, v) = (self.h, self.v);
        let rows = Mat::rows(&self.rows[start * h..(start + c) * h], h);
        matmul_bf16(v, h, c, out, accumulate, Mat::transposed(block, v), rows);
    }
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, v) = self.check(l1, l2)?;
        fn run<T: Real>(
            op: &TokenLogprobs,
            s: [(&CpuStorage, &Layout); 2],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<CpuStorage> {
            let rows = contiguous::<T>(s[0].0, s[0].1, op.name(), "rows")?;
            let weight = contiguous::<T>(s[1].0, s[1].1, op.name(), "weight")?;
            let products = NativeHead { rows, weight, h, v };
            Ok(T::storage(op.forward(&products, n, v)))
        }
        // bf16 rows and weight give f32 log-probs, as the generic form does.
        fn run_bf16<S: Bf16Source + WithDType>(
            op: &TokenLogprobs,
            s: [(&CpuStorage, &Layout); 2],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<Vec<f32>> {
            let products = Bf16Head::<S>::read(op.name(), s, h, v, false)?;
            Ok(op.forward(&products, n, v))
        }
        let out = if s1.dtype() == DType::BF16 {
            CpuStorage::F32(run_bf16::<bf16>(self, [(s1, l1), (s2, l2)], n, h, v)?)
        } else if bf16_f32_products(s1) {
            CpuStorage::F32(run_bf16::<f32>(self, [(s1, l1), (s2, l2)], n, h, v)?)
        } else {
            by_dtype!(self, s1.dtype(), run(self, [(s1, l1), (s2, l2)], n, h, v))
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        rows: &Tensor,
        weight: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let wanted = Wanted::of(rows, weight);
        if wanted.none() {
            return Ok((None, None));
        }
        if let Some(buffer) = wanted
            .second
            .then(|| grad_buffers::buffer_for(weight))
            .flatten()
        {
            return self.backward_to_buffer(&buffer, wanted.first, rows, weight, res, grad);
        }
        let aux = Tensor::stack(&[res.detach(), grad.detach().to_dtype(res.dtype())?], 0)?;
        let op = TokenLogprobsGrad {
            op: TokenLogprobs {
                targets: self.targets.clone(),
                chunk: self.chunk,
                kept: self
                    .kept
                    .as_ref()
                    .map(|kept| Mutex::new(kept.lock().expect("not poisoned").take())),
            },
            wanted,
        };
        let packed = rows
            .detach()
            .apply_op3_no_bwd(&weight.detach(), &aux, &op)?;
        wanted.unpack(&packed, rows, weight)
    }
}

impl TokenLogprobs {
    /// The backward pass with the weight's gradient written into its buffer (f32 rows and
    /// weight): the rows' gradient, when wanted, comes back from the same pass over the logits.
    fn backward_to_buffer(
        &self,
        buffer: &GradBuffer,
        rows_wanted: bool,
        rows: &Tensor,
        weight: &Tensor,
        logp: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, h) = rows.dims2()?;
        let v = weight.dim(0)?;
        let logp = logp.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grad = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grad_rows = std::cell::RefCell::new(None);
        let name = "token-logprobs-grad";
        buffer.write(&rows.detach(), &weight.detach(), |dw, accumulate, r, w| {
            let mut d_rows = rows_wanted.then(|| vec![0f32; n * h]);
            let (bf16_head, native_head);
            let products: &dyn HeadProducts<f32> = if bf16_f32_products(r.0) {
                bf16_head = Bf16Head::<f32>::read(name, [r, w], h, v, rows_wanted)?;
                &bf16_head
            } else {
                let rows = contiguous::<f32>(r.0, r.1, name, "rows")?;
                let weight = contiguous::<f32>(w.0, w.1, name, "weight")?;
                native_head = NativeHead { rows, weight, h, v };
                &native_head
            };
            let d_weight = Some((dw, accumulate));
            self.backward_into(
                products,
                &logp,
                &grad,
                (n, h, v),
                d_rows.as_deref_mut(),
                d_weight,
            );
            *grad_rows.borrow_mut() = d_rows;
            Ok(())
        })?;
        let grad_rows = grad_rows
            .into_inner()
            .map(|d| Tensor::from_vec(d, (n, h), rows.device()))
            .transpose()?;
        Ok((grad_rows, None))
    }
}

/// The backward of [`TokenLogprobs`] as one op over (rows, weight, [logp; grad]).
struct TokenLogprobsGrad {
    op: TokenLogprobs,
    wanted: Wanted,
}

impl CustomOp3 for TokenLogprobsGrad {
    fn name(&self) -> &'static str {
        "token-logprobs-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, v) = self.op.check(l1, l2)?;
        fn run<T: Real>(
            g: &TokenLogprobsGrad,
            s: [(&CpuStorage, &Layout); 3],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<CpuStorage> {
            let name = g.name();
            let rows = contiguous::<T>(s[0].0, s[0].1, name, "rows")?;
            let weight = contiguous::<T>(s[1].0, s[1].1, name, "weight")?;
            let aux = contiguous::<T>(s[2].0, s[2].1, name, "logp and grad")?;
            let products = NativeHead { rows, weight, h, v };
            let (logp, grad) = (&aux[..n], &aux[n..2 * n]);
            Ok(T::storage(
                g.op.backward(g.wanted, &products, logp, grad, n, h, v),
            ))
        }
        // bf16 products, over bf16 rows and weight (their gradients rounded to bf16) or over f32
        // ones when the process asked for bf16 products; log-probs and gradient are f32 either way.
        fn run_bf16<S: Bf16Source + WithDType>(
            g: &TokenLogprobsGrad,
            s: [(&CpuStorage, &Layout); 3],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<Vec<f32>> {
            let products = Bf16Head::<S>::read(g.name(), [s[0], s[1]], h, v, g.wanted.first)?;
            let aux = contiguous::<f32>(s[2].0, s[2].1, g.name(), "logp and grad")?;
            let (logp, grad) = (&aux[..n], &aux[n..2 * n]);
            Ok(g.op.backward(g.wanted, &products, logp, grad, n, h, v))
        }
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        let out = if s1.dtype() == DType::BF16 {
            bf16_storage(&run_bf16::<bf16>(self, s, n, h, v)?)
        } else if bf16_f32_products(s1) {
            CpuStorage::F32(run_bf16::<f32>(self, s, n, h, v)?)
        } else {
            by_dtype!(self, s1.dtype(), run(self, s, n, h, v))
        };
        Ok((out, Shape::from(self.wanted.packed_len(n * h, v * h))))
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

/// `x / sqrt(mean(x²) + eps) · weight` over the last dimension of `x [.., h]`, `weight [h]`;
/// differentiable in both. CPU, f32/f64.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

#[derive(Clone, Copy)]
struct RmsNorm {
    eps: f64,
}

/// Rows whose weight-gradient contributions are summed together before the (ordered) sum over
/// blocks: deterministic whatever the thread count.
const ROW_BLOCK: usize = 64;

impl RmsNorm {
    fn check(&self, x: &Layout, w: &Layout) -> Result<(usize, usize)> {
        let h = x.dims().last().copied().unwrap_or(0);
        if w.dims() != [h] {
            bail!(
                "rms-norm: weight {:?} does not match the input's last dimension {h}",
                w.dims()
            );
        }
        Ok((x.shape().elem_count() / h.max(1), h))
    }

    fn inv_rms<T: Real>(&self, row: &[T]) -> T {
        let h = T::from_f64(row.len() as f64);
        T::ONE / (kernels::dot(row, row) / h + T::from_f64(self.eps)).sqrt()
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T], h: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(y, x)| {
                let inv = self.inv_rms(x);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * inv * w;
                }
            });
        out
    }

    /// Packed `[∂x (rows × h) | ∂w (h)]`: with `x̂ = x·r`, `r = 1/rms(x)`,
    /// `∂x = r (w∘g − x̂ · mean(w∘g∘x̂))`, `∂w = Σ_rows g∘x̂`.
    fn backward<T: Real>(&self, x: &[T], w: &[T], g: &[T], h: usize) -> Vec<T> {
        let rows = x.len() / h.max(1);
        let mut out = vec![T::ZERO; x.len() + h];
        let (grad_x, grad_w) = out.split_at_mut(rows * h);
        let partials: Vec<Vec<T>> = grad_x
            .par_chunks_mut(ROW_BLOCK * h)
            .zip(x.par_chunks(ROW_BLOCK * h))
            .zip(g.par_chunks(ROW_BLOCK * h))
            .map(|((dx, x), g)| {
                let mut dw = vec![T::ZERO; h];
                let mut wg = vec![T::ZERO; h];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let inv = self.inv_rms(x);
                    for ((wg, &w), &g) in wg.iter_mut().zip(w).zip(g) {
                        *wg = w * g;
                    }
                    let mean = kernels::dot(&wg, x) * inv / T::from_f64(h as f64);
                    for i in 0..h {
                        let xhat = x[i] * inv;
                        dx[i] = inv * (wg[i] - xhat * mean);
                        dw[i] += g[i] * xhat;
                    }
                }
                dw
            })
            .collect();
        for dw in partials {
            for (a, b) in grad_w.iter_mut().zip(dw) {
                *a += b;
            }
        }
        out
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2));
        let (_, h) = self.check(l1, l2)?;
        fn run<T: Real>(
            op: &RmsNorm,
            s: [(&CpuStorage, &Layout); 2],
            h: usize,
        ) -> Result<CpuStorage> {
            let x = contiguous::<T>(s[0].0, s[0].1, op.name(), "input")?;
            let w = contiguous::<T>(s[1].0, s[1].1, op.name(), "weight")?;
            Ok(T::storage(op.forward(x, w, h)))
        }
        let out = by_dtype!(self, s1.dtype(), run(self, [(s1, l1), (s2, l2)], h));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        both_grads(x, w, grad, &RmsNormGrad(*self))
    }
}

struct RmsNormGrad(RmsNorm);

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        let (rows, h) = self.0.check(l1, l2)?;
        if l3.shape() != l1.shape() {
            bail!(
                "{}: gradient {:?} does not match the input {:?}",
                self.name(),
                l3.dims(),
                l1.dims()
            );
        }
        fn run<T: Real>(
            op: &RmsNormGrad,
            s: [(&CpuStorage, &Layout); 3],
            h: usize,
        ) -> Result<CpuStorage> {
            let x = contiguous::<T>(s[0].0, s[0].1, op.name(), "input")?;
            let w = contiguous::<T>(s[1].0, s[1].1, op.name(), "weight")?;
            let g = contiguous::<T>(s[2].0, s[2].1, op.name(), "gradient")?;
            Ok(T::storage(op.0.backward(x, w, g, h)))
        }
        let out = by_dtype!(
            self,
            s1.dtype(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)], h)
        );
        Ok((out, Shape::from(rows * h + h)))
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding.

/// Rows `ids` of `weight [vocab, h]`: `[ids.., h]`, differentiable in the weight (candle's
/// `index_select` backward adds into a zeroed copy of the whole matrix; here a weight with a
/// gradient buffer gets only its looked-up rows added there). CPU, any dtype; u32 ids.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    weight
        .contiguous()?
        .apply_op2(&ids.contiguous()?, Embedding)
}

struct Embedding;

impl Embedding {
    /// `(vocab, h)` of the weight; fails on an id outside the vocabulary.
    fn check(weight: &Layout, ids: &[u32]) -> Result<(usize, usize)> {
        let &[v, h] = weight.dims() else {
            bail!("embedding: weight {:?} must be a matrix", weight.dims());
        };
        if let Some(id) = ids.iter().find(|&&id| id as usize >= v) {
            bail!("embedding: id {id} is outside the vocabulary of {v}");
        }
        Ok((v, h))
    }
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = contiguous::<u32>(s2, l2, self.name(), "ids")?;
        let (_, h) = Self::check(l1, ids)?;
        fn gather<T: WithDType>(weight: &[T], ids: &[u32], h: usize) -> Vec<T> {
            let mut out = vec![T::from_f64(0.0); ids.len() * h];
            out.par_chunks_mut(h)
                .zip(ids.par_iter())
                .for_each(|(row, &id)| row.copy_from_slice(&weight[id as usize * h..][..h]));
            out
        }
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(gather(contiguous(s1, l1, name, "weight")?, ids, h)),
            DType::F64 => CpuStorage::F64(gather(contiguous(s1, l1, name, "weight")?, ids, h)),
            DType::BF16 => CpuStorage::BF16(gather(contiguous(s1, l1, name, "weight")?, ids, h)),
            other => bail!("embedding: dtype {other:?} is not supported"),
        };
        let mut dims = l2.dims().to_vec();
        dims.push(h);
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        weight: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !weight.track_op() {
            return Ok((None, None));
        }
        let (v, h) = weight.dims2()?;
        let grad = grad.detach().reshape(((), h))?.contiguous()?;
        let ids = ids.detach().flatten_all()?;
        let Some(buffer) = grad_buffers::buffer_for(weight) else {
            let dense = weight.zeros_like()?.index_add(&ids, &grad, 0)?;
            return Ok((Some(dense), None));
        };
        buffer.write(&grad, &ids, |dw, accumulate, (g, gl), (ids, il)| {
            let g = contiguous::<f32>(g, gl, "embedding-grad", "gradient")?;
            let ids = contiguous::<u32>(ids, il, "embedding-grad", "ids")?;
            if !accumulate {
                dw.par_chunks_mut(ELEMENT_BLOCK)
                    .for_each(|block| block.fill(0.0));
            }
            // In id order, one row at a time: a token seen twice sums in a fixed order.
            for (row, &id) in g.chunks_exact(h).zip(ids) {
                let id = id as usize;
                debug_assert!(id < v);
                for (d, &x) in dw[id * h..(id + 1) * h].iter_mut().zip(row) {
                    *d += x;
                }
            }
            Ok(())
        })?;
        Ok((None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layer.

/// `x · weightᵀ` for `x [.., in]` and `weight [out, in]`: `[.., out]`, differentiable in both,
/// as one autograd node (candle's version is a reshape, a transpose, a matmul and a reshape, each
/// of which costs its backward a zeroed buffer and an add). CPU, f32/f64.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, LinearOp)
}

struct LinearOp;

impl LinearOp {
    /// `(rows, in, out)` of `x [.., in]` and `weight [out, in]`.
    fn check(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
        let k = x.dims().last().copied().unwrap_or(0);
        let &[out, k2] = w.dims() else {
            bail!("linear: weight {:?} must be a matrix", w.dims());
        };
        if k != k2 || k == 0 {
            bail!(
                "linear: input {:?} does not fit weight {:?}",
                x.dims(),
                w.dims()
            );
        }
        Ok((x.shape().elem_count() / k, k, out))
    }

    /// `x [rows, k] · wᵀ` for `w [out, k]`.
    fn product<T: Real>(x: &[T], w: &[T], (rows, k, out): (usize, usize, usize)) -> Vec<T> {
        let mut y = vec![T::ZERO; rows * out];
        matmul(
            rows,
            out,
            k,
            &mut y,
            false,
            Mat::rows(x, k),
            Mat::transposed(w, k),
        );
        y
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, out) = Self::check(l1, l2)?;
        fn run<T: Real>(
            op: &LinearOp,
            s: [(&CpuStorage, &Layout); 2],
            (rows, k, out): (usize, usize, usize),
        ) -> Result<CpuStorage> {
            let x = contiguous::<T>(s[0].0, s[0].1, op.name(), "input")?;
            let w = contiguous::<T>(s[1].0, s[1].1, op.name(), "weight")?;
            Ok(T::storage(LinearOp::product(x, w, (rows, k, out))))
        }
        let y = if s1.dtype() == DType::BF16 {
            let x = contiguous::<bf16>(s1, l1, self.name(), "input")?;
            let w = contiguous::<bf16>(s2, l2, self.name(), "weight")?;
            let mut y = vec![0f32; rows * out];
            matmul_bf16(
                rows,
                out,
                k,
                &mut y,
                false,
                Mat::rows(x, k),
                Mat::transposed(w, k),
            );
            bf16_storage(&y)
        } else {
            by_dtype!(
                self,
                s1.dtype(),
                run(self, [(s1, l1), (s2, l2)], (rows, k, out))
            )
        };
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("checked") = out;
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut wanted = Wanted::of(x, w);
        let grad = grad.detach().contiguous()?;
        // A weight with a gradient buffer gets ∂W = gᵀ · x written there, and none from here.
        let buffer = wanted.second.then(|| grad_buffers::buffer_for(w)).flatten();
        if let Some(buffer) = &buffer {
            let (rows, k, out) = (x.elem_count() / w.dim(1)?, w.dim(1)?, w.dim(0)?);
            buffer.write(&grad, x, |dw, accumulate, (g, gl), (x, xl)| {
                let g = contiguous::<f32>(g, gl, "linear-grad", "gradient")?;
                let x = contiguous::<f32>(x, xl, "linear-grad", "input")?;
                let g_t = Mat::transposed(g, out);
                matmul(out, k, rows, dw, accumulate, g_t, Mat::rows(x, k));
                Ok(())
            })?;
            wanted.second = false;
        }
        if wanted.none() {
            return Ok((None, None));
        }
        let packed = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &grad, &LinearGrad { wanted })?;
        wanted.unpack(&packed, x, w)
    }
}

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

/// Packed `[∂x = g · W | ∂W = gᵀ · x]` of [`LinearOp`] over (x, W, g), each part only if wanted.
struct LinearGrad {
    wanted: Wanted,
}

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, out) = LinearOp::check(l1, l2)?;
        if l3.shape().elem_count() != rows * out {
            bail!(
                "{}: gradient {:?} does not fit {rows} rows of {out}",
                self.name(),
                l3.dims()
            );
        }
        let len = self.wanted.packed_len(rows * k, out * k);
        fn run<T: Real>(
            op: &LinearGrad,
            s: [(&CpuStorage, &Layout); 3],
            (rows, k, out): (usize, usize, usize),
            len: usize,
        ) -> Result<CpuStorage> {
            let x = contiguous::<T>(s[0].0, s[0].1, op.name(), "input")?;
            let w = contiguous::<T>(s[1].0, s[1].1, op.name(), "weight")?;
            let g = contiguous::<T>(s[2].0, s[2].1, op.name(), "gradient")?;
            let mut packed = vec![T::ZERO; len];
            let (dx, dw) = packed.split_at_mut(if op.wanted.first { rows * k } else { 0 });
            if op.wanted.first {
                matmul(rows, k, out, dx, false, Mat::rows(g, out), Mat::rows(w, k));
            }
            if op.wanted.second {
                matmul(
                    out,
                    k,
                    rows,
                    dw,
                    false,
                    Mat::transposed(g, out),
                    Mat::rows(x, k),
                );
            }
            Ok(T::storage(packed))
        }
        let packed = if s1.dtype() == DType::BF16 {
            let name = self.name();
            let x = contiguous::<bf16>(s1, l1, name, "input")?;
            let w = contiguous::<bf16>(s2, l2, name, "weight")?;
            let g = contiguous::<bf16>(s3, l3, name, "gradient")?;
            let mut packed = vec![0f32; len];
            let (dx, dw) = packed.split_at_mut(if self.wanted.first { rows * k } else { 0 });
            if self.wanted.first {
                matmul_bf16(rows, k, out, dx, false, Mat::rows(g, out), Mat::rows(w, k));
            }
            if self.wanted.second {
                let g_t = Mat::transposed(g, out);
                matmul_bf16(out, k, rows, dw, false, g_t, Mat::rows(x, k));
            }
            bf16_storage(&packed)
        } else {
            by_dtype!(
                self,
                s1.dtype(),
                run(self, [(s1, l1), (s2, l2), (s3, l3)], (rows, k, out), len)
            )
        };
        Ok((packed, Shape::from(len)))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layer with a LoRA adapter.

/// `x · weightᵀ + (x · aᵀ) · bᵀ` for `x [.., in]`, `weight [out, in]`, `a [rank, in]` and
/// `b [out, rank]`: `[.., out]`, differentiable in all four, as one autograd node. Composed, the
/// adapter is three more nodes on `[rows, out]`-sized tensors, each costing candle's backward a
/// zeroed gradient and an add of that size. CPU, f32/f64 (bf16 through f32 copies).
pub fn lora_linear(x: &Tensor, weight: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let rank = a.dim(0)?;
    if b.dims() != [weight.dim(0)?, rank] || a.dims() != [rank, weight.dim(1)?] {
        bail!(
            "lora-linear: adapters {:?} and {:?} do not fit weight {:?}",
            a.dims(),
            b.dims(),
            weight.dims()
        );
    }
    // The two small adapters as one input `[a | b]` (a concatenation of a few thousand numbers).
    let adapters = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &adapters, LoraLinear { rank })
}

#[derive(Clone, Copy)]
struct LoraLinear {
    rank: usize,
}

impl LoraLinear {
    /// Elements of `∂x`, `∂weight` and `∂[a | b]` for `(rows, in, out)`; the packed gradient
    /// holds the wanted ones in that order.
    fn grad_lens(&self, (rows, k, out): (usize, usize, usize)) -> [usize; 3] {
        [rows * k, out * k, self.rank * (k + out)]
    }

    fn packed_len(&self, wanted: [bool; 3], dims: (usize, usize, usize)) -> usize {
        let lens = self.grad_lens(dims);
        (0..3).filter(|&i| wanted[i]).map(|i| lens[i]).sum()
    }

    /// `x · aᵀ`: `[rows, rank]`.
    fn down<T: Real>(&self, x: &[T], a: &[T], (rows, k): (usize, usize)) -> Vec<T> {
        let mut u = vec![T::ZERO; rows * self.rank];
        let a_t = Mat::transposed(a, k);
        matmul(rows, self.rank, k, &mut u, false, Mat::rows(x, k), a_t);
        u
    }

    fn forward<T: Real>(
        &self,
        x: &[T],
        w: &[T],
        ab: &[T],
        (rows, k, out): (usize, usize, usize),
    ) -> Vec<T> {
        let (a, b) = ab.split_at(self.rank * k);
        let mut y = LinearOp::product(x, w, (rows, k, out));
        let u = self.down(x, a, (rows, k));
        let b_t = Mat::transposed(b, self.rank);
        matmul(
            rows,
            out,
            self.rank,
            &mut y,
            true,
            Mat::rows(&u, self.rank),
            b_t,
        );
        y
    }

    /// Packed `[∂x | ∂weight | ∂[a | b]]`, each part only if wanted, for the output gradient `g`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        wanted: [bool; 3],
        x: &[T],
        w: &[T],
        ab: &[T],
        g: &[T],
        (rows, k, out): (usize, usize, usize),
    ) -> Vec<T> {
        let r = self.rank;
        let (a, b) = ab.split_at(r * k);
        let lens = self.grad_lens((rows, k, out));
        let mut packed = vec![T::ZERO; self.packed_len(wanted, (rows, k, out))];
        let (dx, rest) = packed.split_at_mut(if wanted[0] { lens[0] } else { 0 });
        let (dw, dab) = rest.split_at_mut(if wanted[1] { lens[1] } else { 0 });
        // ∂u = g · b, with u = x · aᵀ the adapter's inner activations.
        let mut du = vec![T::ZERO; rows * r];
        matmul(
            rows,
            r,
            out,
            &mut du,
            false,
            Mat::rows(g, out),
            Mat::rows(b, r),
        );
        if wanted[0] {
            matmul(rows, k, out, dx, false, Mat::rows(g, out), Mat::rows(w, k));
            matmul(rows, k, r, dx, true, Mat::rows(&du, r), Mat::rows(a, k));
        }
        if wanted[1] {
            matmul(
                out,
                k,
                rows,
                dw,
                false,
                Mat::transposed(g, out),
                Mat::rows(x, k),
            );
        }
        if wanted[2] {
            let (da, db) = dab.split_at_mut(r * k);
            matmul(
                r,
                k,
                rows,
                da,
                false,
                Mat::transposed(&du, r),
                Mat::rows(x, k),
            );
            let u = self.down(x, a, (rows, k));
            matmul(
                out,
                r,
                rows,
                db,
                false,
                Mat::transposed(g, out),
                Mat::rows(&u, r),
            );
        }
        packed
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        let dims = LinearOp::check(l1, l2)?;
        fn run<T: Real>(
            op: &LoraLinear,
            s: [(&CpuStorage, &Layout); 3],
            dims: (usize, usize, usize),
        ) -> Result<CpuStorage> {
            let x = contiguous::<T>(s[0].0, s[0].1, op.name(), "input")?;
            let w = contiguous::<T>(s[1].0, s[1].1, op.name(), "weight")?;
            let ab = contiguous::<T>(s[2].0, s[2].1, op.name(), "adapters")?;
            Ok(T::storage(op.forward(x, w, ab, dims)))
        }
        let y = by_dtype!(
            self,
            s1.dtype(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)], dims)
        );
        let mut out_dims = l1.dims().to_vec();
        *out_dims.last_mut().expect("checked") = dims.2;
        Ok((y, Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        ab: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wanted = [x.track_op(), w.track_op(), ab.track_op()];
        if wanted == [false; 3] {
            return Ok((None, None, None));
        }
        // The adapters travel in the op (a few thousand numbers): candle's ops take three inputs.
        let op = LoraLinearGrad {
            op: *self,
            wanted,
            adapters: ab.detach(),
        };
        let packed = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &grad.detach().contiguous()?, &op)?;
        let mut parts = [None, None, None];
        let mut start = 0;
        for (i, input) in [x, w, ab]
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| wanted[i])
        {
            let n = input.elem_count();
            parts[i] = Some(packed.narrow(0, start, n)?.reshape(input.shape())?);
            start += n;
        }
        let [dx, dw, dab] = parts;
        Ok((dx, dw, dab))
    }
}

/// The backward of [`LoraLinear`] over (x, weight, output gradient), with the adapters.
struct LoraLinearGrad {
    op: LoraLinear,
    wanted: [bool; 3],
    adapters: Tensor,
}

impl CustomOp3 for LoraLinearGrad {
    fn name(&self) -> &'static str {
        "lora-linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        let dims = LinearOp::check(l1, l2)?;
        let (adapters, adapters_layout) = self.adapters.storage_and_layout();
        let adapters = match &*adapters {
            candle_core::Storage::Cpu(storage) => storage.to_dtype(adapters_layout, s1.dtype())?,
            _ => bail!("{}: the adapters are not on the CPU", self.name()),
        };
        fn run<T: Real>(
            g: &LoraLinearGrad,
            s: [(&CpuStorage, &Layout); 4],
            dims: (usize, usize, usize),
        ) -> Result<CpuStorage> {
            let x = contiguous::<T>(s[0].0, s[0].1, g.name(), "input")?;
            let w = contiguous::<T>(s[1].0, s[1].1, g.name(), "weight")?;
            let grad = contiguous::<T>(s[2].0, s[2].1, g.name(), "gradient")?;
            let ab = contiguous::<T>(s[3].0, s[3].1, g.name(), "adapters")?;
            Ok(T::storage(g.op.backward(g.wanted, x, w, ab, grad, dims)))
        }
        let ab_layout = Layout::contiguous(self.adapters.shape());
        let s = [(s1, l1), (s2, l2), (s3, l3), (&adapters, &ab_layout)];
        let packed = by_dtype!(self, s1.dtype(), run(self, s, dims));
        Ok((packed, Shape::from(self.op.packed_len(self.wanted, dims))))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU gate.

/// Elements per parallel task of the elementwise ops.
const ELEMENT_BLOCK: usize = 16 * 1024;

/// `silu(gate) · up`, elementwise, differentiable in both. CPU, f32/f64.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2));
        if l1.shape() != l2.shape() {
            bail!(
                "silu-mul: gate {:?} and up {:?} differ in shape",
                l1.dims(),
                l2.dims()
            );
        }
        fn run<T: Real>(op: &SiluMul, s: [(&CpuStorage, &Layout); 2]) -> Result<CpuStorage> {
            let gate = contiguous::<T>(s[0].0, s[0].1, op.name(), "gate")?;
            let up = contiguous::<T>(s[1].0, s[1].1, op.name(), "up")?;
            let mut out = vec![T::ZERO; gate.len()];
            out.par_chunks_mut(ELEMENT_BLOCK)
                .zip(gate.par_chunks(ELEMENT_BLOCK))
                .zip(up.par_chunks(ELEMENT_BLOCK))
                .for_each(|((o, g), u)| simd::silu_mul(g, u, o));
            Ok(T::storage(out))
        }
        let out = by_dtype!(self, s1.dtype(), run(self, [(s1, l1), (s2, l2)]));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        both_grads(gate, up, grad, &SiluMulGrad)
    }
}

/// Packed `[∂gate | ∂up]` of [`SiluMul`].
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            bail!(
                "{}: gate {:?}, up {:?} and gradient {:?} differ in shape",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let n = l1.shape().elem_count();
        fn run<T: Real>(op: &SiluMulGrad, s: [(&CpuStorage, &Layout); 3]) -> Result<CpuStorage> {
            let gate = contiguous::<T>(s[0].0, s[0].1, op.name(), "gate")?;
            let up = contiguous::<T>(s[1].0, s[1].1, op.name(), "up")?;
            let g = contiguous::<T>(s[2].0, s[2].1, op.name(), "gradient")?;
            let mut out = vec![T::ZERO; 2 * gate.len()];
            let (d_gate, d_up) = out.split_at_mut(gate.len());
            d_gate
                .par_chunks_mut(ELEMENT_BLOCK)
                .zip(d_up.par_chunks_mut(ELEMENT_BLOCK))
                .zip(
                    gate.par_chunks(ELEMENT_BLOCK)
                        .zip(up.par_chunks(ELEMENT_BLOCK))
                        .zip(g.par_chunks(ELEMENT_BLOCK)),
                )
                .for_each(|((dg, du), ((gate, up), g))| simd::silu_mul_grad(gate, up, g, dg, du));
            Ok(T::storage(out))
        }
        let out = by_dtype!(self, s1.dtype(), run(self, [(s1, l1), (s2, l2), (s3, l3)]));
        Ok((out, Shape::from(2 * n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding, with the split into heads.

/// Splits `x [b, t, heads·d]` (a projection's output) into heads and rotates them:
/// `[b, heads, t, d]` with `y = x·cos + rotate_half(x)·sin` (Hugging Face's layout), for
/// `cos`/`sin [b, t, d/2]`. Differentiable in `x` (the tables are constants). CPU, f32/f64.
pub fn rotary_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { heads })
}

#[derive(Clone, Copy)]
struct Rope {
    heads: usize,
}

impl Rope {
    /// `(b, t, d)` of `x [b, t, heads·d]` against tables `[b, t, d/2]`.
    fn check(&self, x: &[usize], cos: &Layout, sin: &Layout) -> Result<(usize, usize, usize)> {
        let &[b, t, width] = x else {
            bail!("rotary: input {x:?} must be [b, t, heads·d]");
        };
        let d = width / self.heads.max(1);
        if d * self.heads != width || !d.is_multiple_of(2) {
            bail!(
                "rotary: width {width} is not {} heads of an even size",
                self.heads
            );
        }
        if cos.dims() != [b, t, d / 2] || sin.dims() != cos.dims() {
            bail!(
                "rotary: tables {:?} and {:?} must be [{b}, {t}, {}]",
                cos.dims(),
                sin.dims(),
                d / 2
            );
        }
        Ok((b, t, d))
    }

    /// `[b, t, heads, d]` → rotated `[b, heads, t, d]`.
    fn forward<T: Real>(
        &self,
        x: &[T],
        cos: &[T],
        sin: &[T],
        b: usize,
        t: usize,
        d: usize,
    ) -> Vec<T> {
        let heads = self.heads;
        let half = d / 2;
        let mut out = vec![T::ZERO; b * heads * t * d];
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, y)| {
            let (bi, hh) = (bh / heads, bh % heads);
            for ti in 0..t {
                let src = &x[((bi * t + ti) * heads + hh) * d..][..d];
                let (c, s) = (
                    &cos[(bi * t + ti) * half..][..half],
                    &sin[(bi * t + ti) * half..][..half],
                );
                let y = &mut y[ti * d..(ti + 1) * d];
                for j in 0..half {
                    y[j] = src[j] * c[j] - src[j + half] * s[j];
                    y[j + half] = src[j + half] * c[j] + src[j] * s[j];
                }
            }
        });
        out
    }

    /// Gradient `[b, t, heads·d]` from `g [b, heads, t, d]`, with `c_j`, `s_j` the angle of
    /// channels `j` and `j + ½`: `∂x_j = g_j c_j + g_{j+½} s_j` (first half),
    /// `∂x_{j+½} = g_{j+½} c_j − g_j s_j` (second).
    fn backward<T: Real>(
        &self,
        g: &[T],
        cos: &[T],
        sin: &[T],
        b: usize,
        t: usize,
        d: usize,
    ) -> Vec<T> {
        let heads = self.heads;
        let half = d / 2;
        let mut out = vec![T::ZERO; b * t * heads * d];
        out.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(bt, dx)| {
                let (bi, ti) = (bt / t, bt % t);
                let (c, s) = (&cos[bt * half..][..half], &sin[bt * half..][..half]);
                for hh in 0..heads {
                    let g = &g[((bi * heads + hh) * t + ti) * d..][..d];
                    let dx = &mut dx[hh * d..(hh + 1) * d];
                    for j in 0..half {
                        dx[j] = g[j] * c[j] + g[j + half] * s[j];
                        dx[j + half] = g[j + half] * c[j] - g[j] * s[j];
                    }
                }
            });
        out
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        let (b, t, d) = self.check(l1.dims(), l2, l3)?;
        fn run<T: Real>(
            op: &Rope,
            s: [(&CpuStorage, &Layout); 3],
            (b, t, d): (usize, usize, usize),
        ) -> Result<CpuStorage> {
            let x = contiguous::<T>(s[0].0, s[0].1, op.name(), "input")?;
            let cos = contiguous::<T>(s[1].0, s[1].1, op.name(), "cos")?;
            let sin = contiguous::<T>(s[2].0, s[2].1, op.name(), "sin")?;
            Ok(T::storage(op.forward(x, cos, sin, b, t, d)))
        }
        let out = by_dtype!(
            self,
            s1.dtype(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)], (b, t, d))
        );
        Ok((out, Shape::from((b, self.heads, t, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad
            .detach()
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &RopeGrad(*self))?;
        Ok((Some(grad.reshape(x.shape())?), None, None))
    }
}

struct RopeGrad(Rope);

impl CustomOp3 for RopeGrad {
    fn name(&self) -> &'static str {
        "rotary-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        let &[b, heads, t, d] = l1.dims() else {
            bail!(
                "{}: gradient {:?} must be [b, heads, t, d]",
                self.name(),
                l1.dims()
            );
        };
        if heads != self.0.heads {
            bail!(
                "{}: gradient has {heads} heads, expected {}",
                self.name(),
                self.0.heads
            );
        }
        self.0.check(&[b, t, heads * d], l2, l3)?;
        fn run<T: Real>(
            op: &RopeGrad,
            s: [(&CpuStorage, &Layout); 3],
            (b, t, d): (usize, usize, usize),
        ) -> Result<CpuStorage> {
            let g = contiguous::<T>(s[0].0, s[0].1, op.name(), "gradient")?;
            let cos = contiguous::<T>(s[1].0, s[1].1, op.name(), "cos")?;
            let sin = contiguous::<T>(s[2].0, s[2].1, op.name(), "sin")?;
            Ok(T::storage(op.0.backward(g, cos, sin, b, t, d)))
        }
        let out = by_dtype!(
            self,
            s1.dtype(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)], (b, t, d))
        );
        Ok((out, Shape::from((b, t, heads * d))))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// Grouped-query attention `softmax(scale · q kᵀ + mask) v` for `q [b, heads, tq, d]`,
/// `k`/`v [b, kv_heads, tk, d]` and an additive `mask [b, 1, tq, tk]`: `[b, heads, tq, d]`,
/// differentiable in q, k and v. One op (one autograd node) per layer: the scores and
/// probabilities live only inside it, one (batch, KV head) block at a time, and the backward
/// recomputes them. CPU, f32/f64.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let op = Attention {
        // bf16 inputs run the f32 kernel (`through_f32!`), which reads an f32 mask.
        mask: mask
            .detach()
            .to_dtype(crate::op_rules::accumulation_dtype(mask.dtype()))?
            .contiguous()?,
        scale,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone)]
struct Attention {
    mask: Tensor,
    scale: f64,
}

/// Dimensions of one attention call.
#[derive(Clone, Copy)]
struct AttnDims {
    heads: usize,
    kv_heads: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl AttnDims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

impl Attention {
    fn check(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<AttnDims> {
        let (&[b, heads, tq, d], &[kb, kv_heads, tk, kd]) = (q, k) else {
            bail!(
                "attention: q {q:?} and k {k:?} must be [b, heads, tq, d] and [b, kv_heads, tk, d]"
            );
        };
        if kb != b || kd != d || v != k || kv_heads == 0 || heads % kv_heads != 0 {
            bail!("attention: q {q:?}, k {k:?} and v {v:?} do not fit together");
        }
        if self.mask.dims() != [b, 1, tq, tk] {
            bail!(
                "attention: mask {:?} must be [{b}, 1, {tq}, {tk}]",
                self.mask.dims()
            );
        }
        Ok(AttnDims {
            heads,
            kv_heads,
            tq,
            tk,
            d,
        })
    }

    /// The mask's data, read under its storage lock, passed to `f`.
    fn with_mask<T: Real, R>(&self, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
        let (storage, layout) = self.mask.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            bail!("attention: the mask must be on the CPU");
        };
        f(contiguous::<T>(cpu, layout, "attention", "mask")?)
    }

    /// Probabilities `[group·tq, tk]` of one (batch, KV head) block: `qg [group·tq, d]`, `kg [tk, d]`.
    fn probabilities<T: Real>(
        &self,
        qg: &[T],
        kg: &[T],
        mask: &[T],
        bi: usize,
        n: AttnDims,
        p: &mut [T],
    ) {
        let rows = n.group() * n.tq;
        matmul_serial(
            rows,
            n.tk,
            n.d,
            p,
            false,
            Mat::rows(qg, n.d),
            Mat::transposed(kg, n.d),
        );
        let scale = T::from_f64(self.scale);
        let mut scratch = vec![T::ZERO; n.tk];
        for (r, row) in p.chunks_mut(n.tk).enumerate() {
            let qi = r % n.tq;
            scratch.copy_from_slice(row);
            simd::softmax(
                &scratch,
                &mask[(bi * n.tq + qi) * n.tk..][..n.tk],
                scale,
                row,
            );
        }
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], mask: &[T], n: AttnDims) -> Vec<T> {
        let (group, rows) = (n.group(), n.group() * n.tq);
        let mut out = vec![T::ZERO; q.len()];
        out.par_chunks_mut(rows * n.d)
            .enumerate()
            .for_each(|(task, o)| {
                let (bi, g) = (task / n.kv_heads, task % n.kv_heads);
                let qg = &q[((bi * n.heads + g * group) * n.tq) * n.d..][..rows * n.d];
                let kg = &k[task * n.tk * n.d..][..n.tk * n.d];
                let vg = &v[task * n.tk * n.d..][..n.tk * n.d];
                let mut p = vec![T::ZERO; rows * n.tk];
                self.probabilities(qg, kg, mask, bi, n, &mut p);
                matmul_serial(
                    rows,
                    n.d,
                    n.tk,
                    o,
                    false,
                    Mat::rows(&p, n.tk),
                    Mat::rows(vg, n.d),
                );
            });
        out
    }

    /// Packed `[∂q | ∂k | ∂v]`: with `P` the probabilities and `G` the output's gradient,
    /// `∂v = Pᵀ G`, `∂S = scale · P ∘ (G vᵀ − rowsum(P ∘ G vᵀ))`, `∂q = ∂S k`, `∂k = ∂Sᵀ q`.
    fn backward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        grad: &[T],
        mask: &[T],
        n: AttnDims,
    ) -> Vec<T> {
        let (group, rows) = (n.group(), n.group() * n.tq);
        let mut out = vec![T::ZERO; q.len() + 2 * k.len()];
        let (dq, dkv) = out.split_at_mut(q.len());
        let (dk, dv) = dkv.split_at_mut(k.len());
        let scale = T::from_f64(self.scale);
        dq.par_chunks_mut(rows * n.d)
            .zip(dk.par_chunks_mut(n.tk * n.d))
            .zip(dv.par_chunks_mut(n.tk * n.d))
            .enumerate()
            .for_each(|(task, ((dq, dk), dv))| {
                let (bi, g) = (task / n.kv_heads, task % n.kv_heads);
                let at = ((bi * n.heads + g * group) * n.tq) * n.d;
                let (qg, gg) = (&q[at..][..rows * n.d], &grad[at..][..rows * n.d]);
                let kg = &k[task * n.tk * n.d..][..n.tk * n.d];
                let vg = &v[task * n.tk * n.d..][..n.tk * n.d];
                let mut p = vec![T::ZERO; rows * n.tk];
                self.probabilities(qg, kg, mask, bi, n, &mut p);
                matmul_serial(
                    n.tk,
                    n.d,
                    rows,
                    dv,
                    false,
                    Mat::transposed(&p, n.tk),
                    Mat::rows(gg, n.d),
                );
                let mut ds = vec![T::ZERO; rows * n.tk];
                matmul_serial(
                    rows,
                    n.tk,
                    n.d,
                    &mut ds,
                    false,
                    Mat::rows(gg, n.d),
                    Mat::transposed(vg, n.d),
                );
                for (ds, p) in ds.chunks_mut(n.tk).zip(p.chunks(n.tk)) {
                    let dot = kernels::dot(ds, p);
                    for (ds, &p) in ds.iter_mut().zip(p) {
                        *ds = scale * p * (*ds - dot);
                    }
                }
                matmul_serial(
                    rows,
                    n.d,
                    n.tk,
                    dq,
                    false,
                    Mat::rows(&ds, n.tk),
                    Mat::rows(kg, n.d),
                );
                matmul_serial(
                    n.tk,
                    n.d,
                    rows,
                    dk,
                    false,
                    Mat::transposed(&ds, n.tk),
                    Mat::rows(qg, n.d),
                );
            });
        out
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        let n = self.check(l1.dims(), l2.dims(), l3.dims())?;
        fn run<T: Real>(
            op: &Attention,
            s: [(&CpuStorage, &Layout); 3],
            n: AttnDims,
        ) -> Result<CpuStorage> {
            let q = contiguous::<T>(s[0].0, s[0].1, op.name(), "q")?;
            let k = contiguous::<T>(s[1].0, s[1].1, op.name(), "k")?;
            let v = contiguous::<T>(s[2].0, s[2].1, op.name(), "v")?;
            op.with_mask(|mask: &[T]| Ok(T::storage(op.forward(q, k, v, mask, n))))
        }
        let out = by_dtype!(
            self,
            s1.dtype(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)], n)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let op = AttentionGrad {
            op: self.clone(),
            // As the mask: read by the f32 kernel when the inputs are bf16.
            q: q.detach()
                .to_dtype(crate::op_rules::accumulation_dtype(q.dtype()))?,
        };
        let packed = grad
            .detach()
            .contiguous()?
            .apply_op3_no_bwd(&k.detach(), &v.detach(), &op)?;
        Ok((
            Some(packed.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(packed.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

/// The backward of [`Attention`] over (grad, k, v), with q carried in the op.
struct AttentionGrad {
    op: Attention,
    q: Tensor,
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        through_f32!(self, (s1, l1), (s2, l2), (s3, l3));
        let n = self.op.check(self.q.dims(), l2.dims(), l3.dims())?;
        if l1.dims() != self.q.dims() {
            bail!(
                "{}: gradient {:?} does not match q {:?}",
                self.name(),
                l1.dims(),
                self.q.dims()
            );
        }
        fn run<T: Real>(
            g: &AttentionGrad,
            s: [(&CpuStorage, &Layout); 3],
            n: AttnDims,
        ) -> Result<CpuStorage> {
            let grad = contiguous::<T>(s[0].0, s[0].1, g.name(), "gradient")?;
            let k = contiguous::<T>(s[1].0, s[1].1, g.name(), "k")?;
            let v = contiguous::<T>(s[2].0, s[2].1, g.name(), "v")?;
            let (storage, layout) = g.q.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                bail!("{}: q must be on the CPU", g.name());
            };
            let q = contiguous::<T>(cpu, layout, g.name(), "q")?;
            g.op.with_mask(|mask: &[T]| Ok(T::storage(g.op.backward(q, k, v, grad, mask, n))))
        }
        let out = by_dtype!(
            self,
            s1.dtype(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)], n)
        );
        Ok((
            out,
            Shape::from(l1.shape().elem_count() + 2 * l2.shape().elem_count()),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::HEAD_CHUNK_ROWS;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    /// Deterministic normal-ish values (uniform sums) `[shape]` in `dtype`.
    pub fn values(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| scale * (rng.random::<f64>() + rng.random::<f64>() - 1.0) * 1.7)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// [`finite_differences`] of `Σ w · op(inputs)` with fixed random weights `w` (drawn from
    /// `seed`), so that every output element's gradient is checked.
    pub fn weighted_finite_differences(
        inputs: &[Tensor],
        check: &[usize],
        seed: u64,
        op: impl Fn(&[Tensor]) -> Tensor,
    ) -> f64 {
        let w = values(op(inputs).dims(), seed, 1.0, DType::F64);
        finite_differences(inputs, check, |t| (op(t) * &w).unwrap().sum_all().unwrap())
    }

    /// Autograd gradients of `f(inputs)` (a scalar) for each input in `check`, against central
    /// finite differences in f64 on every element. Returns the largest relative error.
    pub fn finite_differences(
        inputs: &[Tensor],
        check: &[usize],
        f: impl Fn(&[Tensor]) -> Tensor,
    ) -> f64 {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = f(&tensors).backward().unwrap();
        let mut worst = 0f64;
        for &i in check {
            let grad: Vec<f64> = grads
                .get(&tensors[i])
                .expect("a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let original: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
            for j in 0..original.len() {
                let at = |delta: f64| {
                    let mut moved = inputs.to_vec();
                    let mut v = original.clone();
                    v[j] += delta;
                    moved[i] = Tensor::from_vec(v, inputs[i].shape(), &Device::Cpu).unwrap();
                    f(&moved).to_scalar::<f64>().unwrap()
                };
                let eps = 1e-6;
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                let err = (grad[j] - numeric).abs() / numeric.abs().max(grad[j].abs()).max(1e-3);
                assert!(
                    err < 1e-6,
                    "input {i}[{j}]: autograd {} vs finite difference {numeric}",
                    grad[j]
                );
                worst = worst.max(err);
            }
        }
        worst
    }

    /// Largest |a − b| / max(|b|, floor) over two tensors of one shape.
    pub fn max_rel_diff(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f64> = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f64> = b
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
            .fold(0.0, f64::max)
    }

    /// Values and input gradients of `f(inputs)` reduced to a scalar by a fixed weighted sum.
    fn values_and_grads(
        inputs: &[Tensor],
        f: &dyn Fn(&[Tensor]) -> Tensor,
    ) -> (Tensor, Vec<Option<Tensor>>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&tensors);
        let weights = values(out.dims(), 99, 1.0, out.dtype());
        let grads = (&out * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (out, tensors.iter().map(|t| grads.get(t).cloned()).collect())
    }

    /// The fused op is as close to the truth (the generic ops in f64 on the same inputs) as the
    /// generic ops are, within `slack`×, in value and every input's gradient (errors relative to
    /// each tensor's largest magnitude): in f32, and in bf16 where the CPU has bf16 products.
    pub fn compare_with_generic(
        inputs: &[Tensor],
        slack: f64,
        fused: impl Fn(&[Tensor]) -> Tensor,
        generic: impl Fn(&[Tensor]) -> Tensor,
    ) {
        compare_with_generic_in(DType::F32, inputs, slack, &fused, &generic);
        if crate::matmul::bf16_products_available() {
            compare_with_generic_in(DType::BF16, inputs, slack, &fused, &generic);
        }
    }

    fn compare_with_generic_in(
        dtype: DType,
        inputs: &[Tensor],
        slack: f64,
        fused: &impl Fn(&[Tensor]) -> Tensor,
        generic: &impl Fn(&[Tensor]) -> Tensor,
    ) {
        let cast: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let f64s: Vec<Tensor> = cast
            .iter()
            .map(|t| t.to_dtype(DType::F64).unwrap())
            .collect();
        let (truth, truth_grads) = values_and_grads(&f64s, generic);
        let (ours, our_grads) = values_and_grads(&cast, fused);
        let (theirs, their_grads) = values_and_grads(&cast, generic);
        let scale = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .max(1e-30)
        };
        let err = |a: &Tensor, truth: &Tensor| max_rel_diff(a, truth, scale(truth));
        let check = |what: String, a: &Tensor, b: &Tensor, truth: &Tensor| {
            let (ea, eb) = (err(a, truth), err(b, truth));
            assert!(
                ea <= slack * eb.max(1e-7),
                "{what}: fused {dtype:?} error {ea:e}, generic {dtype:?} error {eb:e}"
            );
        };
        check("values".into(), &ours, &theirs, &truth);
        for (i, truth) in truth_grads.iter().enumerate() {
            match (&our_grads[i], &their_grads[i], truth) {
                (Some(a), Some(b), Some(t)) => check(format!("gradient of input {i}"), a, b, t),
                (None, None, None) => {}
                (a, _, t) => panic!(
                    "input {i}: fused has a gradient: {}, generic: {}",
                    a.is_some(),
                    t.is_some()
                ),
            }
        }
    }

    fn generic_token_logprobs(rows: &Tensor, weight: &Tensor, targets: &[u32]) -> Tensor {
        crate::ops::generic::token_logprobs(rows, weight, targets, HEAD_CHUNK_ROWS).unwrap()
    }

    #[test]
    fn token_logprobs_gradients_match_finite_differences_in_f64() {
        let targets = [3u32, 0, 6, 6, 2];
        let inputs = [
            values(&[5, 4], 1, 1.0, DType::F64),
            values(&[7, 4], 2, 1.0, DType::F64),
        ];
        let w = values(&[5], 3, 1.0, DType::F64);
        // Chunks of 2 rows: three blocks, the last partial, and the weight gradient accumulated.
        let worst = finite_differences(&inputs, &[0, 1], |t| {
            (token_logprobs(&t[0], &t[1], &targets, 2).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
        });
        assert!(worst < 1e-6);
        let fused = token_logprobs(&inputs[0], &inputs[1], &targets, 2).unwrap();
        let generic = generic_token_logprobs(&inputs[0], &inputs[1], &targets);
        assert!(max_rel_diff(&fused, &generic, 1.0) < 1e-14);
    }

    #[test]
    fn token_logprobs_match_the_generic_ops() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let targets: Vec<u32> = (0..300).map(|_| rng.random_range(0..1000)).collect();
        let inputs = [
            values(&[300, 48], 6, 1.0, DType::F32),
            values(&[1000, 48], 7, 0.3, DType::F32),
        ];
        compare_with_generic(
            &inputs,
            2.0,
            |t| token_logprobs(&t[0], &t[1], &targets, HEAD_CHUNK_ROWS).unwrap(),
            |t| generic_token_logprobs(&t[0], &t[1], &targets),
        );
    }

    fn generic_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        crate::ops::generic::rms_norm(x, w, eps).unwrap()
    }

    #[test]
    fn rms_norm_gradients_match_finite_differences_in_f64() {
        let inputs = [
            values(&[2, 3, 5], 10, 1.0, DType::F64),
            values(&[5], 11, 1.0, DType::F64),
        ];
        weighted_finite_differences(&inputs, &[0, 1], 12, |t| {
            rms_norm(&t[0], &t[1], 1e-5).unwrap()
        });
        let fused = rms_norm(&inputs[0], &inputs[1], 1e-5).unwrap();
        assert!(max_rel_diff(&fused, &generic_rms_norm(&inputs[0], &inputs[1], 1e-5), 1.0) < 1e-14);
    }

    #[test]
    fn rms_norm_matches_the_generic_ops() {
        // 150 rows: three row blocks for the weight gradient, the last partial.
        let inputs = [
            values(&[3, 50, 64], 13, 2.0, DType::F64),
            values(&[64], 14, 1.0, DType::F64),
        ];
        compare_with_generic(
            &inputs,
            2.0,
            |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            |t| generic_rms_norm(&t[0], &t[1], 1e-6),
        );
    }

    /// A causal mask with the last `pad` keys of batch row 1 masked too, as the training path
    /// builds it (a padding query attends to itself).
    fn causal_mask(b: usize, t: usize, pad: usize, dtype: DType) -> Tensor {
        let mut m = Vec::new();
        for bi in 0..b {
            for q in 0..t {
                for k in 0..t {
                    let padded = bi == 1 && k >= t - pad;
                    m.push(if k <= q && (!padded || k == q) {
                        0.0
                    } else {
                        -1e30
                    });
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn silu_mul_gradients_match_finite_differences_in_f64() {
        let inputs = [
            values(&[3, 7], 30, 3.0, DType::F64),
            values(&[3, 7], 31, 1.0, DType::F64),
        ];
        weighted_finite_differences(&inputs, &[0, 1], 32, |t| silu_mul(&t[0], &t[1]).unwrap());
        let generic = (inputs[0].silu().unwrap() * &inputs[1]).unwrap();
        assert!(max_rel_diff(&silu_mul(&inputs[0], &inputs[1]).unwrap(), &generic, 1.0) < 1e-14);
    }

    #[test]
    fn silu_mul_matches_the_generic_ops() {
        // More than one parallel block, the last partial.
        let inputs = [
            values(&[40_000], 33, 6.0, DType::F64),
            values(&[40_000], 34, 1.0, DType::F64),
        ];
        compare_with_generic(
            &inputs,
            2.0,
            |t| silu_mul(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }

    /// Tables `[b, t, d/2]` for positions that differ per batch row.
    fn rotary_tables(b: usize, t: usize, d: usize, dtype: DType) -> (Tensor, Tensor) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for bi in 0..b {
            for ti in 0..t {
                for j in 0..d / 2 {
                    let angle = (ti + 3 * bi) as f64 / 10f64.powf(j as f64 / (d / 2) as f64);
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let make = |v: Vec<f64>| {
            Tensor::from_vec(v, (b, t, d / 2), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (make(cos), make(sin))
    }

    fn generic_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Tensor {
        crate::ops::generic::rotary_heads(x, cos, sin, heads).unwrap()
    }

    #[test]
    fn rotary_gradients_match_finite_differences_in_f64() {
        let (cos, sin) = rotary_tables(2, 3, 4, DType::F64);
        let inputs = [values(&[2, 3, 3 * 4], 40, 1.0, DType::F64)];
        weighted_finite_differences(&inputs, &[0], 41, |t| {
            rotary_heads(&t[0], &cos, &sin, 3).unwrap()
        });
        let fused = rotary_heads(&inputs[0], &cos, &sin, 3).unwrap();
        assert!(max_rel_diff(&fused, &generic_rotary(&inputs[0], &cos, &sin, 3), 1.0) < 1e-14);
    }

    #[test]
    fn rotary_matches_the_generic_ops() {
        let (cos, sin) = rotary_tables(3, 17, 16, DType::F64);
        let inputs = [values(&[3, 17, 4 * 16], 42, 1.0, DType::F64)];
        compare_with_generic(
            &inputs,
            2.0,
            |t| {
                rotary_heads(
                    &t[0],
                    &cos.to_dtype(t[0].dtype()).unwrap(),
                    &sin.to_dtype(t[0].dtype()).unwrap(),
                    4,
                )
                .unwrap()
            },
            |t| {
                generic_rotary(
                    &t[0],
                    &cos.to_dtype(t[0].dtype()).unwrap(),
                    &sin.to_dtype(t[0].dtype()).unwrap(),
                    4,
                )
            },
        );
    }

    /// `attend`'s generic composition: GQA by folding the query heads into the rows.
    fn generic_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        crate::ops::generic::attention(q, k, v, mask, scale).unwrap()
    }

    #[test]
    fn attention_gradients_match_finite_differences_in_f64() {
        let mask = causal_mask(2, 3, 1, DType::F64);
        let inputs = [
            values(&[2, 4, 3, 4], 50, 1.0, DType::F64),
            values(&[2, 2, 3, 4], 51, 1.0, DType::F64),
            values(&[2, 2, 3, 4], 52, 1.0, DType::F64),
        ];
        weighted_finite_differences(&inputs, &[0, 1, 2], 53, |t| {
            attention(&t[0], &t[1], &t[2], &mask, 0.5).unwrap()
        });
        let fused = attention(&inputs[0], &inputs[1], &inputs[2], &mask, 0.5).unwrap();
        let generic = generic_attention(&inputs[0], &inputs[1], &inputs[2], &mask, 0.5);
        assert!(max_rel_diff(&fused, &generic, 1.0) < 1e-14);
    }

    #[test]
    fn attention_matches_the_generic_ops() {
        let mask = causal_mask(3, 29, 6, DType::F64);
        let inputs = [
            values(&[3, 6, 29, 16], 54, 1.0, DType::F64),
            values(&[3, 2, 29, 16], 55, 1.0, DType::F64),
            values(&[3, 2, 29, 16], 56, 1.0, DType::F64),
        ];
        compare_with_generic(
            &inputs,
            2.0,
            |t| {
                attention(
                    &t[0],
                    &t[1],
                    &t[2],
                    &mask.to_dtype(t[0].dtype()).unwrap(),
                    0.25,
                )
                .unwrap()
            },
            |t| {
                generic_attention(
                    &t[0],
                    &t[1],
                    &t[2],
                    &mask.to_dtype(t[0].dtype()).unwrap(),
                    0.25,
                )
            },
        );
    }

    #[test]
    fn attention_with_fewer_queries_than_keys() {
        // One new query per sequence against five cached keys, as a masked decode step has it.
        let mut m = vec![0f64; 2 * 5];
        m[4] = -1e30;
        let mask = Tensor::from_vec(m, (2, 1, 1, 5), &Device::Cpu).unwrap();
        let inputs = [
            values(&[2, 4, 1, 8], 57, 1.0, DType::F64),
            values(&[2, 2, 5, 8], 58, 1.0, DType::F64),
            values(&[2, 2, 5, 8], 59, 1.0, DType::F64),
        ];
        weighted_finite_differences(&inputs, &[0, 1, 2], 60, |t| {
            attention(&t[0], &t[1], &t[2], &mask, 0.3).unwrap()
        });
        let fused = attention(&inputs[0], &inputs[1], &inputs[2], &mask, 0.3).unwrap();
        assert!(
            max_rel_diff(
                &fused,
                &generic_attention(&inputs[0], &inputs[1], &inputs[2], &mask, 0.3),
                1.0
            ) < 1e-14
        );
    }

    #[test]
    fn linear_gradients_match_finite_differences_in_f64() {
        let inputs = [
            values(&[2, 3, 5], 70, 1.0, DType::F64),
            values(&[4, 5], 71, 1.0, DType::F64),
        ];
        weighted_finite_differences(&inputs, &[0, 1], 72, |t| linear(&t[0], &t[1]).unwrap());
        let generic = inputs[0].broadcast_matmul(&inputs[1].t().unwrap()).unwrap();
        assert!(max_rel_diff(&linear(&inputs[0], &inputs[1]).unwrap(), &generic, 1.0) < 1e-14);
    }

    /// With the second input frozen (a plain tensor, as LoRA's base weights are), the op gives it
    /// no gradient and the first input's gradient is the one the trainable case gives.
    fn frozen_second_input_gets_no_gradient(
        x: &Tensor,
        w: &Tensor,
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) {
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let both = f(xv.as_tensor(), wv.as_tensor())
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let frozen = f(xv.as_tensor(), w).sum_all().unwrap().backward().unwrap();
        assert!(frozen.get(w).is_none());
        let (a, b) = (
            both.get(xv.as_tensor()).unwrap(),
            frozen.get(xv.as_tensor()).unwrap(),
        );
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
        // Nothing to differentiate: no gradient at all.
        assert!(f(x, w)
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(x)
            .is_none());
    }

    #[test]
    fn frozen_weights_get_no_gradient() {
        let x = values(&[2, 3, 5], 80, 1.0, DType::F64);
        let w = values(&[4, 5], 81, 1.0, DType::F64);
        frozen_second_input_gets_no_gradient(&x, &w, |x, w| linear(x, w).unwrap());
        let rows = values(&[7, 6], 82, 1.0, DType::F64);
        let head = values(&[11, 6], 83, 1.0, DType::F64);
        let targets = [0u32, 3, 10, 5, 5, 1, 9];
        frozen_second_input_gets_no_gradient(&rows, &head, |r, h| {
            token_logprobs(r, h, &targets, 3).unwrap()
        });
    }

    #[test]
    fn kept_and_recomputed_logits_give_the_same_gradients() {
        let rows = Var::from_tensor(&values(&[7, 6], 85, 1.0, DType::F32)).unwrap();
        let head = Var::from_tensor(&values(&[11, 6], 86, 1.0, DType::F32)).unwrap();
        let targets = [0u32, 3, 10, 5, 5, 1, 9];
        let loss = token_logprobs(rows.as_tensor(), head.as_tensor(), &targets, 3)
            .unwrap()
            .sum_all()
            .unwrap();
        // The first backward pass takes the logits the forward pass kept; the second finds none.
        let kept = loss.backward().unwrap();
        let recomputed = loss.backward().unwrap();
        for var in [&rows, &head] {
            let grad = |g: &candle_core::backprop::GradStore| {
                g.get(var.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
            };
            assert_eq!(grad(&kept), grad(&recomputed));
        }
    }

    #[test]
    fn embedding_matches_the_generic_ops() {
        let ids = Tensor::new(&[[3u32, 0, 3], [9, 1, 3]], &Device::Cpu).unwrap();
        let inputs = [values(&[10, 6], 84, 1.0, DType::F64)];
        compare_with_generic(
            &inputs,
            1.0,
            |t| embedding(&t[0], &ids).unwrap(),
            |t| crate::ops::generic::embedding(&t[0], &ids).unwrap(),
        );
        let outside = Tensor::new(&[10u32], &Device::Cpu).unwrap();
        let err = embedding(&inputs[0], &outside).unwrap_err().to_string();
        assert!(
            err.contains("id 10 is outside the vocabulary of 10"),
            "{err}"
        );
    }

    #[test]
    fn lora_linear_gradients_match_finite_differences_in_f64() {
        let inputs = [
            values(&[2, 3, 5], 90, 1.0, DType::F64),
            values(&[4, 5], 91, 1.0, DType::F64),
            values(&[2, 5], 92, 1.0, DType::F64),
            values(&[4, 2], 93, 1.0, DType::F64),
        ];
        weighted_finite_differences(&inputs, &[0, 1, 2, 3], 94, |t| {
            lora_linear(&t[0], &t[1], &t[2], &t[3]).unwrap()
        });
    }

    #[test]
    fn lora_linear_matches_the_generic_ops() {
        let inputs = [
            values(&[4, 37, 48], 95, 1.0, DType::F64),
            values(&[40, 48], 96, 0.2, DType::F64),
            values(&[16, 48], 97, 0.2, DType::F64),
            values(&[40, 16], 98, 0.2, DType::F64),
        ];
        compare_with_generic(
            &inputs,
            2.0,
            |t| lora_linear(&t[0], &t[1], &t[2], &t[3]).unwrap(),
            |t| crate::ops::generic::lora_linear(&t[0], &t[1], &t[2], &t[3]).unwrap(),
        );
        // A frozen base weight (LoRA's) gets no gradient; the adapters and the input do.
        frozen_second_input_gets_no_gradient(&inputs[0], &inputs[1], |x, w| {
            lora_linear(x, w, &inputs[2], &inputs[3]).unwrap()
        });
    }

    #[test]
    fn linear_matches_the_generic_ops() {
        let inputs = [
            values(&[4, 37, 48], 73, 1.0, DType::F64),
            values(&[40, 48], 74, 0.2, DType::F64),
        ];
        compare_with_generic(
            &inputs,
            2.0,
            |t| linear(&t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
        );
    }
}
