//! Conversion of a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face checkpoint
//! directory: `config.json`, `generation_config.json`, `model.safetensors` (f32),
//! `tokenizer.json` and `tokenizer_config.json`.
//!
//! What the conversion has to undo, beyond renaming tensors:
//! - every tensor is dequantised to f32;
//! - GGUF lists dimensions innermost first; candle's reader already reverses them, so the shapes
//!   we see are Hugging Face's `[out_features, in_features]`;
//! - llama.cpp's converter reorders the rows of each attention head of `W_q` and `W_k` so that
//!   GGML's rope can rotate adjacent pairs, whereas Hugging Face's llama rotates the first half of a
//!   head against the second half (`unpermute_rope_rows` restores Hugging Face's order);
//! - the tokenizer exists only as metadata (token list, merges, token types) and is rebuilt as a
//!   `tokenizers` byte-level BPE.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::{json, Map};

use crate::safetensors_file::write_safetensors;
use optune_fs::write_dir_atomically;

/// A Hugging Face `LlamaForCausalLM` checkpoint held in memory, ready to be written by
/// [`write_hf_dir`].
#[derive(Debug)]
pub struct HfCheckpoint {
    /// `config.json`.
    pub config: serde_json::Value,
    /// Weights under Hugging Face names, f32, in Hugging Face shapes.
    pub tensors: Vec<(String, Tensor)>,
    /// `tokenizer.json`, loadable by the `tokenizers` library.
    pub tokenizer_json: serde_json::Value,
    /// `tokenizer_config.json`: special tokens and the chat template.
    pub tokenizer_config: serde_json::Value,
    /// `generation_config.json`.
    pub generation_config: serde_json::Value,
}

/// Reads a llama-architecture GGUF file and converts it into a Hugging Face checkpoint.
///
/// Fails, naming the culprit, on another architecture, a missing or malformed metadata key, a
/// missing, unexpected or wrongly shaped tensor, and a tokenizer other than GPT-2-style BPE with
/// the digit-splitting pre-tokenizer.
pub fn read_gguf(path: &Path) -> Result<HfCheckpoint> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = Content::read(&mut file)
        .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let metadata = Metadata(&content.metadata);

    let architecture = metadata.string("general.architecture")?;
    if architecture != "llama" {
        bail!("GGUF architecture `{architecture}` is not supported: only `llama` can be converted");
    }
    let vocabulary = Vocabulary::from_metadata(&metadata)?;
    let hyperparameters = LlamaHyperparameters::from_metadata(&metadata, vocabulary.tokens.len())?;
    let special = SpecialTokens::from_metadata(&metadata, &vocabulary)?;
    let tokenizer_json = vocabulary.tokenizer_json()?;
    let chat_template = metadata.optional_string("tokenizer.chat_template")?;
    let tied_embeddings = !content.tensor_infos.contains_key(LM_HEAD_GGUF_NAME);

    let plan = tensor_plan(&hyperparameters, tied_embeddings);
    let planned: HashSet<&str> = plan.iter().map(|entry| entry.gguf_name.as_str()).collect();
    let mut unexpected: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|name| !planned.contains(name.as_str()))
        .collect();
    unexpected.sort();
    if let Some(name) = unexpected.first() {
        bail!(
            "GGUF tensor `{name}` has no Hugging Face llama counterpart ({} unexpected tensors)",
            unexpected.len()
        );
    }

    let mut tensors = Vec::with_capacity(plan.len());
    for entry in &plan {
        let info = content
            .tensor_infos
            .get(&entry.gguf_name)
            .with_context(|| format!("GGUF tensor `{}` is missing", entry.gguf_name))?;
        ensure!(
            info.shape.dims() == entry.hf_shape.as_slice(),
            "GGUF tensor `{}` has shape {:?} (innermost last), expected {:?} from the metadata",
            entry.gguf_name,
            info.shape.dims(),
            entry.hf_shape
        );
        let weight = info
            .read(&mut file, content.tensor_data_offset, &Device::Cpu)
            .and_then(|quantized| quantized.dequantize(&Device::Cpu))
            .with_context(|| format!("cannot read GGUF tensor `{}`", entry.gguf_name))?;
        let weight = match entry.rope_heads {
            Some(heads) => unpermute_rope_rows(&weight, heads)?,
            None => weight,
        };
        tensors.push((entry.hf_name.clone(), weight));
    }

    Ok(HfCheckpoint {
        config: hyperparameters.config_json(&special, tied_embeddings),
        tensors,
        tokenizer_json,
        tokenizer_config: special.tokenizer_config(chat_template, hyperparameters.context_length),
        generation_config: special.generation_config(),
    })
}

/// Writes `ckpt` as a Hugging Face checkpoint directory at `dir`, which must not exist or be empty.
///
/// Everything is written into a staging directory beside `dir` and renamed into place at the end,
/// so a failed conversion leaves neither `dir` nor the staging directory behind.
pub fn write_hf_dir(ckpt: &HfCheckpoint, dir: &Path) -> Result<()> {
    check_conversion_target(dir)?;
    write_dir_atomically(dir, |staging| write_checkpoint_files(ckpt, staging))
}

