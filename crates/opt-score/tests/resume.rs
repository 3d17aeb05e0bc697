//! opt-score --rm killed mid-run (SIGKILL) and run again: the journal beside the output keeps
//! the rewards of the finished rows, the rerun scores only the rest and writes the uninterrupted
//! run's output, and a rerun with other arguments is refused.

mod common;

use common::{opt_score, repo_file, write_jsonl};
use optune_testkit::{assert_resumed, generic_kernels, journal_path, kill_when_journalled, timed};
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// The tests of this file time whole runs: one at a time, so that they do not slow each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Responses to score: enough for an uninterrupted run of ~10 s on the 2-core CI machine, so
/// that the journal (written every 2 s) holds a quarter of them well before the run ends: 9600,
/// or 3600 on the generic kernels (the `make test` pass that tests the op graph CUDA runs),
/// which score about 2.5 times slower. With 4800 and 1200 rows and the kill at half, a run that
/// ended before its second write failed the test.
fn rows() -> usize {
    if generic_kernels() {
        3600
    } else {
        9600
    }
}

/// rows() / 10 prompts × 10 responses of 20 to 180 words (so of many lengths), made up from a
/// fixed word list.
fn write_responses(path: &Path) {
    let words = [
        "good", "bad", "the", "movie", "was", "really", "not", "great", "plot", "fun",
    ];
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let rows: Vec<_> = (0..rows())
        .map(|i| {
            let length = 20 + next() % 160;
            let response: Vec<&str> = (0..length).map(|_| words[next() % words.len()]).collect();
            json!({
                "prompt_id": format!("p{:04}", i / 10),
                "sample": i % 10,
                "prompt": format!("Tell me about film number {}.", i / 10),
                "response": response.join(" "),
            })
        })
        .collect();
    write_jsonl(path, &rows);
}

fn score(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut command = opt_score();
    command
        .arg(input)
        .arg("--rm")
        .arg(repo_file("testdata/models/tiny-rm-llama"))
        .args(["--truncate", "left"])
        .args(extra)
        .arg("-o")
        .arg(output);
    command
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_output() {
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    write_responses(&input);
    let whole = dir.path().join("whole.parquet");
    let (outcome, whole_secs) = timed(&mut score(&input, &whole, &[]));
    outcome.assert_success();
    assert!(
        !journal_path(&whole).exists(),
        "a finished run leaves no journal"
    );

    let resumed = dir.path().join("resumed.parquet");
    let kept = kill_when_journalled(&mut score(&input, &resumed, &[]), &resumed, rows() / 4);
    assert!(!resumed.exists(), "a killed run leaves no output");
    // Another batch size does not change a reward, so the rerun may use one.
    let (outcome, rerun_secs) = timed(&mut score(&input, &resumed, &["--batch-size", "5"]));
    assert_resumed(&outcome, kept, &resumed, &whole);
    eprintln!(
        "uninterrupted {whole_secs:.1} s; killed after {kept} of {} rows; rerun {rerun_secs:.1} s",
        rows()
    );
}

#[test]
fn a_rerun_with_other_arguments_is_refused() {
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    write_responses(&input);
    let output = dir.path().join("scored.parquet");
    kill_when_journalled(&mut score(&input, &output, &[]), &output, 1);
    let before = std::fs::read(journal_path(&output)).unwrap();
    let (outcome, _) = timed(&mut score(&input, &output, &["--max-length", "128"]));
    assert_eq!(outcome.status.code(), Some(1));
    assert!(
        outcome.stderr.contains("scored.parquet.journal holds the unfinished work of a run with other arguments or inputs (the rows (input, --shard, --max-length, --truncate, template): "),
        "{}",
        outcome.stderr
    );
    assert!(!output.exists());
    assert_eq!(std::fs::read(journal_path(&output)).unwrap(), before);
}
