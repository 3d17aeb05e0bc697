//! A LoRA projection keeps nothing per token for the backward pass but its input, on either
//! kernel path: adapters on all seven projections hold about the graph of an adapter on one,
//! and LoRA dropout adds nothing. On the generic path a projection used to be products and a sum
//! that kept the base and the adapter outputs (2 · out elements a token), and under dropout each
//! adapter's dropped-out copy of its input. Measured on this model: the six further adapters add
//! 0.67 MB to the generic graph (36.88 MB when a projection was products and a sum), dropout
//! nothing (+17 % then). The heap is counted by a counting allocator, so this file holds one
//! test: the counts are the whole test process's.

mod common;

use candle_core::{DType, Device};
use optune_kernels::{set_kernels, Kernels};
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{llama_weight_shapes, load_model, ModelConfig};
use optune_testkit::memory::{write_wide_llama, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;

#[test]
fn lora_keeps_no_projection_outputs_or_dropped_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wide");
    let (hidden, intermediate, layers) = (256, 768, 4);
    write_wide_llama(&dir, hidden, intermediate, layers, |json| {
        llama_weight_shapes(&ModelConfig::from_json_str(json).unwrap())
    });
    let pairs = common::long_pairs();
    let positions = common::padded_positions(&pairs);
    for kernels in [Kernels::Generic, Kernels::Fused] {
        set_kernels(kernels);
        // The heap the graph of one forward pass holds until its backward pass.
        let graph_bytes = |targets: &[&str], dropout: f32| {
            let (mut model, _, _) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
            let config = LoraConfig {
                rank: 8,
                alpha: 16.0,
                dropout,
                targets: targets.iter().map(|t| t.to_string()).collect(),
            };
            let adapters = attach_lora(&mut model, &config, 0).unwrap();
            adapters.set_training(true);
            common::forward_graph_bytes(&model, &pairs, &adapters.vars)
        };
        let all = optune_testkit::LLAMA_PROJECTIONS;
        // A first pass, so that no measured one holds what a process allocates once.
        graph_bytes(&all, 0.0);
        let (one, seven, dropped) = (
            graph_bytes(&["q_proj"], 0.0),
            graph_bytes(&all, 0.0),
            graph_bytes(&all, 0.1),
        );
        let name = kernels.name();
        eprintln!(
            "{name}: a forward pass's graph holds {:.2} MB with an adapter on q_proj, {:.2} MB \
             with adapters on all seven projections, {:.2} MB with dropout on them",
            one / MB,
            seven / MB,
            dropped / MB
        );
        // What the six further projections' outputs would take twice over (k 128, v 128, o 256,
        // gate 768, up 768, down 256 elements a token), against a quarter of it.
        let outputs = 2.0 * (2.0 * hidden as f64 + 2.0 * intermediate as f64 + 2.0 * 128.0);
        let kept_outputs = outputs * 4.0 * positions * layers as f64;
        assert!(
            seven - one <= 0.25 * kept_outputs,
            "{name}: six more adapters add {:.2} MB to the graph (keeping their outputs: {:.2} MB)",
            (seven - one) / MB,
            kept_outputs / MB
        );
        // The dropped-out inputs would be 2304 elements a token and layer, about a third more
        // than the generic graph keeps now; what dropout may add is a few small buffers.
        assert!(
            dropped <= 1.03 * seven,
            "{name}: with dropout the graph holds {:.2} MB, without {:.2} MB",
            dropped / MB,
            seven / MB
        );
    }
}
