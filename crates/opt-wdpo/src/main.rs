//! opt-wdpo: train a policy on preference pairs with weighted DPO.

mod data;
mod metrics;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use clap::{Parser, ValueEnum};
use data::{epoch_batches, read_pairs, TrainPair};
use metrics::{MetricsLog, StepMetrics};
use optune_model::cli::RuntimeArgs;
use optune_model::generate::{generate, stream_seed, GenerationRequest, SamplingParams};
use optune_model::lora::{attach_lora, LoraAdapters, LoraConfig};
use optune_model::{
    sequence_logprobs, ChatTokenizer, Checkpoint, CheckpointMeta, TokenizedPair, Transformer,
};
use optune_shard::arrow::array::Float32Array;
use optune_shard::cli::{run_tool, Summary};
use optune_shard::{Destination, Shard};
use optune_train::loss::{
    dpo_losses, loo_reinforce_kl, pair_weights, weighted_mean, DpoLoss, WeightForm, WeightNorm,
};
use optune_train::optim::{
    clip_grad_norm, decay_groups, missing_grads, AdamW, Algorithm, Decay, Optimizer, RmsProp,
    Schedule,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
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
/// while the effective learning rate stays that of plain DPO. Pairs without rewards get weight 1.
///
/// Reference log-probs are computed once before training (or read from the shard's
/// ref_chosen_logp/ref_rejected_logp columns), so no reference model is held during training;
/// --precompute-ref also writes them back into the pairs file. With LoRA the reference is the
/// base model with the adapters off.
///
/// Example:
///   opt-wdpo --policy runs/x/iter1/policy pairs.parquet -o runs/x/iter2/policy \
///       --lora-rank 16 --lr 5e-5 --beta 0.1 --weight exp --beta2 1.0
#[derive(Parser, Debug)]
#[command(name = "opt-wdpo", version, verbatim_doc_comment)]
struct Args {
    /// Policy to train: a Hugging Face model directory or a llama-family .gguf file
    #[arg(long, value_name = "DIR")]
    policy: PathBuf,

    /// Reference model [default: the policy as given]
    #[arg(long = "ref", value_name = "DIR")]
    reference: Option<PathBuf>,

    /// Pairs shard; `-` or none: stdin
    #[arg(value_name = "PAIRS")]
    input: Option<PathBuf>,

    /// Output checkpoint directory (replaced atomically when training ends)
    #[arg(short = 'o', long = "output", value_name = "OUT_DIR")]
    output: PathBuf,

    #[arg(long, value_enum, default_value_t = LossArg::Sigmoid)]
    loss: LossArg,

    /// DPO temperature β
    #[arg(long, default_value_t = 0.1)]
    beta: f64,

    /// Label smoothing ε for sigmoid (cDPO) and robust
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,

    /// How a pair's weight grows with β2 × reward_gap
    #[arg(long, value_enum, default_value_t = WeightArg::Exp)]
    weight: WeightArg,

    /// β2: scale of the reward gap in the weight
    #[arg(long, default_value_t = 1.0)]
    beta2: f64,

    #[arg(long, value_enum, default_value_t = WeightNormArg::Batch)]
    weight_norm: WeightNormArg,

    /// HyPO: weight λ of the reverse-KL term (with --loss hypo)
    #[arg(long, default_value_t = 0.1)]
    kl_coef: f64,

    /// HyPO: fresh samples per prompt for the KL estimate (≥ 2)
    #[arg(long, default_value_t = 2)]
    kl_samples: usize,

    /// HyPO: length of the fresh samples
    #[arg(long, default_value_t = 32)]
    kl_max_new_tokens: usize,

    /// Write ref_chosen_logp/ref_rejected_logp into the PAIRS file (atomically) once computed
    #[arg(long)]
    precompute_ref: bool,

    /// LoRA rank; full fine-tuning when absent
    #[arg(long)]
    lora_rank: Option<usize>,

    /// LoRA scale numerator: the adapter's output is multiplied by alpha / rank
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,

    /// Dropout on the adapters' input while training, in [0, 1); the masks are drawn from --seed
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,

    /// Projections that get adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj"
    )]
    lora_targets: Vec<String>,

    /// With LoRA: also write a PEFT adapter (adapter_config.json + adapter_model.safetensors)
    /// to OUT_DIR/adapter; OUT_DIR itself always holds the merged model
    #[arg(long)]
    save_adapter: bool,

    #[arg(long, value_enum, default_value_t = OptimizerArg::Adamw)]
    optimizer: OptimizerArg,

    #[arg(long, default_value_t = 5e-7)]
    lr: f64,

    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,

    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,

    #[arg(long, value_enum, default_value_t = ScheduleArg::Linear)]
    schedule: ScheduleArg,

    #[arg(long, default_value_t = 1)]
    epochs: usize,

    /// Pairs per micro-batch
    #[arg(long, default_value_t = 8)]
    batch_size: usize,

    /// Micro-batches per optimiser step
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,

    /// Global gradient-norm clip (0 = off)
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,

    /// Longest prompt + response in tokens (prompts lose their start, responses their end)
    #[arg(long, default_value_t = 512)]
    max_length: usize,

    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Per-step metrics CSV, written as training goes [default: OUT_DIR/metrics.csv at the end]
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,

    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum LossArg {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    /// DPO plus λ·KL(π‖π_ref) estimated on fresh samples (leave-one-out REINFORCE)
    Hypo,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WeightArg {
    None,
    Exp,
    Linear,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WeightNormArg {
    Batch,
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OptimizerArg {
    Adamw,
    Rmsprop,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScheduleArg {
    Linear,
    Cosine,
    Constant,
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_tool("opt-wdpo", || run(args))
}

/// The policy being trained and what it needs.
struct Policy {
    model: Transformer,
    tokenizer: ChatTokenizer,
    meta: CheckpointMeta,
    trainable: Vec<(String, Var)>,
    lora: Option<LoraAdapters>,
    pad_id: u32,
}

fn pad_id(tokenizer: &ChatTokenizer, meta: &CheckpointMeta) -> u32 {
    tokenizer
        .pad_token_id()
        .or(meta.config.pad_token_id())
        .or(meta.eos_token_ids.first().copied())
        .unwrap_or(0)
}

fn load_policy(args: &Args, device: &Device) -> Result<Policy> {
    let checkpoint = Checkpoint::read(&args.policy, device)?;
    let full_finetune = args.lora_rank.is_none();
    let mut trainable = Vec::new();
    let tensors: HashMap<String, Tensor> = checkpoint
        .tensors
        .into_iter()
        .map(|(name, t)| {
            // Master weights and optimiser state stay in f32 whatever the checkpoint's dtype.
            let t = t.to_dtype(DType::F32)?;
            if full_finetune {
                let var = Var::from_tensor(&t)?;
                trainable.push((name.clone(), var.clone()));
                Ok((name, var.as_tensor().clone()))
            } else {
                Ok((name, t))
            }
        })
        .collect::<Result<_>>()?;
    trainable.sort_by(|a, b| a.0.cmp(&b.0));
    let mut model =
        Transformer::from_weights(&checkpoint.meta.config, tensors, DType::F32, device)?;
    let lora = match args.lora_rank {
        Some(rank) => {
            let config = LoraConfig {
                rank,
                alpha: args.lora_alpha,
                dropout: args.lora_dropout,
                targets: args.lora_targets.clone(),
            };
            let adapters = attach_lora(&mut model, &config, args.seed)?;
            trainable = adapters.vars.clone();
            Some(adapters)
        }
        None => None,
    };
    // A tied embedding is one variable; don't hand it to the optimiser twice.
    let pad_id = pad_id(&checkpoint.tokenizer, &checkpoint.meta);
    Ok(Policy {
        model,
        tokenizer: checkpoint.tokenizer,
        meta: checkpoint.meta,
        trainable,
        lora,
        pad_id,
    })
}

/// Summed (and mean) log-probs of the chosen and rejected sides of `pairs`, in one forward pass.
struct SideLogps {
    chosen: Tensor,
    rejected: Tensor,
    chosen_mean: Tensor,
    rejected_mean: Tensor,
    tokens: usize,
}

fn side_logps(model: &Transformer, pairs: &[&TrainPair], pad_id: u32) -> Result<SideLogps> {
    let sequences: Vec<TokenizedPair> = pairs
        .iter()
        .map(|p| p.chosen.clone())
        .chain(pairs.iter().map(|p| p.rejected.clone()))
        .collect();
    let tokens = sequences
        .iter()
        .map(|s| s.prompt.len() + s.response.len())
        .sum();
    let logps = sequence_logprobs(model, &sequences, pad_id)?;
    let means = logps.means()?;
    let n = pairs.len();
    Ok(SideLogps {
        chosen: logps.sums.narrow(0, 0, n)?,
        rejected: logps.sums.narrow(0, n, n)?,
        chosen_mean: means.narrow(0, 0, n)?,
        rejected_mean: means.narrow(0, n, n)?,
        tokens,
    })
}

/// Fills every pair's reference log-probs (summed, or per-token means for IPO) with `model`.
fn compute_reference(
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
        let logps = side_logps(model, &batch_pairs, pad_id)?;
        let (c, r) = if use_means {
            (logps.chosen_mean, logps.rejected_mean)
        } else {
            (logps.chosen, logps.rejected)
        };
        let (c, r): (Vec<f32>, Vec<f32>) = (c.to_vec1()?, r.to_vec1()?);
        for (k, &i) in chunk.iter().enumerate() {
            pairs[i].ref_logps = Some((c[k], r[k]));
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(())
}

fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 || args.grad_accum == 0 || args.epochs == 0 {
        bail!("--batch-size, --grad-accum and --epochs must be at least 1");
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        bail!("--lora-dropout {} must be in [0, 1)", args.lora_dropout);
    }
    if args.loss == LossArg::Hypo && args.kl_samples < 2 {
        bail!("--kl-samples must be at least 2: the leave-one-out baseline needs another sample");
    }
    let started = Instant::now();
    let (device, _dtype) = args.runtime.init()?;
    let shard = Shard::read(args.input.as_deref())?;
    let policy = load_policy(&args, &device)?;
    let use_means = args.loss == LossArg::Ipo;
    let mut pairs = read_pairs(&shard, &policy.tokenizer, args.max_length)?;
    if pairs.is_empty() {
        bail!("{}: no pairs to train on", shard.name());
    }
    let had_reference = pairs.iter().all(|p| p.ref_logps.is_some());

    // Reference log-probs, once, before any update. A separate --ref is loaded, used and dropped;
    // otherwise the policy as loaded (with LoRA: adapters off) is the reference.
    let separate_reference = args.reference.as_ref().filter(|r| **r != args.policy);
    let mut reference_model = None;
    if !had_reference || args.loss == LossArg::Hypo {
        match separate_reference {
            Some(dir) => {
                let (model, _, meta) = optune_model::load_model(dir, DType::F32, &device)?;
                if meta.config.vocab_size != policy.meta.config.vocab_size {
                    bail!(
                        "--ref {}: vocab_size {} differs from the policy's {}",
                        dir.display(),
                        meta.config.vocab_size,
                        policy.meta.config.vocab_size
                    );
                }
                compute_reference(
                    &model,
                    &mut pairs,
                    policy.pad_id,
                    use_means,
                    args.batch_size,
                )?;
                reference_model = Some(model);
            }
            None => {
                if let Some(lora) = &policy.lora {
                    lora.set_enabled(false);
                }
                compute_reference(
                    &policy.model,
                    &mut pairs,
                    policy.pad_id,
                    use_means,
                    args.batch_size,
                )?;
                if let Some(lora) = &policy.lora {
                    lora.set_enabled(true);
                }
                // HyPO with full fine-tuning needs the initial weights at train time: keep a copy.
                if args.loss == LossArg::Hypo && policy.lora.is_none() {
                    let (model, _, _) =
                        optune_model::load_model(&args.policy, DType::F32, &device)?;
                    reference_model = Some(model);
                }
            }
        }
    }
    if args.loss != LossArg::Hypo {
        reference_model = None;
    }
    // IPO's reference values are per-token means, which the columns do not hold.
    if args.precompute_ref && !had_reference && !use_means {
        write_reference_columns(&args, &shard, &pairs)?;
    }

    let loss_kind = match args.loss {
        LossArg::Sigmoid | LossArg::Hypo => DpoLoss::Sigmoid,
        LossArg::Ipo => DpoLoss::Ipo,
        LossArg::Hinge => DpoLoss::Hinge,
        LossArg::Robust => DpoLoss::Robust,
    };
    let weight_form = match args.weight {
        WeightArg::None => WeightForm::None,
        WeightArg::Exp => WeightForm::Exp,
        WeightArg::Linear => WeightForm::Linear,
        WeightArg::Sigmoid => WeightForm::Sigmoid,
    };
    let weight_norm = match args.weight_norm {
        WeightNormArg::Batch => WeightNorm::Batch,
        WeightNormArg::None => WeightNorm::None,
    };
    let steps_per_epoch = pairs
        .len()
        .div_ceil(args.batch_size)
        .div_ceil(args.grad_accum);
    let total_steps = (steps_per_epoch * args.epochs) as u64;
    let schedule = Schedule {
        peak_lr: args.lr,
        warmup_steps: (args.warmup_ratio * total_steps as f64).ceil() as u64,
        total_steps,
        decay: match args.schedule {
            ScheduleArg::Linear => Decay::Linear,
            ScheduleArg::Cosine => Decay::Cosine,
            ScheduleArg::Constant => Decay::Constant,
        },
    };
    let algorithm = match args.optimizer {
        OptimizerArg::Adamw => Algorithm::AdamW(AdamW::default()),
        OptimizerArg::Rmsprop => Algorithm::RmsProp(RmsProp::default()),
    };
    let trainable = dedup_vars(&policy.trainable);
    let mut optimizer = Optimizer::new(
        decay_groups(trainable.clone(), args.weight_decay),
        algorithm,
        schedule.lr_at(0),
    )?;
    if let Some(lora) = &policy.lora {
        lora.set_training(true);
    }
    let mut log = MetricsLog::new(args.metrics.as_deref())?;
    let progress = indicatif::ProgressBar::new(total_steps).with_style(
        indicatif::ProgressStyle::with_template(
            "opt-wdpo {bar:30} {pos}/{len} steps  {msg}  eta {eta}",
        )
        .expect("valid"),
    );
    let train_started = Instant::now();
    let mut step_metrics = StepMetrics::default();
    let mut accumulated: Option<GradStore> = None;
    let mut micro = 0usize;
    let mut total_tokens = 0usize;
    let mut step_started = Instant::now();
    for epoch in 0..args.epochs {
        let batches = epoch_batches(&pairs, args.batch_size, args.seed, epoch);
        let last_batch = batches.len() - 1;
        for (b, batch) in batches.iter().enumerate() {
            let batch_pairs: Vec<&TrainPair> = batch.iter().map(|&i| &pairs[i]).collect();
            let logps = side_logps(&policy.model, &batch_pairs, policy.pad_id)?;
            let (pc, pr) = if use_means {
                (&logps.chosen_mean, &logps.rejected_mean)
            } else {
                (&logps.chosen, &logps.rejected)
            };
            let ref_c: Vec<f32> = batch_pairs
                .iter()
                .map(|p| p.ref_logps.expect("computed above").0)
                .collect();
            let ref_r: Vec<f32> = batch_pairs
                .iter()
                .map(|p| p.ref_logps.expect("computed above").1)
                .collect();
            let ref_c = Tensor::new(ref_c.as_slice(), &device)?;
            let ref_r = Tensor::new(ref_r.as_slice(), &device)?;
            let losses = dpo_losses(
                loss_kind,
                args.beta,
                args.label_smoothing,
                pc,
                pr,
                &ref_c,
                &ref_r,
            )?;
            let gaps: Vec<f32> = batch_pairs.iter().map(|p| p.reward_gap).collect();
            let weights = pair_weights(weight_form, args.beta2, &gaps, weight_norm)?;
            let mut loss = weighted_mean(&losses.losses, &weights)?;
            let mut kl = None;
            if args.loss == LossArg::Hypo {
                let (surrogate, estimate) = hypo_kl_term(
                    &args,
                    &policy,
                    reference_model.as_ref(),
                    &batch_pairs,
                    epoch,
                    b,
                )?;
                loss = (loss + (surrogate * args.kl_coef)?)?;
                kl = Some(estimate);
            }
            let loss = (loss / args.grad_accum as f64)?;
            let grads = loss.backward()?;
            let missing = missing_grads(&grads, &trainable);
            if !missing.is_empty() {
                bail!("no gradient reached {} trainable weights (first: {}): a detached op in the forward pass", missing.len(), missing[0]);
            }
            accumulated = Some(match accumulated.take() {
                None => grads,
                Some(mut acc) => {
                    for (_, var) in &trainable {
                        let sum = (acc.get(var.as_tensor()).expect("checked")
                            + grads.get(var.as_tensor()).expect("checked"))?;
                        acc.insert(var.as_tensor(), sum);
                    }
                    acc
                }
            });
            step_metrics.add_batch(
                &losses,
                pc,
                pr,
                &weights,
                loss.to_scalar::<f32>()? * args.grad_accum as f32,
                kl,
                logps.tokens,
            )?;
            total_tokens += logps.tokens;
            micro += 1;
            if micro.is_multiple_of(args.grad_accum) || b == last_batch {
                let mut grads = accumulated.take().expect("a micro-batch ran");
                let grad_norm = clip_grad_norm(
                    &mut grads,
                    trainable.iter().map(|(_, v)| v),
                    if args.max_grad_norm > 0.0 {
                        args.max_grad_norm
                    } else {
                        f64::INFINITY
                    },
                )?;
                let lr = schedule.lr_at(optimizer.step_count());
                optimizer.set_lr(lr);
                optimizer.step(&grads)?;
                let row = step_metrics.finish(
                    optimizer.step_count(),
                    epoch,
                    grad_norm,
                    lr,
                    step_started.elapsed().as_secs_f64(),
                );
                progress.set_message(format!("loss {:.4} margin {:.3}", row.loss, row.margin));
                log.push(row)?;
                progress.inc(1);
                step_metrics = StepMetrics::default();
                step_started = Instant::now();
            }
        }
    }
    progress.finish_and_clear();
    if let Some(lora) = &policy.lora {
        lora.set_training(false);
    }
    let train_secs = train_started.elapsed().as_secs_f64();
    let last = log.last().cloned();
    let csv = log.to_csv()?;
    let explicit_metrics = args.metrics.is_some();
    optune_model::save_checkpoint_with(&policy.model, &policy.meta, &args.output, |dir| {
        if !explicit_metrics {
            std::fs::write(dir.join("metrics.csv"), &csv)?;
        }
        if let (Some(lora), true) = (&policy.lora, args.save_adapter) {
            let adapter_dir = dir.join("adapter");
            std::fs::create_dir_all(&adapter_dir)?;
            lora.write_peft(&adapter_dir, &args.policy.display().to_string())?;
        }
        Ok(())
    })?;
    let mut summary = Summary::new("opt-wdpo")
        .field("pairs", pairs.len())
        .field("steps", optimizer.step_count())
        .field("tokens", total_tokens)
        .field("train_s", format!("{train_secs:.2}"))
        .field(
            "s_per_step",
            format!("{:.3}", train_secs / optimizer.step_count().max(1) as f64),
        );
    if let Some(last) = last {
        summary = summary
            .field("final_loss", format!("{:.4}", last.loss))
            .field("final_margin", format!("{:.4}", last.margin));
    }
    if let Some(mb) = optune_model::runtime::peak_rss_mb() {
        summary = summary.field("peak_rss_mb", format!("{mb:.0}"));
    }
    summary
        .field("total_s", format!("{:.2}", started.elapsed().as_secs_f64()))
        .print();
    Ok(())
}

/// Each variable once (a tied embedding appears under one name only, but be safe).
fn dedup_vars(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    let mut seen = std::collections::HashSet::new();
    vars.iter()
        .filter(|(_, v)| seen.insert(v.as_tensor().id()))
        .cloned()
        .collect()
}

/// HyPO's KL term on fresh samples: k responses per prompt of the batch from the current policy,
/// scored by the policy (with gradient) and the reference (without).
fn hypo_kl_term(
    args: &Args,
    policy: &Policy,
    reference: Option<&Transformer>,
    batch: &[&TrainPair],
    epoch: usize,
    step: usize,
) -> Result<(Tensor, f32)> {
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
        max_new_tokens: args.kl_max_new_tokens,
    };
    if let Some(lora) = &policy.lora {
        lora.set_training(false);
    }
    let samples = generate(
        &policy.model,
        &requests,
        &params,
        &policy.meta.eos_token_ids,
        args.batch_size * k,
        |_| {},
    )?;
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
        (None, Some(lora)) => {
            lora.set_enabled(false);
            let logps = sequence_logprobs(&policy.model, &sequences, policy.pad_id)?
                .sums
                .detach()
                .to_vec1()?;
            lora.set_enabled(true);
            logps
        }
        (None, None) => bail!("HyPO needs a reference model"),
    };
    if let Some(lora) = &policy.lora {
        lora.set_training(true);
    }
    let policy_logps = sequence_logprobs(&policy.model, &sequences, policy.pad_id)?.sums;
    loo_reinforce_kl(&policy_logps, &reference_logps, k)
}

/// Writes the reference log-probs into the pairs file (atomically), so later runs skip them.
fn write_reference_columns(args: &Args, shard: &Shard, pairs: &[TrainPair]) -> Result<()> {
    let Some(path) = args.input.as_ref().filter(|p| p.as_os_str() != "-") else {
        bail!("--precompute-ref needs the pairs as a file, not stdin");
    };
    let chosen: Vec<f32> = pairs
        .iter()
        .map(|p| p.ref_logps.expect("computed").0)
        .collect();
    let rejected: Vec<f32> = pairs
        .iter()
        .map(|p| p.ref_logps.expect("computed").1)
        .collect();
    let updated = shard
        .clone()
        .with_column("ref_chosen_logp", Arc::new(Float32Array::from(chosen)))?
        .with_column("ref_rejected_logp", Arc::new(Float32Array::from(rejected)))?;
    let destination = Destination::from_arg(Some(path));
    let format = optune_shard::OutputFormat::resolve(None, &destination)?;
    optune_shard::write_shard(&updated, &destination, format)
        .with_context(|| format!("writing {}", path.display()))
}
