//! opt-wdpo: train a policy on preference pairs with weighted DPO.
//!
//! The stages of a run, one module each: [`policy`] (load the policy, LoRA), [`data`] (pairs as
//! tokens, batches), [`reference`](mod@reference) (reference log-probs once before training), [`train`] (the
//! loop: loss, accumulation, clipping, optimiser, metrics; [`hypo`] for the online KL term;
//! [`state`] for the training state a killed run resumes from), then the checkpoint and the
//! summary line here.

mod data;
mod hypo;
mod memory;
mod metrics;
mod parallel;
mod policy;
mod reference;
mod state;
mod train;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use optune_cli::{ChatTemplateArgs, RuntimeArgs};
use optune_shard::cli::{run_tool, Summary};
use optune_shard::split::SliceSpec;
use optune_shard::Shard;
use optune_train::loss::{Objective, WeightForm, WeightNorm};
use optune_train::optim::{Decay, OptimizerKind};
use policy::Policy;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Train a policy on preference pairs with weighted DPO: the learning step of OPTune.
///
/// Reads a pairs shard (opt-pairs' output, or an offline Hugging Face preference dataset with
/// prompt/chosen/rejected as text or message lists) and writes a Hugging Face checkpoint to
/// OUT_DIR (config.json, model.safetensors, tokenizer files, metrics.csv) that transformers loads.
///
/// Each pair's DPO loss is multiplied by a weight that grows with its reward gap,
/// w = f(beta2 × reward_gap) with f = exp (default), linear (1 + x) or sigmoid (2σ(x)),
/// normalised to mean 1 within each batch, so pairs whose rewards differ most drive learning
/// while the effective learning rate stays that of plain DPO. The gap is the reward_gap column,
/// else chosen_reward − rejected_reward, else UltraFeedback's score_chosen − score_rejected;
/// pairs without rewards get weight 1. --weight-col takes each pair's weight from a column
/// instead.
///
/// Losses (--loss): sigmoid (DPO), ipo, hinge, robust, hypo (DPO + λ·KL on fresh samples),
/// simpo (reference-free, length-normalised, margin --simpo-gamma; its paper uses --beta 2 to
/// 2.5), rpo (DPO + --rpo-alpha × the NLL of the chosen reply) and sft (the NLL of the chosen
/// reply alone: Best-of-N fine-tuning on opt-pairs' output). All take the pair weights; simpo
/// and sft need no reference log-probs. A pair whose chosen and rejected replies are the same
/// tokens is dropped (skipped_identical in the summary) unless the loss is hypo, rpo or sft:
/// the others learn nothing from it.
///
/// Reference log-probs are computed once before training (or read from the shard's
/// ref_chosen_logp/ref_rejected_logp columns, which are trusted: they must come from the same
/// reference, --max-length and --dtype), so no reference model is held during training;
/// --precompute-ref also writes them back into the pairs file. With LoRA the reference is the
/// base model with the adapters off (unless --ref names another). --reference-only computes
/// them and writes the pairs with them to -o FILE without training; with --shard K/N only for
/// the K-th of N slices of the prompts (sorted by prompt_id), so that N jobs share the work and
/// opt-cat joins their outputs.
///
/// With --save-steps N, every N optimiser steps a training state (the trained weights or
/// adapters, optimiser moments, step, position in the data order, which fixes the LoRA dropout
/// masks and HyPO's samples, reference log-probs) is written atomically to OUT_DIR.state; SIGTERM or SIGINT writes one at the next
/// step boundary and exits with an error (a second signal exits at once). The same command run
/// again resumes from it and ends with the weights an uninterrupted run writes (to the bit on
/// the CPU); a run with other pairs or other arguments that change the weights (not
/// --gradient-checkpointing, --threads, --metrics, --save-steps, --memory-budget) is refused.
/// A signal before training starts (loading, the reference pass) ends the run without a state.
/// OUT_DIR.state is removed once OUT_DIR is written.
///
/// Several GPUs: --devices cuda:0,cuda:1,… trains a replica on each (data parallel, one process),
/// each step taking --batch-size × --grad-accum pairs per device, as TRL's per-device batch size
/// does under accelerate; the optimiser's state (moments, and the f32 masters of full
/// fine-tuning in bf16) is dealt out over the devices (by the memory plan a 7B's full
/// fine-tuning fits 8 GPUs of 80 GB);
/// the pipeline's SHARDS splits the reference pass into jobs.
///
/// Precision: the model computes in --dtype (f32 on the CPU, bf16 on CUDA), with reductions
/// (RMS norm statistics, softmax, log-softmax, the loss) in f32; the trained weights (all of
/// them, or the LoRA adapters) are f32 master copies with f32 gradients and optimiser moments,
/// frozen weights and the reference exist in --dtype only. The checkpoint is saved in the dtype
/// its config.json names: full fine-tuning saves the f32 masters (cast to it), LoRA merges the
/// adapters in f32 into the weights as --policy stores them (when --dtype is not f32 and not
/// the checkpoint's own, read again at the end from the file opened at the start, a tensor at a
/// time; a .gguf policy whole).
///
/// Example:
///   opt-wdpo --policy runs/x/iter1/policy pairs.parquet -o runs/x/iter2/policy \
///       --lora-rank 16 --lr 5e-5 --beta 0.1 --weight exp --beta2 1.0
#[derive(Parser, Debug)]
#[command(
    name = "opt-wdpo",
    version,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
