//! Reward sources for `opt-score` that need no model weights.
//!
//! - [`SentimentLexicon`]: a VADER-style rule-based sentiment score in [-1, 1].
//! - [`RewardCommand`]: an external program that answers one JSON reward line
//!   per JSON request line.

pub mod command;
pub mod lexicon;

pub use command::{RewardCommand, RewardRequest};
pub use lexicon::SentimentLexicon;

/// `text` cut to at most `max_chars` characters, with "…" when cut.
fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}
