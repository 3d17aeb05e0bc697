//! A CPU tensor's elements read from its storage: the one place that checks the dtype and the
//! layout an op's CPU form needs, and says which op and which operand when they are wrong.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, WithDType};
use std::borrow::Cow;

/// The elements of a contiguous tensor of dtype `T`; `op` and `what` name it in the error.
pub fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [T]> {
    let Ok(data) = T::cpu_storage_as_slice(s) else {
        bail!(
            "{op}: {what} has dtype {:?}, expected {:?}",
            s.dtype(),
            T::DTYPE
        );
    };
    Ok(&data[span(l, op, what)?])
}

/// [`contiguous`] for an f32 tensor written in place.
pub fn contiguous_f32_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{op}: {what} has dtype {:?}, expected F32", s.dtype());
    };
    Ok(&mut data[span(l, op, what)?])
}

/// The elements of a contiguous float tensor as f32: read in place when they are f32, widened
/// (exactly, from bf16 and f16) otherwise.
pub(crate) fn floats<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<Cow<'a, [f32]>> {
    let at = span(l, op, what)?;
    Ok(match s {
        CpuStorage::F32(x) => Cow::Borrowed(&x[at]),
        CpuStorage::BF16(x) => x[at].iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F16(x) => x[at].iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F64(x) => x[at].iter().map(|&v| v as f32).collect(),
        other => bail!(
            "{op}: {what} has dtype {:?}, expected a float",
            other.dtype()
        ),
    })
}

/// `values` stored in the dtype of `like` (rounded to nearest even for bf16 and f16): what
/// [`floats`] read, written back.
pub(crate) fn stored_like(values: Vec<f32>, like: &CpuStorage) -> CpuStorage {
    match like {
        CpuStorage::BF16(_) => {
            CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect())
        }
        CpuStorage::F16(_) => {
            CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect())
        }
        CpuStorage::F64(_) => CpuStorage::F64(values.into_iter().map(f64::from).collect()),
        _ => CpuStorage::F32(values),
    }
}

fn span(l: &Layout, op: &str, what: &str) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => bail!(
            "{op}: {what} must be contiguous (shape {:?}, stride {:?})",
            l.dims(),
            l.stride()
        ),
    }
}