pub struct Args {
    /// Policy to train: a Hugging Face model directory or a llama-family .gguf file
    #[arg(long, value_name = "DIR")]
    pub policy: PathBuf,

    /// Reference model [default: the policy as given]
    #[arg(long = "ref", value_name = "DIR")]
    pub reference: Option<PathBuf>,

    /// Pairs shard; `-` or none: stdin
    #[arg(value_name = "PAIRS")]
    pub input: Option<PathBuf>,

    /// Output checkpoint directory (replaced atomically when training ends); with
    /// --reference-only, the pairs shard file
    #[arg(short = 'o', long = "output", value_name = "OUT_DIR")]
    pub output: PathBuf,

    #[arg(long, value_enum, default_value_t = Objective::Sigmoid)]
    pub loss: Objective,

    /// DPO temperature β (SimPO's reward scale with --loss simpo)
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,

    /// SimPO's target margin γ between the chosen and rejected mean log-probs (with --loss simpo)
    #[arg(long, default_value_t = 0.5)]
    pub simpo_gamma: f64,

    /// RPO: weight α of the chosen reply's NLL (with --loss rpo; the paper uses 1)
    #[arg(long, default_value_t = 1.0)]
    pub rpo_alpha: f64,

    /// Label smoothing ε in [0, 0.5]: sigmoid, hypo and rpo (cDPO), simpo, and robust (ε < 0.5);
    /// ipo, hinge and sft take none
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,

    /// How a pair's weight grows with β2 × reward_gap
    #[arg(long, value_enum, default_value_t = WeightForm::Exp)]
    pub weight: WeightForm,

    /// β2: scale of the reward gap in the weight
    #[arg(long, default_value_t = 1.0)]
    pub beta2: f64,

    #[arg(long, value_enum, default_value_t = WeightNorm::Batch)]
    pub weight_norm: WeightNorm,

    /// Each pair's weight from this column (finite, >= 0) instead of its reward gap;
    /// --weight-norm still applies
    #[arg(long, value_name = "NAME", conflicts_with_all = ["weight", "beta2"])]
    pub weight_col: Option<String>,

    /// HyPO: weight λ of the reverse-KL term (with --loss hypo)
    #[arg(long, default_value_t = 0.1)]
    pub kl_coef: f64,

    /// HyPO: fresh samples per prompt for the KL estimate (≥ 2)
    #[arg(long, default_value_t = 2)]
    pub kl_samples: usize,

    /// HyPO: length of the fresh samples
    #[arg(long, default_value_t = 32)]
    pub kl_max_new_tokens: usize,

    /// Write ref_chosen_logp/ref_rejected_logp into the PAIRS file (atomically) once computed
    #[arg(long)]
    pub precompute_ref: bool,

    /// Only compute the reference log-probs: write the pairs with ref_chosen_logp and
    /// ref_rejected_logp to -o FILE, and do not train
    #[arg(long, conflicts_with_all = ["precompute_ref", "metrics"])]
    pub reference_only: bool,

    /// With --reference-only: only the pairs of the K-th of N slices of the prompts (by
    /// prompt_id)
    #[arg(long, value_name = "K/N", value_parser = SliceSpec::parse, requires = "reference_only")]
    pub shard: Option<SliceSpec>,

    /// LoRA rank; full fine-tuning when absent
    #[arg(long)]
    pub lora_rank: Option<usize>,

    /// LoRA scale numerator: the adapter's output is multiplied by alpha / rank
    #[arg(long, default_value_t = 16.0, requires = "lora_rank")]
    pub lora_alpha: f64,

    /// Dropout on the adapters' input while training, in [0, 1); the masks are drawn from --seed
    #[arg(long, default_value_t = 0.0, requires = "lora_rank")]
    pub lora_dropout: f32,

