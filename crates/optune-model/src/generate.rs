//! Batched sampling with a KV cache and continuous batching.
//!
//! Up to `batch_size` sequences decode together; when one finishes, the next waiting request is
//! prefilled into its slot, so a long response never idles the batch. Each request carries its
//! own random stream, so what a request samples does not depend on which requests share its
//! batch, on the batch size, or on the thread count.

use crate::transformer::{KvCache, Transformer};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub max_new_tokens: usize,
}

/// One sequence to generate: its prompt tokens and its random stream's seed.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was sampled (it is the last entry of `tokens`).
    Stop,
    /// `max_new_tokens` were sampled without EOS.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Sampled tokens, including the final EOS when `finish == Stop`.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// `Σ log π(token | prefix)` of the sampled tokens under the model itself (temperature 1,
    /// no truncation): the quantity DPO's log-ratios are made of.
    pub logp: f64,
}

/// Mixes a run seed with a request's identity into an independent stream seed (SplitMix64 over
/// an FNV-1a hash of the key).
pub fn stream_seed(run_seed: u64, key: &str, sample: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes().iter().chain(&sample.to_le_bytes()) {
        h ^= *byte as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix64(splitmix64(run_seed) ^ h)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Picks the next token from `logits` and returns it with its untempered log-probability.
pub fn sample_token(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f64) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_z = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let logp = |t: usize| logits[t] as f64 - log_z;
    if params.temperature <= 0.0 {
        // Greedy; ties go to the lowest id.
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
        return (best as u32, logp(best));
    }
    let inv_t = 1.0 / params.temperature;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = params.top_k.filter(|&k| k > 0) {
        order.truncate(k);
    }
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order.iter().map(|&t| ((logits[t] as f64 - top) * inv_t).exp()).collect();
    let total: f64 = weights.iter().sum();
    // Nucleus: the smallest prefix (by descending probability) whose mass reaches top_p.
    let mut keep = weights.len();
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        for (i, w) in weights.iter().enumerate() {
            cumulative += w / total;
            if cumulative >= params.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut u = rng.random::<f64>() * kept_total;
    for (i, w) in weights[..keep].iter().enumerate() {
        if u < *w {
            return (order[i] as u32, logp(order[i]));
        }
        u -= w;
    }
    let last = order[keep - 1];
    (last as u32, logp(last))
}

struct Active {
    request: usize,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logp: f64,
    /// Sampled but not yet fed to the model.
    pending: u32,
}

/// Generates one continuation per request, in request order. `on_finish(tokens_in_this_one)` is
/// called as each request completes (for progress reporting).
pub fn generate(
    model: &Transformer,
    requests: &[GenerationRequest],
    params: &SamplingParams,
    eos_ids: &[u32],
    batch_size: usize,
    mut on_finish: impl FnMut(usize),
) -> Result<Vec<Generation>> {
    if batch_size == 0 {
        bail!("batch size must be at least 1");
    }
    if params.max_new_tokens == 0 {
        bail!("max_new_tokens must be at least 1");
    }
    let longest = requests.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
    let capacity = longest + params.max_new_tokens;
    if capacity > model.max_positions() {
        bail!(
            "prompt ({longest} tokens) + max_new_tokens ({}) exceeds the model's {} positions",
            params.max_new_tokens,
            model.max_positions()
        );
    }
    let slots = batch_size.min(requests.len()).max(1);
    let mut cache = KvCache::new(model, slots, capacity)?;
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    // Longest prompts first: the batch's attention span then shrinks as the queue drains.
    let mut queue: Vec<usize> = (0..requests.len()).collect();
    queue.sort_by_key(|&i| (std::cmp::Reverse(requests[i].prompt_ids.len()), i));
    queue.reverse();
    let mut active: Vec<Option<Active>> = (0..slots).map(|_| None).collect();
    loop {
        // Refill free slots; a request may finish on its very first token.
        for slot in 0..slots {
            while active[slot].is_none() {
                let Some(request) = queue.pop() else { break };
                let prompt = &requests[request].prompt_ids;
                if prompt.is_empty() {
                    bail!("request {request}: empty prompt");
                }
                cache.clear(slot);
                let logits = model.prefill(prompt, &mut cache, slot)?;
                let mut state = Active {
                    request,
                    rng: ChaCha8Rng::seed_from_u64(requests[request].seed),
                    tokens: Vec::new(),
                    logp: 0.0,
                    pending: 0,
                };
                if let Some(done) = advance(&mut state, &logits, params, eos_ids)? {
                    on_finish(done.tokens.len());
                    results[request] = Some(done);
                } else {
                    active[slot] = Some(state);
                }
            }
        }
        if active.iter().all(Option::is_none) {
            break;
        }
        let feed: Vec<Option<u32>> = active.iter().map(|a| a.as_ref().map(|s| s.pending)).collect();
        let logits = model.decode_step(&feed, &mut cache)?;
        for slot in 0..slots {
            let Some(state) = active[slot].as_mut() else { continue };
            let row = logits.get(slot)?;
            if let Some(done) = advance(state, &row, params, eos_ids)? {
                on_finish(done.tokens.len());
                results[state.request] = Some(done);
                active[slot] = None;
            }
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every request finishes")).collect())
}

/// Samples the next token from `logits`; returns the finished generation when it ends here.
fn advance(state: &mut Active, logits: &Tensor, params: &SamplingParams, eos_ids: &[u32]) -> Result<Option<Generation>> {
    let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    let (token, logp) = sample_token(&logits, params, &mut state.rng);
    state.tokens.push(token);
    state.logp += logp;
    state.pending = token;
    let finish = if eos_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if state.tokens.len() >= params.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    Ok(finish.map(|finish| Generation { tokens: std::mem::take(&mut state.tokens), finish, logp: state.logp }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64, top_k: Option<usize>) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, max_new_tokens: 1 }
    }

    #[test]
    fn greedy_picks_the_argmax_and_reports_its_logprob() {
        let logits = [0.0f32, 2.0, 1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (t, lp) = sample_token(&logits, &params(0.0, 1.0, None), &mut rng);
        assert_eq!(t, 1);
        let z = (0f64.exp() + 2f64.exp() + 1f64.exp()).ln();
        assert!((lp - (2.0 - z)).abs() < 1e-12);
    }

    #[test]
    fn top_p_and_top_k_restrict_the_support() {
        // Probabilities ∝ e^3, e^2, e^0, e^0: top-p 0.5 keeps only the first.
        let logits = [2.0f32, 3.0, 0.0, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            assert_eq!(sample_token(&logits, &params(1.0, 0.5, None), &mut rng).0, 1);
            let (t, _) = sample_token(&logits, &params(1.0, 1.0, Some(2)), &mut rng);
            assert!(t == 0 || t == 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let ones = (0..20000).filter(|_| sample_token(&logits, &params(1.0, 1.0, None), &mut rng).0 == 1).count();
        let share = ones as f64 / 20000.0;
        assert!((share - 0.75).abs() < 0.015, "{share}");
    }

    #[test]
    fn stream_seeds_differ_by_key_and_sample() {
        let a = stream_seed(0, "p1", 0);
        assert_ne!(a, stream_seed(0, "p1", 1));
        assert_ne!(a, stream_seed(0, "p2", 0));
        assert_ne!(a, stream_seed(1, "p1", 0));
        assert_eq!(a, stream_seed(0, "p1", 0));
    }
}
