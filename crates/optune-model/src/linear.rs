//! A linear layer with an optional LoRA adapter.

use candle_core::{Device, Result, Tensor};
use optune_kernels::ops::generic;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The random stream of LoRA dropout, shared by a model's adapters and seeded by the caller, so a
/// run with a fixed seed draws the same masks on every device (candle's CPU RNG cannot be seeded).
/// The forward pass visits the adapters in a fixed order, so each mask is a fixed slice of the
/// stream.
#[derive(Clone)]
pub struct DropoutStream(Arc<Mutex<ChaCha8Rng>>);

impl DropoutStream {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    /// How far the stream has been drawn (ChaCha's word position): a training state keeps it,
    /// so that a resumed run draws the masks the uninterrupted run would have drawn.
    pub fn position(&self) -> u128 {
        self.0.lock().expect("dropout stream lock").get_word_pos()
    }

    /// Moves the stream to `position` (from [`DropoutStream::position`]).
    pub fn set_position(&self, position: u128) {
        self.0
            .lock()
            .expect("dropout stream lock")
            .set_word_pos(position);
    }

    /// Inverted dropout: each element kept with probability `1 − p` and scaled by `1 / (1 − p)`.
    fn apply(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        let keep = 1.0 - p;
        let mask: Vec<f32> = {
            let mut rng = self.0.lock().expect("dropout stream lock");
            (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        x * mask
    }
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

/// Row block of [`Linear::forward_fixed_rows`].
pub const DECODE_ROW_BLOCK: usize = 16;

/// Applies `f` to `x [rows, ..]` in zero-padded blocks of [`DECODE_ROW_BLOCK`] rows.
pub fn fixed_row_blocks(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let padded = rows.div_ceil(DECODE_ROW_BLOCK) * DECODE_ROW_BLOCK;
    let x = if padded > rows {
        let mut pad_shape = x.dims().to_vec();
        pad_shape[0] = padded - rows;
        Tensor::cat(&[x, &Tensor::zeros(pad_shape, x.dtype(), x.device())?], 0)?
    } else {
        x.clone()
    };
    let blocks = (0..padded / DECODE_ROW_BLOCK)
        .map(|b| f(&x.narrow(0, b * DECODE_ROW_BLOCK, DECODE_ROW_BLOCK)?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 0)?.narrow(0, 0, rows)
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
        let mut y = optune_kernels::linear(x, &self.weight)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        match self.adapter_delta(x)? {
            Some(delta) => y + delta,
            None => Ok(y),
        }
    }

    /// The LoRA adapter's contribution `scale · dropout(x) Aᵀ Bᵀ` for `x [.., in]`, shaped
    /// `[.., out]`; `None` without an adapter or with adapters switched off.
    pub fn adapter_delta(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        if !lora.enabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut out_dims = x.dims().to_vec();
        let in_features = *out_dims.last().expect("linear input has at least one dim");
        let x2 = x.reshape((x.elem_count() / in_features, in_features))?;
        let input = if lora.dropout > 0.0 && lora.training.load(Ordering::Relaxed) {
            lora.dropout_stream.apply(&x2, lora.dropout)?
        } else {
            x2
        };
        // The adapters are f32 master weights; they compute in the input's dtype (bf16 on a GPU),
        // and the cast passes their gradients back in f32.
        let (a, b) = (
            lora.a.to_dtype(input.dtype())?,
            lora.b.to_dtype(input.dtype())?,
        );
        // The generic products on every path: their backward computes only the gradients
        // wanted (no input gradient for the first layer's adapters, whose input is frozen).
        let delta = (generic::linear(&generic::linear(&input, &a)?, &b)? * lora.scale)?;
        *out_dims.last_mut().expect("non-empty") = lora.b.dim(0)?;
        Some(delta.reshape(out_dims)).transpose()
    }

    /// Like [`Linear::forward`] on `[rows, in]`, but always multiplies blocks of exactly
    /// [`DECODE_ROW_BLOCK`] rows (zero-padded). CPU matrix kernels pick their blocking by the row
    /// count, so a row's result can change in the last bits with the number of rows beside it;
    /// fixed-size blocks make each decoded sequence's logits independent of the batch size.
    pub fn forward_fixed_rows(&self, x: &Tensor) -> Result<Tensor> {
        fixed_row_blocks(x, |block| self.forward(block))
    }

    /// The weight with the adapter folded in, for saving a merged checkpoint.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            Some(lora) => {
                let delta = (lora.b.matmul(&lora.a)? * lora.scale)?;
                self.weight.add(&delta.to_dtype(self.weight.dtype())?)
            }
            None => Ok(self.weight.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_keeps_one_minus_p_scaled_and_repeats_with_the_seed() {
        let x = Tensor::ones((200, 50), candle_core::DType::F32, &Device::Cpu).unwrap();
        let masked = |seed| {
            DropoutStream::new(seed)
                .apply(&x, 0.25)
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
            stream
                .apply(&x, 0.5)
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
}
