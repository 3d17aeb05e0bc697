//! `config.json` of the supported decoder-only families, deserialised directly.
//!
//! Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM3 and OLMo-2 share one architecture (RMSNorm
//! blocks, rotary attention with grouped KV heads, SwiGLU MLP); they differ only in a few
//! switches (biases, a sliding window, the RMS norms of queries and keys of Qwen3 (each head) and
//! OLMo-2 (each whole projection), SmolLM3's layers without a rotary embedding, OLMo-2's norms
//! after each sublayer in place of before it), which
//! [`ModelConfig`] resolves per family so the forward pass can stay a single readable function,
//! and in how Phi-3's checkpoints store the projections (fused; see `crate::layout`).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The model families whose `config.json` we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    SmolLM3,
    Olmo2,
    Olmo3,
    Exaone4,
    Gemma3Text,
    Granite,
}

impl Family {
    pub fn parse(model_type: &str) -> Result<Self> {
        match model_type {
            "llama" => Ok(Family::Llama),
            "mistral" => Ok(Family::Mistral),
            "qwen2" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            "phi3" => Ok(Family::Phi3),
            "smollm3" => Ok(Family::SmolLM3),
            "olmo2" => Ok(Family::Olmo2),
            "olmo3" => Ok(Family::Olmo3),
            "exaone4" => Ok(Family::Exaone4),
            "gemma3_text" => Ok(Family::Gemma3Text),
            "granite" => Ok(Family::Granite),
            "gemma3" => bail!(
                "model_type 'gemma3' is a multimodal Gemma 3 checkpoint (4B to 27B, the language \
                 model under text_config): optune reads the text-only gemma3_text ones (270M, 1B)"
            ),
            other => bail!(
                "unsupported model_type '{other}': optune supports llama, mistral, qwen2, qwen3, \
                 phi3, smollm3, olmo2, olmo3, exaone4, gemma3_text and granite (Llama 2/3, \
                 TinyLlama, SmolLM2, Zephyr/Mistral, Qwen2/2.5, Qwen3 dense, Phi-3/3.5/4, SmolLM3, \
                 OLMo 2, OLMo 3, EXAONE 4.0, Gemma 3 text-only: 270M, 1B, Granite 3)"
            ),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::SmolLM3 => "smollm3",
            Family::Olmo2 => "olmo2",
            Family::Olmo3 => "olmo3",
            Family::Exaone4 => "exaone4",
            Family::Gemma3Text => "gemma3_text",
            Family::Granite => "granite",
        }
    }
}

/// The layers of one period of a `sliding_window_pattern`: the count, or the length of a string
/// of `L` and `G` (transformers reads `"LLLG"` as 4).
fn pattern_period(pattern: &serde_json::Value) -> Option<usize> {
    match pattern {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as usize),
        serde_json::Value::String(s) if s.chars().all(|c| c == 'L' || c == 'G') => Some(s.len()),
        _ => None,
    }
}

/// What the RMS norms of the queries and keys ([`ModelConfig::qk_norm`]) each normalise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// Qwen3: each head over its `head_dim` values (weights `[head_dim]`).
    PerHead,
    /// OLMo-2: a token's whole projection (weights `[heads·head_dim]` for q,
    /// `[kv_heads·head_dim]` for k).
    WholeProjection,
}

/// Where a block's RMS norms sit around each of its two sublayers (the attention, the MLP)
/// ([`ModelConfig::norm_placement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// On what each sublayer reads (`input_layernorm`, `post_attention_layernorm`).
    Before,
    /// On each sublayer's output before the residual add, the sublayer reading the stream as it
    /// is (OLMo 2 and 3, EXAONE 4: `post_attention_layernorm`, `post_feedforward_layernorm`).
    After,
    /// Both (Gemma 3: `input_layernorm` and `post_attention_layernorm` around the attention,
    /// `pre_feedforward_layernorm` and `post_feedforward_layernorm` around the MLP).
    BeforeAndAfter,
}

/// The MLP's gate ([`ModelConfig::activation`]): `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU's tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// How a layer's attention turns queries and keys by position ([`ModelConfig::layer_rotation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRotation {
    /// By the config's rotation, `rope_scaling` included.
    Scaled,
    /// By the plain rotation of [`ModelConfig::local_rope_theta`], `rope_scaling` left out
    /// (the sliding layers of OLMo 3 and Gemma 3).
    Local,
    /// Not at all (SmolLM3's NoPE layers).
    None,
}

