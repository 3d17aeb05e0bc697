//! Rotary position embeddings in the Hugging Face layout (rotate-half, not interleaved pairs).

use crate::config::{ModelConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};
use optune_kernels::host::rotary_tables;

/// Cosine and sine tables for every position up to the model's context length, shaped
/// `[positions, head_dim / 2]`: one angle per pair of rotated channels (transformers keeps the
/// two halves duplicated, `[positions, head_dim]`; the kernels read each half's angle from
/// the one table).
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
    /// What they were made from, for the host decode path's tables of a step's positions.
    frequencies: RotaryFrequencies,
    /// The channel pairs the rotation turns (the rest hold a partial rotation's passed-through
    /// channels).
    rotated: usize,
}

/// The rotation a config asks for: one inverse frequency per pair of rotated channels, and the
/// scale of the cosine and sine tables (YaRN's attention factor, which scales every query-key
/// product by its square; 1 for the other forms).
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryFrequencies {
    pub inverse: Vec<f64>,
    pub attention_factor: f64,
}

impl RotaryFrequencies {
    /// The cosine and sine tables `[positions, head_dim / 2]` of `positions`, in f32 as
    /// transformers computes them, scaled by the attention factor; the pairs that hold
    /// passed-through channels (a partial rotation: the pairs from `rotated` on) are neither
    /// turned nor scaled, as transformers leaves those channels.
    fn tables(&self, positions: &[usize], rotated: usize) -> (Vec<f32>, Vec<f32>) {
        let inv_freq: Vec<f32> = self.inverse.iter().map(|f| *f as f32).collect();
        let (mut cos, mut sin) = rotary_tables(positions, &inv_freq, self.attention_factor as f32);
        let half = inv_freq.len();
        if rotated < half {
            for (cos, sin) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)) {
                cos[rotated..].fill(1.0);
                sin[rotated..].fill(0.0);
            }
        }
        (cos, sin)
    }
}

/// Inverse frequencies `1 / θ^(2i/d)`, rescaled as the config's `rope_scaling` says, following
/// transformers' `modeling_rope_utils` form by form (`testdata/reference/rope_scaling.json`).
///
/// Under a `partial_rotary_factor` the frequencies are those of the rotated channels, and the
/// pairs the model holds passed-through channels in (`optune_checkpoint::layout`) get 0: an
/// identity rotation.
pub fn rotary_frequencies(config: &ModelConfig) -> RotaryFrequencies {
    let mut frequencies = rotated_frequencies(config);
    frequencies.inverse.resize(config.head_dim() / 2, 0.0);
    frequencies
}

/// [`rotary_frequencies`] of the rotated channels alone.
fn rotated_frequencies(config: &ModelConfig) -> RotaryFrequencies {
    let dim = config.rotary_dim();
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    let plain = |inverse| RotaryFrequencies {
        inverse,
        attention_factor: 1.0,
    };
    let Some(scaling) = config.rope_scaling.as_ref() else {
        return plain(base);
    };
    let factor = scaling.factor.unwrap_or(1.0);
    match config.rope_type() {
        "linear" => plain(base.into_iter().map(|f| f / factor).collect()),
        "llama3" => plain(llama3(&base, scaling)),
        "yarn" => yarn(&base, config, scaling),
        "longrope" => longrope(&base, config, scaling),
        // `dynamic` (NTK) raises θ only for sequences past max_position_embeddings, which
        // `ModelConfig::max_positions` does not allow.
        _ => plain(base),
    }
}

