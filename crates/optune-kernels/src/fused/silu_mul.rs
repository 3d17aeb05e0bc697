//! SwiGLU gate.

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::*;

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
}
