//! Generation against the training path, on the tiny testdata models.

use optune_model::generate::{
    generate, stream_seed, Batching, FinishReason, Generation, GenerationRequest, SamplingParams,
    Stopping,
};
use optune_model::{sequence_logprobs, KvCache, TokenizedPair, Transformer};

mod common;
use common::{argmax_continuation, model, prompts};

fn requests(seed: u64) -> Vec<GenerationRequest> {
    prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt_ids: p,
            seed: stream_seed(seed, &format!("p{i}"), 0),
        })
        .collect()
}

fn sampling(temperature: f64, max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p: 0.9,
        top_k: None,
        min_p: 0.0,
        max_new_tokens,
    }
}

#[test]
fn greedy_decoding_equals_the_training_path_argmax() {
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);
        // No EOS, so every sequence runs the full length (past mistral's window of 8).
        let out = generate(
            &model,
            &requests(0),
            &sampling(0.0, 16),
            Stopping::eos(&[]),
            3,
            |_, _| {},
        )
        .unwrap()
        .generations;
        for (g, p) in out.iter().zip(prompts()) {
            assert_eq!(g.finish, FinishReason::Length);
            assert_eq!(g.tokens, argmax_continuation(&model, &p, 16), "{name}");
        }
    }
}

#[test]
fn reported_logp_equals_the_sequence_logprob() {
    let model = model("tiny-qwen2");
    let out = generate(
        &model,
        &requests(3),
        &sampling(1.0, 12),
        Stopping::eos(&[]),
        2,
        |_, _| {},
    )
    .unwrap()
    .generations;
    assert_logps_are_the_sequences(&model, &out);
}

/// Each generation's `logp` is the training path's summed log-probability of its tokens after
/// its prompt (of [`prompts`], in order), within 1e-4.
fn assert_logps_are_the_sequences(model: &Transformer, generations: &[Generation]) {
    let pairs: Vec<TokenizedPair> = generations
        .iter()
        .zip(prompts())
        .map(|(g, p)| TokenizedPair {
            prompt: p,
            response: g.tokens.clone(),
        })
        .collect();
    let sums: Vec<f32> = sequence_logprobs(model, &pairs, 3)
        .unwrap()
        .sums
        .to_vec1()
        .unwrap();
    for (g, s) in generations.iter().zip(sums) {
        assert!(
            (g.logp - s as f64).abs() <= 1e-4 * (s.abs() as f64).max(1.0),
            "{} vs {s}",
            g.logp
        );
    }
}

/// A sequence's output does not depend on the batch size, on the other sequences in its batch
/// or on the thread count, to the bit: the CPU decode kernels compute every number of a slot
/// from that slot alone, in a fixed order.
#[test]
fn output_does_not_depend_on_the_batch_size() {
    let model = model("tiny-mistral");
    let run = |batch: usize, threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            generate(
                &model,
                &requests(11),
                &sampling(1.0, 20),
                Stopping::eos(&[5, 7]),
                batch,
                |_, _| {},
            )
            .unwrap()
            .generations
        })
    };
    let reference = run(2, 1);
    // Same bits on the fused path (host kernels, each slot on its own); on the generic path the
    // products' blocking follows the batch, so there the same tokens and log-probs to rounding.
    let fused = optune_kernels::kernels() == optune_kernels::Kernels::Fused;
    for (batch, threads) in [(1, 1), (2, 2), (3, 2), (5, 1), (5, 3), (8, 2)] {
        let out = run(batch, threads);
        for (a, b) in reference.iter().zip(&out) {
            assert_eq!(a.tokens, b.tokens, "batch {batch} threads {threads}");
            let same = if fused {
                a.logp.to_bits() == b.logp.to_bits()
            } else {
                (a.logp - b.logp).abs() <= 1e-4 * a.logp.abs().max(1.0)
            };
            assert!(
                same,
                "batch {batch} threads {threads}: {} vs {}",
                a.logp, b.logp
            );
        }
    }
}

/// The size of a row of logits that rounding differences scale with: its largest magnitude (at
/// least 1). Gemma 3's logits run about twice the others' (its scaled embedding and norms), and
/// so do the differences of two paths' summation orders.
fn row_scale(row: &[f32]) -> f32 {
    row.iter().fold(1f32, |m, v| m.max(v.abs()))
}

