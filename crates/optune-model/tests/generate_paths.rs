//! Generation on the generic path (the tensor KV cache and sampling on the logits' device: the op
//! graph a GPU runs) against the fused CPU path. Its own test binary: it switches the process-wide
//! kernel choice, which would reach the other tests' threads.

use candle_core::Device;
use optune_kernels::{set_kernels, Kernels};
use optune_model::generate::{generate, Generation, GenerationRequest, SamplingParams, Stopping};
use optune_model::{sequence_logprobs, PaddedBatch, TokenizedPair, Transformer};

mod common;
use common::model;

/// Each prompt twice (two samples sharing one prefill), each with its own stream.
fn requests(seed: u64) -> Vec<GenerationRequest> {
    common::samples_of_each_prompt(seed, 2)
}

fn params(temperature: f64, top_p: f64, top_k: Option<usize>) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p: 0.0,
        max_new_tokens: 16,
    }
}

fn run(kernels: Kernels, model: &Transformer, p: &SamplingParams, batch: usize) -> Vec<Generation> {
    set_kernels(kernels);
    generate(model, &requests(5), p, Stopping::eos(&[]), batch, |_, _| {})
        .unwrap()
        .generations
}

/// The model's logits at every response position of `prompt + response`, `[response, vocab]`,
/// from the training path.
fn response_logits(model: &Transformer, prompt: &[u32], response: &[u32]) -> Vec<Vec<f32>> {
    let sequence = [prompt, response].concat();
    let batch = PaddedBatch::right_padded(&[sequence], 0, &Device::Cpu).unwrap();
    let hidden = model.hidden_states(&batch).unwrap().squeeze(0).unwrap();
    let rows = hidden.narrow(0, prompt.len() - 1, response.len()).unwrap();
    let logits = model.head_logits(&rows).unwrap();
    logits.to_vec2().unwrap()
}

#[test]
fn the_generic_path_generates_what_the_fused_path_does() {
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);

        // Greedy: the same tokens on both paths.
        let greedy = params(0.0, 1.0, None);
        let fused = run(Kernels::Fused, &model, &greedy, 3);
        let generic = run(Kernels::Generic, &model, &greedy, 3);
        for (i, (f, g)) in fused.iter().zip(&generic).enumerate() {
            assert_eq!(f.tokens, g.tokens, "{name}: request {i}");
            assert!(
                (f.logp - g.logp).abs() <= 1e-4 * f.logp.abs().max(1.0),
                "{name}: {i}"
            );
        }

        // Sampled on the generic path: a fixed seed repeats, to the bit, whatever the batch.
        let sampled = params(1.0, 0.9, None);
        let first = run(Kernels::Generic, &model, &sampled, 4);
        let again = run(Kernels::Generic, &model, &sampled, 4);
        for (a, b) in first.iter().zip(&again) {
            assert_eq!(a.tokens, b.tokens, "{name}");
            assert_eq!(a.logp.to_bits(), b.logp.to_bits(), "{name}");
        }
        // The two samples of a prompt draw from their own streams.
        assert!(
            first.chunks(2).any(|s| s[0].tokens != s[1].tokens),
            "{name}"
        );

        // Each reported logp is the sequence's log-probability under the model.
        let pairs: Vec<TokenizedPair> = first
            .iter()
            .zip(requests(5))
            .map(|(g, r)| TokenizedPair {
                prompt: r.prompt_ids,
                response: g.tokens.clone(),
            })
            .collect();
        let sums: Vec<f32> = sequence_logprobs(&model, &pairs, 4)
            .unwrap()
            .sums
            .to_vec1()
            .unwrap();
        for (g, s) in first.iter().zip(sums) {
            let tolerance = 1e-4 * (s.abs() as f64).max(1.0);
            assert!(
                (g.logp - s as f64).abs() <= tolerance,
                "{name}: {} vs {s}",
                g.logp
            );
        }

        // Top-k 3: every sampled token is among the three most likely at its position.
        let top3 = run(Kernels::Generic, &model, &params(1.5, 1.0, Some(3)), 4);
        for (g, r) in top3.iter().zip(requests(5)) {
            for (position, row) in response_logits(&model, &r.prompt_ids, &g.tokens)
                .iter()
                .enumerate()
            {
                let token = g.tokens[position] as usize;
                let above = row.iter().filter(|&&l| l > row[token]).count();
                assert!(
                    above < 3,
                    "{name}: token {token} has {above} tokens above it"
                );
            }
        }
    }
    set_kernels(Kernels::Fused);
}

/// The padded forward (training, reference and score passes) refuses a sequence longer than the
/// rotary tables or a token outside the vocabulary, on every path: the CPU's lookups would fail
/// on them with an index error, a GPU's would read past their tables silently.
#[test]
fn the_padded_forward_refuses_what_is_past_the_model_s_tables() {
    let model = model("tiny-llama");
    let positions = model.max_positions();
    let too_long = vec![7u32; positions + 1];
    let batch = PaddedBatch::right_padded(&[vec![1, 2, 3], too_long], 0, &Device::Cpu).unwrap();
    let err = model.hidden_states(&batch).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "a sequence of {} tokens is longer than the {positions} positions the model's config allows",
            positions + 1
        )),
        "{err}"
    );
    let vocab = model.config().vocab_size as u32;
    let batch = PaddedBatch::right_padded(&[vec![1, 2, 3]], vocab, &Device::Cpu).unwrap();
    // The padding alone: one sequence pads nothing, so the largest id is 3 and it runs.
    assert!(model.hidden_states(&batch).is_ok());
    let batch = PaddedBatch::right_padded(&[vec![1, 2, 3], vec![1]], vocab, &Device::Cpu).unwrap();
    let err = model.hidden_states(&batch).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "token id {vocab} is outside the model's vocabulary"
        )),
        "{err}"
    );
}
