//! A linear layer with an optional LoRA adapter.

use candle_core::{Result, Tensor};
use optune_kernels::DropoutMask;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The random stream of LoRA dropout, shared by a model's adapters and seeded by the caller.
/// Counter-based ([`optune_kernels::DropoutMask`]): each adapted input takes the next positions
/// of the stream, one per element (`DropoutStream::next_mask`), and its mask is computed from
/// them where the tensor lives, by the adapter's op ([`optune_kernels::lora_linear`]), by its
/// backward pass again, and by a recomputed block again; nothing is drawn on the host or copied
/// to the device, and no dropped-out copy is kept for the backward pass on either path. A run
/// with a fixed seed draws the same masks on every device.
#[derive(Clone)]
pub struct DropoutStream(Arc<StreamState>);

struct StreamState {
    key: u64,
    /// How many elements the calls so far have taken.
    position: AtomicU64,
}

impl DropoutStream {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(StreamState {
            key: optune_kernels::dropout_key(seed),
            position: AtomicU64::new(0),
        }))
    }

    /// How far the stream has been taken.
    pub fn position(&self) -> u64 {
        self.0.position.load(Ordering::Relaxed)
    }

    /// Moves the stream to `position`: a trainer gives each micro-batch a stretch of its own, so
    /// that its masks depend on its place in the run only (a resumed run, or another replica,
    /// draws what the uninterrupted run on one device draws).
    pub fn set_position(&self, position: u64) {
        self.0.position.store(position, Ordering::Relaxed);
    }

    /// Where the stream stands now, to come back to with [`DropoutPlace::restore`]: a block run
    /// again for its gradients (activation recomputation) must draw the masks its first run drew.
    pub(crate) fn place(&self) -> DropoutPlace {
        DropoutPlace {
            stream: self.clone(),
            position: self.position(),
        }
    }

    /// The mask of inverted dropout over the stream's next `elements` positions: each element
    /// kept with probability `1 − p` and scaled by `1 / (1 − p)`.
    fn next_mask(&self, elements: usize, p: f32) -> Result<DropoutMask> {
        let position = self
            .0
            .position
            .fetch_add(elements as u64, Ordering::Relaxed);
        DropoutMask::new(self.0.key, position, p)
    }
}

/// A [`DropoutStream`]'s position at one moment ([`DropoutStream::place`]).
pub(crate) struct DropoutPlace {
    stream: DropoutStream,
    position: u64,
}

impl DropoutPlace {
    /// Puts the stream back where it stood: the masks drawn next are the ones drawn then.
    pub(crate) fn restore(&self) {
        self.stream.set_position(self.position);
    }
}

/// The distinct dropout streams of `linears` whose adapters drop out now (training, `p > 0`).
pub(crate) fn active_dropout_streams<'a>(
    linears: impl IntoIterator<Item = &'a Linear>,
) -> Vec<DropoutStream> {
    let mut streams: Vec<DropoutStream> = Vec::new();
    for lora in linears.into_iter().filter_map(|l| l.lora.as_ref()) {
        let stream = &lora.dropout_stream;
        if lora.drops_out() && !streams.iter().any(|s| Arc::ptr_eq(&s.0, &stream.0)) {
            streams.push(stream.clone());
        }
    }
    streams
}

/// Low-rank adapter `Δy = scale · dropout(x) Aᵀ Bᵀ` (PEFT's layout: `A: [r, in]`, `B: [out, r]`).
#[derive(Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
    /// Shared by every adapter of one model, so the reference (adapters off) needs no second copy.
    pub enabled: Arc<AtomicBool>,
    /// Dropout is applied only while training.
    pub training: Arc<AtomicBool>,
    pub dropout_stream: DropoutStream,
}

impl LoraAdapter {
    /// Whether the adapter applies dropout now: on, training, with `p > 0`.
    fn drops_out(&self) -> bool {
        self.dropout > 0.0
            && self.enabled.load(Ordering::Relaxed)
            && self.training.load(Ordering::Relaxed)
    }
}

/// A LoRA adapter's operands in one forward pass: `b` is scaled already, `dropout` the mask of
/// its input (`None`: the input itself).
struct Adapter {
    dropout: Option<DropoutMask>,
    a: Tensor,
    b: Tensor,
}

