//! The ops of the transformer, each with its forms side by side. An op's public function here
//! asks [`crate::dispatch::path_for`] which form runs; the generic forms are in [`generic`]
//! below, the fused autograd ops in `fused.rs` (one `CustomOp` per op, named after it), and the
//! host decode kernels of the same op in [`crate::host`] (called by the model's CPU decode step,
//! which [`crate::dispatch::decode_path`] turns on or off as a whole).
//!
//! | op | generic | fused | host |
//! |---|---|---|---|
//! | [`rms_norm`] | [`generic::rms_norm`] | `fused::RmsNorm` | [`crate::host::rms_norm`] |
//! | [`linear`] | [`generic::linear`] | `fused::LinearOp` | [`crate::host::linear_many`] |
//! | [`silu_mul`] | [`generic::silu_mul`] | `fused::SiluMul` | [`crate::host::silu_mul`] |
//! | [`rotary_heads`] | [`generic::rotary_heads`] | `fused::Rope` | [`crate::host::rotary`] |
//! | [`attention`] | [`generic::attention`] | `fused::Attention` | [`crate::host::attention`] |
//! | [`token_logprobs`] | [`generic::token_logprobs`] (`ChunkedLogprobs`) | `fused::TokenLogprobs` | (sampler: [`crate::host::log_sum_exp`]) |

use crate::dispatch::{path_for, Path};
use crate::fused;
use candle_core::{bail, DType, Layout, Result, Tensor};

/// Rows of logits computed at once by [`token_logprobs`]: bounds the logits buffer to
/// `chunk × vocab` floats.
pub const HEAD_CHUNK_ROWS: usize = 256;

/// `(n, k, out)` of the product `x [n, k] · weightᵀ` with `weight [out, k]`, checked.
pub(crate) fn product_dims(op: &str, x: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
    let (&[n, k], &[out, k2]) = (x.dims(), weight.dims()) else {
        bail!(
            "{op}: {:?} and weight {:?} must be matrices",
            x.dims(),
            weight.dims()
        );
    };
    if k != k2 {
        bail!("{op}: the input has width {k}, the weight {k2}");
    }
    Ok((n, k, out))
}

/// The dtype reductions run in: f32 for half-precision weights (as transformers does), else the
/// weights' own dtype (f64 for gradient checks).
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `x / rms(x) · weight` over the last axis, statistics in [`accumulation_dtype`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match path_for(&[x, weight]) {
        Path::Fused => fused::rms_norm(x, weight, eps),
        Path::Generic => generic::rms_norm(x, weight, eps),
    }
}

/// `x [.., in] · weightᵀ` with `weight [out, in]`: `[.., out]`. A weight that is no variable
/// (frozen, e.g. under LoRA) gets no gradient on the fused path.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    match path_for(&[x, weight]) {
        Path::Fused => fused::linear(x, weight),
        Path::Generic => generic::linear(x, weight),
    }
}

/// `silu(gate) · up`: the SwiGLU gate.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match path_for(&[gate, up]) {
        Path::Fused => fused::silu_mul(gate, up),
        Path::Generic => generic::silu_mul(gate, up),
    }
}

/// Splits a projection `x [b, t, heads·d]` into heads and rotates them (rotate-half layout) with
/// the tables `cos`/`sin [b, 1, t, d]`: `[b, heads, t, d]`.
pub fn rotary_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    match path_for(&[x, cos, sin]) {
        Path::Fused => fused::rotary_heads(x, cos, sin, heads),
        Path::Generic => generic::rotary_heads(x, cos, sin, heads),
    }
}

/// Grouped-query attention `softmax(scale · q kᵀ + mask) v` with `q [b, heads, tq, d]`,
/// `k`/`v [b, kv_heads, tk, d]` and an additive `mask [b, 1, tq, tk]`: `[b, heads, tq, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    match path_for(&[q, k, v, mask]) {
        Path::Fused => fused::attention(q, k, v, mask, scale),
        Path::Generic => generic::attention(q, k, v, mask, scale),
    }
}

/// `log softmax(rows · weightᵀ)[targets[i]]` for each row of `rows [n, hidden]`: `[n]`, in
/// chunks of [`HEAD_CHUNK_ROWS`] rows so that only one chunk of logits exists at a time, in the
/// backward pass too, on every device.
pub fn token_logprobs(rows: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    match path_for(&[rows, weight]) {
        Path::Fused => fused::token_logprobs(rows, weight, targets, HEAD_CHUNK_ROWS),
        Path::Generic => generic::token_logprobs(rows, weight, targets, HEAD_CHUNK_ROWS),
    }
}

