//! Saving and reloading checkpoints, and the errors a bad checkpoint gives.

use candle_core::{DType, Device};
use optune_model::{load_model, save_checkpoint};
use std::path::{Path, PathBuf};

fn model_dir(name: &str) -> PathBuf {
    optune_testkit::workspace_root()
        .join("testdata/models")
        .join(name)
}

/// The weights a checkpoint of `model` holds, by name.
fn weights(model: &optune_model::Transformer) -> Vec<(String, candle_core::Tensor)> {
    use optune_model::SavedWeight;
    model
        .saved_weights()
        .into_iter()
        .map(|(name, weight)| (name, weight.tensor().unwrap()))
        .collect()
}

#[test]
fn a_saved_checkpoint_reloads_bit_identically() {
    let reward_models = ["tiny-rm-mistral", "tiny-rm-phi3"];
    for name in optune_testkit::FAMILY_MODELS
        .into_iter()
        .chain(reward_models)
    {
        let (model, _, meta) = load_model(&model_dir(name), DType::F32, &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        save_checkpoint(&model, &meta, &out).unwrap();
        for file in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(file).is_file(), "{name}: {file} not written");
        }
        // The checkpoint's own name tree: Phi-3's projections stacked back into its fused ones.
        let names = |dir: &Path| -> Vec<String> {
            let mut names: Vec<String> =
                candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                    .unwrap()
                    .into_keys()
                    .collect();
            names.sort();
            names
        };
        assert_eq!(names(&out), names(&model_dir(name)), "{name}: saved names");
        let (again, _, _) = load_model(&out, DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (weights(&model), weights(&again));
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
            let vb: Vec<f32> = tb.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: {na} changed"
            );
        }
        // Saving over an existing checkpoint replaces it and leaves no temporary directories.
        save_checkpoint(&again, &meta, &out).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("saved")]);
    }
}

fn load_error(edit: impl FnOnce(&Path)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = optune_testkit::copy_model("tiny-llama", &tmp.path().join("m"));
    edit(&dir);
    match load_model(&dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading succeeded"),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    optune_testkit::edit_json(&dir.join("config.json"), f);
}

#[test]
fn unknown_model_type_names_it() {
    let err = load_error(|d| edit_config(d, |v| v["model_type"] = "gpt_neox".into()));
    assert!(
        err.contains("unsupported model_type 'gpt_neox'") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn missing_weight_names_it() {
    let err = load_error(|d| {
        let path = d.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        tensors.remove("model.layers.1.mlp.up_proj.weight");
        candle_core::safetensors::save(&tensors, &path).unwrap();
    });
    assert!(
        err.contains("missing weight 'model.layers.1.mlp.up_proj.weight'"),
        "{err}"
    );
}

#[test]
fn tokenizer_larger_than_the_vocab_is_rejected() {
    let err = load_error(|d| edit_config(d, |v| v["vocab_size"] = 100.into()));
    assert!(
        err.contains("tokenizer has 512 tokens but the model's vocab_size is 100"),
        "{err}"
    );
}

#[test]
fn missing_directory_is_named() {
    let err = load_model(Path::new("/nonexistent/model"), DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("/nonexistent/model"), "{err:#}");
}
