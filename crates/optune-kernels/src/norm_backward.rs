//! The RMS norm's backward pass as one op: one kernel on CUDA (src/cuda/norm_backward.cu) where
//! the same pass composed of tensor ops takes about fifteen (casts to f32, broadcast products,
//! two means, a difference), each a pass over the activations. In a bf16 DPO step of a 1.1B llama
//! on an H200 those composed passes took about a quarter of the step's kernel time (ncu,
//! 2026-12-04: `bmul_f32` alone 36 ms of 221). [`crate::ops::generic::rms_norm`]'s node calls
//! it on every device, so the CPU runs the op graph a GPU runs.
//!
//! The CPU form below is the specification: per row, in f32 from the inputs' values, each output
//! rounded once to the dtype.

use crate::kernel_args::{check_kernel_dtypes, KernelArg};
use crate::storage::stored_like;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Threads of a block of the CUDA kernel (THREADS in the kernel).
const THREADS: u32 = 256;
/// Below this many elements the CPU form runs on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// The gradients of `y = x / rms(x) · weight` for `x`, `grad [.., hidden]` and `weight [hidden]`
/// of one dtype (f32, bf16 or f16), `rms(x) = sqrt(mean(x²) + eps)` over the last axis: `∂x`
/// shaped as `x`, and with `weight_rows` the rows `g · x / rms(x)` as `[rows, hidden]`, whose
/// column sums are `∂weight`.
pub(crate) fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f64,
    weight_rows: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let hidden = weight.elem_count();
    if weight.dims() != [hidden]
        || x.dims() != grad.dims()
        || x.dim(candle_core::D::Minus1)? != hidden
    {
        bail!(
            "rms_norm_backward: x {:?}, weight {:?}, grad {:?}",
            x.dims(),
            weight.dims(),
            grad.dims()
        );
    }
    check_kernel_dtypes("rms_norm_backward", &[x, weight, grad])?;
    let rows = x.elem_count() / hidden;
    if rows == 0 {
        bail!("rms_norm_backward: no rows in x {:?}", x.dims());
    }
    let out = x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &grad.contiguous()?,
        &RmsNormBackward {
            eps: eps as f32,
            weight_rows,
        },
    )?;
    let x_grad = out.get(0)?.reshape(x.shape())?;
    let rows_out = match weight_rows {
        true => Some(out.get(1)?),
        false => None,
    };
    Ok((x_grad, rows_out))
}

struct RmsNormBackward {
    eps: f32,
    weight_rows: bool,
}

impl RmsNormBackward {
    /// The output's shape: `[1 or 2, rows, hidden]`.
    fn shape(&self, rows: usize, hidden: usize) -> Shape {
        Shape::from((1 + usize::from(self.weight_rows), rows, hidden))
    }
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        weight: &CpuStorage,
        lw: &Layout,
        grad: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let read = |s, l, what| crate::storage::floats(s, l, "rms_norm_backward", what);
        let (xs, weight, grads) = (
            read(x, lx, "x")?,
            read(weight, lw, "weight")?,
            read(grad, lg, "grad")?,
        );
        let hidden = weight.len();
        let rows = xs.len() / hidden;
        let mut out = vec![0f32; (1 + usize::from(self.weight_rows)) * rows * hidden];
        let (x_grads, weight_rows) = out.split_at_mut(rows * hidden);
        let row_of = |(row, (x_grad, weight_row)): (usize, (&mut [f32], Option<&mut [f32]>))| {
            let at = row * hidden;
            let (x, g) = (&xs[at..at + hidden], &grads[at..at + hidden]);
            let (mut squares, mut dot) = (0f32, 0f32);
            for i in 0..hidden {
                squares += x[i] * x[i];
                dot += g[i] * weight[i] * x[i];
            }
            let inverse = 1.0 / (squares / hidden as f32 + self.eps).sqrt();
            let projection = dot * inverse / hidden as f32;
            for i in 0..hidden {
                let n = x[i] * inverse;
                x_grad[i] = (g[i] * weight[i] - n * projection) * inverse;
            }
            if let Some(weight_row) = weight_row {
                for i in 0..hidden {
                    weight_row[i] = g[i] * x[i] * inverse;
                }
            }
        };
        // Each row's slice of the weight's rows, or none (then `weight_rows` is empty).
        let weight_slots: Vec<Option<&mut [f32]>> = match self.weight_rows {
            true => weight_rows.chunks_mut(hidden).map(Some).collect(),
            false => (0..rows).map(|_| None).collect(),
        };
        if rows * hidden < PARALLEL_ELEMENTS {
            let rows = x_grads.chunks_mut(hidden).zip(weight_slots);
            rows.enumerate().for_each(row_of);
        } else {
            let rows = x_grads.par_chunks_mut(hidden).zip(weight_slots);
            rows.enumerate().for_each(row_of);
        }
        Ok((stored_like(out, x), self.shape(rows, hidden)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        weight: &candle_core::CudaStorage,
        lw: &Layout,
        grad: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let hidden = lw.shape().elem_count();
        let rows = lx.shape().elem_count() / hidden;
        let shape = self.shape(rows, hidden);
        let out = crate::kernel_args::cuda::launch_new(
            MODULE,
            "rms_norm_backward",
            [(x, lx), (weight, lw), (grad, lg)],
            shape.elem_count(),
            rms_norm_backward_launch(rows),
            |[x, weight, grad], out| {
                rms_norm_backward_args(
                    [x, weight, grad, out],
                    rows,
                    hidden,
                    self.eps,
                    self.weight_rows,
                )
            },
        )?;
        Ok((out, shape))
    }
}

/// rms_norm_backward's arguments (src/cuda/norm_backward.cu) over `rows` rows of `hidden`: the
/// addresses of `x`, `weight`, `grad` and `out`, then the sizes, `eps` and whether to write the
/// weight's rows. The CUDA launch and the emulated tests both pass this list.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn rms_norm_backward_args(
    [x, weight, grad, out]: [u64; 4],
    rows: usize,
    hidden: usize,
    eps: f32,
    weight_rows: bool,
) -> Result<Vec<KernelArg>> {
    Ok(vec![
        KernelArg::Pointer(x),
        KernelArg::Pointer(weight),
        KernelArg::Pointer(grad),
        KernelArg::Pointer(out),
        KernelArg::int(rows, "rows")?,
        KernelArg::int(hidden, "hidden")?,
        KernelArg::F32(eps),
        KernelArg::I32(i32::from(weight_rows)),
    ])
}

