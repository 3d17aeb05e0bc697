//! The decoder-only transformer shared by the families of [`optune_checkpoint::Family`], read top
//! to bottom: embed → N × (RMSNorm → rotary GQA attention → residual → RMSNorm → SwiGLU MLP →
//! residual) → RMSNorm → head. The families' departures are switches read once from the config:
//! norms of the queries and keys before the rotation (each head: Qwen3, EXAONE 4, Gemma 3; each
//! whole projection: OLMo 2 and 3), norms on the sublayers' outputs instead of their inputs (OLMo
//! 2 and 3, EXAONE 4) or on both (Gemma 3, whose norms scale by 1 + weight, whose embedding is
//! scaled and whose gate is a GELU), and each layer's window and rotation (`AttentionKind`).
//!
//! Two paths over one set of weights:
//! * [`Transformer::hidden_states`], the training path: a padded batch with an attention mask,
//!   every position, built only from ops that propagate gradients (or
//!   [`Transformer::hidden_states_recomputed`], which keeps only each block's input and runs the
//!   blocks again in the backward pass);
//! * [`Transformer::prefill`] / [`Transformer::decode_step`], the inference path with a KV cache
//!   whose slots can hold sequences of different lengths (continuous batching).

use crate::linear::{Linear, ModelWeight};
use crate::rope::RotaryTables;
use anyhow::{bail, Context};
use candle_core::{CpuStorage, DType, Device, Result, Storage, StorageRef, Tensor, TensorId};
use half::bf16;
use optune_checkpoint::{Activation, LayerRotation, ModelConfig, NormPlacement, QkNorm};
use optune_kernels::{host, ops, BlockTable, Path, TokenTables};
use optune_kernels::{matmul_bf16_packed, Mat, PackedRhs, ProductPrecision};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

mod recompute;
pub use recompute::{recomputed_backward, RecomputedPass};

/// Additive mask value for disallowed keys. Finite so that a row never turns into NaN.
const MASKED: f32 = -1e30;

/// What sits on top of the final norm.
#[derive(Clone)]
pub enum OutputHead {
    /// `lm_head.weight [vocab, hidden]`; the embedding matrix itself when tied.
    LanguageModel { weight: Tensor, tied: bool },
    /// A sequence-classification head (`score.weight [num_labels, hidden]`), read at the last
    /// non-padding token: a reward model.
    Score { weight: Tensor },
}

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// The RMS norms of the queries and keys (Qwen3's, OLMo-2's).
    head_norms: Option<HeadNorms>,
    /// q, k and v's weights stacked ([`Transformer::stack_projections`]), whose row blocks the
    /// three projections' weights are views of: generation's one product for the three.
    qkv: Option<Linear>,
}

/// RMS norms of the query and key projections (`self_attn.q_norm.weight` and
/// `self_attn.k_norm.weight`), applied before the rotary embedding: over each head's `head_dim`
/// values (Qwen3, weights `[head_dim]`) or over a token's whole projection (OLMo-2, weights
/// `[heads·head_dim]` and `[kv_heads·head_dim]`).
#[derive(Clone)]
struct HeadNorms {
    span: QkNorm,
    q: Tensor,
    k: Tensor,
}

impl HeadNorms {
    fn load(
        config: &ModelConfig,
        weights: &mut WeightMap,
        attn: &str,
    ) -> anyhow::Result<Option<Self>> {
        let Some(span) = config.qk_norm() else {
            return Ok(None);
        };
        let [q, k] = qk_norm_widths(config, span);
        Ok(Some(Self {
            span,
            q: weights.take(&format!("{attn}.q_norm.weight"), &[q])?,
            k: weights.take(&format!("{attn}.k_norm.weight"), &[k])?,
        }))
    }

    /// Projections `[q, k]` (`[b, t, heads·d]`, `[b, t, kv_heads·d]`) normalised, the weights
    /// taken plus `offset` ([`offset_weight`]).
    fn forward(&self, [q, k]: [&Tensor; 2], eps: f64, offset: f64) -> Result<[Tensor; 2]> {
        let (q_weight, k_weight) = (
            offset_weight(&self.q, offset)?,
            offset_weight(&self.k, offset)?,
        );
        Ok(match self.span {
            QkNorm::PerHead => [
                ops::rms_norm_heads(q, &q_weight, eps)?,
                ops::rms_norm_heads(k, &k_weight, eps)?,
            ],
            QkNorm::WholeProjection => [
                ops::rms_norm(q, &q_weight, eps)?,
                ops::rms_norm(k, &k_weight, eps)?,
            ],
        })
    }

    /// q, k and v side by side (`[b, t, (heads + 2·kv_heads)·d]`), q and k normalised: one op
    /// on a GPU where the norms' units are of one width (every head; or the whole projections
    /// without GQA, one unit each), else q's and k's columns normalised apart.
    fn forward_stacked(
        &self,
        rows: &Tensor,
        heads: (usize, usize),
        eps: f64,
        offset: f64,
    ) -> Result<Tensor> {
        let units = match self.span {
            QkNorm::PerHead => heads,
            QkNorm::WholeProjection => (1, 1),
        };
        if self.q.dims() == self.k.dims() {
            let (q, k) = (
                offset_weight(&self.q, offset)?,
                offset_weight(&self.k, offset)?,
            );
            return ops::head_rms_norm(rows, [&q, &k], units, eps, ops::Pass::Generation);
        }
        let (q_width, k_width) = (self.q.elem_count(), self.k.elem_count());
        let width = rows.dim(candle_core::D::Minus1)?;
        let columns = |from, count| rows.narrow(candle_core::D::Minus1, from, count);
        let [q, k] = self.forward(
            [&columns(0, q_width)?, &columns(q_width, k_width)?],
            eps,
            offset,
        )?;
        let values = columns(q_width + k_width, width - q_width - k_width)?;
        Tensor::cat(&[&q, &k, &values], candle_core::D::Minus1)
    }
}

/// The widths of the q and k norms' weights.
fn qk_norm_widths(config: &ModelConfig, span: QkNorm) -> [usize; 2] {
    let d = config.head_dim();
    match span {
        QkNorm::PerHead => [d, d],
        QkNorm::WholeProjection => [config.num_attention_heads * d, config.num_kv_heads() * d],
    }
}

#[derive(Clone)]
struct Mlp {
    /// The gate's function: SiLU, or Gemma's GELU (tanh).
    activation: Activation,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// gate's and up's weights stacked, as `qkv` in [`Attention`].
    gate_up: Option<Linear>,
}

#[derive(Clone)]
struct Block {
    /// The index of the block's [`AttentionKind`] in [`Transformer::attention_kinds`].
    kind: usize,
    norms: BlockNorms,
    self_attn: Attention,
    mlp: Mlp,
}

/// A block's RMS norms (`[hidden]` each) around its two sublayers, the attention and the MLP,
/// where [`NormPlacement`] puts them: before each (what it reads), after each (its output before
/// the residual add, the sublayer then reading the stream as it is), or both.
#[derive(Clone)]
struct BlockNorms {
    placement: NormPlacement,
    attention: SublayerNorms,
    mlp: SublayerNorms,
    /// Added to each weight where it is used: Gemma 3's norms scale by `1 + weight`
    /// ([`ModelConfig::norm_weight_offset`]); 0 for the others.
    offset: f64,
    /// The factor of each sublayer's output as it joins the stream (Granite's
    /// `residual_multiplier`; 1 for the others).
    residual_scale: f64,
}

/// One sublayer's norms: before it and after it, where the placement has them.
#[derive(Clone)]
struct SublayerNorms {
    before: Option<Tensor>,
    after: Option<Tensor>,
}

impl BlockNorms {
    /// The checkpoint's names of the norms under `placement`: the attention's before and after,
    /// then the MLP's.
    fn names(placement: NormPlacement) -> [[Option<&'static str>; 2]; 2] {
        match placement {
            NormPlacement::Before => [
                [Some("input_layernorm"), None],
                [Some("post_attention_layernorm"), None],
            ],
            NormPlacement::After => [
                [None, Some("post_attention_layernorm")],
                [None, Some("post_feedforward_layernorm")],
            ],
            NormPlacement::BeforeAndAfter => [
                [Some("input_layernorm"), Some("post_attention_layernorm")],
                [
                    Some("pre_feedforward_layernorm"),
                    Some("post_feedforward_layernorm"),
                ],
            ],
        }
    }

    /// The names of the norms under `placement`, in the forward pass's order.
    fn all_names(placement: NormPlacement) -> impl Iterator<Item = &'static str> {
        Self::names(placement).into_iter().flatten().flatten()
    }

    fn load(config: &ModelConfig, weights: &mut WeightMap, block: &str) -> anyhow::Result<Self> {
        let (h, placement) = (config.hidden_size, config.norm_placement());
        let mut take = |name: Option<&str>| {
            name.map(|name| weights.take(&format!("{block}.{name}.weight"), &[h]))
                .transpose()
        };
        let [[ab, aa], [mb, ma]] = Self::names(placement);
        Ok(Self {
            placement,
            attention: SublayerNorms {
                before: take(ab)?,
                after: take(aa)?,
            },
            mlp: SublayerNorms {
                before: take(mb)?,
                after: take(ma)?,
            },
            offset: config.norm_weight_offset(),
            residual_scale: config.residual_scale(),
        })
    }

    /// Every norm by checkpoint name, in the forward pass's order.
    fn named(&self) -> Vec<(&'static str, &Tensor)> {
        let held = [
            &self.attention.before,
            &self.attention.after,
            &self.mlp.before,
            &self.mlp.after,
        ];
        let names = Self::names(self.placement).into_iter().flatten();
        (names.zip(held))
            .filter_map(|(name, norm)| Some((name?, norm.as_ref()?)))
            .collect()
    }

    fn named_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let Self {
            placement,
            attention,
            mlp,
            ..
        } = self;
        let held = [
            &mut attention.before,
            &mut attention.after,
            &mut mlp.before,
            &mut mlp.after,
        ];
        let names = Self::names(*placement).into_iter().flatten();
        (names.zip(held))
            .filter_map(|(name, norm)| Some((name?, norm.as_mut()?)))
            .collect()
    }

    /// The stream with its pending output added, and what `sublayer` reads of it: the stream
    /// normalised by its norm before, or the stream itself.
    fn sublayer_input(
        &self,
        stream: &Residual,
        sublayer: &SublayerNorms,
        eps: f64,
        pass: ops::Pass,
    ) -> Result<(Tensor, Tensor)> {
        match &sublayer.before {
            Some(norm) => stream.add_norm(&*offset_weight(norm, self.offset)?, eps, pass),
            None => {
                let x = stream.sum()?;
                Ok((x.clone(), x))
            }
        }
    }

    /// `sublayer`'s `output` as it joins the stream: normalised by its norm after, or as it is,
    /// and scaled by the residual factor.
    fn sublayer_output(
        &self,
        output: Tensor,
        sublayer: &SublayerNorms,
        eps: f64,
    ) -> Result<Tensor> {
        let output = match &sublayer.after {
            Some(norm) => ops::rms_norm(&output, &*offset_weight(norm, self.offset)?, eps)?,
            None => output,
        };
        match self.residual_scale {
            1.0 => Ok(output),
            scale => output.affine(scale, 0.0),
        }
    }

    fn elem_count(&self) -> usize {
        self.named().iter().map(|(_, t)| t.elem_count()).sum()
    }
}

