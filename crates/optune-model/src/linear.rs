//! A linear layer with an optional LoRA adapter.

use candle_core::{Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, lora: None }
    }

    /// `x [.., in] → [.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let in_features = *out_dims.last().expect("linear input has at least one dim");
        let rows = x.elem_count() / in_features;
        let x2 = x.reshape((rows, in_features))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(lora) = &self.lora {
            if lora.enabled.load(Ordering::Relaxed) {
                let input = if lora.dropout > 0.0 && lora.training.load(Ordering::Relaxed) {
                    candle_nn::ops::dropout(&x2, lora.dropout)?
                } else {
                    x2.clone()
                };
                let delta = input.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
                y = (y + (delta * lora.scale)?)?;
            }
        }
        *out_dims.last_mut().expect("non-empty") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }

    /// The weight with the adapter folded in, for saving a merged checkpoint.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            Some(lora) => self.weight.add(&(lora.b.matmul(&lora.a)? * lora.scale)?),
            None => Ok(self.weight.clone()),
        }
    }
}
