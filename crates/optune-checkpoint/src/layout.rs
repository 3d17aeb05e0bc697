//! How a checkpoint stores the weights against how the model holds them, where the two differ.
//!
//! * **Fused projections (Phi-3).** Its checkpoints store each layer's query, key and value
//!   projections as one `self_attn.qkv_proj` weight (the query rows, then the key rows, then
//!   the value rows) and the MLP's gate and up projections as one `mlp.gate_up_proj` (gate rows
//!   first). The model holds the separate weights under Llama's names.
//! * **Partial rotary embeddings (Phi-4-mini's `partial_rotary_factor`).** transformers rotates
//!   the first `r` of each head's `d` query and key channels (channel `i` against `i + r/2`)
//!   and passes the others through. The model holds each head's query and key rows reordered
//!   ([`head_order`]) so that every rotated pair lies half a head apart, as in a rotation of the
//!   whole head, and the passed-through channels fill the pairs whose frequency is 0 (an
//!   identity rotation): the scores `q·k` are those of the stored order, since queries and
//!   keys are reordered alike, and every kernel rotates whole heads.
//!
//! A read goes to the model's layout ([`Layout::to_model`], [`Layout::stored_part`] for one
//! weight), a save back to the checkpoint's ([`Layout::to_checkpoint`]), so a saved checkpoint
//! loads in transformers as the one read.

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

/// The order in which the model holds each query and key head's channels, `order[held] =
/// stored`, when the rotation covers only the first `r` of the head's `d` channels: the
/// first of each rotated pair, half the passed-through channels, the second of each rotated
/// pair, the other half. `None` when it covers whole heads.
pub fn head_order(config: &ModelConfig) -> Option<Vec<usize>> {
    let (d, r) = (config.head_dim(), config.rotary_dim());
    if r == d {
        return None;
    }
    let pass_half = (d - r) / 2;
    let mut order = Vec::with_capacity(d);
    order.extend(0..r / 2);
    order.extend(r..r + pass_half);
    order.extend(r / 2..r);
    order.extend(r + pass_half..d);
    Some(order)
}

/// The stored weights of a model of `config` and how the model holds them.
pub struct Layout {
    fused: Vec<Fused>,
    /// Weights (and biases) whose rows the model holds reordered: `rows[held] = stored`.
    reordered: HashMap<String, Vec<u32>>,
}

impl Layout {
    pub fn of(config: &ModelConfig) -> Self {
        let mut reordered = HashMap::new();
        if let Some(order) = head_order(config) {
            let d = order.len();
            for l in 0..config.num_hidden_layers {
                for (proj, heads) in [
                    ("q_proj", config.num_attention_heads),
                    ("k_proj", config.num_kv_heads()),
                ] {
                    let rows: Vec<u32> = (0..heads)
                        .flat_map(|h| order.iter().map(move |&o| (h * d + o) as u32))
                        .collect();
                    for kind in ["weight", "bias"] {
                        let name = format!("model.layers.{l}.self_attn.{proj}.{kind}");
                        reordered.insert(name, rows.clone());
                    }
                }
            }
        }
        Self {
            fused: fused_weights(config),
            reordered,
        }
    }

    /// The layout of weights stored as the model holds them.
    pub fn none() -> Self {
        Self {
            fused: Vec::new(),
            reordered: HashMap::new(),
        }
    }

    /// The fused weights (Phi-3's), none for the other families.
    pub fn fused(&self) -> &[Fused] {
        &self.fused
    }