/// `rope_scaling` as written by transformers. The forms read are `default`, `linear` (position
/// interpolation), `dynamic` (NTK, which only departs from the default past
/// `max_position_embeddings`, where no sequence goes here), `llama3`, `yarn` and `longrope`
/// (Phi-3.5's: the short factors, which transformers uses up to the original context, the
/// limit here); the fields of each are those of transformers' `modeling_rope_utils`, which
/// `optune_model::rope` follows.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// YaRN: the scale of the cosine and sine tables; derived from `factor` (and `mscale`,
    /// `mscale_all_dim`) when absent.
    #[serde(default)]
    pub attention_factor: Option<f64>,
    #[serde(default)]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
    /// YaRN: the rotations that bound the ramp between extrapolated and interpolated channels.
    #[serde(default)]
    pub beta_fast: Option<f64>,
    #[serde(default)]
    pub beta_slow: Option<f64>,
    /// YaRN: whether the ramp's bounds are rounded out to whole channels (transformers: true).
    #[serde(default)]
    pub truncate: Option<bool>,
    /// LongRoPE: each channel pair's divisor of its frequency within the original context, and
    /// past it (read only to check its length).
    #[serde(default)]
    pub short_factor: Option<Vec<f64>>,
    #[serde(default)]
    pub long_factor: Option<Vec<f64>>,
}

/// The rope scaling forms [`ModelConfig`] accepts.
const ROPE_SCALING_TYPES: &str = "default, linear, dynamic, llama3, yarn, longrope";

/// A token id field that transformers writes either as one integer or as a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of `config.json` that the forward pass needs. Unknown fields are ignored, so a real
/// checkpoint's config deserialises as it is.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Phi-3: the context the model was pretrained with, below `max_position_embeddings` when
    /// LongRoPE stretches it.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// SmolLM3: per layer, 1 where the attention has a rotary embedding, 0 where it has none
    /// ("NoPE"); without the list, every `no_rope_layer_interval`-th layer has none.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<u32>>,
    #[serde(default)]
    pub no_rope_layer_interval: Option<usize>,
    /// Phi-4-mini rotates only this share of each head's channels (`crate::layout` says how the
    /// model holds them).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Absent, the family's default in transformers ([`ModelConfig::tied_embeddings`]).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Attend to at most this many previous positions (inclusive of the current one): every
    /// layer of Mistral and Phi-3, the sliding layers of the others
    /// ([`ModelConfig::layer_window`]).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2, Qwen3 and SmolLM3 write a window size but only use it when this is set.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Per layer, `sliding_attention` or `full_attention`; absent, the family's default pattern.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Qwen2 and Qwen3 without `layer_types`: the first this many layers attend in full.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// EXAONE 4 without `layer_types`: every this-many-th layer attends in full, the others
    /// slide; a count, or a string of `L` (sliding) and `G` (full) such as `"LLLG"`.
    #[serde(default)]
    pub sliding_window_pattern: Option<serde_json::Value>,
    /// Llama's and Qwen3's optional biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Gemma's name for `hidden_act`.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Gemma 3: attention scores are scaled by this to the power -1/2 (in place of `head_dim`).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the sliding layers turn by the plain rotation of this base.
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 2's caps on the logits and the attention scores (`tanh(x / cap) · cap`): not
    /// supported; Gemma 3 writes them null.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Granite's four multipliers ([`ModelConfig::embedding_scale`],
    /// [`ModelConfig::residual_scale`], [`ModelConfig::attention_scale`],
    /// [`ModelConfig::logits_scale`]); 1 when absent, as its config class has them.
    #[serde(default)]
    pub embedding_multiplier: Option<f64>,
    #[serde(default)]
    pub residual_multiplier: Option<f64>,
    #[serde(default)]
    pub attention_multiplier: Option<f64>,
    #[serde(default)]
    pub logits_scaling: Option<f64>,
    /// EmbeddingGemma's attention over the whole sequence: not a causal model, refused.
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    /// Sequence-classification heads (reward models) only.
    #[serde(default)]
    pub num_labels: Option<usize>,
    #[serde(default)]
    pub id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

