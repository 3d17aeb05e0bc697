//! Reading and writing Hugging Face checkpoint directories (and reading llama-family GGUF files):
//! weights by name, config, tokenizer and the files carried along. Building a model from them is
//! the model crate's job.

use crate::config::{ModelConfig, TokenIds};
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
        let tensors = read_safetensors(path, device, cast)?;
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

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `tensor` in `cast` when it is a floating-point tensor of another dtype.
fn cast_float(tensor: Tensor, cast: Option<DType>) -> candle_core::Result<Tensor> {
    match cast {
        Some(dtype) if tensor.dtype().is_float() && tensor.dtype() != dtype => {
            tensor.to_dtype(dtype)
        }
        _ => Ok(tensor),
    }
}

/// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
fn read_safetensors(
    dir: &Path,
    device: &Device,
    cast: Option<DType>,
) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else {
        let index_path = dir.join("model.safetensors.index.json");
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
        names.into_iter().map(|n| dir.join(n)).collect()
    };
    let mut tensors = HashMap::new();
    for file in files {
        read_safetensors_file(&file, device, cast, &mut tensors)
            .with_context(|| format!("reading weights from {}", file.display()))?;
    }
    Ok(tensors)
}

/// The largest safetensors header accepted (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One safetensors file into `tensors`, a tensor at a time: its bytes are read, made a tensor on
/// `device`, cast (see [`cast_float`]) and dropped before the next is read, largest first, so the
/// file is never in memory whole (candle's `safetensors::load` reads all of it, then copies every
/// tensor: twice the stored weights at once, whatever dtype the model then wants).
fn read_safetensors_file(
    path: &Path,
    device: &Device,
    cast: Option<DType>,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<()> {
    use candle_core::safetensors::Load;
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        bail!("safetensors header of {header_len} bytes");
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).context("parsing the safetensors header")?;
    let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
    infos.sort_by(|(a, x), (b, y)| {
        let size = |i: &safetensors::tensor::TensorInfo| i.data_offsets.1 - i.data_offsets.0;
        size(y).cmp(&size(x)).then_with(|| a.cmp(b))
    });
    let data_start = 8 + header_len;
    for (name, info) in infos {
        let (begin, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - begin];
        file.seek(SeekFrom::Start(data_start + begin as u64))?;
        file.read_exact(&mut bytes)
            .with_context(|| format!("{name}: the file ends inside its data"))?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .with_context(|| name.clone())?;
        let tensor = cast_float(view.load(device)?, cast)?;
        tensors.insert(name, tensor);
    }
    Ok(())
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

/// Writes `tensors` as a safetensors file with the `format: pt` metadata transformers requires.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    write_safetensors_as(tensors, None, path)
}

/// [`write_safetensors`] with every tensor cast to `dtype` (when given). Each tensor is copied to
/// the host (and cast) only as it is written, so a save holds one tensor's copy at a time beside
/// the model, not a second copy of all of it.
pub fn write_safetensors_as(
    tensors: &[(String, Tensor)],
    dtype: Option<DType>,
    path: &Path,
) -> Result<()> {
    let failed = std::cell::RefCell::new(None);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::serialize_to_file(
        tensors.iter().map(|(name, tensor)| {
            let view = HostCast {
                tensor,
                dtype: dtype.unwrap_or(tensor.dtype()),
                failed: &failed,
            };
            (name.as_str(), view)
        }),
        Some(metadata),
        path,
    );
    if let Some(err) = failed.into_inner() {
        return Err(anyhow::Error::from(err).context(format!("writing {}", path.display())));
    }
    written.with_context(|| format!("writing {}", path.display()))?;
    // safetensors writes through a private (0600) temporary file; give it the usual mode.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// A tensor as safetensors writes it: cast to `dtype` and copied to the host when its bytes are
/// asked for. `View::data` cannot fail, so a failed cast or copy is kept in `failed` (and zeros of
/// the right length written in its place) for the writer to report.
struct HostCast<'a> {
    tensor: &'a Tensor,
    dtype: DType,
    failed: &'a std::cell::RefCell<Option<candle_core::Error>>,
}

