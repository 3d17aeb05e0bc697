//! The policy being trained: its weights (variables for full fine-tuning, LoRA adapters
//! otherwise), tokenizer and checkpoint metadata, and the summed log-probs of pair sides.

use crate::data::TrainPair;
use crate::Args;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use optune_model::lora::{attach_lora, LoraAdapters};
use optune_model::{
    sequence_logprobs, sequence_logprobs_recomputed, ChatTokenizer, Checkpoint, CheckpointMeta,
    OutputHead, RecomputedPass, SequenceLogprobs, StoredWeights, TokenizedPair, Transformer,
};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Which of the `count` replicas of --devices a policy is (0 and 1 without --devices).
#[derive(Clone, Copy, Debug)]
pub struct ReplicaOf {
    pub index: usize,
    pub count: usize,
}

impl ReplicaOf {
    pub const ONLY: ReplicaOf = ReplicaOf { index: 0, count: 1 };
}

pub struct Policy {
    /// Computes in the run's dtype (`--dtype`); with full fine-tuning in bf16/f16 its weights are
    /// casts of the f32 masters in `trainable` that this replica owns, renewed after each
    /// optimiser step, and the other replicas' weights themselves.
    pub model: Transformer,
    pub tokenizer: ChatTokenizer,
    pub meta: CheckpointMeta,
    /// Each trainable variable once, sorted by name: f32, but for full fine-tuning in bf16/f16
    /// the weights another replica owns, which are the model's own compute-dtype weights (the
    /// owner keeps the f32 master, the moments and the gradients' sum).
    pub trainable: Vec<(String, Var)>,
    /// The replica owning each of `trainable` ([`crate::parallel::owners`]); alike on every
    /// replica.
    pub owners: Vec<usize>,
    pub lora: Option<LoraAdapters>,
    pub pad_id: u32,
    /// Under LoRA computed in a dtype that is neither f32 nor the checkpoint's own: `--policy`'s
    /// weights as stored, opened at the start (the save merges the adapters into them, and a
    /// policy deleted or replaced since cannot change what is merged into) with the saved dtype.
    stored_base: Option<(StoredWeights, DType)>,
}

impl Policy {
    /// Loads the policy to compute in `dtype`, as `replica` of --devices. Trainable weights (all
    /// of them, or the LoRA adapters) are f32 variables, and so are their gradients and
    /// optimiser moments, but for full fine-tuning in bf16/f16 those another replica owns;
    /// frozen weights exist in `dtype` only.
    pub fn load(args: &Args, device: &Device, dtype: DType, replica: ReplicaOf) -> Result<Self> {
        let full_finetune = args.lora_rank.is_none();
        // Each weight comes off disk in the dtype it is kept in (f32 masters for full
        // fine-tuning, the compute dtype when frozen), so no stored-dtype copy of the model is
        // ever held whole.
        let stored = if full_finetune { DType::F32 } else { dtype };
        let mut checkpoint = Checkpoint::read_as(&args.policy, device, stored)?;
        args.chat_template.apply_to(&mut checkpoint.tokenizer)?;
        // Full fine-tuning in bf16/f16: the weights other replicas own (as `trainable` will list
        // them) keep no f32 master here.
        let masters_with_owners = full_finetune && dtype != DType::F32;
        let mut sizes: Vec<(&String, usize)> = (checkpoint.tensors.iter())
            .map(|(name, t)| (name, t.elem_count()))
            .collect();
        sizes.sort();
        let elements: Vec<usize> = sizes.iter().map(|(_, n)| *n).collect();
        let owned_elsewhere: HashSet<String> = (sizes.iter())
            .zip(crate::parallel::owners(&elements, replica.count))
            .filter(|(_, owner)| masters_with_owners && *owner != replica.index)
            .map(|((name, _), _)| (*name).clone())
            .collect();
        let mut trainable = Vec::new();
        let tensors: HashMap<String, Tensor> = checkpoint
            .tensors
            .into_iter()
            .map(|(name, t)| {
                if owned_elsewhere.contains(&name) {
                    // This replica trains the compute weight itself.
                    let var = Var::from_tensor(&t.to_dtype(dtype)?)?;
                    trainable.push((name.clone(), var.clone()));
                    Ok((name, var.as_tensor().clone()))
                } else if full_finetune {
                    let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                    trainable.push((name.clone(), var.clone()));
                    // In f32 this is the variable itself (the model keeps its identity).
                    Ok((name, var.as_tensor().to_dtype(dtype)?))
                } else {
                    Ok((name, t.to_dtype(dtype)?))
                }
            })
            .collect::<Result<_>>()?;
        let mut model = Transformer::from_weights(&checkpoint.meta.config, tensors, dtype, device)?;
        require_language_model(&model, "--policy", &args.policy)?;
        let lora = match args.lora_config() {
            Some(config) => {
                let adapters = attach_lora(&mut model, &config, args.seed)?;
                trainable = adapters.vars.clone();
                Some(adapters)
            }
            None => None,
        };
        // By name: the owners of --devices deal out runs of this order.
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
        let trainable = dedup_vars(trainable);
        let elements: Vec<usize> = trainable.iter().map(|(_, v)| v.elem_count()).collect();
        let owners = crate::parallel::owners(&elements, replica.count);
        // The checkpoint's list decided above which weights keep no master here; it must be the
        // list the owners are dealt from.
        for ((name, _), owner) in trainable.iter().zip(&owners) {
            anyhow::ensure!(
                owned_elsewhere.contains(name) == (masters_with_owners && *owner != replica.index),
                "{name}: trained as replica {} of {} without the master its owner {owner} keeps",
                replica.index,
                replica.count
            );
        }
        let saved = optune_model::saved_dtype(&checkpoint.meta).unwrap_or(dtype);
        let stored_base = match lora.is_some() && dtype != DType::F32 && dtype != saved {
            true => Some((StoredWeights::open(&args.policy)?, saved)),
            false => None,
        };
        let pad_id = checkpoint
            .tokenizer
            .pad_token_id()
            .or(checkpoint.meta.config.pad_token_id())
            .or(checkpoint.meta.eos_token_ids.first().copied())
            .unwrap_or(0);
        Ok(Policy {
            model,
            tokenizer: checkpoint.tokenizer,
            meta: checkpoint.meta,
            trainable,
            owners,
            lora,
            pad_id,
            stored_base,
        })
    }

