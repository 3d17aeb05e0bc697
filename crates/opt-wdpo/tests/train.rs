//! opt-wdpo end to end on the tiny testdata models.

use optune_testkit::untimed_metrics;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    optune_testkit::workspace_root()
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
    // Every family: among them Qwen3's norms of each query and key head; Phi-3, whose saved
    // checkpoint stacks the trained projections back into its fused weights; SmolLM3's and
    // EXAONE 4's layers without a rotary embedding (unturned tables); OLMo 2's norms after the
    // sublayers and of the whole q and k projections; OLMo 3's sliding layer (its own mask and
    // tables); Gemma 3's norms scaling by 1 + weight (the stored weight trains); Granite's
    // multipliers.
    for name in optune_testkit::FAMILY_MODELS {
        lowers_the_loss_and_trains_every_weight(name);
    }
}

fn lowers_the_loss_and_trains_every_weight(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = tmp.path().join("policy");
    let (ok, err) = wdpo(&[
        "--policy",
        model(name).to_str().unwrap(),
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
    assert_eq!(loss.len(), 12, "{name}");
    assert!(
        loss.last().unwrap() < &(loss[0] * 0.5),
        "{name}: loss {loss:?}"
    );
    assert!(
        margin.last().unwrap() > &margin[0],
        "{name}: margins {margin:?}"
    );
    let (trained, original) = (weights(&out), weights(&model(name)));
    assert_eq!(
        trained.iter().map(|w| &w.0).collect::<Vec<_>>(),
        original.iter().map(|w| &w.0).collect::<Vec<_>>(),
        "{name}"
    );
    for ((weight, after), (_, before)) in trained.iter().zip(&original) {
        assert!(after != before, "{name}: {weight} was not trained");
    }
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

/// LoRA on Phi-3's fused query/key/value projection: the merged checkpoint keeps Phi-3's names,
/// and each layer's stored `qkv_proj` moved by exactly what the PEFT adapter adds to it,
/// `(α'/r')·B·A` with the adapter's rank and alpha patterns; nothing else moved.
#[test]
fn phi3_lora_merges_and_saves_the_fused_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = tmp.path().join("policy");
    let (ok, err) = wdpo(&[
        "--policy",
        model("tiny-phi3").to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--lora-targets",
        "qkv_proj",
        "--lr",
        "5e-3",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--save-adapter",
    ]);
    assert!(ok, "{err}");
    let peft: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(peft["target_modules"], serde_json::json!(["qkv_proj"]));
    let scale = peft["alpha_pattern"]["qkv_proj"].as_f64().unwrap()
        / peft["rank_pattern"]["qkv_proj"].as_f64().unwrap();
    assert_eq!(scale, 2.0);
    let device = candle_core::Device::Cpu;
    let adapter =
        candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &device)
            .unwrap();
    let (merged, base) = (weights(&out), weights(&model("tiny-phi3")));
    assert_eq!(
        merged.iter().map(|w| &w.0).collect::<Vec<_>>(),
        base.iter().map(|w| &w.0).collect::<Vec<_>>()
    );
    for ((name, after), (_, before)) in merged.iter().zip(&base) {
        let Some(linear) = name.strip_suffix(".qkv_proj.weight") else {
            assert_eq!(after, before, "{name} moved");
            continue;
        };
        let matrix = |m: &str| {
            adapter[&format!("base_model.model.{linear}.qkv_proj.lora_{m}.weight")].clone()
        };
        let delta: Vec<f32> = (matrix("B").matmul(&matrix("A")).unwrap() * scale)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let moved = delta.iter().map(|d| d.abs()).fold(0f32, f32::max);
        assert!(moved > 1e-4, "{name}: the adapter is still zero");
        for (i, ((a, b), d)) in after.iter().zip(before).zip(&delta).enumerate() {
            assert!((a - (b + d)).abs() <= 1e-6, "{name}[{i}]: {a} vs {b} + {d}");
        }
    }
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

/// --gradient-checkpointing changes the memory, not the result: the same weights to the bit, with
/// full fine-tuning and gradient accumulation, and with LoRA dropout (whose masks the recomputed
/// blocks must draw again) under HyPO (a second recomputed pass, over fresh samples). Untied
/// models: a tied embedding's two parts are summed in another order (the model's own test
/// covers it), and Adam would magnify that rounding in its smallest gradients.
#[test]
fn gradient_checkpointing_trains_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let cases: [(&str, &[&str]); 2] = [
        (
            "tiny-qwen2",
            &[
                "--lr",
                "1e-3",
                "--batch-size",
                "2",
                "--grad-accum",
                "2",
                "--epochs",
                "2",
            ],
        ),
        (
            "tiny-mistral",
            &[
                "--loss",
                "hypo",
                "--kl-samples",
                "2",
                "--kl-max-new-tokens",
                "6",
                "--lora-rank",
                "4",
                "--lora-dropout",
                "0.2",
                "--lora-targets",
                "q_proj,v_proj,gate_proj,down_proj",
                "--lr",
                "1e-2",
                "--batch-size",
                "4",
                "--epochs",
                "2",
            ],
        ),
    ];
    for (policy, extra) in cases {
        let kept = train_on(policy, tmp.path(), &format!("{policy}-kept"), &pairs, extra);
        let flag = [extra, &["--gradient-checkpointing"]].concat();
        let recomputed = train_on(
            policy,
            tmp.path(),
            &format!("{policy}-recomputed"),
            &pairs,
            &flag,
        );
        assert_eq!(weights(&kept), weights(&recomputed), "{policy}");
        assert_eq!(
            column(&metrics(&kept), "loss"),
            column(&metrics(&recomputed), "loss"),
            "{policy}"
        );
    }
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

/// Values the losses would refuse only at the first micro-batch (after the models have loaded
/// and the reference pass has run), and LoRA options without --lora-rank, are refused at once,
/// naming the flag.
#[test]
fn bad_arguments_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = tmp.path().join("policy");
    let cases: [(&[&str], &str); 18] = [
        (
            &["--loss", "sft", "--beta", "0.5"],
            "--beta: --loss sft does not use it",
        ),
        (
            &["--weight", "none", "--beta2", "2"],
            "--beta2: --weight none does not use it",
        ),
        (
            &["--weight", "none", "--weight-norm", "none"],
            "--weight-norm: --weight none does not use it",
        ),
        (
            &["--simpo-gamma", "3"],
            "--simpo-gamma: --loss sigmoid does not use it",
        ),
        (
            &["--kl-coef", "0.5"],
            "--kl-coef: --loss sigmoid does not use it",
        ),
        (
            &["--loss", "sft", "--ref", "/nonexistent"],
            "--ref: --loss sft does not use it",
        ),
        (&["--lr", "-1"], "--lr -1 must be finite and >= 0"),
        (
            &["--weight-decay", "NaN"],
            "--weight-decay NaN must be finite",
        ),
        (&["--max-grad-norm=-1"], "--max-grad-norm -1 must be finite"),
        (&["--beta", "0"], "--beta 0 must be finite and > 0"),
        (&["--beta2=-1"], "--beta2 -1 must be finite and >= 0"),
        (&["--loss", "rpo", "--rpo-alpha=-0.5"], "--rpo-alpha -0.5"),
        (
            &["--loss", "robust", "--label-smoothing", "0.5"],
            "< 0.5 for --loss robust",
        ),
        (
            &["--loss", "ipo", "--label-smoothing", "0.1"],
            "--loss ipo takes none",
        ),
        (
            &["--loss", "hypo", "--kl-max-new-tokens", "0"],
            "--kl-max-new-tokens",
        ),
        (&["--lora-rank", "0"], "--lora-rank must be at least 1"),
        (&["--lora-dropout", "0.1"], "--lora-rank"),
        (
            &["--warmup-ratio", "1.5"],
            "--warmup-ratio 1.5 must be in [0, 1]",
        ),
    ];
    for (extra, expected) in cases {
        let (ok, err) = wdpo_on("tiny-llama", &pairs, &out, extra);
        assert!(!ok && err.contains(expected), "{extra:?}: {err}");
        assert!(
            !err.contains("memory estimate"),
            "{extra:?} got as far as planning: {err}"
        );
    }
    let csv = tmp.path().join("pairs.csv");
    std::fs::write(&csv, "prompt,chosen,rejected\nhi,a,b\n").unwrap();
    let (ok, err) = wdpo_on("tiny-llama", &csv, &out, &["--precompute-ref"]);
    assert!(
        !ok && err.contains("is CSV, which it cannot rewrite"),
        "{err}"
    );
    // A weighting asked for on pairs without rewards would weigh every pair 1.
    for extra in [&["--weight", "sigmoid"][..], &["--beta2", "3"]] {
        let (ok, err) = wdpo_on("tiny-llama", &csv, &out, extra);
        assert!(
            !ok && err.contains("pairs.csv holds no rewards"),
            "{extra:?}: {err}"
        );
    }
    assert!(!out.exists());
}

/// An OUT_DIR the final save could not take, or would wrongly replace, is refused before any
/// work, and a reward model is refused as the policy; `--max-grad-norm 0` trains unclipped.
#[test]
fn outputs_and_models_that_cannot_be_used_are_refused_first() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "keep").unwrap();
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("precious.txt"), "keep").unwrap();
    for (out, expected) in [
        (file.clone(), "exists and is not a directory"),
        (file.join("out"), "is not a directory"),
        (busy.clone(), "holds files but no checkpoint"),
        (PathBuf::from("."), "names no directory of its own"),
    ] {
        let (ok, err) = wdpo_on("tiny-llama", &pairs, &out, &[]);
        assert!(!ok && err.contains(expected), "{}: {err}", out.display());
        assert!(!err.contains("memory estimate"), "{}: {err}", out.display());
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    assert!(busy.join("precious.txt").is_file());
    let fresh = tmp.path().join("fresh");
    let inside = fresh.join("m.csv");
    let (ok, err) = wdpo_on(
        "tiny-llama",
        &pairs,
        &fresh,
        &["--metrics", inside.to_str().unwrap()],
    );
    assert!(!ok && err.contains("inside OUT_DIR"), "{err}");

    // An OUT_DIR that is the policy, or holds the reference or the pairs: the save would
    // replace them.
    let policy = optune_testkit::copy_model("tiny-llama", &tmp.path().join("policy"));
    let spelt_apart = tmp.path().join(".").join("policy");
    let own_pairs = policy.join("pairs.jsonl");
    write_pairs(&own_pairs);
    for (policy_dir, pairs_file, flag) in [
        (&policy, &pairs, "--policy"),
        (&model("tiny-llama"), &own_pairs, "PAIRS"),
    ] {
        let (ok, err) = wdpo_at(policy_dir, pairs_file, &spelt_apart, &[]);
        assert!(
            !ok && err.contains(&format!("the save replaces OUT_DIR whole, and {flag} ")),
            "{flag}: {err}"
        );
    }
    // --reference-only writes a shard: not over its input.
    let (ok, err) = wdpo_at(
        &model("tiny-llama"),
        &pairs,
        &pairs,
        &["--reference-only", "--shard", "1/2"],
    );
    assert!(!ok && err.contains("is an input"), "{err}");
    let reference = ["--ref", policy.to_str().unwrap()];
    let (ok, err) = wdpo_at(&model("tiny-llama"), &pairs, &policy, &reference);
    assert!(!ok && err.contains("and --ref "), "{err}");
    assert_eq!(
        std::fs::read(policy.join("model.safetensors")).unwrap(),
        std::fs::read(model("tiny-llama").join("model.safetensors")).unwrap()
    );

    let out = tmp.path().join("out");
    let (ok, err) = wdpo_on("tiny-rm-llama", &pairs, &out, &[]);
    assert!(!ok && err.contains("a reward model"), "{err}");
    assert!(!out.exists());

    let (ok, err) = wdpo_on(
        "tiny-llama",
        &pairs,
        &out,
        &["--max-grad-norm", "0", "--batch-size", "4", "--lr", "1e-3"],
    );
    assert!(ok, "{err}");
    let norms = column(&metrics(&out), "grad_norm");
    assert!(norms.iter().all(|n| n.is_finite() && *n > 0.0), "{norms:?}");
}

