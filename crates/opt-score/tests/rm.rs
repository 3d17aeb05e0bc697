//! `--rm` against the tiny testdata reward models: scores match the committed transformers
//! references in the input's row order, and do not depend on the batch or the shard.

mod common;

use common::{opt_score, repo_file, write_jsonl};
use optune_shard::arrow::datatypes::DataType;
use optune_testkit::{
    assert_failed_cleanly, assert_floats_close, generic_kernels, read, run, write_parquet,
    REWARD_MODELS,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn model_dir(name: &str) -> PathBuf {
    repo_file("testdata/models").join(name)
}

/// The reference cases of `testdata/reference/NAME.json`.
fn reference_cases(name: &str) -> Vec<Value> {
    let path = repo_file("testdata/reference").join(format!("{name}.json"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let reference: Value = serde_json::from_str(&text).unwrap();
    reference["cases"].as_array().expect("cases").clone()
}

/// A responses row for a reference case: its messages, or its raw prompt as one user message
/// (the reference renders both the same way) when `raw_prompts` is false; its raw prompt when
/// true.
fn case_row(index: usize, case: &Value, raw_prompts: bool) -> Value {
    let mut row = json!({
        "prompt_id": format!("c{index}"),
        "sample": 0,
        "response": case["response"],
        "note": format!("carried {index}"),
    });
    match case.get("messages") {
        Some(messages) if !raw_prompts => row["messages"] = messages.clone(),
        None if raw_prompts => row["prompt"] = case["prompt"].clone(),
        None => row["messages"] = json!([{"role": "user", "content": case["prompt"]}]),
        Some(_) => unreachable!("filtered out"),
    }
    row
}

/// Writes `model`'s reference cases (as message lists) to `dir/responses.jsonl`, and returns a
/// runner of opt-score over them with `model`, the given arguments and `-o out/scored.parquet`.
fn cases_scorer<'a>(
    model: &'a str,
    dir: &Path,
    out: &'a Path,
) -> impl Fn(&[&str]) -> optune_testkit::Outcome + 'a {
    let rows: Vec<Value> = reference_cases(model)
        .iter()
        .enumerate()
        .map(|(i, case)| case_row(i, case, false))
        .collect();
    let input = dir.join("responses.jsonl");
    write_jsonl(&input, &rows);
    move |extra| {
        let mut command = opt_score();
        command
            .arg(&input)
            .arg("--rm")
            .arg(model_dir(model))
            .args(extra)
            .arg("-o")
            .arg(out.join("scored.parquet"));
        run(&mut command, None)
    }
}

/// Scores `rows` with `model` at --batch-size 2 and checks each reward against `expected`.
fn check_scores(model: &str, rows: &[Value], expected: &[f64], dir: &Path) {
    let input = dir.join(format!("{model}-{}.jsonl", rows.len()));
    let output = dir.join(format!("{model}-{}.parquet", rows.len()));
    write_jsonl(&input, rows);
    let outcome = run(
        opt_score()
            .arg(&input)
            .arg("--rm")
            .arg(model_dir(model))
            .args(["--batch-size", "2", "-o"])
            .arg(&output),
        None,
    );
    outcome.assert_success();
    // The summary, after the packed passes' plan (a GPU, the generic kernels).
    let summary = outcome.stderr.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with(&format!(
            "opt-score: rows={} reward_model={model} ",
            rows.len()
        )),
        "{}",
        outcome.stderr
    );

    let scored = read(&output);
    let input_shard = read(&input);
    let mut columns = input_shard.column_names();
    columns.extend(["reward", "reward_model"]);
    assert_eq!(scored.column_names(), columns);
    assert_eq!(
        scored.column("reward").unwrap().data_type(),
        &DataType::Float32
    );
    assert_eq!(
        scored.strings("note").unwrap(),
        input_shard.strings("note").unwrap()
    );
    assert!(scored
        .strings("reward_model")
        .unwrap()
        .iter()
        .all(|name| *name == model));
    let rewards = scored.floats("reward").unwrap();
    assert_eq!(rewards.len(), expected.len());
    for (row, (ours, theirs)) in rewards.iter().zip(expected).enumerate() {
        assert!(
            (ours - theirs).abs() < 1e-4,
            "{model} row {}: {ours} vs transformers {theirs}",
            row + 1
        );
    }
}

