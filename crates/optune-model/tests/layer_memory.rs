//! A training forward pass keeps each of a layer's tensors once for the backward pass, on either
//! kernel path: per token, the stream and its norm twice (4 h), the pending attention and MLP
//! outputs (2 h), q, k and v (h + 2 kv), the attention's merged output (h), the MLP's gate, up
//! and product (3 i) and each LoRA adapter's low-rank product (r): 8 h + 2 kv + 3 i + 7 r
//! elements. Composed of tensor ops, the generic path (the op graph a GPU runs) kept q and k
//! three times (the projection, its copy split into heads, the rotated heads), v and the
//! attention's output twice and SwiGLU's `silu(gate)` besides its inputs: 11 h + 5 kv + 4 i +
//! 7 r; composed of its rotary and attention ops, the fused path kept the rotated heads, v split
//! and the output before the merge: 10 h + 4 kv + 3 i + 7 r. Measured on this model (h 256, kv
//! 128, i 768, r 8), against 4,664 counted: 4,710 elements a token and layer on the generic
//! path (with the composed attention 5,864, with the composed SwiGLU 5,478) and 4,731 on the
//! fused path (5,500 composed). The heap is counted by a counting allocator, so this file holds
//! one test: the counts are the whole test process's.

mod common;

use candle_core::{DType, Device};
use optune_kernels::{set_kernels, Kernels};
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{llama_weight_shapes, load_model, ModelConfig};
use optune_testkit::memory::{write_wide_llama, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn a_layer_keeps_each_tensor_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (hidden, intermediate, rank) = (256, 768, 8);
    let pairs = common::long_pairs();
    let positions = common::padded_positions(&pairs);
    // The heap the graph of one forward pass holds until its backward pass, for a model of
    // `layers` layers with adapters on all seven projections.
    let graph_bytes = |layers: usize| {
        let dir = tmp.path().join(format!("wide-{layers}"));
        if !dir.exists() {
            write_wide_llama(&dir, hidden, intermediate, layers, |json| {
                llama_weight_shapes(&ModelConfig::from_json_str(json).unwrap())
            });
        }
        let (mut model, _, _) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let kv = model.config().num_kv_heads() * model.config().head_dim();
        let config = LoraConfig {
            rank,
            alpha: 16.0,
            dropout: 0.0,
            targets: optune_testkit::LLAMA_PROJECTIONS.map(String::from).to_vec(),
        };
        let adapters = attach_lora(&mut model, &config, 0).unwrap();
        adapters.set_training(true);
        (
            common::forward_graph_bytes(&model, &pairs, &adapters.vars),
            kv,
        )
    };
    for kernels in [Kernels::Generic, Kernels::Fused] {
        set_kernels(kernels);
        // A first pass, so that no measured one holds what a process allocates once.
        graph_bytes(2);
        let ((two, kv), (four, _)) = (graph_bytes(2), graph_bytes(4));
        // The two layers the larger model has more, per position, in f32 elements.
        let per_token_layer = (four - two) / 2.0 / positions / 4.0;
        let [h, kv, i, r] = [hidden, kv, intermediate, rank].map(|n| n as f64);
        let each_once = 8.0 * h + 2.0 * kv + 3.0 * i + 7.0 * r;
        let composed = match kernels {
            Kernels::Generic => each_once + 3.0 * h + 3.0 * kv + i,
            Kernels::Fused => each_once + 2.0 * h + 2.0 * kv,
        };
        let name = kernels.name();
        eprintln!(
            "{name}: a layer keeps {per_token_layer:.0} elements a token (each tensor once: \
             {each_once:.0}; composed of the path's ops: {composed:.0})"
        );
        assert!(
            per_token_layer <= 1.05 * each_once,
            "{name}: a layer keeps {per_token_layer:.0} elements a token, more than each tensor \
             once ({each_once:.0}); composed of the path's ops it kept {composed:.0}"
        );
    }
}
