//! Model files in and out: Hugging Face checkpoint directories (weights by name, `config.json`,
//! the carried tokenizer and generation files), llama-family GGUF files converted on the fly,
//! and the tokenizer with its chat template.

pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod layout;
pub mod pytorch;
mod safetensors_file;
pub mod tokenizer;

pub use checkpoint::{write_checkpoint, Checkpoint, CheckpointMeta, StoredWeights};
pub use config::{Activation, Family, LayerRotation, ModelConfig, NormPlacement, QkNorm};
pub use safetensors_file::{write_safetensors, write_safetensors_as, SavedWeight};
pub use tokenizer::{ChatMessage, ChatTokenizer, Prompt};
