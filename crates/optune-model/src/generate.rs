//! Batched sampling with a KV cache and continuous batching.
//!
//! Up to `batch_size` sequences decode together; when one finishes, the next waiting request's
//! prompt goes into its slot in the very next step, so a long response never idles the batch.
//! Each request carries its own random stream, and on the CPU in f32 the model computes every
//! sequence's numbers on their own (see [`optune_kernels::host`]), so what a request samples — and its
//! `logp`, to the bit — does not depend on which requests share its batch, on the batch size or
//! on the thread count.
//!
//! Elsewhere (a GPU, or `OPTUNE_KERNELS=generic` on the CPU) the logits stay on the model's device
//! and each sequence samples there (`crate::sampling`: one uniform per sequence from its
//! own stream goes in, one token id and its log-probability per sequence come back), from the same
//! distribution by other arithmetic; a fixed seed repeats its output on that device.

pub use crate::sampling::SamplingParams;
use crate::sampling::{sample_rows, sample_token};
pub use crate::stop::StopStrings;
use crate::transformer::{KvCache, Segment, Transformer};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// One sequence to generate: its prompt tokens and its random stream's seed.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub seed: u64,
}

/// What ends a sequence before `max_new_tokens`.
#[derive(Clone, Copy, Default)]
pub struct Stopping<'a> {
    /// Sampling one of these (kept as the sequence's last token): the model's EOS.
    pub eos_ids: &'a [u32],
    /// Its text completing one of these (vLLM's `stop`).
    pub strings: Option<&'a StopStrings<'a>>,
}

