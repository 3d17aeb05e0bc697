//! Ops of generation's forward passes, which need no gradient, one kernel each on CUDA
//! (src/cuda/forward_only.cu) where the differentiable form takes two or three: the residual add
//! fused into the RMS norm after it, and the SwiGLU gate. [`crate::ops`] picks them on the generic
//! path for a [`crate::ops::Pass::Generation`]; passes set against training's (reference
//! log-probs) keep the differentiable forms, whose rounding these do not share.
//!
//! The CPU forms below are the specification: every value is computed in f32 from the inputs'
//! values and rounded once to the dtype, except the residual sum, which is rounded to the dtype
//! before its statistics are taken, since the stream is stored so.

use crate::kernel_args::KernelArg;
use crate::storage::stored_like;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Threads of a block of the CUDA kernels (THREADS in the kernel).
const THREADS: u32 = 256;
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
    check_dtypes("add_rms_norm", &[x, delta, weight])?;
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
    check_dtypes("silu_mul", &[gate_up])?;
    gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
}

/// Whether this module's ops take tensors of `dtype`.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

fn check_dtypes(op: &str, tensors: &[&Tensor]) -> Result<()> {
    let dtype = tensors[0].dtype();
    if !supports(dtype) || tensors.iter().any(|t| t.dtype() != dtype) {
        let dtypes: Vec<DType> = tensors.iter().map(|t| t.dtype()).collect();
        bail!("{op}: dtypes {dtypes:?}, expected one of f32, bf16, f16");
    }
    Ok(())
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

/// The CUDA launch of add_rms_norm over `rows` rows: one block of [`THREADS`] per row;
/// `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn add_rms_norm_launch(rows: usize) -> (u32, u32) {
    (rows as u32, THREADS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::f32_elements;
    use crate::kernel_args::{elementwise_launch, emulated};
    use candle_core::{Device, Var};
    use optune_cuda_emulator::{in_both_placements, Element, Launch};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, spread: f32, seed: u64) -> Vec<f32> {
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

    fn flat<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
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
