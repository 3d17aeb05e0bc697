//! Reading and writing Hugging Face checkpoint directories (and reading llama-family GGUF files):
//! weights by name, config, tokenizer and the files carried along. Building a model from them is
//! the model crate's job.

use crate::config::{ModelConfig, TokenIds};
use crate::safetensors_file::{
    cast_float, read_safetensors_file, write_safetensors_as, SafetensorsFile, SavedWeight,
};
use crate::tokenizer::ChatTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Files copied verbatim from the source checkpoint when saving, so transformers finds the same
/// tokenizer and generation settings.
const CARRIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Everything of a checkpoint except the weights.
#[derive(Clone)]
pub struct CheckpointMeta {
    pub config: ModelConfig,
    /// `config.json` as read, rewritten unchanged on save (so unknown fields survive).
    pub config_json: Value,
    /// Token ids at which generation stops: generation_config's, else config's, else the
    /// tokenizer's EOS.
    pub eos_token_ids: Vec<u32>,
    /// Carried files by name.
    pub files: Vec<(String, Vec<u8>)>,
    /// Where it came from (a directory or a GGUF file), for provenance columns.
    pub source: PathBuf,
}

/// A checkpoint read from disk: metadata, weights by Hugging Face name, tokenizer.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: ChatTokenizer,
}

impl Checkpoint {
    /// Reads a Hugging Face directory or a `.gguf` file onto `device` (weights keep their stored
    /// dtype until the model is built).
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        Self::read_cast(path, device, None)
    }

    /// [`Checkpoint::read`] with every floating-point weight cast to `dtype` as it comes off
    /// disk (integer tensors keep theirs). The stored form of only one tensor at a time exists
    /// beside the cast weights, so a bf16 model read from an f32 checkpoint never holds the f32
    /// weights (nor the file's bytes) as a whole.
    pub fn read_as(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::read_cast(path, device, Some(dtype))
    }

    fn read_cast(path: &Path, device: &Device, cast: Option<DType>) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            return read_gguf_checkpoint(path, device, cast);
        }
        if !path.is_dir() {
            bail!("{}: not a model directory or .gguf file", path.display());
        }
        let config_json: Value = read_json(&path.join("config.json"))?;
        let config = ModelConfig::from_json_str(&config_json.to_string())
            .with_context(|| format!("{}", path.join("config.json").display()))?;
        let tokenizer = ChatTokenizer::from_dir(path)?;
        tokenizer
            .check_vocab(config.vocab_size)
            .with_context(|| format!("{}", path.display()))?;
        let mut tensors = read_safetensors(path, device, cast)?;
        crate::layout::Layout::of(&config)
            .to_model(&mut tensors)
            .with_context(|| format!("{}", path.display()))?;
        let mut files = Vec::new();
        for name in CARRIED_FILES {
            if let Ok(bytes) = std::fs::read(path.join(name)) {
                files.push((name.to_string(), bytes));
            }
        }
        let generation_eos = match std::fs::read(path.join("generation_config.json")) {
            Ok(bytes) => {
                let v: Value = serde_json::from_slice(&bytes).with_context(|| {
                    format!("parsing {}", path.join("generation_config.json").display())
                })?;
                eos_from_json(&v)
            }
            Err(_) => Vec::new(),
        };
        let eos_token_ids = first_non_empty([
            generation_eos,
            config.eos_token_ids(),
            tokenizer.eos_token_id().into_iter().collect(),
        ]);
        Ok(Self {
            meta: CheckpointMeta {
                config,
                config_json,
                eos_token_ids,
                files,
                source: path.to_path_buf(),
            },
            tensors,
            tokenizer,
        })
    }
}

fn first_non_empty<const N: usize>(candidates: [Vec<u32>; N]) -> Vec<u32> {
    candidates
        .into_iter()
        .find(|c| !c.is_empty())
        .unwrap_or_default()
}

