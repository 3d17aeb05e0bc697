//! Embedding.

use super::*;

/// Rows `ids` of `weight [vocab, h]`: `[ids.., h]`, differentiable in the weight (candle's
/// `index_select` backward adds into a zeroed copy of the whole matrix; here a weight with a
/// gradient buffer gets only its looked-up rows added there). CPU, any dtype; u32 ids.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    weight
        .contiguous()?
        .apply_op2(&ids.contiguous()?, Embedding)
}

struct Embedding;

impl Embedding {
    /// `(vocab, h)` of the weight; fails on an id outside the vocabulary.
    fn check(weight: &Layout, ids: &[u32]) -> Result<(usize, usize)> {
        let &[v, h] = weight.dims() else {
            bail!("embedding: weight {:?} must be a matrix", weight.dims());
        };
        if let Some(id) = ids.iter().find(|&&id| id as usize >= v) {
            bail!("embedding: id {id} is outside the vocabulary of {v}");
        }
        Ok((v, h))
    }
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = contiguous::<u32>(s2, l2, self.name(), "ids")?;
        let (_, h) = Self::check(l1, ids)?;
        fn gather<T: WithDType>(weight: &[T], ids: &[u32], h: usize) -> Vec<T> {
            let mut out = vec![T::from_f64(0.0); ids.len() * h];
            out.par_chunks_mut(h)
                .zip(ids.par_iter())
                .for_each(|(row, &id)| row.copy_from_slice(&weight[id as usize * h..][..h]));
            out
        }
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(gather(contiguous(s1, l1, name, "weight")?, ids, h)),
            DType::F64 => CpuStorage::F64(gather(contiguous(s1, l1, name, "weight")?, ids, h)),
            DType::BF16 => CpuStorage::BF16(gather(contiguous(s1, l1, name, "weight")?, ids, h)),
            other => bail!("embedding: dtype {other:?} is not supported"),
        };
        let mut dims = l2.dims().to_vec();
        dims.push(h);
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        weight: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !weight.track_op() {
            return Ok((None, None));
        }
        let (v, h) = weight.dims2()?;
        let grad = grad.detach().reshape(((), h))?.contiguous()?;
        let ids = ids.detach().flatten_all()?;
        let Some(buffer) = grad_buffers::buffer_for(weight) else {
            let dense = weight.zeros_like()?.index_add(&ids, &grad, 0)?;
            return Ok((Some(dense), None));
        };
        buffer.write(&grad, &ids, |dw, accumulate, (g, gl), (ids, il)| {
            let g = contiguous::<f32>(g, gl, "embedding-grad", "gradient")?;
            let ids = contiguous::<u32>(ids, il, "embedding-grad", "ids")?;
            if !accumulate {
                dw.par_chunks_mut(ELEMENT_BLOCK)
                    .for_each(|block| block.fill(0.0));
            }
            // In id order, one row at a time: a token seen twice sums in a fixed order.
            for (row, &id) in g.chunks_exact(h).zip(ids) {
                let id = id as usize;
                debug_assert!(id < v);
                for (d, &x) in dw[id * h..(id + 1) * h].iter_mut().zip(row) {
                    *d += x;
                }
            }
            Ok(())
        })?;
        Ok((None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::*;
    use candle_core::Device;

    #[test]
    fn embedding_matches_the_generic_ops() {
        let ids = Tensor::new(&[[3u32, 0, 3], [9, 1, 3]], &Device::Cpu).unwrap();
        let inputs = [values(&[10, 6], 84, 1.0, DType::F64)];
        compare_with_generic(
            &inputs,
            1.0,
            |t| embedding(&t[0], &ids).unwrap(),
            |t| crate::ops::generic::embedding(&t[0], &ids).unwrap(),
        );
        let outside = Tensor::new(&[10u32], &Device::Cpu).unwrap();
        let err = embedding(&inputs[0], &outside).unwrap_err().to_string();
        assert!(
            err.contains("id 10 is outside the vocabulary of 10"),
            "{err}"
        );
    }
}