    /// After an optimiser step: the compute weights of full fine-tuning in bf16/f16 are casts of
    /// the f32 masters, taken again (in f32 the model holds the variables themselves, and LoRA
    /// casts its adapters in every forward pass).
    pub fn refresh_compute_weights(&mut self) -> Result<()> {
        if self.lora.is_some() || self.model.dtype() == DType::F32 {
            return Ok(());
        }
        // The weights other replicas own are the model's own (set by their owners).
        let masters: HashMap<&str, &Var> = (self.trainable.iter())
            .filter(|(_, v)| v.dtype() == DType::F32)
            .map(|(n, v)| (n.as_str(), v))
            .collect();
        let dtype = self.model.dtype();
        self.model
            .map_weights(&mut |name, current| match masters.get(name) {
                Some(master) => master.as_tensor().to_dtype(dtype),
                None => Ok(current.clone()),
            })?;
        Ok(())
    }

    /// The trained weights by name, each its owner's (an f32 master where this replica computes
    /// with a cast, or trains the compute weight of another's master). `workers`: the other
    /// replicas of --devices, in order.
    pub fn masters(&self, workers: &[&Policy]) -> HashMap<String, Tensor> {
        (self.trainable.iter().zip(&self.owners).enumerate())
            .map(|(k, ((name, var), &owner))| {
                let var = match owner {
                    0 => var,
                    _ => &workers[owner - 1].trainable[k].1,
                };
                (name.clone(), var.as_tensor().clone())
            })
            .collect()
    }

    /// Where the checkpoint's weights come from: see [`CheckpointBases`]. `workers`: as for
    /// [`Policy::masters`].
    pub fn checkpoint_bases(&self, workers: &[&Policy]) -> CheckpointBases<'_> {
        match (&self.lora, &self.stored_base) {
            (None, _) => CheckpointBases::Masters(self.masters(workers)),
            (Some(_), Some((stored, dtype))) => CheckpointBases::Stored(stored, *dtype),
            (Some(_), None) => CheckpointBases::Model,
        }
    }

    /// Runs `f` with the LoRA adapters off (the base model: the reference), then turns them back on.
    pub fn with_adapters_off<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if let Some(lora) = &self.lora {
            lora.set_enabled(false);
        }
        let out = f();
        if let Some(lora) = &self.lora {
            lora.set_enabled(true);
        }
        out
    }

    /// LoRA dropout on (training) or off (sampling, saving); nothing without LoRA.
    pub fn set_training(&self, on: bool) {
        if let Some(lora) = &self.lora {
            lora.set_training(on);
        }
    }
}

/// The weights a checkpoint is made from in place of the model's compute weights.
pub enum CheckpointBases<'a> {
    /// The model's own (an f32 run, or LoRA computed in the checkpoint's dtype).
    Model,
    /// Full fine-tuning's f32 masters, by name (in bf16 the model computes with their rounded
    /// casts).
    Masters(HashMap<String, Tensor>),
    /// LoRA computed in a dtype that is neither f32 nor the checkpoint's (the second field): the
    /// frozen weights are rounded copies, so each weight is read again as stored, on the host,
    /// as it is saved, and the adapter merged into that.
    Stored(&'a StoredWeights, DType),
}

impl CheckpointBases<'_> {
    /// The weight saved (or merged into) for the Hugging Face name `name`; `None`: the model's.
    pub fn base_of(&self, name: &str) -> Result<Option<Tensor>> {
        match self {
            CheckpointBases::Model => Ok(None),
            CheckpointBases::Masters(masters) => Ok(masters.get(name).cloned()),
            CheckpointBases::Stored(stored, dtype) => stored.read(name, &Device::Cpu, *dtype),
        }
    }
}

