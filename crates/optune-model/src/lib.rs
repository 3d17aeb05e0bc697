//! The model core of optune: a trainable Llama/Mistral/Qwen2 transformer on candle, its
//! checkpoints (Hugging Face directories and GGUF files), tokenizer and chat templates, and
//! sequence log-probabilities.

pub mod checkpoint;
pub mod cli;
pub mod config;
mod decode;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod linear;
pub mod logprobs;
pub mod lora;
pub mod rope;
pub mod runtime;
pub mod tokenizer;
pub mod transformer;

pub use checkpoint::{
    load_model, save_checkpoint, save_checkpoint_with, Checkpoint, CheckpointMeta,
};
pub use config::{Family, ModelConfig};
pub use logprobs::{sequence_logprobs, sequence_scores, SequenceLogprobs, TokenizedPair};
pub use tokenizer::{ChatMessage, ChatTokenizer, Prompt};
pub use transformer::{KvCache, OutputHead, PaddedBatch, Transformer};