/// `value` as `dtype` stores it (transformers casts Gemma's embedding scale to the weights'
/// dtype before the product).
fn rounded_to(value: f64, dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(value).to_f64(),
        DType::F16 => half::f16::from_f64(value).to_f64(),
        DType::F32 => value as f32 as f64,
        _ => value,
    }
}

/// An RMS norm's weight as the norm scales by it: `weight + offset` (Gemma 3's `1 + weight`),
/// computed where it is used so that gradients reach the stored weight and a checkpoint saves
/// it as read.
fn offset_weight(weight: &Tensor, offset: f64) -> Result<Cow<'_, Tensor>> {
    match offset {
        0.0 => Ok(Cow::Borrowed(weight)),
        _ => Ok(Cow::Owned(weight.affine(1.0, offset)?)),
    }
}

/// How a layer's attention sees positions: how it turns queries and keys, and how far back its
/// window reaches. A model's layers come in one to three kinds (OLMo 3: sliding layers turned
/// by the local rotation, full ones by the scaled; SmolLM3: NoPE layers among turned ones);
/// a pass makes each kind's mask, tables or spans once, and each block reads its kind's.
#[derive(Clone, Copy, Debug, PartialEq)]
struct AttentionKind {
    rotation: LayerRotation,
    window: Option<usize>,
}

#[derive(Clone)]
pub struct Transformer {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    /// The kinds of the layers' attention, each once, in the order of their first layer.
    attention_kinds: Vec<AttentionKind>,
    norm: Tensor,
    head: OutputHead,
    rope: std::sync::Arc<RotaryTables>,
    /// The plain rotation of [`ModelConfig::local_rope_theta`], where some layer turns by it
    /// (the sliding layers of OLMo 3 and Gemma 3).
    local_rope: Option<std::sync::Arc<RotaryTables>>,
    /// Gemma 3's factor of the embedding's rows on the way in, as the model's dtype holds it.
    embed_scale: Option<f64>,
    dtype: DType,
    device: Device,
    /// bf16 weights packed for the CPU decode step's products, by the weight tensor they were
    /// packed from (a replaced weight is packed anew; see [`HostWeights::new`]).
    packed: PackedWeights,
}

/// See [`Transformer::packed`]. Shared by clones, which start with the same weights.
#[derive(Clone, Default)]
struct PackedWeights(
    std::sync::Arc<std::sync::Mutex<HashMap<TensorId, std::sync::Arc<PackedRhs>>>>,
);

/// A padded batch for the training path. `mask` is 1 for real tokens, 0 for padding (either
/// side); `positions` are each token's position among its sequence's real tokens.
pub struct PaddedBatch {
    pub input_ids: Tensor,
    pub positions: Tensor,
    pub mask: Vec<Vec<bool>>,
    /// The largest token id, padding included: checked against the vocabulary before the
    /// embedding reads it (a GPU's lookup does not check its indices).
    pub largest_id: u32,
}

impl PaddedBatch {
    /// Right-pads `sequences` with `pad_id`.
    pub fn right_padded(sequences: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let batch = sequences.len();
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(batch * seq);
        let mut positions = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch);
        for s in sequences {
            ids.extend(s.iter().copied().chain(std::iter::repeat(pad_id)).take(seq));
            positions.extend((0..seq as u32).map(|p| p.min(s.len().saturating_sub(1) as u32)));
            mask.push((0..seq).map(|t| t < s.len()).collect());
        }
        Ok(Self {
            largest_id: ids.iter().copied().max().unwrap_or(0),
            input_ids: Tensor::from_vec(ids, (batch, seq), device)?,
            positions: Tensor::from_vec(positions, (batch, seq), device)?,
            mask,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.mask.len(), self.mask.first().map_or(0, Vec::len))
    }
}

/// The name and shape of every weight a language model of `config` reads from its checkpoint
/// (the biases its config names, `lm_head.weight` unless the head is tied to the embedding),
/// with the linear layers in the order the forward pass runs them: the checkpoint's name tree,
/// for building random models in tests and benchmarks and for sizing a run from its config
/// alone ([`weight_count`]).
pub fn llama_weight_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim(),
    );
    let (q, kv) = (config.num_attention_heads * d, config.num_kv_heads() * d);
    let mut shapes = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, h],
    )];
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for name in BlockNorms::all_names(config.norm_placement()) {
            shapes.push((format!("{p}.{name}.weight"), vec![h]));
        }
        if let Some(span) = config.qk_norm() {
            let [q_norm, k_norm] = qk_norm_widths(config, span);
            shapes.push((format!("{p}.self_attn.q_norm.weight"), vec![q_norm]));
            shapes.push((format!("{p}.self_attn.k_norm.weight"), vec![k_norm]));
        }
        for (name, out, inp, bias) in [
            ("self_attn.q_proj", q, h, config.qkv_bias()),
            ("self_attn.k_proj", kv, h, config.qkv_bias()),
            ("self_attn.v_proj", kv, h, config.qkv_bias()),
            ("self_attn.o_proj", h, q, config.o_bias()),
            ("mlp.gate_proj", i, h, config.mlp_bias()),
            ("mlp.up_proj", i, h, config.mlp_bias()),
            ("mlp.down_proj", h, i, config.mlp_bias()),
        ] {
            shapes.push((format!("{p}.{name}.weight"), vec![out, inp]));
            if bias {
                shapes.push((format!("{p}.{name}.bias"), vec![out]));
            }
        }
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tied_embeddings() {
        shapes.push(("lm_head.weight".to_string(), vec![config.vocab_size, h]));
    }
    shapes
}

/// The number of weights of a language model of `config`, as [`Transformer::parameter_count`]
/// counts them once it is loaded.
pub fn weight_count(config: &ModelConfig) -> usize {
    llama_weight_shapes(config)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

/// Weights by Hugging Face name; `WeightMap::take` checks presence and shape.
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
}

impl WeightMap {
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self { tensors }
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        let tensor = self.tensors.remove(name).with_context(|| {
            format!("missing weight '{name}' (expected shape {shape:?}) in the checkpoint")
        })?;
        if tensor.dims() != shape {
            bail!(
                "weight '{name}' has shape {:?}, expected {shape:?}",
                tensor.dims()
            );
        }
        Ok(tensor)
    }

    fn take_optional(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> anyhow::Result<Linear> {
        let weight = self.take(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, pass: ops::Pass) -> Result<Tensor> {
        let gated = match pass {
            ops::Pass::Differentiable => {
                let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
                match self.activation {
                    Activation::Silu => ops::silu_mul(&gate, &up)?,
                    Activation::GeluTanh => ops::gelu_tanh_mul(&gate, &up)?,
                }
            }
            ops::Pass::Generation => {
                // [.., 2·intermediate]: gate's columns, then up's.
                let both = stacked_forward(&self.gate_up, &[&self.gate_proj, &self.up_proj], x)?;
                match self.activation {
                    Activation::Silu => ops::silu_mul_halves(&both)?,
                    Activation::GeluTanh => {
                        let width = both.dim(candle_core::D::Minus1)? / 2;
                        let half = |at| both.narrow(candle_core::D::Minus1, at, width);
                        ops::gelu_tanh_mul(&half(0)?, &half(width)?)?
                    }
                }
            }
        };
        self.down_proj.forward(&gated)
    }
}

/// `x` through projections whose outputs are wanted side by side (`[.., Σ out]`): one product
/// over their stacked weights where [`Transformer::stack_projections`] made them, else each
/// projection and a concatenation.
fn stacked_forward(stacked: &Option<Linear>, parts: &[&Linear], x: &Tensor) -> Result<Tensor> {
    match stacked {
        Some(linear) => linear.forward(x),
        None => {
            let outputs = parts
                .iter()
                .map(|linear| linear.forward(x))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&outputs, candle_core::D::Minus1)
        }
    }
}

/// Stacks the weights (and biases) of `parts` into one projection, each part's weight becoming a
/// view of its block of rows: `None`, leaving the parts as they are, where one of them has a LoRA
/// adapter or is a variable (a model being trained), or only some have biases.
fn stack(mut parts: Vec<&mut Linear>) -> Result<Option<Linear>> {
    let biased = parts[0].bias.is_some();
    if parts
        .iter()
        .any(|l| l.lora.is_some() || l.weight.is_variable() || l.bias.is_some() != biased)
    {
        return Ok(None);
    }
    let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
    let weight = Tensor::cat(&weights, 0)?;
    let bias = match biased {
        true => {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        }
        false => None,
    };
    let mut at = 0;
    for part in parts.iter_mut() {
        let rows = part.weight.dim(0)?;
        part.weight = weight.narrow(0, at, rows)?;
        part.bias = bias.as_ref().map(|b| b.narrow(0, at, rows)).transpose()?;
        at += rows;
    }
    Ok(Some(Linear::new(weight, bias)))
}

impl Transformer {
    /// Builds the model from Hugging Face-named weights, converted to `dtype` on `device`.
    /// Weights that are already variables keep their identity (training relies on it).
    pub fn from_weights(
        config: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        config.family()?;
        let mut weights = WeightMap::new(tensors);
        let (h, v, i) = (
            config.hidden_size,
            config.vocab_size,
            config.intermediate_size,
        );
        let head_dim = config.head_dim();
        let q_out = config.num_attention_heads * head_dim;
        let kv_out = config.num_kv_heads() * head_dim;
        let embed_tokens = weights.take("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let mut attention_kinds: Vec<AttentionKind> = Vec::new();
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let kind = AttentionKind {
                rotation: config.layer_rotation(l),
                window: config.layer_window(l),
            };
            let kind = match attention_kinds.iter().position(|k| *k == kind) {
                Some(at) => at,
                None => {
                    attention_kinds.push(kind);
                    attention_kinds.len() - 1
                }
            };
            layers.push(Block {
                kind,
                norms: BlockNorms::load(config, &mut weights, &p)?,
                self_attn: Attention {
                    q_proj: weights.linear(
                        &format!("{attn}.q_proj"),
                        q_out,
                        h,
                        config.qkv_bias(),
                    )?,
                    k_proj: weights.linear(
                        &format!("{attn}.k_proj"),
                        kv_out,
                        h,
                        config.qkv_bias(),
                    )?,
                    v_proj: weights.linear(
                        &format!("{attn}.v_proj"),
                        kv_out,
                        h,
                        config.qkv_bias(),
                    )?,
                    o_proj: weights.linear(&format!("{attn}.o_proj"), h, q_out, config.o_bias())?,
                    head_norms: HeadNorms::load(config, &mut weights, &attn)?,
                    qkv: None,
                },
                mlp: Mlp {
                    activation: config.activation()?,
                    gate_proj: weights.linear(
                        &format!("{mlp}.gate_proj"),
                        i,
                        h,
                        config.mlp_bias(),
                    )?,
                    up_proj: weights.linear(&format!("{mlp}.up_proj"), i, h, config.mlp_bias())?,
                    down_proj: weights.linear(
                        &format!("{mlp}.down_proj"),
                        h,
                        i,
                        config.mlp_bias(),
                    )?,
                    gate_up: None,
                },
            });
        }
        let norm = weights.take("model.norm.weight", &[h])?;
        let head = if let Some(labels) = config.label_count().filter(|_| is_classifier(config)) {
            OutputHead::Score {
                weight: weights.take("score.weight", &[labels, h])?,
            }
        } else if let Some(w) = weights
            .take_optional("lm_head.weight", &[v, h])?
            .filter(|_| !config.tied_embeddings())
        {
            OutputHead::LanguageModel {
                weight: w,
                tied: false,
            }
        } else if config.tied_embeddings() {
            OutputHead::LanguageModel {
                weight: embed_tokens.clone(),
                tied: true,
            }
        } else {
            bail!("missing weight 'lm_head.weight' and tie_word_embeddings is false");
        };
        let rope = RotaryTables::new(config, dtype, device)?;
        let local_rope = match attention_kinds
            .iter()
            .any(|k| k.rotation == LayerRotation::Local)
        {
            true => Some(std::sync::Arc::new(RotaryTables::local(
                config, dtype, device,
            )?)),
            false => None,
        };
        let mut model = Self {
            config: config.clone(),
            embed_tokens,
            layers,
            attention_kinds,
            norm,
            head,
            rope: std::sync::Arc::new(rope),
            local_rope,
            embed_scale: config
                .embedding_scale()
                .map(|scale| rounded_to(scale, dtype)),
            dtype,
            device: device.clone(),
            packed: PackedWeights::default(),
        };
        model.convert(dtype, device)?;
        Ok(model)
    }