fn eos_from_json(v: &Value) -> Vec<u32> {
    v.get("eos_token_id")
        .and_then(|e| serde_json::from_value::<TokenIds>(e.clone()).ok())
        .map(|ids| ids.to_vec())
        .unwrap_or_default()
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() && crate::pytorch::pytorch_weight_files(dir)?.is_some() {
        bail!(
            "{0}: its weights are in PyTorch's pickle format (pytorch_model.bin), which optune \
             does not read; convert the directory once with `opt-convert {0} -o NEW_DIR`",
            dir.display()
        );
    }
    let index = read_json(&index_path).with_context(|| {
        format!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        )
    })?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{}: no weight_map", index_path.display()))?;
    let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    names.sort_unstable();
    names.dedup();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

fn read_safetensors(
    dir: &Path,
    device: &Device,
    cast: Option<DType>,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for file in safetensors_files(dir)? {
        read_safetensors_file(&file, device, cast, &mut tensors)
            .with_context(|| format!("reading weights from {}", file.display()))?;
    }
    Ok(tensors)
}

/// A checkpoint's weights left where they are stored and read one at a time, by name, for work
/// that wants a few of them or one after another (a save that merges adapters into the weights
/// as stored). A Hugging Face directory's safetensors files are opened at once and held open,
/// then read a tensor at a time; a `.gguf` file is converted whole on the fly, so its weights
/// are all read at the first read, on the host.
pub struct StoredWeights(Stored);

enum Stored {
    /// The files, and how the model's weights lie in them (`crate::layout`).
    Files(Vec<SafetensorsFile>, crate::layout::Layout),
    Gguf {
        path: PathBuf,
        converted: std::sync::OnceLock<HashMap<String, Tensor>>,
    },
}

impl StoredWeights {
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            return Ok(Self(Stored::Gguf {
                path: path.to_path_buf(),
                converted: std::sync::OnceLock::new(),
            }));
        }
        let files = safetensors_files(path)?
            .into_iter()
            .map(|file| {
                SafetensorsFile::open(&file)
                    .with_context(|| format!("reading the header of {}", file.display()))
            })
            .collect::<Result<_>>()?;
        // Without a config.json (weights alone), the weights are read as they are stored.
        let config_path = path.join("config.json");
        let layout = match config_path.is_file() {
            true => crate::layout::Layout::of(
                &ModelConfig::from_json_str(&read_json(&config_path)?.to_string())
                    .with_context(|| format!("{}", config_path.display()))?,
            ),
            false => crate::layout::Layout::none(),
        };
        Ok(Self(Stored::Files(files, layout)))
    }

    /// The weight `name` on `device`, cast to `dtype` when it is a floating-point weight;
    /// `None` when the checkpoint has no weight of that name.
    pub fn read(&self, name: &str, device: &Device, dtype: DType) -> Result<Option<Tensor>> {
        match &self.0 {
            Stored::Files(files, layout) => {
                layout.stored_part(name, |name| match files.iter().find(|f| f.contains(name)) {
                    Some(file) => file.read(name, device, Some(dtype)).map(Some),
                    None => Ok(None),
                })
            }
            Stored::Gguf { path, converted } => {
                if converted.get().is_none() {
                    let tensors = crate::gguf::read_gguf(path)?.tensors.into_iter().collect();
                    let _ = converted.set(tensors);
                }
                match converted.get().and_then(|tensors| tensors.get(name)) {
                    Some(t) => Ok(Some(cast_float(t.to_device(device)?, Some(dtype))?)),
                    None => Ok(None),
                }
            }
        }
    }
}

