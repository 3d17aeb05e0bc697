//! Rotary position embeddings in the Hugging Face layout (rotate-half, not interleaved pairs).

use crate::config::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};

/// Cosine and sine tables for every position up to the model's context length, shaped
/// `[positions, head_dim / 2]`: one angle per pair of rotated channels (transformers keeps the
/// two halves duplicated, `[positions, head_dim]`; the kernels read each half's angle from
/// the one table).
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies `1 / θ^(2i/d)`, with Llama-3's smooth low/high-frequency rescaling when the
/// config asks for it.
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f64> {
    let dim = config.head_dim();
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    let Some(scaling) = config
        .rope_scaling
        .as_ref()
        .filter(|s| s.rope_type == "llama3")
    else {
        return base;
    };
    let factor = scaling.factor.unwrap_or(8.0);
    let low = scaling.low_freq_factor.unwrap_or(1.0);
    let high = scaling.high_freq_factor.unwrap_or(4.0);
    let original = scaling.original_max_position_embeddings.unwrap_or(8192) as f64;
    let low_freq_wavelen = original / low;
    let high_freq_wavelen = original / high;
    base.into_iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        })
        .collect()
}

impl RotaryTables {
    pub fn new(config: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(config);
        let half = inv_freq.len();
        let positions = config.max_position_embeddings.max(1);
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            // transformers computes the angles in f32; doing the same keeps long positions equal.
            let angles = inv_freq.iter().map(|f| pos as f32 * *f as f32);
            cos.extend(angles.clone().map(f32::cos));
            sin.extend(angles.map(f32::sin));
        }
        let shape = (positions, half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Tables for `positions` (`[batch, seq]`, u32), shaped `[batch, seq, head_dim / 2]`: what
    /// [`optune_kernels::rotary_attention`] takes, looked up once per forward pass for every layer.
    pub fn lookup(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, seq) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        let pick = |table: &Tensor| -> Result<Tensor> {
            table.index_select(&flat, 0)?.reshape((batch, seq, half))
        };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let config = ModelConfig::from_json_str(
            &serde_json::json!({
                "model_type": "llama", "vocab_size": 4, "hidden_size": 64, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
            })
            .to_string(),
        )
        .unwrap();
        let scaled = inverse_frequencies(&config);
        // Frequency 0 is 1.0: wavelength 2π < 32/4, so it is kept.
        assert_eq!(scaled[0], 1.0);
        // The lowest frequency has a wavelength far above 32: divided by the factor.
        let last = 1.0 / 500000f64.powf(14.0 / 16.0);
        assert!((scaled[7] - last / 8.0).abs() < 1e-15);
    }
}