impl safetensors::View for HostCast<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let host = self
            .tensor
            .detach()
            .to_dtype(self.dtype)
            .and_then(|t| t.to_device(&Device::Cpu));
        match host {
            // candle's own view of a host tensor: one copy of its bytes.
            Ok(t) => std::borrow::Cow::Owned(safetensors::View::data(&t).into_owned()),
            Err(err) => {
                self.failed.borrow_mut().get_or_insert(err);
                std::borrow::Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.elem_count() * self.dtype.size_in_bytes()
    }
}

/// Writes a Hugging Face checkpoint directory: `model.safetensors` of `weights` (each cast to
/// `dtype` as it is written, when given), `config.json` (with `torch_dtype` set to the saved
/// dtype) and the carried tokenizer/generation files; `extra` may add files (metrics, adapters).
/// Written beside `dir` and renamed into place, so a failed save never leaves a half-written
/// checkpoint; an existing `dir` is replaced.
pub fn write_checkpoint(
    weights: &[(String, Tensor)],
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
    optune_fs::write_dir_atomically(dir, |tmp| {
        write_safetensors_as(weights, dtype, &tmp.join("model.safetensors"))?;
        for (name, bytes) in &files {
            std::fs::write(tmp.join(name), bytes).with_context(|| format!("writing {name}"))?;
        }
        extra(tmp)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A directory with one safetensors file of an f32, a bf16 and an integer tensor.
    fn weights_dir() -> (tempfile::TempDir, Vec<(String, Tensor)>) {
        let dev = Device::Cpu;
        let tensors = vec![
            (
                "w".to_string(),
                Tensor::new(&[[0.1f32, -2.5, 3.0e-3], [1.0, 7.75, -0.3]], &dev).unwrap(),
            ),
            (
                "h".to_string(),
                Tensor::new(&[0.5f32, 1.25], &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
            (
                "ids".to_string(),
                Tensor::new(&[3i64, -1, 9], &dev).unwrap(),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&tensors, &dir.path().join("model.safetensors")).unwrap();
        (dir, tensors)
    }

    #[test]
    fn weights_read_a_tensor_at_a_time_are_cast_floats_only() {
        let (dir, tensors) = weights_dir();
        let stored = read_safetensors(dir.path(), &Device::Cpu, None).unwrap();
        let cast = read_safetensors(dir.path(), &Device::Cpu, Some(DType::BF16)).unwrap();
        for (name, tensor) in &tensors {
            assert_eq!(stored[name].dtype(), tensor.dtype(), "{name}");
            assert_eq!(stored[name].dims(), tensor.dims(), "{name}");
            assert_eq!(values(&stored[name]), values(tensor), "{name}");
            let want = if tensor.dtype().is_float() {
                DType::BF16
            } else {
                tensor.dtype()
            };
            assert_eq!(cast[name].dtype(), want, "{name}");
            assert_eq!(
                values(&cast[name]),
                values(&tensor.to_dtype(want).unwrap()),
                "{name}"
            );
        }
    }

    #[test]
    fn a_truncated_weights_file_is_an_error() {
        let (dir, _) = weights_dir();
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = read_safetensors(dir.path(), &Device::Cpu, None).unwrap_err();
        assert!(format!("{err:#}").contains("ends inside"), "{err:#}");
    }

    #[test]
    fn weights_written_in_another_dtype_are_cast_as_written() {
        let (dir, tensors) = weights_dir();
        let path = dir.path().join("f32.safetensors");
        write_safetensors_as(&tensors[..2], Some(DType::F32), &path).unwrap();
        let read = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for (name, tensor) in &tensors[..2] {
            assert_eq!(read[name].dtype(), DType::F32, "{name}");
            assert_eq!(values(&read[name]), values(tensor), "{name}");
        }
    }
}