    /// Projections that get adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj; on Phi-3 also qkv_proj and gate_up_proj for their parts, whose adapters the
    /// PEFT files stack into Phi-3's fused modules)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj",
        requires = "lora_rank"
    )]
    pub lora_targets: Vec<String>,

    /// With LoRA: also write a PEFT adapter (adapter_config.json + adapter_model.safetensors)
    /// to OUT_DIR/adapter; OUT_DIR itself always holds the merged model
    #[arg(long, requires = "lora_rank")]
    pub save_adapter: bool,

    /// Optimiser of the trained weights (f32 moments)
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    pub optimizer: OptimizerKind,

    /// Peak learning rate
    #[arg(long, default_value_t = 5e-7)]
    pub lr: f64,

    /// Weight decay (AdamW's decoupled form; RMSprop adds it to the gradient, as torch does), on
    /// matrices only (not on norms' weights or biases)
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,

    /// Share of the optimiser steps spent warming the learning rate up from 0 (rounded up). As in
    /// transformers, the first step then takes learning rate 0: a one-step run changes nothing
    /// unless this is 0
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,

    /// How the learning rate falls after the warm-up
    #[arg(long, value_enum, default_value_t = Decay::Linear)]
    pub schedule: Decay,

    /// Passes over the pairs
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,

    /// Stop after this many optimiser steps, taking as many epochs as that needs (overrides
    /// --epochs, as transformers' max_steps does)
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,

    /// Pairs per micro-batch
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,

    /// Micro-batches per optimiser step (an epoch's last step may take fewer)
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,

    /// Recompute each layer's activations in the backward pass instead of keeping them
    /// (gradient checkpointing): activations drop from every layer's to one layer's plus two
    /// hidden states per layer, for one more forward pass of the layers per micro-batch.
    /// The gradients are the same (to the bit, but for a tied embedding matrix on the generic
    /// kernels: its head and embedding parts are then summed in another order)
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Global gradient-norm clip (0 = off: the norm is still logged)
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,

    /// Longest prompt + response in tokens (prompts lose their start, responses their end)
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,

    /// Seeds the pairs' order, the LoRA initialisation, LoRA dropout and HyPO's samples
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Write a training state to OUT_DIR.state every N optimiser steps, for a rerun to resume
    /// from (0: only on SIGTERM/SIGINT)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub save_steps: u64,

    /// Per-step metrics CSV, written as training goes [default: OUT_DIR/metrics.csv at the end]
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,

    /// Plan memory against this many GB instead of what the device reports free (e.g. to leave
    /// room for another process on the GPU); the run is refused when the estimate exceeds it
    /// (with --devices, on each device)
    #[arg(long, value_name = "GB")]
    pub memory_budget: Option<f64>,

    /// Print the memory plan of this run and exit, training and writing nothing. The policy's
    /// config.json and tokenizer and the pairs are read, not its weights, so a run can be sized
    /// for a GPU on a machine without one: --device cuda there plans bf16 (or --dtype) on a GPU's
    /// kernels, and --memory-budget GB holds the plan against that GPU's memory (e.g. 80). Exits
    /// with an error, as the run would, when the plan does not fit; with --devices, each
    /// device's plan (e.g. --devices cuda:0,…,cuda:7 --memory-budget 80 sizes a run on eight
    /// 80 GB GPUs). Reads a Hugging Face directory (opt-convert turns a .gguf into one)
    #[arg(long, conflicts_with = "reference_only")]
    pub plan_only: bool,

    /// Data parallel: a replica of the policy on each of these devices (e.g.
    /// cuda:0,cuda:1,cuda:2,cuda:3; all GPUs or all CPUs), in place of --device (which, when also
    /// given, must name the first: cuda is cuda:0). Each optimiser step takes --grad-accum
    /// micro-batches of --batch-size pairs per device, run at once. Each trained weight has an
    /// owner device, which holds its optimiser moments (8 bytes a trained weight under AdamW)
    /// and, in bf16/f16 full fine-tuning, its f32 master and gradient sum (the others train a
    /// bf16 copy); the others send it their gradients after each micro-batch. Each device owns
    /// about a 1/N share. The weights are those of one device with --grad-accum multiplied by the number
    /// of devices (on a GPU's kernels the same sums in the same order). The replicas share the
    /// reference pass too
    #[arg(
        long,
        value_name = "DEVICES",
        value_delimiter = ',',
        conflicts_with = "reference_only"
    )]
    pub devices: Vec<String>,

    #[command(flatten)]
    pub chat_template: ChatTemplateArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    /// The options given on the command line (clap's ids), so that one the run would ignore is
    /// refused rather than silently dropped; filled by `main`.
    #[arg(skip)]
    pub given: Vec<String>,
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    // `-o runs/x/policy/` is `runs/x/policy`: its state goes beside it, never inside it.
    args.output = args.output.components().collect();
    args.given = matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect();
    run_tool("opt-wdpo", || run(args))
}

impl Args {
    /// `--loss` as it is written on the command line.
    fn loss_name(&self) -> String {
        let value = clap::ValueEnum::to_possible_value(&self.loss);
        value.map_or_else(|| format!("{:?}", self.loss), |v| v.get_name().to_string())
    }

