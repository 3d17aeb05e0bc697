//! What the tools that run a model (opt-gen, opt-score, opt-wdpo) share on top of the shard
//! command line of `optune_shard::cli`: the runtime flags and the numeric set-up they drive, the
//! chat template's variables, and a shard's prompt as the tokenizer's prompt.

mod args;
pub mod runtime;
mod template;

pub use args::RuntimeArgs;
pub use template::ChatTemplateArgs;

use optune_checkpoint::{ChatMessage, Prompt};
use optune_shard::PromptText;

/// A shard's prompt (raw text or a message list) as the chat tokenizer takes it.
pub fn model_prompt(text: &PromptText) -> Prompt {
    match text {
        PromptText::Text(t) => Prompt::Text(t.clone()),
        PromptText::Messages(ms) => Prompt::Messages(
            ms.iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect(),
        ),
    }
}