/// Stacking q/k/v and gate/up for generation groups the products, not the numbers: on the
/// tensor path the logits agree with the unstacked model's to rounding, on the host kernels (which
/// read the separate weights, now views of the stacks) to the bit.
#[test]
fn stacked_projections_change_no_logits() {
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);
        let mut stacked = model.clone();
        stacked.stack_projections().unwrap();
        let prompts = prompts();
        let run = |m: &Transformer, cache: fn(&Transformer) -> KvCache| -> Vec<Vec<f32>> {
            let mut cache = cache(m);
            for (slot, p) in prompts[..2].iter().enumerate() {
                m.prefill(p, &mut cache, slot).unwrap();
            }
            (0..6u32)
                .flat_map(|step| {
                    let feed = [Some(10 + step), Some(20 + step)];
                    m.decode_step(&feed, &mut cache)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap()
                })
                .collect()
        };
        // The process's own cache (the host's under the fused kernels), then tensors.
        let own = |m: &Transformer| KvCache::new(m, 2, 64).unwrap();
        let tensors = |m: &Transformer| KvCache::new_tensors(m, 2, 64).unwrap();
        for cache in [own, tensors] {
            let (a, b) = (run(&model, cache), run(&stacked, cache));
            if cache(&model).is_host() {
                assert_eq!(a, b, "{name}");
            }
            for (row_a, row_b) in a.iter().zip(&b) {
                let scale = row_scale(row_b);
                for (x, y) in row_a.iter().zip(row_b) {
                    assert!((x - y).abs() <= 1e-5 * scale, "{name}: {x} vs {y}");
                }
            }
        }
    }
}

/// The CPU kernels (host cache) and the tensor path that other devices use compute the
/// same logits, up to rounding.
#[test]
fn cpu_kernels_agree_with_the_tensor_path() {
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);
        let prompts = prompts();
        let mut host = KvCache::new(&model, 3, 64).unwrap();
        let mut tensors = KvCache::new_tensors(&model, 3, 64).unwrap();
        for (slot, p) in prompts[..3].iter().enumerate() {
            model.prefill(p, &mut host, slot).unwrap();
            model.prefill(p, &mut tensors, slot).unwrap();
        }
        for step in 0..12u32 {
            // Slot 1 sits out every third step: idle slots must be left alone.
            let feed: Vec<Option<u32>> = (0..3)
                .map(|s| (s != 1 || step % 3 != 0).then_some(10 + 7 * step + s))
                .collect();
            let a: Vec<Vec<f32>> = model
                .decode_step(&feed, &mut host)
                .unwrap()
                .to_vec2()
                .unwrap();
            let b: Vec<Vec<f32>> = model
                .decode_step(&feed, &mut tensors)
                .unwrap()
                .to_vec2()
                .unwrap();
            for s in 0..3 {
                if feed[s].is_none() {
                    // An idle slot's row is zeros on both caches.
                    assert!(
                        a[s].iter().chain(&b[s]).all(|&x| x == 0.0),
                        "{name} slot {s}"
                    );
                }
                let scale = row_scale(&b[s]);
                for (x, y) in a[s].iter().zip(&b[s]) {
                    assert!(
                        (x - y).abs() <= 1e-5 * scale,
                        "{name} step {step} slot {s}: {x} vs {y}"
                    );
                }
            }
            for s in 0..3 {
                assert_eq!(host.len(s), tensors.len(s));
            }
        }
    }
}

#[test]
fn generation_stops_at_any_eos_and_reports_it() {
    let model = model("tiny-llama");
    let free = generate(
        &model,
        &requests(5),
        &sampling(1.0, 30),
        Stopping::eos(&[]),
        4,
        |_, _| {},
    )
    .unwrap()
    .generations;
    // Use tokens that the free run produced as EOS ids: those runs must now stop there.
    let eos = [free[0].tokens[3], free[1].tokens[5]];
    let out = generate(
        &model,
        &requests(5),
        &sampling(1.0, 30),
        Stopping::eos(&eos),
        4,
        |_, _| {},
    )
    .unwrap()
    .generations;
    for (f, g) in free.iter().zip(&out) {
        match f.tokens.iter().position(|t| eos.contains(t)) {
            Some(stop) => {
                assert_eq!(g.finish, FinishReason::Stop);
                assert_eq!(g.tokens, f.tokens[..=stop]);
            }
            None => assert_eq!(g.tokens, f.tokens),
        }
    }
    assert_eq!(out[0].finish, FinishReason::Stop);
    assert!(out[0].tokens.len() <= 4);
}

