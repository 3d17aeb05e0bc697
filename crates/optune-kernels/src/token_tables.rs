//! What the KV-cache ops ([`crate::cache_write`], [`crate::cached_attention`]) take besides their
//! operands, a row per new token of a forward pass: its rotary angles and its span. A pass makes
//! it once and every layer's ops read it; on the CPU its elements are read out of the tensors
//! once, by the first op that needs them.

use candle_core::{bail, DType, Result, Storage, Tensor};
use std::sync::OnceLock;

pub struct TokenTables {
    cos: Tensor,
    sin: Tensor,
    spans: Tensor,
    host: OnceLock<HostTables>,
}

/// The tables' elements on the CPU, the angles widened to f32 (exactly).
pub(crate) struct HostTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub spans: Vec<u32>,
}

impl TokenTables {
    /// `cos`, `sin`: token `i`'s rotary angles (rotate-half layout), rows of `[.., d/2]` of one
    /// float dtype; `spans [tokens, 3]` u32: token `i`'s `(slot, first, last)` positions,
    /// inclusive, the last being its own (where its key and value are written).
    pub fn new(cos: &Tensor, sin: &Tensor, spans: &Tensor) -> Result<Self> {
        let tokens = spans.dim(0)?;
        let half = cos.dim(candle_core::D::Minus1)?;
        if spans.dims() != [tokens, 3]
            || spans.dtype() != DType::U32
            || cos.elem_count() != tokens * half
            || sin.dims() != cos.dims()
            || sin.dtype() != cos.dtype()
        {
            bail!(
                "token tables: cos {:?} {:?}, sin {:?} {:?}, spans {:?} {:?}: a row each per token",
                cos.dims(),
                cos.dtype(),
                sin.dims(),
                sin.dtype(),
                spans.dims(),
                spans.dtype()
            );
        }
        Ok(Self {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            spans: spans.contiguous()?,
            host: OnceLock::new(),
        })
    }

    pub fn tokens(&self) -> usize {
        self.spans.dims()[0]
    }

    /// Angles per token: half the head width.
    pub fn half(&self) -> usize {
        self.cos.elem_count() / self.tokens().max(1)
    }

    pub fn dtype(&self) -> DType {
        self.cos.dtype()
    }

    /// The elements on the CPU (CPU tensors only); `op` names the op in the error.
    pub(crate) fn host(&self, op: &str) -> Result<&HostTables> {
        if let Some(host) = self.host.get() {
            return Ok(host);
        }
        let floats = |t: &Tensor, what| -> Result<Vec<f32>> {
            let (storage, layout) = t.storage_and_layout();
            match &*storage {
                Storage::Cpu(s) => Ok(crate::storage::floats(s, layout, op, what)?.into_owned()),
                _ => bail!("{op}: the {what} are not on the CPU"),
            }
        };
        let (storage, layout) = self.spans.storage_and_layout();
        let spans = match &*storage {
            Storage::Cpu(s) => crate::storage::contiguous::<u32>(s, layout, op, "spans")?.to_vec(),
            _ => bail!("{op}: the spans are not on the CPU"),
        };
        let host = HostTables {
            cos: floats(&self.cos, "cosines")?,
            sin: floats(&self.sin, "sines")?,
            spans,
        };
        Ok(self.host.get_or_init(|| host))
    }

    /// `f` of the tables' device slices (GPU tensors only, the angles of dtype `T`), held for the
    /// length of the call; `op` names the op in the error.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_device<T, R>(
        &self,
        op: &str,
        f: impl FnOnce(DeviceTables<'_, T>) -> Result<R>,
    ) -> Result<R>
    where
        T: candle_core::cuda_backend::CudaDType,
    {
        let (cos_storage, cos_layout) = self.cos.storage_and_layout();
        let (sin_storage, sin_layout) = self.sin.storage_and_layout();
        let (spans_storage, spans_layout) = self.spans.storage_and_layout();
        let (Storage::Cuda(cos), Storage::Cuda(sin), Storage::Cuda(spans)) =
            (&*cos_storage, &*sin_storage, &*spans_storage)
        else {
            bail!("{op}: the rotary angles or the spans are not on the GPU");
        };
        f(DeviceTables {
            cos: cos.as_cuda_slice::<T>()?.slice(cos_layout.start_offset()..),
            sin: sin.as_cuda_slice::<T>()?.slice(sin_layout.start_offset()..),
            spans: spans
                .as_cuda_slice::<u32>()?
                .slice(spans_layout.start_offset()..),
        })
    }
}

/// The tables' device slices, for a kernel launch.
#[cfg(feature = "cuda")]
pub(crate) struct DeviceTables<'a, T> {
    pub cos: candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
    pub sin: candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
    pub spans: candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>,
}
