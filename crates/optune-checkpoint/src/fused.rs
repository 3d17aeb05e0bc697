//! Phi-3's fused projections. Its checkpoints store each layer's query, key and value
//! projections as one `self_attn.qkv_proj` weight (the query rows, then the key rows, then the
//! value rows) and the MLP's gate and up projections as one `mlp.gate_up_proj` (gate rows
//! first). The model works on the separate weights under Llama's names: a read splits the fused
//! ones ([`split_fused`], [`StoredWeights`](crate::StoredWeights)), a save stacks them back
//! ([`stack_fused`]), so a saved checkpoint loads in transformers as the one read.

use crate::config::{Family, ModelConfig};
use crate::safetensors_file::SavedWeight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// One stored weight that holds several of the model's: its name, and each part's name and rows,
/// in the order they are stacked.
pub struct Fused {
    pub name: String,
    pub parts: Vec<(String, usize)>,
}

/// The fused weights of a model of `config`: Phi-3's two per layer, none for the other families.
pub fn fused_weights(config: &ModelConfig) -> Vec<Fused> {
    if !matches!(config.family(), Ok(Family::Phi3)) {
        return Vec::new();
    }
    let d = config.head_dim();
    let (q, kv) = (config.num_attention_heads * d, config.num_kv_heads() * d);
    let i = config.intermediate_size;
    (0..config.num_hidden_layers)
        .flat_map(|l| {
            let p = format!("model.layers.{l}");
            let named = |parts: &[(&str, usize)]| -> Vec<(String, usize)> {
                (parts.iter())
                    .map(|(part, rows)| (format!("{p}.{part}.weight"), *rows))
                    .collect()
            };
            [
                Fused {
                    name: format!("{p}.self_attn.qkv_proj.weight"),
                    parts: named(&[
                        ("self_attn.q_proj", q),
                        ("self_attn.k_proj", kv),
                        ("self_attn.v_proj", kv),
                    ]),
                },
                Fused {
                    name: format!("{p}.mlp.gate_up_proj.weight"),
                    parts: named(&[("mlp.gate_proj", i), ("mlp.up_proj", i)]),
                },
            ]
        })
        .collect()
}

impl Fused {
    fn rows(&self) -> usize {
        self.parts.iter().map(|(_, rows)| rows).sum()
    }

    /// The rows of the stored weight that hold part `name`, `(first, count)`.
    pub fn rows_of(&self, name: &str) -> Option<(usize, usize)> {
        let mut first = 0;
        for (part, rows) in &self.parts {
            if part == name {
                return Some((first, *rows));
            }
            first += rows;
        }
        None
    }

    /// Checks the stored weight's shape: the parts' rows, stacked.
    pub fn check(&self, stored: &Tensor) -> Result<()> {
        if stored.rank() != 2 || stored.dim(0)? != self.rows() {
            bail!(
                "weight '{}' has shape {:?}, expected {} rows (its parts' {:?})",
                self.name,
                stored.dims(),
                self.rows(),
                self.parts.iter().map(|(_, rows)| rows).collect::<Vec<_>>()
            );
        }
        Ok(())
    }
}

