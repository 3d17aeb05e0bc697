//! Sharing a prompt's prefill among its samples copies that slot's keys and values alone, never a
//! layer's whole cache: with `--kv-memory` the cache fills most of a GPU, where a copy of one
//! layer's store per fork would cost gigabytes and could run out of memory. The heap is counted by
//! a counting allocator, so this file holds one test: the counts are the whole test process's.

mod common;

use candle_core::DType;
use optune_model::transformer::Segment;
use optune_model::KvCache;
use optune_testkit::memory::CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn a_shared_prefill_copies_one_slot_not_the_cache() {
    let model = common::model("tiny-llama");
    let config = model.config();
    let (slots, capacity) = (64, 256);
    let mut cache = KvCache::new_tensors(&model, slots, capacity).unwrap();
    let prompt = &common::prompts()[0];
    model
        .feed_tensor(
            &[Segment {
                slot: 0,
                tokens: prompt,
            }],
            &mut cache,
        )
        .unwrap();

    let slot_bytes =
        2 * config.num_kv_heads() * capacity * config.head_dim() * DType::F32.size_in_bytes();
    let store_bytes = slots * slot_bytes;
    let before = CountingAllocator::reset_peak();
    cache.copy_slot(0, 1).unwrap();
    let peak = CountingAllocator::peak() - before;
    // One layer at a time, the slot gathered once: a slot's bytes (plus bookkeeping), where a
    // clone of the layer's store would be `slots` times that.
    assert!(
        peak <= 2 * slot_bytes,
        "copying one slot peaked at {peak} bytes: a slot holds {slot_bytes}, a layer's store \
         {store_bytes}"
    );
    assert_eq!(cache.len(1), prompt.len());

    // The copy is the prefill: the same next token on both slots gives the same logits.
    let next = [7u32];
    let logits = model
        .feed(
            &[
                Segment {
                    slot: 0,
                    tokens: &next,
                },
                Segment {
                    slot: 1,
                    tokens: &next,
                },
            ],
            &mut cache,
        )
        .unwrap();
    let vocab = config.vocab_size;
    assert_eq!(logits[..vocab], logits[vocab..]);
}
