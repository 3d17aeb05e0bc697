//! Every bad input or command line ends opt-score with a non-zero exit, an error naming the
//! file, column, row or option, no panic, and nothing in the output directory.

mod common;

use common::{opt_score, repo_file, tiny_lexicon, write_jsonl};
use optune_testkit::{assert_failed_cleanly, run, write_bad_scored_inputs};
use serde_json::json;
use std::path::{Path, PathBuf};

/// `opt-score INPUT -o OUT/scored.parquet ARGS` (ARGS last: --reward-cmd takes the rest).
fn score(input: &Path, args: &[&str], out: &Path) -> optune_testkit::Outcome {
    let mut command = opt_score();
    command
        .arg(input)
        .arg("-o")
        .arg(out.join("scored.parquet"))
        .args(args);
    run(&mut command, None)
}

fn lexicon_arg() -> String {
    tiny_lexicon().display().to_string()
}

fn rm_arg() -> String {
    repo_file("testdata/models/tiny-rm-llama")
        .display()
        .to_string()
}

fn write(dir: &Path, name: &str, rows: &[serde_json::Value]) -> PathBuf {
    let path = dir.join(name);
    write_jsonl(&path, rows);
    path
}

#[test]
fn bad_shards_fail_cleanly() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let unreadable = ["truncated parquet", "text named .parquet", "empty file"];
    for bad in write_bad_scored_inputs(inputs.path())
        .into_iter()
        .filter(|bad| unreadable.contains(&bad.case))
    {
        let expected: Vec<&str> = bad.expected.iter().map(String::as_str).collect();
        assert_failed_cleanly(
            bad.case,
            &score(&bad.path, &["--lexicon", &lexicon_arg()], out.path()),
            &expected,
            out.path(),
        );
    }
}

#[test]
fn missing_or_null_columns_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let no_response = write(
        dir.path(),
        "no_response.jsonl",
        &[json!({"prompt_id": "a", "prompt": "Q", "text": "x"})],
    );
    let null_response = write(
        dir.path(),
        "null_response.jsonl",
        &[
            json!({"prompt_id": "a", "prompt": "Q", "response": "x"}),
            json!({"prompt_id": "a", "prompt": "Q", "response": null}),
        ],
    );
    let no_prompt = write(
        dir.path(),
        "no_prompt.jsonl",
        &[json!({"prompt_id": "a", "response": "x"})],
    );
    let no_id = write(
        dir.path(),
        "no_id.jsonl",
        &[json!({"prompt": "Q", "response": "x"})],
    );
    let no_user = write(
        dir.path(),
        "no_user.jsonl",
        &[
            json!({"prompt_id": "s", "messages": [{"role": "system", "content": "S"}], "response": "x"}),
        ],
    );
    let (lexicon, rm) = (lexicon_arg(), rm_arg());
    let program = ["--reward-cmd", "python3", "-c", "pass"];
    let cases: [(&str, &Path, Vec<&str>, Vec<&str>); 7] = [
        (
            "no response column",
            &no_response,
            vec!["--lexicon", &lexicon],
            vec!["no_response.jsonl: missing required column 'response' (found: prompt, prompt_id, text)"],
        ),
        ("null response", &null_response, vec!["--lexicon", &lexicon], vec!["null_response.jsonl: column 'response': null at row 2"]),
        ("no prompt for --rm", &no_prompt, vec!["--rm", &rm], vec!["no_prompt.jsonl: missing required column 'prompt' or 'messages'"]),
        ("no prompt for --reward-cmd", &no_prompt, program.to_vec(), vec!["no_prompt.jsonl: missing required column 'prompt' or 'messages'"]),
        ("no prompt_id for --reward-cmd", &no_id, program.to_vec(), vec!["no_id.jsonl: missing required column 'prompt_id'"]),
        ("no prompt_id for --shard", &no_id, vec!["--lexicon", &lexicon, "--shard", "1/2"], vec!["no_id.jsonl: missing required column 'prompt_id'"]),
        ("no user message", &no_user, program.to_vec(), vec!["no_user.jsonl: row 1 (prompt_id 's'): the conversation has no user message"]),
    ];
    for (case, input, args, expected) in cases {
        assert_failed_cleanly(
            case,
            &score(input, &args, out.path()),
            &expected,
            out.path(),
        );
    }
}

#[test]
fn bad_command_lines_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "responses.jsonl",
        &[json!({"prompt_id": "a", "prompt": "Q", "response": "good"})],
    );
    let (lexicon, rm) = (lexicon_arg(), rm_arg());
    let sources = "<--rm <DIR>|--reward-cmd <PROGRAM [ARGS]>...|--lexicon <FILE>>";
    let cases: [(&str, Vec<&str>, Vec<&str>); 10] = [
        (
            "no reward source",
            vec![],
            vec![
                "the following required arguments were not provided",
                sources,
            ],
        ),
        (
            "two sources",
            vec!["--lexicon", &lexicon, "--rm", &rm],
            vec!["'--lexicon <FILE>' cannot be used with '--rm <DIR>'"],
        ),
        (
            "three sources",
            vec!["--rm", &rm, "--lexicon", &lexicon, "--reward-cmd", "cat"],
            vec!["cannot be used with"],
        ),
        (
            "--max-length without --rm",
            vec!["--lexicon", &lexicon, "--max-length", "8"],
            vec!["cannot be used with", "'--max-length <TOKENS>'"],
        ),
        (
            "--cmd-timeout without --reward-cmd",
            vec!["--rm", &rm, "--cmd-timeout", "3"],
            vec!["cannot be used with", "'--cmd-timeout <SECONDS>'"],
        ),
        (
            "--reward-cmd without a program",
            vec!["--reward-cmd"],
            vec!["--reward-cmd <PROGRAM [ARGS]>", "a value is required"],
        ),
        (
            "bad --shard",
            vec!["--lexicon", &lexicon, "--shard", "3/2"],
            vec!["'3/2'", "K/N"],
        ),
        (
            "--batch-size 0",
            vec!["--rm", &rm, "--batch-size", "0"],
            vec!["--batch-size must be at least 1"],
        ),
        (
            "--cmd-timeout 0",
            vec!["--cmd-timeout", "0", "--reward-cmd", "cat"],
            vec!["--cmd-timeout must be a positive number"],
        ),
        (
            "missing lexicon",
            vec!["--lexicon", "no_such_lexicon.txt"],
            vec!["no_such_lexicon.txt"],
        ),
    ];
    for (case, args, expected) in cases {
        assert_failed_cleanly(
            case,
            &score(&input, &args, out.path()),
            &expected,
            out.path(),
        );
    }
}

/// Scoring a shard into itself is refused before any scoring: the write would replace the input.
#[test]
fn an_output_over_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "responses.jsonl",
        &[json!({"prompt_id": "a", "prompt": "Q", "response": "good"})],
    );
    let before = std::fs::read(&input).unwrap();
    let mut command = opt_score();
    command
        .arg(&input)
        .arg("-o")
        .arg(&input)
        .args(["--lexicon", &lexicon_arg()]);
    let outcome = run(&mut command, None);
    assert!(!outcome.status.success());
    assert!(outcome.stderr.contains("is an input"), "{}", outcome.stderr);
    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert!(!dir.path().join("responses.jsonl.journal").exists());
}