/// Pairs that cannot be trained on name the flag or the row, before any tensor is made: a
/// prompt with no tokens would leave the response's first token nothing to be predicted from
/// (and on a GPU a zero-size tensor, which its kernels refuse).
#[test]
fn a_prompt_without_tokens_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    let row =
        |prompt: &str| serde_json::json!({"prompt": prompt, "chosen": "Yes.", "rejected": "No."});
    write_jsonl(&pairs, &[row("Say yes."), row(""), row("Say no.")]);
    let out = tmp.path().join("policy");
    let policy = optune_testkit::base_model_without_bos(tmp.path());
    let (ok, err) = wdpo_at(&policy, &pairs, &out, &[]);
    assert!(!ok);
    assert!(
        err.contains("pairs.jsonl: row 2") && err.contains("the prompt has no tokens"),
        "{err}"
    );
    assert!(!out.exists());
    let (ok, err) = wdpo_on("tiny-llama", &pairs, &out, &["--max-length", "1"]);
    assert!(!ok);
    assert!(
        err.contains("--max-length 1 leaves no prompt token"),
        "{err}"
    );
    assert!(!out.exists());
}

/// A pair longer than the model's rotary tables is refused before any work, with the length to
/// pass: the CPU's lookup would fail at its batch, a GPU's would read past the tables silently.
#[test]
fn a_pair_longer_than_the_model_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    let long = "the sea is calm and the sky is grey ".repeat(60);
    write_jsonl(
        &pairs,
        &[
            serde_json::json!({"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."}),
            serde_json::json!({"prompt": "Describe the sea.", "chosen": long, "rejected": "No."}),
        ],
    );
    let out = tmp.path().join("policy");
    // tiny-llama: max_position_embeddings 256, under the default --max-length 512.
    let (ok, err) = wdpo_on("tiny-llama", &pairs, &out, &[]);
    assert!(!ok);
    assert!(
        err.contains("longer than the 256 positions the policy's config allows")
            && err.contains("pass --max-length 256 or less"),
        "{err}"
    );
    assert!(!out.exists());
    // Within the tables, the same pairs train.
    let (ok, err) = wdpo_on("tiny-llama", &pairs, &out, &["--max-length", "256"]);
    assert!(ok, "{err}");
}