    /// Moves every weight to `dtype`/`device`; variables already there are left untouched.
    fn convert(&mut self, dtype: DType, device: &Device) -> Result<()> {
        let fix = |t: &mut Tensor| -> Result<()> {
            if t.dtype() != dtype || !t.device().same_device(device) {
                *t = t.to_device(device)?.to_dtype(dtype)?;
            }
            Ok(())
        };
        self.for_each_tensor_mut(&mut |_, t| fix(t))?;
        if let OutputHead::LanguageModel { weight, tied: true } = &mut self.head {
            *weight = self.embed_tokens.clone();
        }
        Ok(())
    }

    /// Replaces every weight by `f(name, weight)`; the tied head follows the embedding. opt-wdpo
    /// re-casts its f32 master weights into the compute dtype after each optimiser step.
    pub fn map_weights(
        &mut self,
        f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        self.for_each_tensor_mut(&mut |name, t| {
            *t = f(name, t)?;
            Ok(())
        })?;
        if let OutputHead::LanguageModel { weight, tied: true } = &mut self.head {
            *weight = self.embed_tokens.clone();
        }
        Ok(())
    }

    fn for_each_tensor_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        f("model.embed_tokens.weight", &mut self.embed_tokens)?;
        for (l, block) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, norm) in block.norms.named_mut() {
                f(&format!("{p}.{name}.weight"), norm)?;
            }
            if let Some(norms) = &mut block.self_attn.head_norms {
                f(&format!("{p}.self_attn.q_norm.weight"), &mut norms.q)?;
                f(&format!("{p}.self_attn.k_norm.weight"), &mut norms.k)?;
            }
            for (name, lin) in block.linears_mut() {
                f(&format!("{p}.{name}.weight"), &mut lin.weight)?;
                if let Some(b) = &mut lin.bias {
                    f(&format!("{p}.{name}.bias"), b)?;
                }
            }
        }
        f("model.norm.weight", &mut self.norm)?;
        match &mut self.head {
            OutputHead::LanguageModel {
                weight,
                tied: false,
            } => f("lm_head.weight", weight)?,
            OutputHead::LanguageModel { tied: true, .. } => {}
            OutputHead::Score { weight } => f("score.weight", weight)?,
        }
        Ok(())
    }

    /// Every weight by its Hugging Face name (the tied head appears once, as the embedding),
    /// as a checkpoint saves it: LoRA weights merged when written.
    pub fn saved_weights(&self) -> Vec<(String, ModelWeight)> {
        let plain = |name: String, t: &Tensor| (name, ModelWeight::Plain(t.clone()));
        let mut out = vec![plain(
            "model.embed_tokens.weight".into(),
            &self.embed_tokens,
        )];
        for (l, block) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, norm) in block.norms.named() {
                out.push(plain(format!("{p}.{name}.weight"), norm));
            }
            if let Some(norms) = &block.self_attn.head_norms {
                out.push(plain(format!("{p}.self_attn.q_norm.weight"), &norms.q));
                out.push(plain(format!("{p}.self_attn.k_norm.weight"), &norms.k));
            }
            for (name, lin) in block.linears() {
                out.push((format!("{p}.{name}.weight"), lin.saved_weight()));
                if let Some(b) = &lin.bias {
                    out.push(plain(format!("{p}.{name}.bias"), b));
                }
            }
        }
        out.push(plain("model.norm.weight".into(), &self.norm));
        match &self.head {
            OutputHead::LanguageModel {
                weight,
                tied: false,
            } => out.push(plain("lm_head.weight".into(), weight)),
            OutputHead::LanguageModel { tied: true, .. } => {}
            OutputHead::Score { weight } => out.push(plain("score.weight".into(), weight)),
        }
        out
    }

    /// Mutable access to each linear layer by its Hugging Face module name
    /// (`model.layers.3.self_attn.q_proj`), for attaching LoRA adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (l, block) in self.layers.iter_mut().enumerate() {
            for (name, lin) in block.linears_mut() {
                out.push((format!("model.layers.{l}.{name}"), lin));
            }
        }
        out
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn head(&self) -> &OutputHead {
        &self.head
    }
    /// The number of weights (the tied head counted once, LoRA adapters not at all).
    pub fn parameter_count(&self) -> usize {
        let mut count = self.embed_tokens.elem_count() + self.norm.elem_count();
        for block in &self.layers {
            count += block.norms.elem_count();
            if let Some(norms) = &block.self_attn.head_norms {
                count += norms.q.elem_count() + norms.k.elem_count();
            }
            for (_, lin) in block.linears() {
                count += lin.weight.elem_count() + lin.bias.as_ref().map_or(0, Tensor::elem_count);
            }
        }
        count
            + match &self.head {
                OutputHead::LanguageModel { tied: true, .. } => 0,
                OutputHead::LanguageModel { weight, .. } | OutputHead::Score { weight } => {
                    weight.elem_count()
                }
            }
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Bytes one token's activations take at most while a forward pass feeds it (an upper
    /// bound: every activation of one layer at once, which the next layer's replace): the stream
    /// coming in and the one going out, its norm, q/k/v, the attention's output, o, the stream
    /// after attention and its norm; gate and up, their product, down; with norms of q and k,
    /// the rows they write (and, where they run composed, the normalised q and k before it).
    /// OLMo-2's norms after the sublayers write as many values as the others' before them.
    pub fn activation_bytes_per_token(&self) -> usize {
        let cfg = &self.config;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        let head_norms = match cfg.qk_norm() {
            Some(_) => (q + kv) + (q + 2 * kv),
            None => 0,
        };
        // Gemma 3 normalises the sublayers' outputs as well as their inputs.
        let output_norms = match cfg.norm_placement() {
            NormPlacement::BeforeAndAfter => 2 * h,
            _ => 0,
        };
        (7 * h + q + 2 * kv + q + 3 * inter + head_norms + output_norms)
            * self.dtype.size_in_bytes()
    }

    /// Readies the model for [`Transformer::feed`] (generation, reward scoring): where feeding
    /// runs on tensors (a GPU, the CPU's generic kernels) it stacks the projections
    /// ([`Transformer::stack_projections`]); the CPU's host decode kernels read the separate
    /// weights, so there stacking would only cost memory.
    pub fn prepare_to_feed(&mut self) -> Result<()> {
        match optune_kernels::decode_path(&self.device, self.dtype) {
            Path::Generic => self.stack_projections(),
            Path::Fused => Ok(()),
        }
    }

    /// For generation: stacks each layer's q/k/v weights into one matrix and its gate/up weights
    /// into another, the separate projections' weights becoming views of their rows (no extra
    /// memory once the originals are dropped), so that a generation pass over a tensor KV cache
    /// (a GPU, the CPU's generic path) runs one product for each group. Every other pass, and the
    /// CPU's host decode kernels, read the views as they read the weights before. Layers with
    /// LoRA adapters or trainable weights are left as they are.
    pub fn stack_projections(&mut self) -> Result<()> {
        for block in &mut self.layers {
            let Attention {
                q_proj,
                k_proj,
                v_proj,
                qkv,
                ..
            } = &mut block.self_attn;
            *qkv = stack(vec![q_proj, k_proj, v_proj])?;
            let Mlp {
                gate_proj,
                up_proj,
                gate_up,
                ..
            } = &mut block.mlp;
            *gate_up = stack(vec![gate_proj, up_proj])?;
        }
        Ok(())
    }

    /// Final-norm hidden states `[batch, seq, hidden]` of a padded batch: the training path.
    pub fn hidden_states(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let (_, normed) = self.run_layers(batch)?.add_norm(
            &*self.final_norm()?,
            self.config.rms_norm_eps,
            ops::Pass::Differentiable,
        )?;
        self.head_input(normed)
    }

    /// The blocks over a padded batch (causal, within the sliding window, padding keys hidden;
    /// a padding query attends to itself, so no row is fully masked): the stream before the
    /// final norm.
    fn run_layers(&self, batch: &PaddedBatch) -> Result<Residual> {
        let pass = self.masked_pass(batch)?;
        let mut stream = Residual::new(self.embed(&batch.input_ids)?);
        for block in &self.layers {
            stream = pass.through(block, &self.config, stream)?;
        }
        Ok(stream)
    }

    /// What every block of a training pass over `batch` reads besides the stream: the mask and
    /// the rotary tables.
    fn masked_pass(&self, batch: &PaddedBatch) -> Result<MaskedPass> {
        let (b, t) = batch.dims();
        self.check_tokens(t, batch.largest_id)?;
        // In the dtype the attention adds it in: the fused op's f32 for a bf16 model (given the
        // model's, each layer's op would keep an f32 copy of it), else the model's.
        let mask_dtype = match optune_kernels::autograd_path(&self.device, self.dtype) {
            Path::Fused => ops::accumulation_dtype(self.dtype),
            Path::Generic => self.dtype,
        };
        let mask_of = |window: Option<usize>| -> Result<Tensor> {
            let mut mask = Vec::with_capacity(b * t * t);
            for row in &batch.mask {
                for q in 0..t {
                    let attended = first_visible(window, q)..=q;
                    for k in 0..t {
                        let visible = attended.contains(&k) && row[k];
                        let own_padding = k == q && !row[q];
                        mask.push(if visible || own_padding { 0.0 } else { MASKED });
                    }
                }
            }
            Tensor::from_vec(mask, (b, 1, t, t), &self.device)?.to_dtype(mask_dtype)
        };
        // One mask per window, shared by the kinds that differ only in their rotation.
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        let tables = self.kind_tables(&batch.positions)?;
        let mut kinds = Vec::with_capacity(tables.len());
        for (kind, (cos, sin)) in self.attention_kinds.iter().zip(tables) {
            let mask = match masks.iter().find(|(w, _)| *w == kind.window) {
                Some((_, mask)) => mask.clone(),
                None => {
                    let mask = mask_of(kind.window)?;
                    masks.push((kind.window, mask.clone()));
                    mask
                }
            };
            kinds.push(KindInputs { mask, cos, sin });
        }
        Ok(MaskedPass { kinds })
    }

    /// Each attention kind's cosine and sine tables for `positions` (`[batch, seq]`, u32),
    /// `[batch, seq, head_dim / 2]`: its rotation's, or (a kind without one) tables that turn
    /// nothing (cosines 1, sines 0).
    fn kind_tables(&self, positions: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let (cos, sin) = self.rope.lookup(positions)?;
        self.attention_kinds
            .iter()
            .map(|kind| match self.rotary_tables(kind.rotation) {
                Some(rope) if std::ptr::eq(rope, &*self.rope) => Ok((cos.clone(), sin.clone())),
                Some(rope) => rope.lookup(positions),
                None => Ok((cos.ones_like()?, cos.zeros_like()?)),
            })
            .collect()
    }

    /// The tables a layer of `rotation` turns by; `None` for a layer that turns nothing.
    fn rotary_tables(&self, rotation: LayerRotation) -> Option<&RotaryTables> {
        match rotation {
            LayerRotation::Scaled => Some(&self.rope),
            LayerRotation::Local => self.local_rope.as_deref(),
            LayerRotation::None => None,
        }
    }

    /// Refuses sequences longer than the rotary tables ([`ModelConfig::max_positions`]) or a token id
    /// outside the vocabulary: the CPU's lookups would fail on them, a GPU's would read past
    /// their tables silently.
    fn check_tokens(&self, longest: usize, largest_id: u32) -> Result<()> {
        if longest > self.max_positions() {
            candle_core::bail!(
                "a sequence of {longest} tokens is longer than the {} positions the model's \
                 config allows{}: lower --max-length or truncate the inputs",
                self.max_positions(),
                self.config.position_limit_note()
            );
        }
        let vocab = self.embed_tokens.dim(0)?;
        if largest_id as usize >= vocab {
            candle_core::bail!(
                "token id {largest_id} is outside the model's vocabulary of {vocab} (a tokenizer or \
                 pad id that does not belong to this model?)"
            );
        }
        Ok(())
    }

    /// The rows of `ids`, times Gemma 3's scale where it has one.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let rows = ops::embedding(&self.embed_tokens, ids)?;
        match self.embed_scale {
            Some(scale) => rows.affine(scale, 0.0),
            None => Ok(rows),
        }
    }

    /// The final norm's weight as it scales ([`offset_weight`]).
    pub(crate) fn final_norm(&self) -> Result<Cow<'_, Tensor>> {
        offset_weight(&self.norm, self.config.norm_weight_offset())
    }

    /// The final norm's output as the head reads it: a language model's scaled by Granite's
    /// `1 / logits_scaling` (the head is linear, so its logits are scaled alike), a score head's
    /// as it is.
    pub(crate) fn head_input(&self, normed: Tensor) -> Result<Tensor> {
        match self.head_scale() {
            1.0 => Ok(normed),
            scale => normed.affine(scale as f64, 0.0),
        }
    }

    /// [`Transformer::head_input`]'s factor, which the host decode path applies too.
    fn head_scale(&self) -> f32 {
        match &self.head {
            OutputHead::LanguageModel { .. } => self.config.logits_scale() as f32,
            OutputHead::Score { .. } => 1.0,
        }
    }

    /// Logits `[rows, vocab]` (or scores `[rows, labels]`) of hidden rows `[rows, hidden]`.
    pub fn head_logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        let weight = match &self.head {
            OutputHead::LanguageModel { weight, .. } | OutputHead::Score { weight } => weight,
        };
        optune_kernels::cuda_matmul::matmul(hidden_rows, &weight.t()?)
    }

    /// Runs one sequence's prompt through the model, writes its keys and values into `slot` of
    /// `cache` (replacing what the slot held), and returns the logits `[vocab]` of its last
    /// position.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        slot: usize,
    ) -> anyhow::Result<Tensor> {
        if slot >= cache.slots() {
            bail!(
                "slot {slot} is outside the KV cache's {} slots",
                cache.slots()
            );
        }
        cache.clear(slot);
        if cache.is_host() {
            let logits = self.feed_host(&[Segment { slot, tokens }], cache)?;
            return Ok(Tensor::from_vec(logits, self.head_width()?, &self.device)?);
        }
        Ok(self
            .feed_tensor(&[Segment { slot, tokens }], cache)?
            .squeeze(0)?)
    }

    /// Logits per position: the vocabulary size, or the label count of a score head.
    fn head_width(&self) -> Result<usize> {
        match &self.head {
            OutputHead::LanguageModel { weight, .. } | OutputHead::Score { weight } => {
                weight.dim(0)
            }
        }
    }

    /// Feeds one token to each active slot (inactive slots get `None` and are left as they are)
    /// and returns the logits `[slots, vocab]` of the new positions (zeros for inactive slots).
    pub fn decode_step(
        &self,
        tokens: &[Option<u32>],
        cache: &mut KvCache,
    ) -> anyhow::Result<Tensor> {
        if tokens.len() != cache.slots() {
            bail!(
                "decode_step got {} tokens for {} slots",
                tokens.len(),
                cache.slots()
            );
        }
        let ids: Vec<[u32; 1]> = tokens.iter().map(|t| [t.unwrap_or(0)]).collect();
        let segments: Vec<Segment> = (0..tokens.len())
            .filter(|&s| tokens[s].is_some())
            .map(|slot| Segment {
                slot,
                tokens: &ids[slot],
            })
            .collect();
        let width = self.head_width()?;
        if !cache.is_host() {
            if segments.is_empty() {
                return Ok(Tensor::zeros(
                    (tokens.len(), width),
                    self.dtype,
                    &self.device,
                )?);
            }
            // The active slots' rows in slot order, a row of zeros for the others.
            let rows = self.feed_tensor(&segments, cache)?;
            let zeros = Tensor::zeros((1, width), rows.dtype(), &self.device)?;
            let mut row_of = vec![segments.len() as u32; tokens.len()];
            for (row, segment) in segments.iter().enumerate() {
                row_of[segment.slot] = row as u32;
            }
            let row_of = Tensor::new(row_of.as_slice(), &self.device)?;
            return Ok(Tensor::cat(&[&rows, &zeros], 0)?.index_select(&row_of, 0)?);
        }
        let rows = self.feed_host(&segments, cache)?;
        let mut logits = vec![0f32; tokens.len() * width];
        for (segment, row) in segments.iter().zip(rows.chunks_exact(width)) {
            logits[segment.slot * width..(segment.slot + 1) * width].copy_from_slice(row);
        }
        Ok(Tensor::from_vec(
            logits,
            (tokens.len(), width),
            &self.device,
        )?)
    }

    /// Appends each segment's tokens to its slot of `cache` — a whole prompt to an empty slot, or
    /// the next token of a sequence being decoded — and returns the logits of each segment's last
    /// position, one row-major f32 vector `[segments × vocab]`. Prompts and decoding sequences
    /// go through the model together.
    ///
    /// On the CPU in f32 (a host cache) every row is computed on its own by the kernels of
    /// [`optune_kernels::host`], attending over its own slot's cached positions only: a sequence's
    /// numbers do not depend on which segments share the call, on their number or on the thread
    /// count. Otherwise (the tensor path) all segments' tokens go through as one unpadded batch
    /// ([`Transformer::feed_tensor`]).
    pub fn feed(&self, segments: &[Segment], cache: &mut KvCache) -> anyhow::Result<Vec<f32>> {
        if cache.is_host() {
            return self.feed_host(segments, cache);
        }
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .feed_tensor(segments, cache)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// [`Transformer::feed`] on a tensor cache, the logits `[segments, vocab]` left where the model
    /// is (on a GPU: on the device, for [`crate::generate`] to sample there).
    ///
    /// Every segment goes through one forward pass with no padding: each token is one row of the
    /// products, its key and value are written into its slot in place, and it attends over its
    /// slot's positions up to its own ([`optune_kernels::cached_attention`]). A step of single
    /// tokens (decoding) goes through as `[segments, 1]`, so that the projections split into
    /// heads without a copy; anything else packed as `[1, tokens]`.
    pub fn feed_tensor(&self, segments: &[Segment], cache: &mut KvCache) -> anyhow::Result<Tensor> {
        if cache.is_host() {
            bail!("feed_tensor needs a tensor KV cache (KvCache::new_tensors)");
        }
        if segments.is_empty() {
            // An empty tensor would be a 0-byte device allocation, which drivers may refuse.
            bail!("feed_tensor: no segments to feed");
        }
        let mut fed = vec![false; cache.slots()];
        // Each token's (slot, position), the ids, and the row of each segment's last token.
        let mut tokens = Vec::new();
        let mut ids = Vec::new();
        let mut last_rows = Vec::with_capacity(segments.len());
        for segment in segments {
            let (slot, len) = (segment.slot, segment.tokens.len());
            if slot >= cache.slots() {
                bail!(
                    "slot {slot} is outside the KV cache's {} slots",
                    cache.slots()
                );
            }
            if std::mem::replace(&mut fed[slot], true) {
                bail!("slot {slot} is fed twice in one call");
            }
            if len == 0 {
                bail!("cannot feed an empty segment (slot {slot})");
            }
            let start = cache.lengths[slot];
            if start + len > cache.capacity {
                bail!(
                    "slot {slot} is full: {start} + {len} tokens exceed the KV cache's {} positions",
                    cache.capacity
                );
            }
            tokens.extend((start..start + len).map(|position| (slot, position)));
            ids.extend_from_slice(segment.tokens);
            last_rows.push(tokens.len() as u32 - 1);
        }
        let n = tokens.len();
        let longest = tokens
            .iter()
            .map(|&(_, position)| position + 1)
            .max()
            .unwrap_or(0);
        self.check_tokens(longest, ids.iter().copied().max().unwrap_or(0))?;
        // The blocks of the whole pass, once it is known to be valid: all of them or none.
        let reach: Vec<(usize, usize)> = segments
            .iter()
            .map(|s| (s.slot, cache.lengths[s.slot] + s.tokens.len()))
            .collect();
        cache.hold_positions(&reach)?;
        let (batch, steps) = match n == segments.len() {
            true => (n, 1),
            false => (1, n),
        };
        let positions: Vec<u32> = tokens.iter().map(|&(_, p)| p as u32).collect();
        let positions = Tensor::from_vec(positions, (batch, steps), &self.device)?;
        // Each attention kind's tables and spans, read by its layers' cache writes and
        // attention.
        let blocks = cache.block_table()?;
        let kinds = (self
            .attention_kinds
            .iter()
            .zip(self.kind_tables(&positions)?))
        .map(|(kind, (cos, sin))| {
            let spans: Vec<u32> = tokens
                .iter()
                .flat_map(|&(slot, position)| {
                    [slot, first_visible(kind.window, position), position].map(|x| x as u32)
                })
                .collect();
            let tables = match &blocks {
                Some(blocks) => {
                    TokenTables::new(&cos, &sin, &spans)?.with_blocks(blocks.clone())?
                }
                None => TokenTables::new(&cos, &sin, &spans)?,
            };
            Ok((cos, sin, tables))
        })
        .collect::<Result<Vec<_>>>()?;
        let mut stream =
            Residual::new(self.embed(&Tensor::from_vec(ids, (batch, steps), &self.device)?)?);
        for (layer, block) in self.layers.iter().enumerate() {
            let (cos, sin, tables) = &kinds[block.kind];
            let cached = CachedKv {
                cache,
                layer,
                tables,
            };
            stream = block.forward(&self.config, stream, cos, sin, Attend::Cached(cached))?;
        }
        for segment in segments {
            cache.lengths[segment.slot] += segment.tokens.len();
        }
        let mut stream = stream.map(|t| t.reshape((n, self.config.hidden_size)))?;
        if steps > 1 {
            let last_rows = Tensor::new(last_rows.as_slice(), &self.device)?;
            stream = stream.map(|t| t.index_select(&last_rows, 0))?;
        }
        let (_, x) = stream.add_norm(
            &*self.final_norm()?,
            self.config.rms_norm_eps,
            ops::Pass::Generation,
        )?;
        Ok(self.head_logits(&self.head_input(x)?)?)
    }

    /// [`Transformer::feed`] on a host cache.
    fn feed_host(&self, segments: &[Segment], cache: &mut KvCache) -> anyhow::Result<Vec<f32>> {
        let cfg = &self.config;
        let (h, heads, kvh, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        let weights = HostWeights::new(self)?;
        let width = weights.head.out;
        let slots = cache.slots();
        let vocab = cfg.vocab_size;
        let mut seen = vec![false; slots];
        // Each new token's slot and position.
        let mut tokens: Vec<(usize, usize)> = Vec::new();
        let mut ids: Vec<usize> = Vec::new();
        for segment in segments {
            let slot = segment.slot;
            if slot >= slots || std::mem::replace(&mut seen[slot], true) {
                bail!(
                    "segment for slot {slot}: outside the KV cache's {slots} slots or given twice"
                );
            }
            if segment.tokens.is_empty() {
                bail!("segment for slot {slot} has no tokens");
            }
            let start = cache.lengths[slot];
            if start + segment.tokens.len() > cache.capacity {
                bail!(
                    "slot {slot} is full: {start} + {} tokens exceed the KV cache's {} positions",
                    segment.tokens.len(),
                    cache.capacity
                );
            }
            for (i, &id) in segment.tokens.iter().enumerate() {
                if id as usize >= vocab {
                    bail!("token id {id} is outside the vocabulary of {vocab}");
                }
                tokens.push((slot, start + i));
                ids.push(id as usize);
            }
        }
        let rows = tokens.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let positions: Vec<usize> = tokens.iter().map(|&(_, position)| position).collect();
        let kinds: Vec<HostKind> = (self.attention_kinds)
            .iter()
            .map(|kind| {
                let queries = (tokens.iter())
                    .map(|&(slot, position)| host::Query {
                        slot,
                        first: first_visible(kind.window, position),
                        position,
                    })
                    .collect();
                let tables = self
                    .rotary_tables(kind.rotation)
                    .map(|rope| rope.host_tables(&positions));
                HostKind { queries, tables }
            })
            .collect();
        let mut x = Vec::with_capacity(rows * h);
        weights.embed.gather_rows(&ids, h, &mut x);
        if let Some(scale) = self.embed_scale {
            x.iter_mut().for_each(|v| *v *= scale as f32);
        }
        let eps = cfg.rms_norm_eps;
        let norm = HostNorm {
            eps,
            offset: cfg.norm_weight_offset() as f32,
        };
        // Each sublayer's output joins the stream times this (Granite's; 1 for the others).
        let residual = cfg.residual_scale() as f32;
        let scale = cfg.attention_scale() as f32;
        let mut normed = vec![0f32; rows * h];
        let mut attn = vec![0f32; rows * heads * d];
        let capacity = cache.capacity;
        let Some((keys, values)) = cache.host_layers_mut() else {
            unreachable!("host cache")
        };
        for (l, block) in weights.layers.iter().enumerate() {
            block.sublayer_input(0, &x, &norm, &mut normed);
            let [mut q, mut k, v] =
                HostLinear::forward_many([&block.q, &block.k, &block.v], &normed, rows);
            if let Some([q_norm, k_norm]) = &block.head_norms {
                for (x, weight) in [(&mut q, q_norm), (&mut k, k_norm)] {
                    let heads_in = x.clone();
                    host::rms_norm(&heads_in, &norm.weight(weight), eps, x);
                }
            }
            let kind = &kinds[block.kind];
            if let Some((cos, sin)) = &kind.tables {
                host::rotary(&mut q, heads, d, cos, sin);
                host::rotary(&mut k, kvh, d, cos, sin);
            }
            // Every row's key and value go in before any row attends (a prompt's rows read
            // each other's).
            for (row, &(slot, position)) in tokens.iter().enumerate() {
                for head in 0..kvh {
                    let at = ((slot * kvh + head) * capacity + position) * d;
                    let from = (row * kvh + head) * d;
                    keys[l][at..at + d].copy_from_slice(&k[from..from + d]);
                    values[l][at..at + d].copy_from_slice(&v[from..from + d]);
                }
            }
            let layer = host::LayerCache {
                keys: &keys[l],
                values: &values[l],
                kv_heads: kvh,
                capacity,
            };
            host::attention(&q, &kind.queries, (heads, d, scale), &layer, &mut attn);
            let o = block.o.forward(&attn, rows);
            let o = block.sublayer_output(0, o, &norm);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o * residual);
            block.sublayer_input(1, &x, &norm, &mut normed);
            let [mut gate, up] = HostLinear::forward_many([&block.gate, &block.up], &normed, rows);
            match block.activation {
                Activation::Silu => host::silu_mul(&mut gate, &up),
                Activation::GeluTanh => host::gelu_tanh_mul(&mut gate, &up),
            }
            let down = block.down.forward(&gate, rows);
            let down = block.sublayer_output(1, down, &norm);
            x.iter_mut()
                .zip(&down)
                .for_each(|(x, o)| *x += o * residual);
        }
        // Only each segment's last position needs logits.
        let mut last = Vec::with_capacity(segments.len() * h);
        let mut end = 0;
        for segment in segments {
            cache.lengths[segment.slot] += segment.tokens.len();
            end += segment.tokens.len();
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        let mut normed = vec![0f32; segments.len() * h];
        host::rms_norm(&last, &norm.weight(&weights.norm), eps, &mut normed);
        let head_scale = self.head_scale();
        if head_scale != 1.0 {
            normed.iter_mut().for_each(|v| *v *= head_scale);
        }
        let logits = weights.head.forward(&normed, segments.len());
        debug_assert_eq!(logits.len(), segments.len() * width);
        Ok(logits)
    }
}

/// Tokens to append to one slot of a [`KvCache`] with [`Transformer::feed`].
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
}

