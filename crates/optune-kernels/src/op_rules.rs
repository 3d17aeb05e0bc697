//! What every form of an op agrees on, whichever form [`crate::dispatch`] picks: the dtype its
//! reductions run in, and the shapes a weight product takes.

use candle_core::{bail, DType, Layout, Result};

/// `(n, k, out)` of the product `x [n, k] · weightᵀ` with `weight [out, k]`, checked.
pub(crate) fn product_dims(op: &str, x: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
    let (&[n, k], &[out, k2]) = (x.dims(), weight.dims()) else {
        bail!(
            "{op}: {:?} and weight {:?} must be matrices",
            x.dims(),
            weight.dims()
        );
    };
    if k != k2 {
        bail!("{op}: the input has width {k}, the weight {k2}");
    }
    Ok((n, k, out))
}

/// The dtype reductions run in: f32 for half-precision weights (as transformers does), else the
/// weights' own dtype (f64 for gradient checks).
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}
