//! Checkpoints in PyTorch's pickle format (`pytorch_model.bin`, or the shards
//! `pytorch_model.bin.index.json` lists), as older Hugging Face models ship them, rewritten as
//! safetensors once ([`convert_pytorch_dir`]), so that every tool reads one format and maps it
//! instead of unpickling it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value};

use crate::checkpoint::read_json;
use crate::gguf::check_conversion_target;
use crate::safetensors_file::write_safetensors;
use optune_fs::write_dir_atomically;

const SINGLE: &str = "pytorch_model.bin";
const INDEX: &str = "pytorch_model.bin.index.json";

/// The pickle files of the checkpoint directory `dir`, in the order to read them: its
/// `pytorch_model.bin`, or the shards its `pytorch_model.bin.index.json` names (each once, in
/// name order). None when it holds neither.
pub fn pytorch_weight_files(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    if dir.join(SINGLE).is_file() {
        return Ok(Some(vec![dir.join(SINGLE)]));
    }
    let index_path = dir.join(INDEX);
    if !index_path.is_file() {
        return Ok(None);
    }
    let index = read_json(&index_path)?;
    let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
        bail!("{}: no weight_map object", index_path.display());
    };
    let mut files = Vec::with_capacity(map.len());
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            bail!(
                "{}: weight {name} maps to {file}, not a file name",
                index_path.display()
            );
        };
        ensure!(
            !file.contains('/') && !file.contains('\\'),
            "{}: weight {name} maps to {file}, outside the directory",
            index_path.display()
        );
        files.push(file.to_string());
    }
    files.sort_unstable();
    files.dedup();
    ensure!(
        !files.is_empty(),
        "{}: the weight_map is empty",
        index_path.display()
    );
    Ok(Some(files.into_iter().map(|f| dir.join(f)).collect()))
}

/// What [`convert_pytorch_dir`] wrote.
pub struct PytorchConversion {
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: usize,
    /// The safetensors files written: one per pickle file read.
    pub shards: usize,
}

/// Rewrites the PyTorch checkpoint directory `input` as a safetensors one at `output` (which must
/// not exist or be empty): each pickle file becomes one safetensors file with the same tensors,
/// names and dtypes (`model.safetensors`, or `model-0000K-of-0000N.safetensors` listed in a
/// `model.safetensors.index.json`), one file in memory at a time; every other file of `input`
/// (config, tokenizer, templates) is copied as it is. `progress` is told of each file read.
/// Written in a staging directory and renamed at the end: a failure leaves nothing at `output`.
pub fn convert_pytorch_dir(
    input: &Path,
    output: &Path,
    mut progress: impl FnMut(&Path, usize),
) -> Result<PytorchConversion> {
    check_conversion_target(output)?;
    let Some(files) = pytorch_weight_files(input)? else {
        bail!(
            "{}: no {SINGLE} or {INDEX} (the PyTorch weights to convert)",
            input.display()
        );
    };
    for other in ["model.safetensors", "model.safetensors.index.json"] {
        ensure!(
            !input.join(other).exists(),
            "{} already holds {other}: its weights need no conversion",
            input.display()
        );
    }
    let count = files.len();
    let mut done = PytorchConversion {
        tensors: 0,
        parameters: 0,
        bytes: 0,
        shards: count,
    };
    write_dir_atomically(output, |staging| {
        copy_other_files(input, staging)?;
        let mut weight_map = Map::new();
        for (k, file) in files.iter().enumerate() {
            let tensors = read_pickle(file)?;
            progress(file, tensors.len());
            let name = match count {
                1 => "model.safetensors".to_string(),
                n => format!("model-{:05}-of-{n:05}.safetensors", k + 1),
            };
            for (weight, tensor) in &tensors {
                ensure!(
                    weight_map
                        .insert(weight.clone(), Value::String(name.clone()))
                        .is_none(),
                    "{}: weight {weight} is in more than one file",
                    input.display()
                );
                done.tensors += 1;
                done.parameters += tensor.elem_count();
                done.bytes += tensor.elem_count() * tensor.dtype().size_in_bytes();
            }
            write_safetensors(&tensors, &staging.join(&name))?;
        }
        if count > 1 {
            let index = json!({"metadata": {"total_size": done.bytes}, "weight_map": weight_map});
            fs::write(
                staging.join("model.safetensors.index.json"),
                serde_json::to_string_pretty(&index)? + "\n",
            )
            .context("writing model.safetensors.index.json")?;
        }
        Ok(())
    })?;
    Ok(done)
}

/// Every tensor of one pickle file, sorted by name.
fn read_pickle(file: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = candle_core::pickle::read_all(file).with_context(|| {
        format!(
            "reading {} as a PyTorch checkpoint (torch.save's zip format)",
            file.display()
        )
    })?;
    ensure!(!tensors.is_empty(), "{}: no tensors", file.display());
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // A pickled tensor may be a strided view of its storage; a safetensors file holds it packed.
    tensors
        .into_iter()
        .map(|(name, tensor)| Ok((name, tensor.contiguous()?)))
        .collect()
}

/// The regular files of `input` other than its pickle weights, copied into `output`.
fn copy_other_files(input: &Path, output: &Path) -> Result<()> {
    let entries =
        fs::read_dir(input).with_context(|| format!("reading directory {}", input.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let weights =
            name == INDEX || (name.starts_with("pytorch_model") && name.ends_with(".bin"));
        if path.is_file() && !weights {
            fs::copy(&path, output.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_index(index: &str) -> (tempfile::TempDir, Result<Option<Vec<PathBuf>>>) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(INDEX), index).unwrap();
        let files = pytorch_weight_files(dir.path());
        (dir, files)
    }

    #[test]
    fn an_index_names_each_shard_once_in_name_order() {
        let (dir, files) = with_index(
            r#"{"weight_map": {"a": "pytorch_model-00002-of-00002.bin",
                "b": "pytorch_model-00001-of-00002.bin", "c": "pytorch_model-00002-of-00002.bin"}}"#,
        );
        let names: Vec<PathBuf> = [
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        ]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
        assert_eq!(files.unwrap(), Some(names));
    }

    #[test]
    fn an_index_that_leaves_the_directory_or_names_nothing_is_refused() {
        for (index, expected) in [
            (
                r#"{"weight_map": {"a": "../elsewhere.bin"}}"#,
                "outside the directory",
            ),
            (r#"{"weight_map": {"a": 3}}"#, "not a file name"),
            (r#"{"weight_map": {}}"#, "empty"),
            (r#"{"metadata": {}}"#, "no weight_map"),
        ] {
            let (_dir, files) = with_index(index);
            let err = files.unwrap_err().to_string();
            assert!(err.contains(expected), "{index}: {err}");
        }
    }

    #[test]
    fn a_directory_without_pickle_weights_has_none() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("model.safetensors"), b"").unwrap();
        assert_eq!(pytorch_weight_files(dir.path()).unwrap(), None);
    }
}