/// Refuses a reward model (a score head, `…ForSequenceClassification`) where a language model
/// belongs: it has no next-token distribution to train or to take log-probs from.
pub fn require_language_model(model: &Transformer, flag: &str, path: &Path) -> Result<()> {
    if matches!(model.head(), OutputHead::Score { .. }) {
        anyhow::bail!(
            "{flag} {}: a reward model (a sequence-classification head), not a causal language \
             model",
            path.display()
        );
    }
    Ok(())
}

/// Each variable once: a tied embedding is one variable under one name, but the optimiser must
/// never see a variable twice whatever the checkpoint holds.
fn dedup_vars(vars: Vec<(String, Var)>) -> Vec<(String, Var)> {
    let mut seen = std::collections::HashSet::new();
    vars.into_iter()
        .filter(|(_, v)| seen.insert(v.as_tensor().id()))
        .collect()
}

/// Summed (and mean) log-probs of the chosen and rejected sides of `pairs`, in one forward pass.
pub struct SideLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub chosen_mean: Tensor,
    pub rejected_mean: Tensor,
    pub tokens: usize,
}

impl SideLogps {
    /// With `recompute`, also the pass whose blocks the backward pass runs again
    /// ([`optune_model::recomputed_backward`]).
    pub fn of<'m>(
        model: &'m Transformer,
        pairs: &[&TrainPair],
        pad_id: u32,
        recompute: bool,
    ) -> Result<(Self, Option<RecomputedPass<'m>>)> {
        let sequences: Vec<TokenizedPair> = pairs
            .iter()
            .map(|p| p.chosen.clone())
            .chain(pairs.iter().map(|p| p.rejected.clone()))
            .collect();
        let tokens = sequences.iter().map(TokenizedPair::tokens).sum();
        let (logps, pass) = policy_logprobs(model, &sequences, pad_id, recompute)?;
        let means = logps.means()?;
        let n = pairs.len();
        let sides = SideLogps {
            chosen: logps.sums.narrow(0, 0, n)?,
            rejected: logps.sums.narrow(0, n, n)?,
            chosen_mean: means.narrow(0, 0, n)?,
            rejected_mean: means.narrow(0, n, n)?,
            tokens,
        };
        Ok((sides, pass))
    }

    /// The (chosen, rejected) values a loss takes: per-token means or sums.
    pub fn sides(&self, means: bool) -> (&Tensor, &Tensor) {
        if means {
            (&self.chosen_mean, &self.rejected_mean)
        } else {
            (&self.chosen, &self.rejected)
        }
    }
}

/// The policy's summed log-probs of `sequences`, to be differentiated: with `recompute`, by a
/// pass whose activations the backward pass recomputes (--gradient-checkpointing).
pub fn policy_logprobs<'m>(
    model: &'m Transformer,
    sequences: &[TokenizedPair],
    pad_id: u32,
    recompute: bool,
) -> Result<(SequenceLogprobs, Option<RecomputedPass<'m>>)> {
    Ok(match recompute {
        true => {
            let (logps, pass) = sequence_logprobs_recomputed(model, sequences, pad_id)?;
            (logps, Some(pass))
        }
        false => (sequence_logprobs(model, sequences, pad_id)?, None),
    })
}

#[cfg(test)]
mod tests {
    use super::{Policy, ReplicaOf};
    use crate::Args;
    use candle_core::{DType, Device};
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        let policy = optune_testkit::workspace_root().join("testdata/models/tiny-llama");
        let base = [
            "opt-wdpo",
            "--policy",
            policy.to_str().unwrap(),
            "-o",
            "unused",
        ];
        Args::try_parse_from([&base[..], extra].concat()).unwrap()
    }

    /// Full fine-tuning in bf16: a replica keeps f32 masters of the weights it owns only, and
    /// trains the model's own bf16 weights for the others; every replica lists the same owners.
    /// In f32, and for LoRA's adapters, every trained weight is f32 on every replica.
    #[test]
    fn a_replica_keeps_masters_of_the_weights_it_owns() {
        let full = args(&[]);
        let load = |args: &Args, dtype, index| {
            Policy::load(args, &Device::Cpu, dtype, ReplicaOf { index, count: 3 }).unwrap()
        };
        let first = load(&full, DType::BF16, 0);
        for index in 0..3 {
            let replica = load(&full, DType::BF16, index);
            assert_eq!(replica.owners, first.owners);
            let kept: Vec<bool> = (replica.trainable.iter())
                .map(|(_, var)| var.dtype() == DType::F32)
                .collect();
            let owned: Vec<bool> = replica.owners.iter().map(|&o| o == index).collect();
            assert_eq!(kept, owned, "replica {index}");
            assert!(owned.contains(&true) && owned.contains(&false), "{owned:?}");
            let f32_run = load(&full, DType::F32, index);
            assert!(f32_run
                .trainable
                .iter()
                .all(|(_, v)| v.dtype() == DType::F32));
        }
        let lora = load(&args(&["--lora-rank", "4"]), DType::BF16, 1);
        assert!(lora.trainable.iter().all(|(_, v)| v.dtype() == DType::F32));
        assert!(lora.owners.contains(&2));
    }
}
