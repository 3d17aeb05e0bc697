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
    let checkpoint = Checkpoint::read(path, device)?;
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
/// is moved into place.
pub fn save_checkpoint_with(
    model: &Transformer,
    meta: &CheckpointMeta,
    dir: &Path,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    write_checkpoint(&model.named_weights()?, meta, dir, extra)
}
