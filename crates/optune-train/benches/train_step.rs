//! Profile of one DPO training step, split into forward, backward and optimiser, on the ~12.9M
//! random llama that `make bench-train` compares with TRL (hidden 256, 6 layers, 8 heads, 4 KV
//! heads, intermediate 768, vocab 32000, tied embeddings; 8 pairs of ~130 tokens per side), and on
//! SmolLM2-135M when `OPTUNE_SMOLLM2_DIR` names a converted Hugging Face directory (2 pairs of
//! ~128 tokens). Run with
//!
//!     cargo bench -p optune-train --bench train_step
//!
//! Environment: `OPTUNE_BENCH_THREADS` (default 2), `OPTUNE_BENCH_STEPS` (timed steps after one
//! warm-up step, default 5), `OPTUNE_SMOLLM2_DIR`.
//!
//! The step is opt-wdpo's: policy log-probs of chosen and rejected in one padded forward pass,
//! sigmoid DPO against precomputed reference log-probs, backward, global-norm clipping, AdamW
//! (full fine-tuning). The forward pass is also split into the transformer trunk and the
//! vocabulary head (projection, log-softmax, gather), and the backward likewise (the head's
//! backward is timed on its own, from detached hidden rows). `cpu` is the process CPU time over
//! the same span: above `threads × wall` nothing can be, below it the threads waited. Memory is
//! counted by the allocator (the process RSS keeps freed pages): each step's heap high-water mark,
//! and for the 12.9M llama (both variants) a table of a step's peak above the heap between steps for batches of
//! growing size (activations and gradients per token). Every model runs twice: with the training
//! path built from candle's generic ops only (`set_kernels(Kernels::Generic)`), then with the fused
//! kernels of `optune_kernels`; SmolLM2 a third time as the pipeline trains it (LoRA rank 16
//! on q/k/v/o, frozen base, 4 pairs).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use optune_model::logprobs::token_logprobs;
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{
    llama_weight_shapes, recomputed_backward, sequence_logprobs, Checkpoint, ModelConfig,
    TokenizedPair, Transformer,
};
use optune_testkit::memory::CountingAllocator;
use optune_train::loss::{dpo_losses, DpoLoss};
use optune_train::optim::{clip_grad_norm, decay_groups, AdamW, Algorithm, Optimizer};

/// SplitMix64: deterministic weights and token ids without a seeded RNG crate.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Normal(0, std) by Box-Muller.
    fn normal(&mut self, std: f64) -> f32 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const RANDOM_LLAMA: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "hidden_act": "silu"
}"#;

/// Hugging Face-named weight shapes of a llama without biases (tied head).
fn trainable_model(
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
) -> Result<(Transformer, Vec<(String, Var)>)> {
    let mut vars = Vec::new();
    let mut model_tensors = HashMap::new();
    for (name, t) in tensors {
        let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
        model_tensors.insert(name.clone(), var.as_tensor().clone());
        vars.push((name, var));
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let model = Transformer::from_weights(config, model_tensors, DType::F32, &Device::Cpu)?;
    Ok((model, vars))
}

fn random_llama() -> Result<(Transformer, Vec<(String, Var)>)> {
    let config = ModelConfig::from_json_str(RANDOM_LLAMA)?;
    let mut rng = Rng(0);
    let mut tensors = HashMap::new();
    for (name, shape) in llama_weight_shapes(&config) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n).map(|_| rng.normal(0.02)).collect()
        };
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    trainable_model(&config, tensors)
}

/// `pairs` pairs of random tokens, prompt + response ≈ `per_side` tokens on each side.
fn random_pairs(
    pairs: usize,
    per_side: usize,
    vocab: usize,
) -> Vec<(TokenizedPair, TokenizedPair)> {
    let mut rng = Rng(1);
    let mut tokens = |n: usize| {
        (0..n)
            .map(|_| 4 + rng.below(vocab - 4) as u32)
            .collect::<Vec<_>>()
    };
    (0..pairs)
        .map(|i| {
            let prompt = tokens(28 + i % 8);
            let total = per_side + i % 5 - 2;
            let chosen = TokenizedPair {
                prompt: prompt.clone(),
                response: tokens(total - prompt.len()),
            };
            let rejected = TokenizedPair {
                prompt,
                response: tokens(total - chosen.prompt.len() + 1 - i % 3),
            };
            (chosen, rejected)
        })
        .collect()
}

