//! The model's ops, and the one rule that picks how each runs.
//!
//! Every op has up to three forms, found side by side through [`ops`]:
//! * **generic** ([`ops::generic`]): composed from candle's differentiable tensor ops; runs on
//!   every device and dtype (this is the graph CUDA runs) and is the reference the others are
//!   tested against;
//! * **fused** (`fused/`): one candle `CustomOp` per op with its own backward, on the CPU in
//!   f32/f64, fewer autograd nodes and passes over memory (the CPU training path);
//! * **host** ([`host`]): plain-slice f32 kernels of the CPU decode step, each output computed by
//!   a fixed sequence of operations so generated text does not depend on the batch.
//!
//! The generic ops' matrix products refuse, on every device, the operand layouts that candle's
//! CUDA matmul refuses ([`cuda_matmul`]), so the CPU tests of the generic path fail where a GPU
//! would.
//!
//! The rule in `dispatch` alone decides between fused/host and generic, from the device, the dtype
//! and the process setting (`OPTUNE_KERNELS=fused|generic`, or a tool's `--kernels`).

pub mod cache_write;
mod cached_attention;
pub mod cuda_matmul;
pub mod dispatch;
mod dropout;
pub mod forward_only;
mod fused;
mod grad_buffers;
pub mod host;
mod kernel_args;
mod matmul;
mod norm_backward;
mod op_rules;
pub mod ops;
pub mod optimizer;
pub mod runtime;
mod sampling;
mod simd;
pub mod storage;
mod token_tables;

pub use cached_attention::cached_attention;
pub use dispatch::{autograd_path, decode_path, kernels, path_for, set_kernels, Kernels, Path};
pub use dropout::{dropout, dropout_key, DropoutMask};
pub use grad_buffers::GradBuffers;
pub use matmul::{
    bf16_products, bf16_products_available, f32_product_precision, matmul_bf16, matmul_bf16_packed,
    set_f32_product_precision, Bf16Products, Bf16Source, Mat, PackedRhs, ProductPrecision,
};
pub use ops::{
    accumulation_dtype, add_rms_norm, embedding, linear, lora_linear, rms_norm, rotary_attention,
    silu_mul, silu_mul_halves, sum_all, token_logprobs, Pass, ATTENTION_PIECE_SCORES,
    HEAD_CHUNK_ROWS, KEPT_LOGITS_BYTES,
};
pub use sampling::{sample_rows, Sampling, BISECTION_STEPS, FLOOR_NATS};
pub use token_tables::{BlockTable, TokenTables};
