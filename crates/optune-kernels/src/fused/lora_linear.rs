//! Linear layer with a LoRA adapter.

use super::linear::LinearOp;
use super::*;
use crate::dropout::DropoutMask;

/// `x · weightᵀ + (d(x) · aᵀ) · bᵀ` for `x [.., in]`, `weight [out, in]`, `a [rank, in]` and
/// `b [out, rank]`: `[.., out]`, differentiable in all four, as one autograd node; `d` is
/// `dropout`'s mask (the identity without one). Composed, the adapter is three more nodes on
/// `[rows, out]`-sized tensors, each costing candle's backward a zeroed gradient and an add of
/// that size; here the mask is drawn again by the backward pass, and nothing but the op's inputs
/// is kept. CPU, f32/f64 (bf16 through f32 copies).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
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
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &adapters,
        LoraLinear { rank, dropout },
    )
}

#[derive(Clone, Copy)]
struct LoraLinear {
    rank: usize,
    dropout: Option<DropoutMask>,
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

    /// The adapter's input `d(x)`: `x` dropped out by the mask, or `x` itself.
    fn adapter_input<'x, T: Real>(&self, x: &'x [T]) -> std::borrow::Cow<'x, [T]> {
        match &self.dropout {
            Some(mask) => mask.apply_float(x).into(),
            None => x.into(),
        }
    }

    /// `d(x) · aᵀ` for the adapter's input `d(x)`: `[rows, rank]`.
    fn down<T: Real>(&self, x_in: &[T], a: &[T], (rows, k): (usize, usize)) -> Vec<T> {
        let mut u = vec![T::ZERO; rows * self.rank];
        let a_t = Mat::transposed(a, k);
        matmul(rows, self.rank, k, &mut u, false, Mat::rows(x_in, k), a_t);
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
        let u = self.down(&self.adapter_input(x), a, (rows, k));
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
        // ∂u = g · b, with u = d(x) · aᵀ the adapter's inner activations.
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
            match &self.dropout {
                // ∂x gets the adapter's part through the mask: ∂d(x) = ∂u · a, dropped out.
                Some(mask) => {
                    let mut dx_in = vec![T::ZERO; rows * k];
                    matmul(
                        rows,
                        k,
                        r,
                        &mut dx_in,
                        false,
                        Mat::rows(&du, r),
                        Mat::rows(a, k),
                    );
                    mask.add_applied_float(dx, &dx_in);
                }
                None => matmul(rows, k, r, dx, true, Mat::rows(&du, r), Mat::rows(a, k)),
            }
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
            let x_in = self.adapter_input(x);
            matmul(
                r,
                k,
                rows,
                da,
                false,
                Mat::transposed(&du, r),
                Mat::rows(&x_in, k),
            );
            let u = self.down(&x_in, a, (rows, k));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::*;
    use candle_core::Var;

    /// A mask dropping 40 % of the adapter's input, from a position inside the stream.
    fn mask() -> DropoutMask {
        DropoutMask::new(crate::dropout_key(5), 1234, 0.4).unwrap()
    }

    #[test]
    fn lora_linear_gradients_match_finite_differences_in_f64() {
        let inputs = [
            values(&[2, 3, 5], 90, 1.0, DType::F64),
            values(&[4, 5], 91, 1.0, DType::F64),
            values(&[2, 5], 92, 1.0, DType::F64),
            values(&[4, 2], 93, 1.0, DType::F64),
        ];
        for dropout in [None, Some(mask())] {
            weighted_finite_differences(&inputs, &[0, 1, 2, 3], 94, |t| {
                lora_linear(&t[0], &t[1], &t[2], &t[3], dropout).unwrap()
            });
        }
    }

    /// With and without dropout: with it, the fused op has to draw the generic form's mask (the
    /// dropout op's elements), in the forward and in the input's gradient.
    #[test]
    fn lora_linear_matches_the_generic_ops() {
        let inputs = [
            values(&[4, 37, 48], 95, 1.0, DType::F64),
            values(&[40, 48], 96, 0.2, DType::F64),
            values(&[16, 48], 97, 0.2, DType::F64),
            values(&[40, 16], 98, 0.2, DType::F64),
        ];
        for dropout in [None, Some(mask())] {
            compare_with_generic(
                &inputs,
                2.0,
                |t| lora_linear(&t[0], &t[1], &t[2], &t[3], dropout).unwrap(),
                |t| crate::ops::generic::lora_linear(&t[0], &t[1], &t[2], &t[3], dropout).unwrap(),
            );
            // A frozen base weight (LoRA's) gets no gradient; the adapters and the input do.
            frozen_second_input_gets_no_gradient(&inputs[0], &inputs[1], |x, w| {
                lora_linear(x, w, &inputs[2], &inputs[3], dropout).unwrap()
            });
        }
        // The mask is applied: another position gives other numbers.
        let at = |position| {
            let mask = DropoutMask::new(crate::dropout_key(5), position, 0.4).unwrap();
            let y = lora_linear(&inputs[0], &inputs[1], &inputs[2], &inputs[3], Some(mask));
            y.unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
        };
        assert_ne!(at(1234), at(1235));
    }

    /// A frozen base weight (LoRA's case, where the generic form is one node of its own): the
    /// gradients the op gives the adapters, and the input when it is trained, are the generic
    /// form's under the mask. In the first layer neither the input nor the base weight is trained,
    /// and the op computes only the adapters' gradients.
    #[test]
    fn adapters_get_the_generic_forms_gradients_under_dropout() {
        let w = values(&[20, 24], 100, 0.2, DType::F64);
        let (a, b) = (
            Var::from_tensor(&values(&[4, 24], 101, 0.2, DType::F64)).unwrap(),
            Var::from_tensor(&values(&[20, 4], 102, 0.2, DType::F64)).unwrap(),
        );
        let x_var = Var::from_tensor(&values(&[3, 9, 24], 99, 1.0, DType::F64)).unwrap();
        for x in [x_var.as_tensor().clone(), x_var.as_tensor().detach()] {
            let grads = |f: &dyn Fn() -> Tensor| {
                let grads = f().sqr().unwrap().sum_all().unwrap().backward().unwrap();
                assert!(grads.get(&w).is_none());
                assert_eq!(grads.get(&x).is_some(), x.track_op());
                [&x, a.as_tensor(), b.as_tensor()].map(|v| {
                    let g = grads.get(v).map(|g| g.flatten_all().unwrap());
                    g.map(|g| g.to_vec1::<f64>().unwrap()).unwrap_or_default()
                })
            };
            let fused = grads(&|| lora_linear(&x, &w, &a, &b, Some(mask())).unwrap());
            let generic =
                grads(&|| crate::ops::generic::lora_linear(&x, &w, &a, &b, Some(mask())).unwrap());
            for (f, g) in fused.iter().zip(&generic) {
                assert_eq!(f.len(), g.len());
                for (f, g) in f.iter().zip(g) {
                    assert!((f - g).abs() <= 1e-12 * (1.0 + g.abs()), "{f} against {g}");
                }
            }
        }
    }
}