/// Writes `rows` as JSONL.
fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|row| format!("{row}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Runs opt-wdpo on the test model `policy` with `pairs` into `out`, `extra` arguments and --seed 3.
fn wdpo_on(policy: &str, pairs: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    wdpo_at(
        &model(policy),
        pairs,
        out,
        &[&["--seed", "3"], extra].concat(),
    )
}

/// Runs opt-wdpo on the model directory `policy` with `pairs` into `out` and `extra` arguments.
fn wdpo_at(policy: &Path, pairs: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let args = [
        "--policy",
        policy.to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    wdpo(&[&args[..], extra].concat())
}

/// [`wdpo_on`] into `tmp/name`, which must succeed; returns the output directory.
fn train_on(policy: &str, tmp: &Path, name: &str, pairs: &Path, extra: &[&str]) -> PathBuf {
    let out = tmp.join(name);
    let (ok, err) = wdpo_on(policy, pairs, &out, extra);
    assert!(ok, "{err}");
    out
}

/// `--devices` trains its replicas as one device with the accumulation multiplied: three
/// replicas one micro-batch each a step against `--grad-accum 3`, two with `--grad-accum 2`
/// against `--grad-accum 4`. 8 pairs in micro-batches of 2 make groups of 3 and 1 per epoch, so
/// the replicas also meet a step that leaves two of them idle. On the generic kernels (the op
/// graph a GPU runs) each weight's owner adds the replicas' gradients after every micro-batch
/// in the order one device adds its micro-batches: the same bits, for full fine-tuning in f32
/// and in bf16 (where a replica keeps f32 masters, their gradients and the moments only of the
/// weights it owns, trains the bf16 compute weights of the others', and the checkpoint, f32 as
/// tiny-llama's config says, gathers the masters from their owners; saving a replica's bf16
/// copies, or summing bf16 gradients before the cast, fails it) and LoRA with dropout and
/// recomputation. The fused ops sum a device's micro-batches in their gradient buffers instead,
/// so full fine-tuning in f32 matches there to rounding, amplified by Adam's normalisation.
#[test]
fn data_parallel_replicas_train_as_one_device_with_more_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let run = |name: &str, kernels: &str, extra: &[&str]| -> PathBuf {
        let common = [
            "--lr",
            "1e-3",
            "--epochs",
            "2",
            "--batch-size",
            "2",
            "--warmup-ratio",
            "0",
            "--kernels",
            kernels,
        ];
        let name = format!("{name}-{kernels}");
        train_on(
            "tiny-llama",
            tmp.path(),
            &name,
            &pairs,
            &[&common, extra].concat(),
        )
    };
    let lora = [
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0.1",
        "--gradient-checkpointing",
    ];
    let bf16 = ["--dtype", "bf16"];
    let trainings = [("full", &[][..]), ("lora", &lora[..]), ("bf16", &bf16[..])];
    let replicas = [("3", "cpu,cpu,cpu", "1"), ("4", "cpu,cpu", "2")];
    for ((what, extra), (one_accum, devices, accum)) in trainings
        .into_iter()
        .flat_map(|training| replicas.map(|r| (training, r)))
    {
        for kernels in ["generic", "fused"] {
            if what == "bf16" && kernels == "fused" {
                continue; // the fused kernels keep f32 tensors (bf16 products only)
            }
            let one = run(
                &format!("{what}-one-{one_accum}"),
                kernels,
                &[&["--grad-accum", one_accum], extra].concat(),
            );
            let many = run(
                &format!("{what}-{devices}"),
                kernels,
                &[&["--devices", devices, "--grad-accum", accum], extra].concat(),
            );
            let steps = column(&metrics(&one), "step");
            assert!(steps.len() >= 2, "{steps:?}");
            assert_eq!(steps, column(&metrics(&many), "step"));
            let (a, b) = (weights(&one), weights(&many));
            let exact = kernels == "generic" || what == "lora";
            if exact {
                assert!(
                    a == b,
                    "{what} {kernels} {devices}: the replicas' weights differ"
                );
                assert_eq!(
                    untimed_metrics(&one.join("metrics.csv")),
                    untimed_metrics(&many.join("metrics.csv")),
                    "{what} {kernels} {devices}"
                );
                continue;
            }
            let worst = a
                .iter()
                .zip(&b)
                .flat_map(|((_, x), (_, y))| x.iter().zip(y))
                .map(|(x, y)| (x - y).abs() / x.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-3,
                "{what} {kernels} {devices}: relative difference {worst}"
            );
        }
    }
}

/// The replicas of `--devices` share the reference pass, one pair per forward pass: the values
/// written back by --precompute-ref are one device's, for the policy as its own reference
/// (full fine-tuning and LoRA, whose adapters start at zero) and for a separate --ref, which
/// the other replicas load for the pass on their own threads. (How the pairs are dealt out is
/// the unit test of `in_runs`.)
#[test]
fn replicas_share_the_reference_pass_and_write_one_devices_values() {
    let tmp = tempfile::tempdir().unwrap();
    let written = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let pairs = tmp.path().join(format!("{name}.jsonl"));
        write_pairs(&pairs);
        let out = tmp.path().join(name);
        let args = [&["--precompute-ref", "--max-steps", "1"], extra].concat();
        let (ok, err) = wdpo_at(&model("tiny-llama"), &pairs, &out, &args);
        assert!(ok, "{name}: {err}");
        std::fs::read_to_string(&pairs)
            .unwrap()
            .lines()
            .map(|line| {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                serde_json::json!([row["ref_chosen_logp"], row["ref_rejected_logp"]])
            })
            .collect()
    };
    let reference = model("tiny-mistral");
    let separate = ["--ref", reference.to_str().unwrap()];
    let lora = ["--lora-rank", "4"];
    for (what, extra) in [
        ("full", &[][..]),
        ("lora", &lora[..]),
        ("ref", &separate[..]),
    ] {
        let one = written(&format!("{what}-one"), extra);
        let three = written(
            &format!("{what}-three"),
            &[extra, &["--devices", "cpu,cpu,cpu"]].concat(),
        );
        assert_eq!(one.len(), 8);
        assert!(one.iter().all(|v| v[0].is_number()), "{what}: {one:?}");
        assert_eq!(one, three, "{what}");
    }
}

/// What `--devices` refuses before any work.
#[test]
fn devices_refuses_what_it_cannot_combine() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = tmp.path().join("out");
    for (extra, expected) in [
        (
            &["--devices", "cpu,cpu", "--device", "cuda"][..],
            "--device cuda with --devices cpu,cpu: --device, when given too, names the first",
        ),
        (
            &["--devices", "cpu,cuda:0"][..],
            "--devices cpu,cuda:0: GPUs and CPUs together",
        ),
        (
            &["--devices", "cpu,cpu", "--reference-only"][..],
            "cannot be used with",
        ),
        (&["--devices", "cpu,,cpu"][..], "--devices: an empty name"),
        (
            &["--devices", "cpu,gpu"][..],
            "expected cpu, cuda or cuda:N",
        ),
    ] {
        let (ok, err) = wdpo_at(&model("tiny-llama"), &pairs, &out, extra);
        assert!(!ok && err.contains(expected), "{extra:?}: {err}");
        assert!(!out.exists());
    }
}

