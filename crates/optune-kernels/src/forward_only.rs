//! Ops of generation's forward passes, which need no gradient, one kernel each on CUDA
//! (src/cuda/forward_only.cu) where the differentiable form takes two or more: the residual add
//! fused into the RMS norm after it, the SwiGLU gate, and Qwen3's norms of each query and key
//! head over the stacked q/k/v projection. [`crate::ops`] picks them on the generic
//! path for a [`crate::ops::Pass::Generation`]; passes set against training's (reference
//! log-probs) keep the differentiable forms, whose rounding these do not share.
//!
//! The CPU forms below are the specification: every value is computed in f32 from the inputs'
//! values and rounded once to the dtype, except the residual sum, which is rounded to the dtype
//! before its statistics are taken, since the stream is stored so.

use crate::kernel_args::{check_kernel_dtypes, KernelArg};
use crate::storage::stored_like;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Threads of a block of the CUDA kernels (THREADS in the kernel).
const THREADS: u32 = 256;
/// Heads a block of head_rms_norm takes, one warp each (HEAD_WARPS in the kernel).
const HEAD_WARPS: u32 = 4;
/// Below this many elements a CPU form runs on the calling thread: for a decode step's few rows,
/// waking the thread pool costs more than the work.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// `x + delta` and its RMS norm scaled by `weight [hidden]`, for `x`, `delta [.., hidden]` of
/// one dtype (f32, bf16 or f16): `(sum, normed)`, both shaped as `x`.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    if delta.dims() != x.dims() || weight.dims() != [hidden] {
        bail!(
            "add_rms_norm: delta {:?} and weight {:?} for x {:?}",
            delta.dims(),
            weight.dims(),
            x.dims()
        );
    }
    check_kernel_dtypes("add_rms_norm", &[x, delta, weight])?;
    let rows = x.elem_count() / hidden;
    if rows == 0 || hidden == 0 {
        bail!("add_rms_norm: no elements in x {:?}", x.dims());
    }
    let both = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        &weight.contiguous()?,
        &AddRmsNorm { eps: eps as f32 },
    )?;
    Ok((
        both.get(0)?.reshape(x.shape())?,
        both.get(1)?.reshape(x.shape())?,
    ))
}

/// `silu(gate) · up` for `gate_up [.., 2·width]` holding the gate projection's `width` columns and
/// then the up projection's (as one product over the two stacked weights gives them):
/// `[.., width]`. f32, bf16 or f16.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let both = gate_up.dim(candle_core::D::Minus1)?;
    if both % 2 != 0 || gate_up.elem_count() == 0 {
        bail!(
            "silu_mul: gate and up {:?}: two halves of one width",
            gate_up.dims()
        );
    }
    check_kernel_dtypes("silu_mul", &[gate_up])?;
    gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
}

/// `rows [.., heads_per_row·d]` holding each token's query heads, then its key heads, then the
/// rest (values), with each of the first `q_heads` heads normalised over its `d` values and
/// scaled by `q_weight [d]`, each of the next `k_heads` by `k_weight [d]`, the rest as they are:
/// Qwen3's norms before the rotary embedding, over the one stacked q/k/v product. f32, bf16 or
/// f16.
pub fn head_rms_norm(
    rows: &Tensor,
    [q_weight, k_weight]: [&Tensor; 2],
    (q_heads, k_heads): (usize, usize),
    eps: f64,
) -> Result<Tensor> {
    let d = q_weight.elem_count();
    let width = rows.dim(candle_core::D::Minus1)?;
    if d == 0
        || q_weight.dims() != [d]
        || k_weight.dims() != [d]
        || width % d != 0
        || width / d < q_heads + k_heads
        || rows.elem_count() == 0
    {
        bail!(
            "head_rms_norm: weights {:?} and {:?} for {q_heads} + {k_heads} heads of rows {:?}",
            q_weight.dims(),
            k_weight.dims(),
            rows.dims()
        );
    }
    check_kernel_dtypes("head_rms_norm", &[rows, q_weight, k_weight])?;
    rows.contiguous()?.apply_op3_no_bwd(
        &q_weight.contiguous()?,
        &k_weight.contiguous()?,
        &HeadRmsNorm {
            q_heads,
            k_heads,
            eps: eps as f32,
        },
    )
}

