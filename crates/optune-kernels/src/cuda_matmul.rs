//! The operand layouts candle's CUDA matrix product takes, checked on every device.
//!
//! candle's CPU matmul (the `gemm` crate) reads operands through any strides; its CUDA matmul
//! hands them to cuBLAS, which reads each matrix with one leading dimension, so it refuses
//! (`MatMulNonContiguous`) an operand whose last two axes are not packed, row-major or transposed:
//! a column slice, or a squeezed `narrow` whose rows lie apart. A product that passes every CPU
//! test can then fail on the first GPU run. [`matmul`] applies the CUDA rule everywhere, so the CPU
//! runs of the generic ops (`OPTUNE_KERNELS=generic`, the op graph CUDA runs) fail where a GPU
//! would.

use candle_core::{bail, Layout, Result, Tensor};

/// Whether candle-core 0.11.1's CUDA matmul (`gemm_config` in `cuda_backend/mod.rs`) takes
/// `lhs [.., m, k]` and `rhs [.., k, n]` as laid out: each operand's last two axes packed, with
/// row stride equal to its width or transposed-packed (an axis of size 1 may have any stride), and
/// at most two batch axes that one stride steps through. Shapes must be ones candle's matmul
/// accepts (the same rank, at least 2). A product with no elements never reaches cuBLAS.
pub fn cuda_matmul_accepts(lhs: &Layout, rhs: &Layout) -> bool {
    let (dims, rank) = (lhs.dims(), lhs.dims().len());
    let (m, k, n) = (dims[rank - 2], dims[rank - 1], rhs.dims()[rank - 1]);
    if lhs.shape().elem_count() / k.max(1) * n == 0 || k == 0 {
        return true;
    }
    // `(minor, major)`: the strides of the last axis and of the one before it.
    let last_two = |l: &Layout| (l.stride()[rank - 1], l.stride()[rank - 2]);
    let (lhs_m1, lhs_m2) = last_two(lhs);
    let (rhs_m1, rhs_m2) = last_two(rhs);
    let rhs_packed = ((rhs_m1 == 1 || n == 1) && (rhs_m2 == n || k == 1))
        || ((rhs_m1 == k || n == 1) && (rhs_m2 == 1 || k == 1));
    let lhs_packed = ((lhs_m1 == 1 || k == 1) && (lhs_m2 == k || m == 1))
        || ((lhs_m1 == m || k == 1) && (lhs_m2 == 1 || m == 1));
    let one_batch_stride = |l: &Layout| match l.stride()[..rank - 2] {
        [outer, inner] => outer == inner * l.dims()[1] || l.dims()[0] == 1 || l.dims()[1] == 1,
        [_] | [] => true,
        _ => false,
    };
    lhs_packed && rhs_packed && one_batch_stride(lhs) && one_batch_stride(rhs)
}

/// An error unless [`cuda_matmul_accepts`] the operands: what a GPU run would stop at.
pub(crate) fn check(op: &str, lhs: &Layout, rhs: &Layout) -> Result<()> {
    if !cuda_matmul_accepts(lhs, rhs) {
        bail!(
            "{op}: {:?} (strides {:?}) · {:?} (strides {:?}): candle's CUDA matmul cannot read \
             these operands in place; make the strided one contiguous",
            lhs.dims(),
            lhs.stride(),
            rhs.dims(),
            rhs.stride()
        );
    }
    Ok(())
}

/// `a.matmul(b)`, refused on every device where candle's CUDA matmul would refuse it.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.rank() >= 2 && a.rank() == b.rank() {
        check("matmul", a.layout(), b.layout())?;
    }
    a.matmul(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    fn accepts(a: &Tensor, b: &Tensor) -> bool {
        cuda_matmul_accepts(a.layout(), b.layout())
    }

    #[test]
    fn packed_and_transposed_operands_pass() {
        let (x, w) = (zeros(&[5, 7]), zeros(&[3, 7]));
        assert!(accepts(&x, &w.t().unwrap()));
        assert!(accepts(&w, &x.t().unwrap()));
        assert!(accepts(&x.t().unwrap(), &x));
        // Rows of a matrix taken by `narrow` on the first axis stay packed (an offset only).
        assert!(accepts(&x.narrow(0, 1, 3).unwrap(), &w.t().unwrap()));
        // Batched, and a KV cache's first positions (a strided view along the position axis).
        let (q, cache) = (zeros(&[2, 3, 4, 8]), zeros(&[2, 3, 10, 8]));
        let keys = cache.narrow(2, 0, 6).unwrap();
        let scores = zeros(&[2, 3, 4, 6]);
        assert!(accepts(&q, &keys.t().unwrap()));
        assert!(accepts(&scores, &keys));
        // A matrix broadcast over the batch (stride 0), as `broadcast_matmul` makes.
        let lhs = zeros(&[4, 3, 8]);
        let rhs = zeros(&[8, 8]).broadcast_as((4, 8, 8)).unwrap();
        assert!(accepts(&lhs, &rhs));
        // A column vector from `unsqueeze`.
        let v = zeros(&[7]).unsqueeze(1).unwrap();
        assert!(accepts(&x, &v));
    }

    #[test]
    fn operands_whose_rows_lie_apart_are_refused() {
        let x = zeros(&[5, 7]);
        let square = zeros(&[4, 4]);
        // Columns 2..6 of a matrix: rows 7 apart, 4 wide.
        assert!(!accepts(&x.narrow(1, 2, 4).unwrap(), &square));
        assert!(!accepts(&square, &x.narrow(1, 2, 4).unwrap().t().unwrap()));
        // The last column of each block of a [rows, blocks, width] tensor, squeezed: what the
        // device sampler's running sums once multiplied.
        let within = zeros(&[3, 5, 8]);
        let totals = within.narrow(2, 7, 1).unwrap().squeeze(2).unwrap();
        assert!(!accepts(&totals, &zeros(&[5, 5])));
        assert!(accepts(&totals.contiguous().unwrap(), &zeros(&[5, 5])));
        // Three batch axes are more than cuBLAS's one batch stride can step through.
        let deep = zeros(&[2, 3, 4, 5, 6]).permute((1, 0, 2, 3, 4)).unwrap();
        assert!(!accepts(&deep, &zeros(&[3, 2, 4, 6, 5])));
    }

    #[test]
    fn the_checked_product_refuses_what_a_gpu_would_and_computes_the_rest() {
        let x = Tensor::arange(0f32, 35.0, &Device::Cpu)
            .unwrap()
            .reshape((5, 7))
            .unwrap();
        let w = Tensor::ones((3, 7), DType::F32, &Device::Cpu).unwrap();
        let y = matmul(&x, &w.t().unwrap()).unwrap();
        let sums = x.sum_keepdim(D::Minus1).unwrap();
        let diff = (y.narrow(1, 0, 1).unwrap() - sums).unwrap();
        assert_eq!(
            diff.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let columns = x.narrow(1, 0, 3).unwrap();
        let err = matmul(&columns, &w.narrow(1, 0, 3).unwrap().t().unwrap()).unwrap_err();
        assert!(err.to_string().contains("CUDA matmul"), "{err}");
    }
}