/// Pairs whose two replies are the same text are dropped by the losses that only compare the
/// sides, after --precompute-ref has written every row back; a shard of nothing else is refused.
#[test]
fn identical_pairs_are_skipped_where_they_teach_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let text = std::fs::read_to_string(&pairs).unwrap();
    let mut rows: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    for row in &mut rows[..2] {
        row["rejected"] = row["chosen"].clone();
    }
    write_jsonl(&pairs, &rows);
    let extra = ["--max-steps", "1", "--batch-size", "2"];
    let (ok, err) = wdpo_on(
        "tiny-llama",
        &pairs,
        &tmp.path().join("dpo"),
        &[&extra[..], &["--precompute-ref"]].concat(),
    );
    assert!(ok, "{err}");
    assert!(err.contains("pairs=6 skipped_identical=2 "), "{err}");
    let written = std::fs::read_to_string(&pairs).unwrap();
    assert_eq!(
        written
            .lines()
            .filter(|l| l.contains("ref_chosen_logp"))
            .count(),
        8
    );
    let (ok, err) = wdpo_on(
        "tiny-llama",
        &pairs,
        &tmp.path().join("rpo"),
        &[&extra[..], &["--loss", "rpo"]].concat(),
    );
    assert!(ok, "{err}");
    assert!(err.contains("pairs=8 skipped_identical=0 "), "{err}");

    let same = tmp.path().join("same.jsonl");
    write_jsonl(&same, &rows[..2]);
    let (ok, err) = wdpo_on("tiny-llama", &same, &tmp.path().join("none"), &extra);
    assert!(
        !ok && err.contains(
            "same.jsonl: all 2 pairs have the same chosen and rejected tokens, and --loss \
             sigmoid learns nothing from such a pair"
        ),
        "{err}"
    );
    assert!(!tmp.path().join("none").exists());
}

#[test]
fn max_steps_overrides_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    // 8 pairs in batches of 4: 2 steps an epoch, so 5 steps take 3 epochs.
    let out = train_on(
        "tiny-llama",
        tmp.path(),
        "five",
        &pairs,
        &["--batch-size", "4", "--max-steps", "5", "--lr", "1e-4"],
    );
    let rows = metrics(&out);
    assert_eq!(column(&rows, "step"), [1.0, 2.0, 3.0, 4.0, 5.0]);
    // Epochs done by the end of each step, as TRL logs them.
    assert_eq!(column(&rows, "epoch"), [0.5, 1.0, 1.5, 2.0, 2.5]);
    let out = train_on(
        "tiny-llama",
        tmp.path(),
        "one",
        &pairs,
        &["--batch-size", "4", "--epochs", "3", "--max-steps", "1"],
    );
    assert_eq!(column(&metrics(&out), "step"), [1.0]);
    let (ok, err) = wdpo_on(
        "tiny-llama",
        &pairs,
        &tmp.path().join("zero"),
        &["--max-steps", "0"],
    );
    assert!(
        !ok && err.contains("--max-steps must be at least 1"),
        "{err}"
    );
}

/// --grad-accum groups each epoch's micro-batches, the last group of an epoch maybe shorter:
/// 5 micro-batches an epoch in groups of 3 make 2 steps an epoch, as the schedule counts them.
/// (A count over the whole run put the second epoch's first micro-batch alone in a step and ran
/// a fifth step past the schedule's end.)
#[test]
fn grad_accum_groups_the_micro_batches_of_each_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let five: String = std::fs::read_to_string(&pairs)
        .unwrap()
        .lines()
        .take(5)
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&pairs, five).unwrap();
    let args = ["--batch-size", "1", "--grad-accum", "3", "--epochs", "2"];
    let out = train_on("tiny-llama", tmp.path(), "accum", &pairs, &args);
    let rows = metrics(&out);
    assert_eq!(column(&rows, "step"), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(column(&rows, "epoch"), [0.6, 1.0, 1.6, 2.0]);
}

/// The pairs of testdata/reference/`model`.json's cases (chosen: the case's response, whose
/// log-probs transformers computed; rejected: a short reply), and the reference itself. For a
/// templated model a raw-text case becomes the one user message the chat template makes of it
/// (one column holds one kind); an untemplated model's cases are all raw text.
fn reference_pairs(model: &str, path: &Path) -> serde_json::Value {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join(format!("testdata/reference/{model}.json"))).unwrap(),
    )
    .unwrap();
    let rows: Vec<serde_json::Value> = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let prompt = match case.get("messages") {
                Some(messages) => messages.clone(),
                None if model == "tiny-llama" => {
                    serde_json::json!([{"role": "user", "content": case["prompt"]}])
                }
                None => case["prompt"].clone(),
            };
            serde_json::json!({"prompt": prompt, "chosen": case["response"], "rejected": "No."})
        })
        .collect();
    write_jsonl(path, &rows);
    reference
}

#[test]
fn sft_and_rpo_losses_are_transformers_token_level_nll() {
    // tiny-llama renders its chat template; tiny-llama-base has none and its tokenizer puts BOS
    // before raw text, as transformers' tokenizer(prompt) does.
    for model_name in ["tiny-llama", "tiny-llama-base"] {
        let tmp = tempfile::tempdir().unwrap();
        let pairs = tmp.path().join("pairs.jsonl");
        let reference = reference_pairs(model_name, &pairs);
        // TRL's NLL: Σ −log π(chosen) / Σ chosen tokens, from transformers' log-probs.
        let cases = reference["cases"].as_array().unwrap();
        let logp: f64 = cases.iter().map(|c| c["sum_logp"].as_f64().unwrap()).sum();
        let tokens: usize = cases
            .iter()
            .map(|c| c["response_ids"].as_array().unwrap().len())
            .sum();
        let nll = -logp / tokens as f64;
        let first_loss = |name: &str, extra: &[&str]| {
            let args = [
                &["--lr", "0", "--batch-size", "4", "--max-steps", "1"][..],
                extra,
            ]
            .concat();
            let out = train_on(model_name, tmp.path(), name, &pairs, &args);
            column(&metrics(&out), "loss")[0]
        };
        let sft = first_loss("sft", &["--loss", "sft"]);
        assert!(
            (sft - nll).abs() < 1e-4 * nll,
            "{model_name}: sft {sft} vs {nll}"
        );
        // RPO on the first step: policy = reference, so each DPO loss is ln 2, plus α·NLL.
        let rpo = first_loss("rpo", &["--loss", "rpo", "--rpo-alpha", "0.5"]);
        let expected = std::f64::consts::LN_2 + 0.5 * nll;
        assert!(
            (rpo - expected).abs() < 1e-4 * expected,
            "{model_name}: rpo {rpo} vs {expected}"
        );
    }
}

#[test]
fn simpo_and_sft_train_without_a_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs);
    // SimPO's paper scales its rewards by β = 2; SFT has no β.
    for (loss, beta) in [("simpo", "2"), ("sft", "")] {
        let beta = if beta.is_empty() {
            vec![]
        } else {
            vec!["--beta", beta]
        };
        let out = train_on(
            "tiny-llama",
            tmp.path(),
            loss,
            &pairs,
            &[
                &[
                    "--loss",
                    loss,
                    "--lr",
                    "1e-3",
                    "--epochs",
                    "4",
                    "--batch-size",
                    "4",
                    "--warmup-ratio",
                    "0",
                    "--schedule",
                    "constant",
                ][..],
                &beta,
            ]
            .concat(),
        );
        let loss_column = column(&metrics(&out), "loss");
        assert!(
            loss_column.last().unwrap() < &(loss_column[0] * 0.8),
            "{loss}: {loss_column:?}"
        );
        // Nothing to precompute.
        let (ok, err) = wdpo_on(
            "tiny-llama",
            &pairs,
            &tmp.path().join("none"),
            &["--loss", loss, "--precompute-ref"],
        );
        assert!(!ok && err.contains("reads no reference log-probs"), "{err}");
    }
}

