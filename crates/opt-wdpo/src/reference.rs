//! Reference log-probs: computed once before any update (or read from the pairs shard), and the
//! reference model itself when training needs it (HyPO samples online). `--reference-only`
//! computes them for a pairs shard (or a `--shard` of it) and writes it back with them, without
//! training: the pipeline's reference stage, split into jobs.

use crate::data::{read_pairs, TrainPair};
use crate::policy::{Policy, SideLogps};
use crate::Args;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use optune_model::Transformer;
use optune_shard::arrow::array::Float32Array;
use optune_shard::{col, Destination, OutputFormat, Shard};
use std::path::Path;
use std::sync::Arc;

/// Whether a reference model stays in memory through training: online sampling (HyPO) needs
/// one, unless the reference is the LoRA policy with its adapters off.
pub fn held_during_training(args: &Args, policy: &Policy) -> bool {
    args.loss.needs_reference()
        && args.loss.samples_online()
        && (is_separate(args) || policy.lora.is_none())
}

/// Whether `--ref` names a model other than the policy.
fn is_separate(args: &Args) -> bool {
    args.reference.as_ref().is_some_and(|r| *r != args.policy)
}

/// Fills the pairs' reference log-probs where the shard had none (`workers`, the other replicas
/// of --devices with the reference each holds through training, take shares of them), writes
/// them back with `--precompute-ref`, and returns the reference model when the objective samples
/// online (with LoRA and no separate `--ref`, the reference is the policy with its adapters off:
/// `None`). Reference-free objectives (SimPO, SFT) skip all of it.
pub fn prepare(
    args: &Args,
    policy: &Policy,
    workers: &[(Policy, Option<Transformer>)],
    shard: &Shard,
    pairs: &mut [TrainPair],
    device: &Device,
    dtype: DType,
) -> Result<Option<Transformer>> {
    if !args.loss.needs_reference() {
        return Ok(None);
    }
    let had_reference = pairs.iter().all(|p| p.ref_logps.is_some());
    let online = args.loss.samples_online();
    let separate = if !had_reference || online {
        separate_reference(args, policy, device, dtype)?
    } else {
        None
    };
    if !had_reference {
        // A replica that holds no reference through training loads `--ref` for this pass only.
        let loaded = workers
            .iter()
            .map(|(replica, held)| match held {
                Some(_) => Ok(None),
                None => separate_reference(args, replica, replica.model.device(), dtype),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut replicas = vec![(policy, separate.as_ref())];
        for ((replica, held), load) in workers.iter().zip(&loaded) {
            let model = match is_separate(args) {
                true => held.as_ref().or(load.as_ref()),
                false => None,
            };
            replicas.push((replica, model));
        }
        fill_missing(&replicas, pairs)?;
        if args.precompute_ref {
            // A file, not stdin (Args::validate).
            let Some(path) = args.input.as_ref() else {
                bail!("--precompute-ref needs the pairs as a file, not stdin");
            };
            write_with_reference(shard, pairs, path)?;
        }
    }
    if !held_during_training(args, policy) {
        return Ok(None);
    }
    match separate {
        Some(model) => Ok(Some(model)),
        None => held_model(args, policy, device, dtype),
    }
}

/// The reference model `policy` (a replica on `device`) holds through training, when
/// [`held_during_training`]: `--ref`, or without a separate one the policy's initial weights
/// (full fine-tuning changes the policy's own).
pub fn held_model(
    args: &Args,
    policy: &Policy,
    device: &Device,
    dtype: DType,
) -> Result<Option<Transformer>> {
    if !held_during_training(args, policy) {
        return Ok(None);
    }
    match separate_reference(args, policy, device, dtype)? {
        Some(model) => Ok(Some(model)),
        None => Ok(Some(
            optune_model::load_model(&args.policy, dtype, device)?.0,
        )),
    }
}

/// `--reference-only`: the pairs of the input (of its `--shard` slice, sorted by prompt_id), with
/// their reference log-probs, written to `-o`. Returns how many pairs.
pub fn write_only(args: &Args, device: &Device, dtype: DType) -> Result<usize> {
    let shard = Shard::read(args.input.as_deref())?;
    let shard = match args.shard {
        Some(slice) => {
            let rows = slice
                .rows(&shard.strings(col::PROMPT_ID)?)
                .with_context(|| shard.name().to_string())?;
            shard.take(&rows)?
        }
        None => shard,
    };
    let policy = Policy::load(args, device, dtype)?;
    let mut pairs = read_pairs(
        &shard,
        &policy.tokenizer,
        args.max_length,
        args.weight_col.as_deref(),
    )?;
    if pairs.iter().any(|p| p.ref_logps.is_none()) {
        let separate = separate_reference(args, &policy, device, dtype)?;
        fill_missing(&[(&policy, separate.as_ref())], &mut pairs)?;
    }
    write_with_reference(&shard, &pairs, &args.output)?;
    Ok(pairs.len())
}

/// The `--ref` model when it is not the policy, checked against the policy's vocabulary.
fn separate_reference(
    args: &Args,
    policy: &Policy,
    device: &Device,
    dtype: DType,
) -> Result<Option<Transformer>> {
    let Some(dir) = args.reference.as_ref().filter(|_| is_separate(args)) else {
        return Ok(None);
    };
    let (model, _, meta) = optune_model::load_model(dir, dtype, device)?;
    crate::policy::require_language_model(&model, "--ref", dir)?;
    if meta.config.vocab_size != policy.meta.config.vocab_size {
        bail!(
            "--ref {}: vocab_size {} differs from the policy's {}",
            dir.display(),
            meta.config.vocab_size,
            policy.meta.config.vocab_size
        );
    }
    Ok(Some(model))
}

/// Fills every pair's missing reference log-probs (summed over the response; the losses that
/// take per-token means divide by the response's length), the pairs dealt out in runs to the
/// `replicas`, each computing its run at once with its separate reference model, or its policy
/// with the adapters off. One pair (its chosen and rejected side) per forward pass: in a batch
/// of several pairs, a sum would change in its last bits with its batch mates (the padding, and
/// where its tokens sit in the batch's segment sum), so the values would depend on
/// --batch-size, on the pairs a `--shard` slice holds and on the replica count; a pair is never
/// split. (On 2 CPU cores this costs about a fifth more CPU time than batches of 4 pairs on
/// SmolLM2-135M.)
fn fill_missing(
    replicas: &[(&Policy, Option<&Transformer>)],
    pairs: &mut [TrainPair],
) -> Result<()> {
    let todo: Vec<usize> = (0..pairs.len())
        .filter(|&i| pairs[i].ref_logps.is_none())
        .collect();
    let progress = indicatif::ProgressBar::new(todo.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("opt-wdpo reference {bar:30} {pos}/{len} pairs")
            .expect("valid"),
    );
    let run = todo.len().div_ceil(replicas.len()).max(1);
    let runs: Vec<&[usize]> = todo.chunks(run).collect();
    let all: &[TrainPair] = pairs;
    let compute = |(policy, separate): (&Policy, Option<&Transformer>), run: &[usize]| {
        run.iter()
            .map(|&i| {
                let pair = &all[i];
                let value = match separate {
                    Some(model) => side_logps(model, pair, policy.pad_id),
                    None => {
                        policy.with_adapters_off(|| side_logps(&policy.model, pair, policy.pad_id))
                    }
                }?;
                progress.inc(1);
                Ok(value)
            })
            .collect::<Result<Vec<(f32, f32)>>>()
    };
    let values = std::thread::scope(|scope| {
        let others: Vec<_> = replicas
            .iter()
            .zip(&runs)
            .skip(1)
            .map(|(&replica, run)| {
                scope.spawn(move || {
                    optune_kernels::runtime::flush_denormals_on_this_thread();
                    compute(replica, run)
                })
            })
            .collect();
        let mut values = match runs.first() {
            Some(run) => compute(replicas[0], run)?,
            None => Vec::new(),
        };
        for other in others {
            let theirs = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            values.extend(theirs?);
        }
        anyhow::Ok(values)
    })?;
    for (&i, value) in todo.iter().zip(values) {
        pairs[i].ref_logps = Some(value);
    }
    progress.finish_and_clear();
    Ok(())
}

/// The summed log-probs of `pair`'s chosen and rejected responses under `model`.
fn side_logps(model: &Transformer, pair: &TrainPair, pad_id: u32) -> Result<(f32, f32)> {
    let (logps, _) = SideLogps::of(model, &[pair], pad_id, false)?;
    let (chosen, rejected) = logps.sides(false);
    let value = |t: &Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F32)?.to_vec1()?[0]) };
    Ok((value(chosen)?, value(rejected)?))
}

/// Writes `shard` with the pairs' reference log-probs as `ref_chosen_logp`/`ref_rejected_logp`
/// to `path` (atomically; the format by its extension).
fn write_with_reference(shard: &Shard, pairs: &[TrainPair], path: &Path) -> Result<()> {
    let side = |pick: fn((f32, f32)) -> f32| -> Float32Array {
        pairs
            .iter()
            .map(|p| pick(p.ref_logps.expect("computed")))
            .collect::<Vec<f32>>()
            .into()
    };
    let updated = shard
        .clone()
        .with_column("ref_chosen_logp", Arc::new(side(|(c, _)| c)))?
        .with_column("ref_rejected_logp", Arc::new(side(|(_, r)| r)))?;
    let destination = Destination::from_arg(Some(path));
    let format = OutputFormat::resolve(None, &destination)?;
    optune_shard::write_shard(&updated, &destination, format)
        .with_context(|| format!("writing {}", path.display()))
}
