//! The checkpoint's name tree stated once (`llama_weight_shapes`) against the testdata
//! checkpoints of each family: the same names and shapes as their files hold, the count of
//! weights a loaded model reports, and the names and shapes of the adapters' weights `attach_lora` makes. A run sized
//! from its config alone (`opt-wdpo --plan-only`) rests on these.

use candle_core::{DType, Device};
use optune_model::lora::{attach_lora, LoraConfig};
use optune_model::{llama_weight_shapes, load_model, weight_count, ModelConfig};
use std::path::PathBuf;

fn model_dir(name: &str) -> PathBuf {
    optune_testkit::workspace_root()
        .join("testdata/models")
        .join(name)
}

/// The language models of testdata: one of each family (`optune_testkit::FAMILY_MODELS`) and a
/// base model without a chat template.
fn language_models() -> impl Iterator<Item = &'static str> {
    optune_testkit::FAMILY_MODELS
        .into_iter()
        .chain(["tiny-llama-base"])
}

#[test]
fn the_name_tree_is_the_checkpoints_own() {
    for name in language_models() {
        let dir = model_dir(name);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let stored =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut stored: Vec<(String, Vec<usize>)> = stored
            .into_iter()
            .map(|(name, t)| (name, t.dims().to_vec()))
            .collect();
        stored.sort();
        let mut stated = optune_checkpoint::layout::Layout::of(&config)
            .stored_shapes(llama_weight_shapes(&config));
        stated.sort();
        assert_eq!(stated, stored, "{name}");
        let (model, _, _) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(weight_count(&config), model.parameter_count(), "{name}");
    }
}

#[test]
fn adapter_weights_are_stated_from_the_config() {
    let targets: [&[&str]; 3] = [
        &["q_proj", "v_proj"],
        &["q_proj", "k_proj", "v_proj", "o_proj"],
        &optune_testkit::LLAMA_PROJECTIONS,
    ];
    for name in language_models() {
        let dir = model_dir(name);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        for targets in targets {
            let lora = LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: targets.iter().map(|t| t.to_string()).collect(),
            };
            let (mut model, _, _) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
            let mut attached: Vec<(String, Vec<usize>)> = attach_lora(&mut model, &lora, 0)
                .unwrap()
                .vars
                .iter()
                .map(|(name, var)| (name.clone(), var.dims().to_vec()))
                .collect();
            attached.sort();
            let mut stated = lora.adapter_weight_shapes(&config).unwrap();
            stated.sort();
            assert_eq!(stated, attached, "{name} {targets:?}");
            let elements: usize = attached
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            assert_eq!(
                lora.adapter_weight_count(&config).unwrap(),
                elements,
                "{name} {targets:?}"
            );
        }
    }
}