/// Eight pairs with varying rewards, under `chosen`/`rejected` column names of the caller's choice.
fn write_scored_pairs(path: &Path, reward_columns: Option<(&str, &str)>, weight: Option<f64>) {
    let rows: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            let mut row = serde_json::json!({
                "prompt": format!("Say something about the number {i}."),
                "chosen": format!("It was great and happy {i}!"),
                "rejected": format!("It was bad, sad and awful {i}."),
            });
            if let Some((chosen, rejected)) = reward_columns {
                row[chosen] = serde_json::json!(8.0 - i as f64 * 0.5);
                row[rejected] = serde_json::json!(1.0 + i as f64 * 0.25);
            }
            if let Some(w) = weight {
                row["w"] = serde_json::json!(w * i as f64);
            }
            row
        })
        .collect();
    write_jsonl(path, &rows);
}

#[test]
fn ultrafeedback_scores_drive_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--beta2",
        "0.5",
    ];
    let run = |name: &str, columns: Option<(&str, &str)>| {
        let pairs = tmp.path().join(format!("{name}.jsonl"));
        write_scored_pairs(&pairs, columns, None);
        // Pairs without rewards refuse a weighting asked for: their weights are 1 by default.
        let args = if columns.is_some() {
            &args[..]
        } else {
            &args[..6]
        };
        weights(&train_on("tiny-llama", tmp.path(), name, &pairs, args))
    };
    let explicit = run("explicit", Some(("chosen_reward", "rejected_reward")));
    let ultrafeedback = run("ultrafeedback", Some(("score_chosen", "score_rejected")));
    assert_eq!(
        explicit, ultrafeedback,
        "scores and rewards train differently"
    );
    assert_ne!(
        explicit,
        run("unscored", None),
        "the scores do not reach the weights"
    );
}

#[test]
fn weight_col_gives_each_pair_its_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    // w = 0.5·i for pairs 0..8: mean 1.75.
    write_scored_pairs(&pairs, None, Some(0.5));
    let out = train_on(
        "tiny-llama",
        tmp.path(),
        "given",
        &pairs,
        &[
            "--weight-col",
            "w",
            "--weight-norm",
            "none",
            "--batch-size",
            "8",
            "--lr",
            "1e-4",
        ],
    );
    assert_eq!(column(&metrics(&out), "weight/mean"), [1.75]);
    assert_eq!(column(&metrics(&out), "weight/max"), [3.5]);
    // Normalised per batch, the weights average 1.
    let out = train_on(
        "tiny-llama",
        tmp.path(),
        "normalised",
        &pairs,
        &["--weight-col", "w", "--batch-size", "8"],
    );
    assert_eq!(column(&metrics(&out), "weight/mean"), [1.0]);
    // The widest, 3.5 of a mean 1.75, is 2 once normalised.
    assert_eq!(column(&metrics(&out), "weight/max"), [2.0]);
    // Negative weights, a missing column, and --beta2 beside --weight-col are errors.
    write_scored_pairs(&pairs, None, Some(-1.0));
    for (extra, expected) in [
        (
            &["--weight-col", "w"][..],
            "column 'w': weight -1 at row 2 is negative",
        ),
        (&["--weight-col", "v"][..], "'v'"),
        (
            &["--weight-col", "w", "--beta2", "2"][..],
            "cannot be used with",
        ),
    ] {
        let (ok, err) = wdpo_on("tiny-llama", &pairs, &tmp.path().join("bad"), extra);
        assert!(!ok && err.contains(expected), "{extra:?}: {err}");
    }
}

#[test]
fn hh_transcripts_give_the_reference_of_the_explicit_split() {
    let tmp = tempfile::tempdir().unwrap();
    let dialogues = [
        (
            "How do I boil an egg?",
            "Put it in boiling water for eight minutes.",
            "Eggs are round.",
        ),
        ("Name a colour.", "Blue.", "I would rather not."),
        (
            "What is the capital of France?",
            "Paris.",
            "London, I think.",
        ),
    ];
    let transcript = |q: &str, a: &str| format!("\n\nHuman: {q}\n\nAssistant: {a}");
    let hh: Vec<serde_json::Value> = dialogues
        .iter()
        .map(|(q, good, bad)| {
            serde_json::json!({"chosen": transcript(q, good), "rejected": transcript(q, bad)})
        })
        .collect();
    let split: Vec<serde_json::Value> = dialogues
        .iter()
        .map(|(q, good, bad)| {
            serde_json::json!({
                "prompt": format!("\n\nHuman: {q}\n\nAssistant:"),
                "chosen": format!(" {good}"),
                "rejected": format!(" {bad}"),
            })
        })
        .collect();
    let reference_columns = |name: &str, rows: &[serde_json::Value]| {
        let pairs = tmp.path().join(format!("{name}.jsonl"));
        write_jsonl(&pairs, rows);
        train_on(
            "tiny-llama-base",
            tmp.path(),
            name,
            &pairs,
            &["--precompute-ref", "--lr", "0", "--max-steps", "1"],
        );
        let shard = optune_shard::Shard::read(Some(&pairs)).unwrap();
        (
            shard.floats("ref_chosen_logp").unwrap(),
            shard.floats("ref_rejected_logp").unwrap(),
        )
    };
    let from_transcripts = reference_columns("hh", &hh);
    assert_eq!(from_transcripts, reference_columns("split", &split));
    assert!(from_transcripts.0.iter().all(|l| l.is_finite() && *l < 0.0));
}

/// Trains `policy` with `extra` arguments under each kernel choice, fused then generic (the op
/// graph CUDA runs), and checks that losses, gradient norms and margins agree step by step within
/// `tolerance` over `steps` steps, and that each summary names its kernels.
fn fused_and_generic_agree(policy: &str, extra: &[&str], steps: usize, tolerance: f64) {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let mut runs = Vec::new();
    for kernels in ["fused", "generic"] {
        let out = dir.path().join(kernels);
        let args = [&["--warmup-ratio", "0", "--kernels", kernels], extra].concat();
        let (ok, stderr) = wdpo_at(&model(policy), &pairs, &out, &args);
        assert!(ok, "{stderr}");
        assert!(
            stderr.contains(&format!("kernels={kernels}")),
            "{kernels}: {stderr}"
        );
        runs.push(metrics(&out));
    }
    for name in ["loss", "grad_norm", "rewards/margins"] {
        let (fused, generic) = (column(&runs[0], name), column(&runs[1], name));
        assert_eq!(fused.len(), steps);
        for (step, (a, b)) in fused.iter().zip(&generic).enumerate() {
            assert!(
                (a - b).abs() <= tolerance,
                "{policy} {name} at step {}: {a} vs {b}",
                step + 1
            );
        }
    }
}

/// LoRA adapters: the fused path's one-node adapted linear layer against the generic composition.
#[test]
fn generic_and_fused_kernels_give_the_same_lora_losses() {
    let lora = ["--lora-rank", "4", "--lr", "1e-2", "--batch-size", "2"];
    fused_and_generic_agree("tiny-llama", &lora, 4, 1e-4);
}

/// Full fine-tuning with gradients summed over two micro-batches: on the fused path the weights'
/// gradients go through their gradient buffers (tiny-llama's embedding is its head too, so the
/// head's and the lookup's gradients meet in one buffer; tiny-mistral's are two), on the generic
/// path through candle's gradient store.
#[test]
fn generic_and_fused_kernels_give_the_same_full_fine_tuning() {
    let full = ["--lr", "1e-3", "--batch-size", "2", "--grad-accum", "2"];
    for policy in ["tiny-llama", "tiny-mistral"] {
        fused_and_generic_agree(policy, &full, 2, 1e-4);
    }
}

/// The safetensors dtype names of a checkpoint's weights.
fn saved_dtypes(dir: &Path) -> std::collections::BTreeSet<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap().to_string())
        .collect()
}

