//! The paged KV cache (`KvCache::paged`): what it feeds, shares, promises and takes back, and
//! the generation it serves, on the tiny testdata models.

use optune_model::generate::{cache_for_memory, generate, Batching, SamplingParams, Stopping};
use optune_model::transformer::Segment;
use optune_model::{KvCache, Transformer};

mod common;
use common::{model, prompts};

/// `feed_tensor`'s logits for `segments`, as host rows.
fn feed(model: &Transformer, cache: &mut KvCache, segments: &[Segment]) -> Vec<Vec<f32>> {
    model
        .feed_tensor(segments, cache)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// A paged cache in blocks of 3 positions, its blocks taken in no particular order, gives the
/// same logits to the bit as a cache laid out by slot (the CPU forms read the same numbers in the
/// same order), through a packed prefill, a prompt's samples sharing its full blocks (and copying
/// its last, partly filled one, which the prompt's own sequence then goes on writing), decoding
/// steps with a slot idle, and a slot cleared and refilled; clearing every slot hands every block
/// back.
#[test]
fn a_paged_cache_feeds_what_a_cache_by_slot_does() {
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);
        let prompts = prompts();
        let mut by_slot = KvCache::new_tensors(&model, 3, 40).unwrap();
        let mut paged = KvCache::paged(&model, (3, 40), (40, 3)).unwrap();
        let both =
            |by_slot: &mut KvCache, paged: &mut KvCache, segments: &[Segment], what: &str| {
                let want = feed(&model, by_slot, segments);
                let got = feed(&model, paged, segments);
                assert_eq!(got, want, "{name}: {what}");
            };
        // Slot 0 a 14-token prompt (4 full blocks and 2 positions), slot 2 an 11-token one.
        both(
            &mut by_slot,
            &mut paged,
            &[
                Segment {
                    slot: 0,
                    tokens: &prompts[4],
                },
                Segment {
                    slot: 2,
                    tokens: &prompts[0],
                },
            ],
            "prefill",
        );
        by_slot.copy_slot(0, 1).unwrap();
        paged.copy_slot(0, 1).unwrap();
        assert_eq!(paged.len(1), 14);
        // 40 blocks: slot 0's 5 and slot 2's 4 taken, slot 1's copy of slot 0's last one.
        assert_eq!(paged.unpromised_blocks(), Some(40 - 5 - 4 - 1));
        for step in 0..10u32 {
            // Slot 2 sits out every third step.
            let tokens: Vec<[u32; 1]> = (0..3).map(|s| [20 + 7 * step + s]).collect();
            let segments: Vec<Segment> = (0..3)
                .filter(|&s| s != 2 || step % 3 != 0)
                .map(|s| Segment {
                    slot: s as usize,
                    tokens: &tokens[s as usize],
                })
                .collect();
            let what = format!("decode step {step}");
            both(&mut by_slot, &mut paged, &segments, &what);
        }
        by_slot.clear(2);
        paged.clear(2);
        both(
            &mut by_slot,
            &mut paged,
            &[
                Segment {
                    slot: 2,
                    tokens: &prompts[2],
                },
                Segment {
                    slot: 0,
                    tokens: &[5],
                },
            ],
            "a cleared slot refilled",
        );
        for slot in 0..3 {
            paged.clear(slot);
        }
        assert_eq!(paged.unpromised_blocks(), Some(40));
    }
}