/// Refuses a conversion's target that exists and is not an empty directory: unlike saving a
/// training checkpoint, a conversion never replaces someone's files. [`write_hf_dir`] checks it;
/// a caller checks it first too, before the reading and dequantising it would otherwise waste.
pub fn check_conversion_target(dir: &Path) -> Result<()> {
    if dir.exists() {
        let mut entries = fs::read_dir(dir)
            .with_context(|| format!("{} exists and is not a readable directory", dir.display()))?;
        ensure!(
            entries.next().is_none(),
            "{} already exists and is not empty",
            dir.display()
        );
    }
    Ok(())
}

fn write_checkpoint_files(ckpt: &HfCheckpoint, dir: &Path) -> Result<()> {
    let json_files = [
        ("config.json", &ckpt.config),
        ("generation_config.json", &ckpt.generation_config),
        ("tokenizer.json", &ckpt.tokenizer_json),
        ("tokenizer_config.json", &ckpt.tokenizer_config),
    ];
    for (name, value) in json_files {
        let path = dir.join(name);
        fs::write(&path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let weights = dir.join("model.safetensors");
    write_safetensors(&ckpt.tensors, &weights)?;
    // safetensors writes through a private (0600) temporary file; give the weights the same
    // permissions as the JSON files beside them.
    let permissions = fs::metadata(dir.join("config.json"))?.permissions();
    fs::set_permissions(&weights, permissions)
        .with_context(|| format!("cannot set the permissions of {}", weights.display()))
}

/// Inverts llama.cpp's rope permutation of a `W_q` or `W_k` weight of shape `[heads * head_dim, in]`.
///
/// llama.cpp's converter views each head's rows as `[2, head_dim / 2]` (Hugging Face's rotate-half
/// layout) and transposes them to `[head_dim / 2, 2]`, interleaving the two halves; transposing
/// back restores Hugging Face's order.
fn unpermute_rope_rows(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, columns) = weight.dims2()?;
    let half_head_dim = rows / heads / 2;
    Ok(weight
        .reshape((heads, half_head_dim, 2, columns))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, columns))?)
}

const LM_HEAD_GGUF_NAME: &str = "output.weight";

/// The role of a tensor in a transformer block, which fixes its shape.
#[derive(Clone, Copy)]
enum BlockTensor {
    Query,
    Key,
    Value,
    AttentionOutput,
    Norm,
    FeedForwardIn,
    FeedForwardOut,
}

/// GGUF → Hugging Face names of the tensors of each transformer block.
const BLOCK_TENSORS: [(&str, &str, BlockTensor); 9] = [
    ("attn_q", "self_attn.q_proj", BlockTensor::Query),
    ("attn_k", "self_attn.k_proj", BlockTensor::Key),
    ("attn_v", "self_attn.v_proj", BlockTensor::Value),
    (
        "attn_output",
        "self_attn.o_proj",
        BlockTensor::AttentionOutput,
    ),
    ("attn_norm", "input_layernorm", BlockTensor::Norm),
    ("ffn_norm", "post_attention_layernorm", BlockTensor::Norm),
    ("ffn_gate", "mlp.gate_proj", BlockTensor::FeedForwardIn),
    ("ffn_up", "mlp.up_proj", BlockTensor::FeedForwardIn),
    ("ffn_down", "mlp.down_proj", BlockTensor::FeedForwardOut),
];

/// One tensor the checkpoint must contain.
struct PlannedTensor {
    gguf_name: String,
    hf_name: String,
    hf_shape: Vec<usize>,
    /// Heads of a rope-permuted weight (`W_q` or `W_k`) to un-permute.
    rope_heads: Option<usize>,
}

fn tensor_plan(hp: &LlamaHyperparameters, tied_embeddings: bool) -> Vec<PlannedTensor> {
    let planned = |gguf_name: &str, hf_name: &str, hf_shape: Vec<usize>| PlannedTensor {
        gguf_name: gguf_name.to_string(),
        hf_name: hf_name.to_string(),
        hf_shape,
        rope_heads: None,
    };
    let mut plan = vec![planned(
        "token_embd.weight",
        "model.embed_tokens.weight",
        vec![hp.vocab_size, hp.hidden_size],
    )];
    let q_rows = hp.heads * hp.head_dim;
    let kv_rows = hp.kv_heads * hp.head_dim;
    for layer in 0..hp.layers {
        for (gguf_part, hf_part, role) in BLOCK_TENSORS {
            let (hf_shape, rope_heads) = match role {
                BlockTensor::Query => (vec![q_rows, hp.hidden_size], Some(hp.heads)),
                BlockTensor::Key => (vec![kv_rows, hp.hidden_size], Some(hp.kv_heads)),
                BlockTensor::Value => (vec![kv_rows, hp.hidden_size], None),
                BlockTensor::AttentionOutput => (vec![hp.hidden_size, q_rows], None),
                BlockTensor::Norm => (vec![hp.hidden_size], None),
                BlockTensor::FeedForwardIn => (vec![hp.intermediate_size, hp.hidden_size], None),
                BlockTensor::FeedForwardOut => (vec![hp.hidden_size, hp.intermediate_size], None),
            };
            plan.push(PlannedTensor {
                rope_heads,
                ..planned(
                    &format!("blk.{layer}.{gguf_part}.weight"),
                    &format!("model.layers.{layer}.{hf_part}.weight"),
                    hf_shape,
                )
            });
        }
    }
    plan.push(planned(
        "output_norm.weight",
        "model.norm.weight",
        vec![hp.hidden_size],
    ));
    if !tied_embeddings {
        plan.push(planned(
            LM_HEAD_GGUF_NAME,
            "lm_head.weight",
            vec![hp.vocab_size, hp.hidden_size],
        ));
    }
    plan
}