/// `--dtype bf16` computes in bf16 with f32 master weights: full fine-tuning (whose bf16 weights
/// are re-cast from the masters after every step) and LoRA follow the f32 run's losses to bf16
/// rounding.
#[test]
fn bf16_training_follows_f32_within_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    for lora in [false, true] {
        let mut runs = Vec::new();
        for dtype in ["f32", "bf16"] {
            let out = dir.path().join(format!("{dtype}-{lora}"));
            let (policy, pairs_path, out_path) = (
                model("tiny-llama").to_str().unwrap().to_string(),
                pairs.to_str().unwrap().to_string(),
                out.to_str().unwrap().to_string(),
            );
            let lr = if lora { "2e-2" } else { "1e-3" };
            let mut args: Vec<String> = [
                "--policy",
                &policy,
                &pairs_path,
                "-o",
                &out_path,
                "--lr",
                lr,
                "--batch-size",
                "2",
                "--warmup-ratio",
                "0",
                "--dtype",
                dtype,
            ]
            .map(String::from)
            .to_vec();
            if lora {
                args.extend(["--lora-rank", "4"].map(String::from));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, stderr) = wdpo(&args);
            assert!(ok, "{stderr}");
            // Saved in the checkpoint's own dtype (its config says float32), not the compute one.
            assert_eq!(saved_dtypes(&out).into_iter().collect::<Vec<_>>(), ["F32"]);
            runs.push(column(&metrics(&out), "loss"));
        }
        let (f32_losses, bf16_losses) = (&runs[0], &runs[1]);
        assert_eq!(f32_losses.len(), 4);
        // The first step sees equal policy and reference: exactly ln 2 in both.
        assert!((bf16_losses[0] - std::f64::consts::LN_2).abs() < 1e-6);
        for (step, (a, b)) in f32_losses.iter().zip(bf16_losses).enumerate().skip(1) {
            assert!(
                (a - b).abs() <= 0.02,
                "lora {lora}, step {}: f32 {a} vs bf16 {b}",
                step + 1
            );
        }
        // Training moved the loss: a bf16 copy left stale after the first step would not.
        assert!(
            bf16_losses[3] < bf16_losses[0] - 0.05,
            "lora {lora}: {bf16_losses:?}"
        );
    }
}

/// A bf16 run of a model whose config says float32 saves what it trained, not its bf16 copies:
/// full fine-tuning saves the f32 masters; LoRA merges the adapters into the weights as stored,
/// so the weights it did not adapt come back unchanged to the bit and the adapted ones are the
/// stored weights plus scale·B·A.
#[test]
fn bf16_runs_save_the_f32_weights_they_trained() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let policy = model("tiny-llama");
    let stored: std::collections::HashMap<String, Vec<f32>> =
        weights(&policy).into_iter().collect();
    let not_bf16 = |v: &[f32]| v.iter().filter(|x| x.to_bits() & 0xffff != 0).count();

    let full = dir.path().join("full");
    let (ok, stderr) = wdpo_at(
        &policy,
        &pairs,
        &full,
        &["--dtype", "bf16", "--lr", "1e-3", "--warmup-ratio", "0"],
    );
    assert!(ok, "{stderr}");
    for (name, values) in weights(&full) {
        // Every weight trained: a master moved by less than half a bf16 step would still round
        // to its bf16 copy, so the rounded copies are bf16 values all through.
        assert_ne!(values, stored[&name], "{name} did not train");
        assert!(
            not_bf16(&values) > values.len() / 2,
            "{name}: {} of {} values are bf16-rounded",
            values.len() - not_bf16(&values),
            values.len()
        );
    }

    let lora = dir.path().join("lora");
    let (ok, stderr) = wdpo_at(
        &policy,
        &pairs,
        &lora,
        &[
            "--dtype",
            "bf16",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
            "--lora-targets",
            "q_proj,down_proj",
            "--lr",
            "2e-2",
            "--batch-size",
            "2",
            "--warmup-ratio",
            "0",
            "--save-adapter",
        ],
    );
    assert!(ok, "{stderr}");
    let adapter: std::collections::HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(
            lora.join("adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .into_iter()
        .collect();
    let mut adapted = 0;
    for (name, values) in weights(&lora) {
        let module = name.trim_end_matches(".weight");
        let factor = |part: &str| {
            adapter
                .get(&format!("base_model.model.{module}.{part}.weight"))
                .map(|t| t.to_dtype(candle_core::DType::F32).unwrap())
        };
        match (factor("lora_A"), factor("lora_B")) {
            (Some(a), Some(b)) => {
                adapted += 1;
                let delta: Vec<f32> = (b.matmul(&a).unwrap() * 2.0)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(
                    delta.iter().any(|d| *d != 0.0),
                    "{name}: the adapter is zero"
                );
                for (i, ((got, base), d)) in
                    values.iter().zip(&stored[&name]).zip(&delta).enumerate()
                {
                    let want = base + d;
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                        "{name}[{i}]: saved {got}, stored {base} + delta {d}"
                    );
                }
            }
            _ => assert!(values == stored[&name], "{name} changed without an adapter"),
        }
    }
    assert_eq!(
        adapted,
        2 * 2,
        "tiny-llama has two layers, two targets each"
    );
}

/// A checkpoint is saved in the dtype its config.json names, whatever the run computed in.
#[test]
fn checkpoints_keep_their_own_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let policy = optune_testkit::copy_model("tiny-llama", &dir.path().join("policy"));
    let config = policy.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"float32\"", "\"bfloat16\"")).unwrap();
    let out = dir.path().join("out");
    let (ok, stderr) = wdpo(&[
        "--policy",
        policy.to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--lora-rank",
        "4",
        "--dtype",
        "f32",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(saved_dtypes(&out).into_iter().collect::<Vec<_>>(), ["BF16"]);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["torch_dtype"], "bfloat16");
}

/// Before training opt-wdpo prints its memory estimate, and refuses a run that does not fit in
/// the memory it plans against, with advice, leaving no output behind.
#[test]
fn a_run_that_cannot_fit_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = dir.path().join("out");
    let policy = model("tiny-llama");
    let base = [
        "--policy",
        policy.to_str().unwrap(),
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
    ];
    let (ok, stderr) = wdpo(&[&base[..], &["--memory-budget", "0.0001"]].concat());
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("memory estimate"), "{stderr}");
    assert!(
        stderr.contains("--lora-rank") && stderr.contains("--batch-size"),
        "{stderr}"
    );
    // What recomputing the activations would need, smaller than what the run needs.
    let gb = |after: &str| -> f64 {
        let rest =
            &stderr[stderr.find(after).unwrap_or_else(|| panic!("{stderr}")) + after.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (needed, recomputed) = (gb("needs about "), gb("--gradient-checkpointing: about "));
    assert!(recomputed < needed, "{stderr}");
    assert!(!out.exists());
    let flagged = [
        &base[..],
        &["--memory-budget", "0.0001", "--gradient-checkpointing"],
    ]
    .concat();
    let (ok, stderr) = wdpo(&flagged);
    assert!(
        !ok && !stderr.contains("(--gradient-checkpointing"),
        "{stderr}"
    );
    let (ok, stderr) = wdpo(&base);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("memory estimate"), "{stderr}");
}

/// The line of the memory plan in opt-wdpo's stderr.
fn plan_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("opt-wdpo: memory estimate"))
        .unwrap_or_else(|| panic!("no memory estimate in {stderr}"))
}