/// A contiguous CPU f32 or bf16 tensor's data, read under its storage's lock.
struct HostView<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> HostView<'a> {
    fn new(tensor: &'a Tensor) -> anyhow::Result<Self> {
        let (guard, layout) = tensor.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!(
                "CPU decoding needs contiguous weights (a weight of shape {:?} is strided)",
                tensor.dims()
            );
        };
        if !matches!(
            &*guard,
            Storage::Cpu(CpuStorage::F32(_) | CpuStorage::BF16(_))
        ) {
            bail!(
                "CPU decoding needs f32 or bf16 weights on the CPU, found {:?}",
                tensor.dtype()
            );
        }
        Ok(Self { guard, start, end })
    }

    /// The values in f32: the data itself, or a widened copy of bf16 data (for the small
    /// weights: norms, biases, LoRA adapters).
    fn floats(&self) -> Cow<'_, [f32]> {
        match (self.f32(), self.bf16()) {
            (Some(data), _) => Cow::Borrowed(data),
            (None, Some(data)) => Cow::Owned(data.iter().map(|x| x.to_f32()).collect()),
            (None, None) => unreachable!("checked in HostView::new"),
        }
    }

    /// The data when it is f32.
    fn f32(&self) -> Option<&[f32]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => Some(&v[self.start..self.end]),
            _ => None,
        }
    }

    /// The data when it is bf16.
    fn bf16(&self) -> Option<&[bf16]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::BF16(v)) => Some(&v[self.start..self.end]),
            _ => None,
        }
    }

    /// Appends rows `ids` of this `[.., width]` matrix to `out`, in f32.
    fn gather_rows(&self, ids: &[usize], width: usize, out: &mut Vec<f32>) {
        for &id in ids {
            let (from, to) = (self.start + id * width, self.start + (id + 1) * width);
            match &*self.guard {
                Storage::Cpu(CpuStorage::F32(v)) => out.extend_from_slice(&v[from..to]),
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    out.extend(v[from..to].iter().map(|x| x.to_f32()))
                }
                _ => unreachable!("checked in HostView::new"),
            }
        }
    }
}