/// The CUDA launch over `rows` rows: one block of [`THREADS`] per row; `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn rms_norm_backward_launch(rows: usize) -> (u32, u32) {
    (rows as u32, THREADS)
}

/// This module's kernel (src/cuda/norm_backward.cu).
#[cfg(feature = "cuda")]
const MODULE: crate::kernel_args::cuda::Module = crate::kernel_args::cuda::Module {
    name: "optune_norm_backward",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/norm_backward.ptx")),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward_only::tests::{flat, random};
    use crate::fused::tests::f32_elements;
    use crate::kernel_args::emulated;
    use candle_core::{DType, Device, Var, D};
    use optune_cuda_emulator::{in_both_placements, Element, Launch};

    const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
    const EPS: f64 = 1e-5;

    fn tensor(values: Vec<f32>, shape: &[usize], dtype: DType) -> Tensor {
        let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        t.to_dtype(dtype).unwrap()
    }

    /// The largest difference over the largest magnitude of `want`.
    fn off(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst / scale
    }

    /// Within a few roundings of the dtype, relative to the largest value.
    fn tolerance(dtype: DType) -> f32 {
        match dtype {
            DType::F32 => 1e-5,
            DType::BF16 => 2e-2,
            _ => 3e-3,
        }
    }

    /// `∂x` and `∂weight` of `Σ y·w_out` for the norm written in f64 tensor ops, by candle's
    /// autograd: the reference.
    fn reference(x: &Tensor, weight: &Tensor, grad: &Tensor) -> (Vec<f32>, Vec<f32>) {
        let f64_var = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
        let (x, weight) = (f64_var(x), f64_var(weight));
        let rms = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + EPS)
            .unwrap()
            .sqrt()
            .unwrap();
        let y = x
            .broadcast_div(&rms)
            .unwrap()
            .broadcast_mul(&weight)
            .unwrap();
        let loss = (y * grad.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let get = |v: &Var| f32_elements(grads.get(v.as_tensor()).unwrap());
        (get(&x), get(&weight))
    }

    fn column_sums(rows: &Tensor) -> Vec<f32> {
        f32_elements(&rows.to_dtype(DType::F32).unwrap().sum(0).unwrap())
    }

    /// The CPU form against the norm's gradients by autograd in f64, on a pool's rows and a few
    /// rows, with and without the weight's rows (the same `∂x` either way).
    #[test]
    fn the_cpu_form_is_the_norms_gradient() {
        for ((rows, hidden), dtype) in [(3, 40), (70, 1024)]
            .into_iter()
            .flat_map(|size| DTYPES.map(|dtype| (size, dtype)))
        {
            let x = tensor(random(rows * hidden, 3.0, 1), &[rows, hidden], dtype);
            let weight = tensor(random(hidden, 1.0, 2), &[hidden], dtype);
            let grad = tensor(random(rows * hidden, 1.0, 3), &[rows, hidden], dtype);
            let (want_x, want_weight) = reference(&x, &weight, &grad);
            let (x_grad, weight_rows) = rms_norm_backward(&x, &weight, &grad, EPS, true).unwrap();
            assert_eq!(x_grad.dtype(), dtype);
            let got_x = f32_elements(&x_grad);
            let off_x = off(&got_x, &want_x);
            assert!(off_x <= tolerance(dtype), "{dtype:?} ∂x: {off_x}");
            let got_weight = column_sums(&weight_rows.unwrap());
            let off_weight = off(&got_weight, &want_weight);
            assert!(
                off_weight <= tolerance(dtype),
                "{dtype:?} ∂weight: {off_weight}"
            );
            let (alone, none) = rms_norm_backward(&x, &weight, &grad, EPS, false).unwrap();
            assert!(none.is_none());
            assert_eq!(f32_elements(&alone), got_x, "{dtype:?}");
        }
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let x = tensor(random(12, 1.0, 4), &[3, 4], DType::F32);
        let weight = tensor(random(4, 1.0, 5), &[4], DType::F32);
        let narrow = tensor(random(3, 1.0, 5), &[3], DType::F32);
        let err = rms_norm_backward(&x, &narrow, &x, EPS, true).unwrap_err();
        assert!(err.to_string().contains("rms_norm_backward"), "{err}");
        let half = weight.to_dtype(DType::BF16).unwrap();
        assert!(rms_norm_backward(&x, &half, &x, EPS, true).is_err());
    }

    /// The kernel by the emulator, with the CUDA path's launch and argument list.
    fn kernel<T: Element + candle_core::WithDType>(
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        weight_rows: bool,
    ) -> Vec<f32> {
        let (rows, hidden) = x.dims2().unwrap();
        let (x, weight, grad) = (flat::<T>(x), flat::<T>(weight), flat::<T>(grad));
        let name = format!("rms_norm_backward_{}", T::SUFFIX);
        let len = (1 + usize::from(weight_rows)) * rows * hidden;
        let out = in_both_placements(&name, |memory| {
            let [x_at, weight_at, grad_at] = [&x, &weight, &grad].map(|v| memory.input(v));
            let out = memory.output::<T>(len);
            let addresses = [x_at, weight_at, grad_at, out.address];
            let args = rms_norm_backward_args(addresses, rows, hidden, EPS as f32, weight_rows)
                .map_err(|e| e.to_string())?;
            let (grid, block) = rms_norm_backward_launch(rows);
            // SAFETY: x and grad hold rows·hidden elements, weight hidden, and out `len`, as
            // the kernel reads and writes them for these arguments.
            unsafe { memory.launch(&name, Launch { grid, block }, &emulated(&args)) }?;
            Ok(memory.read(&out))
        });
        out.unwrap()
            .into_iter()
            .map(|v| v.to_f64() as f32)
            .collect()
    }

    /// The CUDA kernel (src/cuda/norm_backward.cu), run by the emulator with the CUDA path's
    /// launch, against the CPU form: within a rounding (its sums are added in another order);
    /// rows wider and narrower than a block, with and without the weight's rows (then the
    /// output is `∂x` alone: a write past it would end the emulated run).
    #[test]
    fn the_cuda_kernel_matches_the_cpu_form() {
        for (rows, hidden) in [(3, 600), (4, 96)] {
            for dtype in DTYPES {
                let x = tensor(random(rows * hidden, 3.0, 6), &[rows, hidden], dtype);
                let weight = tensor(random(hidden, 1.0, 7), &[hidden], dtype);
                let grad = tensor(random(rows * hidden, 1.0, 8), &[rows, hidden], dtype);
                for weight_rows in [true, false] {
                    let got = match dtype {
                        DType::F32 => kernel::<f32>(&x, &weight, &grad, weight_rows),
                        DType::BF16 => kernel::<half::bf16>(&x, &weight, &grad, weight_rows),
                        _ => kernel::<half::f16>(&x, &weight, &grad, weight_rows),
                    };
                    let (x_grad, rows_out) =
                        rms_norm_backward(&x, &weight, &grad, EPS, weight_rows).unwrap();
                    let mut want = f32_elements(&x_grad);
                    if let Some(rows_out) = rows_out {
                        want.extend(f32_elements(&rows_out));
                    }
                    let off = off(&got, &want);
                    let bound = match dtype {
                        DType::F32 => 2e-6,
                        DType::BF16 => 8e-3,
                        _ => 1e-3,
                    };
                    assert!(
                        off <= bound,
                        "{dtype:?} {rows}x{hidden} {weight_rows}: {off}"
                    );
                }
            }
        }
    }
}