fn read_gguf_checkpoint(path: &Path, device: &Device, cast: Option<DType>) -> Result<Checkpoint> {
    let hf = crate::gguf::read_gguf(path)?;
    let config = ModelConfig::from_json_str(&hf.config.to_string())
        .with_context(|| format!("{}: the config derived from its metadata", path.display()))?;
    let tokenizer = ChatTokenizer::from_parts(&hf.tokenizer_json.to_string(), &hf.tokenizer_config)
        .with_context(|| {
            format!(
                "{}: the tokenizer rebuilt from its metadata",
                path.display()
            )
        })?;
    tokenizer.check_vocab(config.vocab_size)?;
    let eos_token_ids = first_non_empty([
        eos_from_json(&hf.generation_config),
        config.eos_token_ids(),
        tokenizer.eos_token_id().into_iter().collect(),
    ]);
    let files = vec![
        (
            "tokenizer.json".to_string(),
            serde_json::to_vec_pretty(&hf.tokenizer_json)?,
        ),
        (
            "tokenizer_config.json".to_string(),
            serde_json::to_vec_pretty(&hf.tokenizer_config)?,
        ),
        (
            "generation_config.json".to_string(),
            serde_json::to_vec_pretty(&hf.generation_config)?,
        ),
    ];
    let tensors = hf
        .tensors
        .into_iter()
        .map(|(name, t)| Ok((name, cast_float(t.to_device(device)?, cast)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(Checkpoint {
        meta: CheckpointMeta {
            config,
            config_json: hf.config,
            eos_token_ids,
            files,
            source: path.to_path_buf(),
        },
        tensors,
        tokenizer,
    })
}

/// Writes a Hugging Face checkpoint directory: `model.safetensors` of `weights` (each made and
/// cast to `dtype` as it is written, when given), `config.json` (with `torch_dtype` set to the saved
/// dtype) and the carried tokenizer/generation files; `extra` may add files (metrics, adapters).
/// Written beside `dir` and renamed into place, so a failed save never leaves a half-written
/// checkpoint; an existing `dir` is replaced.
pub fn write_checkpoint<W: SavedWeight>(
    weights: &[(String, W)],
    dtype: Option<DType>,
    meta: &CheckpointMeta,
    dir: &Path,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let mut config_json = meta.config_json.clone();
    if let (Some(obj), Some((_, first))) = (config_json.as_object_mut(), weights.first()) {
        let dtype = match dtype.unwrap_or(first.dtype()) {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        obj.insert("torch_dtype".into(), Value::String(dtype.into()));
    }
    let files: Vec<(String, Vec<u8>)> = std::iter::once((
        "config.json".to_string(),
        serde_json::to_vec_pretty(&config_json)?,
    ))
    .chain(meta.files.iter().cloned())
    .collect();
    let layout = crate::layout::Layout::of(&meta.config);
    let weights = layout.to_checkpoint(weights)?;
    optune_fs::write_dir_atomically(dir, |tmp| {
        write_safetensors_as(&weights, dtype, &tmp.join("model.safetensors"))?;
        for (name, bytes) in &files {
            std::fs::write(tmp.join(name), bytes).with_context(|| format!("writing {name}"))?;
        }
        extra(tmp)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors_file::tests::values;
    use crate::safetensors_file::write_safetensors;

    /// Weights read one at a time by name, from the shards an index lists, are the stored ones,
    /// floating-point ones cast and integer ones kept; a name the checkpoint lacks is `None`.
    #[test]
    fn stored_weights_are_read_by_name_from_the_shards() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::new(&[[0.1f32, -2.5], [3.0e-3, 7.75]], &dev).unwrap();
        let ids = Tensor::new(&[3i64, -1], &dev).unwrap();
        write_safetensors(
            &[("w".into(), w.clone())],
            &dir.path().join("a.safetensors"),
        )
        .unwrap();
        write_safetensors(&[("ids".into(), ids)], &dir.path().join("b.safetensors")).unwrap();
        let index =
            serde_json::json!({"weight_map": {"w": "a.safetensors", "ids": "b.safetensors"}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();

        let stored = StoredWeights::open(dir.path()).unwrap();
        let read = stored.read("w", &dev, DType::BF16).unwrap().unwrap();
        assert_eq!(read.dtype(), DType::BF16);
        assert_eq!(values(&read), values(&w.to_dtype(DType::BF16).unwrap()));
        let ids = stored.read("ids", &dev, DType::F32).unwrap().unwrap();
        assert_eq!(ids.dtype(), DType::I64);
        assert_eq!(ids.to_vec1::<i64>().unwrap(), [3, -1]);
        assert!(stored.read("absent", &dev, DType::F32).unwrap().is_none());
    }
}
