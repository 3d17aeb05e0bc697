//! The ops of the transformer, each with its forms side by side. An op's public function here
//! asks [`crate::dispatch::path_for`] which form runs; the generic forms are in [`generic`]
//! below, the fused autograd ops in `fused/` (one module and one `CustomOp` per op, named after
//! it), and the host decode kernels of the same op in [`crate::host`] (called by the model's CPU
//! decode step, which [`crate::dispatch::decode_path`] turns on or off as a whole).
//!
//! | op | generic | fused | host |
//! |---|---|---|---|
//! | [`embedding`] | [`generic::embedding`] | `fused::Embedding` | — |
//! | [`rms_norm`] | [`generic::rms_norm`] | `fused::RmsNorm` | [`crate::host::rms_norm`] |
//! | [`linear`] | [`generic::linear`] | `fused::LinearOp` | [`crate::host::linear_many`] |
//! | [`lora_linear`] | [`generic::lora_linear`] | `fused::LoraLinear` | — |
//! | [`silu_mul`] | [`generic::silu_mul`] | `fused::SiluMul` | [`crate::host::silu_mul`] |
//! | [`silu_mul_halves`] (generation) | [`crate::forward_only::silu_mul`] | halves, `fused::SiluMul` | — |
//! | [`add_rms_norm`] | add, [`generic::rms_norm`] (generation: [`crate::forward_only::add_rms_norm`]) | add, `fused::RmsNorm` | (add, [`crate::host::rms_norm`]) |
//! | [`head_rms_norm`] (stacked q/k/v; [`rms_norm_heads`] on one projection) | parts through [`generic::rms_norm`] (generation: [`crate::forward_only::head_rms_norm`]) | parts through `fused::RmsNorm` | ([`crate::host::rms_norm`] on q and k) |
//! | [`rotary_attention`] | [`generic::rotary_attention`] (`RotaryAttention`) | the same node, `fused::Rope` and `fused::Attention` inside | [`crate::host::rotary`], [`crate::host::attention`] |
//! | [`token_logprobs`] | [`generic::token_logprobs`] (`ChunkedLogprobs`) | `fused::TokenLogprobs` | (sampler: [`crate::host::log_sum_exp`]) |
//!
//! The generic RMSNorm, rotary embedding and attention softmax run candle-nn's fused kernels
//! ([`generic::rms_norm`], [`generic::rope`], [`generic::softmax_last_dim`]: one kernel each on
//! CUDA) inside nodes of their own whose backward is written in tensor ops; the generic
//! attention (with its rotary embedding and heads), LoRA projection and SwiGLU gate are such
//! nodes too, whose backward passes compute the rotated heads, the probabilities, the
//! dropped-out input and `silu(gate)` again instead of keeping them.

use crate::dispatch::{path_for, Path};
use crate::dropout::DropoutMask;
use crate::fused;
pub use crate::fused::KEPT_LOGITS_BYTES;
pub use crate::op_rules::accumulation_dtype;
use candle_core::{DType, Result, Tensor};

/// Rows of logits computed at once by [`token_logprobs`]: bounds the logits buffer to
/// `chunk × vocab` floats.
pub const HEAD_CHUNK_ROWS: usize = 256;

/// The most scores one piece of [`generic::attention`] makes. candle's CUDA elementwise
/// kernels count elements in 32-bit unsigned ints, so at 2³² or more they would wrap (hang or
/// fail to launch): a reward model's 12k-token row with 32 heads gets there. The bound also
/// limits what the scores take at once: a training pass holds six score-sized f32 buffers of one
/// piece (24 bytes a score), 1.6 GB at 2²⁶, where 2²⁸ took 6.4 GB, more than half of the
/// activations of a 7B LoRA step of 4 pairs of 1,024 tokens with recomputation. A piece of 2²⁶
/// scores is still a large product on a GPU (that step's 8 × 32 heads × 1,024 keys make 256
/// query rows a piece, 4 pieces a layer).
pub const ATTENTION_PIECE_SCORES: usize = 1 << 26;

/// `x / rms(x) · weight` over the last axis, statistics in [`accumulation_dtype`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match path_for(&[x, weight]) {
        Path::Fused => fused::rms_norm(x, weight, eps),
        Path::Generic => generic::rms_norm(x, weight, eps),
    }
}

/// The sum of all of `x`'s elements, a scalar: candle's `sum_all` with each row (the last axis)
/// summed first. candle's CUDA reduction gives each output element one thread block, so a bare
/// `sum_all` runs on one multiprocessor: in a full fine-tuning step of a 1.1B llama on an H200
/// the gradient norm's sums took about 90 ms of the step's 385 ms of kernels that way (ncu,
/// 2026-12-04). Summed by rows, a `[rows, width]` tensor takes a block a row, then one small
/// sum. Differentiable, as both sums are.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    match x.rank() {
        0 | 1 => x.sum_all(),
        _ => x.sum(candle_core::D::Minus1)?.sum_all(),
    }
}

/// Rows `ids [..]` (u32) of `weight [vocab, h]`: `[.., h]`.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    match path_for(&[weight]) {
        Path::Fused if ids.dtype() == DType::U32 => fused::embedding(weight, ids),
        _ => generic::embedding(weight, ids),
    }
}

/// `x [.., in] · weightᵀ` with `weight [out, in]`: `[.., out]`. A weight that is no variable
/// (frozen, e.g. under LoRA) gets no gradient on the fused path.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    match path_for(&[x, weight]) {
        Path::Fused => fused::linear(x, weight),
        Path::Generic => generic::linear(x, weight),
    }
}

/// `x [.., in] · weightᵀ + (d(x) · aᵀ) · bᵀ`: a linear layer with a LoRA adapter `a [rank, in]`,
/// `b [out, rank]` (scaled already) on its own input, dropped out by `dropout`'s mask when there
/// is one ([`crate::dropout`]'s: the same elements dropped on every path).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
    match path_for(&[x, weight, a, b]) {
        Path::Fused => fused::lora_linear(x, weight, a, b, dropout),
        Path::Generic => generic::lora_linear(x, weight, a, b, dropout),
    }
}

/// Which forms a forward pass's ops take, where the forms round differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Training, and every pass whose numbers are set against a training pass's (reference
    /// log-probs, scores): the differentiable forms whether or not a gradient flows, so that equal
    /// weights give equal numbers.
    Differentiable,
    /// Generation over a KV cache: on the generic path, the one-kernel forms of
    /// [`crate::forward_only`] (no gradient).
    Generation,
}

/// `silu(gate) · up`: the SwiGLU gate.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match path_for(&[gate, up]) {
        Path::Fused => fused::silu_mul(gate, up),
        Path::Generic => generic::silu_mul(gate, up),
    }
}

/// `gelu(gate) · up` with GELU's tanh approximation (Gemma's gate), composed of candle's ops
/// (their backward included) on every device. A half-precision gate takes the GELU in f32, as
/// PyTorch computes it (candle's own bf16 form rounds after every step).
pub fn gelu_tanh_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let activated = match gate.dtype() {
        DType::BF16 | DType::F16 => gate.to_dtype(DType::F32)?.gelu()?.to_dtype(gate.dtype())?,
        _ => gate.gelu()?,
    };
    activated * up
}

/// [`silu_mul`] of `gate_up [.., 2·width]`, the gate's columns then up's (one product over the
/// two weights stacked): `[.., width]`. For generation's passes: on the generic path one op
/// ([`crate::forward_only::silu_mul`]), otherwise the halves through [`silu_mul`].
pub fn silu_mul_halves(gate_up: &Tensor) -> Result<Tensor> {
    match path_for(&[gate_up]) {
        Path::Generic if forward_only(Pass::Generation, &[gate_up]) => {
            crate::forward_only::silu_mul(gate_up)
        }
        _ => {
            let width = gate_up.dim(candle_core::D::Minus1)? / 2;
            let half = |at| gate_up.narrow(candle_core::D::Minus1, at, width);
            silu_mul(&half(0)?, &half(width)?)
        }
    }
}

/// The residual add and the RMS norm after it: `(x + delta, rms_norm(x + delta, weight))`. In a
/// generation pass on the generic path, one op ([`crate::forward_only::add_rms_norm`]; the sum is
/// rounded to the dtype before its statistics, as the stream is stored); otherwise the add, then
/// [`rms_norm`].
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
    pass: Pass,
) -> Result<(Tensor, Tensor)> {
    match path_for(&[x, delta, weight]) {
        Path::Generic if forward_only(pass, &[x, delta, weight]) => {
            crate::forward_only::add_rms_norm(x, delta, weight, eps)
        }
        _ => {
            let sum = (x + delta)?;
            let normed = rms_norm(&sum, weight, eps)?;
            Ok((sum, normed))
        }
    }
}

/// `x [b, t, n·d]` with each of its `n` heads through [`rms_norm`] by `weight [d]`.
pub fn rms_norm_heads(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let d = weight.dim(0)?;
    rms_norm(&x.reshape((b, t, width / d, d))?, weight, eps)?.reshape((b, t, width))
}

/// Qwen3's norms of each query and key head over `rows [b, t, heads_per_row·d]` holding the
/// tokens' query heads, then their key heads, then the rest (values): each of the first
/// `q_heads` heads through [`rms_norm`] with `q_weight [d]`, the next `k_heads` with
/// `k_weight`, the rest as they are; the same shape. In a generation pass on the generic path one
/// op ([`crate::forward_only::head_rms_norm`]); otherwise the two parts normalised and the rows
/// put together again.
pub fn head_rms_norm(
    rows: &Tensor,
    [q_weight, k_weight]: [&Tensor; 2],
    (q_heads, k_heads): (usize, usize),
    eps: f64,
    pass: Pass,
) -> Result<Tensor> {
    match path_for(&[rows, q_weight, k_weight]) {
        Path::Generic if forward_only(pass, &[rows, q_weight, k_weight]) => {
            crate::forward_only::head_rms_norm(rows, [q_weight, k_weight], (q_heads, k_heads), eps)
        }
        _ => {
            let width = rows.dim(candle_core::D::Minus1)?;
            let d = q_weight.dim(0)?;
            let normed = |from: usize, heads: usize, weight: &Tensor| -> Result<Tensor> {
                let part = rows.narrow(candle_core::D::Minus1, from * d, heads * d)?;
                rms_norm_heads(&part, weight, eps)
            };
            let rest = q_heads + k_heads;
            let values = rows.narrow(candle_core::D::Minus1, rest * d, width - rest * d)?;
            Tensor::cat(
                &[
                    &normed(0, q_heads, q_weight)?,
                    &normed(q_heads, k_heads, k_weight)?,
                    &values,
                ],
                candle_core::D::Minus1,
            )
        }
    }
}

/// Whether a generic-path op of `pass` runs its [`crate::forward_only`] form on `inputs`: in a
/// generation pass, for the dtypes the kernels take (f64, for gradient checks, composes).
fn forward_only(pass: Pass, inputs: &[&Tensor]) -> bool {
    pass == Pass::Generation
        && inputs
            .iter()
            .all(|t| crate::kernel_args::kernel_dtype(t.dtype()))
}