#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// `x [.., in] → [.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.adapter(x)? {
            Some(Adapter { dropout, a, b }) => {
                optune_kernels::lora_linear(x, &self.weight, &a, &b, dropout)?
            }
            None => optune_kernels::linear(x, &self.weight)?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    /// The LoRA adapter's operands for `x [.., in]`: `scale · dropout(x) Aᵀ Bᵀ` is its
    /// contribution; `None` without an adapter or with adapters switched off.
    fn adapter(&self, x: &Tensor) -> Result<Option<Adapter>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        if !lora.enabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let dropout = match lora.drops_out() {
            true => Some(
                lora.dropout_stream
                    .next_mask(x.elem_count(), lora.dropout)?,
            ),
            false => None,
        };
        // The adapters are f32 master weights; they compute in the input's dtype (bf16 on a GPU),
        // and the cast passes their gradients back in f32. The scale goes on B (out × rank), not
        // on the [rows, out] product: one small multiply instead of a large one.
        let (a, b) = (
            lora.a.to_dtype(x.dtype())?,
            (&lora.b * lora.scale)?.to_dtype(x.dtype())?,
        );
        // Every path's products compute only the gradients wanted (no input gradient for the
        // first layer's adapters, whose input is frozen).
        Ok(Some(Adapter { dropout, a, b }))
    }

    /// The weight as a merged checkpoint saves it: the adapter folded in when there is one.
    pub fn saved_weight(&self) -> ModelWeight {
        match &self.lora {
            Some(lora) => ModelWeight::Merged {
                base: self.weight.clone(),
                a: lora.a.clone(),
                b: lora.b.clone(),
                scale: lora.scale,
            },
            None => ModelWeight::Plain(self.weight.clone()),
        }
    }
}

/// A weight of a model as its checkpoint is saved: made only when the writer reaches it, so a
/// save of a LoRA model holds one merged weight at a time, not a merged copy of the model.
#[derive(Clone)]
pub enum ModelWeight {
    Plain(Tensor),
    /// `base + scale · B·A`, summed in f32 and cast once, by the writer, to the saved dtype.
    Merged {
        base: Tensor,
        a: Tensor,
        b: Tensor,
        scale: f64,
    },
}

impl ModelWeight {
    /// The same weight over `base` instead of the model's own: the f32 master copies of a run
    /// computed in bf16, or the weights as stored under a LoRA model whose base was read in a
    /// narrower dtype.
    pub fn with_base(self, replacement: Tensor) -> anyhow::Result<Self> {
        let current = match &self {
            ModelWeight::Plain(t) | ModelWeight::Merged { base: t, .. } => t,
        };
        if current.dims() != replacement.dims() {
            anyhow::bail!(
                "a replacement weight of shape {:?} for one of shape {:?}",
                replacement.dims(),
                current.dims()
            );
        }
        Ok(match self {
            ModelWeight::Plain(_) => ModelWeight::Plain(replacement),
            ModelWeight::Merged { a, b, scale, .. } => ModelWeight::Merged {
                base: replacement,
                a,
                b,
                scale,
            },
        })
    }
}

impl optune_checkpoint::SavedWeight for ModelWeight {
    fn dtype(&self) -> candle_core::DType {
        match self {
            ModelWeight::Plain(t) => t.dtype(),
            ModelWeight::Merged { .. } => candle_core::DType::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            ModelWeight::Plain(t) | ModelWeight::Merged { base: t, .. } => t.dims(),
        }
    }

    /// Computed outside autograd: from the adapter variables themselves, the merged weight
    /// would record its ops and keep every intermediate alive as long as it lives. A merged
    /// weight is summed on the host, where the writer needs it anyway: there B·A is a full f32
    /// product, where a GPU's may run in TF32 (`--tf32`), and the merge takes no device memory.
    /// The scale goes into B (`[out, rank]`) and the base is added into the product in place,
    /// so a merge holds one weight-sized f32 buffer where `base + (B·A)·scale` held three.
    fn tensor(&self) -> anyhow::Result<Tensor> {
        match self {
            ModelWeight::Plain(t) => Ok(t.clone()),
            ModelWeight::Merged { base, a, b, scale } => {
                let on_host = |t: &Tensor| t.detach().to_device(&candle_core::Device::Cpu);
                let f32_on_host = |t: &Tensor| on_host(t)?.to_dtype(candle_core::DType::F32);
                // A fresh product: no other tensor sees the buffer that the base is added to.
                let merged = (f32_on_host(b)? * *scale)?.matmul(&f32_on_host(a)?)?;
                merged.inplace_op2(&on_host(base)?.contiguous()?, &AddBase)?;
                Ok(merged)
            }
        }
    }
}

