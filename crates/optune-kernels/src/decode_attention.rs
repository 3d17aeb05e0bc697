//! Decode attention over each slot's own cached positions: the one new query of every slot of a
//! KV cache attends over that slot's positions `first..=last`, read in place from the cache.
//!
//! What the masked form (scores over the longest slot's positions, a mask, the cache's values
//! copied to a contiguous view) costs at decode: every slot reads as many keys as the longest,
//! and the values are copied per layer per step. Here each slot reads its own span once. On CUDA
//! the kernel is src/cuda/decode_attention.cu (online softmax in f32, one block per slot and
//! head); on the CPU the host decode kernel [`crate::host::attention`], in f32.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

/// `q [slots, heads, 1, d]` over `keys`, `values [slots, kv_heads, capacity, d]` (a KV cache, new
/// positions already written), `spans [slots, 2]` u32 of each slot's `(first, last)` positions,
/// inclusive: `[slots, heads, 1, d]`. A slot with `last < first` (idle) gets zeros. The query
/// heads of a group share their KV head; scores are `(q · k) · scale`, the softmax and the
/// weighted sum of values are in f32 whatever the dtype.
pub fn decode_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    spans: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (slots, heads, t, d) = q.dims4()?;
    let (cache_slots, kv_heads, _, cache_d) = keys.dims4()?;
    if t != 1 || cache_slots != slots || cache_d != d || heads % kv_heads != 0 {
        bail!(
            "decode_attention: q {:?} against a cache {:?}: one query per slot, the same head width, \
             whole groups of heads",
            q.dims(),
            keys.dims()
        );
    }
    if values.dims() != keys.dims() || spans.dims() != [slots, 2] || spans.dtype() != DType::U32 {
        bail!(
            "decode_attention: values {:?}, spans {:?} {:?} for keys {:?}",
            values.dims(),
            spans.dims(),
            spans.dtype(),
            keys.dims()
        );
    }
    let op = DecodeAttention {
        spans: spans.contiguous()?,
        scale,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&keys.contiguous()?, &values.contiguous()?, &op)
}

struct DecodeAttention {
    spans: Tensor,
    scale: f64,
}