    /// `tensors` as read from the checkpoint, in the model's layout: each fused weight replaced
    /// by its parts, each a copy of its rows (so the stored weight's memory goes with it), and
    /// reordered rows reordered.
    pub fn to_model(&self, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
        for fused in &self.fused {
            let Some(stored) = tensors.remove(&fused.name) else {
                bail!(
                    "missing weight '{}' (this family stores {} in one weight)",
                    fused.name,
                    fused
                        .parts
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            for (part, _) in &fused.parts {
                tensors.insert(part.clone(), fused.part(&stored, part)?);
            }
        }
        for (name, rows) in &self.reordered {
            if let Some(stored) = tensors.remove(name) {
                tensors.insert(name.clone(), rows_to_model(name, rows, &stored)?);
            }
        }
        Ok(())
    }

    /// The model's weight `name` read alone: `read(stored name)` gives a stored weight, of
    /// which the part `name` holds some rows, maybe reordered; `None` when nothing holds it.
    pub fn stored_part(
        &self,
        name: &str,
        read: impl Fn(&str) -> Result<Option<Tensor>>,
    ) -> Result<Option<Tensor>> {
        let owner = (self.fused.iter()).find(|f| f.rows_of(name).is_some());
        let tensor = match owner {
            Some(f) => match read(&f.name)? {
                Some(stored) => f.part(&stored, name)?,
                None => return Ok(None),
            },
            None => match read(name)? {
                Some(tensor) => tensor,
                None => return Ok(None),
            },
        };
        match self.reordered.get(name) {
            Some(rows) => rows_to_model(name, rows, &tensor).map(Some),
            None => Ok(Some(tensor)),
        }
    }

    /// A tensor whose rows follow the model's weight `name` (the weight, or a LoRA adapter's `B`)
    /// with its rows back in the checkpoint's order.
    pub fn rows_to_checkpoint(&self, name: &str, held: &Tensor) -> Result<Tensor> {
        match self.reordered.get(name) {
            Some(rows) => {
                let mut inverse = vec![0u32; rows.len()];
                for (held_row, &stored_row) in rows.iter().enumerate() {
                    inverse[stored_row as usize] = held_row as u32;
                }
                let index = Tensor::from_slice(&inverse, inverse.len(), held.device())?;
                Ok(held.index_select(&index, 0)?)
            }
            None => Ok(held.clone()),
        }
    }

    /// The name tree `shapes` (the model's weights, as `optune_model::llama_weight_shapes`
    /// states them) as the checkpoint stores it: each fused weight in place of its parts.
    pub fn stored_shapes(
        &self,
        mut shapes: Vec<(String, Vec<usize>)>,
    ) -> Vec<(String, Vec<usize>)> {
        for fused in &self.fused {
            let width = shapes
                .iter()
                .find(|(name, _)| *name == fused.parts[0].0)
                .map_or(0, |(_, shape)| shape[1]);
            shapes.retain(|(name, _)| fused.rows_of(name).is_none());
            shapes.push((fused.name.clone(), vec![fused.rows(), width]));
        }
        shapes
    }

    /// `weights` (the model's) as the checkpoint stores them: reordered rows back in the stored
    /// order, the parts of each fused weight stacked into it at the place of its first part,
    /// the others as they are. Each is made only as it is written.
    pub fn to_checkpoint<'a, W: SavedWeight>(
        &'a self,
        weights: &'a [(String, W)],
    ) -> Result<Vec<(String, Stacked<'a, W>)>> {
        let owner: HashMap<&str, &Fused> = (self.fused.iter())
            .flat_map(|f| f.parts.iter().map(move |(part, _)| (part.as_str(), f)))
            .collect();
        let by_name: HashMap<&str, &W> = weights.iter().map(|(n, w)| (n.as_str(), w)).collect();
        let part = |name: &'a str, weight: &'a W| (name, weight);
        let mut saved = Vec::with_capacity(weights.len());
        for (name, weight) in weights {
            let (stored, parts) = match owner.get(name.as_str()) {
                None => (name.clone(), vec![part(name, weight)]),
                Some(f) if f.parts[0].0 == *name => {
                    let parts = (f.parts.iter())
                        .map(|(p, _)| match by_name.get(p.as_str()) {
                            Some(w) => Ok(part(p, w)),
                            None => bail!("saving '{}': the model has no weight '{p}'", f.name),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (f.name.clone(), parts)
                }
                Some(_) => continue,
            };
            let mut shape = parts[0].1.shape().to_vec();
            shape[0] = parts.iter().map(|(_, w)| w.shape()[0]).sum();
            saved.push((
                stored,
                Stacked {
                    layout: self,
                    parts,
                    shape,
                },
            ));
        }
        Ok(saved)
    }
}

/// The stored weight `name`'s rows in the model's order, `rows[held] = stored`.
fn rows_to_model(name: &str, rows: &[u32], stored: &Tensor) -> Result<Tensor> {
    if stored.dim(0)? != rows.len() {
        bail!(
            "weight '{name}' has shape {:?}, expected {} rows",
            stored.dims(),
            rows.len()
        );
    }
    let index = Tensor::from_slice(rows, rows.len(), stored.device())?;
    Ok(stored.index_select(&index, 0)?)
}

/// The fused weights of a model of `config`: Phi-3's two per layer, none for the other families.
fn fused_weights(config: &ModelConfig) -> Vec<Fused> {
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

    /// Part `name` of the stored weight, a copy of its rows (so the stored weight's memory can
    /// go), after checking the stored weight's shape.
    fn part(&self, stored: &Tensor, name: &str) -> Result<Tensor> {
        self.check(stored)?;
        let Some((first, rows)) = self.rows_of(name) else {
            bail!("'{name}' is not a part of '{}'", self.name);
        };
        Ok(stored.narrow(0, first, rows)?.copy()?)
    }

    /// Checks the stored weight's shape: the parts' rows, stacked.
    fn check(&self, stored: &Tensor) -> Result<()> {
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

/// A weight as it is saved: one of the model's, or several stacked into a fused one, with rows
/// the model holds reordered put back in the stored order.
pub struct Stacked<'a, W> {
    layout: &'a Layout,
    parts: Vec<(&'a str, &'a W)>,
    shape: Vec<usize>,
}

impl<W: SavedWeight> SavedWeight for Stacked<'_, W> {
    fn dtype(&self) -> DType {
        self.parts[0].1.dtype()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn tensor(&self) -> Result<Tensor> {
        let stored = |(name, weight): &(&str, &W)| -> Result<Tensor> {
            self.layout.rows_to_checkpoint(name, &weight.tensor()?)
        };
        match &self.parts[..] {
            [one] => stored(one),
            parts => {
                let tensors: Vec<Tensor> = parts.iter().map(stored).collect::<Result<_>>()?;
                Ok(Tensor::cat(&tensors, 0)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Phi-3 with heads of 4 channels (q 8 rows, k and v 4 each; gate and up 6 each), with
    /// `extra` fields.
    fn phi3(extra: serde_json::Value) -> ModelConfig {
        let mut json = serde_json::json!({
            "model_type": "phi3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1
        });
        for (key, value) in extra.as_object().unwrap() {
            json[key] = value.clone();
        }
        ModelConfig::from_json_str(&json.to_string()).unwrap()
    }

    fn ramp(rows: usize, cols: usize, start: f32) -> Tensor {
        let values: Vec<f32> = (0..rows * cols).map(|v| start + v as f32).collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    fn stored_phi3() -> HashMap<String, Tensor> {
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
        stored
    }

    fn first_column(t: &Tensor) -> Vec<f32> {
        t.narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A read and a save give the stored weights back to the bit: fused and reordered ones.
    fn round_trip(config: &ModelConfig) -> HashMap<String, Tensor> {
        let stored = stored_phi3();
        let layout = Layout::of(config);
        let mut held = stored.clone();
        layout.to_model(&mut held).unwrap();
        let mut listed: Vec<(String, Tensor)> = held.clone().into_iter().collect();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        let saved = layout.to_checkpoint(&listed).unwrap();
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
        // One weight read alone is the one the whole read gives.
        let read = |name: &str| Ok(stored.get(name).cloned());
        for name in [
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
        ] {
            let alone = layout.stored_part(name, read).unwrap().unwrap();
            assert_eq!(first_column(&alone), first_column(&held[name]), "{name}");
        }
        held
    }

    #[test]
    fn a_read_and_a_save_give_the_stored_weights_back() {
        let held = round_trip(&phi3(serde_json::json!({})));
        let part = |name: &str| held[&format!("model.layers.1.{name}.weight")].clone();
        assert_eq!(part("self_attn.k_proj").dims(), [4, 8]);
        // The key rows are rows 8..12 of the stored weight, in their order.
        let row_starts: Vec<f32> = (8..12).map(|r| 1.0 + (r * 8) as f32).collect();
        assert_eq!(first_column(&part("self_attn.k_proj")), row_starts);
        assert_eq!(part("mlp.up_proj").dims(), [6, 8]);
        assert!(!held.contains_key("model.layers.0.self_attn.qkv_proj.weight"));
    }

    /// Half of each 4-channel head rotated (channels 0 and 1 a pair, 2 and 3 passed through):
    /// the model holds the channels as 0, 2, 1, 3, so the pair lies half a head apart.
    #[test]
    fn partial_rotation_reorders_each_query_and_key_head() {
        let config = phi3(serde_json::json!({"partial_rotary_factor": 0.5}));
        assert_eq!(head_order(&config), Some(vec![0, 2, 1, 3]));
        let held = round_trip(&config);
        let rows =
            |name: &str| first_column(&held[&format!("model.layers.0.self_attn.{name}.weight")]);
        let stored_row = |r: usize| (r * 8) as f32;
        // Two query heads, rows 0..8 of the stored weight; the keys, rows 8..12; values as stored.
        let q: Vec<f32> = [0, 2, 1, 3, 4, 6, 5, 7].map(stored_row).to_vec();
        assert_eq!(rows("q_proj"), q);
        assert_eq!(rows("k_proj"), [8, 10, 9, 11].map(stored_row).to_vec());
        assert_eq!(rows("v_proj"), [12, 13, 14, 15].map(stored_row).to_vec());
        // Heads of 8 with 6 rotated: pairs (0,3), (1,4), (2,5); 6 and 7 passed through.
        let wide = phi3(serde_json::json!({"hidden_size": 16, "partial_rotary_factor": 0.75}));
        assert_eq!(head_order(&wide), Some(vec![0, 1, 2, 6, 3, 4, 5, 7]));
        assert_eq!(head_order(&phi3(serde_json::json!({}))), None);
    }

    #[test]
    fn a_missing_or_misshapen_fused_weight_is_named() {
        let layout = Layout::of(&phi3(serde_json::json!({})));
        let mut tensors = HashMap::new();
        let err = layout.to_model(&mut tensors).unwrap_err().to_string();
        assert!(
            err.contains("missing weight 'model.layers.0.self_attn.qkv_proj.weight'"),
            "{err}"
        );
        tensors.insert(
            "model.layers.0.self_attn.qkv_proj.weight".into(),
            ramp(15, 8, 0.0),
        );
        let err = layout.to_model(&mut tensors).unwrap_err().to_string();
        assert!(err.contains("expected 16 rows"), "{err}");
        // Other families store none fused.
        let mut llama = phi3(serde_json::json!({}));
        llama.model_type = "llama".into();
        assert!(Layout::of(&llama).fused().is_empty());
    }
}
