//! A checkpoint's weights into a [`Transformer`], and a model's weights back into a checkpoint.

use crate::linear::ModelWeight;
use crate::transformer::Transformer;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use optune_checkpoint::{write_checkpoint, ChatTokenizer, Checkpoint, CheckpointMeta, SavedWeight};
use std::path::Path;

/// Loads a model (a Hugging Face directory or a `.gguf` file) in `dtype` on `device`.
pub fn load_model(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Transformer, ChatTokenizer, CheckpointMeta)> {
    let checkpoint = Checkpoint::read_as(path, device, dtype)?;
    let model =
        Transformer::from_weights(&checkpoint.meta.config, checkpoint.tensors, dtype, device)
            .with_context(|| {
                format!(
                    "building the model from {}",
                    checkpoint.meta.source.display()
                )
            })?;
    Ok((model, checkpoint.tokenizer, checkpoint.meta))
}

/// Writes `model` (LoRA adapters merged in) as a Hugging Face checkpoint directory, atomically;
/// see [`write_checkpoint`].
pub fn save_checkpoint(model: &Transformer, meta: &CheckpointMeta, dir: &Path) -> Result<()> {
    save_checkpoint_with(model, &|_| Ok(None), meta, dir, |_| Ok(()))
}

/// [`save_checkpoint`], with the weight `base_of(name)` returns (a Hugging Face name) in place of
/// the model's own — under a LoRA adapter, as the base it is merged into — and letting `extra`
/// add files (metrics, adapters) to the directory before it is moved into place. The weights are
/// saved in the checkpoint's own dtype (`torch_dtype` of its `config.json`; the model's when it
/// names none), whatever the model computed in. Each is looked up, made, merged and cast only as
/// it is written: a bf16 model saved as f32 never holds an f32 copy of all its weights, nor a
/// LoRA model a merged copy of its projections.
pub fn save_checkpoint_with(
    model: &Transformer,
    base_of: &dyn Fn(&str) -> Result<Option<Tensor>>,
    meta: &CheckpointMeta,
    dir: &Path,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let dtype = saved_dtype(meta).unwrap_or(model.dtype());
    let weights: Vec<(String, Rebased)> = model
        .saved_weights()
        .into_iter()
        .map(|(name, weight)| {
            let rebased = Rebased {
                name: name.clone(),
                weight,
                base_of,
            };
            (name, rebased)
        })
        .collect();
    write_checkpoint(&weights, Some(dtype), meta, dir, extra)
}

/// A model weight over the base `base_of` gives for its name, looked up when it is written.
struct Rebased<'a> {
    name: String,
    weight: ModelWeight,
    base_of: &'a dyn Fn(&str) -> Result<Option<Tensor>>,
}

impl SavedWeight for Rebased<'_> {
    fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    fn shape(&self) -> &[usize] {
        self.weight.shape()
    }

    fn tensor(&self) -> Result<Tensor> {
        let base = (self.base_of)(&self.name).with_context(|| format!("saving {}", self.name))?;
        match base {
            Some(base) => self
                .weight
                .clone()
                .with_base(base)
                .with_context(|| format!("saving {}", self.name))?
                .tensor(),
            None => self.weight.tensor(),
        }
    }
}

/// The dtype `config.json` declares (`torch_dtype`, or transformers 5's `dtype`).
pub fn saved_dtype(meta: &CheckpointMeta) -> Option<DType> {
    let name = ["torch_dtype", "dtype"]
        .iter()
        .find_map(|key| meta.config_json.get(*key)?.as_str())?;
    match name {
        "float32" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        _ => None,
    }
}