/// Self-attention over a layer's projections `q [b, t, heads·d]` and `k`, `v [b, t,
/// kv_heads·d]` (`heads`: `(heads, kv_heads)`): q and k split into heads and rotated
/// (rotate-half layout) by the tables `cos`/`sin [b, t, d/2]` (channels `j` and `j + d/2` turn by
/// the same angle), grouped-query attention `softmax(scale · q kᵀ + mask) v` with an additive
/// `mask [b, 1, t, t]`, and the heads merged again: `[b, t, heads·d]`. The mask is in q's dtype,
/// or in the fused path's [`accumulation_dtype`] (which it adds in; the op would convert it).
/// On either path one node that keeps the three projections alone for the backward pass
/// ([`generic::rotary_attention`], with the path's kernels inside).
pub fn rotary_attention(
    [q, k, v]: [&Tensor; 3],
    [cos, sin]: [&Tensor; 2],
    mask: &Tensor,
    heads: (usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let path = path_for(&[q, k, v, cos, sin]);
    generic::rotary_attention(path, [q, k, v], [cos, sin], mask, heads, scale)
}

/// [`rotary_attention`] composed of its steps: q and k split and turned by `rotate` (a
/// projection and its heads), v split, `attend` (`[b, heads, t, d]` from q, k, v), the heads
/// merged.
fn composed_rotary_attention(
    [q, k, v]: [&Tensor; 3],
    (heads, kv_heads): (usize, usize),
    rotate: impl Fn(&Tensor, usize) -> Result<Tensor>,
    attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (q, k) = (rotate(q, heads)?, rotate(k, kv_heads)?);
    merge_heads(&attend(&q, &k, &split_heads(v, kv_heads)?)?)
}

/// `x [b, t, heads·d]` as `[b, heads, t, d]` (contiguous).
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    x.reshape((b, t, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `x [b, heads, t, d]` as `[b, t, heads·d]` (contiguous).
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, heads * d))
}

/// `log softmax(rows · weightᵀ)[targets[i]]` for each row of `rows [n, hidden]`: `[n]`, in
/// chunks of [`HEAD_CHUNK_ROWS`] rows so that only one chunk of logits exists at a time, in the
/// backward pass too, on every device.
pub fn token_logprobs(rows: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    match path_for(&[rows, weight]) {
        Path::Fused => fused::token_logprobs(rows, weight, targets, HEAD_CHUNK_ROWS),
        Path::Generic => generic::token_logprobs(rows, weight, targets, HEAD_CHUNK_ROWS),
    }
}

/// The generic forms: candle's differentiable tensor ops, and candle-nn's fused kernels
/// (`rms_norm`, `softmax_last_dim`, `rope`: CPU and CUDA forwards, no backward) and forwards of
/// tensor ops outside autograd (attention, a LoRA projection, the SwiGLU gate) wrapped in nodes
/// whose backward is written in tensor ops; on any device and dtype, with reductions in
/// [`accumulation_dtype`]. Every node returns gradients only for inputs that lead to a variable,
/// and gradients without a graph.
pub mod generic {
    use super::{accumulation_dtype, ATTENTION_PIECE_SCORES};
    use crate::dispatch::Path;
    use crate::dropout::DropoutMask;
    use candle_core::backend::BackendStorage;
    use candle_core::{
        bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
        Tensor, D,
    };
    use std::cell::Cell;
    use std::sync::Mutex;