impl<'a> Stopping<'a> {
    /// At the EOS ids only.
    pub fn eos(eos_ids: &'a [u32]) -> Self {
        Self {
            eos_ids,
            strings: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was sampled (it is the last entry of `tokens`), or the text completed a stop
    /// string ([`Stopping::strings`]) at the last token.
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

/// Positions every slot of the KV cache holds for `requests`: the longest prompt and
/// `max_new_tokens`.
pub fn cache_capacity(requests: &[GenerationRequest], params: &SamplingParams) -> usize {
    let longest = requests.iter().map(|r| r.prompt_ids.len()).max();
    longest.unwrap_or(0) + params.max_new_tokens
}

/// A KV cache sized from memory ([`cache_for_memory`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSize {
    /// Sequences decoded together at most.
    pub slots: usize,
    /// A paged cache's blocks of [`KvCache::BLOCK`] positions (`None`: each slot holds
    /// [`cache_capacity`] positions of its own).
    pub blocks: Option<usize>,
    /// What the cache takes.
    pub bytes: f64,
    /// What a step's activations and logits take at most, set aside from the budget.
    pub working_bytes: f64,
}

/// What `budget_bytes` hold for generating `requests`, at most `most` sequences at a time and
/// `prompt_tokens_per_step` prompt tokens per step ([`Batching`]): first a step's working memory
/// (the activations of one layer for every token it feeds, the logits of every sequence twice:
/// the head's and the rows picked for sampling), then the KV cache.
///
/// A tensor cache (a GPU's) is paged: as many blocks as the rest holds, no more than its
/// sequences could fill at [`cache_capacity`] positions each; sequences start on their prompt's
/// blocks and take more as they grow (see [`generate`]), so a batch is sized by its sequences'
/// lengths, not by the longest. The host decode kernels' cache (the CPU's in f32) holds as many slots of
/// [`cache_capacity`] positions as fit. Either way there are no more sequences than the cache
/// has blocks or slots (each holds one of its own), and one sequence of the longest must fit
/// beside their working memory: an error otherwise.
pub fn cache_for_memory(
    model: &Transformer,
    requests: &[GenerationRequest],
    params: &SamplingParams,
    budget_bytes: f64,
    most: usize,
    prompt_tokens_per_step: usize,
) -> Result<CacheSize> {
    let capacity = cache_capacity(requests, params);
    let most = most.clamp(1, requests.len().max(1));
    let paged = KvCache::can_page(model);
    let (unit, units_per_slot) = match paged {
        true => (KvCache::BLOCK, capacity.div_ceil(KvCache::BLOCK).max(1)),
        false => (capacity, 1),
    };
    let unit_bytes = KvCache::slot_bytes(model, unit) as f64;
    let token_bytes = model.activation_bytes_per_token() as f64;
    let logit_bytes = (2 * model.config().vocab_size * model.dtype().size_in_bytes()) as f64;
    // Each sequence feeds a token and samples from its logits; the prompt chunks come on top.
    let per_sequence = token_bytes + logit_bytes;
    let prompt_bytes = prompt_tokens_per_step as f64 * token_bytes;
    let room = budget_bytes - prompt_bytes;
    let longest = units_per_slot as f64 * unit_bytes;
    // Units beside `slots` sequences' working memory.
    let units_beside = |slots: usize| {
        ((room - slots as f64 * per_sequence) / unit_bytes)
            .floor()
            .max(0.0) as usize
    };
    let estimate = (room / (unit_bytes + per_sequence))
        .min((room - longest) / per_sequence)
        .min(most as f64)
        .floor()
        .max(0.0) as usize;
    // The estimate's rounding aside: a unit of its own for each sequence, and the longest's.
    let slots = (0..=estimate)
        .rev()
        .find(|&slots| units_beside(slots) >= slots.max(units_per_slot))
        .filter(|&slots| slots > 0);
    let Some(slots) = slots else {
        bail!(
            "one sequence's KV cache ({:.2} GB for {capacity} positions: the longest prompt and \
             max_new_tokens) and a step's working memory ({:.2} GB with {prompt_tokens_per_step} \
             prompt tokens per step) do not fit in the {:.2} GB allowed; allow more memory, feed \
             fewer prompt tokens per step, or shorten the prompts or the responses",
            longest / 1e9,
            (prompt_bytes + per_sequence) / 1e9,
            budget_bytes / 1e9
        );
    };
    let working_bytes = prompt_bytes + slots as f64 * per_sequence;
    let units = units_beside(slots).min(slots * units_per_slot);
    let (blocks, units) = match paged {
        true => (Some(units), units),
        false => (None, slots),
    };
    Ok(CacheSize {
        slots,
        blocks,
        bytes: units as f64 * unit_bytes,
        working_bytes,
    })
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

struct Active {
    request: usize,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logp: f64,
    /// Tokens of [`Active::source`] fed so far.
    fed: usize,
    /// Sampled but not yet fed to the model; `None` while the prompt is still to be fed.
    pending: Option<u32>,
    /// The slot prefilling the same prompt, whose keys and values this one copies (and whose
    /// last logits it samples from) once that prefill is complete: the --n samples of a prompt
    /// share one prefill.
    follows: Option<usize>,
    /// For a sequence resumed after it gave its paged cache's blocks back: its prompt and the
    /// tokens it had sampled, whose keys and values are computed again before it samples on.
    resumed: Option<Arc<[u32]>>,
    /// When it took its slot (the order of admissions): the last one admitted gives its blocks
    /// back first.
    admitted: usize,
}

impl Active {
    /// Whether this slot feeds its own prompt and has not finished feeding it (the slot the
    /// samples of the same prompt wait on).
    fn leads_prefill(&self) -> bool {
        self.pending.is_none() && self.follows.is_none()
    }

    /// What this slot prefills ([`prefill_source`]).
    fn source<'a>(&'a self, requests: &'a [GenerationRequest]) -> &'a [u32] {
        prefill_source(self.resumed.as_ref(), &requests[self.request])
    }

    /// Back to the queue: its sampled tokens become what it prefills when it is admitted again,
    /// its random stream and log-probability carry on. `None` when it has sampled nothing yet:
    /// it starts afresh (its stream untouched), and may share a prompt's prefill again.
    fn preempted(mut self, requests: &[GenerationRequest]) -> Option<Self> {
        if self.tokens.is_empty() {
            return None;
        }
        let mut source = requests[self.request].prompt_ids.clone();
        source.extend_from_slice(&self.tokens);
        self.resumed = Some(source.into());
        self.fed = 0;
        self.pending = None;
        self.follows = None;
        Some(self)
    }
}

/// What a sequence prefills: its request's prompt, or, `resumed` after a preemption, that prompt
/// and the tokens it had sampled.
fn prefill_source<'a>(
    resumed: Option<&'a Arc<[u32]>>,
    request: &'a GenerationRequest,
) -> &'a [u32] {
    match resumed {
        Some(tokens) => tokens,
        None => &request.prompt_ids,
    }
}

/// The sequence that gives its paged cache's blocks back when a decoding one needs a block and
/// none is free: the one admitted last, whether decoding or still prefilling (whose promised
/// blocks go back too), so that the sequences admitted earlier run on (vLLM's order). Never one
/// whose prefill others wait on: they were admitted after it.
fn preemption_victim(active: &[Option<Active>]) -> Option<usize> {
    (0..active.len())
        .filter(|&s| active[s].is_some())
        .max_by_key(|&s| active[s].as_ref().map(|a| a.admitted))
}

/// [`generate`]'s generations, and what running short of KV cache cost it.
#[derive(Debug, Clone)]
pub struct Generated {
    /// One per request, in request order.
    pub generations: Vec<Generation>,
    /// Times a sequence gave its paged cache's blocks back (0 unpaged).
    pub preemptions: usize,
    /// Positions those sequences had in the cache, which were fed again.
    pub recomputed_tokens: usize,
}

/// How [`generate`] batches its requests.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Sequences decoded together: the KV cache's slots.
    pub slots: usize,
    /// Most prompt tokens fed in one step: a longer prompt goes in over several steps, so the
    /// sequences decoding beside it wait at most this much prefill per token, and the step's
    /// buffers stay bounded.
    pub prompt_tokens_per_step: usize,
    /// A paged KV cache of `(blocks, positions per block)` ([`cache_for_memory`] sizes it, in
    /// blocks of [`KvCache::BLOCK`]; see [`generate`] for how sequences share it), decoded on the
    /// tensor path whatever the device. `None`: [`KvCache::new`], every slot holding the longest
    /// request.
    pub kv_blocks: Option<(usize, usize)>,
}

