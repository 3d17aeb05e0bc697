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

/// One safetensors file into `tensors`, a tensor at a time: its bytes are read, made a tensor on
/// `device`, cast (see [`cast_float`]) and dropped before the next is read, largest first, so the
/// file is never in memory whole (candle's `safetensors::load` reads all of it, then copies every
/// tensor: twice the stored weights at once, whatever dtype the model then wants).
pub(crate) fn read_safetensors_file(
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
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tensors = tensors.iter().map(|(name, tensor)| {
        let dtype = dtype.unwrap_or(tensor.dtype());
        (name.clone(), HostCast { tensor, dtype })
    });
    optune_fs::write_safetensors_lazily(tensors, metadata, path)
}

/// A tensor as safetensors writes it: cast to `dtype` and copied to the host when its bytes are
/// asked for.
struct HostCast<'a> {
    tensor: &'a Tensor,
    dtype: DType,
}

impl optune_fs::LazyTensor for HostCast<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn bytes(&self) -> Result<Vec<u8>> {
        let host = self
            .tensor
            .detach()
            .to_dtype(self.dtype)?
            .to_device(&Device::Cpu)?;
        // candle's own view of a host tensor: one copy of its bytes.
        Ok(safetensors::View::data(&host).into_owned())
    }
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
