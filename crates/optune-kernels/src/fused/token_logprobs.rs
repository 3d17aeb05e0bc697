//! Token log-probabilities through the vocabulary head.

use super::*;

/// `log softmax(rows · weightᵀ)[targets[i]]` for each row `i` of `rows [n, hidden]`, with
/// `weight [vocab, hidden]`: `[n]`, differentiable in both. At most `chunk × vocab` logits exist
/// at a time, in the forward and the backward pass. CPU, f32/f64, contiguous inputs.
pub fn token_logprobs(
    rows: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    // Logits kept for the backward pass save it recomputing them (a third of the head's
    // products), when a backward pass will come and they fit the bound.
    let differentiable = rows.track_op() || weight.track_op();
    let logits_bytes = rows.dim(0)? * weight.dim(0)? * rows.dtype().size_in_bytes().max(4);
    let op = TokenLogprobs {
        targets: targets.into(),
        chunk: chunk.max(1),
        kept: (differentiable && logits_bytes <= KEPT_LOGITS_BYTES).then(Default::default),
    };
    rows.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// The most logits (bytes) the head keeps from its forward pass for its backward pass; beyond
/// it the backward pass recomputes them a chunk at a time. SmolLM2's 4 pairs of ~255 tokens
/// are 200 MB.
pub const KEPT_LOGITS_BYTES: usize = 512 << 20;

/// The kept logits of the last backward pass, for the next forward pass to write into: at
/// hundreds of MB they lie above glibc's mmap threshold, and a fresh buffer would come from the
/// kernel zeroed page by page on every step.
static SPARE_LOGITS: Mutex<Option<CpuStorage>> = Mutex::new(None);

/// A buffer of `len` logits: the spare one when it is large enough.
fn logits_buffer<T: Real>(len: usize) -> Vec<T> {
    let spare = SPARE_LOGITS.lock().expect("not poisoned").take();
    match spare.and_then(T::storage_values) {
        Some(mut spare) if spare.capacity() >= len => {
            spare.resize(len, T::ZERO);
            spare
        }
        _ => vec![T::ZERO; len],
    }
}

struct TokenLogprobs {
    targets: Arc<[u32]>,
    chunk: usize,
    /// Where the forward pass leaves all its logits `[n, vocab]` for the backward pass, which
    /// takes them (absent: logits are recomputed).
    kept: Option<Mutex<Option<CpuStorage>>>,
}

impl TokenLogprobs {
    fn check(&self, rows: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
        let (n, h, v) = crate::op_rules::product_dims("token-logprobs", rows, weight)?;
        if self.targets.len() != n {
            bail!(
                "token-logprobs: {} targets for {n} rows",
                self.targets.len()
            );
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("token-logprobs: target {t} is outside the vocabulary of {v}");
        }
        Ok((n, h, v))
    }

    fn forward<T: Real>(&self, products: &impl HeadProducts<T>, n: usize, v: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; n];
        // Kept: all rows' logits, each chunk in its place; else one chunk's, reused.
        let keep = self.kept.is_some();
        let mut logits = if keep {
            logits_buffer(n * v)
        } else {
            vec![T::ZERO; self.chunk.min(n) * v]
        };
        for start in (0..n).step_by(self.chunk) {
            let c = self.chunk.min(n - start);
            let first = if keep { start } else { 0 };
            let logits = &mut logits[first * v..(first + c) * v];
            products.logits(start, c, logits);
            logits
                .par_chunks(v)
                .zip(out[start..start + c].par_iter_mut())
                .zip(self.targets[start..start + c].par_iter())
                .for_each(|((row, out), &t)| *out = row[t as usize] - T::log_sum_exp(row));
        }
        if let Some(kept) = &self.kept {
            *kept.lock().expect("not poisoned") = Some(T::storage(logits));
        }
        out
    }

    /// The logits the forward pass kept, taken (a second backward pass recomputes them).
    fn take_kept<T: Real>(&self) -> Option<Vec<T>> {
        let kept = self.kept.as_ref()?.lock().expect("not poisoned").take()?;
        T::storage_values(kept)
    }

    /// Gradients of `Σ grad[i] · logp[i]`, packed `[rows (n × h) | weight (v × h)]`, each part
    /// only if wanted.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        wanted: Wanted,
        products: &impl HeadProducts<T>,
        logp: &[T],
        grad: &[T],
        n: usize,
        h: usize,
        v: usize,
    ) -> Vec<T> {
        let mut out = vec![T::ZERO; wanted.packed_len(n * h, v * h)];
        let (grad_rows, grad_weight) = out.split_at_mut(if wanted.first { n * h } else { 0 });
        let grad_rows = wanted.first.then_some(grad_rows);
        let grad_weight = wanted.second.then_some((grad_weight, false));
        self.backward_into(products, logp, grad, (n, h, v), grad_rows, grad_weight);
        out
    }

    /// The gradients of `Σ grad[i] · logp[i]` into `grad_rows [n, h]` and `grad_weight [v, h]`
    /// (added to it when its flag says so), each when given. With `p = softmax(logits)`,
    /// `∂/∂logits = grad · (onehot(target) − p)`; the log-sum-exp of each row comes back as
    /// `logit[target] − logp`, so only the logits are recomputed.
    fn backward_into<T: Real>(
        &self,
        products: &(impl HeadProducts<T> + ?Sized),
        logp: &[T],
        grad: &[T],
        (n, h, v): (usize, usize, usize),
        mut grad_rows: Option<&mut [T]>,
        mut grad_weight: Option<(&mut [T], bool)>,
    ) {
        let kept = self.take_kept::<T>().filter(|kept| kept.len() == n * v);
        let recomputed = kept.is_none();
        let mut logits = kept.unwrap_or_else(|| vec![T::ZERO; self.chunk.min(n) * v]);
        for (i, start) in (0..n).step_by(self.chunk).enumerate() {
            let c = self.chunk.min(n - start);
            let block = if recomputed {
                let block = &mut logits[..c * v];
                products.logits(start, c, block);
                block
            } else {
                &mut logits[start * v..(start + c) * v]
            };
            block.par_chunks_mut(v).enumerate().for_each(|(r, row)| {
                let (t, g) = (self.targets[start + r] as usize, grad[start + r]);
                let lse = row[t] - logp[start + r];
                simd::scaled_exp(row, lse, -g);
                row[t] += g;
            });
            if let Some(grad_rows) = grad_rows.as_deref_mut() {
                products.grad_rows(block, c, &mut grad_rows[start * h..(start + c) * h]);
            }
            if let Some((grad_weight, accumulate)) = grad_weight.as_mut() {
                products.grad_weight(block, start, c, grad_weight, *accumulate || i > 0);
            }
        }
        if !recomputed {
            *SPARE_LOGITS.lock().expect("not poisoned") = Some(T::storage(logits));
        }
    }
}