impl DecodeAttention {
    /// The spans as host numbers (CPU tensors only).
    fn host_spans(&self) -> Result<Vec<u32>> {
        let (storage, layout) = self.spans.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok(s.as_slice::<u32>()?[layout.start_offset()..]
                [..layout.shape().elem_count()]
                .to_vec()),
            _ => bail!("decode_attention: the spans are not on the CPU"),
        }
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (slots, heads, _, d) = lq.shape().dims4()?;
        let (_, kv_heads, capacity, _) = lk.shape().dims4()?;
        let floats = |s: &CpuStorage, l: &Layout| -> Result<Vec<f32>> {
            let n = l.shape().elem_count();
            let at = l.start_offset();
            Ok(match s {
                CpuStorage::F32(x) => x[at..at + n].to_vec(),
                CpuStorage::BF16(x) => x[at..at + n].iter().map(|v| v.to_f32()).collect(),
                CpuStorage::F16(x) => x[at..at + n].iter().map(|v| v.to_f32()).collect(),
                CpuStorage::F64(x) => x[at..at + n].iter().map(|&v| v as f32).collect(),
                other => bail!("decode_attention: {:?} values", other.dtype()),
            })
        };
        let (q_all, keys, values) = (floats(q, lq)?, floats(k, lk)?, floats(v, lv)?);
        let spans = self.host_spans()?;
        // The host kernel takes the active slots only and scales by 1/√d itself (the model's
        // scale, for which this factor is 1).
        let rescale = (self.scale * (d as f64).sqrt()) as f32;
        let mut queries = Vec::new();
        let mut rows = Vec::new();
        for slot in 0..slots {
            let (first, last) = (spans[2 * slot] as usize, spans[2 * slot + 1] as usize);
            if last < first {
                continue;
            }
            if last >= capacity {
                bail!("decode_attention: slot {slot} reaches position {last} of {capacity}");
            }
            queries.push(crate::host::Query {
                slot,
                first,
                position: last,
            });
            rows.extend(
                q_all[slot * heads * d..(slot + 1) * heads * d]
                    .iter()
                    .map(|x| x * rescale),
            );
        }
        let mut attended = vec![0f32; rows.len()];
        let cache = crate::host::LayerCache {
            keys: &keys,
            values: &values,
            kv_heads,
            capacity,
        };
        crate::host::attention(&rows, &queries, heads, d, &cache, &mut attended);
        let mut out = vec![0f32; slots * heads * d];
        for (query, row) in queries.iter().zip(attended.chunks_exact(heads * d)) {
            out[query.slot * heads * d..(query.slot + 1) * heads * d].copy_from_slice(row);
        }
        let shape = Shape::from((slots, heads, 1, d));
        Ok((
            match q {
                CpuStorage::F32(_) => CpuStorage::F32(out),
                CpuStorage::BF16(_) => {
                    CpuStorage::BF16(out.iter().map(|&x| half::bf16::from_f32(x)).collect())
                }
                CpuStorage::F16(_) => {
                    CpuStorage::F16(out.iter().map(|&x| half::f16::from_f32(x)).collect())
                }
                _ => CpuStorage::F64(out.iter().map(|&x| x as f64).collect()),
            },
            shape,
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        use candle_core::CudaStorage;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
        /// Warps per block, as WARPS in the kernel.
        const THREADS: u32 = 4 * 32;
        const MAX_HEAD_DIM: usize = 256;

        fn launch<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            op: &DecodeAttention,
            name: &str,
            (q, lq): (&CudaStorage, &Layout),
            (k, lk): (&CudaStorage, &Layout),
            (v, lv): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let device = q.device().clone();
            let (slots, heads, _, d) = lq.shape().dims4()?;
            let (_, kv_heads, capacity, _) = lk.shape().dims4()?;
            let q = q.as_cuda_slice::<T>()?.slice(lq.start_offset()..);
            let k = k.as_cuda_slice::<T>()?.slice(lk.start_offset()..);
            let v = v.as_cuda_slice::<T>()?.slice(lv.start_offset()..);
            let (spans_storage, spans_layout) = op.spans.storage_and_layout();
            let Storage::Cuda(spans) = &*spans_storage else {
                bail!("decode_attention: the spans are not on the GPU");
            };
            let spans = spans
                .as_cuda_slice::<u32>()?
                .slice(spans_layout.start_offset()..);
            // SAFETY: every element is written by the kernel (idle slots get zeros).
            let out = unsafe { device.alloc::<T>(slots * heads * d)? };
            let func = device.get_or_load_custom_func(name, "optune_decode_attention", PTX)?;
            let (heads_arg, kv_heads_arg, capacity_arg, d_arg) =
                (heads as i32, kv_heads as i32, capacity as i32, d as i32);
            let scale = op.scale as f32;
            let config = LaunchConfig {
                grid_dim: (slots as u32, heads as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = func.builder();
            builder.arg(&q);
            builder.arg(&k);
            builder.arg(&v);
            builder.arg(&out);
            builder.arg(&spans);
            builder.arg(&heads_arg);
            builder.arg(&kv_heads_arg);
            builder.arg(&capacity_arg);
            builder.arg(&d_arg);
            builder.arg(&scale);
            // SAFETY: the argument list matches the kernel's signature; the slices hold
            // slots·heads·d (q, out), slots·kv_heads·capacity·d (k, v) and 2·slots (spans)
            // elements, checked by `decode_attention`.
            unsafe { builder.launch(config) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, device))
        }

        let d = lq.shape().dims4()?.3;
        if d > MAX_HEAD_DIM {
            bail!("decode_attention: head width {d} above the kernel's {MAX_HEAD_DIM}");
        }
        let (q, k, v) = ((q, lq), (k, lk), (v, lv));
        let out = match q.0.dtype() {
            DType::F32 => launch::<f32>(self, "decode_attention_f32", q, k, v)?,
            DType::BF16 => launch::<half::bf16>(self, "decode_attention_bf16", q, k, v)?,
            DType::F16 => launch::<half::f16>(self, "decode_attention_f16", q, k, v)?,
            other => bail!("decode_attention: {other:?} on CUDA"),
        };
        Ok((out, lq.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The masked form, as the tensor decode step computed it: scores over the longest span,
    /// positions outside a slot's span masked.
    fn masked(q: &Tensor, k: &Tensor, v: &Tensor, spans: &[(u32, u32)], scale: f64) -> Tensor {
        let keys = spans.iter().map(|s| s.1 as usize + 1).max().unwrap();
        let slots = spans.len();
        let mask: Vec<f32> = spans
            .iter()
            .flat_map(|&(first, last)| {
                (0..keys).map(move |p| {
                    if (first as usize..=last as usize).contains(&p) {
                        0.0
                    } else {
                        -1e9
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (slots, 1, 1, keys), &Device::Cpu)
            .unwrap()
            .to_dtype(q.dtype())
            .unwrap();
        crate::ops::generic::attention(
            q,
            &k.narrow(2, 0, keys).unwrap(),
            &v.narrow(2, 0, keys).unwrap(),
            &mask,
            scale,
        )
        .unwrap()
    }

    #[test]
    fn each_slot_attends_over_its_own_span_as_the_masked_form_does() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (slots, heads, kv_heads, capacity, d) = (4, 6, 2, 20, 8);
        let q = random(&[slots, heads, 1, d], &mut rng);
        let k = random(&[slots, kv_heads, capacity, d], &mut rng);
        let v = random(&[slots, kv_heads, capacity, d], &mut rng);
        // Whole prefixes, a sliding window, a single position.
        let spans = [(0u32, 13u32), (0, 2), (9, 17), (5, 5)];
        let flat: Vec<u32> = spans.iter().flat_map(|&(a, b)| [a, b]).collect();
        let spans_tensor = Tensor::from_vec(flat, (slots, 2), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).unwrap());
            let got = decode_attention(&q, &k, &v, &spans_tensor, 0.35).unwrap();
            assert_eq!(got.dtype(), dtype);
            let want = masked(&q, &k, &v, &spans, 0.35);
            let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let tolerance = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(diff < tolerance, "{dtype:?}: {diff}");
        }
    }

    #[test]
    fn an_idle_slot_gets_zeros_and_a_span_past_the_cache_is_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let q = random(&[2, 2, 1, 4], &mut rng);
        let k = random(&[2, 1, 5, 4], &mut rng);
        let spans = Tensor::new(&[[1u32, 0], [0, 3]], &Device::Cpu).unwrap();
        let out = decode_attention(&q, &k, &k, &spans, 1.0).unwrap();
        let idle: Vec<f32> = out
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(idle.iter().all(|&x| x == 0.0));
        let past = Tensor::new(&[[0u32, 5], [0, 3]], &Device::Cpu).unwrap();
        let err = decode_attention(&q, &k, &k, &past, 1.0).unwrap_err();
        assert!(err.to_string().contains("reaches position 5"), "{err}");
    }
}