struct LlamaHyperparameters {
    layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    context_length: usize,
    rope_theta: f64,
    rms_norm_eps: f64,
}

impl LlamaHyperparameters {
    fn from_metadata(metadata: &Metadata, vocab_size: usize) -> Result<Self> {
        let positive = |key: &str| -> Result<usize> {
            let value = metadata.usize(key)?;
            ensure!(value > 0, "GGUF metadata `{key}` must be positive, got 0");
            Ok(value)
        };
        let positive_float = |key: &str| -> Result<f64> {
            let value = metadata.f64(key)?;
            ensure!(
                value.is_finite() && value > 0.0,
                "GGUF metadata `{key}` must be a positive number, got {value}"
            );
            Ok(value)
        };
        let hidden_size = positive("llama.embedding_length")?;
        let heads = positive("llama.attention.head_count")?;
        let kv_heads = positive("llama.attention.head_count_kv")?;
        ensure!(
            heads.is_multiple_of(kv_heads),
            "llama.attention.head_count ({heads}) is not a multiple of llama.attention.head_count_kv ({kv_heads})"
        );
        let head_dim = match metadata.optional_usize("llama.attention.key_length")? {
            Some(key_length) => key_length,
            None => {
                ensure!(
                    hidden_size.is_multiple_of(heads),
                    "llama.embedding_length ({hidden_size}) is not a multiple of llama.attention.head_count ({heads})"
                );
                hidden_size / heads
            }
        };
        ensure!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "the attention head size must be even and positive for rope, got {head_dim}"
        );
        // Hugging Face's llama has one head size for keys and values and rotates whole heads.
        for key in ["llama.attention.value_length", "llama.rope.dimension_count"] {
            if let Some(value) = metadata.optional_usize(key)? {
                ensure!(
                    value == head_dim,
                    "GGUF metadata `{key}` is {value} but the head size is {head_dim}: not supported"
                );
            }
        }
        if let Some(scaling) = metadata.optional_string("llama.rope.scaling.type")? {
            ensure!(
                scaling == "none",
                "rope scaling `{scaling}` (llama.rope.scaling.type) is not supported"
            );
        }
        Ok(Self {
            layers: positive("llama.block_count")?,
            hidden_size,
            intermediate_size: positive("llama.feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            vocab_size,
            context_length: positive("llama.context_length")?,
            rope_theta: positive_float("llama.rope.freq_base")?,
            rms_norm_eps: positive_float("llama.attention.layer_norm_rms_epsilon")?,
        })
    }

    fn config_json(&self, special: &SpecialTokens, tied_embeddings: bool) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.context_length,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "tie_word_embeddings": tied_embeddings,
            "bos_token_id": special.bos.id,
            "eos_token_id": special.eos.id,
            "pad_token_id": special.pad.as_ref().map(|token| token.id),
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }
}

/// llama.cpp's `llama_token_type` values that become added tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) whose splitting is "each digit on its own,
/// then GPT-2's regex", i.e. `Digits(individual_digits)` followed by `ByteLevel`.
const DIGIT_SPLITTING_PRE_TOKENIZERS: [&str; 3] = ["smollm", "starcoder", "refact"];

/// The GPT-2-style BPE vocabulary stored in the metadata.
struct Vocabulary {
    tokens: Vec<String>,
    token_types: Vec<i64>,
    merges: Vec<(String, String)>,
}