#[test]
fn capacity_beyond_the_model_positions_is_an_error() {
    let model = model("tiny-llama");
    let long = vec![GenerationRequest {
        prompt_ids: vec![1; 250],
        seed: 0,
    }];
    let err = generate(
        &model,
        &long,
        &sampling(1.0, 10),
        Stopping::eos(&[]),
        1,
        |_, _| {},
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("exceeds the model's 256 positions"),
        "{err}"
    );
}

/// Feeding prompts and decode tokens together in one call gives every slot the same logits as
/// feeding each slot alone: to the bit on the fused path (host kernels), to rounding on the
/// generic path (its new prompts go through one padded forward pass).
#[test]
fn feeding_slots_together_equals_feeding_them_alone() {
    use optune_model::transformer::Segment;
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);
        let prompts = prompts();
        let mut together = KvCache::new(&model, 3, 64).unwrap();
        let mut alone = KvCache::new(&model, 3, 64).unwrap();
        // Slot 0 starts decoding before the others arrive.
        let first = model
            .feed(
                &[Segment {
                    slot: 0,
                    tokens: &prompts[0],
                }],
                &mut together,
            )
            .unwrap();
        assert_eq!(
            first,
            model
                .feed(
                    &[Segment {
                        slot: 0,
                        tokens: &prompts[0]
                    }],
                    &mut alone
                )
                .unwrap()
        );
        let mixed = [
            Segment {
                slot: 0,
                tokens: &[17],
            },
            Segment {
                slot: 1,
                tokens: &prompts[1],
            },
            Segment {
                slot: 2,
                tokens: &prompts[4],
            },
        ];
        let rows = model.feed(&mixed, &mut together).unwrap();
        let width = rows.len() / 3;
        let fused = optune_kernels::kernels() == optune_kernels::Kernels::Fused;
        for (i, segment) in mixed.iter().enumerate() {
            let one = model.feed(&[*segment], &mut alone).unwrap();
            let row = &rows[i * width..(i + 1) * width];
            if fused {
                assert_eq!(one, row, "{name} slot {}", segment.slot);
            } else {
                let worst = one
                    .iter()
                    .zip(row)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{name} slot {}: {worst}", segment.slot);
            }
        }
        for s in 0..3 {
            assert_eq!(together.len(s), alone.len(s));
        }
    }
}

/// Prompts fed a few tokens per step (chunked prefill), with the samples of a prompt waiting on
/// one prefill across steps, generate what whole prompts do: to the bit on the fused path (each
/// row's numbers are its own), the same greedy tokens and log-probs to rounding on the generic
/// path (its prefill batches pad differently).
#[test]
fn chunked_prefill_generates_what_whole_prompts_do() {
    let fused = optune_kernels::kernels() == optune_kernels::Kernels::Fused;
    let temperature = if fused { 1.0 } else { 0.0 };
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);
        let requests = common::samples_of_each_prompt(9, 3);
        let run = |batching: Batching| {
            generate(
                &model,
                &requests,
                &sampling(temperature, 12),
                Stopping::eos(&[]),
                batching,
                |_, _| {},
            )
            .unwrap()
            .generations
        };
        let whole = run(Batching::new(4));
        for (slots, per_step) in [(4, 1), (4, 3), (7, 5), (2, 6)] {
            let chunked = run(Batching {
                prompt_tokens_per_step: per_step,
                ..Batching::new(slots)
            });
            for (i, (a, b)) in whole.iter().zip(&chunked).enumerate() {
                let what = format!(
                    "{name}: {slots} slots, {per_step} prompt tokens per step, request {i}"
                );
                assert_eq!(a.tokens, b.tokens, "{what}");
                if fused {
                    assert_eq!(a.logp.to_bits(), b.logp.to_bits(), "{what}");
                } else {
                    assert!(
                        (a.logp - b.logp).abs() <= 1e-4 * a.logp.abs().max(1.0),
                        "{what}"
                    );
                }
            }
        }
    }
}