#[test]
fn scores_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for model in REWARD_MODELS {
        let cases = reference_cases(model);
        // Every case, as message lists: lengths differ, so the length bucketing reorders rows
        // that must come back in input order.
        let rows: Vec<Value> = cases
            .iter()
            .enumerate()
            .map(|(i, case)| case_row(i, case, false))
            .collect();
        let expected: Vec<f64> = cases
            .iter()
            .map(|case| case["score"].as_f64().unwrap())
            .collect();
        check_scores(model, &rows, &expected, dir.path());

        // The raw-text prompts in a `prompt` column.
        let raw: Vec<(usize, &Value)> = cases
            .iter()
            .enumerate()
            .filter(|(_, case)| case.get("messages").is_none())
            .collect();
        assert!(!raw.is_empty(), "{model}: no raw-prompt case");
        let rows: Vec<Value> = raw
            .iter()
            .map(|&(i, case)| case_row(i, case, true))
            .collect();
        let expected: Vec<f64> = raw
            .iter()
            .map(|(_, case)| case["score"].as_f64().unwrap())
            .collect();
        check_scores(model, &rows, &expected, dir.path());
    }
}

#[test]
fn rewards_do_not_depend_on_the_batch_or_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let cases = reference_cases("tiny-rm-llama");
    // Each case three times under other prompt_ids: batches then hold several sequences of one
    // length, and the slices of --shard other batch mates than the whole run.
    let rows: Vec<Value> = (0..3)
        .flat_map(|copy| {
            cases.iter().enumerate().map(move |(i, case)| {
                let mut row = case_row(i, case, false);
                row["prompt_id"] = json!(format!("p{}", (i * 7 + copy * 3) % 15));
                row
            })
        })
        .collect();
    let input = dir.path().join("responses.jsonl");
    write_jsonl(&input, &rows);
    let score = |extra: &[&str], name: &str| {
        let output = dir.path().join(name);
        run(
            opt_score()
                .arg(&input)
                .arg("--rm")
                .arg(model_dir("tiny-rm-llama"))
                .args(extra)
                .arg("-o")
                .arg(&output),
            None,
        )
        .assert_success();
        let scored = read(&output);
        let ids: Vec<String> = scored
            .strings("prompt_id")
            .unwrap()
            .iter()
            .map(|id| id.to_string())
            .collect();
        (ids, scored.floats("reward").unwrap())
    };
    let (_, whole) = score(&[], "whole.parquet");
    let (_, single) = score(&["--batch-size", "1"], "single.parquet");
    assert_eq!(single, whole, "--batch-size 1 against the default");
    // Each conversation alone; packed (a GPU, the generic kernels) fed in pieces of 7 tokens,
    // which candle's generic CPU ops do not compute to the bit as whole conversations (measured:
    // a few 1e-7 apart), so to rounding there.
    let (_, pieces) = score(&["--batch-tokens", "7"], "pieces.parquet");
    if generic_kernels() {
        assert_floats_close(
            &pieces,
            &whole,
            1e-5,
            "--batch-tokens 7 against the default",
        );
    } else {
        assert_eq!(pieces, whole, "--batch-tokens 7 against the default");
    }
    // --shard writes rows sorted by prompt_id: compare by prompt_id and input order.
    let (sorted_ids, sorted) = score(&["--shard", "1/1"], "sorted.parquet");
    let mut sliced = (Vec::new(), Vec::new());
    for k in 1..=3 {
        let (ids, rewards) = score(&["--shard", &format!("{k}/3")], &format!("{k}.parquet"));
        sliced.0.extend(ids);
        sliced.1.extend(rewards);
    }
    assert_eq!(sliced, (sorted_ids, sorted.clone()));
    let mut whole_sorted = whole.clone();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&r| rows[r]["prompt_id"].as_str().unwrap().to_string());
    for (position, &row) in order.iter().enumerate() {
        whole_sorted[position] = whole[row];
    }
    assert_eq!(sorted, whole_sorted, "--shard 1/1 against the whole run");
}

#[test]
fn packed_passes_print_their_plan_and_refuse_one_that_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let score = cases_scorer("tiny-rm-llama", dir.path(), out.path());
    // A billion positions of a pass: terabytes of KV cache, beyond any machine's memory.
    let huge = ["--batch-tokens", "1000000000"];
    if generic_kernels() {
        let outcome = score(&[]);
        outcome.assert_success();
        assert!(
            outcome
                .stderr
                .contains("opt-score: passes of at most 256 sequences and 2048 positions: "),
            "{}",
            outcome.stderr
        );
        // No rows: no pass to plan, whatever --batch-tokens says.
        let empty = dir.path().join("empty.parquet");
        write_parquet(
            &read(&out.path().join("scored.parquet")).take(&[]).unwrap(),
            &empty,
        );
        std::fs::remove_file(out.path().join("scored.parquet")).unwrap();
        let outcome = run(
            opt_score()
                .arg(&empty)
                .arg("--rm")
                .arg(model_dir("tiny-rm-llama"))
                .args(huge)
                .arg("-o")
                .arg(dir.path().join("empty-scored.parquet")),
            None,
        );
        outcome.assert_success();
        assert!(
            outcome.stderr.contains("opt-score: rows=0 "),
            "{}",
            outcome.stderr
        );
        // The longest conversation is the third case, 164 tokens.
        let expected = [
            "--batch-tokens 1000000000: a pass would need",
            "responses.jsonl: row 3 (prompt_id 'c2'), has 164 tokens",
            "lower --batch-tokens to",
        ];
        assert_failed_cleanly("a pass too large", &score(&huge), &expected, out.path());
    } else {
        // Batches of one length through the training forward: no plan, and one length's
        // sequences (here one each) bound a batch whatever --batch-tokens allows.
        let outcome = score(&huge);
        outcome.assert_success();
        assert!(
            !outcome.stderr.contains("passes of at most"),
            "{}",
            outcome.stderr
        );
    }
}

