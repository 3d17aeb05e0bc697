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
            Some(lora) => self.weight.add(&(lora.b.matmul(&lora.a)? * lora.scale)?),
            None => Ok(self.weight.clone()),
        }
    }
}