    /// candle-nn's RMSNorm kernel (statistics in f32 for half dtypes, on the CPU and on CUDA),
    /// made differentiable by `KernelRmsNorm`.
    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let x = x.contiguous()?;
        let weight = weight.contiguous()?;
        let values = match x.dtype() {
            // candle-nn's CPU kernel has no f64 form; f64 is for gradient checks.
            DType::F64 => rms_norm_composed(&x.detach(), &weight.detach(), eps)?,
            _ => candle_nn::ops::rms_norm(&x.detach(), &weight.detach(), eps as f32)?,
        };
        if !(x.track_op() || weight.track_op()) {
            return Ok(values);
        }
        x.apply_op2(
            &weight,
            KernelRmsNorm {
                eps,
                values: Precomputed::new(values),
            },
        )
    }

    /// `x / rms(x) · weight` composed of small tensor ops, statistics in [`accumulation_dtype`]:
    /// the f64 values of [`rms_norm`], and the reference its kernel is tested against.
    fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(accumulation_dtype(dtype))?;
        x32.broadcast_mul(&inverse_rms(&x32, eps)?)?
            .to_dtype(dtype)?
            .broadcast_mul(weight)
    }

    /// `1 / sqrt(mean(x²) + eps)` over the last axis, kept as a size-1 axis.
    fn inverse_rms(x: &Tensor, eps: f64) -> Result<Tensor> {
        (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()
    }

    /// A node's `cpu_fwd` and `cuda_fwd` that hand over its [`Precomputed`] values (the field
    /// named first) and read none of their storages, for a custom op of as many operands as
    /// (storage, layout) names follow.
    macro_rules! precomputed_forward {
        ($values:tt; $($storage:ident $layout:ident),+) => {
            fn cpu_fwd(
                &self,
                $($storage: &CpuStorage, $layout: &Layout),+
            ) -> Result<(CpuStorage, Shape)> {
                self.$values.cpu()
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                $($storage: &candle_core::CudaStorage, $layout: &Layout),+
            ) -> Result<(candle_core::CudaStorage, Shape)> {
                self.$values.cuda()
            }
        };
    }

    /// A backward pass's operands without their graphs, and whether each leads to a variable.
    /// A product of a tensor that tracks its op gets a graph of its own, so a gradient computed
    /// from the operands as given would hold its intermediates (for attention, each piece's
    /// probabilities and their gradients) until candle's gradient store lets go of it.
    fn detached<const N: usize>(operands: [&Tensor; N]) -> ([Tensor; N], [bool; N]) {
        (operands.map(Tensor::detach), operands.map(Tensor::track_op))
    }

    /// A forward computed before its autograd node exists (by one of candle-nn's kernels, which
    /// have CPU and CUDA forms but no backward, or by tensor ops outside autograd), handed to
    /// the node by its forward pass. candle gives a custom op's forward only storages, so the
    /// node copies the values once (a device-side copy on CUDA); the forward takes them out, so
    /// the graph keeps the copy alone.
    struct Precomputed(Mutex<Option<Tensor>>);

    impl Precomputed {
        /// `values` must be a fresh output (contiguous from offset 0, its own buffer): the
        /// CPU copy takes the whole buffer.
        fn new(values: Tensor) -> Self {
            Self(Mutex::new(Some(values)))
        }

        fn take(&self) -> Result<Tensor> {
            let values = self.0.lock().expect("precomputed values lock").take();
            let Some(values) = values else {
                bail!("precomputed values handed over twice");
            };
            let layout = values.layout();
            if !(layout.is_contiguous() && layout.start_offset() == 0) {
                bail!("precomputed values must be a fresh contiguous tensor");
            }
            Ok(values)
        }

        fn cpu(&self) -> Result<(CpuStorage, Shape)> {
            let values = self.take()?;
            let (storage, layout) = values.storage_and_layout();
            match &*storage {
                Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
                _ => bail!("precomputed values are not on the CPU"),
            }
        }

        #[cfg(feature = "cuda")]
        fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
            let values = self.take()?;
            let (storage, layout) = values.storage_and_layout();
            match &*storage {
                Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
                _ => bail!("precomputed values are not on a CUDA device"),
            }
        }
    }

    /// [`rms_norm`]'s node: candle-nn's forward, a backward in tensor ops (statistics
    /// recomputed in [`accumulation_dtype`]) that returns a gradient only for an input that
    /// leads to a variable.
    struct KernelRmsNorm {
        eps: f64,
        values: Precomputed,
    }

    impl CustomOp2 for KernelRmsNorm {
        fn name(&self) -> &'static str {
            "kernel-rms-norm"
        }

        precomputed_forward!(values; _a _la, _b _lb);

        /// With `n = x / rms(x)` and `g` the output gradient: `∂weight = Σ_rows g·n`,
        /// `∂x = (g·weight − n · mean(g·weight·n)) / rms(x)`: one op
        /// ([`crate::norm_backward`]) for inputs of one dtype it takes, else (f64, for gradient
        /// checks) composed of tensor ops.
        fn bwd(
            &self,
            x: &Tensor,
            weight: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let ([x, weight, grad], [x_wanted, weight_wanted, _]) = detached([x, weight, grad]);
            let dtype = x.dtype();
            if crate::kernel_args::kernel_dtype(dtype)
                && weight.dtype() == dtype
                && grad.dtype() == dtype
            {
                let (x_grad, rows) = crate::norm_backward::rms_norm_backward(
                    &x,
                    &weight,
                    &grad,
                    self.eps,
                    weight_wanted,
                )?;
                let weight_grad = match rows {
                    Some(rows) => Some(column_sums(&rows)?.reshape(weight.shape())?),
                    None => None,
                };
                return Ok((x_wanted.then_some(x_grad), weight_grad));
            }
            let acc = accumulation_dtype(dtype);
            let x_acc = x.to_dtype(acc)?;
            let inv_rms = inverse_rms(&x_acc, self.eps)?;
            let normed = x_acc.broadcast_mul(&inv_rms)?;
            let grad = grad.to_dtype(acc)?;
            let x_grad = match x_wanted {
                true => {
                    let g_normed = grad.broadcast_mul(&weight.to_dtype(acc)?)?;
                    let projection = (&g_normed * &normed)?.mean_keepdim(D::Minus1)?;
                    let centred = (g_normed - normed.broadcast_mul(&projection)?)?;
                    Some(centred.broadcast_mul(&inv_rms)?.to_dtype(dtype)?)
                }
                false => None,
            };
            let weight_grad = match weight_wanted {
                true => {
                    let rows = (grad * normed)?.reshape(((), weight.elem_count()))?;
                    Some(
                        column_sums(&rows)?
                            .reshape(weight.shape())?
                            .to_dtype(weight.dtype())?,
                    )
                }
                false => None,
            };
            Ok((x_grad, weight_grad))
        }
    }

    /// The sums of the columns of `rows [n, width]`, as `ones [1, n] · rows`: candle's CUDA
    /// reduction over the first axis reads each column with a stride of the width (a block a
    /// column, uncoalesced), where cuBLAS reads the rows as they lie (f32 rounded to TF32 under
    /// --tf32, as every f32 product then is).
    fn column_sums(rows: &Tensor) -> Result<Tensor> {
        let ones = Tensor::ones((1, rows.dim(0)?), rows.dtype(), rows.device())?;
        crate::cuda_matmul::matmul(&ones, rows)
    }

    /// candle's `index_select`; its backward adds into a zeroed copy of the weight.
    pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(weight.dim(1)?);
        weight.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
    }

    /// The base product plus the adapter's two. With a frozen base weight (LoRA's case) one node,
    /// `LoraNode`, that keeps `x`, `a`, `b` and the `[n, rank]` low-rank product and, under a
    /// mask, draws the dropped-out input again in its backward pass. Composed of
    /// products and a sum ([`composed_lora_linear`], what a trained base weight takes), the graph
    /// keeps the sum's inputs, the base and the adapter outputs (2 · out elements a token: for
    /// Mistral-7B with adapters on all seven projections, 86,016 a layer), and under dropout
    /// each adapter's dropped-out copy of its input (38,912 a layer).
    pub fn lora_linear(
        x: &Tensor,
        weight: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dropout: Option<DropoutMask>,
    ) -> Result<Tensor> {
        if weight.track_op() {
            return composed_lora_linear(x, weight, a, b, dropout);
        }
        let (rows, dims) = rows_and_output_dims(x, weight.dim(0)?)?;
        let weight = weight.detach();
        let (values, low_rank) =
            lora_values(&rows.detach(), &weight, &a.detach(), &b.detach(), dropout)?;
        if ![&rows, a, b].iter().any(|t| t.track_op()) {
            return values.reshape(dims);
        }
        // The node takes `x` as it is and hands over values shaped `[.., out]`: reshapes outside
        // it would be nodes of their own (see [`linear`]).
        let node = LoraNode {
            weight,
            dropout,
            low_rank,
            values: Precomputed::new(values.reshape(dims)?),
        };
        x.apply_op3(a, b, node)
    }

    /// [`lora_linear`] composed of the dropout op, products and a sum: differentiable in all
    /// four inputs.
    pub fn composed_lora_linear(
        x: &Tensor,
        weight: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dropout: Option<DropoutMask>,
    ) -> Result<Tensor> {
        let adapter_input = match dropout {
            Some(mask) => crate::dropout(x, mask)?,
            None => x.clone(),
        };
        linear(x, weight)? + linear(&linear(&adapter_input, a)?, b)?
    }

    /// [`lora_linear`]'s node over `x [.., in]`, `a [rank, in]` and `b [out, rank]`, holding the
    /// frozen base weight `[out, in]`, the mask and the low-rank product `d(x) · aᵀ` `[n, rank]`
    /// (which `∂b` reads, as the composed form's product keeps it).
    struct LoraNode {
        weight: Tensor,
        dropout: Option<DropoutMask>,
        low_rank: Tensor,
        values: Precomputed,
    }

    /// `x` through the mask, when there is one (without a graph).
    fn adapter_input(x: &Tensor, dropout: Option<DropoutMask>) -> Result<Tensor> {
        match dropout {
            Some(mask) => crate::dropout::dropped_without_graph(x, mask),
            None => Ok(x.clone()),
        }
    }

    /// `x · weightᵀ + (d(x) · aᵀ) · bᵀ` by the composed form's products, in its order, and the
    /// low-rank product `d(x) · aᵀ`.
    fn lora_values(
        x: &Tensor,
        weight: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dropout: Option<DropoutMask>,
    ) -> Result<(Tensor, Tensor)> {
        let low_rank = crate::cuda_matmul::matmul(&adapter_input(x, dropout)?, &a.t()?)?;
        let values = (crate::cuda_matmul::matmul(x, &weight.t()?)?
            + crate::cuda_matmul::matmul(&low_rank, &b.t()?)?)?;
        Ok((values, low_rank))
    }

    impl CustomOp3 for LoraNode {
        fn name(&self) -> &'static str {
            "lora-linear"
        }

        precomputed_forward!(values; _x _lx, _a _la, _b _lb);

        /// The composed form's products on its operands: `∂low = g · b`, `∂b = (lowᵀ · g)ᵀ`,
        /// `∂a = (d(x)ᵀ · ∂low)ᵀ`, `∂x = g · weight + d(∂low · a)`, each only when its input
        /// leads to a variable (`d(x)` drawn again for `∂a`).
        fn bwd(
            &self,
            x: &Tensor,
            a: &Tensor,
            b: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let ([x, a, b, grad], [x_wanted, a_wanted, b_wanted, _]) = detached([x, a, b, grad]);
            let x_dims = x.dims().to_vec();
            let x = x.reshape(((), a.dim(1)?))?;
            let grad = grad.reshape(((), b.dim(0)?))?;
            let low_rank_grad = match x_wanted || a_wanted {
                true => Some(backward_product(&grad, &b)?),
                false => None,
            };
            let b_grad = match b_wanted {
                true => Some(backward_product(&self.low_rank.t()?, &grad)?.t()?),
                false => None,
            };
            let a_grad = match (a_wanted, &low_rank_grad) {
                (true, Some(low_rank_grad)) => {
                    let dropped_x = adapter_input(&x, self.dropout)?;
                    Some(backward_product(&dropped_x.t()?, low_rank_grad)?.t()?)
                }
                _ => None,
            };
            let x_grad = match (x_wanted, &low_rank_grad) {
                (true, Some(low_rank_grad)) => {
                    let base = backward_product(&grad, &self.weight)?;
                    let adapter =
                        adapter_input(&backward_product(low_rank_grad, &a)?, self.dropout)?;
                    Some((base + adapter)?.reshape(x_dims)?)
                }
                _ => None,
            };
            Ok((x_grad, a_grad, b_grad))
        }
    }

    /// A weight that is no variable and comes from no op (frozen) gets no gradient. One node
    /// (`Product` in its `Linear` form) over `x` and `weight` as they are: `x` reshaped to rows, the weight
    /// transposed and the output reshaped back would be three nodes more, and candle's backward
    /// adds every gradient a node passes back into a zeroed tensor of its size, a full pass over
    /// it each (`badd` kernels: about a quarter of a 1.1B bf16 DPO step's kernel time on an H200,
    /// 2026-12-04, with a weight-sized one per linear layer in full fine-tuning).
    pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        if !(x.track_op() || weight.track_op()) {
            let (rows, dims) = rows_and_output_dims(x, weight.dim(0)?)?;
            return crate::cuda_matmul::matmul(&rows, &weight.t()?)?.reshape(dims);
        }
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, Product::Linear)
    }

    /// `x [.., in]` as rows `[n, in]`, and the dims `[.., out]` of a linear layer's output.
    fn rows_and_output_dims(x: &Tensor, out: usize) -> Result<(Tensor, Vec<usize>)> {
        let mut dims = x.dims().to_vec();
        let last = dims.last_mut().expect("linear input has at least one dim");
        let inputs = std::mem::replace(last, out);
        Ok((x.reshape((x.elem_count() / inputs, inputs))?, dims))
    }

    thread_local! {
        /// Multiply-adds of the matrix products that the generic ops' backward passes ran on
        /// this thread (candle runs a backward pass on the thread that calls it).
        static BACKWARD_MULTIPLY_ADDS: Cell<u64> = const { Cell::new(0) };
    }

    /// The multiply-adds of the matrix products the generic ops' backward passes have run on this
    /// thread so far: what a LoRA backward saves is measured with it, deterministically.
    pub fn backward_multiply_adds() -> u64 {
        BACKWARD_MULTIPLY_ADDS.with(Cell::get)
    }

    /// `a · b` in a backward pass, counted.
    fn backward_product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (dims, k) = (a.dims(), b.dim(D::Minus2)?);
        let macs = (a.elem_count() / dims[dims.len() - 1] * k * b.dim(D::Minus1)?) as u64;
        BACKWARD_MULTIPLY_ADDS.with(|count| count.set(count.get() + macs));
        crate::cuda_matmul::matmul(a, b)
    }

    /// `a [.., m, k] · b [.., k, n]` (the same leading axes) by candle's own matrix product
    /// (cuBLAS on CUDA, whose operand layouts [`crate::cuda_matmul`] checks on every device, in
    /// the backward pass too), as a node whose backward computes only the gradients wanted. candle's
    /// matmul node differentiates both operands whatever they are, so under LoRA every frozen
    /// weight would get a full-size gradient (twice the backward products and a weight-sized
    /// buffer per layer), and the first layer's adapters an input gradient nothing reads.
    pub fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if !(a.track_op() || b.track_op()) {
            return crate::cuda_matmul::matmul(a, b);
        }
        a.apply_op2(b, Product::Stacks)
    }

    /// A matrix product node whose backward computes only the gradients wanted, in one of two
    /// forms.
    enum Product {
        /// `a [.., m, k] · b [.., k, n]`: `∂a = g · bᵀ`, `∂b = aᵀ · g`.
        Stacks,
        /// [`linear`]'s `x [.., in] · weightᵀ` with `weight [out, in]`, both contiguous, `x`'s
        /// rows and the transposed weight read in place: `∂x = g · weight` and `∂weight = gᵀ ·
        /// x`, each in its operand's shape.
        Linear,
    }

    /// `(batch, m, n, k)` of a product, its operands' layouts as the product reads them, and
    /// the output's shape.
    type ProductOperands = ((usize, usize, usize, usize), Layout, Layout, Shape);

    impl Product {
        fn operands(&self, a: &Layout, b: &Layout) -> Result<ProductOperands> {
            match self {
                Product::Stacks => {
                    let (bmnk, shape) = Self::stacks(a, b)?;
                    Ok((bmnk, a.clone(), b.clone(), shape))
                }
                Product::Linear => Self::linear(a, b),
            }
        }

        fn linear(x: &Layout, weight: &Layout) -> Result<ProductOperands> {
            let (out, inputs) = weight.shape().dims2()?;
            let dims = x.dims();
            if dims.last() != Some(&inputs) || !x.is_contiguous() || !weight.is_contiguous() {
                bail!(
                    "linear: x {dims:?} · weight {:?}ᵀ: not contiguous, or the widths differ",
                    weight.dims()
                );
            }
            let n = x.shape().elem_count() / inputs;
            let rows = Layout::contiguous_with_offset((n, inputs), x.start_offset());
            let mut out_dims = dims.to_vec();
            out_dims[dims.len() - 1] = out;
            let shape = Shape::from(out_dims);
            Ok(((1, n, out, inputs), rows, weight.transpose(0, 1)?, shape))
        }

        fn stacks(a: &Layout, b: &Layout) -> Result<((usize, usize, usize, usize), Shape)> {
            let (a_dims, b_dims) = (a.dims(), b.dims());
            let rank = a_dims.len();
            if rank < 2 || b_dims.len() != rank || a_dims[..rank - 2] != b_dims[..rank - 2] {
                bail!("product: {a_dims:?} · {b_dims:?}: not two stacks of matrices alike");
            }
            let (m, k, k2, n) = (
                a_dims[rank - 2],
                a_dims[rank - 1],
                b_dims[rank - 2],
                b_dims[rank - 1],
            );
            if k != k2 {
                bail!("product: {a_dims:?} · {b_dims:?}: inner widths differ");
            }
            let batch = a_dims[..rank - 2].iter().product();
            let mut out = a_dims.to_vec();
            out[rank - 1] = n;
            Ok(((batch, m, n, k), Shape::from(out)))
        }
    }

    impl CustomOp2 for Product {
        fn name(&self) -> &'static str {
            "product"
        }

        fn cpu_fwd(
            &self,
            a: &CpuStorage,
            la: &Layout,
            b: &CpuStorage,
            lb: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let (bmnk, la, lb, shape) = self.operands(la, lb)?;
            crate::cuda_matmul::check("product", &la, &lb)?;
            Ok((a.matmul(b, bmnk, &la, &lb)?, shape))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            a: &candle_core::CudaStorage,
            la: &Layout,
            b: &candle_core::CudaStorage,
            lb: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            let (bmnk, la, lb, shape) = self.operands(la, lb)?;
            Ok((a.matmul(b, bmnk, &la, &lb)?, shape))
        }

        /// The form's gradients, each only when its operand leads to a variable.
        fn bwd(
            &self,
            a: &Tensor,
            b: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let ([a, b, grad], [a_wanted, b_wanted, _]) = detached([a, b, grad]);
            let (a_grad, b_grad) = match self {
                Product::Stacks => (
                    a_wanted
                        .then(|| backward_product(&grad, &b.t()?))
                        .transpose()?,
                    b_wanted
                        .then(|| backward_product(&a.t()?, &grad))
                        .transpose()?,
                ),
                Product::Linear => {
                    let (out, inputs) = b.dims2()?;
                    let grad_rows = grad.reshape(((), out))?;
                    let x_grad = || backward_product(&grad_rows, &b)?.reshape(a.shape());
                    let weight_grad =
                        || backward_product(&grad_rows.t()?, &a.reshape(((), inputs))?);
                    (
                        a_wanted.then(x_grad).transpose()?,
                        b_wanted.then(weight_grad).transpose()?,
                    )
                }
            };
            Ok((a_grad, b_grad))
        }
    }

    /// `silu(gate) · up`, one node (`SiluMul`) that keeps `gate` and `up` and computes
    /// `silu(gate)` again in its backward pass. Composed of the two ops, the product would keep
    /// `silu(gate)` as well: a third `[.., intermediate]` tensor a token and layer, about a tenth
    /// of what a Llama-2-7B layer keeps.
    pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let values = composed_silu_mul(&gate.detach(), &up.detach())?;
        if !(gate.track_op() || up.track_op()) {
            return Ok(values);
        }
        gate.apply_op2(up, SiluMul(Precomputed::new(values)))
    }

    fn composed_silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    /// [`silu_mul`]'s node: the composed form's backward, with `silu(gate)` computed again.
    struct SiluMul(Precomputed);

    impl CustomOp2 for SiluMul {
        fn name(&self) -> &'static str {
            "silu-mul"
        }

        precomputed_forward!(0; _a _la, _b _lb);

        /// `∂up = g · silu(gate)`, `∂gate = g · up · silu′(gate)`, with candle's own `silu′ =
        /// σ · (1 − silu) + silu` and its order of ops, so that the gradients are the composed
        /// form's to the bit.
        fn bwd(
            &self,
            gate: &Tensor,
            up: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let ([gate, up, grad], [gate_wanted, up_wanted, _]) = detached([gate, up, grad]);
            let silu = gate.silu()?;
            let up_grad = match up_wanted {
                true => Some(grad.mul(&silu)?),
                false => None,
            };
            let gate_grad = match gate_wanted {
                true => {
                    let sigmoid = (gate.neg()?.exp()? + 1.)?.recip()?;
                    let derivative = ((&sigmoid * silu.affine(-1., 1.)?)? + &silu)?;
                    Some(grad.mul(&up)?.mul(&derivative)?)
                }
                false => None,
            };
            Ok((gate_grad, up_grad))
        }
    }

    /// `x [b, t, heads·d]` split into heads and rotated by [`rope`]: `[b, heads, t, d]`.
    pub fn rotary_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
        rope(&super::split_heads(x, heads)?, cos, sin)
    }

    /// [`super::rotary_attention`] with the kernels of `path`: one node, `RotaryAttention`,
    /// that keeps the three projections alone and computes the rotated heads and each piece's
    /// probabilities again in its backward pass. Composed of [`rotary_heads`], [`attention`]
    /// and the merge of the heads, a generic layer kept q and k three times (the projection,
    /// its copy split into heads, the rotated heads), v twice and the attention's output twice
    /// (before and after the merge): `3·heads·d + 3·kv_heads·d` elements a token more; the
    /// fused path's ops, which split and rotate in one op, kept `2·heads·d + 2·kv_heads·d`
    /// more. The only node of this module that also serves the fused path: there its forward
    /// and backward passes run the fused ops and their own backward forms
    /// (`crate::fused::rotary_heads_grad`, `crate::fused::attention_grads`). The composed
    /// form runs where nothing is differentiated, and where the tables are (the node gives
    /// them no gradient; the mask gets none on either form).
    pub fn rotary_attention(
        path: Path,
        rows: [&Tensor; 3],
        tables: [&Tensor; 2],
        mask: &Tensor,
        heads: (usize, usize),
        scale: f64,
    ) -> Result<Tensor> {
        rotary_attention_in_pieces(
            path,
            rows,
            tables,
            mask,
            heads,
            scale,
            ATTENTION_PIECE_SCORES,
        )
    }

    /// [`rotary_attention`] with pieces of at most `most_scores` scores (generic path).
    fn rotary_attention_in_pieces(
        path: Path,
        rows: [&Tensor; 3],
        [cos, sin]: [&Tensor; 2],
        mask: &Tensor,
        heads: (usize, usize),
        scale: f64,
        most_scores: usize,
    ) -> Result<Tensor> {
        let composed = |rows| {
            rotary_attention_composed(path, rows, [cos, sin], mask, heads, scale, most_scores)
        };
        let tables_tracked = cos.track_op() || sin.track_op();
        if tables_tracked || !rows.iter().any(|t| t.track_op()) {
            return composed(rows);
        }
        let [q, k, v] = rows;
        let values = composed([q, k, v].map(Tensor::detach).each_ref())?;
        q.apply_op3(
            k,
            v,
            RotaryAttention {
                path,
                tables: [cos, sin].map(Tensor::detach),
                mask: mask.detach(),
                heads,
                scale,
                most_scores,
                values: Precomputed::new(values),
            },
        )
    }

    /// [`rotary_attention`] composed of `path`'s ops (the rotary node on each of q and k, v
    /// split, the attention node, the heads merged): the node's values, and its form where it
    /// makes no node.
    fn rotary_attention_composed(
        path: Path,
        rows: [&Tensor; 3],
        [cos, sin]: [&Tensor; 2],
        mask: &Tensor,
        heads: (usize, usize),
        scale: f64,
        most_scores: usize,
    ) -> Result<Tensor> {
        match path {
            Path::Generic => super::composed_rotary_attention(
                rows,
                heads,
                |x, n| rotary_heads(x, cos, sin, n),
                |q, k, v| match [q, k, v].iter().any(|t| t.track_op()) {
                    true => recomputed_attention(q, k, v, mask, scale, most_scores),
                    false => attention_in_pieces(q, k, v, mask, scale, most_scores),
                },
            ),
            Path::Fused => super::composed_rotary_attention(
                rows,
                heads,
                |x, n| crate::fused::rotary_heads(x, cos, sin, n),
                |q, k, v| crate::fused::attention(q, k, v, mask, scale),
            ),
        }
    }

    /// [`rotary_attention`]'s node: the forward computed before it; a backward pass that
    /// splits and rotates q and k and splits v again, differentiates attention (as
    /// [`RecomputedAttention`] does, or as the fused attention op does), turns the gradients of
    /// q and k back (as [`KernelRope`]'s backward pass, or the fused rotary op's) and merges
    /// their heads, so that the gradients are the composed form's to the bit.
    struct RotaryAttention {
        path: Path,
        tables: [Tensor; 2],
        mask: Tensor,
        heads: (usize, usize),
        scale: f64,
        most_scores: usize,
        values: Precomputed,
    }

    impl CustomOp3 for RotaryAttention {
        fn name(&self) -> &'static str {
            "rotary-attention"
        }

        precomputed_forward!(values; _q _lq, _k _lk, _v _lv);

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let ([q, k, v, grad], [q_wanted, k_wanted, v_wanted, _]) = detached([q, k, v, grad]);
            let [cos, sin] = &self.tables;
            let (heads, kv_heads) = self.heads;
            let (b, t, width) = grad.dims3()?;
            // [b, heads, t, d], as the composed form's merge hands it back.
            let grad = grad
                .reshape((b, t, heads, width / heads))?
                .transpose(1, 2)?;
            let v = super::split_heads(&v, kv_heads)?;
            let (q_grad, k_grad, v_grad) = match self.path {
                Path::Generic => {
                    let grads = attention_backward(
                        [
                            &rotary_heads(&q, cos, sin, heads)?,
                            &rotary_heads(&k, cos, sin, kv_heads)?,
                            &v,
                        ],
                        &self.mask,
                        self.scale,
                        self.most_scores,
                        &grad,
                        Wanted {
                            q: q_wanted,
                            k: k_wanted,
                            v: v_wanted,
                        },
                    )?;
                    let opposite = sin.neg()?;
                    let turned_back = |g: Option<Tensor>| {
                        g.map(|g| super::merge_heads(&rope(&g, cos, &opposite)?))
                            .transpose()
                    };
                    (turned_back(grads.q)?, turned_back(grads.k)?, grads.v)
                }
                Path::Fused => {
                    let [q_grad, k_grad, v_grad] = crate::fused::attention_grads(
                        &crate::fused::rotary_heads(&q, cos, sin, heads)?,
                        &crate::fused::rotary_heads(&k, cos, sin, kv_heads)?,
                        &v,
                        &self.mask,
                        self.scale,
                        &grad,
                    )?;
                    let turned_back =
                        |g: Tensor, n| crate::fused::rotary_heads_grad(&g, cos, sin, n);
                    (
                        q_wanted.then(|| turned_back(q_grad, heads)).transpose()?,
                        k_wanted
                            .then(|| turned_back(k_grad, kv_heads))
                            .transpose()?,
                        v_wanted.then_some(v_grad),
                    )
                }
            };
            Ok((
                q_grad,
                k_grad,
                v_grad.map(|g| super::merge_heads(&g)).transpose()?,
            ))
        }
    }

    /// Rotary embedding (rotate-half layout) of `x [b, heads, t, d]` with `cos`/`sin`
    /// `[b, t, d/2]` or `[t, d/2]`: candle-nn's kernel, made differentiable by `KernelRope`.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, _, t, d) = x.dims4()?;
        for table in [cos, sin] {
            let dims = table.dims();
            if dims != [b, t, d / 2] && dims != [t, d / 2] {
                bail!("rope: table {dims:?} for x {:?}", x.dims());
            }
        }
        let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
        let values = candle_nn::rotary_emb::rope(&x.detach(), &cos.detach(), &sin.detach())?;
        if ![&x, &cos, &sin].iter().any(|t| t.track_op()) {
            return Ok(values);
        }
        x.apply_op3(&cos, &sin, KernelRope(Precomputed::new(values)))
    }

    /// [`rope`]'s node: candle-nn's forward, a backward in tensor ops that returns a gradient
    /// only for an input that leads to a variable (the model's tables never do).
    struct KernelRope(Precomputed);

    impl CustomOp3 for KernelRope {
        fn name(&self) -> &'static str {
            "kernel-rope"
        }

        precomputed_forward!(0; _a _la, _b _lb, _c _lc);

        /// `y₁ = x₁c − x₂s`, `y₂ = x₁s + x₂c` (halves of the last axis), so `∂x` is the rotation
        /// by the opposite angle, `rope(g, c, −s)` (the same kernel), and `∂c = Σ_heads g₁x₁ +
        /// g₂x₂`, `∂s = Σ_heads g₂x₁ − g₁x₂` (summed over the batch too for `[t, d/2]` tables).
        fn bwd(
            &self,
            x: &Tensor,
            cos: &Tensor,
            sin: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let ([x, cos, sin, grad], [x_wanted, cos_wanted, sin_wanted, _]) =
                detached([x, cos, sin, grad]);
            let x_grad = match x_wanted {
                true => Some(rope(&grad, &cos, &sin.neg()?)?),
                false => None,
            };
            if !(cos_wanted || sin_wanted) {
                return Ok((x_grad, None, None));
            }
            let half = x.dim(D::Minus1)? / 2;
            let halves = |t: &Tensor| -> Result<(Tensor, Tensor)> {
                Ok((
                    t.narrow(D::Minus1, 0, half)?,
                    t.narrow(D::Minus1, half, half)?,
                ))
            };
            let ((x1, x2), (g1, g2)) = (halves(&x)?, halves(&grad)?);
            // `[b, heads, t, d/2]` summed to the table's shape.
            let to_table = |per_head: Tensor, table: &Tensor| -> Result<Tensor> {
                let per_row = per_head.sum(1)?;
                match table.rank() {
                    2 => per_row.sum(0),
                    _ => Ok(per_row),
                }
            };
            let cos_grad = match cos_wanted {
                true => Some(to_table(((&g1 * &x1)? + (&g2 * &x2)?)?, &cos)?),
                false => None,
            };
            let sin_grad = match sin_wanted {
                true => Some(to_table(((&g2 * &x1)? - (&g1 * &x2)?)?, &sin)?),
                false => None,
            };
            Ok((x_grad, cos_grad, sin_grad))
        }
    }

    /// Softmax over the last axis: candle-nn's kernel, made differentiable by
    /// `KernelSoftmax`. The caller picks the dtype (attention upcasts half dtypes to f32).
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let values = candle_nn::ops::softmax_last_dim(&x.detach())?;
        if !x.track_op() {
            return Ok(values);
        }
        x.apply_op1(KernelSoftmax(Precomputed::new(values)))
    }

    /// [`softmax_last_dim`]'s node: candle-nn's forward, a backward in tensor ops from the
    /// output alone.
    struct KernelSoftmax(Precomputed);

    impl CustomOp1 for KernelSoftmax {
        fn name(&self) -> &'static str {
            "kernel-softmax-last-dim"
        }

        precomputed_forward!(0; _a _la);

        fn bwd(&self, _x: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let ([probs, grad], _) = detached([probs, grad]);
            Ok(Some(softmax_backward(&probs, &grad)?))
        }
    }

    /// The softmax's input gradient over the last axis from its output `p` and the output's
    /// gradient `g`: `p·g − p·Σ(p·g)`.
    fn softmax_backward(probs: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let weighted = (probs * grad)?;
        let total = weighted.sum_keepdim(D::Minus1)?;
        weighted - probs.broadcast_mul(&total)?
    }

    /// GQA without materialising repeated keys: the query heads that share a KV head are folded
    /// into the query axis. Softmax in [`accumulation_dtype`]. Queries in pieces of at most
    /// [`ATTENTION_PIECE_SCORES`] scores. Differentiable as one node, `RecomputedAttention`,
    /// which keeps no scores or probabilities for the backward pass: composed of tensor ops,
    /// every layer would keep five `[b, heads, tq, tk]` tensors (the scores, the masked scores
    /// and the probabilities in the compute dtype, the scores and the probabilities in f32), 14
    /// bytes a score in bf16, until the backward pass: for 8 sequences of 1,024 tokens on a
    /// 32-head model, 3.8 GB a layer.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        if ![q, k, v].iter().any(|t| t.track_op()) {
            return attention_in_pieces(q, k, v, mask, scale, ATTENTION_PIECE_SCORES);
        }
        recomputed_attention(q, k, v, mask, scale, ATTENTION_PIECE_SCORES)
    }

    /// [`attention`]'s node, with pieces of at most `most_scores` scores.
    fn recomputed_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
        most_scores: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let mask = mask.detach();
        let values = attention_in_pieces(
            &q.detach(),
            &k.detach(),
            &v.detach(),
            &mask,
            scale,
            most_scores,
        )?;
        q.apply_op3(
            &k,
            &v,
            RecomputedAttention {
                mask,
                scale,
                most_scores,
                values: Precomputed::new(values),
            },
        )
    }

    /// [`attention`]'s node: the forward computed before it, and a backward pass that computes
    /// each piece's probabilities again and differentiates the composed form's ops in its order
    /// (so the gradients are the composed form's, to the bit when there is one piece).
    struct RecomputedAttention {
        mask: Tensor,
        scale: f64,
        most_scores: usize,
        values: Precomputed,
    }

    impl CustomOp3 for RecomputedAttention {
        fn name(&self) -> &'static str {
            "recomputed-attention"
        }

        precomputed_forward!(values; _q _lq, _k _lk, _v _lv);

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let ([q, k, v, grad], [q_wanted, k_wanted, v_wanted, _]) = detached([q, k, v, grad]);
            let wanted = Wanted {
                q: q_wanted,
                k: k_wanted,
                v: v_wanted,
            };
            let grads = attention_backward(
                [&q, &k, &v],
                &self.mask,
                self.scale,
                self.most_scores,
                &grad,
                wanted,
            )?;
            Ok((grads.q, grads.k, grads.v))
        }
    }

    /// The gradients of [`attention`] for the output's gradient `grad` (all without a graph),
    /// a piece of at most `most_scores` scores at a time.
    fn attention_backward(
        [q, k, v]: [&Tensor; 3],
        mask: &Tensor,
        scale: f64,
        most_scores: usize,
        grad: &Tensor,
        wanted: Wanted,
    ) -> Result<AttentionGrads> {
        let (b, heads, tq, _) = q.dims4()?;
        let rows = piece_rows(b, heads, k.dim(2)?, most_scores);
        let sum = |total: Option<Tensor>, g: Option<Tensor>| match (total, g) {
            (Some(total), Some(g)) => (total + g).map(Some),
            (total, g) => Ok(total.or(g)),
        };
        let (mut q_grads, mut k_grad, mut v_grad) = (Vec::new(), None, None);
        for (start, len) in pieces(tq, rows) {
            let grads = AttentionGrads::of_piece(
                &q.narrow(2, start, len)?,
                [k, v],
                &mask_rows(mask, start, len)?,
                scale,
                &grad.narrow(2, start, len)?,
                wanted,
            )?;
            q_grads.extend(grads.q);
            k_grad = sum(k_grad, grads.k)?;
            v_grad = sum(v_grad, grads.v)?;
        }
        let q_grad = match q_grads.is_empty() {
            true => None,
            false => Some(Tensor::cat(&q_grads, 2)?),
        };
        Ok(AttentionGrads {
            q: q_grad,
            k: k_grad,
            v: v_grad,
        })
    }

    /// Which of attention's inputs lead to a variable.
    #[derive(Clone, Copy)]
    struct Wanted {
        q: bool,
        k: bool,
        v: bool,
    }

    /// The gradients of one piece of [`attention`] (those of its inputs that lead to a
    /// variable).
    struct AttentionGrads {
        q: Option<Tensor>,
        k: Option<Tensor>,
        v: Option<Tensor>,
    }

    impl AttentionGrads {
        /// `grad` the output's gradient for the query rows `q`, against all of `k` and `v`
        /// (all without a graph): [`attention_piece`]'s forward again, then the backward passes
        /// of its ops.
        fn of_piece(
            q: &Tensor,
            [k, v]: [&Tensor; 2],
            mask: &Tensor,
            scale: f64,
            grad: &Tensor,
            wanted: Wanted,
        ) -> Result<Self> {
            let (b, heads, tq, d) = q.dims4()?;
            let kv_heads = k.dim(1)?;
            let (dtype, acc) = (q.dtype(), accumulation_dtype(q.dtype()));
            let (scaled_q, probs) = attention_probs(q, k, mask, scale)?;
            let grad = grad.reshape((b, kv_heads, heads / kv_heads * tq, d))?;
            let v_grad = match wanted.v {
                true => Some(backward_product(&probs.to_dtype(dtype)?.t()?, &grad)?),
                false => None,
            };
            if !(wanted.q || wanted.k) {
                return Ok(Self {
                    q: None,
                    k: None,
                    v: v_grad,
                });
            }
            // The softmax's backward pass in the accumulation dtype.
            let probs_grad = backward_product(&grad, &v.t()?)?.to_dtype(acc)?;
            let scores_grad = softmax_backward(&probs, &probs_grad)?.to_dtype(dtype)?;
            let q_grad = match wanted.q {
                true => {
                    let q_grad = (backward_product(&scores_grad, k)? * scale)?;
                    Some(q_grad.reshape((b, heads, tq, d))?)
                }
                false => None,
            };
            let k_grad = match wanted.k {
                true => Some(backward_product(&scaled_q.t()?, &scores_grad)?.t()?),
                false => None,
            };
            Ok(Self {
                q: q_grad,
                k: k_grad,
                v: v_grad,
            })
        }
    }

    /// `(start, len)` of the pieces of at most `rows` query rows that cover `tq`.
    fn pieces(tq: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
        (0..tq)
            .step_by(rows)
            .map(move |start| (start, rows.min(tq - start)))
    }

    /// The mask's rows `start..start + len`: all of it when it broadcasts over the rows.
    fn mask_rows(mask: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        match mask.dim(2)? {
            1 => Ok(mask.clone()),
            _ => mask.narrow(2, start, len),
        }
    }

    /// Query rows per piece of attention: at most `most_scores` scores, at least one row.
    fn piece_rows(b: usize, heads: usize, tk: usize, most_scores: usize) -> usize {
        (most_scores / (b * heads * tk).max(1)).max(1)
    }

    /// [`attention`] with the query rows `q [b, heads, tq, d]` (and the mask's, unless it
    /// broadcasts over them) cut into pieces of at most `most_scores` scores each.
    fn attention_in_pieces(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
        most_scores: usize,
    ) -> Result<Tensor> {
        let (b, heads, tq, _) = q.dims4()?;
        let rows = piece_rows(b, heads, k.dim(2)?, most_scores);
        if tq <= rows {
            return attention_piece(q, k, v, mask, scale);
        }
        let outputs = pieces(tq, rows)
            .map(|(start, len)| {
                let mask = mask_rows(mask, start, len)?;
                attention_piece(&q.narrow(2, start, len)?, k, v, &mask, scale)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outputs, 2)
    }

    fn attention_piece(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, heads, tq, d) = q.dims4()?;
        let (_, probs) = attention_probs(q, k, mask, scale)?;
        // `v` as it comes: a KV cache's first positions are a strided view that the product reads
        // in place (a copy of it would be a copy of the cache per layer per decode step).
        product(&probs.to_dtype(q.dtype())?, v)?.reshape((b, heads, tq, d))
    }

    /// The queries scaled, `[b, kv_heads, group · tq, d]` (the query heads that share a KV head
    /// folded into the query axis), and `softmax(scale · q kᵀ + mask)`, `[b, kv_heads, group ·
    /// tq, tk]` in [`accumulation_dtype`].
    fn attention_probs(
        q: &Tensor,
        k: &Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (b, heads, tq, d) = q.dims4()?;
        let (kv_heads, tk) = (k.dim(1)?, k.dim(2)?);
        let group = heads / kv_heads;
        let scaled_q = (q.reshape((b, kv_heads, group * tq, d))? * scale)?;
        let scores = product(&scaled_q, &k.t()?)?.reshape((b, kv_heads, group, tq, tk))?;
        let scores = scores.broadcast_add(&mask.unsqueeze(1)?)?;
        let probs = softmax_last_dim(&scores.to_dtype(accumulation_dtype(q.dtype()))?)?
            .reshape((b, kv_heads, group * tq, tk))?;
        Ok((scaled_q, probs))
    }

    /// One chunk of `chunk × vocab` logits at a time, in the backward pass too: the values are
    /// computed outside autograd, and `ChunkedLogprobs` gives them a backward that recomputes
    /// each chunk's softmax. Logits and their softmax in [`accumulation_dtype`].
    pub fn token_logprobs(
        rows: &Tensor,
        weight: &Tensor,
        targets: &[u32],
        chunk: usize,
    ) -> Result<Tensor> {
        let chunks = LogprobChunks {
            targets: targets.to_vec(),
            chunk: chunk.max(1),
        };
        let values = chunks.values(&rows.detach(), &weight.detach())?;
        if !(rows.track_op() || weight.track_op()) {
            return Ok(values);
        }
        rows.apply_op2(
            weight,
            ChunkedLogprobs {
                chunks,
                values: Precomputed::new(values),
            },
        )
    }

    /// The rows of [`token_logprobs`], cut into chunks.
    struct LogprobChunks {
        targets: Vec<u32>,
        chunk: usize,
    }

    /// `log softmax(rows · weightᵀ)[target]` by chunks, as a node whose forward hands over the
    /// values computed beforehand and whose backward is written in tensor ops, so it runs on
    /// every device.
    struct ChunkedLogprobs {
        chunks: LogprobChunks,
        values: Precomputed,
    }

    impl LogprobChunks {
        /// `(start, len, targets [len, 1])` of each chunk of rows.
        fn spans(&self, device: &candle_core::Device) -> Result<Vec<(usize, usize, Tensor)>> {
            let n = self.targets.len();
            (0..n)
                .step_by(self.chunk)
                .map(|start| {
                    let len = self.chunk.min(n - start);
                    let index = Tensor::new(&self.targets[start..start + len], device)?;
                    Ok((start, len, index.unsqueeze(1)?))
                })
                .collect()
        }

        /// Log-softmax of one chunk's logits `[len, vocab]`, multiplied by `product` (the
        /// backward's recomputation counts its multiply-adds).
        fn log_probs(
            rows: &Tensor,
            weight: &Tensor,
            product: fn(&Tensor, &Tensor) -> Result<Tensor>,
        ) -> Result<Tensor> {
            let logits = product(rows, &weight.t()?)?;
            candle_nn::ops::log_softmax(
                &logits.to_dtype(accumulation_dtype(logits.dtype()))?,
                D::Minus1,
            )
        }

        fn values(&self, rows: &Tensor, weight: &Tensor) -> Result<Tensor> {
            let mut parts = Vec::new();
            for (start, len, index) in self.spans(rows.device())? {
                let logp = Self::log_probs(
                    &rows.narrow(0, start, len)?,
                    weight,
                    crate::cuda_matmul::matmul,
                )?;
                parts.push(logp.gather(&index, 1)?.squeeze(1)?);
            }
            Tensor::cat(&parts, 0)
        }
    }

    impl CustomOp2 for ChunkedLogprobs {
        fn name(&self) -> &'static str {
            "chunked-token-logprobs"
        }

        precomputed_forward!(values; _a _la, _b _lb);

        /// `∂logits = g · (onehot(target) − softmax)` chunk by chunk; `∂rows = ∂logits · W`,
        /// `∂W = Σ ∂logitsᵀ · rows`, each only when its input leads to a variable.
        fn bwd(
            &self,
            rows: &Tensor,
            weight: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (want_rows, want_weight) = (rows.track_op(), weight.track_op());
            let (rows, weight) = (rows.detach(), weight.detach());
            let grad = grad.detach();
            let vocab = weight.dim(0)?;
            let mut row_grads = Vec::new();
            let mut weight_grad: Option<Tensor> = None;
            for (start, len, index) in self.chunks.spans(rows.device())? {
                let chunk_rows = rows.narrow(0, start, len)?;
                let probs =
                    LogprobChunks::log_probs(&chunk_rows, &weight, backward_product)?.exp()?;
                let onehot = Tensor::zeros((len, vocab), probs.dtype(), probs.device())?
                    .scatter_add(
                        &index,
                        &Tensor::ones((len, 1), probs.dtype(), probs.device())?,
                        1,
                    )?;
                let g = grad
                    .narrow(0, start, len)?
                    .to_dtype(probs.dtype())?
                    .unsqueeze(1)?;
                let d_logits = (onehot - probs)?
                    .broadcast_mul(&g)?
                    .to_dtype(rows.dtype())?;
                if want_rows {
                    row_grads.push(backward_product(&d_logits, &weight)?);
                }
                if want_weight {
                    let part = backward_product(&d_logits.t()?, &chunk_rows)?;
                    weight_grad = Some(match weight_grad {
                        Some(sum) => (sum + part)?,
                        None => part,
                    });
                }
            }
            let row_grad = match want_rows {
                true => Some(Tensor::cat(&row_grads, 0)?),
                false => None,
            };
            Ok((row_grad, weight_grad))
        }
    }

    /// The candle-nn kernel wrappers: their backward against finite differences (f64), their
    /// values and gradients against the compositions of small ops they replace (f32), and no
    /// gradient for a frozen input.
    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::fused::tests::{compare_with_generic, values, weighted_finite_differences};
        use candle_core::Var;

        /// Attention in pieces of query rows (what a reward model's long rows take on a GPU)
        /// gives the values and gradients of attention in one piece: a causal mask cut with its
        /// rows, one that broadcasts over them kept whole, pieces of 2 rows and a last one of 1.
        #[test]
        fn attention_in_pieces_equals_attention_whole() {
            let (b, heads, kv_heads, t, d) = (2, 4, 2, 5, 4);
            let causal: Vec<f64> = (0..b * t * t)
                .map(|i| if i % t <= (i / t) % t { 0.0 } else { -1e9 })
                .collect();
            let causal = Tensor::from_vec(causal, (b, 1, t, t), &candle_core::Device::Cpu).unwrap();
            let padding = values(&[b, 1, 1, t], 64, 1.0, DType::F64);
            let q = Var::from_tensor(&values(&[b, heads, t, d], 60, 1.0, DType::F64)).unwrap();
            let k = Var::from_tensor(&values(&[b, kv_heads, t, d], 61, 1.0, DType::F64)).unwrap();
            let v = Var::from_tensor(&values(&[b, kv_heads, t, d], 62, 1.0, DType::F64)).unwrap();
            let w = values(&[b, heads, t, d], 63, 1.0, DType::F64);
            // Two query rows a piece: 2·4·5·2 scores.
            let two_rows = b * heads * t * 2;
            for mask in [&causal, &padding] {
                let whole = attention_in_pieces(&q, &k, &v, mask, 0.5, usize::MAX).unwrap();
                let pieces = attention_in_pieces(&q, &k, &v, mask, 0.5, two_rows).unwrap();
                let diff = (&whole - &pieces).unwrap().abs().unwrap();
                assert!(diff.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-15);
                let grads = |out: &Tensor| {
                    let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    [&q, &k, &v].map(|x| g.get(x.as_tensor()).unwrap().clone())
                };
                for (a, b) in grads(&whole).iter().zip(grads(&pieces).iter()) {
                    let diff = (a - b).unwrap().abs().unwrap();
                    assert!(diff.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-14);
                }
            }
        }

        /// The rotary composition the kernel replaced: `x·cos + rotate_half(x)·sin` with
        /// half-width tables `[b, t, d/2]`.
        fn composed_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
            let half = x.dim(D::Minus1).unwrap() / 2;
            let full = |t: &Tensor| {
                Tensor::cat(&[t, t], D::Minus1)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap()
            };
            let (first, second) = (
                x.narrow(D::Minus1, 0, half).unwrap(),
                x.narrow(D::Minus1, half, half).unwrap(),
            );
            let rotated = Tensor::cat(&[&second.neg().unwrap(), &first], D::Minus1).unwrap();
            (x.broadcast_mul(&full(cos)).unwrap() + rotated.broadcast_mul(&full(sin)).unwrap())
                .unwrap()
        }

        fn tables(b: usize, t: usize, half: usize, dtype: DType) -> [Tensor; 2] {
            let angles = values(&[b, t, half], 20, 2.0, DType::F64);
            [angles.cos().unwrap(), angles.sin().unwrap()].map(|t| t.to_dtype(dtype).unwrap())
        }

        #[test]
        fn kernel_rms_norm_gradients_match_finite_differences_in_f64() {
            let inputs = [
                values(&[2, 3, 5], 10, 1.0, DType::F64),
                values(&[5], 11, 1.0, DType::F64),
            ];
            let worst = weighted_finite_differences(&inputs, &[0, 1], 12, |t| {
                rms_norm(&t[0], &t[1], 1e-5).unwrap()
            });
            assert!(worst < 1e-6, "{worst:e}");
        }

        #[test]
        fn kernel_rope_gradients_match_finite_differences_in_f64() {
            // Batched tables (the model's), and one table for the whole batch.
            let [cos, sin] = tables(2, 3, 2, DType::F64);
            let x = values(&[2, 3, 3, 4], 21, 1.0, DType::F64);
            for (cos, sin) in [
                (cos.clone(), sin.clone()),
                (cos.get(1).unwrap(), sin.get(0).unwrap()),
            ] {
                let inputs = [x.clone(), cos, sin];
                let worst = weighted_finite_differences(&inputs, &[0, 1, 2], 22, |t| {
                    rope(&t[0], &t[1], &t[2]).unwrap()
                });
                assert!(worst < 1e-6, "{worst:e}");
            }
        }

        #[test]
        fn kernel_softmax_gradients_match_finite_differences_in_f64() {
            let inputs = [values(&[2, 3, 7], 30, 3.0, DType::F64)];
            let worst = weighted_finite_differences(&inputs, &[0], 31, |t| {
                softmax_last_dim(&t[0]).unwrap()
            });
            assert!(worst < 1e-6, "{worst:e}");
        }

        /// In f32 each kernel is as close to the truth (the composition in f64) as the
        /// composition of small ops it replaces is in f32, in value and every gradient.
        #[test]
        fn kernels_match_the_compositions_they_replace_in_f32() {
            let rms_inputs = [
                values(&[3, 50, 64], 40, 2.0, DType::F64),
                values(&[64], 41, 1.0, DType::F64),
            ];
            compare_with_generic(
                &rms_inputs,
                2.0,
                |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
                |t| rms_norm_composed(&t[0], &t[1], 1e-6).unwrap(),
            );
            let [cos, sin] = tables(3, 17, 8, DType::F64);
            let rope_inputs = [values(&[3, 4, 17, 16], 42, 1.0, DType::F64), cos, sin];
            compare_with_generic(
                &rope_inputs,
                2.0,
                |t| rope(&t[0], &t[1], &t[2]).unwrap(),
                |t| composed_rope(&t[0], &t[1], &t[2]),
            );
            let scores = [values(&[3, 4, 29, 29], 43, 4.0, DType::F64)];
            compare_with_generic(
                &scores,
                2.0,
                |t| softmax_last_dim(&t[0]).unwrap(),
                |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
            );
        }

        #[test]
        fn frozen_inputs_of_the_kernels_get_no_gradient() {
            let x = Var::from_tensor(&values(&[2, 3, 4, 6], 50, 1.0, DType::F64)).unwrap();
            let weight = values(&[6], 51, 1.0, DType::F64);
            let [cos, sin] = tables(2, 4, 3, DType::F64);
            let normed = rms_norm(x.as_tensor(), &weight, 1e-5).unwrap();
            let rotated = rope(&normed, &cos, &sin).unwrap();
            let probs = softmax_last_dim(&rotated).unwrap();
            let grads = (probs * values(&[2, 3, 4, 6], 52, 1.0, DType::F64))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(grads.get(x.as_tensor()).is_some());
            for (name, frozen) in [("weight", &weight), ("cos", &cos), ("sin", &sin)] {
                assert!(
                    grads.get(frozen).is_none(),
                    "the frozen {name} got a gradient"
                );
            }
            // With nothing to differentiate there is no node: the kernel's values as they are.
            let plain = rms_norm(&x.as_tensor().detach(), &weight, 1e-5).unwrap();
            assert!(!plain.track_op());
        }

        /// A causal mask `[b, 1, t, t]` and a padding mask `[b, 1, 1, t]` (the last position of
        /// the second sequence hidden) for `b` = 2, in `dtype`.
        fn masks(t: usize, dtype: DType) -> [Tensor; 2] {
            let cpu = &candle_core::Device::Cpu;
            let causal: Vec<f64> = (0..2 * t * t)
                .map(|i| if i % t <= (i / t) % t { 0.0 } else { -1e9 })
                .collect();
            let padding: Vec<f64> = (0..2 * t)
                .map(|i| if i == 2 * t - 1 { -1e9 } else { 0.0 })
                .collect();
            [
                Tensor::from_vec(causal, (2, 1, t, t), cpu).unwrap(),
                Tensor::from_vec(padding, (2, 1, 1, t), cpu).unwrap(),
            ]
            .map(|m| m.to_dtype(dtype).unwrap())
        }

        /// `t`'s elements as f64 bits (so that −0 and +0 differ).
        fn bits(t: &Tensor) -> Vec<u64> {
            let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            t.to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        }

        /// The attention node keeps no probabilities and computes them again in its backward
        /// pass, differentiating the composed form's ops in its order: its values and
        /// gradients are the composed form's to the bit in f32, bf16 and f64 with one piece of
        /// query rows, and within rounding with pieces of 2 rows (the keys' and values'
        /// gradients then add the pieces in another order). An input that leads to no variable
        /// gets no gradient (v alone; q; q and k: the first layer's attention under LoRA on
        /// some projections), and no gradient carries a graph.
        #[test]
        fn recomputed_attention_equals_the_composed_form() {
            let (b, heads, kv_heads, t, d) = (2, 4, 2, 5, 8);
            for dtype in [DType::F32, DType::BF16, DType::F64] {
                let vars = [
                    values(&[b, heads, t, d], 70, 1.0, dtype),
                    values(&[b, kv_heads, t, d], 71, 1.0, dtype),
                    values(&[b, kv_heads, t, d], 72, 1.0, dtype),
                ]
                .map(|x| Var::from_tensor(&x).unwrap());
                let w = values(&[b, heads, t, d], 73, 1.0, dtype);
                for mask in masks(t, dtype) {
                    for frozen in [
                        [false; 3],
                        [false, false, true],
                        [true, false, false],
                        [true, true, false],
                    ] {
                        let inputs: [Tensor; 3] = std::array::from_fn(|i| match frozen[i] {
                            true => vars[i].as_tensor().detach(),
                            false => vars[i].as_tensor().clone(),
                        });
                        let [q, k, v] = &inputs;
                        let run = |out: Tensor| {
                            let loss = (&out * &w).unwrap().sum_all().unwrap();
                            let grads = loss.backward().unwrap();
                            let got = inputs.each_ref().map(|x| grads.get(x));
                            for (i, g) in got.iter().enumerate() {
                                assert_eq!(
                                    g.is_none(),
                                    frozen[i],
                                    "{dtype:?}: input {i}'s gradient"
                                );
                                assert!(
                                    !g.is_some_and(|g| g.track_op()),
                                    "input {i}'s gradient has a graph"
                                );
                            }
                            let grads: Vec<Vec<u64>> =
                                got.iter().flatten().map(|g| bits(g)).collect();
                            (bits(&out), grads)
                        };
                        let composed =
                            run(attention_in_pieces(q, k, v, &mask, 0.3, usize::MAX).unwrap());
                        let one_piece = recomputed_attention(q, k, v, &mask, 0.3, usize::MAX);
                        assert_eq!(
                            run(one_piece.unwrap()),
                            composed,
                            "{dtype:?}, frozen {frozen:?}"
                        );
                        // Two query rows a piece: 2·4·5·2 scores.
                        let pieces = recomputed_attention(q, k, v, &mask, 0.3, b * heads * t * 2);
                        let pieces = run(pieces.unwrap());
                        let tolerance = match dtype {
                            DType::F64 => 1e-14,
                            DType::F32 => 1e-6,
                            _ => 2e-2,
                        };
                        let all = |r: &(Vec<u64>, Vec<Vec<u64>>)| {
                            let grads = r.1.iter().flatten();
                            r.0.iter()
                                .chain(grads)
                                .map(|&x| f64::from_bits(x))
                                .collect::<Vec<f64>>()
                        };
                        let (got, want) = (all(&pieces), all(&composed));
                        assert_eq!(got.len(), want.len());
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= tolerance * (1.0 + w.abs()),
                                "{dtype:?}: {g} against {w}"
                            );
                        }
                    }
                }
            }
        }

        #[test]
        fn recomputed_attention_gradients_match_finite_differences_in_f64() {
            let (b, heads, kv_heads, t, d) = (2, 4, 2, 5, 4);
            for mask in masks(t, DType::F64) {
                let inputs = [
                    values(&[b, heads, t, d], 74, 1.0, DType::F64),
                    values(&[b, kv_heads, t, d], 75, 1.0, DType::F64),
                    values(&[b, kv_heads, t, d], 76, 1.0, DType::F64),
                ];
                for most_scores in [usize::MAX, b * heads * t * 2] {
                    let worst = weighted_finite_differences(&inputs, &[0, 1, 2], 77, |x| {
                        recomputed_attention(&x[0], &x[1], &x[2], &mask, 0.5, most_scores).unwrap()
                    });
                    assert!(worst < 1e-6, "{worst:e}");
                }
            }
        }

        /// With a frozen base weight the LoRA op is one node equal to the composed form (the
        /// dropout op, products and a sum) to the bit in its values and every gradient, in f32,
        /// bf16 and f64, with and without a mask: with the input trained, and with the input
        /// frozen too (the first layer's adapters); no gradient carries a graph. A trained base
        /// weight takes the composed form and gets its gradient.
        #[test]
        fn lora_linear_equals_the_composed_form() {
            let mask = DropoutMask::new(crate::dropout_key(7), 4321, 0.3).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F64] {
                let x = Var::from_tensor(&values(&[3, 7, 24], 80, 1.0, dtype)).unwrap();
                let w = values(&[20, 24], 81, 0.2, dtype);
                let a = Var::from_tensor(&values(&[4, 24], 82, 0.2, dtype)).unwrap();
                let b = Var::from_tensor(&values(&[20, 4], 83, 0.2, dtype)).unwrap();
                let out_weights = values(&[3, 7, 20], 84, 1.0, dtype);
                for (dropout, x_trained) in [None, Some(mask)]
                    .into_iter()
                    .flat_map(|d| [(d, true), (d, false)])
                {
                    let input = match x_trained {
                        true => x.as_tensor().clone(),
                        false => x.as_tensor().detach(),
                    };
                    let run = |y: Tensor| {
                        let loss = (&y * &out_weights).unwrap().sum_all().unwrap();
                        let grads = loss.backward().unwrap();
                        assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
                        let wanted = [&input, a.as_tensor(), b.as_tensor()];
                        let grads = wanted.map(|v| grads.get(v));
                        assert!(
                            grads.iter().flatten().all(|g| !g.track_op()),
                            "a gradient has a graph"
                        );
                        (bits(&y), grads.map(|g| g.map(bits)))
                    };
                    let ours = run(lora_linear(&input, &w, &a, &b, dropout).unwrap());
                    let reference = run(composed_lora_linear(&input, &w, &a, &b, dropout).unwrap());
                    assert_eq!(
                        ours.1[0].is_some(),
                        x_trained,
                        "{dtype:?}: the input's gradient"
                    );
                    let case = format!(
                        "{dtype:?}, dropout {}, input trained {x_trained}",
                        dropout.is_some()
                    );
                    assert_eq!(ours, reference, "{case}");
                }
                let trained_w = Var::from_tensor(&w).unwrap();
                let y = lora_linear(x.as_tensor(), &trained_w, &a, &b, Some(mask)).unwrap();
                let grads = y.sum_all().unwrap().backward().unwrap();
                assert!(
                    grads.get(trained_w.as_tensor()).is_some(),
                    "a trained base weight's gradient"
                );
            }
        }

        /// `out` weighted by `w` and summed, differentiated: `out`'s bits and those of each
        /// input's gradient (`None` for an input that got none). For one of our nodes (`ours`)
        /// after checking that no gradient carries a graph; for candle's own ops, whose backward
        /// passes may leave one (that of `silu` does) and give a gradient to an input that leads
        /// to no variable too (that of a product does), `None` for such an input.
        fn bits_of_gradients<const N: usize>(
            out: &Tensor,
            w: &Tensor,
            inputs: [&Tensor; N],
            ours: bool,
        ) -> (Vec<u64>, [Option<Vec<u64>>; N]) {
            let grads = (out * w).unwrap().sum_all().unwrap().backward().unwrap();
            let got = inputs.map(|x| grads.get(x).filter(|_| ours || x.track_op()));
            assert!(
                !ours || got.iter().flatten().all(|g| !g.track_op()),
                "a gradient has a graph"
            );
            (bits(out), got.map(|g| g.map(bits)))
        }

        /// The rotary attention node keeps the three projections alone and splits and rotates
        /// them again in its backward pass: its values and gradients are those of its composed
        /// form to the bit. On the generic path (the rotary node on each of q and k, v split, the
        /// attention node, the heads merged) in f32, bf16 and f64, with pieces of query rows or
        /// one; on the fused path (its rotary and attention ops) in f32, bf16 and f64; with
        /// causal and padding masks, GQA, and inputs that lead to no variable (v; k; q; q and
        /// k); no gradient carries a graph. Tables that are differentiated take the composed
        /// form and, on the generic path, get their gradients.
        #[test]
        fn rotary_attention_equals_the_composed_form() {
            // GQA; as many KV heads as query heads; one head of one position (the merge of the
            // heads is then a view of the attention's output).
            for (b, heads, kv_heads, t, d) in [(2, 4, 2, 5, 8), (2, 2, 2, 3, 4), (2, 1, 1, 1, 4)] {
                for path in [Path::Generic, Path::Fused] {
                    rotary_attention_in_shape(path, b, (heads, kv_heads), t, d);
                }
            }
        }

        /// `mask` as `path`'s attention takes it: the fused op takes a mask of every query row.
        fn full_mask(path: Path, mask: Tensor) -> Tensor {
            match path {
                Path::Generic => mask,
                Path::Fused => {
                    let t = mask.dim(3).unwrap();
                    mask.broadcast_as((2, 1, t, t))
                        .unwrap()
                        .contiguous()
                        .unwrap()
                }
            }
        }

        fn rotary_attention_in_shape(
            path: Path,
            b: usize,
            split: (usize, usize),
            t: usize,
            d: usize,
        ) {
            let (heads, kv_heads) = split;
            // One piece, and (generic) two query rows a piece (2·4·5·2 scores).
            let piece_sizes = match path {
                Path::Generic => &[usize::MAX, b * heads * t * 2][..],
                Path::Fused => &[usize::MAX],
            };
            for dtype in [DType::F32, DType::BF16, DType::F64] {
                let vars = [
                    values(&[b, t, heads * d], 90, 1.0, dtype),
                    values(&[b, t, kv_heads * d], 91, 1.0, dtype),
                    values(&[b, t, kv_heads * d], 92, 1.0, dtype),
                ]
                .map(|x| Var::from_tensor(&x).unwrap());
                let w = values(&[b, t, heads * d], 93, 1.0, dtype);
                let [cos, sin] = tables(b, t, d / 2, dtype);
                for mask in masks(t, dtype) {
                    let mask = full_mask(path, mask);
                    for frozen in [
                        [false; 3],
                        [false, false, true],
                        [false, true, false],
                        [true, false, false],
                        [true, true, false],
                    ] {
                        let inputs: [Tensor; 3] = std::array::from_fn(|i| match frozen[i] {
                            true => vars[i].as_tensor().detach(),
                            false => vars[i].as_tensor().clone(),
                        });
                        let rows = inputs.each_ref();
                        for &most_scores in piece_sizes {
                            let node = rotary_attention_in_pieces(
                                path,
                                rows,
                                [&cos, &sin],
                                &mask,
                                split,
                                0.3,
                                most_scores,
                            )
                            .unwrap();
                            let composed = rotary_attention_composed(
                                path,
                                rows,
                                [&cos, &sin],
                                &mask,
                                split,
                                0.3,
                                most_scores,
                            );
                            let ours = bits_of_gradients(&node, &w, rows, true);
                            let case = format!(
                                "{}, {dtype:?}, frozen {frozen:?}, {most_scores}",
                                path.name()
                            );
                            for (i, g) in ours.1.iter().enumerate() {
                                assert_eq!(g.is_none(), frozen[i], "{case}: input {i}");
                            }
                            let composed = bits_of_gradients(&composed.unwrap(), &w, rows, true);
                            assert_eq!(ours, composed, "{case}");
                        }
                    }
                }
                // The fused rotary op differentiates no table.
                if path == Path::Fused {
                    continue;
                }
                let tracked_cos = Var::from_tensor(&cos).unwrap();
                let rows = vars.each_ref().map(|v| v.as_tensor());
                let mask = &masks(t, dtype)[0];
                let out = rotary_attention(path, rows, [&tracked_cos, &sin], mask, split, 0.3);
                let (_, [cos_grad]) =
                    bits_of_gradients(&out.unwrap(), &w, [tracked_cos.as_tensor()], true);
                assert!(
                    cos_grad.is_some(),
                    "{}, {dtype:?}: a differentiated table's gradient",
                    path.name()
                );
            }
        }

        #[test]
        fn rotary_attention_gradients_match_finite_differences_in_f64() {
            let (b, heads, kv_heads, t, d) = (2, 4, 2, 5, 4);
            let [cos, sin] = tables(b, t, d / 2, DType::F64);
            for mask in masks(t, DType::F64) {
                let inputs = [
                    values(&[b, t, heads * d], 94, 1.0, DType::F64),
                    values(&[b, t, kv_heads * d], 95, 1.0, DType::F64),
                    values(&[b, t, kv_heads * d], 96, 1.0, DType::F64),
                ];
                for (path, most_scores) in [
                    (Path::Generic, usize::MAX),
                    (Path::Generic, b * heads * t * 2),
                    (Path::Fused, usize::MAX),
                ] {
                    let mask = full_mask(path, mask.clone());
                    let worst = weighted_finite_differences(&inputs, &[0, 1, 2], 97, |x| {
                        rotary_attention_in_pieces(
                            path,
                            [&x[0], &x[1], &x[2]],
                            [&cos, &sin],
                            &mask,
                            (heads, kv_heads),
                            0.5,
                            most_scores,
                        )
                        .unwrap()
                    });
                    assert!(worst < 1e-6, "{}: {worst:e}", path.name());
                }
            }
        }

        /// The SwiGLU node keeps `gate` and `up` alone: its values and gradients are the two
        /// ops' to the bit in f32, bf16 and f64, with either input frozen; no gradient carries
        /// a graph.
        #[test]
        fn silu_mul_equals_the_composed_form() {
            for dtype in [DType::F32, DType::BF16, DType::F64] {
                let vars = [
                    values(&[3, 5, 16], 100, 3.0, dtype),
                    values(&[3, 5, 16], 101, 1.0, dtype),
                ]
                .map(|x| Var::from_tensor(&x).unwrap());
                let w = values(&[3, 5, 16], 102, 1.0, dtype);
                for frozen in [[false, false], [true, false], [false, true]] {
                    let inputs: [Tensor; 2] = std::array::from_fn(|i| match frozen[i] {
                        true => vars[i].as_tensor().detach(),
                        false => vars[i].as_tensor().clone(),
                    });
                    let [gate, up] = &inputs;
                    let node = silu_mul(gate, up).unwrap();
                    assert!(node.track_op());
                    let ours = bits_of_gradients(&node, &w, [gate, up], true);
                    let composed = composed_silu_mul(gate, up).unwrap();
                    let case = format!("{dtype:?}, frozen {frozen:?}");
                    for (i, g) in ours.1.iter().enumerate() {
                        assert_eq!(g.is_none(), frozen[i], "{case}: input {i}");
                    }
                    let composed = bits_of_gradients(&composed, &w, [gate, up], false);
                    assert_eq!(ours, composed, "{case}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::generic;
    use candle_core::{DType, Device, Tensor, Var};

    fn values(shape: (usize, usize), seed: u32) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_on_the_generic_path() {
        let x = Var::from_tensor(&values((5, 7), 1)).unwrap();
        let frozen = values((3, 7), 2);
        let trained = Var::from_tensor(&frozen).unwrap();
        let y = generic::linear(x.as_tensor(), &frozen).unwrap();
        let expected = x.as_tensor().matmul(&frozen.t().unwrap()).unwrap();
        let diff = (&y - &expected).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        assert!(
            grads.get(&frozen).is_none(),
            "the frozen weight got a gradient"
        );
        // x's gradient is what the plain product gives, where the weight is a variable.
        let y2 = generic::linear(x.as_tensor(), trained.as_tensor()).unwrap();
        let grads2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads2.get(trained.as_tensor()).is_some());
        let (gx, gx2) = (
            grads.get(x.as_tensor()).unwrap(),
            grads2.get(x.as_tensor()).unwrap(),
        );
        let diff = (gx - gx2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            diff.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                < 1e-5
        );
    }

    /// A linear layer over a batch of sequences (`[b, t, in]`) is one node between its operands,
    /// with no reshape or transpose nodes around it (each would cost the backward a full-size
    /// add), plain or LoRA-adapted; its gradients are candle's own matmul's.
    #[test]
    fn a_linear_layer_is_one_node_with_candles_gradients() {
        let x = Var::from_tensor(&values((6, 7), 3).reshape((2, 3, 7)).unwrap()).unwrap();
        let weight = Var::from_tensor(&values((4, 7), 4)).unwrap();
        let y = generic::linear(x.as_tensor(), weight.as_tensor()).unwrap();
        assert_eq!(y.dims(), [2, 3, 4]);
        // y, x and the weight.
        assert_eq!(y.sorted_nodes().len(), 3);
        let out_weights = values((6, 4), 5).reshape((2, 3, 4)).unwrap();
        let loss = (&y * &out_weights).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let plain = x
            .as_tensor()
            .broadcast_matmul(&weight.as_tensor().t().unwrap())
            .unwrap();
        let plain_grads = (&plain * &out_weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &weight] {
            let (got, want) = (
                grads.get(var.as_tensor()).unwrap(),
                plain_grads.get(var.as_tensor()).unwrap(),
            );
            assert_eq!(got.dims(), var.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
        let (a, b) = (
            Var::from_tensor(&values((2, 7), 6)).unwrap(),
            Var::from_tensor(&values((4, 2), 7)).unwrap(),
        );
        let frozen = weight.as_tensor().detach();
        let adapted =
            generic::lora_linear(x.as_tensor(), &frozen, a.as_tensor(), b.as_tensor(), None)
                .unwrap();
        assert_eq!(adapted.dims(), [2, 3, 4]);
        // adapted, x, a and b.
        assert_eq!(adapted.sorted_nodes().len(), 4);
        let grads = (&adapted * &out_weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), [2, 3, 7]);
    }

    /// The chunked generic head's hand-written backward against finite differences (f64), with
    /// chunks of 2 rows (the last partial, the weight gradient summed over chunks), and a frozen
    /// weight that gets no gradient.
    #[test]
    fn chunked_token_logprobs_gradients_match_finite_differences_in_f64() {
        use crate::fused::tests::{values, weighted_finite_differences};
        let targets = [3u32, 0, 6, 6, 2];
        let inputs = [
            values(&[5, 4], 1, 1.0, DType::F64),
            values(&[7, 4], 2, 1.0, DType::F64),
        ];
        let worst = weighted_finite_differences(&inputs, &[0, 1], 3, |t| {
            generic::token_logprobs(&t[0], &t[1], &targets, 2).unwrap()
        });
        assert!(worst < 1e-6, "{worst:e}");
        let rows = Var::from_tensor(&inputs[0]).unwrap();
        let logp = generic::token_logprobs(rows.as_tensor(), &inputs[1], &targets, 2).unwrap();
        let grads = logp.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(rows.as_tensor()).is_some());
        assert!(
            grads.get(&inputs[1]).is_none(),
            "the frozen head got a gradient"
        );
    }
}
