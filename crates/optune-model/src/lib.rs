//! The model core of optune: a trainable Llama/Mistral/Qwen2/Qwen3 transformer on candle, its KV
//! cache and generation, sequence log-probabilities and LoRA. Checkpoint files, tokenizers and chat
//! templates come from `optune-checkpoint` (re-exported here), the ops from `optune-kernels`.

pub mod generate;
pub mod linear;
mod load;
pub mod logprobs;
pub mod lora;
pub mod rope;
mod sampling;
mod stop;
pub mod transformer;

pub use load::{load_model, save_checkpoint, save_checkpoint_with, saved_dtype};
pub use logprobs::{
    packed_sequence_scores, sequence_logprobs, sequence_logprobs_recomputed, sequence_scores,
    SequenceLogprobs, TokenizedPair,
};
pub use optune_checkpoint::{
    config, gguf, pytorch, tokenizer, ChatMessage, ChatTokenizer, Checkpoint, CheckpointMeta,
    Family, ModelConfig, NormPlacement, Prompt, SavedWeight, StoredWeights,
};
pub use transformer::{
    llama_weight_shapes, recomputed_backward, weight_count, KvCache, OutputHead, PaddedBatch,
    RecomputedPass, Transformer,
};