/// --plan-only prints the plan the run prints before training, from the config, the tokenizer
/// and the pairs alone, and writes nothing: full and LoRA (with a bias-carrying family),
/// recomputed or not, on both kernel paths, in f32 and bf16.
#[test]
fn plan_only_prints_the_plan_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let runs: [(&str, &[&str]); 4] = [
        ("tiny-llama", &[]),
        (
            "tiny-qwen2",
            &[
                "--lora-rank",
                "4",
                "--lora-targets",
                "q_proj,v_proj,down_proj",
            ],
        ),
        (
            "tiny-mistral",
            &[
                "--lora-rank",
                "8",
                "--gradient-checkpointing",
                "--kernels",
                "generic",
                "--dtype",
                "bf16",
            ],
        ),
        (
            "tiny-llama",
            &[
                "--kernels",
                "generic",
                "--batch-size",
                "3",
                "--optimizer",
                "rmsprop",
            ],
        ),
    ];
    for (i, (name, extra)) in runs.into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let run = [extra, &["--max-steps", "1", "--memory-budget", "1000"]].concat();
        let (ok, planned) = wdpo_at(
            &model(name),
            &pairs,
            &out,
            &[&run[..], &["--plan-only"]].concat(),
        );
        assert!(ok, "{planned}");
        assert!(!out.exists(), "--plan-only wrote {}", out.display());
        let (ok, trained) = wdpo_at(&model(name), &pairs, &out, &run);
        assert!(ok, "{trained}");
        assert_eq!(plan_line(&planned), plan_line(&trained), "{name} {extra:?}");
    }
}

/// A directory holding [`write_pairs`]' pairs and an output path in it, for planning GPUs that
/// are not here; `None` where there is a GPU.
fn without_a_gpu() -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    if candle_core::utils::cuda_is_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let out = dir.path().join("out");
    Some((dir, pairs, out))
}

/// --device cuda --plan-only on a machine without a GPU plans bf16 on the generic kernels (a
/// GPU's), as the CPU's generic bf16 run would be planned; a plan over --memory-budget is refused
/// with the run's advice.
#[test]
fn plan_only_sizes_a_gpu_run_without_a_gpu() {
    let Some((_dir, pairs, out)) = without_a_gpu() else {
        return; // a GPU here: --device cuda opens it, as the run would
    };
    let lora = ["--lora-rank", "8", "--memory-budget", "80", "--plan-only"];
    let (ok, gpu) = wdpo_at(
        &model("tiny-mistral"),
        &pairs,
        &out,
        &[&lora[..], &["--device", "cuda"]].concat(),
    );
    assert!(ok, "{gpu}");
    for field in ["device=cuda", "device_here=false", "kernels=generic"] {
        assert!(gpu.contains(field), "{field}: {gpu}");
    }
    let cpu = ["--device", "cpu", "--kernels", "generic", "--dtype", "bf16"];
    let (ok, generic_bf16) = wdpo_at(
        &model("tiny-mistral"),
        &pairs,
        &out,
        &[&lora[..], &cpu].concat(),
    );
    assert!(ok, "{generic_bf16}");
    assert_eq!(plan_line(&gpu), plan_line(&generic_bf16));
    let (ok, refused) = wdpo_at(
        &model("tiny-mistral"),
        &pairs,
        &out,
        &[
            "--device",
            "cuda",
            "--plan-only",
            "--memory-budget",
            "0.0001",
        ],
    );
    assert!(!ok, "{refused}");
    assert!(
        refused.contains("--lora-rank") && refused.contains("needs about"),
        "{refused}"
    );
    // Full fine-tuning: the moments are a large part, so spreading them is advised; LoRA's are
    // not.
    assert!(refused.contains("over more GPUs (--devices"), "{refused}");
    let (ok, lora_refused) = wdpo_at(
        &model("tiny-mistral"),
        &pairs,
        &out,
        &[
            "--lora-rank",
            "8",
            "--device",
            "cuda",
            "--plan-only",
            "--memory-budget",
            "0.0001",
        ],
    );
    assert!(
        !ok && lora_refused.contains("needs about"),
        "{lora_refused}"
    );
    assert!(!lora_refused.contains("--devices"), "{lora_refused}");
    assert!(!out.exists());
}

/// The bytes of a part of a plan line ("optimizer 427 kB").
fn plan_part(line: &str, part: &str) -> f64 {
    let at = line
        .find(&format!("{part} "))
        .unwrap_or_else(|| panic!("no {part} in {line}"));
    let mut words = line[at + part.len()..].split_whitespace();
    let value: f64 = words.next().unwrap().parse().unwrap();
    let unit = words.next().unwrap().trim_end_matches([',', ')']);
    value
        * match unit {
            "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            other => panic!("unit {other} in {line}"),
        }
}

/// --plan-only --devices on GPUs that are not here plans each device (full fine-tuning in bf16,
/// a GPU's default): every replica holds the bf16 weights and their bf16 gradients, and the
/// weights' owners hold their f32 masters, f32 gradients and the optimiser's moments, so each
/// of those parts adds up over the devices to the one-device plan's, none more than an equal
/// share plus the largest weight (tiny-llama's embedding, 31 % of it); a device named twice
/// holds both its replicas.
#[test]
fn plan_only_deals_the_optimizer_out_over_the_devices() {
    let Some((_dir, pairs, out)) = without_a_gpu() else {
        return; // a GPU here: the devices would be opened
    };
    let plan = |devices: &str| -> Vec<String> {
        let args = ["--memory-budget", "80", "--plan-only", "--devices", devices];
        let (ok, stderr) = wdpo_at(&model("tiny-llama"), &pairs, &out, &args);
        assert!(ok, "{stderr}");
        assert!(!out.exists());
        let lines = stderr
            .lines()
            .filter(|l| l.starts_with("opt-wdpo: memory estimate"));
        lines.map(String::from).collect()
    };
    let one = plan("cuda");
    assert_eq!(one.len(), 1, "{one:?}");
    let one = &one[0];
    let config =
        optune_model::ModelConfig::from_file(&model("tiny-llama").join("config.json")).unwrap();
    let largest = (config.vocab_size * config.hidden_size) as f64;
    let share_bound = 0.25 + largest / optune_model::weight_count(&config) as f64;
    // The bf16 gradients, 2 of the 6 bytes a trained weight's gradients take on one device.
    let bf16_gradients = plan_part(one, "gradients") / 3.0;
    let four = plan("cuda:0,cuda:1,cuda:2,cuda:3");
    assert_eq!(four.len(), 4, "{four:?}");
    let mut sums = [0.0; 3];
    for (k, line) in four.iter().enumerate() {
        assert!(line.ends_with(&format!("on cuda:{k}")), "{line}");
        assert_eq!(plan_part(line, "weights"), plan_part(one, "weights"));
        let owned = [
            plan_part(line, "f32 masters"),
            plan_part(line, "optimizer"),
            plan_part(line, "gradients") - bf16_gradients,
        ];
        let whole = [
            plan_part(one, "f32 masters"),
            plan_part(one, "optimizer"),
            plan_part(one, "gradients") - bf16_gradients,
        ];
        for ((owned, whole), sum) in owned.iter().zip(whole).zip(&mut sums) {
            assert!(
                *owned <= whole * share_bound * 1.01,
                "{owned} of {whole}: {line}"
            );
            *sum += owned / whole;
        }
    }
    for sum in sums {
        assert!((sum - 1.0).abs() < 0.01, "{sums:?}: {four:?}");
    }
    let shared = plan("cuda:0,cuda:1,cuda:0");
    assert_eq!(shared.len(), 2, "{shared:?}");
    assert!(
        shared[0].ends_with("on cuda:0 for its 2 replicas"),
        "{}",
        shared[0]
    );
    let doubled = plan_part(&shared[0], "weights") / plan_part(one, "weights");
    assert!((doubled - 2.0).abs() < 0.01, "{shared:?}");
    let sum = plan_part(&shared[0], "optimizer") + plan_part(&shared[1], "optimizer");
    assert!(
        (sum / plan_part(one, "optimizer") - 1.0).abs() < 0.01,
        "{shared:?}"
    );
}

