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
use std::collections::HashMap;
use std::path::Path;

pub struct Policy {
    /// Computes in the run's dtype (`--dtype`); with full fine-tuning in bf16/f16 its weights are
    /// casts of the f32 masters in `trainable`, renewed after each optimiser step.
    pub model: Transformer,
    pub tokenizer: ChatTokenizer,
    pub meta: CheckpointMeta,
    /// Each trainable variable once, sorted by name.
    pub trainable: Vec<(String, Var)>,
    pub lora: Option<LoraAdapters>,
    pub pad_id: u32,
    /// Under LoRA computed in a dtype that is neither f32 nor the checkpoint's own: `--policy`'s
    /// weights as stored, opened at the start (the save merges the adapters into them, and a
    /// policy deleted or replaced since cannot change what is merged into) with the saved dtype.
    stored_base: Option<(StoredWeights, DType)>,
}

impl Policy {
    /// Loads the policy to compute in `dtype`. Trainable weights (all of them, or the LoRA
    /// adapters) are f32 variables, and so are their gradients and optimiser moments; frozen
    /// weights exist in `dtype` only.
    pub fn load(args: &Args, device: &Device, dtype: DType) -> Result<Self> {
        let full_finetune = args.lora_rank.is_none();
        // Each weight comes off disk in the dtype it is kept in (f32 masters for full
        // fine-tuning, the compute dtype when frozen), so no stored-dtype copy of the model is
        // ever held whole.
        let stored = if full_finetune { DType::F32 } else { dtype };
        let checkpoint = Checkpoint::read_as(&args.policy, device, stored)?;
        let mut trainable = Vec::new();
        let tensors: HashMap<String, Tensor> = checkpoint
            .tensors
            .into_iter()
            .map(|(name, t)| {
                if full_finetune {
                    let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                    trainable.push((name.clone(), var.clone()));
                    // In f32 this is the variable itself (the model keeps its identity).
                    Ok((name, var.as_tensor().to_dtype(dtype)?))
                } else {
                    Ok((name, t.to_dtype(dtype)?))
                }
            })
            .collect::<Result<_>>()?;
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
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
            trainable: dedup_vars(trainable),
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
        let masters: HashMap<&str, &Var> = self
            .trainable
            .iter()
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

    /// Where the checkpoint's weights come from: see [`CheckpointBases`].
    pub fn checkpoint_bases(&self) -> CheckpointBases<'_> {
        match (&self.lora, &self.stored_base) {
            (None, _) => CheckpointBases::Masters(
                self.trainable
                    .iter()
                    .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
                    .collect(),
            ),
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
