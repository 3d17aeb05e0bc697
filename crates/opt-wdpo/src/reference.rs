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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether a reference model stays in memory through training: online sampling (HyPO) needs
/// one, unless the reference is the LoRA policy with its adapters off.
fn held_during_training(args: &Args) -> bool {
    args.loss.needs_reference()
        && args.loss.samples_online()
        && (is_separate(args) || args.lora_rank.is_none())
}

/// Where a reference model other than the policy is held, for the memory plan: through
/// training, or a separate `--ref` for the pass that fills the pairs' missing log-probs.
pub fn held(args: &Args, pairs: &[TrainPair]) -> crate::memory::ReferenceHeld {
    use crate::memory::ReferenceHeld;
    let missing = pairs.iter().any(|p| p.ref_logps.is_none());
    if held_during_training(args) {
        ReferenceHeld::ThroughTraining
    } else if args.loss.needs_reference() && is_separate(args) && missing {
        ReferenceHeld::ForThePass
    } else {
        ReferenceHeld::Never
    }
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
        let mut replicas = vec![(policy, PassReference::of(args, dtype, separate.as_ref()))];
        for (replica, held) in workers {
            replicas.push((replica, PassReference::of(args, dtype, held.as_ref())));
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
    if !held_during_training(args) {
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
    if !held_during_training(args) {
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
    let policy = Policy::load(args, device, dtype, crate::policy::ReplicaOf::ONLY)?;
    let mut pairs = read_pairs(
        &shard,
        &policy.tokenizer,
        args.max_length,
        args.weight_col.as_deref(),
    )?;
    if pairs.iter().any(|p| p.ref_logps.is_none()) {
        let separate = separate_reference(args, &policy, device, dtype)?;
        let source = match &separate {
            Some(model) => PassReference::Model(model),
            None => PassReference::AdaptersOff,
        };
        fill_missing(&[(&policy, source)], &mut pairs)?;
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

/// Where a replica takes its reference from in the reference pass.
enum PassReference<'m> {
    /// The policy itself, with its LoRA adapters off (without LoRA, the untrained policy).
    AdaptersOff,
    /// A separate `--ref` model already loaded on the replica's device.
    Model(&'m Transformer),
    /// `--ref`, loaded on the replica's device for the pass, by its own thread.
    Load(&'m Args, DType),
}

impl<'m> PassReference<'m> {
    /// A replica's reference for the pass, given the model it holds through training, if any.
    fn of(args: &'m Args, dtype: DType, held: Option<&'m Transformer>) -> Self {
        match (is_separate(args), held) {
            (false, _) => PassReference::AdaptersOff,
            (true, Some(model)) => PassReference::Model(model),
            // A replica that holds no reference through training loads `--ref` for the pass.
            (true, None) => PassReference::Load(args, dtype),
        }
    }
}

/// Fills every pair's missing reference log-probs (summed over the response; the losses that
/// take per-token means divide by the response's length), the pairs dealt out in runs to the
/// `replicas` ([`in_runs`]), each with its reference. One pair (its chosen and rejected side) per
/// forward pass: in a batch of several pairs, a sum would change in its last bits with its batch
/// mates (the padding, and where its tokens sit in the batch's segment sum), so the values would
/// depend on --batch-size, on the pairs a `--shard` slice holds and on the replica count; a pair
/// is never split. (On 2 CPU cores this costs about a fifth more CPU time than batches of 4
/// pairs on SmolLM2-135M.)
fn fill_missing(replicas: &[(&Policy, PassReference)], pairs: &mut [TrainPair]) -> Result<()> {
    let todo: Vec<usize> = (0..pairs.len())
        .filter(|&i| pairs[i].ref_logps.is_none())
        .collect();
    let progress = indicatif::ProgressBar::new(todo.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("opt-wdpo reference {bar:30} {pos}/{len} pairs")
            .expect("valid"),
    );
    let all: &[TrainPair] = pairs;
    let values = in_runs(replicas, &todo, |(policy, source), run, stop| {
        let loaded = match source {
            PassReference::Load(args, dtype) => {
                separate_reference(args, policy, policy.model.device(), *dtype)?
            }
            _ => None,
        };
        let separate = match source {
            PassReference::Model(model) => Some(*model),
            _ => loaded.as_ref(),
        };
        let mut values = Vec::with_capacity(run.len());
        for &i in run {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let pair = &all[i];
            values.push(match separate {
                Some(model) => side_logps(model, pair, policy.pad_id)?,
                None => {
                    policy.with_adapters_off(|| side_logps(&policy.model, pair, policy.pad_id))?
                }
            });
            progress.inc(1);
        }
        Ok(values)
    })?;
    for (&i, value) in todo.iter().zip(values) {
        pairs[i].ref_logps = Some(value);
    }
    progress.finish_and_clear();
    Ok(())
}

/// Runs `work` over `items` dealt out in contiguous runs, the first run to the first worker and
/// so on (a worker left without a run idles), each on a thread of its own
/// ([`crate::parallel::on_each`]); returns the results in the order of `items`. A failure sets the flag `work`
/// is given, for the others to stop at their next item, and is returned once every worker has
/// ended (the first failure in worker order; a panic is raised again).
fn in_runs<W: Sync, T: Send>(
    workers: &[W],
    items: &[usize],
    work: impl Fn(&W, &[usize], &AtomicBool) -> Result<Vec<T>> + Sync,
) -> Result<Vec<T>> {
    let run = items.len().div_ceil(workers.len().max(1)).max(1);
    let runs: Vec<&[usize]> = items.chunks(run).collect();
    let stop = AtomicBool::new(false);
    let attempt = |worker: &W, run: &[usize]| {
        let done = work(worker, run, &stop);
        if done.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        done
    };
    let mut busy: Vec<(&W, &[usize])> = workers.iter().zip(runs).collect();
    let results = crate::parallel::on_each(&mut busy, |_, (worker, run)| attempt(worker, run));
    let mut values = Vec::with_capacity(items.len());
    for result in results {
        values.extend(result?);
    }
    anyhow::ensure!(
        values.len() == items.len(),
        "{} results for {} items",
        values.len(),
        items.len()
    );
    Ok(values)
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

#[cfg(test)]
mod tests {
    use super::in_runs;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Each worker tags what it did: the runs are contiguous, dealt out in order, and their
    /// results come back in the order of the items, with more workers than items too.
    #[test]
    fn runs_are_dealt_out_in_order_and_joined_in_order() {
        let items: Vec<usize> = (10..18).collect();
        for workers in [1, 3, 8, 11] {
            let ids: Vec<usize> = (0..workers).collect();
            let tagged = in_runs(&ids, &items, |&id, run, _: &AtomicBool| {
                Ok(run.iter().map(|&item| (id, item)).collect())
            })
            .unwrap();
            let order: Vec<usize> = tagged.iter().map(|&(_, item)| item).collect();
            assert_eq!(order, items, "{workers} workers");
            let run = items.len().div_ceil(workers);
            for (k, &(id, _)) in tagged.iter().enumerate() {
                assert_eq!(id, k / run, "{workers} workers: item {k}");
            }
        }
        let none = in_runs(&[0, 1], &[], |_, run: &[usize], _: &AtomicBool| {
            Ok(run.to_vec())
        });
        assert_eq!(none.unwrap(), Vec::<usize>::new());
    }

    /// A worker's failure is returned after the others have stopped at their next item, and a
    /// worker that returns short is an error, not a shifted mapping.
    #[test]
    fn a_failure_stops_the_other_workers_and_is_returned() {
        let items: Vec<usize> = (0..400).collect();
        let done = AtomicUsize::new(0);
        let result = in_runs(&[0, 1], &items, |&id, run, stop: &AtomicBool| {
            if id == 0 {
                anyhow::bail!("worker 0 failed");
            }
            let mut out = Vec::new();
            for &item in run {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                done.fetch_add(1, Ordering::Relaxed);
                out.push(item);
            }
            Ok(out)
        });
        assert_eq!(result.unwrap_err().to_string(), "worker 0 failed");
        assert!(
            done.load(Ordering::Relaxed) < 200,
            "worker 1 ran its whole run"
        );
        let short = in_runs(&[0, 1], &items, |_, run: &[usize], _: &AtomicBool| {
            Ok(run[1..].to_vec())
        });
        assert!(short
            .unwrap_err()
            .to_string()
            .contains("398 results for 400 items"));
    }
}
