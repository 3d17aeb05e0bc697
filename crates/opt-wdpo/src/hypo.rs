//! HyPO's KL term on fresh samples: k responses per prompt of the batch from the current policy,
//! scored by the policy (with gradient) and the reference (without).

use crate::data::TrainPair;
use crate::policy::{policy_logprobs, Policy};
use crate::Args;
use anyhow::{bail, Result};
use candle_core::Tensor;
use optune_model::generate::{generate, stream_seed, GenerationRequest, SamplingParams, Stopping};
use optune_model::{sequence_logprobs, RecomputedPass, TokenizedPair, Transformer};
use optune_train::loss::loo_reinforce_kl;

/// The surrogate whose gradient estimates ∇KL(π‖π_ref), the KL estimate for the log, and with
/// --gradient-checkpointing the pass whose blocks the backward pass runs again.
/// `reference` is `None` when the reference is the policy with its LoRA adapters off.
pub fn kl_term<'m>(
    args: &Args,
    policy: &'m Policy,
    reference: Option<&Transformer>,
    batch: &[&TrainPair],
    epoch: usize,
    step: usize,
) -> Result<(Tensor, f32, Option<RecomputedPass<'m>>)> {
    let k = args.kl_samples;
    let mut requests = Vec::with_capacity(batch.len() * k);
    for (i, pair) in batch.iter().enumerate() {
        for s in 0..k {
            let key = format!("hypo/{epoch}/{step}/{i}");
            requests.push(GenerationRequest {
                prompt_ids: pair.chosen.prompt.clone(),
                seed: stream_seed(args.seed, &key, s as u32),
            });
        }
    }
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: None,
        min_p: 0.0,
        max_new_tokens: args.kl_max_new_tokens,
    };
    policy.set_training(false);
    let samples = generate(
        &policy.model,
        &requests,
        &params,
        Stopping::eos(&policy.meta.eos_token_ids),
        args.batch_size * k,
        |_, _| {},
    )?
    .generations;
    let sequences: Vec<TokenizedPair> = requests
        .iter()
        .zip(&samples)
        .map(|(r, g)| TokenizedPair {
            prompt: r.prompt_ids.clone(),
            response: g.tokens.clone(),
        })
        .collect();
    let reference_logps: Vec<f32> = match (reference, &policy.lora) {
        (Some(model), _) => sequence_logprobs(model, &sequences, policy.pad_id)?
            .sums
            .to_vec1()?,
        (None, Some(_)) => policy.with_adapters_off(|| {
            Ok(sequence_logprobs(&policy.model, &sequences, policy.pad_id)?
                .sums
                .detach()
                .to_vec1()?)
        })?,
        (None, None) => bail!("HyPO needs a reference model"),
    };
    policy.set_training(true);
    let (policy_logps, pass) = policy_logprobs(
        &policy.model,
        &sequences,
        policy.pad_id,
        args.gradient_checkpointing,
    )?;
    let (surrogate, estimate) = loo_reinforce_kl(&policy_logps.sums, &reference_logps, k)?;
    Ok((surrogate, estimate, pass))
}
