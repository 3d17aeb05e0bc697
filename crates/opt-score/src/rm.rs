//! `--rm`: a Hugging Face sequence-classification reward model.
//!
//! Each (prompt, response) is rendered as a conversation with the RM's own chat template
//! (`messages + [assistant: response]`, no generation prompt, as transformers'
//! `apply_chat_template(..., tokenize=False)`), re-tokenised from that text without added
//! special tokens, and scored at its last token. Sequences run longest first in batches of equal
//! length: with padding, a sequence's score would change in its last bits with the length of the
//! longest sequence beside it (the attention's reductions run over the padded length), so a
//! `--shard` of the rows would not score them as the whole run does. The scores go back to the
//! rows' order.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use optune_model::{
    load_model, sequence_scores, ChatMessage, ChatTokenizer, OutputHead, Transformer,
};
use optune_shard::PromptText;
use std::cmp::Reverse;
use std::path::Path;

pub struct RewardModel {
    model: Transformer,
    tokenizer: ChatTokenizer,
    pad_id: u32,
}

impl RewardModel {
    /// Loads `dir` and checks that it is a single-score classifier with a chat template.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (model, tokenizer, meta) = load_model(dir, dtype, device)?;
        let OutputHead::Score { weight } = model.head() else {
            bail!(
                "{}: not a reward model: config.json lists no *ForSequenceClassification architecture",
                dir.display()
            );
        };
        let labels = weight.dim(0)?;
        if labels != 1 {
            bail!(
                "{}: the score head has {labels} labels; opt-score needs a reward model with num_labels 1",
                dir.display()
            );
        }
        if !tokenizer.has_chat_template() {
            bail!(
                "{}: the reward model's tokenizer has no chat_template, so opt-score cannot render \
                 (prompt, response) the way the model was trained to read them",
                dir.display()
            );
        }
        // Padding is masked out and the score is read at each sequence's own last token, so the
        // pad id only has to be a valid token.
        let pad_id = meta
            .config
            .pad_token_id()
            .or_else(|| tokenizer.pad_token_id())
            .or_else(|| meta.eos_token_ids.first().copied())
            .unwrap_or(0);
        Ok(Self {
            model,
            tokenizer,
            pad_id,
        })
    }

    /// The longest sequence the model has positions for.
    pub fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    /// Token ids of the conversation `prompt` + the assistant's `response`. Raw-text prompts
    /// become one user message.
    pub fn tokenize(&self, prompt: &PromptText, response: &str) -> Result<Vec<u32>> {
        let mut conversation: Vec<ChatMessage> = match prompt {
            PromptText::Text(text) => vec![ChatMessage::new("user", text.clone())],
            PromptText::Messages(messages) => messages
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect(),
        };
        conversation.push(ChatMessage::new("assistant", response));
        let text = self.tokenizer.apply_chat_template(&conversation, false)?;
        self.tokenizer.encode(&text)
    }

    /// Scores `sequences`, `batch_size` at a time grouped by length, calling `on_batch` with the
    /// indices and scores of each batch as it finishes. Returns the scores in `sequences'` order.
    pub fn score(
        &self,
        sequences: &[Vec<u32>],
        batch_size: usize,
        mut on_batch: impl FnMut(&[usize], &[f32]) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let mut scores = vec![0f32; sequences.len()];
        for batch in length_buckets(sequences, batch_size) {
            let tokens: Vec<Vec<u32>> = batch.iter().map(|&i| sequences[i].clone()).collect();
            let batch_scores: Vec<f32> = sequence_scores(&self.model, &tokens, self.pad_id)
                .and_then(|t| Ok(t.to_vec1()?))
                .with_context(|| {
                    format!("running the reward model on {} sequences", batch.len())
                })?;
            for (&index, &score) in batch.iter().zip(&batch_scores) {
                scores[index] = score;
            }
            on_batch(&batch, &batch_scores)?;
        }
        Ok(scores)
    }
}

/// Indices of `sequences` in batches of at most `batch_size` sequences of one length, longest
/// first (ties in input order), so no batch needs padding.
fn length_buckets(sequences: &[Vec<u32>], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| Reverse(sequences[i].len()));
    order
        .chunk_by(|&a, &b| sequences[a].len() == sequences[b].len())
        .flat_map(|same_length| same_length.chunks(batch_size.max(1)))
        .map(<[usize]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_one_length_and_cover_every_index_once() {
        let sequences: Vec<Vec<u32>> = [3, 9, 1, 9, 5, 9, 3].iter().map(|&n| vec![0; n]).collect();
        assert_eq!(
            length_buckets(&sequences, 2),
            [vec![1, 3], vec![5], vec![4], vec![0, 6], vec![2]]
        );
        assert_eq!(
            length_buckets(&sequences, 10),
            [vec![1, 3, 5], vec![4], vec![0, 6], vec![2]]
        );
        assert!(length_buckets(&[], 4).is_empty());
    }
}