#[test]
fn long_conversations_fail_unless_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let cases = reference_cases("tiny-rm-qwen2");
    let score = cases_scorer("tiny-rm-qwen2", dir.path(), out.path());
    // Token counts of the qwen2 cases: 116, 31, 120, 38, 65. The first one above 100 is row 1.
    let expected = [
        "responses.jsonl: row 1 (prompt_id 'c0'): 116 tokens",
        "--max-length 100",
        "--truncate left",
    ];
    assert_failed_cleanly(
        "too long",
        &score(&["--max-length", "100"]),
        &expected,
        out.path(),
    );

    let expected = [
        "--max-length 1000",
        "256 positions the reward model's config allows",
    ];
    assert_failed_cleanly(
        "beyond the model",
        &score(&["--max-length", "1000"]),
        &expected,
        out.path(),
    );

    let outcome = score(&["--max-length", "100", "--truncate", "left"]);
    outcome.assert_success();
    assert!(
        outcome.stderr.contains(" tokens=334 truncated=2 "),
        "{}",
        outcome.stderr
    );
    let rewards = read(&out.path().join("scored.parquet"))
        .floats("reward")
        .unwrap();
    // Rows that fit score as before.
    for row in [1, 3, 4] {
        assert!(
            (rewards[row] - cases[row]["score"].as_f64().unwrap()).abs() < 1e-4,
            "row {}",
            row + 1
        );
    }
}

#[test]
fn models_and_conversations_the_reward_model_cannot_take_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    let user = |content: &str| json!({"role": "user", "content": content});
    write_jsonl(
        &input,
        &[
            json!({"prompt_id": "a", "messages": [user("Hi")], "response": "Hello"}),
            json!({"prompt_id": "b", "messages": [user("Hi"), user("again")], "response": "Hello"}),
        ],
    );
    let score = |model: &str| {
        run(
            opt_score()
                .arg(&input)
                .arg("--rm")
                .arg(model_dir(model))
                .arg("-o")
                .arg(out.path().join("s.parquet")),
            None,
        )
    };
    assert_failed_cleanly(
        "language model",
        &score("tiny-llama"),
        &["tiny-llama: not a reward model"],
        out.path(),
    );
    // The Mistral template raises on two user turns in a row.
    let expected = [
        "responses.jsonl: row 2 (prompt_id 'b'): rendering the chat template",
        "must alternate",
    ];
    assert_failed_cleanly(
        "template error",
        &score("tiny-rm-mistral"),
        &expected,
        out.path(),
    );
}

/// `--chat-template-kwargs` goes to the reward model's template: a name the rendering sets itself
/// is refused naming the flag, and so is the flag without --rm. tiny-rm-qwen3's template reads
/// `enable_thinking` only for a generation prompt, which a scored conversation has none of, so the
/// scores stay as transformers gives them.
#[test]
fn chat_template_kwargs_go_to_the_reward_models_template() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let score = cases_scorer("tiny-rm-qwen3", dir.path(), out.path());
    assert_failed_cleanly(
        "a variable the rendering sets",
        &score(&["--chat-template-kwargs", r#"{"eos_token": "x"}"#]),
        &["--chat-template-kwargs", "'eos_token'"],
        out.path(),
    );
    let outcome = score(&["--chat-template-kwargs", r#"{"enable_thinking": false}"#]);
    outcome.assert_success();
    let rewards = read(&out.path().join("scored.parquet"))
        .floats("reward")
        .unwrap();
    let expected: Vec<f64> = reference_cases("tiny-rm-qwen3")
        .iter()
        .map(|case| case["score"].as_f64().unwrap())
        .collect();
    assert_floats_close(&rewards, &expected, 1e-4, "tiny-rm-qwen3 scores");

    let lexicon_out = tempfile::tempdir().unwrap();
    let mut command = opt_score();
    command
        .arg(dir.path().join("responses.jsonl"))
        .arg("--lexicon")
        .arg(common::tiny_lexicon())
        .args(["--chat-template-kwargs", "{}"])
        .arg("-o")
        .arg(lexicon_out.path().join("scored.parquet"));
    assert_failed_cleanly(
        "without --rm",
        &run(&mut command, None),
        &["--chat-template-kwargs is for a reward model's chat template (--rm)"],
        lexicon_out.path(),
    );
}
