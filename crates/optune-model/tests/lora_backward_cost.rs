//! On the generic path (the op graph CUDA runs), a LoRA backward pass does at most 0.6× the work
//! of a full fine-tuning backward pass: frozen weights get no gradient products.
//!
//! The work is counted, not timed: the multiply-adds of every matrix product the generic ops'
//! backward passes run (`optune_kernels::ops::generic::backward_multiply_adds`). Products
//! dominate a transformer's backward pass, the count is exact and the same on any machine, so
//! the test cannot be made flaky by a loaded CI runner, and it fails as soon as a frozen weight
//! gets its gradient product again (the ratio then rises to about 1).

use candle_core::{DType, Device, Tensor, Var};
use optune_kernels::ops::generic::backward_multiply_adds;
use optune_kernels::{set_kernels, Kernels};
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{
    llama_weight_shapes, sequence_logprobs, ModelConfig, TokenizedPair, Transformer,
};
use std::collections::HashMap;

const RANDOM_LLAMA: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024,
    "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "hidden_act": "silu"
}"#;

/// Deterministic small weights `[shape]` (norm weights 1).
fn weight(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match shape.len() {
        1 => vec![1.0; n],
        _ => (0..n)
            .map(|i| ((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5)
            .map(|u| u * 0.08)
            .collect(),
    };
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Four sequences of 60–66 tokens.
fn pairs() -> Vec<TokenizedPair> {
    (0..4)
        .map(|s| TokenizedPair {
            prompt: (0..30 + s)
                .map(|t| 4 + ((t * 37 + s * 11) % 1000) as u32)
                .collect(),
            response: (0..30 + 2 * s)
                .map(|t| 4 + ((t * 53 + s * 7) % 1000) as u32)
                .chain([2])
                .collect(),
        })
        .collect()
}

/// Multiply-adds of the backward pass of the pairs' summed log-probs.
fn backward_cost(model: &Transformer) -> u64 {
    let loss = sequence_logprobs(model, &pairs(), 3)
        .unwrap()
        .sums
        .sum_all()
        .unwrap();
    let before = backward_multiply_adds();
    loss.backward().unwrap();
    backward_multiply_adds() - before
}

#[test]
fn lora_backward_costs_at_most_0_6_of_full_fine_tuning() {
    set_kernels(Kernels::Generic);
    let config = ModelConfig::from_json_str(RANDOM_LLAMA).unwrap();
    let shapes = llama_weight_shapes(&config);
    let weights: HashMap<String, Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(seed, (name, shape))| (name.clone(), weight(shape, seed)))
        .collect();

    let vars: HashMap<String, Tensor> = weights
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                Var::from_tensor(t).unwrap().as_tensor().clone(),
            )
        })
        .collect();
    let full = Transformer::from_weights(&config, vars, DType::F32, &Device::Cpu).unwrap();
    let full_cost = backward_cost(&full);

    let mut lora = Transformer::from_weights(&config, weights, DType::F32, &Device::Cpu).unwrap();
    let adapters = LoraConfig {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: optune_testkit::LLAMA_PROJECTIONS.map(String::from).to_vec(),
    };
    let _adapters = attach_lora(&mut lora, &adapters, 0).unwrap();
    let lora_cost = backward_cost(&lora);

    // The count sees every product: full fine-tuning multiplies at least both gradients of
    // every linear layer, over at least 4 sequences of 60 tokens.
    let rows = 4 * 60;
    let linear_gradients: u64 = shapes
        .iter()
        .filter(|(name, _)| {
            optune_testkit::LLAMA_PROJECTIONS
                .iter()
                .any(|p| name.contains(p))
        })
        .map(|(_, shape)| 2 * (rows * shape[0] * shape[1]) as u64)
        .sum();
    assert!(
        full_cost >= linear_gradients,
        "the count missed products: {full_cost} multiply-adds in the full backward, \
         {linear_gradients} in its linear layers' gradients alone"
    );
    let ratio = lora_cost as f64 / full_cost as f64;
    assert!(
        ratio <= 0.6,
        "LoRA backward / full fine-tuning backward = {ratio:.3} ({lora_cost} / {full_cost} \
         multiply-adds of matrix products), above 0.6"
    );
    eprintln!("LoRA/full backward multiply-adds: {lora_cost} / {full_cost} = {ratio:.3}");
}
