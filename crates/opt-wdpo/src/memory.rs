//! The memory a run needs, estimated before training and held against what the device has, so
//! a run that cannot fit stops at once with advice instead of dying mid-way.

use crate::data::TrainPair;
use crate::policy::Policy;
use crate::Args;
use anyhow::{bail, Result};
use candle_core::DType;
use optune_model::{ModelConfig, NormPlacement};

const GB: f64 = 1e9;

/// Whether a reference model other than the policy is in memory, and when.
pub enum ReferenceHeld {
    /// None: reference-free, its log-probs given, or the policy (adapters off) serves.
    Never,
    /// A separate `--ref` loaded for the reference pass, freed before training.
    ForThePass,
    /// Through training too (HyPO samples against it).
    ThroughTraining,
}

/// Bytes by kind, each an estimate for the largest micro-batch.
pub struct Plan {
    /// The model in its compute dtype (frozen weights, or casts of the masters).
    weights: f64,
    /// f32 master copies, when they are not the compute weights themselves: with --devices, its
    /// owner's only.
    masters: f64,
    /// Gradients every replica holds: f32 of the trained weights, but in bf16/f16 full
    /// fine-tuning a micro-batch's compute-dtype gradients.
    gradients: f64,
    /// Gradients only a weight's owner holds: in bf16/f16 full fine-tuning, the f32 gradients
    /// of the masters and their sums (other replicas send theirs after each micro-batch).
    owned_gradients: f64,
    optimizer: f64,
    /// A second model held through training (HyPO's reference).
    reference: f64,
    /// A separate `--ref` loaded for the reference pass only (the policy's size assumed), freed
    /// before training: it counts against the activations, which come later.
    pass_reference: f64,
    activations: f64,
    /// Without --gradient-checkpointing, the activations the run would hold with it.
    recomputed_activations: Option<f64>,
}

/// What the plan reads of a run: the model's shape and dtype, what trains, the longest
/// micro-batch. [`Plan::estimate`] reads it off a loaded policy; a test, off a config alone.
pub struct RunShape<'a> {
    pub config: &'a ModelConfig,
    /// The compute dtype of the weights.
    pub dtype: DType,
    /// Whether training takes the generic kernels (any GPU; the CPU with OPTUNE_KERNELS=generic).
    pub generic: bool,
    /// Every weight of the model.
    pub params: f64,
    /// The trained weights: the adapters under LoRA, else every weight.
    pub trained: f64,
    pub lora: bool,
    /// f32 buffers of the optimiser per trained weight (AdamW 2, RMSprop 1).
    pub optimizer_buffers: f64,
    /// Pairs in the largest micro-batch.
    pub pairs: f64,
    /// Tokens of the longest side (each micro-batch is padded to it).
    pub longest: f64,
    pub gradient_checkpointing: bool,
    pub reference: ReferenceHeld,
}

impl<'a> RunShape<'a> {
    /// The run `args` describe on `pairs`, of a model of `config` computing in `dtype` on the
    /// generic kernels or not, training `trained` weights (every weight without LoRA).
    pub fn of_args(
        args: &Args,
        config: &'a ModelConfig,
        (dtype, generic): (DType, bool),
        trained: f64,
        pairs: &[TrainPair],
        reference: ReferenceHeld,
    ) -> Self {
        RunShape {
            config,
            dtype,
            generic,
            params: optune_model::weight_count(config) as f64,
            trained,
            lora: args.lora_rank.is_some(),
            optimizer_buffers: match args.optimizer {
                optune_train::optim::OptimizerKind::Adamw => 2.0,
                optune_train::optim::OptimizerKind::Rmsprop => 1.0,
            },
            pairs: args.batch_size.min(pairs.len()) as f64,
            longest: crate::data::longest_sequence(pairs) as f64,
            gradient_checkpointing: args.gradient_checkpointing,
            reference,
        }
    }
}