/// A linear layer (and its enabled LoRA adapter) for [`host::linear`]. Dropout is never
/// applied here: decoding is inference.
struct HostLinear<'a> {
    weight: HostView<'a>,
    /// Weights packed for `matmul_bf16_packed` when the products run in bf16 (bf16 weights, or
    /// f32 ones under bf16 products); else `host::linear_many` reads the f32 weights.
    packed: Option<std::sync::Arc<PackedRhs>>,
    bias: Option<HostView<'a>>,
    lora: Option<(HostView<'a>, HostView<'a>, f32)>,
    out: usize,
}

impl<'a> HostLinear<'a> {
    fn new(linear: &'a Linear, packed: &mut PackedFor) -> anyhow::Result<Self> {
        let lora = match &linear.lora {
            Some(a) if a.enabled.load(std::sync::atomic::Ordering::Relaxed) => {
                Some((HostView::new(&a.a)?, HostView::new(&a.b)?, a.scale as f32))
            }
            _ => None,
        };
        let weight = HostView::new(&linear.weight)?;
        Ok(Self {
            packed: packed.get(&linear.weight, &weight)?,
            weight,
            bias: linear.bias.as_ref().map(HostView::new).transpose()?,
            lora,
            out: linear.weight.dim(0)?,
        })
    }

    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let [y] = Self::forward_many([self], x, rows);
        y
    }

    /// Several layers on the same input, their base products in one parallel region (f32) or
    /// one after the other, each parallel (bf16).
    fn forward_many<const N: usize>(layers: [&Self; N], x: &[f32], rows: usize) -> [Vec<f32>; N] {
        let mut outs: [Vec<f32>; N] = std::array::from_fn(|i| vec![0f32; rows * layers[i].out]);
        let width = x.len() / rows.max(1);
        let mut f32_products: Vec<host::Product> = Vec::new();
        for (layer, out) in layers.iter().zip(outs.iter_mut()) {
            match &layer.packed {
                Some(packed) => {
                    matmul_bf16_packed(rows, out, false, Mat::rows(x, width), packed);
                    if let Some(bias) = &layer.bias {
                        let bias = bias.floats();
                        out.chunks_mut(layer.out).for_each(|row| {
                            row.iter_mut().zip(bias.iter()).for_each(|(y, b)| *y += b)
                        });
                    }
                }
                None => f32_products.push(host::Product {
                    w: layer.weight.f32().expect("bf16 weights are packed"),
                    bias: layer
                        .bias
                        .as_ref()
                        .map(|b| b.f32().expect("an f32 layer has an f32 bias")),
                    out,
                }),
            }
        }
        if !f32_products.is_empty() {
            host::linear_many(x, rows, &mut f32_products);
        }
        drop(f32_products);
        for (layer, y) in layers.iter().zip(outs.iter_mut()) {
            if let Some((a, b, scale)) = &layer.lora {
                let (a, b) = (a.floats(), b.floats());
                let rank = a.len() / width;
                let mut t = vec![0f32; rows * rank];
                host::linear(x, rows, &a, None, &mut t);
                let mut delta = vec![0f32; rows * layer.out];
                host::linear(&t, rows, &b, None, &mut delta);
                y.iter_mut().zip(&delta).for_each(|(y, d)| *y += d * scale);
            }
        }
        outs
    }
}