/// The three products of the vocabulary head, over `rows [n, h]` and `weight [v, h]`.
trait HeadProducts<T> {
    /// `out [c, v] = rows[start..start + c] · weightᵀ`.
    fn logits(&self, start: usize, c: usize, out: &mut [T]);
    /// `out [c, h] = block [c, v] · weight`.
    fn grad_rows(&self, block: &[T], c: usize, out: &mut [T]);
    /// `out [v, h] = (accumulate ? out : 0) + block [c, v]ᵀ · rows[start..start + c]`.
    fn grad_weight(&self, block: &[T], start: usize, c: usize, out: &mut [T], accumulate: bool);
}

/// The head's products in the inputs' own precision (f32, f64).
struct NativeHead<'a, T> {
    rows: &'a [T],
    weight: &'a [T],
    h: usize,
    v: usize,
}

impl<T: Real> HeadProducts<T> for NativeHead<'_, T> {
    fn logits(&self, start: usize, c: usize, out: &mut [T]) {
        let (rows, h) = (&self.rows[start * self.h..], self.h);
        matmul(
            c,
            self.v,
            h,
            out,
            false,
            Mat::rows(rows, h),
            Mat::transposed(self.weight, h),
        );
    }
    fn grad_rows(&self, block: &[T], c: usize, out: &mut [T]) {
        let (h, v) = (self.h, self.v);
        matmul(
            c,
            h,
            v,
            out,
            false,
            Mat::rows(block, v),
            Mat::rows(self.weight, h),
        );
    }
    fn grad_weight(&self, block: &[T], start: usize, c: usize, out: &mut [T], accumulate: bool) {
        let (h, v) = (self.h, self.v);
        let rows = &self.rows[start * h..(start + c) * h];
        matmul(
            v,
            h,
            c,
            out,
            accumulate,
            Mat::transposed(block, v),
            Mat::rows(rows, h),
        );
    }
}