/// The tensor path's feed refuses what would corrupt the cache or reach a GPU as an empty tensor:
/// a slot fed twice in one call, a segment past the slot's capacity, no segment at all.
#[test]
fn the_tensor_feed_refuses_a_slot_twice_an_overfull_slot_and_nothing() {
    use optune_model::transformer::Segment;
    let model = model("tiny-llama");
    let mut cache = KvCache::new_tensors(&model, 2, 8).unwrap();
    let (a, b) = ([5u32, 6, 7], [8u32]);
    let twice = [
        Segment {
            slot: 0,
            tokens: &a,
        },
        Segment {
            slot: 0,
            tokens: &b,
        },
    ];
    let err = model.feed_tensor(&twice, &mut cache).unwrap_err();
    assert!(err.to_string().contains("slot 0 is fed twice"), "{err}");
    let long = [9u32; 9];
    let err = model
        .feed_tensor(
            &[Segment {
                slot: 1,
                tokens: &long,
            }],
            &mut cache,
        )
        .unwrap_err();
    assert!(err.to_string().contains("slot 1 is full"), "{err}");
    let err = model.feed_tensor(&[], &mut cache).unwrap_err();
    assert!(err.to_string().contains("no segments"), "{err}");
    // A token id past the vocabulary: refused before the embedding (a GPU's lookup would read
    // past its table).
    let vocab = model.config().vocab_size as u32;
    let err = model
        .feed_tensor(
            &[Segment {
                slot: 1,
                tokens: &[5, vocab],
            }],
            &mut cache,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "token id {vocab} is outside the model's vocabulary"
        )),
        "{err}"
    );
    // Nothing was written: both slots are still empty, and feeding them works.
    assert!((0..2).all(|s| cache.is_empty(s)));
    let rows = model
        .feed(
            &[
                Segment {
                    slot: 0,
                    tokens: &a,
                },
                Segment {
                    slot: 1,
                    tokens: &b,
                },
            ],
            &mut cache,
        )
        .unwrap();
    assert_eq!(rows.len(), 2 * model.config().vocab_size);
    assert_eq!((cache.len(0), cache.len(1)), (3, 1));
    assert!(model.feed(&[], &mut cache).unwrap().is_empty());
}

/// Stop strings end each sequence at the first token whose text completes one, keeping that
/// token, and leave the sequences whose text never holds one as they were; the log-probability
/// is that of the tokens kept.
#[test]
fn stop_strings_end_a_sequence_at_the_token_that_completes_one() {
    let dir = optune_testkit::workspace_root().join("testdata/models/tiny-llama");
    let (model, tokenizer, _) =
        optune_model::load_model(&dir, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let run = |stopping: Stopping| {
        generate(
            &model,
            &requests(5),
            &sampling(1.0, 24),
            stopping,
            3,
            |_, _| {},
        )
        .unwrap()
        .generations
    };
    let free = run(Stopping::eos(&[]));
    // A piece of the first response's text from its 6th token on: some responses hold it.
    let text = tokenizer.decode(&free[0].tokens).unwrap();
    let from = tokenizer.decode(&free[0].tokens[..5]).unwrap().len();
    let piece: String = text[from..].chars().take(3).collect();
    let strings =
        optune_model::generate::StopStrings::new(vec![piece.clone()], &tokenizer).unwrap();
    let stopped = run(Stopping {
        eos_ids: &[],
        strings: Some(&strings),
    });
    let mut ended = 0;
    for (i, (free, stopped)) in free.iter().zip(&stopped).enumerate() {
        let first = (1..=free.tokens.len()).find(|&n| {
            tokenizer
                .decode(&free.tokens[..n])
                .unwrap()
                .contains(&piece)
        });
        match first {
            Some(n) => {
                ended += 1;
                assert_eq!(stopped.tokens, free.tokens[..n], "{i}: {piece:?}");
                assert_eq!(stopped.finish, FinishReason::Stop, "{i}");
                let text = tokenizer.decode(&stopped.tokens).unwrap();
                assert!(!strings.cut(&text).contains(&piece) && text.contains(&piece));
            }
            None => {
                // The same bits on the fused path; on the generic path the batch around it
                // changed, and with it the rounding.
                assert_eq!(stopped.tokens, free.tokens, "{i}");
                match optune_kernels::kernels() {
                    optune_kernels::Kernels::Fused => {
                        assert_eq!(stopped.logp.to_bits(), free.logp.to_bits(), "{i}")
                    }
                    _ => assert!((stopped.logp - free.logp).abs() <= 1e-4 * free.logp.abs()),
                }
            }
        }
    }
    // Responses that hold the piece, and (with these seeds) ones that do not.
    assert!(
        ended >= 1 && ended < free.len(),
        "{ended} of {}",
        free.len()
    );
    // The log-probability of the kept tokens, as the sequence's own.
    assert_logps_are_the_sequences(&model, &stopped);
}
