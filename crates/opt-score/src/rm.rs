//! `--rm`: a Hugging Face sequence-classification reward model.
//!
//! Each (prompt, response) is rendered as a conversation with the RM's own chat template
//! (`messages + [assistant: response]`, no generation prompt, as transformers'
//! `apply_chat_template(..., tokenize=False)`), re-tokenised from that text without added
//! special tokens, and scored at its last token. Sequences run longest first, several to a
//! forward pass ([`Batching`]), and the scores go back to the rows' order. On a GPU (and with the
//! CPU's generic kernels) a pass is packed: each sequence in a KV-cache slot of its own, no padding.
//! On the CPU's fused kernels a pass is a batch of sequences of one length through the training
//! forward: with padding, a sequence's score would change in its last bits with the length of
//! the longest sequence beside it (the attention's reductions run over the padded length), so a
//! `--shard` of the rows would not score them as the whole run does.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use optune_model::{
    load_model, packed_sequence_scores, sequence_scores, ChatMessage, ChatTokenizer, KvCache,
    OutputHead, Transformer,
};
use optune_shard::PromptText;
use std::cmp::Reverse;
use std::path::Path;

pub struct RewardModel {
    model: Transformer,
    tokenizer: ChatTokenizer,
    pad_id: u32,
    /// Whether passes run packed through a KV cache ([`packed_sequence_scores`]) rather than as
    /// batches of one length through the training forward ([`sequence_scores`]).
    packed: bool,
}

impl RewardModel {
    /// Loads `dir` and checks that it is a single-score classifier with a chat template, which
    /// renders with `template`'s variables.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        template: &optune_cli::ChatTemplateArgs,
    ) -> Result<Self> {
        let (mut model, mut tokenizer, meta) = load_model(dir, dtype, device)?;
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
        template.apply_to(&mut tokenizer)?;
        // Padding is masked out and the score is read at each sequence's own last token, so the
        // pad id only has to be a valid token.
        let pad_id = meta
            .config
            .pad_token_id()
            .or_else(|| tokenizer.pad_token_id())
            .or_else(|| meta.eos_token_ids.first().copied())
            .unwrap_or(0);
        // The CPU's fused ops run the training forward faster than the host decode kernels run
        // a packed pass (1.7x on a SmolLM2-sized reward model: docs/perf.md); everywhere else,
        // a GPU first, the packed pass reads no padding and makes no `[t, t]` scores.
        let packed = optune_kernels::autograd_path(device, dtype) == optune_kernels::Path::Generic;
        if packed {
            model.prepare_to_feed()?;
        }
        Ok(Self {
            model,
            tokenizer,
            pad_id,
            packed,
        })
    }

    /// The longest sequence the model has positions for.
    pub fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    /// Why that is below the config's `max_position_embeddings`, if it is.
    pub fn position_limit_note(&self) -> &'static str {
        self.model.config().position_limit_note()
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

    /// Scores `sequences` in the forward passes of [`passes`], calling `on_batch` with the
    /// indices and scores of each pass as it finishes. Returns the scores in `sequences'` order.
    pub fn score(
        &self,
        sequences: &[Vec<u32>],
        batching: Batching,
        mut on_batch: impl FnMut(&[usize], &[f32]) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let mut scores = vec![0f32; sequences.len()];
        for batch in passes(sequences, batching, self.packed) {
            let batch_scores = self
                .score_pass(sequences, &batch, batching)
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

    /// The scores of `sequences[batch]`: packed, each sequence whole but for one longer than a
    /// pass alone (in pieces); or one right-padded batch, whose sequences [`passes`] made of one
    /// length.
    fn score_pass(
        &self,
        sequences: &[Vec<u32>],
        batch: &[usize],
        batching: Batching,
    ) -> Result<Vec<f32>> {
        if self.packed {
            let tokens: Vec<&[u32]> = batch.iter().map(|&i| sequences[i].as_slice()).collect();
            let chunk = (batching.positions / batch.len()).max(1);
            return packed_sequence_scores(&self.model, &tokens, chunk);
        }
        let tokens: Vec<Vec<u32>> = batch.iter().map(|&i| sequences[i].clone()).collect();
        Ok(sequence_scores(&self.model, &tokens, self.pad_id)?.to_vec1()?)
    }

    /// Whether passes run packed (and so the memory plan of [`RewardModel::pass_memory`] holds).
    pub fn packed(&self) -> bool {
        self.packed
    }

    /// What a packed pass takes on the device per position.
    pub fn pass_memory(&self) -> PassMemory {
        PassMemory {
            cache: KvCache::slot_bytes(&self.model, 1) as f64,
            activations: self.model.activation_bytes_per_token() as f64,
        }
    }

    /// Bytes of the model's weights.
    pub fn weight_bytes(&self) -> usize {
        self.model.parameter_count() * self.model.dtype().size_in_bytes()
    }
}

/// How sequences are grouped into forward passes.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// At most this many sequences in a pass (`--batch-size`).
    pub sequences: usize,
    /// At most this many positions in a pass, counting each sequence as long as the longest
    /// beside it (what its KV-cache slot holds): `--batch-tokens`. A longer sequence goes alone
    /// (packed: in pieces of this many tokens).
    pub positions: usize,
}