impl Vocabulary {
    fn from_metadata(metadata: &Metadata) -> Result<Self> {
        let model = metadata.string("tokenizer.ggml.model")?;
        ensure!(
            model == "gpt2",
            "tokenizer model `{model}` (tokenizer.ggml.model) is not supported: only `gpt2` byte-level BPE"
        );
        let pre = metadata
            .optional_string("tokenizer.ggml.pre")?
            .unwrap_or("default");
        ensure!(
            DIGIT_SPLITTING_PRE_TOKENIZERS.contains(&pre),
            "pre-tokenizer `{pre}` (tokenizer.ggml.pre) is not supported: only {DIGIT_SPLITTING_PRE_TOKENIZERS:?}"
        );
        for key in [
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_space_prefix",
        ] {
            ensure!(
                !metadata.optional_bool(key)?.unwrap_or(false),
                "GGUF metadata `{key}` = true is not supported"
            );
        }

        let tokens = metadata.strings("tokenizer.ggml.tokens")?;
        let token_types = metadata.integers("tokenizer.ggml.token_type")?;
        ensure!(
            token_types.len() == tokens.len(),
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            token_types.len(),
            tokens.len()
        );
        let mut seen = HashSet::with_capacity(tokens.len());
        if let Some(duplicate) = tokens.iter().find(|token| !seen.insert(*token)) {
            bail!("token {duplicate:?} appears twice in tokenizer.ggml.tokens");
        }
        let merges = metadata
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| match merge.split_once(' ') {
                Some((left, right)) => Ok((left.to_string(), right.to_string())),
                None => Err(anyhow!(
                    "merge {merge:?} in tokenizer.ggml.merges is not two tokens separated by a space"
                )),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            tokens,
            token_types,
            merges,
        })
    }

    fn added_tokens(&self) -> impl Iterator<Item = (usize, &str, bool)> {
        self.tokens
            .iter()
            .zip(&self.token_types)
            .enumerate()
            .filter_map(|(id, (token, &token_type))| match token_type {
                TOKEN_TYPE_CONTROL => Some((id, token.as_str(), true)),
                TOKEN_TYPE_USER_DEFINED => Some((id, token.as_str(), false)),
                _ => None,
            })
    }

    /// The `tokenizers` serialisation of this vocabulary, checked by loading it.
    fn tokenizer_json(&self) -> Result<serde_json::Value> {
        let vocab: Map<String, serde_json::Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), json!(id)))
            .collect();
        let added_tokens: Vec<serde_json::Value> = self
            .added_tokens()
            .map(|(id, content, special)| {
                json!({
                    "id": id,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": special,
                })
            })
            .collect();
        let byte_level = json!({
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        });
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    { "type": "Digits", "individual_digits": true },
                    byte_level,
                ],
            },
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": self.merges,
            },
        });
        tokenizers::Tokenizer::from_str(&tokenizer.to_string())
            .map_err(|error| anyhow!("the rebuilt tokenizer does not load: {error}"))?;
        Ok(tokenizer)
    }
}

struct SpecialToken {
    id: usize,
    content: String,
}

struct SpecialTokens {
    bos: SpecialToken,
    eos: SpecialToken,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
}

impl SpecialTokens {
    fn from_metadata(metadata: &Metadata, vocabulary: &Vocabulary) -> Result<Self> {
        let token = |key: &str| -> Result<Option<SpecialToken>> {
            let Some(id) = metadata.optional_usize(key)? else {
                return Ok(None);
            };
            let content = vocabulary.tokens.get(id).with_context(|| {
                format!(
                    "GGUF metadata `{key}` = {id} is outside the vocabulary of {} tokens",
                    vocabulary.tokens.len()
                )
            })?;
            Ok(Some(SpecialToken {
                id,
                content: content.clone(),
            }))
        };
        let required = |key: &str| -> Result<SpecialToken> {
            token(key)?.with_context(|| format!("GGUF metadata key `{key}` is missing"))
        };
        Ok(Self {
            bos: required("tokenizer.ggml.bos_token_id")?,
            eos: required("tokenizer.ggml.eos_token_id")?,
            pad: token("tokenizer.ggml.padding_token_id")?,
            unk: token("tokenizer.ggml.unknown_token_id")?,
        })
    }

    fn tokenizer_config(
        &self,
        chat_template: Option<&str>,
        model_max_length: usize,
    ) -> serde_json::Value {
        let mut config = json!({
            // The generic fast tokenizer uses tokenizer.json as it is; a model-specific class
            // could rebuild the pre-tokenizer its own way and lose the digit splitting.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos.content,
            "eos_token": self.eos.content,
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
        });
        if let Some(pad) = &self.pad {
            config["pad_token"] = json!(pad.content);
        }
        if let Some(unk) = &self.unk {
            config["unk_token"] = json!(unk.content);
        }
        if let Some(template) = chat_template {
            config["chat_template"] = json!(template);
        }
        config
    }

    fn generation_config(&self) -> serde_json::Value {
        let mut config = json!({
            "bos_token_id": self.bos.id,
            "eos_token_id": self.eos.id,
        });
        if let Some(pad) = &self.pad {
            config["pad_token_id"] = json!(pad.id);
        }
        config
    }
}

