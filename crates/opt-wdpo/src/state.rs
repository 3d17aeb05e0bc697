//! The training state: what `--save-steps N` and SIGTERM/SIGINT keep beside the output, and what
//! the same command run again resumes from, to the bit.
//!
//! `OUT_DIR.state/` holds, for the last saved step K, `trainable-K.safetensors` (the trained
//! weights: the LoRA adapters, or every weight), `optimizer-K.safetensors` (moments, step count;
//! [`Optimizer::save_state`]) and `state.json`, written last and renamed into place, which names
//! K and holds the rest: the run's fingerprint, the position in the data order (which fixes the
//! LoRA dropout masks), the reference log-probs, the tokens so far and the metrics rows. A kill at
//! any moment leaves the previous `state.json` and its files whole. The directory is removed once
//! the checkpoint is written.

use crate::data::TrainPair;
use crate::metrics::MetricsRow;
use crate::policy::Policy;
use crate::Args;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use optune_resume::{file_stamps, Digest, Fingerprint};
use optune_train::optim::Optimizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// 2 since the LoRA dropout stream became counter-based (2026-12-01): a position saved by format 1
/// counted a ChaCha stream's words, which would resume silently under other masks. 3 since pairs
/// whose sides are the same tokens are dropped (2026-12-02): a format-2 state's run trained on
/// them, and would resume with another data order. 4 since each micro-batch's dropout masks
/// start at a place of their own in the stream (data parallel, 2026-12-02): a format-3 run drew
/// them one after the other, and kept the stream's position, which this one neither keeps nor
/// reads.
const FORMAT: u32 = 4;

/// Where training stands after an optimiser step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Optimiser steps done.
    pub step: u64,
    /// The epoch and the index of its next micro-batch.
    pub epoch: usize,
    pub batch: usize,
    /// Micro-batches run since the start: where the next one's LoRA dropout masks start.
    pub micro: usize,
}

/// `state.json`.
#[derive(Serialize, Deserialize)]
pub struct Saved {
    format: u32,
    fingerprint: Fingerprint,
    pub position: Position,
    /// Response tokens trained on so far.
    pub tokens: usize,
    /// Each pair's reference log-probs (chosen, rejected), in input order; none for the
    /// objectives that read none.
    reference: Option<Vec<(f32, f32)>>,
    pub metrics: Vec<MetricsRow>,
}

/// The state directory of the checkpoint `output`: `OUT_DIR.state`.
pub fn dir_of(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}

/// What fixes the trained weights: a state is resumed only by a run with the same. The pairs'
/// digest covers the input's pairs as tokens (so --max-length and the chat template), their
/// reward gaps and --weight-col weights; reference log-probs read from the input are left out,
/// since --precompute-ref writes them into it (the state keeps its own). --threads, --metrics,
/// --save-steps, --save-adapter, --precompute-ref and --memory-budget do not change the weights
/// and may differ; so may --gradient-checkpointing (a run that ran out of memory resumes with
/// it), which changes them only by the rounding of a tied embedding's gradient on the generic
/// kernels (its two parts are summed in another order).
pub fn fingerprint(
    args: &Args,
    device: &Device,
    dtype: DType,
    pairs: &[TrainPair],
) -> Result<Fingerprint> {
    let mut digest = Digest::new();
    for pair in pairs {
        for side in [&pair.chosen, &pair.rejected] {
            digest.u32s(&side.prompt).u32s(&side.response);
        }
        digest.u64(pair.reward_gap.to_bits() as u64);
        digest.u64(pair.given_weight.map_or(u64::MAX, f64::to_bits));
    }
    let reference = match &args.reference {
        Some(dir) => format!("{} ({})", dir.display(), file_stamps(dir)?),
        None => "the policy".to_string(),
    };
    Ok(Fingerprint::new()
        .with("--policy", args.policy.display())
        .with("the policy's files", file_stamps(&args.policy)?)
        .with("--ref", reference)
        .with(
            "the pairs (input, --max-length, template)",
            format!("{} pairs, {}", pairs.len(), digest.hex()),
        )
        .with("--loss", format!("{:?}", args.loss))
        .with("--beta", args.beta)
        .with("--simpo-gamma", args.simpo_gamma)
        .with("--rpo-alpha", args.rpo_alpha)
        .with("--label-smoothing", args.label_smoothing)
        .with("--weight", format!("{:?}", args.weight))
        .with("--beta2", args.beta2)
        .with("--weight-norm", format!("{:?}", args.weight_norm))
        .with("--weight-col", format!("{:?}", args.weight_col))
        .with("--kl-coef", args.kl_coef)
        .with("--kl-samples", args.kl_samples)
        .with("--kl-max-new-tokens", args.kl_max_new_tokens)
        .with("--lora-rank", format!("{:?}", args.lora_rank))
        .with("--lora-alpha", args.lora_alpha)
        .with("--lora-dropout", args.lora_dropout)
        .with("--lora-targets", args.lora_targets.join(","))
        .with("--optimizer", format!("{:?}", args.optimizer))
        .with("--lr", args.lr)
        .with("--weight-decay", args.weight_decay)
        .with("--warmup-ratio", args.warmup_ratio)
        .with("--schedule", format!("{:?}", args.schedule))
        .with("--epochs", args.epochs)
        .with("--max-steps", format!("{:?}", args.max_steps))
        .with("--batch-size", args.batch_size)
        .with("--grad-accum", args.grad_accum)
        .with("--max-grad-norm", args.max_grad_norm)
        .with("--seed", args.seed)
        .with("--device", format!("{:?}", device.location()))
        .with("--devices (replicas)", args.devices.len().max(1))
        .with("--dtype", optune_cli::runtime::precision(device, dtype))
        .with(
            "--kernels",
            optune_kernels::autograd_path(device, dtype).name(),
        ))
}