/// Bytes a packed pass takes on the device per position: its keys and values in every layer's
/// cache, and (an upper bound) every activation of one layer, which the next layer's replace.
#[derive(Clone, Copy, Debug)]
pub struct PassMemory {
    pub cache: f64,
    pub activations: f64,
}

impl PassMemory {
    /// Bytes of a pass of `positions` when the longest sequence has `longest` tokens: its cache
    /// holds at most max(positions, longest) positions (a longer sequence's slot holds all of
    /// it, fed in pieces) and `positions` tokens' activations.
    pub fn need(&self, positions: usize, longest: usize) -> f64 {
        positions.max(longest) as f64 * self.cache + positions as f64 * self.activations
    }

    /// The most positions a pass may take within `budget` bytes, `None` when the longest
    /// sequence's cache leaves no room for even one token's activations.
    pub fn positions_within(&self, budget: f64, longest: usize) -> Option<usize> {
        let whole = budget / (self.cache + self.activations);
        let fit = match whole >= longest as f64 {
            true => whole,
            false => (budget - longest as f64 * self.cache) / self.activations,
        };
        (fit >= 1.0).then_some(fit as usize)
    }
}

/// Indices of `sequences` in forward passes: longest first (ties in input order), as many
/// sequences in a pass as `batching` allows, and, unless the passes are `packed`, all of one
/// length (a padded batch's scores would change in their last bits with the longest sequence
/// beside them, and a `--shard` of the rows would not score them as the whole run does).
fn passes(sequences: &[Vec<u32>], batching: Batching, packed: bool) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| Reverse(sequences[i].len()));
    let mut passes: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match passes.last_mut() {
            Some(pass)
                if pass.len() < batching.sequences
                    && (pass.len() + 1) * sequences[pass[0]].len() <= batching.positions
                    && (packed || sequences[i].len() == sequences[pass[0]].len()) =>
            {
                pass.push(i)
            }
            _ => passes.push(vec![i]),
        }
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_fit_the_memory_they_are_sized_from() {
        let memory = PassMemory {
            cache: 10.0,
            activations: 2.0,
        };
        assert_eq!(memory.need(100, 30), 1200.0);
        assert_eq!(memory.need(20, 30), 340.0);
        // Whole sequences: 1000 bytes hold 83 positions at 12 each.
        assert_eq!(memory.positions_within(1000.0, 50), Some(83));
        // A sequence of 90 tokens takes 900 bytes of cache: pieces of 50 tokens in the rest.
        assert_eq!(memory.positions_within(1000.0, 90), Some(50));
        assert_eq!(memory.need(50, 90), 1000.0);
        // Its cache alone leaves less than one token's activations.
        assert_eq!(memory.positions_within(1000.0, 100), None);
        for (budget, longest) in [(1000.0, 50), (1000.0, 90), (5e9, 4096), (1e6, 0)] {
            let positions = memory.positions_within(budget, longest).unwrap();
            assert!(memory.need(positions, longest) <= budget);
            assert!(memory.need(positions + 1, longest) > budget);
        }
    }

    #[test]
    fn passes_hold_what_the_batching_allows_and_cover_every_index_once() {
        let sequences: Vec<Vec<u32>> = [3, 9, 1, 9, 5, 9, 3].iter().map(|&n| vec![0; n]).collect();
        let batching = |sequences, positions| Batching {
            sequences,
            positions,
        };
        // Longest first, ties in input order; each pass within 2 sequences and 20 positions.
        assert_eq!(
            passes(&sequences, batching(2, 20), true),
            [vec![1, 3], vec![5, 4], vec![0, 6], vec![2]]
        );
        // A pass of 9s holds two (a third would make 27 positions), a 9 and a 5 count 18.
        assert_eq!(
            passes(&sequences, batching(10, 20), true),
            [vec![1, 3], vec![5, 4], vec![0, 6, 2]]
        );
        // Unpacked, a pass holds one length.
        assert_eq!(
            passes(&sequences, batching(10, 20), false),
            [vec![1, 3], vec![5], vec![4], vec![0, 6], vec![2]]
        );
        // A sequence longer than a pass goes alone.
        assert_eq!(
            passes(&sequences, batching(10, 4), true),
            [
                vec![1],
                vec![3],
                vec![5],
                vec![4],
                vec![0],
                vec![6],
                vec![2]
            ]
        );
        assert!(passes(&[], batching(4, 4), true).is_empty());
    }
}
