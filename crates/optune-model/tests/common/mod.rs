//! What the model's tests share: the tiny testdata models, a handful of prompts, three
//! (prompt, response) pairs and the memory tests' four longer ones. Each test file is its own
//! crate and uses a part of this module.
#![allow(dead_code)]

use candle_core::Var;
use candle_core::{DType, Device};
use optune_model::generate::{stream_seed, GenerationRequest};
use optune_model::{load_model, sequence_logprobs, PaddedBatch, TokenizedPair, Transformer};
use optune_testkit::memory::CountingAllocator;

/// A model of testdata/models in f32 on the CPU.
pub fn model(name: &str) -> Transformer {
    let dir = optune_testkit::workspace_root()
        .join("testdata/models")
        .join(name);
    load_model(&dir, DType::F32, &Device::Cpu).unwrap().0
}

/// Greedy continuation recomputed with the training path: a full forward pass per step.
pub fn argmax_continuation(model: &Transformer, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..steps {
        let batch = PaddedBatch::right_padded(&[seq.clone()], 0, &Device::Cpu).unwrap();
        let hidden = model.hidden_states(&batch).unwrap().squeeze(0).unwrap();
        let last = hidden.narrow(0, seq.len() - 1, 1).unwrap();
        let logits: Vec<f32> = model
            .head_logits(&last)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let best = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
        seq.push(best as u32);
    }
    seq[prompt.len()..].to_vec()
}

/// Prompts of 2 to 14 tokens, BOS first.
pub fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
        vec![1, 300, 301],
        vec![1, 90, 91, 92, 93, 94],
        vec![1, 200],
        vec![
            1, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130, 131, 132,
        ],
    ]
}

/// `samples` samples of each of [`prompts`], their streams seeded from `seed` (the samples of a
/// prompt share its prefill).
pub fn samples_of_each_prompt(seed: u64, samples: u32) -> Vec<GenerationRequest> {
    prompts()
        .into_iter()
        .enumerate()
        .flat_map(|(i, p)| {
            (0..samples).map(move |sample| GenerationRequest {
                prompt_ids: p.clone(),
                seed: stream_seed(seed, &format!("p{i}"), sample),
            })
        })
        .collect()
}

/// Three (prompt, response) pairs of unequal lengths (padding on two of them), each response
/// ending in EOS.
pub fn pairs() -> Vec<TokenizedPair> {
    vec![
        TokenizedPair {
            prompt: vec![1, 40, 41, 42, 43, 44, 45, 46, 47],
            response: vec![50, 51, 52, 2],
        },
        TokenizedPair {
            prompt: vec![1, 60, 61],
            response: vec![70, 71, 72, 73, 74, 75, 76, 2],
        },
        TokenizedPair {
            prompt: vec![1, 80, 81, 82, 83],
            response: vec![90, 2],
        },
    ]
}

/// Four sequences of 120–126 tokens: the memory tests' batch.
pub fn long_pairs() -> Vec<TokenizedPair> {
    (0..4)
        .map(|s| TokenizedPair {
            prompt: (0..60 + s)
                .map(|t| 4 + ((t * 37 + s * 11) % 500) as u32)
                .collect(),
            response: (0..59 + s)
                .map(|t| 4 + ((t * 53 + s * 7) % 500) as u32)
                .chain([2])
                .collect(),
        })
        .collect()
}

/// The positions of `pairs` as one padded batch: sequences × the longest.
pub fn padded_positions(pairs: &[TokenizedPair]) -> f64 {
    let longest = pairs.iter().map(|p| p.prompt.len() + p.response.len());
    (pairs.len() * longest.max().unwrap_or(0)) as f64
}

/// The heap the graph of one forward pass of `pairs` holds until its backward pass (counted by
/// the test file's counting allocator), once that backward pass is checked to reach every one of
/// `trained`.
pub fn forward_graph_bytes(
    model: &Transformer,
    pairs: &[TokenizedPair],
    trained: &[(String, Var)],
) -> f64 {
    let before = CountingAllocator::live();
    let logps = sequence_logprobs(model, pairs, 3).unwrap();
    let held = CountingAllocator::live() - before;
    let grads = logps.sums.sum_all().unwrap().backward().unwrap();
    for (name, var) in trained {
        assert!(grads.get(var.as_tensor()).is_some(), "{name}: no gradient");
    }
    held as f64
}
