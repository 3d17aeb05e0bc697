//! opt-gen killed mid-run (SIGKILL) and run again: the journal beside the output keeps the
//! finished responses, the rerun generates only the rest and writes the uninterrupted run's
//! output, and a rerun with other arguments is refused.

use optune_testkit::{
    assert_resumed, generic_kernels, journal_path, journal_rows, kill_when_journalled, timed,
    workspace_root,
};
use std::path::Path;
use std::process::Command;

/// The tests of this file time whole runs: one at a time, so that they do not slow each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 300 prompts × `samples()` × 128 tokens on the tiny llama (seed 0 unless `extra` says): about
/// 10 s on 2 cores, long enough for the journal (written every 2 s) to fill in several steps.
fn opt_gen(output: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opt-gen"));
    command
        .arg("--model")
        .arg(workspace_root().join("testdata/models/tiny-llama"))
        .arg(workspace_root().join("pipelines/data/sentiment-prompts.jsonl"))
        .args(["--n", &samples().to_string()])
        .args(["--max-new-tokens", "128", "--ignore-eos"])
        // The rerun's other batch moves the generic path's logits in the last bits, and now and
        // then a sampled token with them (see opt-gen's cli tests); greedy decoding holds.
        .args(["--temperature", if generic_kernels() { "0" } else { "1.0" }])
        .args(extra)
        .arg("-o")
        .arg(output);
    command
}

/// Samples per prompt: enough for an uninterrupted run of ~10 s on the 2-core CI machine (on
/// either kernel path: the tiny llama decodes at ~49k tokens/s fused, ~38k generic), so that a
/// journal write (every 2 s) past 60 % comes well before the end.
fn samples() -> usize {
    12
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_output_in_less_time() {
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.parquet");
    let (outcome, whole_secs) = timed(&mut opt_gen(&whole, &[]));
    outcome.assert_success();
    assert!(
        !journal_path(&whole).exists(),
        "a finished run leaves no journal"
    );

    let resumed = dir.path().join("resumed.parquet");
    let kept = kill_when_journalled(
        &mut opt_gen(&resumed, &[]),
        &resumed,
        300 * samples() * 6 / 10,
    );
    assert!(!resumed.exists(), "a killed run leaves no output");
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with(".resumed"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Another batch size does not change the output, so the rerun may use one.
    let (outcome, rerun_secs) = timed(&mut opt_gen(&resumed, &["--batch-size", "7"]));
    assert_resumed(&outcome, kept, &resumed, &whole);
    eprintln!(
        "uninterrupted {whole_secs:.1} CPU s; killed after {kept} of {} responses; rerun {rerun_secs:.1} CPU s ({:.0} %)",
        300 * samples(),
        100.0 * rerun_secs / whole_secs
    );
    assert!(
        rerun_secs < 0.75 * whole_secs,
        "rerun took {rerun_secs:.1} CPU s against {whole_secs:.1} uninterrupted"
    );
}

#[test]
fn a_rerun_with_other_arguments_is_refused() {
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("responses.parquet");
    kill_when_journalled(&mut opt_gen(&output, &[]), &output, 1);
    let before = std::fs::read(journal_path(&output)).unwrap();
    assert!(journal_rows(&output) >= 1);

    let (outcome, _) = timed(&mut opt_gen(&output, &["--top-p", "0.5"]));
    assert_eq!(outcome.status.code(), Some(1));
    assert!(
        outcome.stderr.contains("responses.parquet.journal holds the unfinished work of a run with other arguments or inputs (--top-p: 0.9 then, 0.5 now)"),
        "{}",
        outcome.stderr
    );
    assert!(!output.exists());
    assert_eq!(
        std::fs::read(journal_path(&output)).unwrap(),
        before,
        "the journal is left alone"
    );

    // Another seed changes every request's random stream.
    let (outcome, _) = timed(&mut opt_gen(&output, &["--seed", "6"]));
    assert_eq!(outcome.status.code(), Some(1));
    assert!(
        outcome
            .stderr
            .contains("the prompts (input, --shard, --n, --seed, template): "),
        "{}",
        outcome.stderr
    );
}