/// The head's products in bf16 (bf16 rows and weight, or f32 ones under bf16 products): bf16
/// operands (the f32 logit gradients rounded), f32 sums. The weight is packed once per op for
/// the products that read it whole, not once per chunk of rows.
struct Bf16Head<'a, S> {
    rows: &'a [S],
    h: usize,
    v: usize,
    /// `weightᵀ [h, v]`, for the logits.
    weight_t: PackedRhs,
    /// `weight [v, h]`, for the rows' gradient (when wanted).
    weight: Option<PackedRhs>,
}

impl<'a, S: Bf16Source + WithDType> Bf16Head<'a, S> {
    /// The products over the (rows, weight) storages of op `name`; the weight packed for the
    /// rows' gradient too when `grad_rows`.
    fn read(
        name: &str,
        [(rows, rows_layout), (weight, weight_layout)]: [(&'a CpuStorage, &Layout); 2],
        h: usize,
        v: usize,
        grad_rows: bool,
    ) -> Result<Self> {
        let rows = contiguous::<S>(rows, rows_layout, name, "rows")?;
        let weight = contiguous::<S>(weight, weight_layout, name, "weight")?;
        Ok(Self {
            rows,
            h,
            v,
            weight_t: PackedRhs::new(h, v, Mat::transposed(weight, h)),
            weight: grad_rows.then(|| PackedRhs::new(v, h, Mat::rows(weight, h))),
        })
    }
}

impl<S: Bf16Source> HeadProducts<f32> for Bf16Head<'_, S> {
    fn logits(&self, start: usize, c: usize, out: &mut [f32]) {
        let rows = Mat::rows(&self.rows[start * self.h..], self.h);
        matmul_bf16_packed(c, out, false, rows, &self.weight_t);
    }
    fn grad_rows(&self, block: &[f32], c: usize, out: &mut [f32]) {
        let weight = self
            .weight
            .as_ref()
            .expect("packed when the rows' gradient is wanted");
        matmul_bf16_packed(c, out, false, Mat::rows(block, self.v), weight);
    }
    fn grad_weight(
        &self,
        block: &[f32],
        start: usize,
        c: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let (h, v) = (self.h, self.v);
        let rows = Mat::rows(&self.rows[start * h..(start + c) * h], h);
        matmul_bf16(v, h, c, out, accumulate, Mat::transposed(block, v), rows);
    }
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, v) = self.check(l1, l2)?;
        fn run<T: Real>(
            op: &TokenLogprobs,
            s: [(&CpuStorage, &Layout); 2],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<CpuStorage> {
            let rows = contiguous::<T>(s[0].0, s[0].1, op.name(), "rows")?;
            let weight = contiguous::<T>(s[1].0, s[1].1, op.name(), "weight")?;
            let products = NativeHead { rows, weight, h, v };
            Ok(T::storage(op.forward(&products, n, v)))
        }
        // bf16 rows and weight give f32 log-probs, as the generic form does.
        fn run_bf16<S: Bf16Source + WithDType>(
            op: &TokenLogprobs,
            s: [(&CpuStorage, &Layout); 2],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<Vec<f32>> {
            let products = Bf16Head::<S>::read(op.name(), s, h, v, false)?;
            Ok(op.forward(&products, n, v))
        }
        let out = if s1.dtype() == DType::BF16 {
            CpuStorage::F32(run_bf16::<bf16>(self, [(s1, l1), (s2, l2)], n, h, v)?)
        } else if bf16_f32_products(s1) {
            CpuStorage::F32(run_bf16::<f32>(self, [(s1, l1), (s2, l2)], n, h, v)?)
        } else {
            by_dtype!(self, s1.dtype(), run(self, [(s1, l1), (s2, l2)], n, h, v))
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        rows: &Tensor,
        weight: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let wanted = Wanted::of(rows, weight);
        if wanted.none() {
            return Ok((None, None));
        }
        if let Some(buffer) = wanted
            .second
            .then(|| grad_buffers::buffer_for(weight))
            .flatten()
        {
            return self.backward_to_buffer(&buffer, wanted.first, rows, weight, res, grad);
        }
        let aux = Tensor::stack(&[res.detach(), grad.detach().to_dtype(res.dtype())?], 0)?;
        let op = TokenLogprobsGrad {
            op: TokenLogprobs {
                targets: self.targets.clone(),
                chunk: self.chunk,
                kept: self
                    .kept
                    .as_ref()
                    .map(|kept| Mutex::new(kept.lock().expect("not poisoned").take())),
            },
            wanted,
        };
        let packed = rows
            .detach()
            .apply_op3_no_bwd(&weight.detach(), &aux, &op)?;
        wanted.unpack(&packed, rows, weight)
    }
}

impl TokenLogprobs {
    /// The backward pass with the weight's gradient written into its buffer (f32 rows and
    /// weight): the rows' gradient, when wanted, comes back from the same pass over the logits.
    fn backward_to_buffer(
        &self,
        buffer: &GradBuffer,
        rows_wanted: bool,
        rows: &Tensor,
        weight: &Tensor,
        logp: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, h) = rows.dims2()?;
        let v = weight.dim(0)?;
        let logp = logp.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grad = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grad_rows = std::cell::RefCell::new(None);
        let name = "token-logprobs-grad";
        buffer.write(&rows.detach(), &weight.detach(), |dw, accumulate, r, w| {
            let mut d_rows = rows_wanted.then(|| vec![0f32; n * h]);
            let (bf16_head, native_head);
            let products: &dyn HeadProducts<f32> = if bf16_f32_products(r.0) {
                bf16_head = Bf16Head::<f32>::read(name, [r, w], h, v, rows_wanted)?;
                &bf16_head
            } else {
                let rows = contiguous::<f32>(r.0, r.1, name, "rows")?;
                let weight = contiguous::<f32>(w.0, w.1, name, "weight")?;
                native_head = NativeHead { rows, weight, h, v };
                &native_head
            };
            let d_weight = Some((dw, accumulate));
            self.backward_into(
                products,
                &logp,
                &grad,
                (n, h, v),
                d_rows.as_deref_mut(),
                d_weight,
            );
            *grad_rows.borrow_mut() = d_rows;
            Ok(())
        })?;
        let grad_rows = grad_rows
            .into_inner()
            .map(|d| Tensor::from_vec(d, (n, h), rows.device()))
            .transpose()?;
        Ok((grad_rows, None))
    }
}

/// The backward of [`TokenLogprobs`] as one op over (rows, weight, [logp; grad]).
struct TokenLogprobsGrad {
    op: TokenLogprobs,
    wanted: Wanted,
}

impl CustomOp3 for TokenLogprobsGrad {
    fn name(&self) -> &'static str {
        "token-logprobs-grad"
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
        let (n, h, v) = self.op.check(l1, l2)?;
        fn run<T: Real>(
            g: &TokenLogprobsGrad,
            s: [(&CpuStorage, &Layout); 3],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<CpuStorage> {
            let name = g.name();
            let rows = contiguous::<T>(s[0].0, s[0].1, name, "rows")?;
            let weight = contiguous::<T>(s[1].0, s[1].1, name, "weight")?;
            let aux = contiguous::<T>(s[2].0, s[2].1, name, "logp and grad")?;
            let products = NativeHead { rows, weight, h, v };
            let (logp, grad) = (&aux[..n], &aux[n..2 * n]);
            Ok(T::storage(
                g.op.backward(g.wanted, &products, logp, grad, n, h, v),
            ))
        }
        // bf16 products, over bf16 rows and weight (their gradients rounded to bf16) or over f32
        // ones when the process asked for bf16 products; log-probs and gradient are f32 either way.
        fn run_bf16<S: Bf16Source + WithDType>(
            g: &TokenLogprobsGrad,
            s: [(&CpuStorage, &Layout); 3],
            n: usize,
            h: usize,
            v: usize,
        ) -> Result<Vec<f32>> {
            let products = Bf16Head::<S>::read(g.name(), [s[0], s[1]], h, v, g.wanted.first)?;
            let aux = contiguous::<f32>(s[2].0, s[2].1, g.name(), "logp and grad")?;
            let (logp, grad) = (&aux[..n], &aux[n..2 * n]);
            Ok(g.op.backward(g.wanted, &products, logp, grad, n, h, v))
        }
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        let out = if s1.dtype() == DType::BF16 {
            bf16_storage(&run_bf16::<bf16>(self, s, n, h, v)?)
        } else if bf16_f32_products(s1) {
            CpuStorage::F32(run_bf16::<f32>(self, s, n, h, v)?)
        } else {
            by_dtype!(self, s1.dtype(), run(self, s, n, h, v))
        };
        Ok((out, Shape::from(self.wanted.packed_len(n * h, v * h))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::*;
    use crate::ops::HEAD_CHUNK_ROWS;
    use candle_core::Var;
    use rand::{Rng, SeedableRng};

    fn generic_token_logprobs(rows: &Tensor, weight: &Tensor, targets: &[u32]) -> Tensor {
        crate::ops::generic::token_logprobs(rows, weight, targets, HEAD_CHUNK_ROWS).unwrap()
    }

    #[test]
    fn token_logprobs_gradients_match_finite_differences_in_f64() {
        let targets = [3u32, 0, 6, 6, 2];
        let inputs = [
            values(&[5, 4], 1, 1.0, DType::F64),
            values(&[7, 4], 2, 1.0, DType::F64),
        ];
        let w = values(&[5], 3, 1.0, DType::F64);
        // Chunks of 2 rows: three blocks, the last partial, and the weight gradient accumulated.
        let worst = finite_differences(&inputs, &[0, 1], |t| {
            (token_logprobs(&t[0], &t[1], &targets, 2).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
        });
        assert!(worst < 1e-6);
        let fused = token_logprobs(&inputs[0], &inputs[1], &targets, 2).unwrap();
        let generic = generic_token_logprobs(&inputs[0], &inputs[1], &targets);
        assert!(max_rel_diff(&fused, &generic, 1.0) < 1e-14);
    }

    #[test]
    fn token_logprobs_match_the_generic_ops() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let targets: Vec<u32> = (0..300).map(|_| rng.random_range(0..1000)).collect();
        let inputs = [
            values(&[300, 48], 6, 1.0, DType::F32),
            values(&[1000, 48], 7, 0.3, DType::F32),
        ];
        compare_with_generic(
            &inputs,
            2.0,
            |t| token_logprobs(&t[0], &t[1], &targets, HEAD_CHUNK_ROWS).unwrap(),
            |t| generic_token_logprobs(&t[0], &t[1], &targets),
        );
    }

    #[test]
    fn kept_and_recomputed_logits_give_the_same_gradients() {
        let rows = Var::from_tensor(&values(&[7, 6], 85, 1.0, DType::F32)).unwrap();
        let head = Var::from_tensor(&values(&[11, 6], 86, 1.0, DType::F32)).unwrap();
        let targets = [0u32, 3, 10, 5, 5, 1, 9];
        let loss = token_logprobs(rows.as_tensor(), head.as_tensor(), &targets, 3)
            .unwrap()
            .sum_all()
            .unwrap();
        // The first backward pass takes the logits the forward pass kept; the second finds none.
        let kept = loss.backward().unwrap();
        let recomputed = loss.backward().unwrap();
        for var in [&rows, &head] {
            let grad = |g: &candle_core::backprop::GradStore| {
                g.get(var.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
            };
            assert_eq!(grad(&kept), grad(&recomputed));
        }
    }
}