/// Looks up (or packs) the bf16 weights of one decode step in the model's [`PackedWeights`],
/// and afterwards drops the packings of weights the model no longer holds.
struct PackedFor<'m> {
    cache: std::sync::MutexGuard<'m, HashMap<TensorId, std::sync::Arc<PackedRhs>>>,
    used: std::collections::HashSet<TensorId>,
}

impl<'m> PackedFor<'m> {
    fn new(model: &'m Transformer) -> Self {
        Self {
            cache: model.packed.0.lock().expect("packed weights lock"),
            used: Default::default(),
        }
    }

    /// The packing of `weight [out, in]` as the right operand `weightᵀ` of `x · weightᵀ`, when it
    /// is bf16, or f32 under bf16 products ([`optune_kernels::f32_product_precision`]).
    fn get(
        &mut self,
        weight: &Tensor,
        view: &HostView,
    ) -> anyhow::Result<Option<std::sync::Arc<PackedRhs>>> {
        let bf16_products = optune_kernels::f32_product_precision() == ProductPrecision::Bf16;
        if view.bf16().is_none() && !bf16_products {
            return Ok(None);
        }
        let (out, width) = weight.dims2()?;
        let pack = || {
            std::sync::Arc::new(match view.bf16() {
                Some(data) => PackedRhs::new(width, out, Mat::transposed(data, width)),
                None => PackedRhs::new(width, out, Mat::transposed(&view.floats(), width)),
            })
        };
        // A variable (full fine-tuning's weights, sampled from during training by HyPO) is
        // updated in place under the same id: packed afresh for every step, never kept.
        if weight.is_variable() {
            return Ok(Some(pack()));
        }
        self.used.insert(weight.id());
        Ok(Some(
            self.cache.entry(weight.id()).or_insert_with(pack).clone(),
        ))
    }

    fn finish(mut self) {
        let used = std::mem::take(&mut self.used);
        self.cache.retain(|id, _| used.contains(id));
    }
}

/// One attention kind's part of a host decode step: its queries (their first positions by its
/// window) and its cosine and sine tables (none for a kind that turns nothing).
struct HostKind {
    queries: Vec<host::Query>,
    tables: Option<(Vec<f32>, Vec<f32>)>,
}

struct HostBlock<'a> {
    /// The block's `kind`: which of the step's queries and tables it reads.
    kind: usize,
    /// The block's norms ([`BlockNorms`]): the attention's before and after it, then the
    /// MLP's.
    norms: [[Option<HostView<'a>>; 2]; 2],
    q: HostLinear<'a>,
    k: HostLinear<'a>,
    v: HostLinear<'a>,
    o: HostLinear<'a>,
    /// The norms of the queries and keys (per head or whole projection: the weights' widths
    /// say which, as `host::rms_norm` normalises pieces of its weight's width).
    head_norms: Option<[HostView<'a>; 2]>,
    activation: Activation,
    gate: HostLinear<'a>,
    up: HostLinear<'a>,
    down: HostLinear<'a>,
}

impl HostBlock<'_> {
    /// [`BlockNorms::sublayer_input`] on host rows, for sublayer 0 (the attention) or 1 (the
    /// MLP): `x` normalised by its norm before into `input`, or copied.
    fn sublayer_input(&self, sublayer: usize, x: &[f32], norm: &HostNorm, input: &mut [f32]) {
        match &self.norms[sublayer][0] {
            Some(weight) => host::rms_norm(x, &norm.weight(weight), norm.eps, input),
            None => input.copy_from_slice(x),
        }
    }

    /// [`BlockNorms::sublayer_output`] on host rows.
    fn sublayer_output(&self, sublayer: usize, output: Vec<f32>, norm: &HostNorm) -> Vec<f32> {
        let Some(weight) = &self.norms[sublayer][1] else {
            return output;
        };
        let mut normed = vec![0f32; output.len()];
        host::rms_norm(&output, &norm.weight(weight), norm.eps, &mut normed);
        normed
    }
}

/// What every RMS norm of a host decode step shares: the epsilon, and the offset added to each
/// weight ([`offset_weight`]).
struct HostNorm {
    eps: f64,
    offset: f32,
}

impl HostNorm {
    fn weight<'v>(&self, view: &'v HostView) -> Cow<'v, [f32]> {
        match self.offset {
            0.0 => view.floats(),
            offset => Cow::Owned(view.floats().iter().map(|w| w + offset).collect()),
        }
    }
}

/// Every weight of the model as host slices, for one decode step.
struct HostWeights<'a> {
    embed: HostView<'a>,
    layers: Vec<HostBlock<'a>>,
    norm: HostView<'a>,
    head: HostLinear<'a>,
}

impl<'a> HostWeights<'a> {
    fn new(model: &'a Transformer) -> anyhow::Result<Self> {
        let mut packed = PackedFor::new(model);
        let layers = model
            .layers
            .iter()
            .map(|b| {
                let view = |norm: &'a Option<Tensor>| norm.as_ref().map(HostView::new).transpose();
                let (attention, mlp) = (&b.norms.attention, &b.norms.mlp);
                Ok(HostBlock {
                    kind: b.kind,
                    norms: [
                        [view(&attention.before)?, view(&attention.after)?],
                        [view(&mlp.before)?, view(&mlp.after)?],
                    ],
                    q: HostLinear::new(&b.self_attn.q_proj, &mut packed)?,
                    k: HostLinear::new(&b.self_attn.k_proj, &mut packed)?,
                    v: HostLinear::new(&b.self_attn.v_proj, &mut packed)?,
                    o: HostLinear::new(&b.self_attn.o_proj, &mut packed)?,
                    head_norms: match &b.self_attn.head_norms {
                        Some(norms) => Some([HostView::new(&norms.q)?, HostView::new(&norms.k)?]),
                        None => None,
                    },
                    activation: b.mlp.activation,
                    gate: HostLinear::new(&b.mlp.gate_proj, &mut packed)?,
                    up: HostLinear::new(&b.mlp.up_proj, &mut packed)?,
                    down: HostLinear::new(&b.mlp.down_proj, &mut packed)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let head = match &model.head {
            OutputHead::LanguageModel { weight, .. } | OutputHead::Score { weight } => weight,
        };
        let head_view = HostView::new(head)?;
        let head = HostLinear {
            packed: packed.get(head, &head_view)?,
            weight: head_view,
            bias: None,
            lora: None,
            out: head.dim(0)?,
        };
        packed.finish();
        Ok(Self {
            embed: HostView::new(&model.embed_tokens)?,
            layers,
            norm: HostView::new(&model.norm)?,
            head,
        })
    }
}

fn is_classifier(config: &ModelConfig) -> bool {
    config
        .architectures
        .iter()
        .any(|a| a.ends_with("ForSequenceClassification"))
}

/// The first position a query at `position` attends to: 0, or with a sliding `window` the first of
/// the `window` positions that end at its own. Every attention path (mask, span or host query)
/// takes its keys from here.
fn first_visible(window: Option<usize>, position: usize) -> usize {
    window.map_or(0, |w| (position + 1).saturating_sub(w))
}

/// The residual stream between blocks: `x` plus the last block's output `pending`, not yet added.
/// The add happens inside the next RMS norm ([`ops::add_rms_norm`]: one op in a generation pass on
/// the generic path, the add and then the norm otherwise).
#[derive(Clone)]
struct Residual {
    x: Tensor,
    pending: Option<Tensor>,
}

impl Residual {
    fn new(x: Tensor) -> Self {
        Self { x, pending: None }
    }

    /// The stream with its pending output added, and that stream normalised by `weight`.
    fn add_norm(&self, weight: &Tensor, eps: f64, pass: ops::Pass) -> Result<(Tensor, Tensor)> {
        match &self.pending {
            Some(delta) => ops::add_rms_norm(&self.x, delta, weight, eps, pass),
            None => Ok((self.x.clone(), ops::rms_norm(&self.x, weight, eps)?)),
        }
    }

    /// The stream with its pending output added.
    fn sum(&self) -> Result<Tensor> {
        match &self.pending {
            Some(delta) => &self.x + delta,
            None => Ok(self.x.clone()),
        }
    }

    /// Both parts through `f` (a reshape or a row selection).
    fn map(self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            x: f(&self.x)?,
            pending: self.pending.as_ref().map(f).transpose()?,
        })
    }
}

/// What every block of a training pass over a padded batch reads besides the stream, per
/// [`AttentionKind`].
struct MaskedPass {
    kinds: Vec<KindInputs>,
}

/// One attention kind's additive mask `[b, 1, t, t]` (its window's) and rotary tables.
struct KindInputs {
    mask: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl MaskedPass {
    /// The stream through `block`.
    fn through(&self, block: &Block, config: &ModelConfig, stream: Residual) -> Result<Residual> {
        let KindInputs { mask, cos, sin } = &self.kinds[block.kind];
        block.forward(config, stream, cos, sin, Attend::Masked(mask))
    }
}

/// How a block's attention reaches its keys.
enum Attend<'a> {
    /// This call's own positions, with an additive mask `[b, 1, t, t]` (training, scoring).
    Masked(&'a Tensor),
    /// New positions written into a KV cache, each attending over its slot's positions up to its
    /// own (prefill, decode).
    Cached(CachedKv<'a>),
}

impl Attend<'_> {
    /// Cache passes generate; masked passes train or are set against training's numbers.
    fn pass(&self) -> ops::Pass {
        match self {
            Attend::Masked(_) => ops::Pass::Differentiable,
            Attend::Cached(_) => ops::Pass::Generation,
        }
    }
}

/// A forward pass's view of one layer's KV cache.
struct CachedKv<'a> {
    cache: &'a mut KvCache,
    layer: usize,
    /// Each new token's rotary angles and span: its slot and the first and last position it
    /// attends over (the last being its own, where its key and value are written).
    tables: &'a TokenTables,
}

impl Block {
    /// In the order the forward pass runs them.
    fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let Block { self_attn, mlp, .. } = self;
        [
            ("self_attn.q_proj", &mut self_attn.q_proj),
            ("self_attn.k_proj", &mut self_attn.k_proj),
            ("self_attn.v_proj", &mut self_attn.v_proj),
            ("self_attn.o_proj", &mut self_attn.o_proj),
            ("mlp.gate_proj", &mut mlp.gate_proj),
            ("mlp.up_proj", &mut mlp.up_proj),
            ("mlp.down_proj", &mut mlp.down_proj),
        ]
    }

    /// The stream `[b, t, hidden]` through the block, its MLP's output left pending.
    fn forward(
        &self,
        config: &ModelConfig,
        residual: Residual,
        cos: &Tensor,
        sin: &Tensor,
        attend: Attend,
    ) -> Result<Residual> {
        let (eps, pass) = (config.rms_norm_eps, attend.pass());
        let norms = &self.norms;
        let (x, h) = norms.sublayer_input(&residual, &norms.attention, eps, pass)?;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, d) = (
            config.num_attention_heads,
            config.num_kv_heads(),
            config.head_dim(),
        );
        let scale = config.attention_scale();
        let attn = match attend {
            Attend::Masked(mask) => {
                let attn = &self.self_attn;
                let [q, k, v] = [&attn.q_proj, &attn.k_proj, &attn.v_proj].map(|p| p.forward(&h));
                let [q, k, v] = [q?, k?, v?];
                let [q, k] = match &attn.head_norms {
                    Some(norms) => norms.forward([&q, &k], eps, self.norms.offset)?,
                    None => [q, k],
                };
                ops::rotary_attention([&q, &k, &v], [cos, sin], mask, (heads, kv_heads), scale)?
            }
            Attend::Cached(c) => {
                // [b, t, (heads + 2·kv_heads)·d]: q, k and v side by side. The keys are turned
                // as they are written, the queries inside the attention op.
                let attn = &self.self_attn;
                let rows =
                    stacked_forward(&attn.qkv, &[&attn.q_proj, &attn.k_proj, &attn.v_proj], &h)?;
                let columns = (heads * d, (heads + kv_heads) * d);
                let rows = match &attn.head_norms {
                    Some(norms) => {
                        norms.forward_stacked(&rows, (heads, kv_heads), eps, self.norms.offset)?
                    }
                    None => rows,
                };
                let (keys, values) = c.cache.write(c.layer, &rows, columns, c.tables)?;
                optune_kernels::cached_attention(&rows, heads, c.tables, &keys, &values, scale)?
                    .reshape((b, t, heads * d))?
            }
        };
        let attended = Residual {
            x,
            pending: Some(norms.sublayer_output(
                self.self_attn.o_proj.forward(&attn)?,
                &norms.attention,
                eps,
            )?),
        };
        let (x, h) = norms.sublayer_input(&attended, &norms.mlp, eps, pass)?;
        Ok(Residual {
            x,
            pending: Some(norms.sublayer_output(self.mlp.forward(&h, pass)?, &norms.mlp, eps)?),
        })
    }
}