/// Replaces each fused weight of `config` in `tensors` by its parts, each a copy of its rows
/// (so the stored weight's memory goes with it).
pub fn split_fused(config: &ModelConfig, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    for fused in fused_weights(config) {
        let Some(stored) = tensors.remove(&fused.name) else {
            bail!(
                "missing weight '{}' ({} stores {} in one weight)",
                fused.name,
                config.model_type,
                fused
                    .parts
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        fused.check(&stored)?;
        for (part, _) in &fused.parts {
            let (first, rows) = fused.rows_of(part).expect("a part of its own");
            tensors.insert(part.clone(), stored.narrow(0, first, rows)?.copy()?);
        }
    }
    Ok(())
}

/// The name tree `shapes` (the model's weights, as `optune_model::llama_weight_shapes` states
/// them) as the checkpoint stores it: each fused weight in place of its parts.
pub fn stored_shapes(
    config: &ModelConfig,
    mut shapes: Vec<(String, Vec<usize>)>,
) -> Vec<(String, Vec<usize>)> {
    for fused in fused_weights(config) {
        let width = shapes
            .iter()
            .find(|(name, _)| *name == fused.parts[0].0)
            .map_or(0, |(_, shape)| shape[1]);
        shapes.retain(|(name, _)| fused.rows_of(name).is_none());
        shapes.push((fused.name.clone(), vec![fused.rows(), width]));
    }
    shapes
}

/// A weight as it is saved: one of the model's, or several stacked into a fused one.
pub struct Stacked<'w, W> {
    parts: Vec<&'w W>,
    shape: Vec<usize>,
}

impl<W: SavedWeight> SavedWeight for Stacked<'_, W> {
    fn dtype(&self) -> DType {
        self.parts[0].dtype()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn tensor(&self) -> Result<Tensor> {
        match &self.parts[..] {
            [one] => one.tensor(),
            parts => {
                let tensors: Vec<Tensor> =
                    parts.iter().map(|p| p.tensor()).collect::<Result<_>>()?;
                Ok(Tensor::cat(&tensors, 0)?)
            }
        }
    }
}

/// `weights` under the checkpoint's names: the parts of each fused weight of `config` stacked
/// into it, at the place of its first part; the others as they are.
pub fn stack_fused<'w, W: SavedWeight>(
    config: &ModelConfig,
    weights: &'w [(String, W)],
) -> Result<Vec<(String, Stacked<'w, W>)>> {
    let fused = fused_weights(config);
    let owner: HashMap<&str, &Fused> = (fused.iter())
        .flat_map(|f| f.parts.iter().map(move |(part, _)| (part.as_str(), f)))
        .collect();
    let by_name: HashMap<&str, &W> = weights.iter().map(|(n, w)| (n.as_str(), w)).collect();
    let mut saved = Vec::with_capacity(weights.len());
    for (name, weight) in weights {
        let Some(f) = owner.get(name.as_str()) else {
            let shape = weight.shape().to_vec();
            saved.push((
                name.clone(),
                Stacked {
                    parts: vec![weight],
                    shape,
                },
            ));
            continue;
        };
        if f.parts[0].0 != *name {
            continue;
        }
        let parts: Vec<&W> = (f.parts.iter())
            .map(|(part, _)| {
                by_name.get(part.as_str()).copied().ok_or_else(|| {
                    anyhow::anyhow!("saving '{}': the model has no weight '{part}'", f.name)
                })
            })
            .collect::<Result<_>>()?;
        let mut shape = parts[0].shape().to_vec();
        shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
        saved.push((f.name.clone(), Stacked { parts, shape }));
    }
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn phi3() -> ModelConfig {
        ModelConfig::from_json_str(
            &serde_json::json!({
                "model_type": "phi3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1
            })
            .to_string(),
        )
        .unwrap()
    }

    fn ramp(rows: usize, cols: usize, start: f32) -> Tensor {
        let values: Vec<f32> = (0..rows * cols).map(|v| start + v as f32).collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_split_and_a_stack_give_the_stored_weights_back() {
        let config = phi3();
        // q 8 rows, k and v 4 each; gate and up 6 each.
        let mut stored = HashMap::new();
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            stored.insert(
                format!("{p}.self_attn.qkv_proj.weight"),
                ramp(16, 8, l as f32),
            );
            stored.insert(format!("{p}.mlp.gate_up_proj.weight"), ramp(12, 8, 100.0));
            stored.insert(format!("{p}.self_attn.o_proj.weight"), ramp(8, 8, 0.0));
        }
        let mut tensors = stored.clone();
        split_fused(&config, &mut tensors).unwrap();
        let part = |name: &str| tensors[&format!("model.layers.1.{name}.weight")].clone();
        assert_eq!(part("self_attn.k_proj").dims(), [4, 8]);
        // The key rows are rows 8..12 of the stored weight.
        let key: Vec<f32> = part("self_attn.k_proj")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(key[0], 1.0 + 8.0 * 8.0);
        assert_eq!(part("mlp.up_proj").dims(), [6, 8]);
        assert!(!tensors.contains_key("model.layers.0.self_attn.qkv_proj.weight"));

        let mut listed: Vec<(String, Tensor)> = tensors.into_iter().collect();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        let saved = stack_fused(&config, &listed).unwrap();
        assert_eq!(saved.len(), stored.len());
        for (name, weight) in &saved {
            let want: Vec<f32> = stored[name].flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = weight
                .tensor()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{name}");
            assert_eq!(weight.shape(), stored[name].dims(), "{name}");
        }
    }

    #[test]
    fn a_missing_or_misshapen_fused_weight_is_named() {
        let config = phi3();
        let mut tensors = HashMap::new();
        let err = split_fused(&config, &mut tensors).unwrap_err().to_string();
        assert!(
            err.contains("missing weight 'model.layers.0.self_attn.qkv_proj.weight'"),
            "{err}"
        );
        tensors.insert(
            "model.layers.0.self_attn.qkv_proj.weight".into(),
            ramp(15, 8, 0.0),
        );
        let err = split_fused(&config, &mut tensors).unwrap_err().to_string();
        assert!(err.contains("expected 16 rows"), "{err}");
        // Other families store none.
        let mut llama = phi3();
        llama.model_type = "llama".into();
        assert!(fused_weights(&llama).is_empty());
    }
}
