//! A bf16 model read from an f32 checkpoint, and saved back to it, never holds an f32 copy of its
//! weights whole: the checkpoint is read and cast a tensor at a time, and written a tensor at a
//! time. The heap is counted by a counting allocator, so this file holds one test: the counts are
//! the whole test process's.

use candle_core::{DType, Device};
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{llama_weight_shapes, load_model, save_checkpoint, ModelConfig, SavedWeight};
use optune_testkit::memory::{write_wide_llama, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;

#[test]
fn a_bf16_model_is_read_and_saved_without_an_f32_copy_of_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wide");
    // 4 layers of 512 × 1024: 40 MB of f32 weights, the largest tensor 2 MB.
    let f32_bytes = write_wide_llama(&dir, 512, 1024, 4, |json| {
        llama_weight_shapes(&ModelConfig::from_json_str(json).unwrap())
    }) as f64;

    let before = CountingAllocator::reset_peak();
    let (model, _, meta) = load_model(&dir, DType::BF16, &Device::Cpu).unwrap();
    let load_peak = (CountingAllocator::peak() - before) as f64;
    let held = CountingAllocator::live() as f64 - before as f64;
    // The bf16 weights are half the f32 bytes; the tokenizer and rotary tables add little.
    assert!(
        held <= 0.6 * f32_bytes,
        "the loaded bf16 model holds {:.1} MB for {:.1} MB of f32 weights",
        held / MB,
        f32_bytes / MB
    );
    // Reading the file whole and then casting held the file's bytes and an f32 tensor of each
    // weight at once: twice the f32 weights, 4× the bf16 model.
    assert!(
        load_peak <= 0.75 * f32_bytes,
        "reading the bf16 model peaked at {:.1} MB above the start for {:.1} MB of f32 weights",
        load_peak / MB,
        f32_bytes / MB
    );

    // The config says float32, so the bf16 model is saved as f32, one tensor cast at a time.
    let out = tmp.path().join("saved");
    let before = CountingAllocator::reset_peak();
    save_checkpoint(&model, &meta, &out).unwrap();
    let save_peak = (CountingAllocator::peak() - before) as f64;
    assert!(
        save_peak <= 0.25 * f32_bytes,
        "saving the bf16 model as f32 peaked at {:.1} MB above the start for {:.1} MB of f32 \
         weights",
        save_peak / MB,
        f32_bytes / MB
    );
    eprintln!(
        "f32 weights {:.1} MB: bf16 model held {:.1} MB, read peak {:.1} MB, save peak {:.1} MB",
        f32_bytes / MB,
        held / MB,
        load_peak / MB,
        save_peak / MB
    );

    // What was saved is the model's weights, exactly, in f32.
    let saved =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let weights = model.saved_weights();
    assert_eq!(saved.len(), weights.len());
    for (name, weight) in weights {
        let weight = weight.tensor().unwrap();
        let stored = &saved[&name];
        assert_eq!(stored.dtype(), DType::F32, "{name}");
        let want: Vec<f32> = weight
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = stored.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            want == got,
            "{name}: the saved weights differ from the model's"
        );
    }

    // With LoRA on every projection the checkpoint holds merged weights, each made as it is
    // written: merging them all first held a merged copy of every projection beside the model.
    let mut model = model;
    let config = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: optune_testkit::LLAMA_PROJECTIONS.map(String::from).to_vec(),
    };
    attach_lora(&mut model, &config, 0).unwrap();
    let projection_bytes: usize = model
        .saved_weights()
        .iter()
        .filter(|(name, _)| name.contains("_proj"))
        .map(|(_, weight)| 2 * weight.shape().iter().product::<usize>())
        .sum();
    let merged_out = tmp.path().join("merged");
    let before = CountingAllocator::reset_peak();
    save_checkpoint(&model, &meta, &merged_out).unwrap();
    let merged_peak = (CountingAllocator::peak() - before) as f64;
    eprintln!(
        "merged save peak {:.1} MB; bf16 projections {:.1} MB",
        merged_peak / MB,
        projection_bytes as f64 / MB
    );
    assert!(
        merged_peak <= 0.5 * projection_bytes as f64,
        "saving the LoRA model merged peaked at {:.1} MB above the start for {:.1} MB of bf16 \
         projections",
        merged_peak / MB,
        projection_bytes as f64 / MB
    );
}
