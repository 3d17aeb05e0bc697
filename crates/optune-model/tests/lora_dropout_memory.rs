//! LoRA dropout keeps no dropped-out input for the backward pass, on either kernel path: a LoRA
//! forward pass with adapters on all seven projections holds the same graph with dropout as
//! without (the generic path's adapter used to keep a dropped-out copy of its input each, which
//! on this model is a sixth more than the rest of the graph). The heap is counted by a counting
//! allocator, so this file holds one test: the counts are the whole test process's.

mod common;

use candle_core::{DType, Device};
use optune_kernels::{set_kernels, Kernels};
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{llama_weight_shapes, load_model, sequence_logprobs, ModelConfig};
use optune_testkit::memory::{write_wide_llama, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;

#[test]
fn lora_dropout_keeps_no_dropped_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wide");
    write_wide_llama(&dir, 256, 768, 4, |json| {
        llama_weight_shapes(&ModelConfig::from_json_str(json).unwrap())
    });
    for kernels in [Kernels::Generic, Kernels::Fused] {
        set_kernels(kernels);
        // The heap the graph of one forward pass holds until its backward pass, and whether the
        // backward pass reaches every adapter.
        let graph_bytes = |dropout: f32| {
            let (mut model, _, _) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
            let config = LoraConfig {
                rank: 8,
                alpha: 16.0,
                dropout,
                targets: optune_testkit::LLAMA_PROJECTIONS.map(String::from).to_vec(),
            };
            let adapters = attach_lora(&mut model, &config, 0).unwrap();
            adapters.set_training(true);
            let before = CountingAllocator::live();
            let logps = sequence_logprobs(&model, &common::long_pairs(), 3).unwrap();
            let held = CountingAllocator::live() - before;
            let grads = logps.sums.sum_all().unwrap().backward().unwrap();
            for (name, var) in &adapters.vars {
                assert!(grads.get(var.as_tensor()).is_some(), "{name}: no gradient");
            }
            held as f64
        };
        let (with, without) = (graph_bytes(0.1), graph_bytes(0.0));
        eprintln!(
            "{}: a forward pass's graph holds {:.2} MB with LoRA dropout, {:.2} MB without",
            kernels.name(),
            with / MB,
            without / MB
        );
        // The dropped-out inputs would be 2304 of every 16-odd thousand elements kept per token
        // and layer on the generic path (+17 %); what dropout may add is a few small buffers.
        assert!(
            with <= 1.03 * without,
            "{}: with dropout the graph holds {:.2} MB, without {:.2} MB",
            kernels.name(),
            with / MB,
            without / MB
        );
    }
}
