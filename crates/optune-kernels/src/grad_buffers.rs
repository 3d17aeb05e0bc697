//! Gradients that the fused backward passes write in place, like torch's `.grad`.
//!
//! candle's backward sums every gradient into a fresh tensor: for each weight a zeroed buffer of
//! its size, then an add into another fresh one (`GradStore::or_insert` + `add`), and the
//! embedding's gradient is an `index_add` into yet another zeroed copy of the whole matrix. For
//! full fine-tuning that is three passes over every weight's size per step on one thread, and the
//! matrices above glibc's mmap threshold (the 49152 × 576 embedding of SmolLM2: 113 MB) come back
//! from the kernel zeroed page by page: ~0.45 s of a ~4.5 s SmolLM2 bf16 DPO step (4 pairs), all
//! of it on one thread while the others wait.
//!
//! A weight registered here instead owns one gradient buffer for the whole run. The fused ops that
//! read it ([`crate::linear`], [`crate::token_logprobs`], [`crate::embedding`]) write its gradient
//! into that buffer (the first write since the buffer was drained overwrites, later ones add)
//! and hand candle no gradient for it; [`GradBuffers::drain_into`] then gives the optimiser the
//! buffers as ordinary gradients. Only f32 weights on the CPU, registered when the fused kernels
//! run, get one: elsewhere the generic ops run and candle's gradients are used as they are. The
//! LoRA-adapted linear layer ([`crate::lora_linear`]) takes its adapters as one concatenation,
//! so they keep candle's (small) gradients.

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, InplaceOp3, Layout, Result, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The gradient buffer of one weight.
pub(crate) struct GradBuffer {
    /// f32, on the CPU, the weight's shape.
    grad: Tensor,
    /// Whether a backward pass wrote it since it was last drained.
    written: AtomicBool,
}

/// Storage and layout of one input of a buffer write.
pub(crate) type Input<'a> = (&'a CpuStorage, &'a Layout);

impl GradBuffer {
    /// Runs `write(buffer, accumulate, a, b)` on the buffer's elements with the storages of `a`
    /// and `b`; `accumulate` is false for the first write since the buffer was drained (`write`
    /// then overwrites every element, or zeroes those it does not touch).
    pub(crate) fn write(
        &self,
        a: &Tensor,
        b: &Tensor,
        write: impl Fn(&mut [f32], bool, Input, Input) -> Result<()>,
    ) -> Result<()> {
        let accumulate = self.written.swap(true, Ordering::AcqRel);
        self.grad.inplace_op3(a, b, &Write { accumulate, write })
    }
}

/// The in-place op that gives [`GradBuffer::write`] its buffer and inputs.
struct Write<F> {
    accumulate: bool,
    write: F,
}

impl<F: Fn(&mut [f32], bool, Input, Input) -> Result<()>> InplaceOp3 for Write<F> {
    fn name(&self) -> &'static str {
        "grad-buffer-write"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_layout: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let CpuStorage::F32(values) = dst else {
            bail!("gradient buffer: expected f32 storage");
        };
        let Some((start, end)) = dst_layout.contiguous_offsets() else {
            bail!("gradient buffer: expected a contiguous tensor");
        };
        (self.write)(&mut values[start..end], self.accumulate, (s2, l2), (s3, l3))
    }
}

/// Registered buffers by the id of their weight.
fn registry() -> &'static Mutex<HashMap<TensorId, Arc<GradBuffer>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<TensorId, Arc<GradBuffer>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The buffer registered for `weight`, if any (asked by the fused backward passes).
pub(crate) fn buffer_for(weight: &Tensor) -> Option<Arc<GradBuffer>> {
    registry()
        .lock()
        .expect("the registry lock is never held across a panic")
        .get(&weight.id())
        .cloned()
}

/// The gradient buffers of a training run's weights; dropping it unregisters them.
pub struct GradBuffers {
    /// (weight, its buffer), in the order given.
    buffers: Vec<(Tensor, Arc<GradBuffer>)>,
}

impl GradBuffers {
    /// A buffer for each of `weights` that the fused ops can write to (f32, on the CPU; worth
    /// registering when [`crate::autograd_path`] is fused); the others are left to candle's
    /// gradients. A weight can be registered by one `GradBuffers` at a time.
    pub fn register<'a>(weights: impl IntoIterator<Item = &'a Tensor>) -> Result<Self> {
        let mut registry = registry()
            .lock()
            .expect("the registry lock is never held across a panic");
        let mut buffers = Vec::new();
        for weight in weights {
            let writable = weight.device().is_cpu() && weight.dtype() == DType::F32;
            if !writable || registry.contains_key(&weight.id()) {
                continue;
            }
            let buffer = Arc::new(GradBuffer {
                grad: weight.zeros_like()?,
                written: AtomicBool::new(false),
            });
            registry.insert(weight.id(), buffer.clone());
            buffers.push((weight.clone(), buffer));
        }
        Ok(Self { buffers })
    }

    /// Whether `weight` has a buffer here that a backward pass wrote since the last drain.
    pub fn written(&self, weight: &Tensor) -> bool {
        self.buffers
            .iter()
            .any(|(w, b)| w.id() == weight.id() && b.written.load(Ordering::Acquire))
    }

    /// Puts each gradient written since the last drain into `grads` (added to the one candle's
    /// backward left there for the same weight, if a generic op read it too) and starts the
    /// next sum. The tensors put there share the buffers: use them before the next backward pass.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        for (weight, buffer) in &self.buffers {
            if !buffer.written.swap(false, Ordering::AcqRel) {
                continue;
            }
            let total = match grads.get(weight) {
                Some(other) => (other + &buffer.grad)?,
                None => buffer.grad.clone(),
            };
            grads.insert(weight, total);
        }
        Ok(())
    }
}