    /// Whether the option of clap id `id` was given on the command line.
    fn given(&self, id: &str) -> bool {
        self.given.iter().any(|given| given == id)
    }

    /// The LoRA adapters asked for, if any.
    pub fn lora_config(&self) -> Option<optune_model::lora::LoraConfig> {
        self.lora_rank.map(|rank| optune_model::lora::LoraConfig {
            rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.clone(),
        })
    }

    /// The pairs of `shard` to train on, tokenized by `tokenizer`; refused when there are none.
    fn training_pairs(
        &self,
        shard: &Shard,
        tokenizer: &optune_model::ChatTokenizer,
    ) -> Result<Vec<data::TrainPair>> {
        let pairs = data::read_pairs(
            shard,
            tokenizer,
            self.max_length,
            self.weight_col.as_deref(),
        )?;
        if pairs.is_empty() {
            bail!("{}: no pairs to train on", shard.name());
        }
        Ok(pairs)
    }

    /// Refuses a reward weighting asked for on pairs that hold no rewards: every weight would be
    /// 1, plain DPO, without a word.
    fn check_weighting(&self, shard: &Shard) -> Result<()> {
        let asked = ["weight", "beta2"].into_iter().find(|&id| self.given(id));
        if let Some(id) = asked {
            if self.weight != WeightForm::None && shard.pair_reward_gaps()?.is_none() {
                bail!(
                    "--{id}: {} holds no rewards (reward_gap, chosen_reward/rejected_reward or \
                     score_chosen/score_rejected), so every pair would weigh 1; leave it out, \
                     or give each pair its weight with --weight-col",
                    shard.name()
                );
            }
        }
        Ok(())
    }