impl Plan {
    /// The plan of the run `args` describe with `policy` loaded; `reference`: where the
    /// reference model is held ([`ReferenceHeld`]).
    pub fn estimate(
        args: &Args,
        policy: &Policy,
        pairs: &[TrainPair],
        reference: ReferenceHeld,
    ) -> Self {
        let model = &policy.model;
        let generic = optune_kernels::autograd_path(model.device(), model.dtype())
            == optune_kernels::Path::Generic;
        let trained = policy
            .trainable
            .iter()
            .map(|(_, v)| v.elem_count() as f64)
            .sum();
        Self::of_run(RunShape::of_args(
            args,
            model.config(),
            (model.dtype(), generic),
            trained,
            pairs,
            reference,
        ))
    }

    pub fn of_run(run: RunShape) -> Self {
        let c = run.config;
        let compute = run.dtype.size_in_bytes() as f64;
        let (params, trained) = (run.params, run.trained);
        let full_in_half = !run.lora && run.dtype != DType::F32;
        // The longest micro-batch: chosen and rejected sides, padded to the longest sequence.
        let longest = run.longest;
        let tokens = 2.0 * run.pairs * longest;
        let (h, i, heads) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            c.num_attention_heads as f64,
        );
        // The queries' and the keys' widths (hidden and less under GQA, or as `head_dim` says).
        let (q, kv) = (
            heads * c.head_dim() as f64,
            (c.num_kv_heads() * c.head_dim()) as f64,
        );
        let layers = c.num_hidden_layers as f64;
        let generic = run.generic;
        // What autograd keeps per token and layer, in the compute dtype, on either path: the
        // stream and its norm before attention and before the MLP (4 h), the pending attention
        // and MLP outputs (2 h), q, k and v (q + 2 kv: the attention node splits and rotates
        // them again in its backward pass), the attention's merged output (q), and the MLP's
        // gate, up and product (3 i); a bias's sum keeps the product before it too. No path
        // keeps attention scores (nor a copy of the mask, made once in the dtype each path adds
        // it in): the fused attention makes them a (batch, KV head) block at a time inside its
        // op, the generic attention's backward pass one layer's again (`attention_pass` below).
        // optune-model's tests/layer_memory.rs counts 1.01 times this on either path (LoRA's
        // low-rank products besides). The norms of queries and keys (Qwen3, OLMo-2) keep their
        // inputs too (q + kv), like a bias's sum.
        let bias = |present: bool, elements: f64| if present { elements } else { 0.0 };
        let biases = bias(c.qkv_bias(), q + 2.0 * kv)
            + bias(c.o_bias(), h)
            + bias(c.mlp_bias(), 2.0 * i + h)
            + bias(c.qk_norm().is_some(), q + kv)
            // Gemma 3's norms after the sublayers keep each output's input besides the
            // norms before them.
            + bias(c.norm_placement() == NormPlacement::BeforeAndAfter, 2.0 * h);
        let per_token_layer = (6.0 * h + 2.0 * q + 2.0 * kv + 3.0 * i + biases) * compute;
        // The generic attention's scores, masked scores, probabilities and their gradients in f32
        // (six buffers) for one layer, a piece of at most ATTENTION_PIECE_SCORES at a time.
        let scores = (tokens * heads * longest).min(optune_kernels::ATTENTION_PIECE_SCORES as f64);
        let attention_pass = if generic { 6.0 * 4.0 * scores } else { 0.0 };
        // Recomputed: the stream and the pending MLP output of every layer, and one layer's
        // activations at a time.
        let recomputed = layers * 2.0 * h * compute + per_token_layer;
        let layers_kept = match run.gradient_checkpointing {
            true => recomputed,
            false => layers * per_token_layer,
        };
        // One chunk of logits, its softmax and its gradient at a time, in f32; the fused head
        // also keeps all the forward pass's logits for the backward pass when they fit its bound.
        let head = 3.0 * optune_kernels::HEAD_CHUNK_ROWS as f64 * c.vocab_size as f64 * 4.0;
        let all_logits = tokens * c.vocab_size as f64 * 4.0;
        let kept = !generic && all_logits <= optune_kernels::KEPT_LOGITS_BYTES as f64;
        let head = head + if kept { all_logits } else { 0.0 };
        Self {
            weights: params * compute,
            masters: if full_in_half { trained * 4.0 } else { 0.0 },
            gradients: trained * if full_in_half { compute } else { 4.0 },
            owned_gradients: if full_in_half { trained * 4.0 } else { 0.0 },
            optimizer: trained * 4.0 * run.optimizer_buffers,
            reference: match run.reference {
                ReferenceHeld::ThroughTraining => params * compute,
                _ => 0.0,
            },
            pass_reference: match run.reference {
                ReferenceHeld::ForThePass => params * compute,
                _ => 0.0,
            },
            activations: tokens * layers_kept + head + attention_pass,
            recomputed_activations: (!run.gradient_checkpointing)
                .then_some(tokens * recomputed + head + attention_pass),
        }
    }

    /// The plan of `replicas` copies of the run on one device (`--devices` naming it more than
    /// once, or the host's memory shared), which together own `share` of the trained weights
    /// and hold that share of the optimiser's moments, of the f32 masters and of the gradients
    /// only owners hold.
    pub fn for_replicas(&self, replicas: usize, share: f64) -> Plan {
        let n = replicas as f64;
        Plan {
            weights: self.weights * n,
            masters: self.masters * share,
            gradients: self.gradients * n + self.owned_gradients * share,
            owned_gradients: 0.0,
            optimizer: self.optimizer * share,
            reference: self.reference * n,
            pass_reference: self.pass_reference * n,
            activations: self.activations * n,
            recomputed_activations: self.recomputed_activations.map(|bytes| bytes * n),
        }
    }

    /// The fewest devices, 2 to 16, over which `--devices` brings this one-device plan within
    /// `limit` bytes on each, with the plan of the device owning the most; `elements`: the
    /// trained weights' sizes in the owners' order.
    pub fn fewest_devices(&self, elements: &[usize], limit: f64) -> Option<(usize, f64)> {
        (2..=16).find_map(|count| {
            let shares = crate::parallel::owned_shares(elements, count);
            let most = shares.into_iter().fold(0.0, f64::max);
            let each = self.for_replicas(1, most).total();
            (each <= limit).then_some((count, each))
        })
    }

    pub fn total(&self) -> f64 {
        // Allocator slack and temporaries the estimate does not itemise.
        1.1 * (self.weights
            + self.masters
            + self.gradients
            + self.owned_gradients
            + self.optimizer
            + self.reference
            + self.activations.max(self.pass_reference))
    }

    pub fn describe(&self) -> String {
        let parts = [
            ("weights", self.weights),
            ("f32 masters", self.masters),
            ("gradients", self.gradients + self.owned_gradients),
            ("optimizer", self.optimizer),
            ("reference", self.reference),
            ("--ref (reference pass only)", self.pass_reference),
            ("activations", self.activations),
        ];
        let listed: Vec<String> = parts
            .iter()
            .filter(|(_, bytes)| *bytes > 0.0)
            .map(|(name, bytes)| format!("{name} {}", three_figures(*bytes)))
            .collect();
        format!("{:.2} GB ({}, +10 %)", self.total() / GB, listed.join(", "))
    }

    /// Prints the estimate and refuses a run that cannot fit in `available` bytes.
    pub fn check(&self, available: Option<f64>, what: &str) -> Result<()> {
        let Some(available) = available else {
            eprintln!(
                "opt-wdpo: memory estimate {} ({what}: unknown)",
                self.describe()
            );
            return Ok(());
        };
        eprintln!(
            "opt-wdpo: memory estimate {} of {:.2} GB {what}",
            self.describe(),
            available / GB
        );
        if self.total() > available {
            // Worth naming where the optimiser's moments outweigh the model (full fine-tuning).
            let spread = match self.optimizer > self.weights {
                true => {
                    "deal the optimiser's state over more GPUs (--devices cuda:0,cuda:1,…: each \
                     keeps the moments, and in bf16 the f32 masters, of about 1/N of the \
                     weights), "
                }
                false => "",
            };
            bail!(
                "this run needs about {:.2} GB but {:.2} GB are {what}: {}{spread}train LoRA \
                 adapters (--lora-rank 16) instead of every weight, lower --batch-size (with \
                 --grad-accum to keep the pairs per step), lower --max-length, or compute in bf16 \
                 (--dtype bf16); --memory-budget GB plans against another amount",
                self.total() / GB,
                available / GB,
                match self.recomputed_activations {
                    Some(recomputed) => format!(
                        "recompute activations (--gradient-checkpointing: about {:.2} GB), ",
                        (self.total() - 1.1 * (self.activations - recomputed)) / GB
                    ),
                    None => String::new(),
                }
            );
        }
        Ok(())
    }
}