/// The state a killed or interrupted run with this fingerprint left beside `output`, if any.
/// A state of another run is an error naming the values that differ.
pub fn load(output: &Path, fingerprint: &Fingerprint) -> Result<Option<Saved>> {
    let dir = dir_of(output);
    let path = dir.join("state.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("{}: cannot read", path.display())),
    };
    let saved: Saved = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a training state (delete {} to start over)",
            path.display(),
            dir.display()
        )
    })?;
    if saved.format != FORMAT {
        bail!(
            "{}: training state format {} (this build writes {FORMAT}); delete {} to start over",
            path.display(),
            saved.format,
            dir.display()
        );
    }
    fingerprint.check(&saved.fingerprint, &dir)?;
    Ok(Some(saved))
}

impl Saved {
    /// Sets the pairs' reference log-probs to the ones the state's run used.
    pub fn fill_reference(&self, pairs: &mut [TrainPair]) -> Result<()> {
        let Some(reference) = &self.reference else {
            return Ok(());
        };
        if reference.len() != pairs.len() {
            bail!(
                "the training state holds {} reference log-probs for {} pairs",
                reference.len(),
                pairs.len()
            );
        }
        for (pair, &logps) in pairs.iter_mut().zip(reference) {
            pair.ref_logps = Some(logps);
        }
        Ok(())
    }

    /// Puts the trained weights and the optimiser where the state's run had them.
    /// Puts the saved trained weights into their owners among `replicas` (all of --devices, in
    /// order; the owners send them to the others) and the moments into `optimizer`.
    pub fn restore(
        &self,
        output: &Path,
        replicas: &[&Policy],
        optimizer: &mut Optimizer,
    ) -> Result<()> {
        let dir = dir_of(output);
        let step = self.position.step;
        let weights_path = dir.join(format!("trainable-{step}.safetensors"));
        // SAFETY: the state's files are written beside and renamed into place (`save`), never
        // changed in place, so the mapped file does not change under the map.
        let weights = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights_path) }
            .with_context(|| format!("{}: cannot read", weights_path.display()))?;
        let first = replicas[0];
        for (k, ((name, _), &owner)) in first.trainable.iter().zip(&first.owners).enumerate() {
            let var = &replicas[owner].trainable[k].1;
            let saved = weights
                .load(name, var.device())
                .with_context(|| format!("{}: no weight {name}", weights_path.display()))?;
            var.set(&saved)
                .with_context(|| format!("{}: weight {name}", weights_path.display()))?;
        }
        optimizer.load_state(&dir.join(format!("optimizer-{step}.safetensors")))?;
        Ok(())
    }
}

/// Writes the state of a run at `position` into `OUT_DIR.state` (see the module's comment for
/// the order that keeps it whole through a kill).
#[allow(clippy::too_many_arguments)]
pub fn save(
    output: &Path,
    fingerprint: &Fingerprint,
    position: Position,
    tokens: usize,
    replicas: &[&Policy],
    optimizer: &Optimizer,
    pairs: &[TrainPair],
    metrics: &[MetricsRow],
) -> Result<()> {
    let dir = dir_of(output);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let step = position.step;
    let weights = replicas[0].masters(&replicas[1..]);
    let weights_path = dir.join(format!("trainable-{step}.safetensors"));
    let partial = dir.join(format!("trainable-{step}.safetensors.partial"));
    candle_core::safetensors::save(&weights, &partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &weights_path)?;
    optimizer.save_state(&dir.join(format!("optimizer-{step}.safetensors")))?;
    let saved = Saved {
        format: FORMAT,
        fingerprint: fingerprint.clone(),
        position,
        tokens,
        reference: pairs.iter().map(|p| p.ref_logps).collect(),
        metrics: metrics.to_vec(),
    };
    let state = dir.join("state.json");
    let partial = dir.join("state.json.partial");
    std::fs::write(&partial, serde_json::to_vec(&saved)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &state)
        .with_context(|| format!("moving {} to {}", partial.display(), state.display()))?;
    // The earlier steps' files are superseded now.
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let current = [
            "state.json".to_string(),
            format!("trainable-{step}.safetensors"),
            format!("optimizer-{step}.safetensors"),
        ];
        if !current.contains(&name) {
            std::fs::remove_file(dir.join(&name))?;
        }
    }
    Ok(())
}

/// Removes the state once the checkpoint is complete.
pub fn remove(output: &Path) -> Result<()> {
    let dir = dir_of(output);
    match std::fs::remove_dir_all(&dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// SIGTERM (how Slurm preempts a job) and SIGINT (Ctrl-C) while training: the first one asks for
/// a state at the next step boundary and an exit; a second one ends the process at once.
pub struct Interrupts {
    signal: Arc<AtomicUsize>,
}

impl Interrupts {
    pub fn register() -> Result<Interrupts> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let signal = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicBool::new(false));
        for number in [SIGTERM, SIGINT] {
            // The shutdown check runs before the flag is set, so only a second signal exits.
            signal_hook::flag::register_conditional_shutdown(number, 1, Arc::clone(&seen))?;
            signal_hook::flag::register(number, Arc::clone(&seen))?;
            signal_hook::flag::register_usize(number, Arc::clone(&signal), number as usize)?;
        }
        Ok(Interrupts { signal })
    }

    /// The signal that arrived, if one did: `SIGTERM` or `SIGINT`.
    pub fn received(&self) -> Option<&'static str> {
        match self.signal.load(Ordering::Relaxed) as i32 {
            0 => None,
            signal_hook::consts::SIGTERM => Some("SIGTERM"),
            _ => Some("SIGINT"),
        }
    }
}