/// Llama 3's smooth rescaling: high frequencies kept, low ones divided by the factor, a blend
/// between.
fn llama3(base: &[f64], scaling: &RopeScaling) -> Vec<f64> {
    let factor = scaling.factor.unwrap_or(8.0);
    let low = scaling.low_freq_factor.unwrap_or(1.0);
    let high = scaling.high_freq_factor.unwrap_or(4.0);
    let original = scaling.original_max_position_embeddings.unwrap_or(8192) as f64;
    let low_freq_wavelen = original / low;
    let high_freq_wavelen = original / high;
    base.iter()
        .map(|&freq| {
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

/// YaRN (Peng et al. 2023): channels that turn more than `beta_fast` times over the original
/// context keep their frequency, those that turn fewer than `beta_slow` times are divided by the
/// factor, a linear ramp over the channels between; the tables are scaled by the attention
/// factor, `0.1 ln(factor) + 1` unless the config gives it.
fn yarn(base: &[f64], config: &ModelConfig, scaling: &RopeScaling) -> RotaryFrequencies {
    let dim = config.rotary_dim() as f64;
    let theta = config.rope_theta;
    let factor = scaling.factor.unwrap_or(1.0);
    let original = config.scaled_context() as f64;
    let mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let attention_factor = scaling.attention_factor.unwrap_or_else(|| {
        match (scaling.mscale, scaling.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                mscale(factor, m) / mscale(factor, all)
            }
            _ => mscale(factor, 1.0),
        }
    });
    // transformers reads 0 as absent here (`or`), so do we.
    let beta_fast = scaling.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0);
    let beta_slow = scaling.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0);
    // The channel whose pair turns `rotations` times over the original context.
    let channel = |rotations: f64| {
        dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (channel(beta_fast), channel(beta_slow));
    if scaling.truncate.unwrap_or(true) {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001;
    }
    let inverse = base
        .iter()
        .enumerate()
        .map(|(i, &freq)| {
            let interpolated = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            freq / factor * interpolated + freq * (1.0 - interpolated)
        })
        .collect();
    RotaryFrequencies {
        inverse,
        attention_factor,
    }
}

/// LongRoPE (Phi-3.5): each frequency divided by its channel pair's short factor (the long
/// ones apply past the original context, which [`ModelConfig::max_positions`] does not pass),
/// the tables scaled by `√(1 + ln s / ln original)` for the stretch `s` of the context, unless
/// the config gives the factor.
fn longrope(base: &[f64], config: &ModelConfig, scaling: &RopeScaling) -> RotaryFrequencies {
    let short = scaling.short_factor.as_deref().unwrap_or_default();
    let inverse = base.iter().zip(short).map(|(f, s)| f / s).collect();
    let original = config.original_context() as f64;
    // transformers measures the stretch by the two contexts when the config states the original
    // one (Phi-3's always does), else by `factor`.
    let stretch = match config.stated_original_context() {
        Some(_) => config.max_position_embeddings as f64 / original,
        None => scaling.factor.unwrap_or(1.0),
    };
    let attention_factor = scaling.attention_factor.unwrap_or(if stretch <= 1.0 {
        1.0
    } else {
        (1.0 + stretch.ln() / original.ln()).sqrt()
    });
    RotaryFrequencies {
        inverse,
        attention_factor,
    }
}

impl RotaryTables {
    pub fn new(config: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::of(rotary_frequencies(config), config, dtype, device)
    }

    /// The plain rotation of [`ModelConfig::local_rope_theta`], the config's `rope_scaling` left
    /// out, over as many positions as [`RotaryTables::new`]'s: the sliding layers of OLMo 3 and
    /// Gemma 3 turn by it.
    pub fn local(config: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let plain = ModelConfig {
            rope_scaling: None,
            rope_theta: config.local_rope_theta(),
            ..config.clone()
        };
        Self::of(rotary_frequencies(&plain), config, dtype, device)
    }

    /// Tables of `frequencies` for every position `config` allows.
    fn of(
        frequencies: RotaryFrequencies,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rotated = config.rotary_dim() / 2;
        let half = frequencies.inverse.len();
        let positions = config.max_positions().max(1);
        let all: Vec<usize> = (0..positions).collect();
        let (cos, sin) = frequencies.tables(&all, rotated);
        let shape = (positions, half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
            frequencies,
            rotated,
        })
    }

    /// The f32 cosine and sine tables `[positions, head_dim / 2]` of `positions` on the host,
    /// the same numbers as the table's rows: the host decode path's, a step at a time.
    pub fn host_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        self.frequencies.tables(positions, self.rotated)
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
        let scaled = rotary_frequencies(&config).inverse;
        // Frequency 0 is 1.0: wavelength 2π < 32/4, so it is kept.
        assert_eq!(scaled[0], 1.0);
        // The lowest frequency has a wavelength far above 32: divided by the factor.
        let last = 1.0 / 500000f64.powf(14.0 / 16.0);
        assert!((scaled[7] - last / 8.0).abs() < 1e-15);
    }
}