/// The value `v` as stored in the dtype of `like` (rounded to nearest even), back in f32.
fn rounding(like: &CpuStorage) -> fn(f32) -> f32 {
    match like {
        CpuStorage::BF16(_) => |v| half::bf16::from_f32(v).to_f32(),
        CpuStorage::F16(_) => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        delta: &CpuStorage,
        ld: &Layout,
        weight: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let read = |s, l, what| crate::storage::floats(s, l, "add_rms_norm", what);
        let (xs, deltas, weight) = (
            read(x, lx, "x")?,
            read(delta, ld, "delta")?,
            read(weight, lw, "weight")?,
        );
        let hidden = weight.len();
        let rows = xs.len() / hidden;
        let round = rounding(x);
        let mut out = vec![0f32; 2 * rows * hidden];
        let (sums, normed) = out.split_at_mut(rows * hidden);
        let row_of = |(row, (sum, normed)): (usize, (&mut [f32], &mut [f32]))| {
            let at = row * hidden;
            let mut squares = 0f32;
            for (i, s) in sum.iter_mut().enumerate() {
                *s = round(xs[at + i] + deltas[at + i]);
                squares += *s * *s;
            }
            let inverse = 1.0 / (squares / hidden as f32 + self.eps).sqrt();
            for ((n, &s), &w) in normed.iter_mut().zip(sum.iter()).zip(weight.iter()) {
                *n = round(s * inverse * w);
            }
        };
        if rows * hidden < PARALLEL_ELEMENTS {
            let rows = sums.chunks_mut(hidden).zip(normed.chunks_mut(hidden));
            rows.enumerate().for_each(row_of);
        } else {
            let rows = sums
                .par_chunks_mut(hidden)
                .zip(normed.par_chunks_mut(hidden));
            rows.enumerate().for_each(row_of);
        }
        Ok((stored_like(out, x), Shape::from((2, rows, hidden))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        delta: &candle_core::CudaStorage,
        ld: &Layout,
        weight: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let hidden = lw.shape().elem_count();
        let rows = lx.shape().elem_count() / hidden;
        let out = crate::kernel_args::cuda::launch_new(
            MODULE,
            "add_rms_norm",
            [(x, lx), (delta, ld), (weight, lw)],
            2 * rows * hidden,
            add_rms_norm_launch(rows),
            |[x, delta, weight], out| {
                add_rms_norm_args([x, delta, weight, out], rows, hidden, self.eps)
            },
        )?;
        Ok((out, Shape::from((2, rows, hidden))))
    }
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, gate_up: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::storage::floats(gate_up, l, "silu_mul", "gate and up")?;
        let width = l.dims()[l.dims().len() - 1] / 2;
        let round = rounding(gate_up);
        let gated = |row: &[f32]| -> Vec<f32> {
            let (gate, up) = row.split_at(width);
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| round(g / (1.0 + (-g).exp()) * u))
                .collect()
        };
        let out: Vec<f32> = if x.len() < PARALLEL_ELEMENTS {
            x.chunks(2 * width).flat_map(gated).collect()
        } else {
            x.par_chunks(2 * width).flat_map_iter(gated).collect()
        };
        Ok((stored_like(out, gate_up), halved(l.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate_up: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = halved(l.shape());
        let (n, width) = (shape.elem_count(), shape.dims()[shape.rank() - 1]);
        let out = crate::kernel_args::cuda::launch_new(
            MODULE,
            "silu_mul",
            [(gate_up, l)],
            n,
            crate::kernel_args::elementwise_launch(n),
            |[gate_up], out| silu_mul_args([gate_up, out], n, width),
        )?;
        Ok((out, shape))
    }
}

struct HeadRmsNorm {
    q_heads: usize,
    k_heads: usize,
    eps: f32,
}

impl CustomOp3 for HeadRmsNorm {
    fn name(&self) -> &'static str {
        "head-rms-norm"
    }

    fn cpu_fwd(
        &self,
        rows: &CpuStorage,
        lr: &Layout,
        q_weight: &CpuStorage,
        lq: &Layout,
        k_weight: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let read = |s, l, what| crate::storage::floats(s, l, "head_rms_norm", what);
        let (x, q_weight, k_weight) = (
            read(rows, lr, "rows")?,
            read(q_weight, lq, "q_weight")?,
            read(k_weight, lk, "k_weight")?,
        );
        let d = q_weight.len();
        let heads_per_row = lr.dims()[lr.dims().len() - 1] / d;
        let round = rounding(rows);
        let mut out = x.to_vec();
        let head_of = |(unit, head): (usize, &mut [f32])| {
            let weight = match unit % heads_per_row {
                h if h < self.q_heads => &q_weight,
                h if h < self.q_heads + self.k_heads => &k_weight,
                _ => return,
            };
            let squares: f32 = head.iter().map(|v| v * v).sum();
            let inverse = 1.0 / (squares / d as f32 + self.eps).sqrt();
            for (v, &w) in head.iter_mut().zip(weight.iter()) {
                *v = round(*v * inverse * w);
            }
        };
        if out.len() < PARALLEL_ELEMENTS {
            out.chunks_mut(d).enumerate().for_each(head_of);
        } else {
            out.par_chunks_mut(d).enumerate().for_each(head_of);
        }
        Ok((stored_like(out, rows), lr.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        rows: &candle_core::CudaStorage,
        lr: &Layout,
        q_weight: &candle_core::CudaStorage,
        lq: &Layout,
        k_weight: &candle_core::CudaStorage,
        lk: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = lq.shape().elem_count();
        let n = lr.shape().elem_count();
        let heads_per_row = lr.dims()[lr.dims().len() - 1] / d;
        let units = n / d;
        let out = crate::kernel_args::cuda::launch_new(
            MODULE,
            "head_rms_norm",
            [(rows, lr), (q_weight, lq), (k_weight, lk)],
            n,
            head_rms_norm_launch(units),
            |[rows, q_weight, k_weight], out| {
                let heads = (heads_per_row, self.q_heads, self.k_heads, d);
                head_rms_norm_args([rows, q_weight, k_weight, out], units, heads, self.eps)
            },
        )?;
        Ok((out, lr.shape().clone()))
    }
}

/// `shape` with its last axis halved.
fn halved(shape: &Shape) -> Shape {
    let mut dims = shape.dims().to_vec();
    let last = dims.len() - 1;
    dims[last] /= 2;
    Shape::from(dims)
}

/// add_rms_norm's arguments (src/cuda/forward_only.cu) over `rows` rows of `hidden`: the
/// addresses of `x`, `delta`, `weight` and `out`, then the sizes and `eps`. The CUDA launch and
/// the emulated tests both pass this list.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn add_rms_norm_args(
    [x, delta, weight, out]: [u64; 4],
    rows: usize,
    hidden: usize,
    eps: f32,
) -> Result<Vec<KernelArg>> {
    Ok(vec![
        KernelArg::Pointer(x),
        KernelArg::Pointer(delta),
        KernelArg::Pointer(weight),
        KernelArg::Pointer(out),
        KernelArg::int(rows, "rows")?,
        KernelArg::int(hidden, "hidden")?,
        KernelArg::F32(eps),
    ])
}

/// silu_mul's arguments (src/cuda/forward_only.cu) for `n` outputs of rows `width` wide: the
/// addresses of `gate_up` and `out`, then the sizes.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn silu_mul_args([gate_up, out]: [u64; 2], n: usize, width: usize) -> Result<Vec<KernelArg>> {
    Ok(vec![
        KernelArg::Pointer(gate_up),
        KernelArg::Pointer(out),
        KernelArg::U64(n as u64),
        KernelArg::int(width, "width")?,
    ])
}

/// head_rms_norm's arguments (src/cuda/forward_only.cu) over `units` heads of `d` values: the
/// addresses of `rows`, `q_weight`, `k_weight` and `out`, then the count, the heads of a row,
/// of q and of k, `d` and `eps`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn head_rms_norm_args(
    [rows, q_weight, k_weight, out]: [u64; 4],
    units: usize,
    (heads_per_row, q_heads, k_heads, d): (usize, usize, usize, usize),
    eps: f32,
) -> Result<Vec<KernelArg>> {
    Ok(vec![
        KernelArg::Pointer(rows),
        KernelArg::Pointer(q_weight),
        KernelArg::Pointer(k_weight),
        KernelArg::Pointer(out),
        KernelArg::U64(units as u64),
        KernelArg::int(heads_per_row, "heads_per_row")?,
        KernelArg::int(q_heads, "q_heads")?,
        KernelArg::int(k_heads, "k_heads")?,
        KernelArg::int(d, "d")?,
        KernelArg::F32(eps),
    ])
}

/// The CUDA launch of head_rms_norm over `units` heads: a warp each, [`HEAD_WARPS`] to a block;
/// `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn head_rms_norm_launch(units: usize) -> (u32, u32) {
    (units.div_ceil(HEAD_WARPS as usize) as u32, 32 * HEAD_WARPS)
}

