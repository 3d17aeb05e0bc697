//! Reference log-probs: computed once before any update (or read from the pairs shard), and the
//! reference model itself when training needs it (HyPO samples online).

use crate::data::TrainPair;
use crate::policy::{Policy, SideLogps};
use crate::Args;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use optune_model::Transformer;
use optune_shard::arrow::array::Float32Array;
use optune_shard::{Destination, Shard};
use std::sync::Arc;

/// Fills the pairs' reference log-probs where the shard had none, writes them back with
/// `--precompute-ref`, and returns the reference model when the objective samples online (with
/// LoRA and no separate `--ref`, the reference is the policy with its adapters off: `None`).
pub fn prepare(
    args: &Args,
    policy: &Policy,
    shard: &Shard,
    pairs: &mut [TrainPair],
    device: &Device,
) -> Result<Option<Transformer>> {
    let had_reference = pairs.iter().all(|p| p.ref_logps.is_some());
    let online = args.loss.samples_online();
    let use_means = args.loss.pair_loss().uses_mean_logps();
    let separate = args.reference.as_ref().filter(|r| **r != args.policy);
    let mut reference_model = None;
    if !had_reference || online {
        match separate {
            Some(dir) => {
                let (model, _, meta) = optune_model::load_model(dir, DType::F32, device)?;
                if meta.config.vocab_size != policy.meta.config.vocab_size {
                    bail!(
                        "--ref {}: vocab_size {} differs from the policy's {}",
                        dir.display(),
                        meta.config.vocab_size,
                        policy.meta.config.vocab_size
                    );
                }
                fill(&model, pairs, policy.pad_id, use_means, args.batch_size)?;
                reference_model = Some(model);
            }
            None => {
                policy.with_adapters_off(|| {
                    fill(&policy.model, pairs, policy.pad_id, use_means, args.batch_size)
                })?;
                // Online sampling with full fine-tuning needs the initial weights at train time.
                if online && policy.lora.is_none() {
                    let (model, _, _) = optune_model::load_model(&args.policy, DType::F32, device)?;
                    reference_model = Some(model);
                }
            }
        }
    }
    // IPO's reference values are per-token means, which the columns do not hold.
    if args.precompute_ref && !had_reference && !use_means {
        write_columns(args, shard, pairs)?;
    }
    Ok(reference_model.filter(|_| online))
}

/// Fills every pair's missing reference log-probs (summed, or per-token means) with `model`.
fn fill(
    model: &Transformer,
    pairs: &mut [TrainPair],
    pad_id: u32,
    use_means: bool,
    batch: usize,
) -> Result<()> {
    let progress = indicatif::ProgressBar::new(pairs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("opt-wdpo reference {bar:30} {pos}/{len} pairs")
            .expect("valid"),
    );
    let todo: Vec<usize> = (0..pairs.len())
        .filter(|&i| pairs[i].ref_logps.is_none())
        .collect();
    for chunk in todo.chunks(batch.max(1)) {
        let batch_pairs: Vec<&TrainPair> = chunk.iter().map(|&i| &pairs[i]).collect();
        let logps = SideLogps::of(model, &batch_pairs, pad_id)?;
        let (c, r) = logps.sides(use_means);
        let (c, r): (Vec<f32>, Vec<f32>) = (c.to_vec1()?, r.to_vec1()?);
        for (k, &i) in chunk.iter().enumerate() {
            pairs[i].ref_logps = Some((c[k], r[k]));
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(())
}

/// Writes the reference log-probs into the pairs file (atomically), so later runs skip them.
fn write_columns(args: &Args, shard: &Shard, pairs: &[TrainPair]) -> Result<()> {
    let Some(path) = args.input.as_ref().filter(|p| p.as_os_str() != "-") else {
        bail!("--precompute-ref needs the pairs as a file, not stdin");
    };
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
    let format = optune_shard::OutputFormat::resolve(None, &destination)?;
    optune_shard::write_shard(&updated, &destination, format)
        .with_context(|| format!("writing {}", path.display()))
}
