//! Sequence log-probabilities of responses given prompts: what DPO trains on and what the
//! generator reports.

use crate::transformer::{KvCache, OutputHead, PaddedBatch, RecomputedPass, Segment, Transformer};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// One (prompt, response) pair as token ids; the response includes its final EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

impl TokenizedPair {
    /// Prompt and response tokens together: the sequence the model reads.
    pub fn tokens(&self) -> usize {
        self.prompt.len() + self.response.len()
    }
}

/// Summed log-probs `[batch]` (f32, or f64 for f64 models; differentiable) and the number of response tokens of each.
pub struct SequenceLogprobs {
    pub sums: Tensor,
    pub token_counts: Vec<usize>,
}

impl SequenceLogprobs {
    /// Per-token mean log-probs `[batch]`.
    pub fn means(&self) -> candle_core::Result<Tensor> {
        let counts: Vec<f32> = self.token_counts.iter().map(|&c| c.max(1) as f32).collect();
        let counts = Tensor::from_vec(counts, self.token_counts.len(), self.sums.device())?
            .to_dtype(self.sums.dtype())?;
        self.sums.div(&counts)
    }
}

/// `log p(response | prompt)` summed over response tokens, for a batch run as one right-padded
/// forward pass. Prompt tokens are masked out of the sum.
pub fn sequence_logprobs(
    model: &Transformer,
    pairs: &[TokenizedPair],
    pad_id: u32,
) -> Result<SequenceLogprobs> {
    let layout = ResponseTokens::of(pairs, pad_id, model.device())?;
    let hidden = model.hidden_states(&layout.batch)?;
    layout.logprobs(model, &hidden)
}

/// [`sequence_logprobs`] with its activations recomputed in the backward pass: the gradients of
/// a loss built on the sums come from [`crate::recomputed_backward`] with the returned pass.
pub fn sequence_logprobs_recomputed<'m>(
    model: &'m Transformer,
    pairs: &[TokenizedPair],
    pad_id: u32,
) -> Result<(SequenceLogprobs, RecomputedPass<'m>)> {
    let layout = ResponseTokens::of(pairs, pad_id, model.device())?;
    let (hidden, pass) = model.hidden_states_recomputed(&layout.batch)?;
    Ok((layout.logprobs(model, &hidden)?, pass))
}

/// The padded batch of (prompt, response) sequences and where their response tokens are.
struct ResponseTokens {
    batch: PaddedBatch,
    /// Per response token: the flat `[batch · seq]` row that predicts it, the token, and its
    /// sequence.
    predictor_rows: Vec<u32>,
    targets: Vec<u32>,
    owners: Vec<usize>,
    token_counts: Vec<usize>,
}

impl ResponseTokens {
    fn of(pairs: &[TokenizedPair], pad_id: u32, device: &Device) -> Result<Self> {
        let mut sequences = Vec::with_capacity(pairs.len());
        let mut predictor_rows = Vec::new();
        let mut targets = Vec::new();
        let mut owners = Vec::new();
        let seq_len = pairs.iter().map(TokenizedPair::tokens).max().unwrap_or(0);
        for (b, pair) in pairs.iter().enumerate() {
            if pair.prompt.is_empty() {
                bail!("pair {b}: empty prompt (at least one prompt token is needed to predict the response)");
            }
            if pair.response.is_empty() {
                bail!("pair {b}: empty response");
            }
            let mut seq = pair.prompt.clone();
            seq.extend_from_slice(&pair.response);
            for (j, &token) in pair.response.iter().enumerate() {
                predictor_rows.push((b * seq_len + pair.prompt.len() - 1 + j) as u32);
                targets.push(token);
                owners.push(b);
            }
            sequences.push(seq);
        }
        Ok(Self {
            batch: PaddedBatch::right_padded(&sequences, pad_id, device)?,
            predictor_rows,
            targets,
            owners,
            token_counts: pairs.iter().map(|p| p.response.len()).collect(),
        })
    }