/// A slot is promised the blocks its sequence will take, less the full blocks of a prefix it
/// shares; a promise beyond the free blocks (and a margin) is refused; a slot may go past its
/// promise only into blocks nobody was promised, and grows all at once or not at all; clearing
/// hands back its blocks and what is left of its promise.
#[test]
fn a_paged_cache_promises_blocks_and_takes_them_back() {
    let model = model("tiny-llama");
    // 6 blocks of 3 positions; slots of up to 10 positions (4 blocks).
    let mut cache = KvCache::paged(&model, (2, 10), (6, 3)).unwrap();
    assert!(cache.reserve(0, 10, 0, 0).unwrap());
    assert_eq!(cache.unpromised_blocks(), Some(2));
    assert!(!cache.reserve(1, 10, 0, 0).unwrap());
    // Sharing a 9-position prefix (3 full blocks) it needs one block of its own.
    assert!(cache.reserve(1, 10, 9, 0).unwrap());
    assert_eq!(cache.unpromised_blocks(), Some(1));
    // Slot 1 unshared after all: its promised block, then the one nobody was promised, then none.
    let tokens = [5u32, 6, 7, 8, 9, 10];
    feed(
        &model,
        &mut cache,
        &[Segment {
            slot: 1,
            tokens: &tokens,
        }],
    );
    assert_eq!(cache.unpromised_blocks(), Some(0));
    let err = model
        .feed_tensor(
            &[Segment {
                slot: 1,
                tokens: &[11],
            }],
            &mut cache,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("no blocks left for this pass"),
        "{err}"
    );
    // Slot 0's promise still holds its 4 blocks.
    let prompt = [1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    feed(
        &model,
        &mut cache,
        &[Segment {
            slot: 0,
            tokens: &prompt,
        }],
    );
    cache.clear(1);
    assert_eq!(cache.unpromised_blocks(), Some(2));
    cache.clear(0);
    assert_eq!(cache.unpromised_blocks(), Some(6));
    // Growing: the slot's own promise first, then blocks nobody was promised, or nothing at all.
    assert!(cache.reserve(0, 4, 0, 0).unwrap());
    assert!(cache.grow(0, 10).unwrap());
    assert_eq!(cache.unpromised_blocks(), Some(2));
    assert!(!cache.grow(1, 9).unwrap());
    assert_eq!(cache.unpromised_blocks(), Some(2));
    // A margin of free blocks beyond the promise.
    assert!(!cache.reserve(1, 3, 0, 2).unwrap());
    assert!(cache.reserve(1, 3, 0, 1).unwrap());
    cache.clear(0);
    cache.clear(1);
    assert_eq!(cache.unpromised_blocks(), Some(6));
    // Too few blocks for one sequence, and a promise past a slot's positions, are errors.
    let err = KvCache::paged(&model, (2, 10), (3, 3)).err().unwrap();
    assert!(
        err.to_string().contains("cannot hold one sequence"),
        "{err}"
    );
    assert!(cache.reserve(0, 11, 0, 0).is_err());
}

/// A feed or a copy that runs out of blocks fails before it takes any: the blocks it could
/// have taken stay free, and the slots it would have shared keep theirs alone.
#[test]
fn a_paged_cache_that_runs_short_changes_nothing() {
    let model = model("tiny-llama");
    // 6 blocks of 3 positions; slot 0 promised 3 of them.
    let mut cache = KvCache::paged(&model, (3, 10), (6, 3)).unwrap();
    assert!(cache.reserve(0, 9, 0, 0).unwrap());
    feed(
        &model,
        &mut cache,
        &[Segment {
            slot: 1,
            tokens: &[5, 6, 7, 8],
        }],
    );
    assert_eq!(cache.unpromised_blocks(), Some(1));
    // Slot 1's next 6 positions need 2 more blocks; 1 is free.
    let err = model
        .feed_tensor(
            &[Segment {
                slot: 1,
                tokens: &[9, 10, 11, 12, 13, 14],
            }],
            &mut cache,
        )
        .unwrap_err();
    assert!(err.to_string().contains("no blocks left"), "{err}");
    assert_eq!(cache.unpromised_blocks(), Some(1));
    // A pass whose first slot would fit but whose second would not takes nothing either, nor
    // does one with a token outside the vocabulary.
    let two = [
        Segment {
            slot: 1,
            tokens: &[9, 10, 11],
        },
        Segment {
            slot: 2,
            tokens: &[1, 2, 3, 4],
        },
    ];
    let err = model.feed_tensor(&two, &mut cache).unwrap_err();
    assert!(err.to_string().contains("2 slots need 3 blocks"), "{err}");
    assert_eq!(cache.unpromised_blocks(), Some(1));
    let outside = [Segment {
        slot: 1,
        tokens: &[9, 10, 1 << 20],
    }];
    assert!(model.feed_tensor(&outside, &mut cache).is_err());
    assert_eq!(cache.unpromised_blocks(), Some(1));
    assert_eq!(cache.len(1), 4);
    // Its next 3 take that one; slot 0's 7 positions fill its 3 promised blocks.
    for (slot, tokens) in [(1, &[9u32, 10, 11][..]), (0, &[1, 2, 3, 4, 5, 6, 7])] {
        feed(&model, &mut cache, &[Segment { slot, tokens }]);
    }
    assert_eq!(cache.unpromised_blocks(), Some(0));
    // A copy of slot 1's 7 positions would share its 2 full blocks and need one of its own for
    // the last position: none is free.
    let err = cache.copy_slot(1, 2).unwrap_err();
    assert!(err.to_string().contains("no block left"), "{err}");
    assert_eq!(cache.len(2), 0);
    // Slot 2 shares nothing: clearing slot 1 frees all 3 of its blocks.
    cache.clear(1);
    assert_eq!(cache.unpromised_blocks(), Some(3));
    cache.clear(0);
    assert_eq!(cache.unpromised_blocks(), Some(6));
}

/// Generation on paged caches, a prompt's three samples sharing its prefill, with pools from
/// ample to one sequence's worth and blocks of 1 to 7 positions: the greedy tokens of a whole
/// forward pass per step, and the log-probs of the cache by slot. Sequences start on their
/// prompt's blocks alone, so the small pools run out as they decode: the sequences started last
/// give their blocks back and are computed again from their tokens when blocks are free (a pool
/// of one sequence's worth, 9 blocks of 3, cannot hold the 7 slots' sequences of 13 to 26
/// positions). With a few prompt tokens per step, sequences still prefilling are preempted too
/// (those that sampled nothing yet start afresh). Only the pools too small for every slot's
/// longest preempt.
#[test]
fn paged_generation_is_the_greedy_continuation() {
    let params = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: None,
        min_p: 0.0,
        max_new_tokens: 12,
    };
    for name in optune_testkit::FAMILY_MODELS {
        let model = model(name);
        let requests = common::samples_of_each_prompt(4, 3);
        let run = |batching: Batching| {
            generate(
                &model,
                &requests,
                &params,
                Stopping::eos(&[]),
                batching,
                |_, _| {},
            )
            .unwrap()
        };
        let by_slot = run(Batching::new(4));
        assert_eq!(by_slot.preemptions, 0);
        // The longest request takes 14 + 12 = 26 positions: 9 blocks of 3, 4 of 7. The first
        // pool holds 4 slots of the longest; the others must preempt, the chunked ones also
        // sequences still prefilling.
        // With the preemptions each pool makes, and the positions they compute again: the
        // schedule depends on the lengths alone, the same for every family and kernel path.
        let pools = [
            (4, (64, 4), 64, (0, 0)),
            (7, (9, 3), 64, (13, 139)),
            (3, (5, 7), 64, (7, 89)),
            (2, (26, 1), 64, (5, 68)),
        ];
        let chunked = [(7, (9, 3), 4, (11, 116)), (5, (13, 2), 3, (18, 147))];
        for (slots, blocks, per_step, cost) in pools.into_iter().chain(chunked) {
            let paged = run(Batching {
                kv_blocks: Some(blocks),
                prompt_tokens_per_step: per_step,
                ..Batching::new(slots)
            });
            let ample = blocks.0 >= slots * 26usize.div_ceil(blocks.1);
            assert_eq!(paged.preemptions == 0, ample, "{name}: {blocks:?}");
            assert_eq!(
                (paged.preemptions, paged.recomputed_tokens),
                cost,
                "{name}: {blocks:?}"
            );
            let pairs = paged.generations.iter().zip(&by_slot.generations);
            for (i, (got, want)) in pairs.enumerate() {
                let what = format!("{name}: {slots} slots, {blocks:?} blocks, request {i}");
                let prompt = &requests[i].prompt_ids;
                assert_eq!(
                    got.tokens,
                    common::argmax_continuation(&model, prompt, 12),
                    "{what}"
                );
                assert!(
                    (got.logp - want.logp).abs() <= 1e-4 * want.logp.abs().max(1.0),
                    "{what}: {} vs {}",
                    got.logp,
                    want.logp
                );
            }
        }
    }
}

