//! Safetensors files, one at a time: read a tensor at a time (never the whole file in memory)
//! and written from tensors on any device, each copied to the host only as it is written.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// `tensor` in `cast` when it is a floating-point tensor of another dtype.
pub(crate) fn cast_float(tensor: Tensor, cast: Option<DType>) -> candle_core::Result<Tensor> {
    match cast {
        Some(dtype) if tensor.dtype().is_float() && tensor.dtype() != dtype => {
            tensor.to_dtype(dtype)
        }
        _ => Ok(tensor),
    }
}

/// The largest safetensors header accepted (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors file's header: where each tensor's bytes lie, so tensors can be read one at a
/// time, by name (candle's `safetensors::load` reads the whole file, then copies every tensor:
/// twice the stored weights at once, whatever dtype the model then wants).
pub(crate) struct SafetensorsFile {
    /// Held open: a file deleted or replaced since it was opened is still the one read.
    file: std::fs::File,
    data_start: u64,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

impl SafetensorsFile {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        use std::io::Read;
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
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Self {
            file,
            data_start: 8 + header_len,
            tensors,
        })
    }

    /// The tensors' names, largest first (then by name), the order that keeps a cast read's
    /// peak lowest: the largest stored copy comes while the fewest cast tensors are held.
    pub(crate) fn names_largest_first(&self) -> Vec<&str> {
        let size = |i: &safetensors::tensor::TensorInfo| i.data_offsets.1 - i.data_offsets.0;
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_by(|a, b| {
            size(&self.tensors[*b])
                .cmp(&size(&self.tensors[*a]))
                .then_with(|| a.cmp(b))
        });
        names
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` made on `device` and cast (see [`cast_float`]); its stored bytes are
    /// held only while it is made.
    pub(crate) fn read(&self, name: &str, device: &Device, cast: Option<DType>) -> Result<Tensor> {
        use candle_core::safetensors::Load;
        use std::io::{Read, Seek, SeekFrom};
        let info = self
            .tensors
            .get(name)
            .with_context(|| format!("no tensor {name}"))?;
        let (begin, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - begin];
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.data_start + begin as u64))?;
        file.read_exact(&mut bytes)
            .with_context(|| format!("{name}: the file ends inside its data"))?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .with_context(|| name.to_string())?;
        Ok(cast_float(view.load(device)?, cast)?)
    }
}

/// One safetensors file into `tensors`, a tensor at a time: its bytes are read, made a tensor on
/// `device`, cast and dropped before the next is read, largest first, so the file is never in
/// memory whole.
pub(crate) fn read_safetensors_file(
    path: &Path,
    device: &Device,
    cast: Option<DType>,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let file = SafetensorsFile::open(path)?;
    for name in file.names_largest_first() {
        tensors.insert(name.to_string(), file.read(name, device, cast)?);
    }
    Ok(())
}

/// Writes `tensors` as a safetensors file with the `format: pt` metadata transformers requires.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    write_safetensors_as(tensors, None, path)
}

/// A weight as a writer saves it: a tensor, or one made only when the writer reaches it (a LoRA
/// weight merged on the fly), so that a save holds one made weight at a time.
pub trait SavedWeight {
    /// The dtype the weight is saved in when the writer is given none.
    fn dtype(&self) -> DType;
    fn shape(&self) -> &[usize];
    /// The weight's values, on any device.
    fn tensor(&self) -> Result<Tensor>;
}

impl SavedWeight for Tensor {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }

    fn shape(&self) -> &[usize] {
        self.dims()
    }

    fn tensor(&self) -> Result<Tensor> {
        Ok(self.clone())
    }
}

/// [`write_safetensors`] with every tensor cast to `dtype` (when given). Each weight is made,
/// copied to the host and cast only as it is written, so a save holds one weight's copy at a
/// time beside the model, not a second copy of all of it.
pub fn write_safetensors_as<W: SavedWeight>(
    tensors: &[(String, W)],
    dtype: Option<DType>,
    path: &Path,
) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tensors = tensors.iter().map(|(name, weight)| {
        let dtype = dtype.unwrap_or(weight.dtype());
        (name.clone(), HostCast { weight, dtype })
    });
    optune_fs::write_safetensors_lazily(tensors, metadata, path)
}

/// A weight as safetensors writes it: made, cast to `dtype` and copied to the host when its
/// bytes are asked for.
struct HostCast<'a, W> {
    weight: &'a W,
    dtype: DType,
}

impl<W: SavedWeight> optune_fs::LazyTensor for HostCast<'_, W> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }

    fn shape(&self) -> &[usize] {
        self.weight.shape()
    }

    fn bytes(&self) -> Result<Vec<u8>> {
        let host = self
            .weight
            .tensor()?
            .detach()
            .to_dtype(self.dtype)?
            .to_device(&Device::Cpu)?;
        // candle's own view of a host tensor: one copy of its bytes.
        Ok(safetensors::View::data(&host).into_owned())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn values(t: &Tensor) -> Vec<f32> {
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
        let read = |cast| {
            let mut tensors = HashMap::new();
            let path = dir.path().join("model.safetensors");
            read_safetensors_file(&path, &Device::Cpu, cast, &mut tensors).unwrap();
            tensors
        };
        let (stored, cast) = (read(None), read(Some(DType::BF16)));
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
        let err =
            read_safetensors_file(&path, &Device::Cpu, None, &mut HashMap::new()).unwrap_err();
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