/// A GPU run refused for memory names the fewest GPUs of that size `--devices` would fit it on,
/// and the plan of that many fits while one fewer is refused (tiny-llama's full fine-tuning, with
/// budgets stepped down until the advice names three GPUs or more).
#[test]
fn a_refused_gpu_plan_names_the_fewest_gpus_that_fit() {
    let Some((_dir, pairs, out)) = without_a_gpu() else {
        return; // a GPU here: the devices would be opened
    };
    let plan = |budget: &str, devices: &str| -> (bool, String) {
        let args = [
            "--plan-only",
            "--memory-budget",
            budget,
            "--devices",
            devices,
        ];
        wdpo_at(&model("tiny-llama"), &pairs, &out, &args)
    };
    let mut named = None;
    for step in 0..150 {
        let budget = format!("{:.4}", 0.03 - 0.0002 * step as f64);
        let (ok, stderr) = plan(&budget, "cuda");
        let Some(at) = stderr.find("by the plan it fits ") else {
            continue;
        };
        assert!(!ok, "{stderr}");
        let count: usize = stderr[at + 20..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            stderr.contains(&format!("cuda:0,…,cuda:{})", count - 1)),
            "{stderr}"
        );
        if count >= 3 {
            named = Some((budget, count));
            break;
        }
    }
    let (budget, count) = named.expect("no budget named three GPUs or more");
    let devices = |n: usize| {
        (0..n)
            .map(|k| format!("cuda:{k}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (ok, stderr) = plan(&budget, &devices(count));
    assert!(ok, "{count} GPUs of {budget} GB: {stderr}");
    let (ok, stderr) = plan(&budget, &devices(count - 1));
    assert!(!ok && stderr.contains("needs about"), "{stderr}");
}

/// Issue 14's memory goal on the generic kernels (the op graph a GPU runs): `--dtype bf16` LoRA
/// holds its frozen weights in bf16 only, from reading the checkpoint to saving the merged model
/// (as f32, the config's dtype), so it peaks at ≤ 0.75× the f32 run's RSS on a model whose weights
/// outweigh the rest of the process (SmolLM2-135M's measurement is in docs/cuda.md). Reading the
/// f32 file whole before casting, or casting every weight to f32 at once to save, puts both runs
/// at about the same peak.
#[test]
fn bf16_lora_peaks_at_most_three_quarters_of_the_f32_rss() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("wide");
    // 4 layers of 1024 × 4096: 240 MB of f32 weights, trained on short sequences one pair at a
    // time, so that the weights (not the activations) make the peak.
    optune_testkit::memory::write_wide_llama(&policy, 1024, 4096, 4, |json| {
        optune_model::llama_weight_shapes(&optune_model::ModelConfig::from_json_str(json).unwrap())
    });
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    let peak = |dtype: &str| -> f64 {
        let out = dir.path().join(dtype);
        let (ok, stderr) = wdpo_at(
            &policy,
            &pairs,
            &out,
            &[
                "--lora-rank",
                "8",
                "--batch-size",
                "1",
                "--max-length",
                "24",
                "--max-steps",
                "1",
                "--kernels",
                "generic",
                "--dtype",
                dtype,
            ],
        );
        assert!(ok, "{stderr}");
        let field = stderr
            .split_whitespace()
            .find_map(|f| f.strip_prefix("peak_rss_mb="))
            .unwrap_or_else(|| panic!("no peak_rss_mb in {stderr}"));
        field.parse().unwrap()
    };
    let (f32_mb, bf16_mb) = (peak("f32"), peak("bf16"));
    eprintln!("peak RSS: f32 {f32_mb} MB, bf16 {bf16_mb} MB");
    assert!(
        bf16_mb <= 0.75 * f32_mb,
        "bf16 LoRA peaked at {bf16_mb} MB, f32 at {f32_mb} MB: {:.2}×",
        bf16_mb / f32_mb
    );
}

/// `--chat-template-kwargs` reaches the prompts opt-wdpo reads: tiny-qwen3's reference log-probs
/// with `{"enable_thinking": false}` are those of transformers' rendering with that variable
/// (chat_templates.json), computed here through the library, and differ from the run without.
#[test]
fn chat_template_kwargs_render_the_pairs_prompts() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            optune_testkit::workspace_root().join("testdata/reference/chat_templates.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let variables = serde_json::json!({"enable_thinking": false});
    let cases: Vec<&serde_json::Value> = reference["template_variables"]["tiny-qwen3"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["add_generation_prompt"] == true && c["variables"] == variables)
        .filter(|c| {
            ["single_user", "system_user", "multi_turn"].contains(&c["name"].as_str().unwrap())
        })
        .collect();
    assert_eq!(cases.len(), 3);
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    let rows: Vec<serde_json::Value> = (cases.iter().enumerate())
        .map(|(i, case)| {
            serde_json::json!({
                "prompt_id": format!("p{i}"), "messages": case["messages"],
                "chosen": format!("Sure, here it is {i}."), "rejected": "No.",
            })
        })
        .collect();
    write_jsonl(&pairs, &rows);
    let reference_logps = |extra: &[&str]| -> Vec<f64> {
        let out = tmp.path().join(format!("ref{}.jsonl", extra.len()));
        let (ok, err) = wdpo_on(
            "tiny-qwen3",
            &pairs,
            &out,
            &[&["--reference-only"], extra].concat(),
        );
        assert!(ok, "{err}");
        let text = std::fs::read_to_string(&out).unwrap();
        text.lines()
            .map(|line| {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                row["ref_chosen_logp"].as_f64().unwrap()
            })
            .collect()
    };
    let flag = variables.to_string();
    let with = reference_logps(&["--chat-template-kwargs", &flag]);
    let without = reference_logps(&[]);

    let (policy, tokenizer, meta) = optune_model::load_model(
        &model("tiny-qwen3"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let eos = meta.eos_token_ids[0];
    let tokenized: Vec<optune_model::TokenizedPair> = (cases.iter().zip(&rows))
        .map(|(case, row)| {
            let mut response = tokenizer.encode(row["chosen"].as_str().unwrap()).unwrap();
            response.push(eos);
            optune_model::TokenizedPair {
                prompt: tokenizer
                    .encode(case["rendered"].as_str().unwrap())
                    .unwrap(),
                response,
            }
        })
        .collect();
    let expected: Vec<f32> = optune_model::sequence_logprobs(&policy, &tokenized, 3)
        .unwrap()
        .sums
        .to_vec1()
        .unwrap();
    for (i, ((got, want), plain)) in with.iter().zip(&expected).zip(&without).enumerate() {
        assert!(
            (got - *want as f64).abs() <= 1e-4 * got.abs(),
            "pair {i}: {got} against {want}"
        );
        assert!((got - plain).abs() > 1e-3, "pair {i}: {got} and {plain}");
    }
}