/// `merged += base` in place, `merged` an f32 buffer of the caller's own (both contiguous on the
/// host), `base` in any float dtype (widened exactly from bf16 and f16, rounded from f64).
struct AddBase;

impl candle_core::InplaceOp2 for AddBase {
    fn name(&self) -> &'static str {
        "merge-base"
    }

    fn cpu_fwd(
        &self,
        merged: &mut candle_core::CpuStorage,
        merged_layout: &candle_core::Layout,
        base: &candle_core::CpuStorage,
        base_layout: &candle_core::Layout,
    ) -> Result<()> {
        use optune_kernels::storage::{contiguous, contiguous_f32_mut};
        let name = self.name();
        let merged = contiguous_f32_mut(merged, merged_layout, name, "the merged weight")?;
        fn add<T: candle_core::WithDType>(merged: &mut [f32], base: &[T]) -> Result<()> {
            if merged.len() != base.len() {
                candle_core::bail!("merge-base: {} elements and {}", merged.len(), base.len());
            }
            for (m, b) in merged.iter_mut().zip(base) {
                *m += b.to_f64() as f32;
            }
            Ok(())
        }
        match base {
            candle_core::CpuStorage::F32(_) => add(
                merged,
                contiguous::<f32>(base, base_layout, name, "the base")?,
            ),
            candle_core::CpuStorage::BF16(_) => add(
                merged,
                contiguous::<half::bf16>(base, base_layout, name, "the base")?,
            ),
            candle_core::CpuStorage::F16(_) => add(
                merged,
                contiguous::<half::f16>(base, base_layout, name, "the base")?,
            ),
            candle_core::CpuStorage::F64(_) => add(
                merged,
                contiguous::<f64>(base, base_layout, name, "the base")?,
            ),
            _ => candle_core::bail!("merge-base: a base weight that is not a float"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_keeps_one_minus_p_scaled_and_repeats_with_the_seed() {
        let x = Tensor::ones((200, 50), candle_core::DType::F32, &Device::Cpu).unwrap();
        let masked = |seed| {
            let mask = DropoutStream::new(seed).next_mask(x.elem_count(), 0.25);
            optune_kernels::dropout(&x, mask.unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let a = masked(7);
        let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / a.len() as f64;
        // 10000 draws: the kept fraction's standard deviation is 0.0043.
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(a, masked(7));
        assert_ne!(a, masked(8));
    }

    #[test]
    fn a_stream_moved_to_a_saved_position_draws_the_same_masks() {
        let x = Tensor::ones((10, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mask = |stream: &DropoutStream| {
            let mask = stream.next_mask(x.elem_count(), 0.5);
            optune_kernels::dropout(&x, mask.unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let stream = DropoutStream::new(3);
        mask(&stream);
        let position = stream.position();
        let next = mask(&stream);
        let resumed = DropoutStream::new(3);
        resumed.set_position(position);
        assert_eq!(mask(&resumed), next);
    }

    /// The merged weight of a trained adapter is plain data: it records no autograd op, so it
    /// keeps none of the merge's intermediates alive (nor reaches the adapter's variables), and
    /// it is W + scale·B·A summed in f32.
    #[test]
    fn a_merged_weight_is_computed_outside_autograd() {
        use optune_checkpoint::SavedWeight;
        let dev = Device::Cpu;
        let a = candle_core::Var::from_tensor(
            &Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)
                .unwrap()
                .t()
                .unwrap()
                .contiguous()
                .unwrap(),
        )
        .unwrap();
        let b = candle_core::Var::from_tensor(&Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap())
            .unwrap();
        let on = Arc::new(AtomicBool::new(true));
        let mut linear = Linear::new(
            Tensor::ones((2, 3), candle_core::DType::BF16, &dev).unwrap(),
            None,
        );
        linear.lora = Some(LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 0.5,
            dropout: 0.0,
            enabled: on.clone(),
            training: on,
            dropout_stream: DropoutStream::new(0),
        });
        let saved = linear.saved_weight();
        let merged = saved.tensor().unwrap();
        assert_eq!(merged.dtype(), candle_core::DType::F32);
        assert_eq!(SavedWeight::dtype(&saved), candle_core::DType::F32);
        let values: Vec<Vec<f32>> = merged
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(values, [[1.5, 2.5, 3.5], [2.0, 3.0, 4.0]]);
        let grads = merged.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(a.as_tensor()).is_none() && grads.get(b.as_tensor()).is_none(),
            "the merged weight still holds the graph back to the adapters"
        );
    }
}