impl Batching {
    /// The default prompt budget per step.
    pub const PROMPT_TOKENS_PER_STEP: usize = 2048;

    pub fn new(slots: usize) -> Self {
        Self {
            slots,
            prompt_tokens_per_step: Self::PROMPT_TOKENS_PER_STEP,
            kv_blocks: None,
        }
    }
}

impl From<usize> for Batching {
    fn from(slots: usize) -> Self {
        Self::new(slots)
    }
}

/// Generates one continuation per request, in request order. `on_finish(request, &generation)`
/// is called as each request completes (for progress reporting, and for journals that keep the
/// finished ones through a crash).
///
/// Every step feeds the model the next token of each running sequence together with prompt
/// tokens of the requests that took a free slot (continuous batching: a finished sequence's slot
/// is refilled at once), at most [`Batching::prompt_tokens_per_step`] of them: a longer prompt
/// goes in over several steps while the others keep decoding. Each request samples with its own
/// random stream, and on the CPU in f32 its numbers do not depend on the other requests or on
/// how its prompt was split, so the output is the same to the bit for any [`Batching`] and
/// thread count.
///
/// On a paged cache ([`Batching::kv_blocks`]) a request is admitted once a slot and its prompt's
/// blocks are free (with a margin of 1 % of the pool once others run), and each decoding sequence
/// takes its next block before anything new is admitted. When none is free, the sequence
/// admitted last, decoding or still prefilling (`preemption_victim`), gives its blocks and
/// promises back and returns to the head of the queue with its tokens and random stream;
/// admitted again, it prefills its prompt and those tokens and samples on (vLLM's preemption by
/// recomputation). The schedule depends only on the requests, the [`Batching`] and the pool's
/// size, so a run with the same pool repeats itself; another pool changes which sequences share
/// a step, and so, off the CPU's fused kernels, the last bits of their numbers, as another batch
/// size does.
pub fn generate(
    model: &Transformer,
    requests: &[GenerationRequest],
    params: &SamplingParams,
    stopping: Stopping,
    batching: impl Into<Batching>,
    mut on_finish: impl FnMut(usize, &Generation),
) -> Result<Generated> {
    let batching = batching.into();
    if batching.slots == 0 {
        bail!("batch size must be at least 1");
    }
    if batching.prompt_tokens_per_step == 0 {
        bail!("prompt tokens per step must be at least 1");
    }
    if params.max_new_tokens == 0 {
        bail!("max_new_tokens must be at least 1");
    }
    if let Some(empty) = requests.iter().position(|r| r.prompt_ids.is_empty()) {
        bail!("request {empty}: empty prompt");
    }
    let capacity = cache_capacity(requests, params);
    if capacity > model.max_positions() {
        bail!(
            "prompt ({} tokens) + max_new_tokens ({}) exceeds the model's {} positions{}",
            capacity - params.max_new_tokens,
            params.max_new_tokens,
            model.max_positions(),
            model.config().position_limit_note()
        );
    }
    let slots = batching.slots.min(requests.len()).max(1);
    let mut cache = match batching.kv_blocks {
        Some(blocks) => KvCache::paged(model, (slots, capacity), blocks)?,
        None => KvCache::new(model, slots, capacity)?,
    };
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    // Longest prompts first, so that the long ones do not straggle at the end.
    let mut queue: Vec<usize> = (0..requests.len()).collect();
    queue.sort_by_key(|&i| (std::cmp::Reverse(requests[i].prompt_ids.len()), i));
    queue.reverse();
    let mut active: Vec<Option<Active>> = (0..slots).map(|_| None).collect();
    // Sequences that gave their blocks back, by request, until they are admitted again.
    let mut parked: HashMap<usize, Active> = HashMap::new();
    let mut admissions = 0usize;
    let (mut preemptions, mut recomputed_tokens) = (0, 0);
    loop {
        // A paged cache: each decoding sequence takes the block its next position needs before
        // anything new is admitted; when none is free, the sequence admitted last gives its
        // blocks back and waits at the head of the queue (it may be the one in need).
        let mut decoding: Vec<usize> = (0..slots)
            .filter(|&s| active[s].as_ref().is_some_and(|a| a.pending.is_some()))
            .collect();
        decoding.sort_by_key(|&s| active[s].as_ref().map(|a| a.admitted));
        for &slot in &decoding {
            while active[slot].is_some() && !cache.grow(slot, cache.len(slot) + 1)? {
                let victim = preemption_victim(&active).expect("the sequence in need is active");
                let state = active[victim].take().expect("the victim is active");
                preemptions += 1;
                recomputed_tokens += cache.len(victim);
                cache.clear(victim);
                queue.push(state.request);
                if let Some(state) = state.preempted(requests) {
                    parked.insert(state.request, state);
                }
            }
        }
        // This step's prompt tokens per slot, `fed..until`: first the prompts already started,
        // then new requests in free slots, within the step's budget.
        let mut budget = batching.prompt_tokens_per_step;
        let mut until: Vec<Option<usize>> = vec![None; slots];
        for (slot, a) in active.iter().enumerate() {
            let Some(a) = a.as_ref().filter(|a| a.leads_prefill()) else {
                continue;
            };
            let take = (a.source(requests).len() - a.fed).min(budget);
            if take > 0 {
                until[slot] = Some(a.fed + take);
                budget -= take;
            }
        }
        for slot in 0..slots {
            if active[slot].is_some() {
                continue;
            }
            let Some(&request) = queue.last() else { break };
            let resumed = parked.get(&request);
            let prompt =
                prefill_source(resumed.and_then(|a| a.resumed.as_ref()), &requests[request]);
            // The same prompt being prefilled in another slot (the --n samples of a prompt):
            // wait for it instead of feeding it again.
            // (A resumed sequence feeds its own.)
            let leader = (0..slots).find(|&l| {
                resumed.is_none()
                    && active[l]
                        .as_ref()
                        .is_some_and(|a| a.leads_prefill() && a.source(requests) == prompt)
            });
            if leader.is_none() && budget == 0 {
                break;
            }
            // A paged cache's blocks for what it prefills and its first new position, less its
            // leader's full prompt blocks, which it will share; it waits, in order, while they
            // are not free beyond the others' (and, but for the first one admitted, a margin of
            // the pool's: a sequence admitted into the last free block would only be preempted
            // again at its next block).
            let shared = leader.map_or(0, |_| prompt.len());
            let margin = match active.iter().any(Option::is_some) {
                true => cache.blocks().map_or(0, |blocks| blocks.div_ceil(100)),
                false => 0,
            };
            cache.clear(slot);
            if !cache.reserve(slot, prompt.len() + 1, shared, margin)? {
                break;
            }
            queue.pop();
            if leader.is_none() {
                let take = prompt.len().min(budget);
                until[slot] = Some(take);
                budget -= take;
            }
            admissions += 1;
            let state = match parked.remove(&request) {
                Some(state) => state,
                None => Active {
                    request,
                    rng: ChaCha8Rng::seed_from_u64(requests[request].seed),
                    tokens: Vec::new(),
                    logp: 0.0,
                    fed: 0,
                    pending: None,
                    follows: leader,
                    resumed: None,
                    admitted: 0,
                },
            };
            active[slot] = Some(Active {
                admitted: admissions,
                ..state
            });
        }
        let pending: Vec<[u32; 1]> = active
            .iter()
            .map(|a| [a.as_ref().and_then(|s| s.pending).unwrap_or(0)])
            .collect();
        // The resumed sequences' tokens, held apart from `active`, which the step updates.
        let resumed: Vec<Option<Arc<[u32]>>> = active
            .iter()
            .map(|a| a.as_ref().and_then(|a| a.resumed.clone()))
            .collect();
        let segments: Vec<Segment> = active
            .iter()
            .enumerate()
            .filter_map(|(slot, a)| {
                let a = a.as_ref()?;
                let source = prefill_source(resumed[slot].as_ref(), &requests[a.request]);
                let tokens: &[u32] = match (a.pending, until[slot]) {
                    (Some(_), _) => &pending[slot],
                    (None, Some(end)) => &source[a.fed..end],
                    (None, None) => return None,
                };
                Some(Segment { slot, tokens })
            })
            .collect();
        if segments.is_empty() {
            debug_assert!(
                active.iter().all(Option::is_none),
                "waiting slots with nothing fed"
            );
            break;
        }
        let finished = on_worker(|| -> Result<Vec<(usize, Generation)>> {
            let mut row_of = vec![usize::MAX; slots];
            for (row, segment) in segments.iter().enumerate() {
                row_of[segment.slot] = row;
            }
            // Which slots sample this step: those decoding, those whose prompt this step
            // completes, and the slots that follow those.
            let mut samples = vec![false; slots];
            for (slot, a) in active.iter_mut().enumerate() {
                let Some(a) = a.as_mut() else { continue };
                if a.pending.is_some() {
                    samples[slot] = true;
                } else if let Some(end) = until[slot] {
                    a.fed = end;
                    samples[slot] = end == a.source(requests).len();
                }
            }
            let mut copies = Vec::new();
            for (slot, a) in active.iter().enumerate() {
                if let Some(leader) = a.as_ref().and_then(|a| a.follows) {
                    if samples[leader] {
                        samples[slot] = true;
                        row_of[slot] = row_of[leader];
                        copies.push((leader, slot));
                    }
                }
            }
            let mut states: Vec<(usize, &mut Active)> = active
                .iter_mut()
                .enumerate()
                .filter(|(slot, _)| samples[*slot])
                .filter_map(|(slot, a)| Some((slot, a.as_mut()?)))
                .collect();
            let picks: Vec<(u32, f64)> = if cache.is_host() {
                let logits = model.feed(&segments, &mut cache)?;
                let width = logits.len() / segments.len();
                // Each sequence samples from its own row with its own random stream: in parallel.
                states
                    .par_iter_mut()
                    .map(|(slot, state)| {
                        let row = &logits[row_of[*slot] * width..(row_of[*slot] + 1) * width];
                        sample_token(row, params, &mut state.rng)
                    })
                    .collect()
            } else if states.is_empty() {
                // Only prompt chunks that complete no prompt: nothing to sample, and no
                // zero-row selection (a CUDA kernel launched over no elements fails).
                model.feed_tensor(&segments, &mut cache)?;
                Vec::new()
            } else {
                // On the logits' device; each sequence's uniform comes from its own stream.
                let logits = model.feed_tensor(&segments, &mut cache)?;
                let rows: Vec<u32> = states
                    .iter()
                    .map(|(slot, _)| row_of[*slot] as u32)
                    .collect();
                // A decoding step samples every row in order: no copy of the logits then.
                let every_row = rows.len() == logits.dim(0)?
                    && rows.iter().enumerate().all(|(i, &r)| r as usize == i);
                let logits = match every_row {
                    true => logits,
                    false => {
                        logits.index_select(&Tensor::new(rows.as_slice(), logits.device())?, 0)?
                    }
                };
                let uniforms: Vec<f64> = states
                    .iter_mut()
                    .map(|(_, state)| match params.temperature > 0.0 {
                        true => state.rng.random::<f64>(),
                        false => 0.0,
                    })
                    .collect();
                sample_rows(&logits, params, &uniforms)?
            };
            for &(leader, slot) in &copies {
                cache.copy_slot(leader, slot)?;
            }
            Ok(states
                .into_iter()
                .zip(picks)
                .filter_map(|((slot, state), pick)| {
                    state.follows = None;
                    Some((slot, advance(state, pick, params, stopping)?))
                })
                .collect())
        })?;
        for (slot, done) in finished {
            let state = active[slot].take().expect("a finished slot was active");
            // Its blocks, for the requests waiting on them.
            cache.clear(slot);
            on_finish(state.request, &done);
            results[state.request] = Some(done);
        }
    }
    Ok(Generated {
        generations: results
            .into_iter()
            .map(|r| r.expect("every request finishes"))
            .collect(),
        preemptions,
        recomputed_tokens,
    })
}

