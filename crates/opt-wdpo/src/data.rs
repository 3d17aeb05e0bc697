//! Preference pairs as token ids, and length-bucketed batches of them.

use anyhow::{bail, Context, Result};
use optune_model::{ChatTokenizer, TokenizedPair};
use optune_shard::Shard;
use optune_train::loss::Objective;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One training example: both sides tokenised, the reward gap, and the reference log-probs.
#[derive(Clone, Debug)]
pub struct TrainPair {
    pub chosen: TokenizedPair,
    pub rejected: TokenizedPair,
    /// 0 when the shard has no rewards (an offline dataset): the weight is then 1 for every form.
    pub reward_gap: f32,
    /// The pair's weight from `--weight-col`, when given.
    pub given_weight: Option<f64>,
    /// Reference log-probs of (chosen, rejected), summed over each response.
    pub ref_logps: Option<(f32, f32)>,
}

impl TrainPair {
    /// Tokens of the longer side (prompt and response).
    pub fn longest_side(&self) -> usize {
        self.chosen.tokens().max(self.rejected.tokens())
    }
}

/// Tokens of the longest sequence of `pairs` (0 for none).
pub fn longest_sequence(pairs: &[TrainPair]) -> usize {
    pairs.iter().map(TrainPair::longest_side).max().unwrap_or(0)
}

/// Keeps a sequence within `max_length` tokens: the prompt loses tokens from its start (down to
/// half the budget), then the response loses tokens from its end.
fn truncate(pair: &mut TokenizedPair, max_length: usize) {
    if pair.tokens() <= max_length {
        return;
    }
    let prompt_budget = (max_length / 2).max(max_length.saturating_sub(pair.response.len()));
    if pair.prompt.len() > prompt_budget {
        pair.prompt.drain(..pair.prompt.len() - prompt_budget);
    }
    pair.response
        .truncate(max_length.saturating_sub(pair.prompt.len()).max(1));
}

/// Reads and tokenises the pairs of `shard`, with their weights from `weight_column` when given.
pub fn read_pairs(
    shard: &Shard,
    tokenizer: &ChatTokenizer,
    max_length: usize,
    weight_column: Option<&str>,
) -> Result<Vec<TrainPair>> {
    let pairs = shard.preference_pairs()?;
    let gaps = shard.pair_reward_gaps()?;
    let given_weights = match weight_column {
        Some(name) => {
            let values = shard.finite_floats(name)?;
            if let Some(row) = values.iter().position(|&w| w < 0.0) {
                bail!(
                    "{}: column '{name}': weight {} at row {} is negative",
                    shard.name(),
                    values[row],
                    row + 1
                );
            }
            Some(values)
        }
        None => None,
    };
    let refs = if shard.has_column("ref_chosen_logp") && shard.has_column("ref_rejected_logp") {
        Some((
            shard.finite_floats("ref_chosen_logp")?,
            shard.finite_floats("ref_rejected_logp")?,
        ))
    } else {
        None
    };
    pairs
        .into_iter()
        .enumerate()
        .map(|(row, pair)| {
            let prompt = optune_cli::model_prompt(&pair.prompt);
            let encode = |response: &str| -> Result<TokenizedPair> {
                let (prompt_ids, response_ids) = tokenizer.encode_pair(&prompt, response)?;
                let mut tokenized = TokenizedPair {
                    prompt: prompt_ids,
                    response: response_ids,
                };
                truncate(&mut tokenized, max_length);
                if tokenized.prompt.is_empty() {
                    bail!(
                        "the prompt has no tokens (an empty text, and a tokenizer that adds no \
                         BOS): the response's first token has nothing to be predicted from"
                    );
                }
                Ok(tokenized)
            };
            let at_row = || format!("{}: row {}", shard.name(), row + 1);
            Ok(TrainPair {
                chosen: encode(&pair.chosen).with_context(at_row)?,
                rejected: encode(&pair.rejected).with_context(at_row)?,
                reward_gap: gaps.as_ref().map_or(0.0, |g| g[row] as f32),
                given_weight: given_weights.as_ref().map(|w| w[row]),
                ref_logps: refs.as_ref().map(|(c, r)| (c[row] as f32, r[row] as f32)),
            })
        })
        .collect()
}

/// Drops the pairs whose chosen and rejected sequences are the same tokens (after truncation)
/// when `objective` only compares a pair's sides: they add nothing to the gradient but rounding,
/// which AdamW would scale up to a full step in a batch of them, and they dilute the mean loss of
/// the others. Returns how many were dropped.
pub fn drop_identical_pairs(pairs: &mut Vec<TrainPair>, objective: Objective) -> usize {
    if !objective.only_compares_sides() {
        return 0;
    }
    let before = pairs.len();
    pairs.retain(|pair| pair.chosen != pair.rejected);
    before - pairs.len()
}

/// The order of one epoch: shuffled by `seed + epoch`, then sorted by length within windows of
/// 8 batches so each batch holds similar lengths (less padding) while batches stay mixed.
pub fn epoch_batches(
    pairs: &[TrainPair],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    for window in order.chunks_mut(batch_size * 8) {
        window.sort_by_key(|&i| (pairs[i].longest_side(), i));
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_prompt_end_and_the_response_start() {
        let mut pair = TokenizedPair {
            prompt: (0..10).collect(),
            response: (100..110).collect(),
        };
        truncate(&mut pair, 12);
        assert_eq!(pair.prompt, (4..10).collect::<Vec<u32>>());
        assert_eq!(pair.response, (100..106).collect::<Vec<u32>>());
        let mut short = TokenizedPair {
            prompt: vec![1, 2],
            response: vec![3],
        };
        truncate(&mut short, 12);
        assert_eq!(short.prompt, vec![1, 2]);
    }

    #[test]
    fn identical_pairs_are_dropped_only_where_they_teach_nothing() {
        let pair = |rejected: u32| TrainPair {
            chosen: TokenizedPair {
                prompt: vec![1, 2],
                response: vec![3, 4],
            },
            rejected: TokenizedPair {
                prompt: vec![1, 2],
                response: vec![rejected, 4],
            },
            reward_gap: 1.0,
            given_weight: None,
            ref_logps: None,
        };
        let pairs = vec![pair(5), pair(3), pair(6)];
        let rejected_of = |kept: &[TrainPair]| -> Vec<u32> {
            kept.iter().map(|p| p.rejected.response[0]).collect()
        };
        for objective in [Objective::Sigmoid, Objective::Ipo, Objective::Simpo] {
            let mut kept = pairs.clone();
            assert_eq!(drop_identical_pairs(&mut kept, objective), 1);
            assert_eq!(rejected_of(&kept), [5, 6]);
        }
        for objective in [Objective::Rpo, Objective::Hypo, Objective::Sft] {
            let mut kept = pairs.clone();
            assert_eq!(drop_identical_pairs(&mut kept, objective), 0);
            assert_eq!(rejected_of(&kept), [5, 3, 6]);
        }
    }
}