/// Typed access to GGUF metadata, with errors that name the key.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .with_context(|| format!("GGUF metadata key `{key}` is missing"))
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.optional_string(key)?
            .with_context(|| format!("GGUF metadata key `{key}` is missing"))
    }

    fn optional_string(&self, key: &str) -> Result<Option<&str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(value)) => Ok(Some(value)),
            Some(other) => bail!(
                "GGUF metadata `{key}` should be a string, got {:?}",
                other.value_type()
            ),
        }
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(value)) => Ok(Some(*value)),
            Some(other) => bail!(
                "GGUF metadata `{key}` should be a boolean, got {:?}",
                other.value_type()
            ),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let value = integer(self.get(key)?, key)?;
        usize::try_from(value)
            .with_context(|| format!("GGUF metadata `{key}` = {value} is not a valid count"))
    }

    fn optional_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.0.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            // GGUF stores these as f32: going through the shortest decimal form turns 1e-5f32
            // back into 1e-5 rather than 9.999999747378752e-6.
            Value::F32(value) => Ok(value.to_string().parse()?),
            Value::F64(value) => Ok(*value),
            other => bail!(
                "GGUF metadata `{key}` should be a float, got {:?}",
                other.value_type()
            ),
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key)? {
            Value::Array(values) => Ok(values),
            other => bail!(
                "GGUF metadata `{key}` should be an array, got {:?}",
                other.value_type()
            ),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|value| match value {
                Value::String(value) => Ok(value.clone()),
                other => bail!(
                    "GGUF metadata `{key}` should hold strings, got {:?}",
                    other.value_type()
                ),
            })
            .collect()
    }

    fn integers(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .map(|value| integer(value, key))
            .collect()
    }
}