/// transformers 5 writes `rope_theta` and the scaling inside `rope_parameters`; older versions
/// at the top level. Lifts the former into the latter where the top level has none.
fn lift_rope_parameters(json: &mut serde_json::Value) {
    let Some(params) = json.get("rope_parameters").cloned() else {
        return;
    };
    let Some(object) = json.as_object_mut() else {
        return;
    };
    if !object.contains_key("rope_theta") {
        if let Some(theta) = params.get("rope_theta") {
            object.insert("rope_theta".into(), theta.clone());
        }
    }
    let scaled = params
        .get("rope_type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| t != "default");
    if scaled && object.get("rope_scaling").is_none_or(|v| v.is_null()) {
        object.insert("rope_scaling".into(), params);
    }
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    4096
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut json: serde_json::Value =
            serde_json::from_str(text).context("parsing config.json")?;
        lift_rope_parameters(&mut json);
        let config: ModelConfig = serde_json::from_value(json).context("parsing config.json")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.family()?;
        self.activation()?;
        if self.use_bidirectional_attention == Some(true) {
            bail!("use_bidirectional_attention is set: an embedding model, not a causal one");
        }
        for (name, cap) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(cap) = cap {
                bail!("{name} {cap} is not supported (Gemma 2's caps; Gemma 3 writes null)");
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            bail!("config has zero heads, hidden size or layers");
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            );
        }
        if let (Ok(Family::SmolLM3), Some(layers)) = (self.family(), &self.no_rope_layers) {
            if layers.len() != self.num_hidden_layers {
                bail!(
                    "no_rope_layers has {} entries for {} layers",
                    layers.len(),
                    self.num_hidden_layers
                );
            }
        }
        if let Some(pattern) = &self.sliding_window_pattern {
            match pattern_period(pattern) {
                Some(period) if period > 0 => {}
                _ => bail!(
                    "sliding_window_pattern {pattern}: expected a positive count or a string of L and G"
                ),
            }
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                bail!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                );
            }
            if let Some(other) = types
                .iter()
                .find(|t| *t != "sliding_attention" && *t != "full_attention")
            {
                bail!("layer_types: '{other}' is neither sliding_attention nor full_attention");
            }
        }
        let (d, r) = (self.head_dim(), self.rotary_dim());
        if let Some(share) = self.partial_rotary_factor.filter(|_| r != d) {
            if r == 0 || !r.is_multiple_of(2) || r > d {
                bail!("partial_rotary_factor {share} rotates {r} of {d} channels: expected an even count from 2 to {d}");
            }
            if self.qk_norm().is_some() {
                bail!("partial_rotary_factor {share} with norms of the queries and keys is not supported");
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            match self.rope_type() {
                "default" | "llama3" => {}
                "longrope" => {
                    let pairs = self.rotary_dim() / 2;
                    for (name, factors) in [
                        ("short_factor", &scaling.short_factor),
                        ("long_factor", &scaling.long_factor),
                    ] {
                        match factors {
                            Some(f) if f.len() == pairs => {}
                            Some(f) => bail!(
                                "rope_scaling 'longrope': {name} has {} values for {pairs} channel pairs",
                                f.len()
                            ),
                            None => bail!("rope_scaling 'longrope' has no {name}"),
                        }
                    }
                }
                "linear" | "dynamic" | "yarn" => match scaling.factor {
                    Some(factor) if factor >= 1.0 => {}
                    Some(factor) => bail!(
                        "rope_scaling '{}': factor {factor} is below 1",
                        scaling.rope_type
                    ),
                    None => bail!("rope_scaling '{}' has no factor", scaling.rope_type),
                },
                other => {
                    bail!("rope_scaling type '{other}' is not supported ({ROPE_SCALING_TYPES})")
                }
            }
            if self.max_positions() == 0 {
                bail!("rope_scaling '{}' leaves no positions", scaling.rope_type);
            }
        }
        Ok(())
    }

    pub fn family(&self) -> Result<Family> {
        Family::parse(&self.model_type)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Why [`ModelConfig::max_positions`] stops short of `max_position_embeddings`, for the
    /// errors that name the limit; empty where it does not.
    pub fn position_limit_note(&self) -> &'static str {
        if self.max_positions() < self.max_position_embeddings {
            " (LongRoPE: past its original context transformers switches to its long factors, \
             batch by batch; optune stops there)"
        } else {
            ""
        }
    }

    /// The rope scaling form, `default` without one. Phi-3's configuration reads its older
    /// names, `su` and `yarn`, as `longrope`, as transformers' does.
    pub fn rope_type(&self) -> &str {
        match (&self.rope_scaling, self.family()) {
            (None, _) => "default",
            (Some(s), Ok(Family::Phi3)) if s.rope_type == "su" || s.rope_type == "yarn" => {
                "longrope"
            }
            (Some(s), _) => &s.rope_type,
        }
    }

    /// The context the model was pretrained with, where its config class states one:
    /// `original_max_position_embeddings` (Phi-3's defaults to 4096, as transformers'
    /// `Phi3Config`).
    pub fn stated_original_context(&self) -> Option<usize> {
        match (self.original_max_position_embeddings, self.family()) {
            (Some(original), _) => Some(original),
            (None, Ok(Family::Phi3)) => Some(4096),
            (None, _) => None,
        }
    }

    /// [`ModelConfig::stated_original_context`], else `max_position_embeddings`.
    pub fn original_context(&self) -> usize {
        self.stated_original_context()
            .unwrap_or(self.max_position_embeddings)
    }

    /// The context a `rope_scaling` factor stretches (YaRN's): the scaling's own
    /// `original_max_position_embeddings`, else `max_position_embeddings`.
    pub fn scaled_context(&self) -> usize {
        (self.rope_scaling.as_ref())
            .and_then(|s| s.original_max_position_embeddings)
            .unwrap_or(self.max_position_embeddings)
    }

    /// The positions a sequence may use: `max_position_embeddings`; for YaRN the original
    /// context times the factor where that is longer (as vLLM reads a YaRN config: Qwen's
    /// model cards add `factor` 4 over an original 32768 to reach 131072 positions); for
    /// LongRoPE the original context, past which transformers switches to the long factors.
    pub fn max_positions(&self) -> usize {
        let Some(scaling) = &self.rope_scaling else {
            return self.max_position_embeddings;
        };
        match self.rope_type() {
            "yarn" => {
                let extended =
                    (self.scaled_context() as f64 * scaling.factor.unwrap_or(1.0)) as usize;
                self.max_position_embeddings.max(extended)
            }
            "longrope" => self.original_context().min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }

    /// Whether the output head is the token embedding. transformers writes the field only where
    /// it differs from the config class's default: false for the Llama-like classes, true for
    /// SmolLM3's (whose class leaves it to `PretrainedConfig`) and Gemma 3's.
    pub fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(matches!(
            self.family(),
            Ok(Family::SmolLM3 | Family::Gemma3Text)
        ))
    }

    /// The MLP's gate: `hidden_act` (Gemma: `hidden_activation`), SiLU unless set.
    pub fn activation(&self) -> Result<Activation> {
        let name = (self.hidden_activation.as_ref())
            .or(self.hidden_act.as_ref())
            .map_or("silu", String::as_str);
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => {
                bail!("activation '{other}' is not supported (silu, swish or gelu_pytorch_tanh)")
            }
        }
    }

    /// Gemma 3: every RMS norm scales by `1 + weight` (the checkpoint stores the difference).
    pub fn norm_weight_offset(&self) -> f64 {
        match self.family() {
            Ok(Family::Gemma3Text) => 1.0,
            _ => 0.0,
        }
    }

    /// The factor of the embedding's rows on the way in (in the model's dtype; a tied head reads
    /// them unscaled): Gemma 3's `sqrt(hidden_size)`, Granite's `embedding_multiplier`.
    pub fn embedding_scale(&self) -> Option<f64> {
        match self.family() {
            Ok(Family::Gemma3Text) => Some((self.hidden_size as f64).sqrt()),
            Ok(Family::Granite) => self.embedding_multiplier,
            _ => None,
        }
    }

    /// The factor of the attention scores: `head_dim^-1/2`, Gemma 3's
    /// `query_pre_attn_scalar^-1/2`, or Granite's `attention_multiplier`.
    pub fn attention_scale(&self) -> f64 {
        let scalar = match self.family() {
            Ok(Family::Gemma3Text) => self.query_pre_attn_scalar.unwrap_or(self.head_dim() as f64),
            Ok(Family::Granite) => return self.attention_multiplier.unwrap_or(1.0),
            _ => self.head_dim() as f64,
        };
        1.0 / scalar.sqrt()
    }

    /// The factor of each sublayer's output as it joins the stream: Granite's
    /// `residual_multiplier`, else 1.
    pub fn residual_scale(&self) -> f64 {
        match self.family() {
            Ok(Family::Granite) => self.residual_multiplier.unwrap_or(1.0),
            _ => 1.0,
        }
    }

    /// The factor of a language model's logits: 1 over Granite's `logits_scaling`, else 1.
    pub fn logits_scale(&self) -> f64 {
        match self.family() {
            Ok(Family::Granite) => 1.0 / self.logits_scaling.unwrap_or(1.0),
            _ => 1.0,
        }
    }

    /// The base of the rotation of [`LayerRotation::Local`] layers: Gemma 3's
    /// `rope_local_base_freq` (10000 unless set), else `rope_theta`.
    pub fn local_rope_theta(&self) -> f64 {
        match self.family() {
            Ok(Family::Gemma3Text) => self.rope_local_base_freq.unwrap_or(10000.0),
            _ => self.rope_theta,
        }
    }

    /// How layer `layer`'s attention turns queries and keys by their positions.
    pub fn layer_rotation(&self, layer: usize) -> LayerRotation {
        match self.family() {
            // NoPE layers, by default every fourth (transformers' `SmolLM3Config`).
            Ok(Family::SmolLM3) => {
                let rotates = match &self.no_rope_layers {
                    Some(layers) => layers.get(layer).is_none_or(|&on| on != 0),
                    None => !(layer + 1).is_multiple_of(self.no_rope_layer_interval.unwrap_or(4)),
                };
                match rotates {
                    true => LayerRotation::Scaled,
                    false => LayerRotation::None,
                }
            }
            // transformers' `Olmo3Model` turns its sliding layers by the default rotation,
            // `Gemma3TextModel` by the default rotation of its local base.
            Ok(Family::Olmo3) if self.rope_scaling.is_some() && self.sliding_layer(layer) => {
                LayerRotation::Local
            }
            Ok(Family::Gemma3Text) if self.sliding_layer(layer) => LayerRotation::Local,
            // EXAONE 4 with a window: its full layers attend without a rotary embedding.
            Ok(Family::Exaone4) if self.sliding_window.is_some() && !self.sliding_layer(layer) => {
                LayerRotation::None
            }
            _ => LayerRotation::Scaled,
        }
    }

    /// Whether layer `layer` is one of the config's sliding-window layers (`layer_types`, else
    /// the family's default pattern as transformers' config classes make it): whether a window
    /// applies is [`ModelConfig::layer_window`]'s to say.
    fn sliding_layer(&self, layer: usize) -> bool {
        if let Some(types) = &self.layer_types {
            return types.get(layer).is_some_and(|t| t == "sliding_attention");
        }
        match self.family() {
            Ok(Family::Qwen2 | Family::Qwen3) => layer >= self.max_window_layers.unwrap_or(28),
            Ok(Family::SmolLM3) => self.layer_rotation(layer) == LayerRotation::None,
            Ok(Family::Olmo3) => !(layer + 1).is_multiple_of(4),
            Ok(Family::Exaone4) if self.sliding_window.is_some() => self.pattern_slides(layer, 4),
            Ok(Family::Gemma3Text) => self.pattern_slides(layer, 6),
            _ => false,
        }
    }

    /// Whether `sliding_window_pattern` (else `default` layers to a period) makes layer `layer`
    /// slide: all but the last of each period.
    fn pattern_slides(&self, layer: usize, default: usize) -> bool {
        let period = (self.sliding_window_pattern.as_ref())
            .and_then(pattern_period)
            .unwrap_or(default);
        !(layer + 1).is_multiple_of(period)
    }

    /// The channels of each head the rotary embedding turns: `partial_rotary_factor` of the
    /// head (rounded down, as transformers' `int()`), all of it without one.
    pub fn rotary_dim(&self) -> usize {
        let d = self.head_dim();
        self.partial_rotary_factor
            .map_or(d, |share| (d as f64 * share) as usize)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 always carries q/k/v biases; Llama and Qwen3 only when `attention_bias` says so.
    pub fn qkv_bias(&self) -> bool {
        match self.family() {
            Ok(Family::Qwen2) => true,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    pub fn o_bias(&self) -> bool {
        match self.family() {
            Ok(
                Family::Llama
                | Family::Qwen3
                | Family::SmolLM3
                | Family::Olmo2
                | Family::Olmo3
                | Family::Gemma3Text
                | Family::Granite,
            ) => self.attention_bias.unwrap_or(false),
            _ => false,
        }
    }

    /// The RMS norms (`self_attn.q_norm` / `k_norm`) the queries and keys pass through before
    /// the rotary embedding, if any.
    pub fn qk_norm(&self) -> Option<QkNorm> {
        match self.family() {
            Ok(Family::Qwen3 | Family::Exaone4 | Family::Gemma3Text) => Some(QkNorm::PerHead),
            Ok(Family::Olmo2 | Family::Olmo3) => Some(QkNorm::WholeProjection),
            _ => None,
        }
    }

    /// Where each block's RMS norms sit around its attention and its MLP.
    pub fn norm_placement(&self) -> NormPlacement {
        match self.family() {
            Ok(Family::Olmo2 | Family::Olmo3 | Family::Exaone4) => NormPlacement::After,
            Ok(Family::Gemma3Text) => NormPlacement::BeforeAndAfter,
            _ => NormPlacement::Before,
        }
    }

    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }

    /// Layer `layer`'s attention window in positions, if it has one: every layer of Mistral and
    /// Phi-3; the sliding layers of Qwen2, Qwen3 and SmolLM3 under `use_sliding_window`, of
    /// OLMo 3 (whose config class defaults the window to 4096) and of EXAONE 4 (with a
    /// `sliding_window`), as transformers reads them.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.family() {
            Ok(Family::Mistral | Family::Phi3) => self.sliding_window,
            Ok(Family::Qwen2 | Family::Qwen3 | Family::SmolLM3)
                if self.use_sliding_window == Some(true) && self.sliding_layer(layer) =>
            {
                self.sliding_window
            }
            Ok(Family::Olmo3) if self.sliding_layer(layer) => {
                Some(self.sliding_window.unwrap_or(4096))
            }
            Ok(Family::Exaone4) if self.sliding_layer(layer) => self.sliding_window,
            Ok(Family::Gemma3Text) if self.sliding_layer(layer) => {
                Some(self.sliding_window.unwrap_or(4096))
            }
            _ => None,
        }
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Outputs of a classification head: `num_labels`, else the size of `id2label` (transformers
    /// writes only the latter), else 2 as transformers defaults.
    pub fn label_count(&self) -> Option<usize> {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .or(Some(2))
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
            .as_ref()
            .and_then(|ids| ids.to_vec().first().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(model_type: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "sliding_window": 4
        })
    }

    #[test]
    fn families_resolve_their_switches() {
        let llama = ModelConfig::from_json_str(&base("llama").to_string()).unwrap();
        assert!(!llama.qkv_bias() && llama.layer_window(0).is_none());
        let qwen = ModelConfig::from_json_str(&base("qwen2").to_string()).unwrap();
        assert!(qwen.qkv_bias() && qwen.layer_window(0).is_none());
        let mistral = ModelConfig::from_json_str(&base("mistral").to_string()).unwrap();
        assert_eq!(mistral.layer_window(0), Some(4));
        assert_eq!(mistral.head_dim(), 4);
        assert!(llama.qk_norm().is_none() && qwen.qk_norm().is_none());
        assert!(mistral.qk_norm().is_none());
        assert_eq!(llama.norm_placement(), NormPlacement::Before);
        let qwen3 = ModelConfig::from_json_str(&base("qwen3").to_string()).unwrap();
        assert!(qwen3.qk_norm() == Some(QkNorm::PerHead) && !qwen3.qkv_bias() && !qwen3.o_bias());
        assert_eq!(qwen3.norm_placement(), NormPlacement::Before);
        let olmo2 = ModelConfig::from_json_str(&base("olmo2").to_string()).unwrap();
        assert_eq!(olmo2.qk_norm(), Some(QkNorm::WholeProjection));
        assert!(olmo2.norm_placement() == NormPlacement::After && !olmo2.tied_embeddings());
        let gemma = ModelConfig::from_json_str(&base("gemma3_text").to_string()).unwrap();
        assert_eq!(gemma.norm_placement(), NormPlacement::BeforeAndAfter);
        assert!(gemma.tied_embeddings() && gemma.norm_weight_offset() == 1.0);
        assert_eq!(gemma.embedding_scale(), Some(8f64.sqrt()));
        assert_eq!(gemma.attention_scale(), 0.5);
        assert_eq!(gemma.activation().unwrap(), Activation::Silu);
        let mut capped = base("gemma3_text");
        capped["final_logit_softcapping"] = serde_json::json!(30.0);
        let err = ModelConfig::from_json_str(&capped.to_string()).unwrap_err();
        assert!(
            format!("{err:#}").contains("final_logit_softcapping"),
            "{err:#}"
        );
        let err = ModelConfig::from_json_str(&base("gemma3").to_string()).unwrap_err();
        assert!(format!("{err:#}").contains("gemma3_text"), "{err:#}");
        let mut gelu = base("gemma3_text");
        gelu["hidden_activation"] = serde_json::json!("gelu_pytorch_tanh");
        gelu["query_pre_attn_scalar"] = serde_json::json!(16);
        let gelu = ModelConfig::from_json_str(&gelu.to_string()).unwrap();
        assert_eq!(gelu.activation().unwrap(), Activation::GeluTanh);
        assert_eq!(gelu.attention_scale(), 0.25);
        let mut granite = base("granite");
        for (key, value) in [
            ("embedding_multiplier", 12.0),
            ("residual_multiplier", 0.25),
            ("attention_multiplier", 0.125),
            ("logits_scaling", 8.0),
        ] {
            granite[key] = serde_json::json!(value);
        }
        let granite = ModelConfig::from_json_str(&granite.to_string()).unwrap();
        assert_eq!(granite.embedding_scale(), Some(12.0));
        assert_eq!(granite.residual_scale(), 0.25);
        assert_eq!(granite.attention_scale(), 0.125);
        assert_eq!(granite.logits_scale(), 0.125);
        assert!(!granite.tied_embeddings());
        let plain = ModelConfig::from_json_str(&base("granite").to_string()).unwrap();
        assert_eq!(plain.attention_scale() * plain.logits_scale(), 1.0);
        let mut erf = base("llama");
        erf["hidden_act"] = serde_json::json!("gelu");
        assert!(ModelConfig::from_json_str(&erf.to_string()).is_err());
        assert!(!olmo2.qkv_bias() && !olmo2.o_bias() && olmo2.layer_window(0).is_none());
        assert!(qwen3.layer_window(0).is_none());
        let mut biased = base("qwen3");
        biased["attention_bias"] = serde_json::json!(true);
        biased["use_sliding_window"] = serde_json::json!(true);
        biased["max_window_layers"] = serde_json::json!(0);
        let biased = ModelConfig::from_json_str(&biased.to_string()).unwrap();
        assert!(biased.qkv_bias() && biased.o_bias());
        assert_eq!(biased.layer_window(0), Some(4));
    }

    /// Which layers slide, as transformers' config classes and models read them.
    #[test]
    fn sliding_layers_follow_layer_types_or_the_family_pattern() {
        let windows = |model_type: &str, edit: serde_json::Value| {
            let mut json = base(model_type);
            json["num_hidden_layers"] = serde_json::json!(8);
            for (key, value) in edit.as_object().unwrap() {
                json[key] = value.clone();
            }
            let config = ModelConfig::from_json_str(&json.to_string()).unwrap();
            (0..8).map(|l| config.layer_window(l)).collect::<Vec<_>>()
        };
        let (w, full) = (Some(4), None);
        // Qwen2: the layers from max_window_layers on, only under use_sliding_window.
        let qwen = |edit| windows("qwen2", edit);
        assert_eq!(qwen(serde_json::json!({})), [full; 8]);
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": true, "max_window_layers": 6})),
            [full, full, full, full, full, full, w, w]
        );
        let types = serde_json::json!(["full_attention", "sliding_attention"].repeat(4));
        assert_eq!(qwen(serde_json::json!({"layer_types": types})), [full; 8]);
        assert_eq!(
            qwen(serde_json::json!({"layer_types": types, "use_sliding_window": true})),
            [full, w].repeat(4)
        );
        // SmolLM3: the NoPE layers (every fourth) under use_sliding_window.
        assert_eq!(
            windows("smollm3", serde_json::json!({"use_sliding_window": true})),
            [full, full, full, w].repeat(2)
        );
        // OLMo 3: three sliding layers to one full, 4096 positions unless set; its sliding
        // layers turn by the unscaled rotation.
        assert_eq!(
            windows("olmo3", serde_json::json!({"sliding_window": null})),
            [Some(4096), Some(4096), Some(4096), full].repeat(2)
        );
        let mut olmo3 = base("olmo3");
        olmo3["num_hidden_layers"] = serde_json::json!(4);
        olmo3["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 2.0});
        let olmo3 = ModelConfig::from_json_str(&olmo3.to_string()).unwrap();
        assert_eq!(olmo3.layer_rotation(0), LayerRotation::Local);
        assert_eq!(olmo3.layer_rotation(3), LayerRotation::Scaled);
        // EXAONE 4: three sliding layers to one full, which attends without a rotary
        // embedding; no window, no NoPE.
        assert_eq!(
            windows(
                "exaone4",
                serde_json::json!({"sliding_window_pattern": "LLLG"})
            ),
            [w, w, w, full].repeat(2)
        );
        assert_eq!(
            windows("exaone4", serde_json::json!({"sliding_window_pattern": 2})),
            [w, full].repeat(4)
        );
        let mut exaone = base("exaone4");
        exaone["num_hidden_layers"] = serde_json::json!(4);
        let rotation = |json: &serde_json::Value| {
            let config = ModelConfig::from_json_str(&json.to_string()).unwrap();
            (0..4).map(|l| config.layer_rotation(l)).collect::<Vec<_>>()
        };
        let (turned, none) = (LayerRotation::Scaled, LayerRotation::None);
        assert_eq!(rotation(&exaone), [turned, turned, turned, none]);
        exaone["sliding_window"] = serde_json::Value::Null;
        assert_eq!(rotation(&exaone), [turned; 4]);
        let mut bad = base("exaone4");
        bad["sliding_window_pattern"] = serde_json::json!("LLX");
        assert!(ModelConfig::from_json_str(&bad.to_string()).is_err());
        // Gemma 3: five sliding layers to one full, turned by the local base.
        assert_eq!(
            windows("gemma3_text", serde_json::json!({})),
            [w, w, w, w, w, full, w, w]
        );
        let mut gemma = base("gemma3_text");
        gemma["num_hidden_layers"] = serde_json::json!(6);
        let gemma = ModelConfig::from_json_str(&gemma.to_string()).unwrap();
        assert_eq!(gemma.layer_rotation(0), LayerRotation::Local);
        assert_eq!(gemma.layer_rotation(5), LayerRotation::Scaled);
        assert_eq!(gemma.local_rope_theta(), 10000.0);
        // Mistral: every layer, layer_types or not.
        assert_eq!(windows("mistral", serde_json::json!({})), [w; 8]);
        let mut bad = base("olmo3");
        bad["num_hidden_layers"] = serde_json::json!(2);
        bad["layer_types"] = serde_json::json!(["full_attention", "chunked_attention"]);
        let err = ModelConfig::from_json_str(&bad.to_string()).unwrap_err();
        assert!(
            format!("{err:#}").contains("'chunked_attention'"),
            "{err:#}"
        );
    }

    #[test]
    fn unknown_model_type_is_a_clear_error() {
        let err = ModelConfig::from_json_str(&base("gpt2").to_string()).unwrap_err();
        assert!(
            format!("{err:#}").contains("unsupported model_type 'gpt2'"),
            "{err:#}"
        );
    }

    #[test]
    fn eos_accepts_int_or_list() {
        let mut c = base("llama");
        c["eos_token_id"] = serde_json::json!([2, 0]);
        let cfg = ModelConfig::from_json_str(&c.to_string()).unwrap();
        assert_eq!(cfg.eos_token_ids(), vec![2, 0]);
        c["eos_token_id"] = serde_json::json!(7);
        let cfg = ModelConfig::from_json_str(&c.to_string()).unwrap();
        assert_eq!(cfg.eos_token_ids(), vec![7]);
    }

    #[test]
    fn rope_scaling_forms_are_checked_and_yarn_extends_the_context() {
        let with = |scaling: serde_json::Value| {
            let mut json = base("qwen3");
            json["max_position_embeddings"] = serde_json::json!(40960);
            json["rope_scaling"] = scaling;
            ModelConfig::from_json_str(&json.to_string())
        };
        let message = |scaling| format!("{:#}", with(scaling).unwrap_err());
        let yarn = with(serde_json::json!({"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 32768}));
        assert_eq!(yarn.unwrap().max_positions(), 131072);
        // Without an original context YaRN stretches max_position_embeddings itself.
        let yarn = with(serde_json::json!({"type": "yarn", "factor": 2.0})).unwrap();
        assert_eq!(yarn.max_positions(), 81920);
        for kind in ["linear", "dynamic"] {
            let scaled = with(serde_json::json!({"rope_type": kind, "factor": 2.0})).unwrap();
            assert_eq!(scaled.max_positions(), 40960, "{kind}");
        }
        assert!(message(serde_json::json!({"rope_type": "yarn"})).contains("'yarn' has no factor"));
        assert!(
            message(serde_json::json!({"rope_type": "linear", "factor": 0.5}))
                .contains("factor 0.5 is below 1")
        );
        let su = message(serde_json::json!({"rope_type": "su", "factor": 2.0}));
        assert!(
            su.contains("'su' is not supported (default, linear, dynamic, llama3, yarn, longrope)"),
            "{su}"
        );
        // Phi-3 reads `su` as LongRoPE (transformers' Phi3Config does), whose factors cover
        // each channel pair (head_dim 4: two), and whose context is the original one.
        let phi3 = |scaling: serde_json::Value| {
            let mut json = base("phi3");
            json["max_position_embeddings"] = serde_json::json!(131072);
            json["original_max_position_embeddings"] = serde_json::json!(4096);
            json["rope_scaling"] = scaling;
            ModelConfig::from_json_str(&json.to_string())
        };
        let longrope =
            phi3(serde_json::json!({"type": "su", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]}))
                .unwrap();
        assert_eq!(
            (longrope.rope_type(), longrope.max_positions()),
            ("longrope", 4096)
        );
        // The errors that name the limit say why it is below max_position_embeddings.
        assert!(longrope.position_limit_note().contains("LongRoPE"));
        assert_eq!(yarn.position_limit_note(), "");
        let short = phi3(
            serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [2.0, 3.0]}),
        );
        let short = format!("{:#}", short.unwrap_err());
        assert!(
            short.contains("short_factor has 1 values for 2 channel pairs"),
            "{short}"
        );
        let mut partial = base("phi3");
        partial["partial_rotary_factor"] = serde_json::json!(0.75);
        let partial = format!(
            "{:#}",
            ModelConfig::from_json_str(&partial.to_string()).unwrap_err()
        );
        assert!(
            partial.contains("partial_rotary_factor 0.75 rotates 3 of 4 channels"),
            "{partial}"
        );
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let base = |rope: serde_json::Value| {
            let mut json = serde_json::json!({
                "model_type": "llama", "vocab_size": 4, "hidden_size": 64,
                "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
            });
            json["rope_parameters"] = rope;
            ModelConfig::from_json_str(&json.to_string()).unwrap()
        };
        let plain = base(serde_json::json!({"rope_type": "default", "rope_theta": 100000.0}));
        assert_eq!(plain.rope_theta, 100000.0);
        assert_eq!(plain.rope_scaling, None);
        let llama3 = base(serde_json::json!({
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        }));
        assert_eq!(llama3.rope_theta, 500000.0);
        let scaling = llama3.rope_scaling.unwrap();
        assert_eq!(
            (scaling.rope_type.as_str(), scaling.factor),
            ("llama3", Some(8.0))
        );
    }
}