    /// The checks clap cannot express.
    fn validate(&self) -> Result<()> {
        self.chat_template.variables()?;
        if self.batch_size == 0 || self.grad_accum == 0 || self.epochs == 0 {
            bail!("--batch-size, --grad-accum and --epochs must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("--lora-dropout {} must be in [0, 1)", self.lora_dropout);
        }
        if self.max_length < 2 {
            bail!(
                "--max-length {} leaves no prompt token: it must be at least 2 (a prompt token \
                 and a response token)",
                self.max_length
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!("--warmup-ratio {} must be in [0, 1]", self.warmup_ratio);
        }
        if self.max_steps == Some(0) {
            bail!("--max-steps must be at least 1");
        }
        if self.devices.iter().any(String::is_empty) {
            bail!("--devices: an empty name; list them as cuda:0,cuda:1");
        }
        if let Some(first) = self.devices.first() {
            let gpu = |spec: &str| spec.starts_with("cuda");
            if self.devices.iter().any(|spec| gpu(spec) != gpu(first)) {
                bail!(
                    "--devices {}: GPUs and CPUs together; list only GPUs (or only the CPU): \
                     the precision and kernels are the first device's for every replica",
                    self.devices.join(",")
                );
            }
            let named = |spec: &str| match spec {
                "cuda" => "cuda:0".to_string(),
                other => other.to_string(),
            };
            if let Some(device) = &self.runtime.device {
                if named(device) != named(first) {
                    bail!(
                        "--device {device} with --devices {}: --device, when given too, names the \
                         first of --devices (the device whose precision and kernels every replica takes)",
                        self.devices.join(",")
                    );
                }
            }
        }
        for (given, flag) in [
            (self.precompute_ref, "--precompute-ref"),
            (self.reference_only, "--reference-only"),
        ] {
            if given && !self.loss.needs_reference() {
                bail!(
                    "{flag}: --loss {} reads no reference log-probs",
                    self.loss_name()
                );
            }
        }
        let online = self.loss.samples_online();
        let loss = format!("--loss {}", self.loss_name());
        let unweighted = "--weight none".to_string();
        let weighted = self.weight != WeightForm::None || self.weight_col.is_some();
        for (id, flag, used, setting) in [
            ("beta", "--beta", self.loss != Objective::Sft, &loss),
            (
                "simpo_gamma",
                "--simpo-gamma",
                self.loss == Objective::Simpo,
                &loss,
            ),
            (
                "rpo_alpha",
                "--rpo-alpha",
                self.loss == Objective::Rpo,
                &loss,
            ),
            ("kl_coef", "--kl-coef", online, &loss),
            ("kl_samples", "--kl-samples", online, &loss),
            ("kl_max_new_tokens", "--kl-max-new-tokens", online, &loss),
            ("reference", "--ref", self.loss.needs_reference(), &loss),
            ("beta2", "--beta2", weighted, &unweighted),
            ("weight_norm", "--weight-norm", weighted, &unweighted),
        ] {
            if !used && self.given(id) {
                bail!("{flag}: {setting} does not use it; leave it out");
            }
        }
        for (value, flag) in [
            (self.lr, "--lr"),
            (self.weight_decay, "--weight-decay"),
            (self.max_grad_norm, "--max-grad-norm"),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                bail!("{flag} {value} must be finite and >= 0");
            }
        }
        if self.reference_only {
            let output = optune_shard::Destination::from_arg(Some(&self.output));
            optune_shard::cli::refuse_input_as_output(&output, "-o", &self.input)?;
        } else {
            check_output_dir(&self.output)?;
            let inputs = [
                ("--policy", Some(&self.policy)),
                ("--ref", self.reference.as_ref()),
                ("PAIRS", self.input.as_ref()),
            ];
            for (flag, input) in inputs {
                if let Some(input) = input.filter(|input| lies_within(input, &self.output)) {
                    bail!(
                        "-o {}: the save replaces OUT_DIR whole, and {flag} {} lies in it; give \
                         the checkpoint a new directory",
                        self.output.display(),
                        input.display()
                    );
                }
            }
            if let Some(metrics) = &self.metrics {
                if lies_within(metrics, &self.output) {
                    bail!(
                        "--metrics {}: inside OUT_DIR, which the save replaces whole; leave \
                         --metrics out (OUT_DIR/metrics.csv is written at the end) or name a \
                         file elsewhere",
                        metrics.display()
                    );
                }
            }
        }
        if self.loss.samples_online() && self.kl_samples < 2 {
            bail!(
                "--kl-samples must be at least 2: the leave-one-out baseline needs another sample"
            );
        }
        if self.loss.samples_online() && self.kl_max_new_tokens == 0 {
            bail!("--kl-max-new-tokens must be at least 1");
        }
        // The losses check these too, but only at the first micro-batch: after the models
        // have loaded and the reference pass has run.
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("--beta {} must be finite and > 0", self.beta);
        }
        for (value, flag) in [(self.beta2, "--beta2"), (self.rpo_alpha, "--rpo-alpha")] {
            if !(value.is_finite() && value >= 0.0) {
                bail!("{flag} {value} must be finite and >= 0");
            }
        }
        let most_smoothing = match self.loss {
            Objective::Robust => "< 0.5",
            _ => "<= 0.5",
        };
        if !(0.0..=0.5).contains(&self.label_smoothing)
            || (self.loss == Objective::Robust && self.label_smoothing == 0.5)
        {
            bail!(
                "--label-smoothing {} must be >= 0 and {most_smoothing} for --loss {}",
                self.label_smoothing,
                self.loss_name()
            );
        }
        if self.label_smoothing > 0.0
            && matches!(
                self.loss,
                Objective::Ipo | Objective::Hinge | Objective::Sft
            )
        {
            bail!(
                "--label-smoothing: --loss {} takes none (sigmoid, hypo, rpo, simpo and robust do)",
                self.loss_name()
            );
        }
        if self.lora_rank == Some(0) {
            bail!("--lora-rank must be at least 1 (leave it out for full fine-tuning)");
        }
        if self.precompute_ref {
            let Some(path) = self.input.as_ref().filter(|p| p.as_os_str() != "-") else {
                bail!("--precompute-ref needs the pairs as a file, not stdin");
            };
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
            {
                bail!(
                    "--precompute-ref: {} is CSV, which it cannot rewrite; convert it with \
                     opt-cat to .parquet or .jsonl first",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

/// Whether `path` is `dir` or lies below it, however either is spelt (links resolved,
/// [`optune_fs::resolved`]).
fn lies_within(path: &std::path::Path, dir: &std::path::Path) -> bool {
    match (optune_fs::resolved(path), optune_fs::resolved(dir)) {
        (Some(path), Some(dir)) => path.starts_with(dir),
        _ => false,
    }
}

/// Refuses, before any work, an OUT_DIR the final save could not take or would wrongly
/// replace: the save puts a new directory in its place, whole.
fn check_output_dir(dir: &std::path::Path) -> Result<()> {
    if dir.file_name().is_none() {
        bail!(
            "-o {}: names no directory of its own; give the checkpoint a new directory",
            dir.display()
        );
    }
    let parent = optune_fs::parent_of(dir);
    if parent.exists() && !parent.is_dir() {
        bail!(
            "-o {}: {} is not a directory",
            dir.display(),
            parent.display()
        );
    }
    if dir.exists() && !dir.is_dir() {
        bail!(
            "-o {}: exists and is not a directory; the checkpoint is a directory",
            dir.display()
        );
    }
    if dir.is_dir() && !dir.join("config.json").is_file() {
        let mut entries =
            std::fs::read_dir(dir).map_err(|err| anyhow::anyhow!("-o {}: {err}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "-o {}: a directory that holds files but no checkpoint (no config.json); the \
                 save replaces OUT_DIR whole, so name a new directory or an earlier checkpoint",
                dir.display()
            );
        }
    }
    Ok(())
}

fn run(mut args: Args) -> Result<()> {
    args.validate()?;
    let started = Instant::now();
    if let Some(first) = args.devices.first() {
        args.runtime.device = Some(first.clone());
    }
    if args.plan_only {
        return plan_only(&args);
    }
    let (device, dtype) = args.runtime.init()?;
    let kernels = optune_kernels::autograd_path(&device, dtype).name();
    if args.reference_only {
        let pairs = reference::write_only(&args, &device, dtype)?;
        Summary::new("opt-wdpo")
            .field("pairs", pairs)
            .field("total_s", format!("{:.2}", started.elapsed().as_secs_f64()))
            .field("kernels", kernels)
            .print();
        return Ok(());
    }
    let shard = Shard::read(args.input.as_deref())?;
    args.check_weighting(&shard)?;
    // Before the policy takes its share: the plan counts its weights too.
    let available = optune_cli::runtime::available_memory(&device);
    let replica_count = args.devices.len().max(1);
    let first = policy::ReplicaOf {
        index: 0,
        count: replica_count,
    };
    let mut policy = Policy::load(&args, &device, dtype, first)?;
    let mut pairs = args.training_pairs(&shard, &policy.tokenizer)?;
    // Before any work: a sequence past the rotary tables would fail at its batch.
    let longest = data::longest_sequence(&pairs);
    if longest > policy.model.max_positions() {
        bail!(
            "{}: a pair of {longest} tokens (after --max-length {}) is longer than the {} \
             positions the policy's config allows{}: pass --max-length {} or less",
            shard.name(),
            args.max_length,
            policy.model.max_positions(),
            policy.model.config().position_limit_note(),
            policy.model.max_positions()
        );
    }
    let plan = memory::Plan::estimate(&args, &policy, &pairs, reference::held(&args, &pairs));
    let worker_devices = args.devices.iter().skip(1).map(|spec| {
        optune_cli::runtime::device(Some(spec)).with_context(|| format!("--devices {spec}"))
    });
    let worker_devices: Vec<_> = worker_devices.collect::<Result<_>>()?;
    let workers = (worker_devices.iter()).map(|d| (d, optune_cli::runtime::available_memory(d)));
    let replicas: Vec<ReplicaDevice> = std::iter::once((&device, available))
        .chain(workers)
        .enumerate()
        .map(|(i, (device, available))| ReplicaDevice {
            key: format!("{:?}", device.location()),
            spec: args.devices.get(i).map_or("", String::as_str),
            available,
            gpu: device.is_cuda(),
        })
        .collect();
    let elements: Vec<usize> = (policy.trainable.iter())
        .map(|(_, var)| var.elem_count())
        .collect();
    check_memory(&args, &plan, &replicas, &elements)?;
    let fingerprint = state::fingerprint(&args, &device, dtype, &pairs)?;
    let resumed = state::load(&args.output, &fingerprint)?;
    let mut identical = 0;
    if let Some(saved) = &resumed {
        // A state holds the reference log-probs of the pairs its run kept.
        identical = data::drop_identical_pairs(&mut pairs, args.loss);
        saved.fill_reference(&mut pairs)?;
    }
    let mut workers = load_replicas(&args, &worker_devices, dtype)?;
    let reference =
        reference::prepare(&args, &policy, &workers, &shard, &mut pairs, &device, dtype)?;
    // After the reference pass, whose --precompute-ref writes back one row per pair of the shard
    // (on a resumed run, the pairs were dropped above).
    identical += data::drop_identical_pairs(&mut pairs, args.loss);
    if pairs.is_empty() {
        bail!(
            "{}: all {identical} pairs have the same chosen and rejected tokens, and --loss {} \
             learns nothing from such a pair",
            shard.name(),
            args.loss_name()
        );
    }
    let trained = train::train(
        &args,
        &mut policy,
        &pairs,
        reference.as_ref(),
        &mut workers,
        &fingerprint,
        resumed,
    )?;
    let worker_policies: Vec<&Policy> = workers.iter().map(|(p, _)| p).collect();
    save(&args, &policy, &worker_policies, &trained)?;
    state::remove(&args.output)?;
    summary(&trained, pairs.len(), identical, started)
        .field("replicas", args.devices.len().max(1))
        .field("kernels", kernels)
        .print();
    Ok(())
}

/// --plan-only: the plan `run` prints before training (each device's, with --devices), made from
/// the policy's config, tokenizer and the pairs; for GPUs that are not here (`--device cuda` on a
/// machine without one), from the kernels and the default dtype a GPU takes, against
/// --memory-budget only.
fn plan_only(args: &Args) -> Result<()> {
    if !args.policy.is_dir() {
        bail!(
            "--plan-only: --policy {} is not a model directory; it reads config.json and the \
             tokenizer of a Hugging Face directory (opt-convert turns a .gguf into one)",
            args.policy.display()
        );
    }
    let config = optune_model::ModelConfig::from_file(&args.policy.join("config.json"))?;
    let mut tokenizer = optune_model::ChatTokenizer::from_dir(&args.policy)?;
    args.chat_template.apply_to(&mut tokenizer)?;
    let absent_gpu = args
        .runtime
        .device
        .as_deref()
        .filter(|d| d.starts_with("cuda") && !candle_core::utils::cuda_is_available());
    let specs: Vec<&str> = match args.devices.is_empty() {
        true => vec![args.runtime.device.as_deref().unwrap_or("")],
        false => args.devices.iter().map(String::as_str).collect(),
    };
    let (dtype, generic, device, replicas) = match absent_gpu {
        Some(gpu) => {
            let dtype = optune_cli::runtime::dtype_on(args.runtime.dtype.as_deref(), true)?;
            // --devices lists GPUs only when its first is one (Args::validate).
            let replicas = (specs.iter())
                .map(|&spec| ReplicaDevice {
                    key: match spec {
                        "cuda" => "cuda:0".to_string(),
                        other => other.to_string(),
                    },
                    spec,
                    available: None,
                    gpu: true,
                })
                .collect();
            (dtype, true, gpu.to_string(), replicas)
        }
        None => {
            let (device, dtype) = args.runtime.init()?;
            let generic =
                optune_kernels::autograd_path(&device, dtype) == optune_kernels::Path::Generic;
            let name = match device.is_cuda() {
                true => args.runtime.device.clone().unwrap_or("cuda".into()),
                false => "cpu".into(),
            };
            let mut replicas = vec![ReplicaDevice {
                key: format!("{:?}", device.location()),
                spec: specs[0],
                available: optune_cli::runtime::available_memory(&device),
                gpu: device.is_cuda(),
            }];
            for &spec in &specs[1..] {
                let worker = optune_cli::runtime::device(Some(spec))
                    .with_context(|| format!("--devices {spec}"))?;
                replicas.push(ReplicaDevice {
                    key: format!("{:?}", worker.location()),
                    spec,
                    available: optune_cli::runtime::available_memory(&worker),
                    gpu: worker.is_cuda(),
                });
            }
            (dtype, generic, name, replicas)
        }
    };
    let shard = Shard::read(args.input.as_deref())?;
    args.check_weighting(&shard)?;
    let pairs = args.training_pairs(&shard, &tokenizer)?;
    // The trained weights in the order the run's owners deal them out (by name).
    let mut trained = match args.lora_config() {
        Some(lora) => lora.adapter_weight_shapes(&config)?,
        None => optune_model::llama_weight_shapes(&config),
    };
    trained.sort();
    let elements: Vec<usize> = (trained.iter())
        .map(|(_, shape)| shape.iter().product())
        .collect();
    let shape = memory::RunShape::of_args(
        args,
        &config,
        (dtype, generic),
        elements.iter().sum::<usize>() as f64,
        &pairs,
        reference::held(args, &pairs),
    );
    let plan = memory::Plan::of_run(shape);
    let largest = check_memory(args, &plan, &replicas, &elements)?;
    let kernels = match generic {
        true => optune_kernels::Path::Generic,
        false => optune_kernels::Path::Fused,
    };
    Summary::new("opt-wdpo")
        .field("plan_gb", format!("{:.2}", largest / 1e9))
        .field("pairs", pairs.len())
        .field("device", device)
        .field("replicas", replicas.len())
        .field("device_here", absent_gpu.is_none())
        .field("kernels", kernels.name())
        .print();
    Ok(())
}

/// The other replicas of --devices, each the policy (and the reference it holds through training,
/// if any) on its device, loaded side by side.
fn load_replicas(
    args: &Args,
    devices: &[candle_core::Device],
    dtype: candle_core::DType,
) -> Result<Vec<(Policy, Option<optune_model::Transformer>)>> {
    let mut devices: Vec<&candle_core::Device> = devices.iter().collect();
    let count = devices.len() + 1;
    let loads = parallel::on_each(&mut devices, |i, device| {
        let replica = policy::ReplicaOf {
            index: i + 1,
            count,
        };
        let replica = Policy::load(args, device, dtype, replica)?;
        let reference = reference::held_model(args, &replica, device, dtype)?;
        Ok((replica, reference))
    });
    loads.into_iter().collect()
}

/// What the plan is held against: --memory-budget, else what the device has `available`; and
/// how the plan's line names it.
fn memory_limit(args: &Args, available: Option<f64>) -> (Option<f64>, &'static str) {
    match args.memory_budget {
        Some(gb) => (Some(gb * 1e9), "in --memory-budget"),
        None => (available, "available"),
    }
}

/// One replica's device, for [`check_memory`]: a key equal for the replicas of one device, its
/// name in --devices, what it has available, and whether it is a GPU.
struct ReplicaDevice<'a> {
    key: String,
    spec: &'a str,
    available: Option<f64>,
    gpu: bool,
}

/// Holds the memory plan against each device's memory: every replica its weights, gradients and
/// activations, and the optimiser's state of the weights it owns (`elements`: the trained
/// weights' sizes in the owners' order); replicas on one device (or on the host) add up. With
/// one replica, its device's; refused on a GPU, the advice names the fewest GPUs of that size
/// that --devices would fit it on, if any up to 16 do. Returns the largest device's plan in
/// bytes.
fn check_memory(
    args: &Args,
    plan: &memory::Plan,
    replicas: &[ReplicaDevice],
    elements: &[usize],
) -> Result<f64> {
    if let [only] = replicas {
        let (limit, what) = memory_limit(args, only.available);
        let refused = match plan.check(limit, what) {
            Ok(()) => return Ok(plan.total()),
            Err(refused) => refused,
        };
        let fewest = limit.and_then(|limit| plan.fewest_devices(elements, limit));
        match (only.gpu, fewest) {
            (true, Some((count, each))) => bail!(
                "{refused}; by the plan it fits {count} such GPUs, {:.2} GB each (--devices \
                 cuda:0,…,cuda:{})",
                each / 1e9,
                count - 1
            ),
            _ => return Err(refused),
        }
    }
    // (a replica standing for its device, how many replicas the device holds, their share)
    let shares = parallel::owned_shares(elements, replicas.len());
    let mut devices: Vec<(&ReplicaDevice, usize, f64)> = Vec::new();
    for (replica, share) in replicas.iter().zip(&shares) {
        match devices.iter_mut().find(|(d, ..)| d.key == replica.key) {
            Some((_, count, owned)) => {
                *count += 1;
                *owned += share;
            }
            None => devices.push((replica, 1, *share)),
        }
    }
    let mut largest = 0f64;
    for (device, count, share) in devices {
        let shared = plan.for_replicas(count, share);
        let suffix = match count {
            1 => String::new(),
            n => format!(" for its {n} replicas"),
        };
        let (limit, what) = memory_limit(args, device.available);
        shared.check(limit, &format!("{what} on {}{suffix}", device.spec))?;
        largest = largest.max(shared.total());
    }
    Ok(largest)
}

/// The checkpoint (merged weights), metrics.csv unless --metrics, and the PEFT adapter on request.
/// `workers`: the other replicas of --devices (full fine-tuning's masters are with their owners).
fn save(args: &Args, policy: &Policy, workers: &[&Policy], trained: &train::Trained) -> Result<()> {
    let csv = trained.log.to_csv()?;
    let bases = policy.checkpoint_bases(workers);
    let base_of = |name: &str| bases.base_of(name);
    optune_model::save_checkpoint_with(&policy.model, &base_of, &policy.meta, &args.output, |dir| {
        if args.metrics.is_none() {
            std::fs::write(dir.join("metrics.csv"), &csv)?;
        }
        if let (Some(lora), true) = (&policy.lora, args.save_adapter) {
            let adapter_dir = dir.join("adapter");
            std::fs::create_dir_all(&adapter_dir)?;
            lora.write_peft(&adapter_dir, &args.policy.display().to_string())?;
        }
        Ok(())
    })
}

/// The summary line: `pairs` counts those trained on, `skipped_identical` those dropped.
fn summary(trained: &train::Trained, pairs: usize, identical: usize, started: Instant) -> Summary {
    let mut summary = Summary::new("opt-wdpo")
        .field("pairs", pairs)
        .field("skipped_identical", identical)
        .field("steps", trained.steps)
        .field("resumed_from", trained.resumed_from)
        .field("tokens", trained.tokens)
        .field("train_s", format!("{:.2}", trained.seconds))
        .field(
            "s_per_step",
            format!(
                "{:.3}",
                trained.seconds / (trained.steps - trained.resumed_from).max(1) as f64
            ),
        );
    if let Some(last) = trained.log.last() {
        summary = summary
            .field("final_loss", format!("{:.4}", last.loss))
            .field("final_margin", format!("{:.4}", last.margin));
    }
    if let Some(mb) = optune_cli::runtime::peak_rss_mb() {
        summary = summary.field("peak_rss_mb", format!("{mb:.0}"));
    }
    summary.field("total_s", format!("{:.2}", started.elapsed().as_secs_f64()))
}