/// Process CPU seconds (user + system) from /proc/self/stat; 0 where unavailable.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the whole line (utime, stime) are 11 and 12 after the name; 100 Hz.
    (ticks(11) + ticks(12)) / 100.0
}

/// The heap counted, so a step's memory can be read exactly: the process RSS cannot show it, as
/// the allocator keeps freed pages mapped for reuse.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;

/// Heap bytes live now, in MB.
fn heap_mb() -> f64 {
    CountingAllocator::live() as f64 / MB
}

/// Starts a new high-water mark at the heap's current size.
fn reset_heap_peak() {
    CountingAllocator::reset_peak();
}

/// The heap's high-water mark since the last reset, in MB.
fn heap_peak_mb() -> f64 {
    CountingAllocator::peak() as f64 / MB
}

/// Wall and CPU seconds of `f`.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, f64)> {
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    let out = f()?;
    Ok((out, wall.elapsed().as_secs_f64(), cpu_seconds() - cpu))
}

#[derive(Default, Clone, Copy)]
struct Split {
    forward: f64,
    backward: f64,
    optimiser: f64,
    cpu: f64,
}

impl Split {
    fn total(&self) -> f64 {
        self.forward + self.backward + self.optimiser
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// One DPO step as opt-wdpo takes it: chosen and rejected in one padded forward pass, sigmoid
/// loss against the precomputed reference, backward, clipping, AdamW. Returns the timings and the
/// loss.
fn dpo_step(
    model: &Transformer,
    vars: &[(String, Var)],
    optimizer: &mut Optimizer,
    sequences: &[TokenizedPair],
    (ref_c, ref_r): (&Tensor, &Tensor),
) -> Result<(Split, f32)> {
    let n = sequences.len() / 2;
    let pad = model.config().pad_token_id().unwrap_or(0);
    let (loss, forward, cpu_f) = timed(|| {
        let logps = sequence_logprobs(model, sequences, pad)?;
        let (c, r) = (logps.sums.narrow(0, 0, n)?, logps.sums.narrow(0, n, n)?);
        Ok(
            dpo_losses(DpoLoss::Sigmoid, 0.1, 0.0, &c, &r, ref_c, ref_r)?
                .losses
                .mean_all()?,
        )
    })?;
    let value = loss.to_scalar::<f32>()?;
    // As opt-wdpo: gradients without their graph, the activations freed before the optimiser.
    let trained: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).collect();
    let (mut grads, backward, cpu_b) =
        timed(|| Ok(recomputed_backward(&loss, Vec::new(), &trained)?))?;
    drop(loss);
    let ((), optimiser, cpu_o) = timed(|| {
        clip_grad_norm(&mut grads, vars.iter().map(|(_, v)| v), 1.0)?;
        optimizer.step(&grads)?;
        Ok(())
    })?;
    Ok((
        Split {
            forward,
            backward,
            optimiser,
            cpu: cpu_f + cpu_b + cpu_o,
        },
        value,
    ))
}

/// The sequences of `pairs` (all chosen, then all rejected) and their reference log-probs.
fn prepare(
    model: &Transformer,
    pairs: &[(TokenizedPair, TokenizedPair)],
) -> Result<(Vec<TokenizedPair>, Tensor, Tensor)> {
    let n = pairs.len();
    let sequences: Vec<TokenizedPair> = pairs
        .iter()
        .map(|p| p.0.clone())
        .chain(pairs.iter().map(|p| p.1.clone()))
        .collect();
    let pad = model.config().pad_token_id().unwrap_or(0);
    let reference = sequence_logprobs(model, &sequences, pad)?.sums.detach();
    Ok((
        sequences,
        reference.narrow(0, 0, n)?,
        reference.narrow(0, n, n)?,
    ))
}

/// The heap's peak during a step above the heap between steps (weights, optimiser state), for
/// batches of growing pairs × length: activations and gradients, which should grow with
/// batch × length (and the gradients with the parameters).
fn activation_scaling(model: &Transformer, vars: &[(String, Var)]) -> Result<()> {
    println!("\n### step memory: heap peak during a step above the heap between steps");
    println!("| pairs | tokens per side | tokens | heap between steps MB | step peak MB | above MB | KB per token |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut optimizer = Optimizer::new(
        decay_groups(vars.to_vec(), 0.0),
        Algorithm::AdamW(AdamW::default()),
        1e-5,
    )?;
    for (pairs, per_side) in [(2, 130), (4, 130), (8, 65), (8, 130), (16, 130)] {
        let pairs = random_pairs(pairs, per_side, model.config().vocab_size);
        let (sequences, ref_c, ref_r) = prepare(model, &pairs)?;
        let tokens: usize = sequences
            .iter()
            .map(|s| s.prompt.len() + s.response.len())
            .sum();
        // One step first so that the optimiser state exists.
        dpo_step(model, vars, &mut optimizer, &sequences, (&ref_c, &ref_r))?;
        let rest = heap_mb();
        reset_heap_peak();
        dpo_step(model, vars, &mut optimizer, &sequences, (&ref_c, &ref_r))?;
        let (peak, above) = (heap_peak_mb(), heap_peak_mb() - rest);
        println!(
            "| {} | {per_side} | {tokens} | {rest:.0} | {peak:.0} | {above:.0} | {:.1} |",
            pairs.len(),
            above * 1024.0 / tokens as f64
        );
    }
    Ok(())
}

fn profile(
    label: &str,
    model: &Transformer,
    vars: &[(String, Var)],
    pairs: &[(TokenizedPair, TokenizedPair)],
    steps: usize,
) -> Result<()> {
    let n = pairs.len();
    let (sequences, ref_c, ref_r) = prepare(model, pairs)?;
    let tokens: usize = sequences
        .iter()
        .map(|s| s.prompt.len() + s.response.len())
        .sum();
    let targets: Vec<u32> = sequences
        .iter()
        .flat_map(|s| s.response.iter().copied())
        .collect();
    let mut optimizer = Optimizer::new(
        decay_groups(vars.to_vec(), 0.0),
        Algorithm::AdamW(AdamW::default()),
        1e-5,
    )?;
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "\n## {label}: {:.1}M parameters, {n} pairs, {} sequences, {tokens} tokens ({} response tokens), {} threads",
        params as f64 / 1e6,
        sequences.len(),
        targets.len(),
        rayon::current_num_threads()
    );
    println!("| step | forward s | backward s | optimiser s | total s | cpu s | tokens/s | heap peak MB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut splits = Vec::new();
    for step in 0..=steps {
        reset_heap_peak();
        let (s, _) = dpo_step(model, vars, &mut optimizer, &sequences, (&ref_c, &ref_r))?;
        let tag = if step == 0 {
            "warm-up".to_string()
        } else {
            step.to_string()
        };
        println!(
            "| {tag} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.0} | {:.0} |",
            s.forward,
            s.backward,
            s.optimiser,
            s.total(),
            s.cpu,
            tokens as f64 / s.total(),
            heap_peak_mb()
        );
        if step > 0 {
            splits.push(s);
        }
    }
    let m = Split {
        forward: median(splits.iter().map(|s| s.forward).collect()),
        backward: median(splits.iter().map(|s| s.backward).collect()),
        optimiser: median(splits.iter().map(|s| s.optimiser).collect()),
        cpu: median(splits.iter().map(|s| s.cpu).collect()),
    };
    let total = median(splits.iter().map(|s| s.total()).collect());
    println!(
        "| **median** | {:.3} | {:.3} | {:.3} | {total:.3} | {:.2} | {:.0} |",
        m.forward,
        m.backward,
        m.optimiser,
        m.cpu,
        tokens as f64 / total
    );

    // The vocabulary head alone, from detached hidden rows: projection, log-softmax, gather.
    let hidden = model.config().hidden_size;
    let mut rng = Rng(2);
    let rows: Vec<f32> = (0..targets.len() * hidden)
        .map(|_| rng.normal(1.0))
        .collect();
    let rows = Var::from_tensor(&Tensor::from_vec(
        rows,
        (targets.len(), hidden),
        &Device::Cpu,
    )?)?;
    let mut head = (Vec::new(), Vec::new());
    for _ in 0..=steps.min(3) {
        let (sum, f, _) =
            timed(|| Ok(token_logprobs(model, rows.as_tensor(), &targets)?.sum_all()?))?;
        let (_, b, _) = timed(|| Ok(sum.backward()?))?;
        head.0.push(f);
        head.1.push(b);
    }
    head.0.remove(0);
    head.1.remove(0);
    let (hf, hb) = (median(head.0), median(head.1));
    println!(
        "\n| part | forward s | backward s |\n|---|---:|---:|\n| vocabulary head ({} rows x {}) | {hf:.3} | {hb:.3} |\n\
         | transformer trunk (the rest) | {:.3} | {:.3} |",
        targets.len(),
        model.config().vocab_size,
        (m.forward - hf).max(0.0),
        (m.backward - hb).max(0.0)
    );
    Ok(())
}

fn main() -> Result<()> {
    let threads = std::env::var("OPTUNE_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let steps = std::env::var("OPTUNE_BENCH_STEPS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    optune_kernels::runtime::init(Some(threads))?;
    println!("# one DPO step (sigmoid, reference precomputed, full fine-tuning, AdamW, f32)");

    // Each model twice: the training path built from candle's generic ops only (as before the
    // fused kernels), then with them; a fresh model each time so both start from the same weights.
    let variants = [
        ("generic ops", optune_kernels::Kernels::Generic),
        ("fused ops", optune_kernels::Kernels::Fused),
    ];
    for (variant, fused) in variants {
        optune_kernels::set_kernels(fused);
        let (model, vars) = random_llama()?;
        let pairs = random_pairs(8, 130, model.config().vocab_size);
        profile(
            &format!("random llama 12.9M, {variant}"),
            &model,
            &vars,
            &pairs,
            steps,
        )?;
        activation_scaling(&model, &vars)?;
    }

    let Some(dir) = std::env::var_os("OPTUNE_SMOLLM2_DIR") else {
        println!("\n(SmolLM2-135M skipped: set OPTUNE_SMOLLM2_DIR to a converted Hugging Face directory)");
        return Ok(());
    };
    let read = || {
        Checkpoint::read(std::path::Path::new(&dir), &Device::Cpu)
            .with_context(|| format!("OPTUNE_SMOLLM2_DIR={}", dir.to_string_lossy()))
    };
    for (variant, fused) in variants {
        optune_kernels::set_kernels(fused);
        let checkpoint = read()?;
        let (model, vars) = trainable_model(&checkpoint.meta.config, checkpoint.tensors)?;
        let pairs = random_pairs(2, 128, model.config().vocab_size);
        profile(
            &format!("SmolLM2-135M, {variant}"),
            &model,
            &vars,
            &pairs,
            steps.min(3),
        )?;
    }
    // The pipeline's setting: LoRA rank 16 on q/k/v/o over frozen f32 weights, 4 pairs.
    let checkpoint = read()?;
    let mut model = Transformer::from_weights(
        &checkpoint.meta.config,
        checkpoint.tensors,
        DType::F32,
        &Device::Cpu,
    )?;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        .map(String::from)
        .to_vec();
    let adapters = attach_lora(
        &mut model,
        &LoraConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets,
        },
        0,
    )?;
    let pairs = random_pairs(4, 128, model.config().vocab_size);
    profile(
        "SmolLM2-135M, fused ops, LoRA r16 on q/k/v/o",
        &model,
        &adapters.vars,
        &pairs,
        steps.min(3),
    )?;
    Ok(())
}
