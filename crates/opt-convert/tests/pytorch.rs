//! opt-convert on checkpoint directories with PyTorch weights (testdata made by
//! scripts/reference/make_pytorch_testdata.py from the committed safetensors models): the tensors
//! come back bit for bit, the tools read the result, and a bad input leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use optune_testkit::{assert_failed_cleanly, run, sibling_binary, workspace_root, Outcome};

const OPT_CONVERT: &str = env!("CARGO_BIN_EXE_opt-convert");

fn model(name: &str) -> PathBuf {
    workspace_root().join("testdata/models").join(name)
}

fn convert(input: &Path, output: &Path) -> Outcome {
    run(
        Command::new(OPT_CONVERT).arg(input).arg("-o").arg(output),
        None,
    )
}

/// Every tensor of the safetensors files in `dir`, by name.
fn tensors_in(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut tensors = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for (name, tensor) in candle_core::safetensors::load(&path, &Device::Cpu).unwrap() {
                assert!(
                    tensors.insert(name.clone(), tensor).is_none(),
                    "{name} twice"
                );
            }
        }
    }
    tensors
}

fn assert_same_tensors(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, tensor) in want {
        let other = &got[name];
        assert_eq!(
            (other.dtype(), other.dims()),
            (tensor.dtype(), tensor.dims()),
            "{name}"
        );
        // Widening bf16 to f32 is exact, so equal f32 bits are equal stored bits (dtypes match).
        let bits = |t: &Tensor| -> Vec<u32> {
            let wide = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            wide.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert!(bits(other) == bits(tensor), "{name}: values differ");
    }
}

#[test]
fn sharded_float32_weights_come_back_bit_for_bit_and_score_as_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rm");
    let outcome = convert(&model("tiny-rm-mistral-pytorch"), &out);
    outcome.assert_success();
    assert!(
        outcome.stderr.contains("21 tensors") && outcome.stderr.contains("2 safetensors files"),
        "{}",
        outcome.stderr
    );
    // One safetensors file per pickle file, an index naming them, the other files as they were.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    files.sort_unstable();
    files.dedup();
    assert_eq!(
        files,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(model("tiny-rm-mistral").join(name)).unwrap(),
            "{name}"
        );
    }
    assert!(!out.join("pytorch_model.bin.index.json").exists());
    assert_same_tensors(&tensors_in(&out), &tensors_in(&model("tiny-rm-mistral")));

    // The reward model reads as the original does: the same rewards, to the bit.
    let Some(opt_score) = sibling_binary(OPT_CONVERT, "opt-score") else {
        panic!("opt-score is not built beside opt-convert (cargo test --workspace builds it)");
    };
    let responses = workspace_root().join("testdata/shards/scored.jsonl");
    let rewards = |rm: &Path, name: &str| -> Vec<serde_json::Value> {
        let output = dir.path().join(name);
        run(
            Command::new(&opt_score)
                .arg(&responses)
                .arg("--rm")
                .arg(rm)
                .arg("-o")
                .arg(&output),
            None,
        )
        .assert_success();
        std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["reward"].clone())
            .collect()
    };
    let converted = rewards(&out, "converted.jsonl");
    assert_eq!(converted.len(), 12);
    assert_eq!(
        converted,
        rewards(&model("tiny-rm-mistral"), "original.jsonl")
    );
}

#[test]
fn bfloat16_weights_stay_bfloat16() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("policy");
    convert(&model("tiny-llama-pytorch-bf16"), &out).assert_success();
    let want: BTreeMap<String, Tensor> = tensors_in(&model("tiny-llama"))
        .into_iter()
        .map(|(name, t)| (name, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    assert_same_tensors(&tensors_in(&out), &want);
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("model.safetensors.index.json").exists());
}

#[test]
fn the_tools_name_opt_convert_for_pytorch_weights() {
    let Some(opt_gen) = sibling_binary(OPT_CONVERT, "opt-gen") else {
        panic!("opt-gen is not built beside opt-convert (cargo test --workspace builds it)");
    };
    let bin_dir = model("tiny-llama-pytorch-bf16");
    let outcome = run(
        Command::new(opt_gen)
            .arg("--model")
            .arg(&bin_dir)
            .arg(workspace_root().join("testdata/shards/prompts.jsonl")),
        None,
    );
    assert!(!outcome.status.success());
    assert!(
        outcome.stderr.contains("pytorch_model.bin")
            && outcome
                .stderr
                .contains(&format!("opt-convert {}", bin_dir.display())),
        "{}",
        outcome.stderr
    );
}

#[test]
fn bad_inputs_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let copy = |name: &str, from: &str| -> PathBuf {
        let target = dir.path().join(name);
        std::fs::create_dir(&target).unwrap();
        for entry in std::fs::read_dir(model(from)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, target.join(path.file_name().unwrap())).unwrap();
        }
        target
    };

    // A shard cut short: the error names it, and neither the output nor its staging is left.
    let truncated = copy("truncated", "tiny-rm-mistral-pytorch");
    let shard = truncated.join("pytorch_model-00002-of-00002.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let outcome = convert(&truncated, &outputs.join("rm"));
    assert_failed_cleanly(
        "truncated shard",
        &outcome,
        &["pytorch_model-00002-of-00002.bin"],
        &outputs,
    );

    // An index naming a shard that is not there.
    let missing = copy("missing", "tiny-rm-mistral-pytorch");
    std::fs::remove_file(missing.join("pytorch_model-00001-of-00002.bin")).unwrap();
    let outcome = convert(&missing, &outputs.join("rm"));
    assert_failed_cleanly(
        "missing shard",
        &outcome,
        &["pytorch_model-00001-of-00002.bin"],
        &outputs,
    );

    // A directory without PyTorch weights, and one that already has safetensors.
    let outcome = convert(&model("tiny-llama-base"), &outputs.join("rm"));
    assert_failed_cleanly(
        "no pickle",
        &outcome,
        &["pytorch_model.bin", "tiny-llama-base"],
        &outputs,
    );
    let both = copy("both", "tiny-llama-pytorch-bf16");
    std::fs::copy(
        model("tiny-llama").join("model.safetensors"),
        both.join("model.safetensors"),
    )
    .unwrap();
    let outcome = convert(&both, &outputs.join("rm"));
    assert_failed_cleanly(
        "already safetensors",
        &outcome,
        &["model.safetensors", "no conversion"],
        &outputs,
    );

    // A target that is not empty is never replaced.
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("keep.txt"), "mine").unwrap();
    let outcome = convert(&model("tiny-llama-pytorch-bf16"), &taken);
    assert!(
        !outcome.status.success() && outcome.stderr.contains("not empty"),
        "{}",
        outcome.stderr
    );
    assert_eq!(
        std::fs::read_to_string(taken.join("keep.txt")).unwrap(),
        "mine"
    );
}
