//! The memory a run needs, estimated before training and held against what the device has, so
//! a run that cannot fit stops at once with advice instead of dying mid-way.

use crate::data::TrainPair;
use crate::policy::Policy;
use crate::Args;
use anyhow::{bail, Result};
use candle_core::DType;

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
    /// f32 master copies, when they are not the compute weights themselves.
    masters: f64,
    /// f32 gradients of the trained weights (and, in bf16 full fine-tuning, the compute-dtype
    /// gradients they are cast from).
    gradients: f64,
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

impl Plan {
    /// `reference`: where the reference model is held ([`ReferenceHeld`]).
    pub fn estimate(
        args: &Args,
        policy: &Policy,
        pairs: &[TrainPair],
        reference: ReferenceHeld,
    ) -> Self {
        let model = &policy.model;
        let compute = model.dtype().size_in_bytes() as f64;
        let params = model.parameter_count() as f64;
        let trained: f64 = policy
            .trainable
            .iter()
            .map(|(_, v)| v.elem_count() as f64)
            .sum();
        let full_in_half = policy.lora.is_none() && model.dtype() != DType::F32;
        let buffers = match args.optimizer {
            optune_train::optim::OptimizerKind::Adamw => 2.0,
            optune_train::optim::OptimizerKind::Rmsprop => 1.0,
        };
        // The longest micro-batch: chosen and rejected sides, padded to the longest sequence.
        let longest = crate::data::longest_sequence(pairs) as f64;
        let tokens = 2.0 * args.batch_size.min(pairs.len()) as f64 * longest;
        let c = model.config();
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
        let generic = optune_kernels::autograd_path(model.device(), model.dtype())
            == optune_kernels::Path::Generic;
        // What autograd keeps per token and layer, in the compute dtype, on either path: the
        // stream and its norm before attention and before the MLP (4 h), the pending attention
        // and MLP outputs (2 h), q, k and v (q + 2 kv: the attention node splits and rotates
        // them again in its backward pass), the attention's merged output (q), and the MLP's
        // gate, up and product (3 i); a bias's sum keeps the product before it too. No path
        // keeps attention scores (nor a copy of the mask, made once in the dtype each path adds
        // it in): the fused attention makes them a (batch, KV head) block at a time inside its
        // op, the generic attention's backward pass one layer's again (`attention_pass` below).
        // optune-model's tests/layer_memory.rs counts 1.01 times this on either path (LoRA's
        // low-rank products besides).
        let bias = |present: bool, elements: f64| if present { elements } else { 0.0 };
        let biases = bias(c.qkv_bias(), q + 2.0 * kv)
            + bias(c.o_bias(), h)
            + bias(c.mlp_bias(), 2.0 * i + h);
        let per_token_layer = (6.0 * h + 2.0 * q + 2.0 * kv + 3.0 * i + biases) * compute;
        // The generic attention's scores, masked scores, probabilities and their gradients in f32
        // (six buffers) for one layer, a piece of at most ATTENTION_PIECE_SCORES at a time.
        let scores = (tokens * heads * longest).min(optune_kernels::ATTENTION_PIECE_SCORES as f64);
        let attention_pass = if generic { 6.0 * 4.0 * scores } else { 0.0 };
        // Recomputed: the stream and the pending MLP output of every layer, and one layer's
        // activations at a time.
        let recomputed = layers * 2.0 * h * compute + per_token_layer;
        let layers_kept = match args.gradient_checkpointing {
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
            gradients: trained * 4.0 + if full_in_half { trained * compute } else { 0.0 },
            optimizer: trained * 4.0 * buffers,
            reference: match reference {
                ReferenceHeld::ThroughTraining => params * compute,
                _ => 0.0,
            },
            pass_reference: match reference {
                ReferenceHeld::ForThePass => params * compute,
                _ => 0.0,
            },
            activations: tokens * layers_kept + head + attention_pass,
            recomputed_activations: (!args.gradient_checkpointing)
                .then_some(tokens * recomputed + head + attention_pass),
        }
    }

    /// The plan of `replicas` copies of the run on one device (`--devices` naming it more than
    /// once, or the host's memory shared), one of which holds the optimiser's moments when
    /// `holds_optimizer`.
    pub fn for_replicas(&self, replicas: usize, holds_optimizer: bool) -> Plan {
        let n = replicas as f64;
        Plan {
            weights: self.weights * n,
            masters: self.masters * n,
            gradients: self.gradients * n,
            optimizer: if holds_optimizer { self.optimizer } else { 0.0 },
            reference: self.reference * n,
            pass_reference: self.pass_reference * n,
            activations: self.activations * n,
            recomputed_activations: self.recomputed_activations.map(|bytes| bytes * n),
        }
    }

    pub fn total(&self) -> f64 {
        // Allocator slack and temporaries the estimate does not itemise.
        1.1 * (self.weights
            + self.masters
            + self.gradients
            + self.optimizer
            + self.reference
            + self.activations.max(self.pass_reference))
    }

    pub fn describe(&self) -> String {
        let parts = [
            ("weights", self.weights),
            ("f32 masters", self.masters),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("reference", self.reference),
            ("--ref (reference pass only)", self.pass_reference),
            ("activations", self.activations),
        ];
        let listed: Vec<String> = parts
            .iter()
            .filter(|(_, bytes)| *bytes > 0.0)
            .map(|(name, bytes)| format!("{name} {:.2}", bytes / GB))
            .collect();
        format!(
            "{:.2} GB ({} GB, +10 %)",
            self.total() / GB,
            listed.join(", ")
        )
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
            bail!(
                "this run needs about {:.2} GB but {:.2} GB are {what}: {}train LoRA adapters \
                 (--lora-rank 16) instead of every weight, lower --batch-size (with --grad-accum \
                 to keep the pairs per step), lower --max-length, or compute in bf16 (--dtype bf16); \
                 --memory-budget GB plans against another amount",
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