/// Memory goes first to a step's working memory (every sequence's token and logits, and the
/// prompt tokens of a step), then to the cache; there are never more sequences than the cache
/// has blocks or slots, each count is the most that fits, and below one sequence of the longest
/// beside its working memory sizing is refused. Whichever cache the kernel path makes: paged
/// (tensors) or by slot (the fused path's host vectors).
#[test]
fn memory_holds_a_steps_working_memory_then_the_cache() {
    let model = model("tiny-llama");
    // 15 requests of up to 14 prompt tokens, 60 new ones: 74 positions, 3 blocks of 32.
    let requests = common::samples_of_each_prompt(1, 3);
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: None,
        min_p: 0.0,
        max_new_tokens: 60,
    };
    let (most, prompt_tokens) = (requests.len(), 64);
    let paged = KvCache::can_page(&model);
    let (unit, per_slot) = match paged {
        true => (KvCache::slot_bytes(&model, KvCache::BLOCK) as f64, 3),
        false => (KvCache::slot_bytes(&model, 74) as f64, 1),
    };
    let token = model.activation_bytes_per_token() as f64;
    let per_sequence =
        token + (2 * model.config().vocab_size * model.dtype().size_in_bytes()) as f64;
    let prompt = prompt_tokens as f64 * token;
    let smallest = per_slot as f64 * unit + prompt + per_sequence;
    let units_left = |budget: f64, slots: usize| {
        ((budget - prompt - slots as f64 * per_sequence) / unit).floor() as usize
    };
    let mut sizes = std::collections::BTreeSet::new();
    for step in 0..400 {
        // Off the exact boundary (one sequence's worth), where rounding decides.
        let budget = smallest * (0.901 + step as f64 * 0.05);
        let size = match cache_for_memory(&model, &requests, &params, budget, most, prompt_tokens) {
            Err(err) => {
                assert!(budget < smallest, "{budget}: {err}");
                assert!(err.to_string().contains("working memory"), "{err}");
                continue;
            }
            Ok(size) => size,
        };
        assert!(budget >= smallest, "{budget}");
        let slots = size.slots;
        assert!((1..=most).contains(&slots), "{budget}: {size:?}");
        assert_eq!(size.working_bytes, prompt + slots as f64 * per_sequence);
        assert!(
            size.bytes + size.working_bytes <= budget,
            "{budget}: {size:?}"
        );
        let units = match size.blocks {
            Some(blocks) => {
                assert!(paged);
                assert!(blocks >= per_slot.max(slots) && blocks <= most * per_slot);
                assert_eq!(blocks, units_left(budget, slots).min(slots * per_slot));
                blocks
            }
            None => {
                assert!(!paged);
                slots
            }
        };
        assert_eq!(size.bytes, units as f64 * unit);
        // One sequence more would leave fewer units than sequences, or than the longest takes.
        assert!(
            slots == most || units_left(budget, slots + 1) < (slots + 1).max(per_slot),
            "{budget}: {size:?}"
        );
        sizes.insert((slots, units));
    }
    // From one sequence to the most, through counts between.
    assert!(sizes.iter().any(|&(slots, _)| slots == 1), "{sizes:?}");
    assert!(sizes.iter().any(|&(slots, _)| slots == most), "{sizes:?}");
    assert!(sizes.len() > 10, "{sizes:?}");
}