    /// The summed log-probs from the final-norm hidden states `[batch, seq, hidden]`.
    fn logprobs(self, model: &Transformer, hidden: &Tensor) -> Result<SequenceLogprobs> {
        let device = model.device();
        let (batch, seq_len, hidden_size) = hidden.dims3()?;
        let flat = hidden.reshape((batch * seq_len, hidden_size))?;
        let rows = flat.index_select(&Tensor::new(self.predictor_rows.as_slice(), device)?, 0)?;
        let token_logps = token_logprobs(model, &rows, &self.targets)?;
        // Segment sum through a [batch, tokens] 0/1 mask, differentiable: an elementwise product
        // and a sum, not a matrix product, which on CUDA with TF32 (on by default) would round
        // each token's log-prob to a 10-bit mantissa before the sum.
        let tokens = self.targets.len();
        let mut membership = vec![0f32; batch * tokens];
        for (i, &b) in self.owners.iter().enumerate() {
            membership[b * tokens + i] = 1.0;
        }
        let membership =
            Tensor::from_vec(membership, (batch, tokens), device)?.to_dtype(token_logps.dtype())?;
        let sums = membership
            .broadcast_mul(&token_logps.unsqueeze(0)?)?
            .sum(1)?;
        Ok(SequenceLogprobs {
            sums,
            token_counts: self.token_counts,
        })
    }
}

/// `log softmax(head(rows))[target]` for each row, `[rows]`, one chunk of logits at a time
/// ([`optune_kernels::token_logprobs`]).
pub fn token_logprobs(model: &Transformer, rows: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let weight = match model.head() {
        OutputHead::LanguageModel { weight, .. } | OutputHead::Score { weight } => weight,
    };
    Ok(optune_kernels::token_logprobs(rows, weight, targets)?)
}

/// Sequence-classification scores `[batch]` (label 0) read at each sequence's last token:
/// what a reward model outputs.
pub fn sequence_scores(model: &Transformer, sequences: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
    if let Some(b) = sequences.iter().position(Vec::is_empty) {
        bail!("sequence {b} is empty");
    }
    let device = model.device();
    let batch = PaddedBatch::right_padded(sequences, pad_id, device)?;
    let (b, t) = batch.dims();
    let hidden = model.hidden_states(&batch)?;
    let last: Vec<u32> = sequences
        .iter()
        .enumerate()
        .map(|(i, s)| (i * t + s.len() - 1) as u32)
        .collect();
    let rows = hidden
        .reshape((b * t, hidden.dim(D::Minus1)?))?
        .index_select(&Tensor::new(last.as_slice(), device)?, 0)?;
    Ok(model
        .head_logits(&rows)?
        .narrow(1, 0, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?)
}

/// Sequence-classification scores (label 0) read at each sequence's last token: what a reward
/// model outputs, in `sequences`' order.
///
/// The sequences go through the model together, unpadded, each in a KV-cache slot of its own
/// and attending over its own positions only ([`Transformer::feed`]), at most `chunk` tokens of
/// each per forward pass: a sequence longer than `chunk` is fed in pieces, the scores coming
/// from the pass that feeds the last ones. Unlike [`sequence_scores`], no `[batch, 1, t, t]`
/// mask and no scores over padding: the cost is the tokens' own, what a GPU wants. On the CPU's
/// host kernels a sequence's score does not depend on the others fed with it, nor on `chunk`, to
/// the bit.
pub fn packed_sequence_scores(
    model: &Transformer,
    sequences: &[&[u32]],
    chunk: usize,
) -> Result<Vec<f32>> {
    if let Some(b) = sequences.iter().position(|s| s.is_empty()) {
        bail!("sequence {b} is empty");
    }
    if chunk == 0 {
        bail!("packed_sequence_scores: chunk must be at least one token");
    }
    let Some(longest) = sequences.iter().map(|s| s.len()).max() else {
        return Ok(Vec::new());
    };
    let mut cache = KvCache::new(model, sequences.len(), longest)?;
    let mut scores = vec![0f32; sequences.len()];
    for start in (0..longest).step_by(chunk) {
        let end = start.saturating_add(chunk);
        let fed: Vec<usize> = (0..sequences.len())
            .filter(|&i| start < sequences[i].len())
            .collect();
        let segments: Vec<Segment> = fed
            .iter()
            .map(|&slot| {
                let tokens = sequences[slot];
                Segment {
                    slot,
                    tokens: &tokens[start..tokens.len().min(end)],
                }
            })
            .collect();
        let logits = model.feed(&segments, &mut cache)?;
        let width = logits.len() / segments.len();
        for (row, &i) in fed.iter().enumerate() {
            if end >= sequences[i].len() {
                scores[i] = logits[row * width];
            }
        }
    }
    Ok(scores)
}
