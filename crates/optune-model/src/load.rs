//! A checkpoint's weights into a [`Transformer`], and a model's weights back into a checkpoint.

use crate::transformer::Transformer;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use optune_checkpoint::{write_checkpoint, ChatTokenizer, Checkpoint, CheckpointMeta};
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
    save_checkpoint_with(model, meta, dir, |_| Ok(()))
}

/// [`save_checkpoint`], letting `extra` add files (metrics, adapters) to the directory before it
/// is moved into place. The weights are saved in the checkpoint's own dtype (`torch_dtype` of
/// its `config.json`; the model's when it names none), whatever the model computed in: a bf16
/// model trained with f32 master weights saves bf16, an f32 one stays f32.
pub fn save_checkpoint_with(
    model: &Transformer,
    meta: &CheckpointMeta,
    dir: &Path,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let dtype = saved_dtype(meta).unwrap_or(model.dtype());
    // Cast a tensor at a time as it is written: a bf16 model saved as f32 never holds an f32
    // copy of all its weights.
    write_checkpoint(&model.named_weights()?, Some(dtype), meta, dir, extra)
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