/// The generic forms: candle's differentiable tensor ops only (candle's own fused kernels such
/// as `rms_norm`, `softmax_last_dim` or `rope` do not propagate gradients), on any device and
/// dtype, with reductions in [`accumulation_dtype`].
pub mod generic {
    use super::accumulation_dtype;
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(accumulation_dtype(dtype))?;
        let inv_rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(weight)
    }

    /// A weight that is no variable and comes from no op (frozen) gets no gradient.
    pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let inputs = *dims.last().expect("linear input has at least one dim");
        let rows = x.reshape((x.elem_count() / inputs, inputs))?;
        let y = if weight.track_op() {
            rows.matmul(&weight.t()?)?
        } else {
            rows.apply_op2(weight, FrozenWeightProduct)?
        };
        *dims.last_mut().expect("non-empty") = weight.dim(0)?;
        y.reshape(dims)
    }

    /// `x [n, in] · weightᵀ` by candle's own matrix product (cuBLAS on CUDA) with a backward that
    /// returns `x`'s gradient alone. candle's matmul node differentiates both operands whatever
    /// they are, so under LoRA every frozen weight would get a full-size gradient: twice the
    /// backward products and a weight-sized buffer per layer.
    struct FrozenWeightProduct;

    impl FrozenWeightProduct {
        /// `(batch, m, n, k)` of the product and the layout of `weightᵀ`.
        fn dims(x: &Layout, weight: &Layout) -> Result<((usize, usize, usize, usize), Layout)> {
            let (n, k, out) = super::product_dims("frozen-weight product", x, weight)?;
            Ok(((1, n, out, k), weight.transpose(0, 1)?))
        }
    }

    impl CustomOp2 for FrozenWeightProduct {
        fn name(&self) -> &'static str {
            "frozen-weight-product"
        }

        fn cpu_fwd(
            &self,
            x: &CpuStorage,
            lx: &Layout,
            w: &CpuStorage,
            lw: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let (bmnk, lwt) = Self::dims(lx, lw)?;
            Ok((x.matmul(w, bmnk, lx, &lwt)?, Shape::from((bmnk.1, bmnk.2))))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            x: &candle_core::CudaStorage,
            lx: &Layout,
            w: &candle_core::CudaStorage,
            lw: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            let (bmnk, lwt) = Self::dims(lx, lw)?;
            Ok((x.matmul(w, bmnk, lx, &lwt)?, Shape::from((bmnk.1, bmnk.2))))
        }

        fn bwd(
            &self,
            _x: &Tensor,
            weight: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            Ok((Some(grad.matmul(weight)?), None))
        }
    }

    pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    /// `x·cos + rotate_half(x)·sin` on `x [b, heads, t, d]`.
    pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let first = x.narrow(D::Minus1, 0, half)?;
        let second = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    }

    pub fn rotary_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        let split = x
            .reshape((b, t, heads, width / heads))?
            .transpose(1, 2)?
            .contiguous()?;
        rotary(&split, cos, sin)
    }

    /// GQA without materialising repeated keys: the query heads that share a KV head are folded
    /// into the query axis. Softmax in [`accumulation_dtype`].
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, heads, tq, d) = q.dims4()?;
        let (kv_heads, tk) = (k.dim(1)?, k.dim(2)?);
        let group = heads / kv_heads;
        let q = (q.reshape((b, kv_heads, group * tq, d))? * scale)?;
        let scores = q.matmul(&k.t()?)?.reshape((b, kv_heads, group, tq, tk))?;
        let scores = scores.broadcast_add(&mask.unsqueeze(1)?)?;
        let dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax(&scores.to_dtype(accumulation_dtype(dtype))?, D::Minus1)?
                .to_dtype(dtype)?
                .reshape((b, kv_heads, group * tq, tk))?;
        probs.matmul(&v.contiguous()?)?.reshape((b, heads, tq, d))
    }

    /// One chunk of `chunk × vocab` logits at a time, in the backward pass too: the values are
    /// computed outside autograd, and [`ChunkedLogprobs`] gives them a backward that recomputes
    /// each chunk's softmax. Logits and their softmax in [`accumulation_dtype`].
    pub fn token_logprobs(
        rows: &Tensor,
        weight: &Tensor,
        targets: &[u32],
        chunk: usize,
    ) -> Result<Tensor> {
        let op = ChunkedLogprobs {
            targets: targets.to_vec(),
            chunk: chunk.max(1),
        };
        let values = op.values(&rows.detach(), &weight.detach())?;
        if !(rows.track_op() || weight.track_op()) {
            return Ok(values);
        }
        rows.apply_op3(weight, &values, op)
    }

    /// `log softmax(rows · weightᵀ)[target]` by chunks, as a node whose forward hands over the
    /// values computed beforehand (a copy of the third input, on any backend) and whose backward
    /// is written in tensor ops, so it runs on every device.
    struct ChunkedLogprobs {
        targets: Vec<u32>,
        chunk: usize,
    }

    impl ChunkedLogprobs {
        /// `(start, len, targets [len, 1])` of each chunk of rows.
        fn chunks(&self, device: &candle_core::Device) -> Result<Vec<(usize, usize, Tensor)>> {
            let n = self.targets.len();
            (0..n)
                .step_by(self.chunk)
                .map(|start| {
                    let len = self.chunk.min(n - start);
                    let index = Tensor::new(&self.targets[start..start + len], device)?;
                    Ok((start, len, index.unsqueeze(1)?))
                })
                .collect()
        }

        /// Log-softmax of one chunk's logits, `[len, vocab]`.
        fn log_probs(rows: &Tensor, weight: &Tensor) -> Result<Tensor> {
            let logits = rows.matmul(&weight.t()?)?;
            candle_nn::ops::log_softmax(
                &logits.to_dtype(accumulation_dtype(logits.dtype()))?,
                D::Minus1,
            )
        }

        fn values(&self, rows: &Tensor, weight: &Tensor) -> Result<Tensor> {
            let mut parts = Vec::new();
            for (start, len, index) in self.chunks(rows.device())? {
                let logp = Self::log_probs(&rows.narrow(0, start, len)?, weight)?;
                parts.push(logp.gather(&index, 1)?.squeeze(1)?);
            }
            Tensor::cat(&parts, 0)
        }
    }

    impl CustomOp3 for ChunkedLogprobs {
        fn name(&self) -> &'static str {
            "chunked-token-logprobs"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            values: &CpuStorage,
            layout: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            Ok((values.try_clone(layout)?, layout.shape().clone()))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
            values: &candle_core::CudaStorage,
            layout: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            Ok((values.try_clone(layout)?, layout.shape().clone()))
        }

        /// `∂logits = g · (onehot(target) − softmax)` chunk by chunk; `∂rows = ∂logits · W`,
        /// `∂W = Σ ∂logitsᵀ · rows`, each only when its input leads to a variable.
        fn bwd(
            &self,
            rows: &Tensor,
            weight: &Tensor,
            _values: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (want_rows, want_weight) = (rows.track_op(), weight.track_op());
            let (rows, weight) = (rows.detach(), weight.detach());
            let grad = grad.detach();
            let vocab = weight.dim(0)?;
            let mut row_grads = Vec::new();
            let mut weight_grad: Option<Tensor> = None;
            for (start, len, index) in self.chunks(rows.device())? {
                let chunk_rows = rows.narrow(0, start, len)?;
                let probs = Self::log_probs(&chunk_rows, &weight)?.exp()?;
                let onehot = Tensor::zeros((len, vocab), probs.dtype(), probs.device())?
                    .scatter_add(
                        &index,
                        &Tensor::ones((len, 1), probs.dtype(), probs.device())?,
                        1,
                    )?;
                let g = grad
                    .narrow(0, start, len)?
                    .to_dtype(probs.dtype())?
                    .unsqueeze(1)?;
                let d_logits = (onehot - probs)?
                    .broadcast_mul(&g)?
                    .to_dtype(rows.dtype())?;
                if want_rows {
                    row_grads.push(d_logits.matmul(&weight)?);
                }
                if want_weight {
                    let part = d_logits.t()?.matmul(&chunk_rows)?;
                    weight_grad = Some(match weight_grad {
                        Some(sum) => (sum + part)?,
                        None => part,
                    });
                }
            }
            let row_grad = match want_rows {
                true => Some(Tensor::cat(&row_grads, 0)?),
                false => None,
            };
            Ok((row_grad, weight_grad, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::generic;
    use candle_core::{DType, Device, Tensor, Var};

    fn values(shape: (usize, usize), seed: u32) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_on_the_generic_path() {
        let x = Var::from_tensor(&values((5, 7), 1)).unwrap();
        let frozen = values((3, 7), 2);
        let trained = Var::from_tensor(&frozen).unwrap();
        let y = generic::linear(x.as_tensor(), &frozen).unwrap();
        let expected = x.as_tensor().matmul(&frozen.t().unwrap()).unwrap();
        let diff = (&y - &expected).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        assert!(
            grads.get(&frozen).is_none(),
            "the frozen weight got a gradient"
        );
        // x's gradient is what the plain product gives, where the weight is a variable.
        let y2 = generic::linear(x.as_tensor(), trained.as_tensor()).unwrap();
        let grads2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads2.get(trained.as_tensor()).is_some());
        let (gx, gx2) = (
            grads.get(x.as_tensor()).unwrap(),
            grads2.get(x.as_tensor()).unwrap(),
        );
        let diff = (gx - gx2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            diff.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                < 1e-5
        );
    }

    /// The chunked generic head's hand-written backward against finite differences (f64), with
    /// chunks of 2 rows (the last partial, the weight gradient summed over chunks), and a frozen
    /// weight that gets no gradient.
    #[test]
    fn chunked_token_logprobs_gradients_match_finite_differences_in_f64() {
        use crate::fused::tests::{values, weighted_finite_differences};
        let targets = [3u32, 0, 6, 6, 2];
        let inputs = [
            values(&[5, 4], 1, 1.0, DType::F64),
            values(&[7, 4], 2, 1.0, DType::F64),
        ];
        let worst = weighted_finite_differences(&inputs, &[0, 1], 3, |t| {
            generic::token_logprobs(&t[0], &t[1], &targets, 2).unwrap()
        });
        assert!(worst < 1e-6, "{worst:e}");
        let rows = Var::from_tensor(&inputs[0]).unwrap();
        let logp = generic::token_logprobs(rows.as_tensor(), &inputs[1], &targets, 2).unwrap();
        let grads = logp.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(rows.as_tensor()).is_some());
        assert!(
            grads.get(&inputs[1]).is_none(),
            "the frozen head got a gradient"
        );
    }
}
