//! opt-wdpo end to end on the tiny testdata models.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> PathBuf {
    repo().join("testdata/models").join(name)
}

/// Eight pairs: the chosen replies are cheerful, the rejected ones gloomy.
fn write_pairs(path: &Path) {
    let prompts = [
        "Tell me about your day.",
        "How was the film?",
        "Describe the sea.",
        "What do you think of rain?",
        "Review this cafe.",
        "How is the weather?",
        "Describe your trip.",
        "What about the concert?",
    ];
    let mut text = String::new();
    for (i, p) in prompts.iter().enumerate() {
        let row = serde_json::json!({
            "prompt_id": format!("p{i}"),
            "messages": [{"role": "user", "content": p}],
            "chosen": format!("It was great and happy {i}!"),
            "rejected": format!("It was bad, sad and awful {i}."),
            "chosen_reward": 0.8, "rejected_reward": -0.5, "reward_gap": 1.3 - i as f64 * 0.1,
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn wdpo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_opt-wdpo"))
        .args(args)
        .args(["--threads", "2"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn metrics(dir: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    text.lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn column(rows: &[Vec<String>], name: &str) -> Vec<f64> {
    let i = rows[0]
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    rows[1..].iter().map(|r| r[i].parse().unwrap()).collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                t.flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn training_lowers_the_loss_and_widens_the_margin() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = tmp.path().join("policy");
    let (ok, err) = wdpo(&[
        "--policy",
        model("tiny-llama").to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--lr",
        "1e-3",
        "--epochs",
        "6",
        "--batch-size",
        "4",
        "--warmup-ratio",
        "0",
        "--schedule",
        "constant",
    ]);
    assert!(ok, "{err}");
    let rows = metrics(&out);
    let loss = column(&rows, "loss");
    let margin = column(&rows, "rewards/margins");
    assert_eq!(loss.len(), 12);
    assert!(loss.last().unwrap() < &(loss[0] * 0.5), "loss {loss:?}");
    assert!(margin.last().unwrap() > &margin[0], "margins {margin:?}");
    // The checkpoint reloads in our code.
    optune_model::load_model(&out, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
}

#[test]
fn zero_learning_rate_returns_the_input_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = tmp.path().join("policy");
    let (ok, err) = wdpo(&[
        "--policy",
        model("tiny-qwen2").to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--lr",
        "0",
    ]);
    assert!(ok, "{err}");
    let trained = weights(&out);
    let original = weights(&model("tiny-qwen2"));
    assert_eq!(trained.len(), original.len());
    for ((na, a), (nb, b)) in trained.iter().zip(&original) {
        assert_eq!(na, nb);
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{na} changed"
        );
    }
}

#[test]
fn precomputed_reference_gives_the_same_result() {
    // The columns hold summed log-probs; IPO divides them by the response length, as it divides
    // the policy's.
    for loss in ["sigmoid", "ipo"] {
        let tmp = tempfile::tempdir().unwrap();
        let pairs = tmp.path().join("pairs.jsonl");
        write_pairs(&pairs);
        let common = [
            "--lr",
            "1e-3",
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--loss",
            loss,
        ];
        let train = |out: &Path, extra: &[&str]| {
            let (ok, err) = wdpo(
                &[
                    &[
                        "--policy",
                        model("tiny-llama").to_str().unwrap(),
                        pairs.to_str().unwrap(),
                        "-o",
                        out.to_str().unwrap(),
                    ][..],
                    &common[..],
                    extra,
                ]
                .concat(),
            );
            assert!(ok, "{loss}: {err}");
        };
        let first = tmp.path().join("a");
        train(&first, &["--precompute-ref"]);
        let written = std::fs::read_to_string(&pairs).unwrap();
        assert!(
            written.contains("ref_chosen_logp"),
            "{loss}: reference columns not written"
        );
        let second = tmp.path().join("b");
        train(&second, &[]);
        assert_eq!(weights(&first), weights(&second), "{loss}");
    }
}

#[test]
fn lora_trains_adapters_and_saves_merged_and_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = tmp.path().join("policy");
    let (ok, err) = wdpo(&[
        "--policy",
        model("tiny-mistral").to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--lora-targets",
        "q_proj,v_proj,down_proj",
        "--lr",
        "5e-3",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--save-adapter",
    ]);
    assert!(ok, "{err}");
    let rows = metrics(&out);
    let loss = column(&rows, "loss");
    assert!(loss.last().unwrap() < &loss[0], "loss {loss:?}");
    assert!(
        out.join("adapter/adapter_config.json").is_file()
            && out.join("adapter/adapter_model.safetensors").is_file()
    );
    let merged = weights(&out);
    let base = weights(&model("tiny-mistral"));
    let changed: Vec<&String> = merged
        .iter()
        .zip(&base)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| &a.0)
        .collect();
    assert!(
        !changed.is_empty()
            && changed
                .iter()
                .all(|n| n.contains("q_proj") || n.contains("v_proj") || n.contains("down_proj")),
        "{changed:?}"
    );
}

#[test]
fn lora_dropout_is_reproducible_with_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let train = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let (ok, err) = wdpo(&[
            "--policy",
            model("tiny-llama").to_str().unwrap(),
            pairs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--lora-rank",
            "4",
            "--lora-dropout",
            "0.3",
            "--lr",
            "5e-3",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--seed",
            seed,
        ]);
        assert!(ok, "{err}");
        weights(&out)
    };
    let first = train("a", "1");
    assert_eq!(first, train("b", "1"), "same seed, different weights");
    assert_ne!(
        first,
        train("c", "2"),
        "the seed does not reach the dropout masks"
    );
}

#[test]
fn hypo_keeps_the_policy_closer_to_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let run = |coef: &str, dir: &str| {
        let out = tmp.path().join(dir);
        let (ok, err) = wdpo(&[
            "--policy",
            model("tiny-llama").to_str().unwrap(),
            pairs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--loss",
            "hypo",
            "--kl-coef",
            coef,
            "--kl-samples",
            "4",
            "--kl-max-new-tokens",
            "8",
            "--lora-rank",
            "4",
            "--lr",
            "2e-2",
            "--epochs",
            "4",
            "--batch-size",
            "4",
            "--warmup-ratio",
            "0",
        ]);
        assert!(ok, "{err}");
        column(&metrics(&out), "kl")
    };
    let free = run("0", "free");
    let held = run("5", "held");
    let tail = |v: &[f64]| v[v.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        tail(&held) < tail(&free),
        "KL with λ=5: {held:?}; with λ=0: {free:?}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, "{\"prompt\": \"hi\", \"chosen\": \"a\"}\n").unwrap();
    let out = tmp.path().join("policy");
    let (ok, err) = wdpo(&[
        "--policy",
        model("tiny-llama").to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("rejected") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists());
}