/// Runs `f` on a worker of rayon's pool. The kernels' parallel regions are then forked from a
/// worker, which works through the tasks itself while the others steal, instead of from a
/// thread that only waits for the pool: fewer wake-ups, and no stall when the machine is busy.
fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::join(f, || ()).0
    }
}

/// Takes the sampled token and its log-probability; returns the finished generation when it ends
/// here.
fn advance(
    state: &mut Active,
    (token, logp): (u32, f64),
    params: &SamplingParams,
    stopping: Stopping,
) -> Option<Generation> {
    state.tokens.push(token);
    state.logp += logp;
    state.pending = Some(token);
    let at_string = |tokens: &[u32]| stopping.strings.is_some_and(|s| s.end_here(tokens));
    let finish = if stopping.eos_ids.contains(&token) || at_string(&state.tokens) {
        Some(FinishReason::Stop)
    } else if state.tokens.len() >= params.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    finish.map(|finish| Generation {
        tokens: std::mem::take(&mut state.tokens),
        finish,
        logp: state.logp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_seeds_differ_by_key_and_sample() {
        let a = stream_seed(0, "p1", 0);
        assert_ne!(a, stream_seed(0, "p1", 1));
        assert_ne!(a, stream_seed(0, "p2", 0));
        assert_ne!(a, stream_seed(1, "p1", 0));
        assert_eq!(a, stream_seed(0, "p1", 0));
    }

    /// A sequence of request `request`, admitted `admitted`-th, decoding or still prefilling.
    fn active(request: usize, admitted: usize, decoding: bool) -> Option<Active> {
        Some(Active {
            request,
            rng: ChaCha8Rng::seed_from_u64(0),
            tokens: match decoding {
                true => vec![7],
                false => Vec::new(),
            },
            logp: 0.0,
            fed: 0,
            pending: decoding.then_some(7),
            follows: None,
            resumed: None,
            admitted,
        })
    }

    /// The sequence admitted last gives its blocks back, even when it is still prefilling and
    /// an older one decodes: the older one does not preempt itself for a newer one's promise.
    #[test]
    fn the_sequence_admitted_last_is_preempted_first() {
        let slots = [
            active(0, 1, true),
            None,
            active(1, 3, false),
            active(2, 2, true),
        ];
        assert_eq!(preemption_victim(&slots), Some(2));
        let slots = [active(0, 1, true), None, active(2, 2, true)];
        assert_eq!(preemption_victim(&slots), Some(2));
        assert_eq!(preemption_victim(&[None, None]), None);
    }

    /// A preempted sequence that has sampled keeps its tokens, log-probability and stream, and
    /// prefills its prompt and tokens when admitted again; one that has sampled nothing starts
    /// afresh.
    #[test]
    fn a_preempted_sequence_resumes_from_its_tokens() {
        let requests = [GenerationRequest {
            prompt_ids: vec![1, 2, 3],
            seed: 0,
        }];
        let mut decoding = active(0, 1, true).unwrap();
        decoding.tokens.push(9);
        decoding.logp = -1.5;
        decoding.fed = 3;
        let draw = decoding.rng.clone().random::<u64>();
        let parked = decoding.preempted(&requests).expect("it has sampled");
        assert_eq!(parked.source(&requests), [1, 2, 3, 7, 9]);
        assert_eq!((parked.fed, parked.pending, parked.logp), (0, None, -1.5));
        assert!(parked.leads_prefill());
        assert_eq!(parked.rng.clone().random::<u64>(), draw);
        assert!(active(0, 2, false).unwrap().preempted(&requests).is_none());
    }
}