impl Drop for GradBuffers {
    fn drop(&mut self) {
        let mut registry = registry()
            .lock()
            .expect("the registry lock is never held across a panic");
        for (weight, _) in &self.buffers {
            registry.remove(&weight.id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::{self, tests::max_rel_diff, tests::values};
    use candle_core::{Device, Var};

    /// A tied toy model on the fused ops: ids → embedding → linear → the head (the embedding
    /// again), log-probs of `targets` summed with fixed weights.
    fn loss(embed: &Tensor, proj: &Tensor) -> Tensor {
        let ids = Tensor::new(&[3u32, 7, 3, 0, 9, 7], &Device::Cpu).unwrap();
        let targets = [7u32, 3, 0, 9, 9, 1];
        let x = fused::embedding(embed, &ids).unwrap();
        let h = fused::linear(&x, proj).unwrap();
        let logp = fused::token_logprobs(&h, embed, &targets, 4).unwrap();
        let w = values(&[6], 5, 1.0, DType::F32);
        (logp * w).unwrap().sum_all().unwrap()
    }

    fn weights() -> (Var, Var) {
        let embed = Var::from_tensor(&values(&[11, 8], 1, 1.0, DType::F32)).unwrap();
        let proj = Var::from_tensor(&values(&[8, 8], 2, 0.5, DType::F32)).unwrap();
        (embed, proj)
    }

    #[test]
    fn buffered_gradients_are_candles_gradients() {
        let (embed, proj) = weights();
        let (e, p) = (embed.as_tensor(), proj.as_tensor());
        let candle = loss(e, p).backward().unwrap();
        let buffers = GradBuffers::register([e, p]).unwrap();
        let mut grads = loss(e, p).backward().unwrap();
        // The fused ops wrote them to the buffers and handed candle none.
        assert!(grads.get(e).is_none() && grads.get(p).is_none());
        assert!(buffers.written(e) && buffers.written(p));
        buffers.drain_into(&mut grads).unwrap();
        for w in [e, p] {
            // The tied embedding sums head and lookup gradients in another order.
            assert!(max_rel_diff(grads.get(w).unwrap(), candle.get(w).unwrap(), 1.0) < 1e-6);
        }
        assert!(!buffers.written(e) && !buffers.written(p));
    }

    #[test]
    fn buffers_sum_until_drained_and_then_start_again() {
        let (embed, proj) = weights();
        let (e, p) = (embed.as_tensor(), proj.as_tensor());
        let once = loss(e, p).backward().unwrap();
        let buffers = GradBuffers::register([e, p]).unwrap();
        let mut twice = loss(e, p).backward().unwrap();
        loss(e, p).backward().unwrap();
        buffers.drain_into(&mut twice).unwrap();
        for w in [e, p] {
            let doubled = (once.get(w).unwrap() * 2.0).unwrap();
            assert!(max_rel_diff(twice.get(w).unwrap(), &doubled, 1.0) < 1e-6);
        }
        // The drained tensors share the buffers: the next pass overwrites them.
        let mut again = loss(e, p).backward().unwrap();
        buffers.drain_into(&mut again).unwrap();
        for w in [e, p] {
            assert!(max_rel_diff(again.get(w).unwrap(), once.get(w).unwrap(), 1.0) < 1e-6);
        }
    }

    #[test]
    fn dropped_buffers_give_the_gradients_back_to_candle() {
        let (embed, proj) = weights();
        let (e, p) = (embed.as_tensor(), proj.as_tensor());
        drop(GradBuffers::register([e, p]).unwrap());
        let grads = loss(e, p).backward().unwrap();
        assert!(grads.get(e).is_some() && grads.get(p).is_some());
    }

    #[test]
    fn only_f32_weights_get_a_buffer() {
        let w = Var::from_tensor(&values(&[4, 3], 3, 1.0, DType::F64)).unwrap();
        let buffers = GradBuffers::register([w.as_tensor()]).unwrap();
        assert!(buffers.buffers.is_empty());
    }
}
