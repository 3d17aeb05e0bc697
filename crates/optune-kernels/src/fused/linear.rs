//! Linear layer.

use super::*;

/// `x · weightᵀ` for `x [.., in]` and `weight [out, in]`: `[.., out]`, differentiable in both,
/// as one autograd node (candle's version is a reshape, a transpose, a matmul and a reshape, each
/// of which costs its backward a zeroed buffer and an add). CPU, f32/f64.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, LinearOp)
}

pub(super) struct LinearOp;

impl LinearOp {
    /// `(rows, in, out)` of `x [.., in]` and `weight [out, in]`.
    pub(super) fn check(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
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
    pub(super) fn product<T: Real>(
        x: &[T],
        w: &[T],
        (rows, k, out): (usize, usize, usize),
    ) -> Vec<T> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::*;

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