fn integer(value: &Value, key: &str) -> Result<i64> {
    Ok(match value {
        Value::U8(value) => (*value).into(),
        Value::I8(value) => (*value).into(),
        Value::U16(value) => (*value).into(),
        Value::I16(value) => (*value).into(),
        Value::U32(value) => (*value).into(),
        Value::I32(value) => (*value).into(),
        Value::U64(value) => i64::try_from(*value)
            .with_context(|| format!("GGUF metadata `{key}` = {value} is too large"))?,
        Value::I64(value) => *value,
        other => bail!(
            "GGUF metadata `{key}` should be an integer, got {:?}",
            other.value_type()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::path::PathBuf;

    const HIDDEN: usize = 8;
    const HEADS: usize = 2;
    const KV_HEADS: usize = 1;
    const HEAD_DIM: usize = 4;
    const INTERMEDIATE: usize = 12;
    const TOKENS: [&str; 10] = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "a",
        "b",
        "Ġ",
        "1",
        "2",
        "ab",
        "Ġa",
    ];

    /// A one-block llama GGUF whose weights hold `100 * row + column + offset`, so that any
    /// transposition or row reordering shows up in the values.
    struct TinyGguf {
        metadata: Vec<(String, Value)>,
        tensors: Vec<(String, Tensor)>,
    }

    fn ramp(rows: usize, columns: usize, offset: f32) -> Tensor {
        let values: Vec<f32> = (0..rows * columns)
            .map(|index| (100 * (index / columns) + index % columns) as f32 + offset)
            .collect();
        Tensor::from_vec(values, (rows, columns), &Device::Cpu).unwrap()
    }

    /// llama.cpp's `permute` from convert_hf_to_gguf.py: each head's rows `[2, half]` become
    /// `[half, 2]`.
    fn llama_cpp_permute(weight: &Tensor, heads: usize) -> Tensor {
        let (rows, columns) = weight.dims2().unwrap();
        weight
            .reshape((heads, 2, rows / heads / 2, columns))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, columns))
            .unwrap()
    }

    /// The Hugging Face weights the tiny GGUF is made from.
    fn hf_weights() -> Vec<(String, Tensor)> {
        let layer = |name: &str| format!("model.layers.0.{name}.weight");
        vec![
            (
                "model.embed_tokens.weight".into(),
                ramp(TOKENS.len(), HIDDEN, 0.5),
            ),
            (
                layer("self_attn.q_proj"),
                ramp(HEADS * HEAD_DIM, HIDDEN, 0.1),
            ),
            (
                layer("self_attn.k_proj"),
                ramp(KV_HEADS * HEAD_DIM, HIDDEN, 0.2),
            ),
            (
                layer("self_attn.v_proj"),
                ramp(KV_HEADS * HEAD_DIM, HIDDEN, 0.3),
            ),
            (
                layer("self_attn.o_proj"),
                ramp(HIDDEN, HEADS * HEAD_DIM, 0.4),
            ),
            (
                layer("input_layernorm"),
                ramp(1, HIDDEN, 0.6).flatten_all().unwrap(),
            ),
            (
                layer("post_attention_layernorm"),
                ramp(1, HIDDEN, 0.7).flatten_all().unwrap(),
            ),
            (layer("mlp.gate_proj"), ramp(INTERMEDIATE, HIDDEN, 0.8)),
            (layer("mlp.up_proj"), ramp(INTERMEDIATE, HIDDEN, 0.9)),
            (layer("mlp.down_proj"), ramp(HIDDEN, INTERMEDIATE, 0.05)),
            (
                "model.norm.weight".into(),
                ramp(1, HIDDEN, 0.15).flatten_all().unwrap(),
            ),
        ]
    }

    impl TinyGguf {
        fn new() -> Self {
            let hf_to_gguf: HashMap<String, String> = tensor_plan(&tiny_hyperparameters(), true)
                .into_iter()
                .map(|entry| (entry.hf_name, entry.gguf_name))
                .collect();
            let tensors = hf_weights()
                .into_iter()
                .map(|(hf_name, weight)| {
                    let weight = match hf_name.as_str() {
                        "model.layers.0.self_attn.q_proj.weight" => {
                            llama_cpp_permute(&weight, HEADS)
                        }
                        "model.layers.0.self_attn.k_proj.weight" => {
                            llama_cpp_permute(&weight, KV_HEADS)
                        }
                        _ => weight,
                    };
                    (hf_to_gguf[&hf_name].clone(), weight)
                })
                .collect();
            let strings = |values: &[&str]| {
                Value::Array(
                    values
                        .iter()
                        .map(|v| Value::String(v.to_string()))
                        .collect(),
                )
            };
            let mut token_types = vec![Value::I32(3); 3];
            token_types.extend(vec![Value::I32(1); TOKENS.len() - 3]);
            let metadata = vec![
                ("general.architecture", Value::String("llama".into())),
                ("llama.block_count", Value::U32(1)),
                ("llama.context_length", Value::U32(64)),
                ("llama.embedding_length", Value::U32(HIDDEN as u32)),
                ("llama.feed_forward_length", Value::U32(INTERMEDIATE as u32)),
                ("llama.attention.head_count", Value::U32(HEADS as u32)),
                ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
                ("llama.rope.freq_base", Value::F32(100000.0)),
                ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.pre", Value::String("smollm".into())),
                ("tokenizer.ggml.tokens", strings(&TOKENS)),
                ("tokenizer.ggml.token_type", Value::Array(token_types)),
                ("tokenizer.ggml.merges", strings(&["a b", "Ġ a"])),
                ("tokenizer.ggml.bos_token_id", Value::U32(1)),
                ("tokenizer.ggml.eos_token_id", Value::U32(2)),
                ("tokenizer.ggml.padding_token_id", Value::U32(2)),
                (
                    "tokenizer.chat_template",
                    Value::String("{{ messages }}".into()),
                ),
            ];
            Self {
                metadata: metadata
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                tensors,
            }
        }

        fn set(mut self, key: &str, value: Value) -> Self {
            self.metadata.retain(|(existing, _)| existing != key);
            self.metadata.push((key.to_string(), value));
            self
        }

        fn without_metadata(mut self, key: &str) -> Self {
            self.metadata.retain(|(existing, _)| existing != key);
            self
        }

        fn without_tensor(mut self, name: &str) -> Self {
            self.tensors.retain(|(existing, _)| existing != name);
            self
        }

        fn with_tensor(mut self, name: &str, weight: Tensor) -> Self {
            self.tensors.push((name.to_string(), weight));
            self
        }

        fn write(&self, dir: &Path) -> PathBuf {
            let path = dir.join("model.gguf");
            let quantized: Vec<(&str, QTensor)> = self
                .tensors
                .iter()
                .map(|(name, weight)| {
                    (
                        name.as_str(),
                        QTensor::quantize(weight, GgmlDType::F32).unwrap(),
                    )
                })
                .collect();
            let tensors: Vec<(&str, &QTensor)> = quantized
                .iter()
                .map(|(name, tensor)| (*name, tensor))
                .collect();
            let metadata: Vec<(&str, &Value)> = self
                .metadata
                .iter()
                .map(|(key, value)| (key.as_str(), value))
                .collect();
            let mut file = fs::File::create(&path).unwrap();
            candle_core::quantized::gguf_file::write(&mut file, &metadata, &tensors).unwrap();
            path
        }
    }

    fn tiny_hyperparameters() -> LlamaHyperparameters {
        LlamaHyperparameters {
            layers: 1,
            hidden_size: HIDDEN,
            intermediate_size: INTERMEDIATE,
            heads: HEADS,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            vocab_size: TOKENS.len(),
            context_length: 64,
            rope_theta: 1e5,
            rms_norm_eps: 1e-5,
        }
    }

    fn convert(gguf: TinyGguf) -> Result<HfCheckpoint> {
        let dir = tempfile::tempdir().unwrap();
        read_gguf(&gguf.write(dir.path()))
    }

    fn error_of(gguf: TinyGguf) -> String {
        format!("{:#}", convert(gguf).unwrap_err())
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn converts_names_shapes_and_values_and_undoes_the_rope_permutation() {
        let ckpt = convert(TinyGguf::new()).unwrap();
        let expected = hf_weights();
        let names: Vec<&str> = ckpt.tensors.iter().map(|(name, _)| name.as_str()).collect();
        let expected_names: Vec<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, expected_names);
        for ((name, converted), (_, original)) in ckpt.tensors.iter().zip(&expected) {
            assert_eq!(converted.dims(), original.dims(), "{name}");
            assert_eq!(converted.dtype(), candle_core::DType::F32, "{name}");
            assert_eq!(values(converted), values(original), "{name}");
        }
    }

    #[test]
    fn gguf_stores_dimensions_innermost_first_and_conversion_restores_hf_order() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = fs::read(TinyGguf::new().write(dir.path())).unwrap();
        // A tensor-info record: name, u32 dimension count, u64 dimensions (little-endian).
        let name = b"blk.0.ffn_up.weight";
        let start = bytes
            .windows(name.len())
            .position(|window| window == name)
            .unwrap()
            + name.len();
        let u64_at = |offset: usize| {
            u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap()) as usize
        };
        assert_eq!(bytes[start..start + 4], 2u32.to_le_bytes());
        assert_eq!(
            [u64_at(start + 4), u64_at(start + 12)],
            [HIDDEN, INTERMEDIATE]
        );

        let ckpt = convert(TinyGguf::new()).unwrap();
        let (_, up) = ckpt
            .tensors
            .iter()
            .find(|(name, _)| name == "model.layers.0.mlp.up_proj.weight")
            .unwrap();
        assert_eq!(up.dims(), [INTERMEDIATE, HIDDEN]);
    }

    #[test]
    fn unpermuting_inverts_llama_cpp_permutation_head_by_head() {
        let weight = ramp(3 * 6, 5, 0.0);
        let permuted = llama_cpp_permute(&weight, 3);
        assert_ne!(values(&permuted), values(&weight));
        // Head 0 with head_dim 6: rows [0 1 2 | 3 4 5] are stored interleaved as 0 3 1 4 2 5.
        let first_column: Vec<f32> = values(&permuted)
            .chunks(5)
            .take(6)
            .map(|row| row[0])
            .collect();
        assert_eq!(first_column, [0.0, 300.0, 100.0, 400.0, 200.0, 500.0]);
        assert_eq!(
            values(&unpermute_rope_rows(&permuted, 3).unwrap()),
            values(&weight)
        );
    }

    #[test]
    fn writes_config_with_tied_embeddings_and_exact_float_hyperparameters() {
        let ckpt = convert(TinyGguf::new()).unwrap();
        let config = &ckpt.config;
        assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(config["tie_word_embeddings"], json!(true));
        assert_eq!(config["num_hidden_layers"], json!(1));
        assert_eq!(config["hidden_size"], json!(HIDDEN));
        assert_eq!(config["intermediate_size"], json!(INTERMEDIATE));
        assert_eq!(config["num_attention_heads"], json!(HEADS));
        assert_eq!(config["num_key_value_heads"], json!(KV_HEADS));
        assert_eq!(config["head_dim"], json!(HEAD_DIM));
        assert_eq!(config["vocab_size"], json!(TOKENS.len()));
        assert_eq!(config["max_position_embeddings"], json!(64));
        assert_eq!(config["rms_norm_eps"], json!(1e-5));
        assert_eq!(config["rope_theta"], json!(1e5));
        assert_eq!(config["bos_token_id"], json!(1));
        assert_eq!(config["eos_token_id"], json!(2));
        assert_eq!(config["pad_token_id"], json!(2));
        assert!(!ckpt
            .tensors
            .iter()
            .any(|(name, _)| name == "lm_head.weight"));
        assert_eq!(
            ckpt.generation_config,
            json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
        );
        assert_eq!(ckpt.tokenizer_config["bos_token"], json!("<|im_start|>"));
        assert_eq!(ckpt.tokenizer_config["eos_token"], json!("<|im_end|>"));
        assert_eq!(ckpt.tokenizer_config["pad_token"], json!("<|im_end|>"));
        assert_eq!(
            ckpt.tokenizer_config["chat_template"],
            json!("{{ messages }}")
        );
    }

    #[test]
    fn keeps_a_separate_output_projection_as_lm_head() {
        let lm_head = ramp(TOKENS.len(), HIDDEN, 0.25);
        let gguf = TinyGguf::new().with_tensor("output.weight", lm_head.clone());
        let ckpt = convert(gguf).unwrap();
        assert_eq!(ckpt.config["tie_word_embeddings"], json!(false));
        let (name, converted) = ckpt.tensors.last().unwrap();
        assert_eq!(name, "lm_head.weight");
        assert_eq!(values(converted), values(&lm_head));
    }

    #[test]
    fn rebuilt_tokenizer_splits_digits_and_keeps_control_tokens_whole() {
        let ckpt = convert(TinyGguf::new()).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_str(&ckpt.tokenizer_json.to_string()).unwrap();
        let encoding = tokenizer
            .encode("<|im_start|>ab a12<|im_end|>", false)
            .unwrap();
        assert_eq!(
            encoding.get_tokens(),
            ["<|im_start|>", "ab", "Ġa", "1", "2", "<|im_end|>"]
        );
        assert_eq!(encoding.get_ids(), [1, 8, 9, 6, 7, 2]);
        assert_eq!(tokenizer.decode(&[8, 9, 6, 2], true).unwrap(), "ab a1");
    }

    #[test]
    fn writes_a_loadable_checkpoint_directory() {
        let ckpt = convert(TinyGguf::new()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("checkpoint");
        write_hf_dir(&ckpt, &target).unwrap();
        let mut files: Vec<String> = fs::read_dir(&target)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        let loaded =
            candle_core::safetensors::load(target.join("model.safetensors"), &Device::Cpu).unwrap();
        for (name, tensor) in &ckpt.tensors {
            assert_eq!(values(&loaded[name]), values(tensor), "{name}");
        }
        let config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(target.join("config.json")).unwrap()).unwrap();
        assert_eq!(config, ckpt.config);
    }

    #[test]
    fn refuses_a_non_empty_target_and_leaves_no_staging_directory() {
        let ckpt = convert(TinyGguf::new()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("checkpoint");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep.txt"), "mine").unwrap();
        let error = write_hf_dir(&ckpt, &target).unwrap_err().to_string();
        assert!(error.contains("not empty"), "{error}");
        assert_eq!(fs::read_to_string(target.join("keep.txt")).unwrap(), "mine");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rejects_other_architectures_by_name() {
        let gguf = TinyGguf::new().set("general.architecture", Value::String("qwen2".into()));
        let error = error_of(gguf);
        assert!(
            error.contains("`qwen2`") && error.contains("llama"),
            "{error}"
        );
    }

    #[test]
    fn names_a_missing_tensor() {
        let gguf = TinyGguf::new().without_tensor("blk.0.ffn_down.weight");
        let error = error_of(gguf);
        assert!(
            error.contains("`blk.0.ffn_down.weight` is missing"),
            "{error}"
        );
    }

    #[test]
    fn names_an_unexpected_tensor() {
        let gguf = TinyGguf::new().with_tensor("rope_freqs.weight", ramp(1, 2, 0.0));
        let error = error_of(gguf);
        assert!(error.contains("`rope_freqs.weight`"), "{error}");
    }

    #[test]
    fn names_a_tensor_whose_shape_disagrees_with_the_metadata() {
        let gguf = TinyGguf::new()
            .without_tensor("blk.0.ffn_up.weight")
            .with_tensor("blk.0.ffn_up.weight", ramp(HIDDEN, INTERMEDIATE, 0.0));
        let error = error_of(gguf);
        assert!(
            error.contains("`blk.0.ffn_up.weight` has shape [8, 12]"),
            "{error}"
        );
    }

    #[test]
    fn names_missing_or_malformed_metadata() {
        let error = error_of(TinyGguf::new().without_metadata("llama.attention.head_count"));
        assert!(
            error.contains("`llama.attention.head_count` is missing"),
            "{error}"
        );
        let error = error_of(TinyGguf::new().set("llama.attention.head_count", Value::U32(0)));
        assert!(
            error.contains("`llama.attention.head_count` must be positive"),
            "{error}"
        );
        let error = error_of(TinyGguf::new().set("tokenizer.ggml.bos_token_id", Value::U32(99)));
        assert!(
            error.contains("`tokenizer.ggml.bos_token_id` = 99"),
            "{error}"
        );
        let error =
            error_of(TinyGguf::new().set("tokenizer.ggml.pre", Value::String("llama-bpe".into())));
        assert!(error.contains("`llama-bpe`"), "{error}");
    }

    /// Converts the real SmolLM2-135M-Instruct GGUF named by `OPTUNE_SMOLLM2_GGUF` (see docs/gguf.md).
    #[test]
    #[ignore = "needs OPTUNE_SMOLLM2_GGUF pointing at SmolLM2-135M-Instruct.Q4_1.gguf"]
    fn converts_smollm2_135m_instruct() {
        let path = std::env::var("OPTUNE_SMOLLM2_GGUF").expect("OPTUNE_SMOLLM2_GGUF is not set");
        let ckpt = read_gguf(Path::new(&path)).unwrap();
        for (key, value) in [
            ("num_hidden_layers", json!(30)),
            ("hidden_size", json!(576)),
            ("intermediate_size", json!(1536)),
            ("num_attention_heads", json!(9)),
            ("num_key_value_heads", json!(3)),
            ("head_dim", json!(64)),
            ("vocab_size", json!(49152)),
            ("rope_theta", json!(1e5)),
            ("rms_norm_eps", json!(1e-5)),
            ("tie_word_embeddings", json!(true)),
        ] {
            assert_eq!(ckpt.config[key], value, "{key}");
        }
        assert_eq!(ckpt.tensors.len(), 1 + 30 * 9 + 1);
        let tokenizer = tokenizers::Tokenizer::from_str(&ckpt.tokenizer_json.to_string()).unwrap();
        let encoding = tokenizer
            .encode("<|im_start|>user\nWhat is 2024?<|im_end|>", false)
            .unwrap();
        assert_eq!(encoding.get_ids()[0], 1);
        assert_eq!(*encoding.get_ids().last().unwrap(), 2);
        assert!(encoding
            .get_tokens()
            .windows(2)
            .any(|pair| pair == ["2", "0"]));
        let chat_template = ckpt.tokenizer_config["chat_template"].as_str().unwrap();
        assert!(chat_template.contains("<|im_start|>"));

        let dir = tempfile::tempdir().unwrap();
        let converted = dir.path().join("smollm2");
        write_hf_dir(&ckpt, &converted).unwrap();
        let read = crate::Checkpoint::read(&converted, &Device::Cpu).unwrap();
        assert_eq!(read.meta.config.vocab_size, 49152);
        assert_eq!(read.tokenizer.eos_token_id(), Some(2));
    }
}