/// Per-layer keys and values for `slots` sequences of up to `capacity` positions each. On the CPU
/// in f32 they live in plain host vectors `[slots, kv_heads, capacity, head_dim]` that the decode
/// kernels read directly ([`Transformer::decode_step`] then attends over each slot's own length);
/// otherwise in tensors, into which a forward pass writes all its new positions with one op per
/// layer, keys rotated on the way ([`optune_kernels::cache_write`]), each new position then
/// attending over its own slot's span ([`optune_kernels::cached_attention`]).
///
/// A tensor cache is laid out by slot (`[slots, kv_heads, capacity, head_dim]`, [`KvCache::new`])
/// or paged ([`KvCache::paged`]): a pool of blocks of [`KvCache::BLOCK`] positions, which a slot
/// takes as its sequence grows and hands back when cleared, so that memory goes to the sequences'
/// real lengths and not to every slot's longest. The samples of one prompt then share the blocks
/// its prompt filled ([`KvCache::copy_slot`]).
pub struct KvCache {
    store: KvStore,
    lengths: Vec<usize>,
    capacity: usize,
}

enum KvStore {
    Host {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
        kv_heads: usize,
        head_dim: usize,
    },
    /// Per layer `[2, slots, kv_heads, capacity, d]`, or paged `[2, blocks, kv_heads, block,
    /// d]`: keys, then values, so that one op writes both
    /// ([`optune_kernels::cache_write`]).
    Tensors {
        layers: Vec<Tensor>,
        pages: Option<Pages>,
    },
}

/// Which blocks of a paged cache hold each slot's positions, which are free, and what the slots
/// were promised.
struct Pages {
    /// Positions per block.
    block: usize,
    /// `[slots, width]`: slot `s`'s position `p` is in block `table[s·width + p / block]`; the
    /// entries past the blocks a slot holds are never read.
    table: Arc<Vec<u32>>,
    width: usize,
    /// Blocks each slot holds: the first entries of its row.
    held: Vec<usize>,
    /// Slots holding each block (a prompt's full blocks are shared by its samples).
    holders: Vec<u32>,
    /// Free blocks, the next taken last.
    free: Vec<u32>,
    /// Blocks promised to each slot ([`KvCache::reserve`]) and not yet taken.
    promised: Vec<usize>,
    /// Their sum: free blocks no other slot may take.
    promised_total: usize,
    /// The table on the device, once uploaded, and the rows changed since.
    device: Option<BlockTable>,
    stale: Vec<usize>,
}

impl Pages {
    /// Free blocks no promise holds.
    fn unpromised(&self) -> usize {
        self.free.len() - self.promised_total
    }

    /// Blocks `slot` takes for its first `positions` positions beyond those it holds.
    fn needed(&self, slot: usize, positions: usize) -> usize {
        positions
            .div_ceil(self.block)
            .saturating_sub(self.held[slot])
    }

    /// Of `count` more blocks for `slot`, those its own promise does not cover.
    fn beyond_promise(&self, slot: usize, count: usize) -> usize {
        count - self.promised[slot].min(count)
    }

    /// Whether `slot` can take `count` more blocks: its own promised ones, then free blocks no
    /// promise holds.
    fn can_take(&self, slot: usize, count: usize) -> bool {
        self.beyond_promise(slot, count) <= self.unpromised()
    }

    /// Gives `slot` another block: one of its promised ones, or else a free block no promise
    /// holds.
    fn take(&mut self, slot: usize) -> anyhow::Result<u32> {
        if !self.can_take(slot, 1) {
            bail!(
                "the KV cache has no block left for slot {slot} ({} free, {} promised to other \
                 sequences)",
                self.free.len(),
                self.promised_total
            );
        }
        let promised = self.promised[slot] > 0;
        let block = self.free.pop().expect("a promised block is free");
        if promised {
            self.promised[slot] -= 1;
            self.promised_total -= 1;
        }
        self.holders[block as usize] = 1;
        Arc::make_mut(&mut self.table)[slot * self.width + self.held[slot]] = block;
        self.held[slot] += 1;
        self.stale.push(slot);
        Ok(block)
    }

    /// Hands back what `slot` holds and was promised.
    fn release(&mut self, slot: usize) {
        for &block in &self.table[slot * self.width..][..self.held[slot]] {
            self.holders[block as usize] -= 1;
            if self.holders[block as usize] == 0 {
                self.free.push(block);
            }
        }
        self.held[slot] = 0;
        self.promised_total -= std::mem::take(&mut self.promised[slot]);
    }
}

impl KvCache {
    /// Positions per block of a paged cache: what a sequence wastes is under one block, and the
    /// block table stays small (a 4,096-position slot takes 128 entries).
    pub const BLOCK: usize = 32;

    /// A cache for `model`: host vectors read by the host decode kernels where
    /// [`optune_kernels::decode_path`] picks them (the CPU in f32, fused kernels), else tensors.
    pub fn new(model: &Transformer, slots: usize, capacity: usize) -> Result<Self> {
        if Self::on_host(model) {
            let cfg = model.config();
            let size = slots * cfg.num_kv_heads() * capacity * cfg.head_dim();
            let layers = cfg.num_hidden_layers;
            return Ok(Self {
                store: KvStore::Host {
                    keys: (0..layers).map(|_| vec![0f32; size]).collect(),
                    values: (0..layers).map(|_| vec![0f32; size]).collect(),
                    kv_heads: cfg.num_kv_heads(),
                    head_dim: cfg.head_dim(),
                },
                lengths: vec![0; slots],
                capacity,
            });
        }
        Self::new_tensors(model, slots, capacity)
    }

    /// Bytes `capacity` positions of one sequence take in the cache [`KvCache::new`] makes for
    /// `model` (keys and values of every layer).
    pub fn slot_bytes(model: &Transformer, capacity: usize) -> usize {
        let cfg = model.config();
        let element = match Self::on_host(model) {
            true => DType::F32.size_in_bytes(),
            false => model.dtype().size_in_bytes(),
        };
        2 * cfg.num_hidden_layers * cfg.num_kv_heads() * capacity * cfg.head_dim() * element
    }

    /// Whether [`KvCache::new`] keeps `model`'s cache in host vectors (f32) for the host decode
    /// kernels, where [`optune_kernels::decode_path`] picks them.
    fn on_host(model: &Transformer) -> bool {
        optune_kernels::decode_path(model.device(), model.dtype()) == Path::Fused
    }

    /// Whether [`KvCache::new`] makes a tensor cache for `model` (not the host decode kernels'
    /// vectors), which a paged one then replaces at no cost.
    pub fn can_page(model: &Transformer) -> bool {
        !Self::on_host(model)
    }

    /// A tensor-backed cache whatever the device: decoding then takes the tensor path
    /// (what other devices and dtypes use), e.g. to compare it with the CPU kernels.
    pub fn new_tensors(model: &Transformer, slots: usize, capacity: usize) -> Result<Self> {
        Ok(Self {
            store: KvStore::Tensors {
                layers: Self::tensor_layers(model, slots, capacity)?,
                pages: None,
            },
            lengths: vec![0; slots],
            capacity,
        })
    }

