//! RMSNorm.

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::*;

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
}
