//! opt-gen end to end on the tiny testdata models: byte-identical output whatever the batch size
//! and thread count, sharding, --n, EOS handling and over-long prompts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> PathBuf {
    root().join("testdata/models").join(name)
}

fn prompts() -> PathBuf {
    root().join("testdata/shards/prompts.jsonl")
}

fn opt_gen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opt-gen"))
        .args(args)
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .expect("running opt-gen")
}

/// Runs opt-gen and returns its JSONL output.
fn run(args: &[&str]) -> String {
    let mut all = vec!["--format", "jsonl"];
    all.extend_from_slice(args);
    let out = opt_gen(&all);
    assert!(
        out.status.success(),
        "opt-gen {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn rows(jsonl: &str) -> Vec<serde_json::Value> {
    jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect()
}

#[test]
fn output_bytes_do_not_depend_on_batch_size_or_threads() {
    for name in ["tiny-llama", "tiny-mistral", "tiny-qwen2"] {
        let m = model(name);
        let p = prompts();
        let base = [
            m.to_str().unwrap(),
            p.to_str().unwrap(),
            "--n",
            "3",
            "--max-new-tokens",
            "24",
            "--seed",
            "7",
        ];
        let args = |batch: &'static str, threads: &'static str| {
            let mut a = vec!["--model"];
            a.extend_from_slice(&base);
            a.extend_from_slice(&["--batch-size", batch, "--threads", threads]);
            a
        };
        let reference = run(&args("1", "1"));
        assert_eq!(rows(&reference).len(), 9, "{name}");
        for (batch, threads) in [
            ("3", "1"),
            ("16", "1"),
            ("1", "2"),
            ("3", "2"),
            ("16", "2"),
            ("4", "3"),
        ] {
            assert_eq!(
                run(&args(batch, threads)),
                reference,
                "{name}: --batch-size {batch} --threads {threads}"
            );
        }
    }
}

#[test]
fn concatenated_shards_equal_the_unsharded_run() {
    let m = model("tiny-llama");
    let p = prompts();
    let base = [
        "--model",
        m.to_str().unwrap(),
        p.to_str().unwrap(),
        "--n",
        "2",
        "--max-new-tokens",
        "16",
        "--seed",
        "3",
    ];
    let whole = run(&base);
    let mut joined = String::new();
    for shard in ["1/2", "2/2"] {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--shard", shard, "--batch-size", "1"]);
        joined.push_str(&run(&args));
    }
    assert_eq!(joined, whole);
    // And three slices of three prompts: one each.
    let third = {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--shard", "3/3"]);
        rows(&run(&args))
    };
    assert_eq!(third.len(), 2);
    assert!(third.iter().all(|r| r["prompt_id"] == "m03"));
}

#[test]
fn n_gives_that_many_samples_per_prompt() {
    let m = model("tiny-llama");
    let p = prompts();
    let out = rows(&run(&[
        "--model",
        m.to_str().unwrap(),
        p.to_str().unwrap(),
        "--n",
        "3",
        "--max-new-tokens",
        "8",
    ]));
    assert_eq!(out.len(), 9);
    for (i, row) in out.iter().enumerate() {
        assert_eq!(row["prompt_id"], ["m01", "m02", "m03"][i / 3]);
        assert_eq!(row["sample"], (i % 3) as u64);
        assert!(
            row["messages"].is_array(),
            "prompt columns are carried: {row}"
        );
        for column in [
            "response",
            "response_tokens",
            "finish_reason",
            "policy",
            "seed",
            "logp",
        ] {
            assert!(!row[column].is_null(), "missing {column}: {row}");
        }
        assert!(row["logp"].as_f64().unwrap() < 0.0);
    }
    // Samples of one prompt use different random streams.
    assert!(out[0]["response"] != out[1]["response"] || out[1]["response"] != out[2]["response"]);
}

/// A copy of tiny-llama whose generation config stops at `eos`.
fn model_with_eos(dir: &Path, eos: &[u32]) -> PathBuf {
    let src = model("tiny-llama");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config = serde_json::json!({"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 3});
    std::fs::write(dir.join("generation_config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn eos_stops_a_response_and_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    // One id in 64 ends a response: some of 12 samples stop within 24 tokens, some do not.
    let eos: Vec<u32> = (2..512).step_by(64).collect();
    let m = model_with_eos(tmp.path(), &eos);
    let p = prompts();
    let base = [
        "--model",
        m.to_str().unwrap(),
        p.to_str().unwrap(),
        "--n",
        "4",
        "--max-new-tokens",
        "24",
        "--seed",
        "1",
    ];
    let stopped = rows(&run(&base));
    let mut free_args = base.to_vec();
    free_args.push("--ignore-eos");
    let free = rows(&run(&free_args));
    let mut kinds = std::collections::BTreeSet::new();
    for (s, f) in stopped.iter().zip(&free) {
        let tokens = s["response_tokens"].as_u64().unwrap();
        kinds.insert(s["finish_reason"].as_str().unwrap().to_string());
        assert_eq!(f["finish_reason"], "length");
        assert_eq!(f["response_tokens"], 24);
        match s["finish_reason"].as_str().unwrap() {
            "stop" => {
                assert!(tokens <= 24);
                // The same stream up to the stop: a shorter log-prob sum of the same prefix.
                assert!(s["logp"].as_f64().unwrap() >= f["logp"].as_f64().unwrap() - 1e-3);
            }
            "length" => {
                assert_eq!(tokens, 24);
                assert_eq!(s["response"], f["response"]);
                assert_eq!(s["logp"], f["logp"]);
            }
            other => panic!("finish_reason {other}"),
        }
    }
    assert_eq!(
        kinds.len(),
        2,
        "expected both stop and length among {kinds:?}"
    );
}

#[test]
fn over_long_prompts_fail_unless_truncated() {
    let m = model("tiny-llama");
    let p = prompts();
    let base = [
        "--format",
        "jsonl",
        "--model",
        m.to_str().unwrap(),
        p.to_str().unwrap(),
        "--n",
        "1",
        "--max-new-tokens",
        "4",
    ];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--max-prompt-tokens", "10"]);
    let out = opt_gen(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("prompt_id 'm01'") && stderr.contains("above --max-prompt-tokens 10"),
        "{stderr}"
    );
    assert!(stderr.contains("--truncate left"), "{stderr}");
    assert!(out.stdout.is_empty());
    args.extend_from_slice(&["--truncate", "left"]);
    let out = opt_gen(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rows(&String::from_utf8(out.stdout).unwrap()).len(), 3);
}