/// The CUDA launch of add_rms_norm over `rows` rows: one block of [`THREADS`] per row;
/// `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn add_rms_norm_launch(rows: usize) -> (u32, u32) {
    (rows as u32, THREADS)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fused::tests::f32_elements;
    use crate::kernel_args::{elementwise_launch, emulated};
    use candle_core::DType;
    use candle_core::{Device, Var};
    use optune_cuda_emulator::{in_both_placements, Element, Launch};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `n` values uniform in `[-spread, spread)`, seeded.
    pub(crate) fn random(n: usize, spread: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * spread)
            .collect()
    }

    fn worst(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0f32, f32::max)
    }

    const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    /// Within one rounding of the dtype of each other, relative.
    fn tolerance(dtype: DType) -> f32 {
        match dtype {
            DType::F32 => 2e-6,
            DType::BF16 => 8e-3,
            _ => 1e-3,
        }
    }

    /// The one-op forms against the add, candle-nn's RMS norm and candle's SiLU and product.
    #[test]
    fn the_one_op_forms_match_the_composed_ops() {
        // A decode step's few rows (on the calling thread) and a prefill's many (on the pool).
        for ((rows, hidden), dtype) in [(5, 96), (40, 2048)]
            .into_iter()
            .flat_map(|size| DTYPES.map(|dtype| (size, dtype)))
        {
            let tensor = |v: Vec<f32>, shape: &[usize]| {
                Tensor::from_vec(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let x = tensor(random(rows * hidden, 3.0, 1), &[rows, hidden]);
            let delta = tensor(random(rows * hidden, 1.0, 2), &[rows, hidden]);
            let weight = tensor(random(hidden, 1.0, 3), &[hidden]);
            let (sum, normed) = add_rms_norm(&x, &delta, &weight, 1e-5).unwrap();
            let want_sum = (&x + &delta).unwrap();
            let want_normed = crate::ops::generic::rms_norm(&want_sum, &weight, 1e-5).unwrap();
            assert_eq!(f32_elements(&sum), f32_elements(&want_sum), "{dtype:?}");
            // candle-nn's norm and candle's SiLU round an intermediate to the dtype, these round
            // once: two roundings apart at most.
            let off = worst(&f32_elements(&normed), &f32_elements(&want_normed));
            assert!(off <= 2.0 * tolerance(dtype), "{dtype:?} norm: {off}");
            let gated = silu_mul(&Tensor::cat(&[&x, &delta], 1).unwrap()).unwrap();
            let want = (x.silu().unwrap() * &delta).unwrap();
            let off = worst(&f32_elements(&gated), &f32_elements(&want));
            assert!(off <= 2.0 * tolerance(dtype), "{dtype:?} silu_mul: {off}");
        }
    }

    /// Qwen3's head norms as one op against candle-nn's RMS norm on each part (q's heads, k's)
    /// and the values untouched; rows whose heads are not a multiple of a warp wide, and more
    /// heads in a row than the norms take (v's).
    #[test]
    fn the_head_norms_match_the_composed_ops() {
        for ((tokens, (q_heads, k_heads, v_heads), d), dtype) in
            [(3, (4, 2, 2), 40), (70, (8, 2, 2), 128)]
                .into_iter()
                .flat_map(|size| DTYPES.map(|dtype| (size, dtype)))
        {
            let tensor = |v: Vec<f32>, shape: &[usize]| {
                Tensor::from_vec(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let width = (q_heads + k_heads + v_heads) * d;
            let rows = tensor(random(tokens * width, 3.0, 11), &[tokens, width]);
            let q_weight = tensor(random(d, 1.0, 12), &[d]);
            let k_weight = tensor(random(d, 1.0, 13), &[d]);
            let got =
                head_rms_norm(&rows, [&q_weight, &k_weight], (q_heads, k_heads), 1e-6).unwrap();
            assert_eq!(got.dims(), rows.dims());
            let part = |t: &Tensor, from: usize, heads: usize| {
                t.narrow(1, from * d, heads * d)
                    .unwrap()
                    .reshape((tokens, heads, d))
                    .unwrap()
            };
            for (from, heads, weight) in [(0, q_heads, &q_weight), (q_heads, k_heads, &k_weight)] {
                let want =
                    crate::ops::generic::rms_norm(&part(&rows, from, heads), weight, 1e-6).unwrap();
                let off = worst(
                    &f32_elements(&part(&got, from, heads)),
                    &f32_elements(&want),
                );
                assert!(off <= 2.0 * tolerance(dtype), "{dtype:?} d {d}: {off}");
            }
            let values = q_heads + k_heads;
            assert_eq!(
                f32_elements(&part(&got, values, v_heads)),
                f32_elements(&part(&rows, values, v_heads)),
                "{dtype:?}"
            );
        }
    }

    /// head_rms_norm's kernel by the emulator, with the CUDA path's launch and argument list.
    fn head_kernel<T: Element + candle_core::WithDType>(
        rows: &Tensor,
        [q_weight, k_weight]: [&Tensor; 2],
        (q_heads, k_heads): (usize, usize),
    ) -> Vec<f32> {
        let d = q_weight.elem_count();
        let heads_per_row = rows.dim(1).unwrap() / d;
        let units = rows.elem_count() / d;
        let (rows, q_weight, k_weight) =
            (flat::<T>(rows), flat::<T>(q_weight), flat::<T>(k_weight));
        let kernel = format!("head_rms_norm_{}", T::SUFFIX);
        let out = in_both_placements(&kernel, |memory| {
            let [rows_at, q_at, k_at] = [&rows, &q_weight, &k_weight].map(|v| memory.input(v));
            let out = memory.output::<T>(rows.len());
            let heads = (heads_per_row, q_heads, k_heads, d);
            let args = head_rms_norm_args([rows_at, q_at, k_at, out.address], units, heads, 1e-6)
                .map_err(|e| e.to_string())?;
            let (grid, block) = head_rms_norm_launch(units);
            // SAFETY: rows and out hold units·d elements and each weight d, as the kernel reads
            // and writes them for these arguments.
            unsafe { memory.launch(&kernel, Launch { grid, block }, &emulated(&args)) }?;
            Ok(memory.read(&out))
        });
        widen(out.unwrap())
    }

    /// The CUDA head norm against its CPU form: the values copied to the bit, the norms within a
    /// rounding (the sum of squares is added in another order); a last block with idle warps
    /// (7 heads a token), heads narrower and wider than a warp.
    #[test]
    fn the_cuda_head_norm_matches_the_cpu_form() {
        for (tokens, (q_heads, k_heads, v_heads), d) in [(3, (3, 2, 2), 24), (5, (4, 2, 2), 72)] {
            for dtype in DTYPES {
                let tensor = |v: Vec<f32>, shape: &[usize]| {
                    Tensor::from_vec(v, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let width = (q_heads + k_heads + v_heads) * d;
                let rows = tensor(random(tokens * width, 3.0, 14), &[tokens, width]);
                let weights = [
                    tensor(random(d, 1.0, 15), &[d]),
                    tensor(random(d, 1.0, 16), &[d]),
                ];
                let weights = [&weights[0], &weights[1]];
                let heads = (q_heads, k_heads);
                let got = match dtype {
                    DType::F32 => head_kernel::<f32>(&rows, weights, heads),
                    DType::BF16 => head_kernel::<half::bf16>(&rows, weights, heads),
                    _ => head_kernel::<half::f16>(&rows, weights, heads),
                };
                let want = f32_elements(&head_rms_norm(&rows, weights, heads, 1e-6).unwrap());
                let normed = (q_heads + k_heads) * d;
                for (got, want) in got.chunks(width).zip(want.chunks(width)) {
                    let off = worst(&got[..normed], &want[..normed]);
                    assert!(off <= tolerance(dtype), "{dtype:?} d {d}: {off}");
                    assert_eq!(got[normed..], want[normed..], "{dtype:?} values");
                }
            }
        }
    }

    /// A differentiable pass keeps the differentiable forms: a variable gets its gradient through
    /// the add and the norm (on the path `make test` runs: fused, then generic).
    #[test]
    fn a_variable_keeps_its_gradient() {
        let x = Var::from_vec(random(2 * 8, 1.0, 4), (2, 8), &Device::Cpu).unwrap();
        let delta = Tensor::from_vec(random(2 * 8, 1.0, 5), (2, 8), &Device::Cpu).unwrap();
        let weight = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
        let pass = crate::ops::Pass::Differentiable;
        let (_, normed) = crate::ops::add_rms_norm(&x, &delta, &weight, 1e-5, pass).unwrap();
        let grads = normed.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
    }

    /// A tensor's elements, flattened, as `T`.
    pub(crate) fn flat<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn widen<T: candle_core::WithDType>(v: Vec<T>) -> Vec<f32> {
        v.into_iter().map(|x| x.to_f64() as f32).collect()
    }

    /// Both kernels by the emulator on `x`, `delta [rows, hidden]` and `weight` (the gate's input
    /// the two side by side, `[rows, 2·hidden]`), each with the CUDA path's launch and argument
    /// list and the gate also with one block striding: the add+norm's output `[2, rows, hidden]`
    /// and the gate's, once per launch.
    fn kernels<T: Element + candle_core::WithDType>(
        x: &Tensor,
        delta: &Tensor,
        weight: &Tensor,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let (rows, hidden) = x.dims2().unwrap();
        let gate_up = flat::<T>(&Tensor::cat(&[x, delta], 1).unwrap());
        let (x, delta, weight) = (flat::<T>(x), flat::<T>(delta), flat::<T>(weight));
        let kernel = format!("add_rms_norm_{}", T::SUFFIX);
        let norm = in_both_placements(&kernel, |memory| {
            let inputs = [&x, &delta, &weight].map(|v| memory.input(v));
            let out = memory.output::<T>(2 * rows * hidden);
            let [x, delta, weight] = inputs;
            let args = add_rms_norm_args([x, delta, weight, out.address], rows, hidden, 1e-5)
                .map_err(|e| e.to_string())?;
            let (grid, block) = add_rms_norm_launch(rows);
            // SAFETY: x and delta hold rows·hidden elements, weight hidden and out
            // 2·rows·hidden, as the kernel reads and writes them for these arguments.
            unsafe { memory.launch(&kernel, Launch { grid, block }, &emulated(&args)) }?;
            Ok(memory.read(&out))
        })
        .unwrap();
        let (grid, block) = elementwise_launch(x.len());
        let kernel = format!("silu_mul_{}", T::SUFFIX);
        let gates = [
            Launch { grid, block },
            Launch {
                grid: 1,
                block: 256,
            },
        ]
        .map(|launch| {
            let gated = in_both_placements(&kernel, |memory| {
                let input = memory.input(&gate_up);
                let out = memory.output::<T>(x.len());
                let args = silu_mul_args([input, out.address], x.len(), hidden)
                    .map_err(|e| e.to_string())?;
                // SAFETY: gate_up holds 2n elements and out n, for n = rows·hidden.
                unsafe { memory.launch(&kernel, launch, &emulated(&args)) }?;
                Ok(memory.read(&out))
            });
            widen(gated.unwrap())
        });
        (widen(norm), gates.to_vec())
    }

    /// The CUDA kernels (src/cuda/forward_only.cu), run by the emulator with the CUDA path's
    /// launches, against the CPU forms: the sums and the gate to the bit, the norm within a
    /// rounding (its sum of squares is added in another order).
    #[test]
    fn the_cuda_kernels_match_the_cpu_forms() {
        // Rows wider and narrower than a block.
        for (rows, hidden) in [(3, 600), (4, 96)] {
            for dtype in DTYPES {
                let tensor = |v: Vec<f32>, shape: &[usize]| {
                    Tensor::from_vec(v, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let x = tensor(random(rows * hidden, 3.0, 6), &[rows, hidden]);
                let delta = tensor(random(rows * hidden, 1.0, 7), &[rows, hidden]);
                let weight = tensor(random(hidden, 1.0, 8), &[hidden]);
                let (norm, gates) = match dtype {
                    DType::F32 => kernels::<f32>(&x, &delta, &weight),
                    DType::BF16 => kernels::<half::bf16>(&x, &delta, &weight),
                    _ => kernels::<half::f16>(&x, &delta, &weight),
                };
                let (sum, normed) = add_rms_norm(&x, &delta, &weight, 1e-5).unwrap();
                let (got_sum, got_normed) = norm.split_at(rows * hidden);
                assert_eq!(got_sum, f32_elements(&sum), "{dtype:?} sums");
                let off = worst(got_normed, &f32_elements(&normed));
                assert!(off <= tolerance(dtype), "{dtype:?} norm: {off}");
                let gated =
                    f32_elements(&silu_mul(&Tensor::cat(&[&x, &delta], 1).unwrap()).unwrap());
                for got in gates {
                    assert_eq!(got, gated, "{dtype:?} silu_mul");
                }
            }
        }
    }
}

/// This module's kernels (src/cuda/forward_only.cu).
#[cfg(feature = "cuda")]
const MODULE: crate::kernel_args::cuda::Module = crate::kernel_args::cuda::Module {
    name: "optune_forward_only",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/forward_only.ptx")),
};
