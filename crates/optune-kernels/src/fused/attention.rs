//! Attention.

use super::*;

/// Grouped-query attention `softmax(scale · q kᵀ + mask) v` for `q [b, heads, tq, d]`,
/// `k`/`v [b, kv_heads, tk, d]` and an additive `mask [b, 1, tq, tk]`: `[b, heads, tq, d]`,
/// differentiable in q, k and v. One op (one autograd node) per layer: the scores and
/// probabilities live only inside it, one (batch, KV head) block at a time, and the backward
/// recomputes them. CPU, f32/f64.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention::new(mask, scale)?,
    )
}

/// The gradients `[∂q, ∂k, ∂v]` of [`attention`] for its output's gradient `grad`, computed as
/// its node's backward pass computes them (for a node that keeps its own inputs instead).
pub fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    grad: &Tensor,
) -> Result<[Tensor; 3]> {
    Attention::new(mask, scale)?.grads(q, k, v, grad)
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
    fn new(mask: &Tensor, scale: f64) -> Result<Self> {
        Ok(Self {
            // bf16 inputs run the f32 kernel (`through_f32!`), which reads an f32 mask.
            mask: mask
                .detach()
                .to_dtype(crate::op_rules::accumulation_dtype(mask.dtype()))?
                .contiguous()?,
            scale,
        })
    }

    /// [`attention_grads`].
    fn grads(&self, q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor) -> Result<[Tensor; 3]> {
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let op = AttentionGrad {
            op: self.clone(),
            // As the mask: read by the f32 kernel when the inputs are bf16.
            q: q.detach()
                .to_dtype(crate::op_rules::accumulation_dtype(q.dtype()))?
                .contiguous()?,
        };
        let packed = grad.detach().contiguous()?.apply_op3_no_bwd(
            &k.detach().contiguous()?,
            &v.detach().contiguous()?,
            &op,
        )?;
        Ok([
            packed.narrow(0, 0, nq)?.reshape(q.shape())?,
            packed.narrow(0, nq, nk)?.reshape(k.shape())?,
            packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?,
        ])
    }

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
        let [q_grad, k_grad, v_grad] = self.grads(q, k, v, grad)?;
        Ok((Some(q_grad), Some(k_grad), Some(v_grad)))
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
mod tests {
    use super::*;
    use crate::fused::tests::*;
    use candle_core::Device;

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
}
