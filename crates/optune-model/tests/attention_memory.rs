//! On the generic path (the op graph a GPU runs) a training forward pass keeps no attention
//! scores or probabilities for the backward pass: the graph it holds grows with the tokens, not
//! with the tokens times the sequence length. The same tokens as four sequences of ~123 tokens
//! and as two of ~246 hold about the same graph (measured: 37.83 and 37.64 MB, 52.60 and 52.30
//! MB before the rotary attention node kept q, k and v once); composed of tensor ops, attention
//! kept three `[b, heads, t, t]` tensors a layer in f32 (five in bf16), and the longer batch held
//! 9.6 MB more (106.65 and 116.26 MB, without the first pass). The heap is counted by a counting
//! allocator, so this file holds one test: the counts are the whole test process's.

mod common;

use candle_core::{DType, Device};
use optune_kernels::{set_kernels, Kernels};
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{llama_weight_shapes, load_model, ModelConfig, TokenizedPair};
use optune_testkit::memory::{write_wide_llama, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;

#[test]
fn a_generic_forward_pass_keeps_no_attention_probabilities() {
    set_kernels(Kernels::Generic);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wide");
    write_wide_llama(&dir, 256, 768, 4, |json| {
        llama_weight_shapes(&ModelConfig::from_json_str(json).unwrap())
    });
    let (mut model, _, _) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
    let config = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: optune_testkit::LLAMA_PROJECTIONS.map(String::from).to_vec(),
    };
    let adapters = attach_lora(&mut model, &config, 0).unwrap();
    adapters.set_training(true);
    let graph_bytes =
        |pairs: &[TokenizedPair]| common::forward_graph_bytes(&model, pairs, &adapters.vars);
    let short = common::long_pairs();
    // The same tokens in half as many sequences, each two of the short ones end to end.
    let long: Vec<TokenizedPair> = short
        .chunks(2)
        .map(|two| TokenizedPair {
            prompt: [&two[0].prompt[..], &two[0].response, &two[1].prompt].concat(),
            response: two[1].response.clone(),
        })
        .collect();
    // A first pass, so that neither measured one holds what a process allocates once.
    graph_bytes(&short);
    let (short_bytes, long_bytes) = (graph_bytes(&short), graph_bytes(&long));
    eprintln!(
        "a forward pass's graph holds {:.2} MB for 4 sequences, {:.2} MB for the same tokens in 2",
        short_bytes / MB,
        long_bytes / MB
    );
    // One f32 `[b, heads, t, t]` of the longer batch in every layer (4 heads, 4 layers): what
    // keeping even one of attention's tensors would add (~7.7 MB), against half of it.
    let longest = long
        .iter()
        .map(|p| p.prompt.len() + p.response.len())
        .max()
        .unwrap() as f64;
    let one_kept = 4.0 * (long.len() as f64 * 4.0 * longest * longest * 4.0);
    assert!(
        long_bytes - short_bytes <= 0.5 * one_kept,
        "the longer sequences' graph holds {:.2} MB, the shorter ones' {:.2} MB",
        long_bytes / MB,
        short_bytes / MB
    );
}