/// `bytes` to three significant figures in kB, MB or GB: a LoRA run's gradients (megabytes)
/// beside its weights (gigabytes).
fn three_figures(bytes: f64) -> String {
    let (value, unit) = [(GB, "GB"), (1e6, "MB"), (1e3, "kB")]
        .into_iter()
        .map(|(size, unit)| (bytes / size, unit))
        .find(|(value, _)| *value >= 1.0)
        .unwrap_or((bytes / 1e3, "kB"));
    let decimals = match value {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        _ => 2,
    };
    format!("{value:.decimals$} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A llama config of the given shape: 32,000 words, the head untied.
    fn llama(h: usize, i: usize, heads: usize, kv_heads: usize, layers: usize) -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "llama", "vocab_size": 32000, "hidden_size": h,
            "intermediate_size": i, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
            "tie_word_embeddings": false,
        });
        ModelConfig::from_json_str(&json.to_string()).unwrap()
    }

    fn params(c: &ModelConfig) -> f64 {
        optune_model::weight_count(c) as f64
    }

    /// LoRA rank 16's A and B on the named projections (`q` for `q_proj`) of every layer.
    fn lora_weights(c: &ModelConfig, targets: &[&str]) -> f64 {
        let lora = optune_model::lora::LoraConfig {
            rank: 16,
            alpha: 16.0,
            dropout: 0.0,
            targets: targets.iter().map(|t| format!("{t}_proj")).collect(),
        };
        lora.adapter_weight_count(c).unwrap() as f64
    }

    /// A bf16 run on the generic kernels (a GPU's) with AdamW and no reference held.
    fn bf16_plan(c: &ModelConfig, lora: Option<&[&str]>, pairs: usize, longest: usize) -> Plan {
        bf16_plan_with(c, lora, pairs, longest, false)
    }

    fn bf16_plan_with(
        c: &ModelConfig,
        lora: Option<&[&str]>,
        pairs: usize,
        longest: usize,
        gradient_checkpointing: bool,
    ) -> Plan {
        Plan::of_run(bf16_shape(c, lora, pairs, longest, gradient_checkpointing))
    }

    fn bf16_shape<'a>(
        c: &'a ModelConfig,
        lora: Option<&[&str]>,
        pairs: usize,
        longest: usize,
        gradient_checkpointing: bool,
    ) -> RunShape<'a> {
        RunShape {
            config: c,
            dtype: DType::BF16,
            generic: true,
            params: params(c),
            trained: lora.map_or(params(c), |targets| lora_weights(c, targets)),
            lora: lora.is_some(),
            optimizer_buffers: 2.0,
            pairs: pairs as f64,
            longest: longest as f64,
            gradient_checkpointing,
            reference: ReferenceHeld::Never,
        }
    }

    /// The table "What it gives in bf16 for sequences of 512 tokens" in docs/cuda.md with its rows
    /// over --devices, and the Zephyr recipe's figures in pipelines/zephyr-ultrachat.mk and
    /// docs/pipeline.md (LoRA on one GPU, the full recipe on eight): the
    /// documents state these plans (weights, masters + gradients + moments, activations, total,
    /// in GB to one decimal), and change with the planner.
    #[test]
    fn the_documented_plans() {
        let llama_7b = llama(4096, 11008, 32, 32, 32);
        let tiny_llama = llama(2048, 5632, 32, 4, 22);
        let mistral_7b = llama(4096, 14336, 32, 8, 32);
        let attention: &[&str] = &["q", "k", "v", "o"];
        let every: &[&str] = &["q", "k", "v", "o", "gate", "up", "down"];
        let rows: [(&str, Plan, [f64; 4]); 9] = [
            (
                "7B LoRA, 1 pair",
                bf16_plan(&llama_7b, Some(attention), 1, 512),
                [13.5, 0.2, 5.3, 20.9],
            ),
            (
                "7B LoRA, 4 pairs",
                bf16_plan(&llama_7b, Some(attention), 4, 512),
                [13.5, 0.2, 21.1, 38.3],
            ),
            (
                "1.1B full, 1 pair",
                bf16_plan(&tiny_llama, None, 1, 512),
                [2.2, 19.8, 2.0, 26.4],
            ),
            (
                "1.1B full, 8 pairs",
                bf16_plan(&tiny_llama, None, 8, 512),
                [2.2, 19.8, 13.9, 39.5],
            ),
            (
                "7B full, 1 pair",
                bf16_plan(&llama_7b, None, 1, 512),
                [13.5, 121.3, 5.3, 154.1],
            ),
            (
                "7B LoRA recomputed, 4 pairs",
                bf16_plan_with(&llama_7b, Some(attention), 4, 512, true),
                [13.5, 0.2, 4.5, 20.0],
            ),
            (
                "7B LoRA recomputed, 16 pairs",
                bf16_plan_with(&llama_7b, Some(attention), 16, 512, true),
                [13.5, 0.2, 12.7, 29.0],
            ),
            (
                "1.1B full recomputed, 8 pairs",
                bf16_plan_with(&tiny_llama, None, 8, 512, true),
                [2.2, 19.8, 3.7, 28.3],
            ),
            (
                "7B full recomputed, 1 pair",
                bf16_plan_with(&llama_7b, None, 1, 512, true),
                [13.5, 121.3, 1.2, 149.6],
            ),
        ];
        let recipe = [
            (
                "Zephyr recipe",
                bf16_plan_with(&mistral_7b, Some(every), 4, 1024, true),
                [14.5, 0.5, 7.3, 24.5],
            ),
            (
                "Zephyr recipe, no recomputation",
                bf16_plan(&mistral_7b, Some(every), 4, 1024),
                [14.5, 0.5, 42.5, 63.2],
            ),
        ];
        // Full fine-tuning over --devices: the plan of the device owning the most moments.
        let on_devices = |plan: Plan, c: &ModelConfig, devices: usize| {
            let mut shapes = optune_model::llama_weight_shapes(c);
            shapes.sort();
            let elements: Vec<usize> = shapes.iter().map(|(_, s)| s.iter().product()).collect();
            let shares = crate::parallel::owned_shares(&elements, devices);
            plan.for_replicas(1, shares.into_iter().fold(0.0, f64::max))
        };
        let devices = [
            (
                "7B full, 1 pair, 2 devices",
                on_devices(bf16_plan(&llama_7b, None, 1, 512), &llama_7b, 2),
                [13.5, 67.7, 5.3, 95.2],
            ),
            (
                "7B full, 1 pair, 8 devices",
                on_devices(bf16_plan(&llama_7b, None, 1, 512), &llama_7b, 8),
                [13.5, 27.2, 5.3, 50.6],
            ),
            (
                "Zephyr full recipe, 1 device",
                bf16_plan_with(&mistral_7b, None, 8, 1024, true),
                [14.5, 130.4, 12.8, 173.5],
            ),
            (
                "Zephyr full recipe, 8 devices",
                on_devices(
                    bf16_plan_with(&mistral_7b, None, 8, 1024, true),
                    &mistral_7b,
                    8,
                ),
                [14.5, 29.4, 12.8, 62.4],
            ),
            (
                "7B full recomputed, 1 pair, 8 devices",
                on_devices(bf16_plan_with(&llama_7b, None, 1, 512, true), &llama_7b, 8),
                [13.5, 27.2, 1.2, 46.0],
            ),
        ];
        let all = rows.into_iter().chain(recipe).chain(devices);
        for (name, plan, [weights, states, activations, total]) in all {
            let got = [
                plan.weights,
                plan.masters + plan.gradients + plan.owned_gradients + plan.optimizer,
                plan.activations,
                plan.total(),
            ]
            .map(|bytes| (bytes / GB * 10.0).round() / 10.0);
            assert_eq!(
                got,
                [weights, states, activations, total],
                "{name}: {}",
                plan.describe()
            );
        }
    }

    /// The fewest devices count the share the largest owner holds, not an equal one: a weight of
    /// 60 % of the elements keeps its owner at 60 % however many devices there are.
    #[test]
    fn the_fewest_devices_are_those_the_largest_owner_fits() {
        let llama_7b = llama(4096, 11008, 32, 32, 32);
        let plan = bf16_plan(&llama_7b, None, 1, 512);
        let mut shapes = optune_model::llama_weight_shapes(&llama_7b);
        shapes.sort();
        let elements: Vec<usize> = shapes.iter().map(|(_, s)| s.iter().product()).collect();
        let on = |count: usize| {
            let shares = crate::parallel::owned_shares(&elements, count);
            plan.for_replicas(1, shares.into_iter().fold(0.0, f64::max))
                .total()
        };
        assert_eq!(plan.fewest_devices(&elements, 80e9), Some((3, on(3))));
        assert!(on(2) > 80e9 && on(3) <= 80e9, "{} {}", on(2), on(3));
        assert_eq!(plan.fewest_devices(&elements, 150e9), Some((2, on(2))));
        assert_eq!(plan.fewest_devices(&elements, 1e9), None);
        let lopsided = [60, 10, 10, 10, 10];
        let at_60 = plan.for_replicas(1, 0.6).total();
        assert_eq!(plan.fewest_devices(&lopsided, at_60 - 1.0), None);
        assert_eq!(plan.fewest_devices(&lopsided, at_60), Some((2, at_60)));
    }

    #[test]
    fn parts_read_to_three_figures() {
        let cases = [
            (13.48e9, "13.5 GB"),
            (121.3e9, "121 GB"),
            (1.18e6, "1.18 MB"),
            (67.1e6, "67.1 MB"),
            (999.4e6, "999 MB"),
            (2.5e3, "2.50 kB"),
            (12.0, "0.01 kB"),
        ];
        for (bytes, text) in cases {
            assert_eq!(three_figures(bytes), text);
        }
    }

    /// The generic attention's pass holds one piece of scores (24 bytes each) however long the
    /// sequences, and the fused path's none: past a piece a layer, the activations grow with the
    /// tokens, not with their square.
    #[test]
    fn the_attention_pass_is_one_piece_at_most() {
        let llama_7b = llama(4096, 11008, 32, 32, 32);
        let attention: &[&str] = &["q", "k", "v", "o"];
        // 32 pairs of 2,048 tokens: 2^33 scores a layer, 128 pieces.
        let plan = |generic| {
            Plan::of_run(RunShape {
                generic,
                ..bf16_shape(&llama_7b, Some(attention), 32, 2048, true)
            })
        };
        let piece = 24.0 * optune_kernels::ATTENTION_PIECE_SCORES as f64;
        let extra = plan(true).activations - plan(false).activations;
        assert!(
            (extra - piece).abs() < 1e-9 * piece,
            "{extra} against {piece}"
        );
    }
}