    /// Per layer a zeroed `[2, count, kv_heads, positions, d]` store.
    fn tensor_layers(model: &Transformer, count: usize, positions: usize) -> Result<Vec<Tensor>> {
        let cfg = model.config();
        // Keys, then values.
        let shape = (2, count, cfg.num_kv_heads(), positions, cfg.head_dim());
        (0..cfg.num_hidden_layers)
            .map(|_| Tensor::zeros(shape, model.dtype(), model.device()))
            .collect()
    }

    /// A paged tensor cache (whatever the device, as [`KvCache::new_tensors`]): `blocks` blocks of
    /// `block` positions ([`KvCache::BLOCK`] unless testing) shared by `slots` sequences of up to
    /// `capacity` positions each; at least one slot's worth of blocks, so that any one sequence
    /// fits.
    pub fn paged(
        model: &Transformer,
        (slots, capacity): (usize, usize),
        (blocks, block): (usize, usize),
    ) -> anyhow::Result<Self> {
        if block == 0 {
            bail!("a paged KV cache needs blocks of at least one position");
        }
        let width = capacity.div_ceil(block).max(1);
        if blocks < width {
            bail!(
                "a paged KV cache of {blocks} blocks of {block} positions cannot hold one \
                 sequence of {capacity}"
            );
        }
        if blocks > u32::MAX as usize {
            bail!("a paged KV cache of {blocks} blocks: at most {}", u32::MAX);
        }
        Ok(Self {
            store: KvStore::Tensors {
                layers: Self::tensor_layers(model, blocks, block)?,
                pages: Some(Pages {
                    block,
                    table: Arc::new(vec![0; slots * width]),
                    width,
                    held: vec![0; slots],
                    holders: vec![0; blocks],
                    free: (0..blocks as u32).rev().collect(),
                    promised: vec![0; slots],
                    promised_total: 0,
                    device: None,
                    stale: Vec::new(),
                }),
            },
            lengths: vec![0; slots],
            capacity,
        })
    }

    /// Whether the host decode kernels run on this cache (its logits come back as host vectors).
    pub fn is_host(&self) -> bool {
        matches!(self.store, KvStore::Host { .. })
    }

    #[allow(clippy::type_complexity)]
    fn host_layers_mut(&mut self) -> Option<(&mut [Vec<f32>], &mut [Vec<f32>])> {
        match &mut self.store {
            KvStore::Host { keys, values, .. } => Some((keys, values)),
            KvStore::Tensors { .. } => None,
        }
    }

    fn pages_mut(&mut self) -> Option<&mut Pages> {
        match &mut self.store {
            KvStore::Tensors { pages, .. } => pages.as_mut(),
            KvStore::Host { .. } => None,
        }
    }

    pub fn slots(&self) -> usize {
        self.lengths.len()
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn len(&self, slot: usize) -> usize {
        self.lengths[slot]
    }
    pub fn is_empty(&self, slot: usize) -> bool {
        self.lengths[slot] == 0
    }

    /// Free blocks of a paged cache no promise holds (`None` unpaged).
    pub fn unpromised_blocks(&self) -> Option<usize> {
        match &self.store {
            KvStore::Tensors {
                pages: Some(pages), ..
            } => Some(pages.unpromised()),
            _ => None,
        }
    }

    /// Frees a slot for the next sequence. Its stale entries are never read (attention reads a
    /// slot's positions up to its length only); a paged cache takes back its blocks (those it
    /// shares stay with the other holders) and what it was promised.
    pub fn clear(&mut self, slot: usize) {
        self.lengths[slot] = 0;
        if let Some(pages) = self.pages_mut() {
            pages.release(slot);
        }
    }

    /// Promises the empty slot `slot` the blocks its first `positions` positions take, less the
    /// full blocks of a `shared` positions' prefix it will share ([`KvCache::copy_slot`]), when
    /// that many and `margin` more are free beyond the other promises; feeding those positions
    /// then never runs out of blocks. `false` when they are not; always `true` unpaged (every
    /// slot has its capacity).
    pub fn reserve(
        &mut self,
        slot: usize,
        positions: usize,
        shared: usize,
        margin: usize,
    ) -> anyhow::Result<bool> {
        if positions > self.capacity || shared > positions {
            bail!(
                "slot {slot}: {positions} positions (sharing {shared}) exceed the KV cache's {}",
                self.capacity
            );
        }
        if self.lengths[slot] != 0 {
            bail!("slot {slot} is not empty");
        }
        let Some(pages) = self.pages_mut() else {
            return Ok(true);
        };
        let needed = positions.div_ceil(pages.block) - shared / pages.block;
        if pages.unpromised() < needed + margin {
            return Ok(false);
        }
        pages.promised_total += needed;
        pages.promised[slot] += needed;
        Ok(true)
    }

    /// Gives a paged cache's slot `slot` the blocks its first `positions` positions take: its own
    /// promised ones, then blocks no promise holds, when enough are free; `false`, taking none,
    /// when they are not. Always `true` unpaged.
    pub fn grow(&mut self, slot: usize, positions: usize) -> anyhow::Result<bool> {
        if positions > self.capacity {
            bail!(
                "slot {slot}: {positions} positions exceed the KV cache's {}",
                self.capacity
            );
        }
        let Some(pages) = self.pages_mut() else {
            return Ok(true);
        };
        let needed = pages.needed(slot, positions);
        if !pages.can_take(slot, needed) {
            return Ok(false);
        }
        for _ in 0..needed {
            pages.take(slot)?;
        }
        Ok(true)
    }

    /// A paged cache's blocks (`None` unpaged).
    pub fn blocks(&self) -> Option<usize> {
        match &self.store {
            KvStore::Tensors {
                pages: Some(pages), ..
            } => Some(pages.holders.len()),
            _ => None,
        }
    }

    /// Makes sure each `(slot, positions)` of a pass (distinct slots) holds blocks for its first
    /// `positions` positions in a paged cache, taking none when they are not all free.
    fn hold_positions(&mut self, reach: &[(usize, usize)]) -> anyhow::Result<()> {
        let Some(pages) = self.pages_mut() else {
            return Ok(());
        };
        let needs: Vec<(usize, usize)> = (reach.iter())
            .map(|&(slot, positions)| (slot, pages.needed(slot, positions)))
            .collect();
        // Beyond each slot's own promise, from the blocks nobody was promised.
        let unpromised: usize = (needs.iter())
            .map(|&(slot, needed)| pages.beyond_promise(slot, needed))
            .sum();
        if unpromised > pages.unpromised() {
            bail!(
                "the KV cache has no blocks left for this pass: its {} slots need {unpromised} \
                 blocks beyond their promises ({} free, {} promised)",
                reach.len(),
                pages.free.len(),
                pages.promised_total
            );
        }
        for (slot, needed) in needs {
            for _ in 0..needed {
                pages.take(slot)?;
            }
        }
        Ok(())
    }

    /// A paged cache's block table on its device, the rows changed since the last pass sent
    /// (`None` unpaged).
    fn block_table(&mut self) -> Result<Option<BlockTable>> {
        let KvStore::Tensors {
            layers,
            pages: Some(pages),
        } = &mut self.store
        else {
            return Ok(None);
        };
        // The changed rows stay listed until the device has them (a failed upload is retried
        // whole by the next pass).
        pages.stale.sort_unstable();
        pages.stale.dedup();
        let table = match &pages.device {
            // The changed rows with their indices, unless that is more than the whole table (the
            // first passes fill many slots at once).
            Some(device) if 2 * pages.stale.len() <= pages.held.len() => {
                device.with_rows(pages.table.clone(), &pages.stale)?
            }
            _ => BlockTable::new(pages.table.clone(), pages.width, layers[0].device())?,
        };
        pages.stale.clear();
        pages.device = Some(table.clone());
        Ok(Some(table))
    }

    /// Makes the empty slot `to` a copy of slot `from` (its keys, values and length): the samples
    /// of one prompt share its prefill. A paged cache shares `from`'s full blocks (they are never
    /// written again) and copies its last, partly filled one into a block of `to`'s own.
    pub fn copy_slot(&mut self, from: usize, to: usize) -> anyhow::Result<()> {
        if from == to {
            return Ok(());
        }
        if self.lengths[to] != 0 {
            bail!("copy_slot: slot {to} is not empty");
        }
        let len = self.lengths[from];
        let capacity = self.capacity;
        match &mut self.store {
            KvStore::Host {
                keys,
                values,
                kv_heads,
                head_dim,
            } => {
                let (kvh, d) = (*kv_heads, *head_dim);
                for store in keys.iter_mut().chain(values.iter_mut()) {
                    for h in 0..kvh {
                        let (src, dst) = (
                            (from * kvh + h) * capacity * d,
                            (to * kvh + h) * capacity * d,
                        );
                        store.copy_within(src..src + len * d, dst);
                    }
                }
            }
            KvStore::Tensors {
                layers,
                pages: None,
            } => {
                for store in layers {
                    // The slot's keys and values alone, gathered into a tensor of their own
                    // (`copy` would clone the whole store, on a GPU gigabytes per layer).
                    let slot = store.narrow(1, from, 1)?.contiguous()?;
                    store.slice_set(&slot, 1, to)?;
                }
            }
            KvStore::Tensors {
                layers,
                pages: Some(pages),
            } => {
                if pages.held[to] != 0 {
                    bail!("copy_slot: slot {to} holds blocks");
                }
                let full = len / pages.block;
                let partial = full * pages.block < len;
                // Its own block for the partly filled one, checked before anything changes.
                if partial && !pages.can_take(to, 1) {
                    bail!(
                        "copy_slot: no block left for slot {to}'s copy of slot {from}'s last \
                         {} positions",
                        len - full * pages.block
                    );
                }
                let width = pages.width;
                for i in 0..full {
                    let block = pages.table[from * width + i];
                    pages.holders[block as usize] += 1;
                    Arc::make_mut(&mut pages.table)[to * width + i] = block;
                }
                pages.held[to] = full;
                pages.stale.push(to);
                if partial {
                    let last = pages.table[from * width + full] as usize;
                    let own = pages.take(to)? as usize;
                    for store in layers {
                        let block = store.narrow(1, last, 1)?.contiguous()?;
                        store.slice_set(&block, 1, own)?;
                    }
                }
            }
        }
        self.lengths[to] = len;
        Ok(())
    }

    /// Writes the new keys (turned by their angles) and values of one layer, the `kv_heads·d`
    /// columns of `rows` (`[b, t, ..]`, a row per token) from `columns = (keys, values)`, into the
    /// store in place, each at its token's slot and position (`tables`), and returns the layer's
    /// whole key and value stores `[slots, kv_heads, capacity, d]` (paged `[blocks, kv_heads,
    /// block, d]`; tensor store only).
    fn write(
        &mut self,
        layer: usize,
        rows: &Tensor,
        columns: (usize, usize),
        tables: &TokenTables,
    ) -> Result<(Tensor, Tensor)> {
        let KvStore::Tensors { layers, .. } = &self.store else {
            candle_core::bail!("write on a host KV cache");
        };
        let store = &layers[layer];
        optune_kernels::cache_write::write_rotated(store, rows, columns, tables)?;
        Ok((store.get(0)?, store.get(1)?))
    }
}
