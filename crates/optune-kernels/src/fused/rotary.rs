//! Rotary position embedding, with the split into heads.

use super::*;

/// Splits `x [b, t, heads·d]` (a projection's output) into heads and rotates them:
/// `[b, heads, t, d]` with `y = x·cos + rotate_half(x)·sin` (Hugging Face's layout), for
/// `cos`/`sin [b, t, d/2]`. Differentiable in `x` (the tables are constants). CPU, f32/f64.
pub fn rotary_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { heads })
}

/// The gradient `[b, t, heads·d]` of [`rotary_heads`]' input for its output's gradient `grad [b,
/// heads, t, d]`, computed as its node's backward pass computes it.
pub fn rotary_heads_grad(
    grad: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    grad.detach().contiguous()?.apply_op3_no_bwd(
        &cos.detach().contiguous()?,
        &sin.detach().contiguous()?,
        &RopeGrad(Rope { heads }),
    )
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
        let grad = rotary_heads_grad(grad, cos, sin, self.heads)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::*;
    use candle_core::Device;

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
}
