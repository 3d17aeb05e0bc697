//! `--reward-cmd` with small python3 programs: what they are sent, and every way they can fail.

mod common;

use common::{opt_score, responses, reward_script, write_jsonl};
use optune_testkit::{assert_failed_cleanly, read, run, Outcome};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Three prompts, four responses: raw text and message lists.
fn write_input(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("responses.jsonl");
    let conversation = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "Which river runs through Lisbon?"},
    ]);
    let rows = [
        json!({"prompt_id": "a", "messages": conversation, "sample": 0, "response": "The Tagus."}),
        json!({"prompt_id": "a", "messages": conversation, "sample": 1, "response": "Tejo"}),
        json!({"prompt_id": "b", "messages": [{"role": "user", "content": "Say \"hi\"\nplease"}], "sample": 0, "response": "hi ☕"}),
        json!({"prompt_id": "c", "messages": [{"role": "user", "content": "Count"}], "sample": 0, "response": ""}),
    ];
    write_jsonl(&path, &rows);
    path
}

/// `opt-score INPUT -o OUT/scored.parquet [--cmd-timeout T] --reward-cmd python3 SCRIPT ARGS…`
fn score(input: &Path, out: &Path, timeout: Option<&str>, script: &str, args: &[&str]) -> Outcome {
    let mut command = opt_score();
    command.arg(input).arg("-o").arg(out.join("scored.parquet"));
    if let Some(timeout) = timeout {
        command.args(["--cmd-timeout", timeout]);
    }
    command
        .args(["--reward-cmd", "python3"])
        .arg(reward_script(script))
        .args(args);
    run(&mut command, None)
}

#[test]
fn sends_each_row_and_writes_the_answers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path());
    let log = dir.path().join("requests.jsonl");
    let log_arg = log.to_str().unwrap();
    // Arguments after the script, hyphens included, belong to the program.
    let outcome = score(&input, dir.path(), None, "record.py", &["--log", log_arg]);
    outcome.assert_success();
    let command_line = format!(
        "python3 {} --log {log_arg}",
        reward_script("record.py").display()
    );
    assert!(
        outcome
            .stderr
            .starts_with(&format!("opt-score: rows=4 reward_model={command_line} ")),
        "{}",
        outcome.stderr
    );

    let sent: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let expected_prompts = [
        "Which river runs through Lisbon?",
        "Which river runs through Lisbon?",
        "Say \"hi\"\nplease",
        "Count",
    ];
    assert_eq!(sent.len(), 4);
    for (request, prompt) in sent.iter().zip(expected_prompts) {
        assert_eq!(request.as_object().unwrap().len(), 3, "{request}");
        assert_eq!(request["prompt"], prompt);
    }
    let ids: Vec<&str> = sent
        .iter()
        .map(|request| request["prompt_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "a", "b", "c"]);
    assert_eq!(sent[2]["response"], "hi ☕");

    let scored = read(&dir.path().join("scored.parquet"));
    assert_eq!(scored.floats("reward").unwrap(), [10.0, 4.0, 4.0, 0.0]);
    assert_eq!(
        scored.strings("reward_model").unwrap(),
        [command_line.as_str(); 4]
    );
}

#[test]
fn raw_text_prompts_are_sent_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    write_jsonl(
        &input,
        &responses(&[
            ("p1", "Write a haiku.", "Leaves fall"),
            ("p2", "Hi", "Hello!"),
        ]),
    );
    let log = dir.path().join("requests.jsonl");
    let outcome = score(
        &input,
        dir.path(),
        None,
        "record.py",
        &["--log", log.to_str().unwrap()],
    );
    outcome.assert_success();
    let sent = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        sent,
        concat!(
            r#"{"prompt_id":"p1","prompt":"Write a haiku.","response":"Leaves fall"}"#,
            "\n",
            r#"{"prompt_id":"p2","prompt":"Hi","response":"Hello!"}"#,
            "\n"
        )
    );
    assert_eq!(
        read(&dir.path().join("scored.parquet"))
            .floats("reward")
            .unwrap(),
        [11.0, 6.0]
    );
}

#[test]
fn failing_programs_name_the_row_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let input = write_input(dir.path());
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "early exit",
            "exit_after_two.py",
            &[
                "row 3 (prompt_id 'b')",
                "closed its stdout before answering",
                "exit status: 3",
                "giving up after two rows",
            ],
        ),
        (
            "non-JSON",
            "garbage.py",
            &[
                "row 1 (prompt_id 'a')",
                "answer is not JSON",
                "the reward is high",
            ],
        ),
        (
            "NaN",
            "nan_reward.py",
            &["row 2 (prompt_id 'a')", "not a finite number", "NaN"],
        ),
        (
            "no reward field",
            "missing_reward.py",
            &["row 1 (prompt_id 'a')", "no \"reward\" field"],
        ),
    ];
    for (case, script, fragments) in cases {
        let outcome = score(&input, out.path(), None, script, &[]);
        let mut expected = vec!["responses.jsonl: ", "reward program `python3 "];
        expected.extend(fragments);
        assert_failed_cleanly(case, &outcome, &expected, out.path());
    }
}

#[test]
fn a_hanging_program_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let input = write_input(dir.path());
    let pid_file = dir.path().join("hang.pid");
    let started = Instant::now();
    let outcome = score(
        &input,
        out.path(),
        Some("1"),
        "hang.py",
        &[pid_file.to_str().unwrap()],
    );
    let elapsed = started.elapsed();
    let expected = [
        "responses.jsonl: row 1 (prompt_id 'a')",
        "no answer within 1s",
        "pretending to load a model",
    ];
    assert_failed_cleanly("hang", &outcome, &expected, out.path());
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        !Path::new("/proc").join(pid.trim()).exists(),
        "the hanging program {pid} is still running"
    );
}

#[test]
fn a_missing_program_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let input = write_input(dir.path());
    let mut command = opt_score();
    command
        .arg(&input)
        .arg("-o")
        .arg(out.path().join("s.parquet"));
    command.args(["--reward-cmd", "optune-no-such-program", "--flag"]);
    let expected = ["starting reward program `optune-no-such-program --flag`"];
    assert_failed_cleanly(
        "missing program",
        &run(&mut command, None),
        &expected,
        out.path(),
    );
}
