//! opt-select as users run it: files, stdin/stdout, pipes and --help.

use optune_shard::arrow::array::{ArrayRef, Float32Array, UInt32Array};
use optune_testkit::{
    check_parquet_readers, pipe, read, run, scored_fixture, testdata, write_parquet,
};
use std::process::Command;
use std::sync::Arc;

fn opt_select() -> Command {
    Command::new(env!("CARGO_BIN_EXE_opt-select"))
}

#[test]
fn selects_the_lowest_max_prompts_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (regen, kept) = (
        dir.path().join("regen.parquet"),
        dir.path().join("kept.parquet"),
    );
    let outcome = run(
        opt_select()
            .args(["--rho", "0.5", "-o"])
            .arg(&regen)
            .arg("--rest")
            .arg(&kept)
            .arg(testdata("scored.jsonl")),
        None,
    );
    outcome.assert_success();
    assert_eq!(
        outcome.stderr,
        "opt-select: rows_in=12 prompts=6 selected=3 rest_rows=6 rho=0.5 by=max strategy=lowest\n"
    );
    assert!(outcome.stdout.is_empty());

    let prompts = read(&regen);
    assert_eq!(prompts.column_names(), ["prompt_id", "prompt", "topic"]);
    assert_eq!(prompts.strings("prompt_id").unwrap(), ["p02", "p04", "p06"]);
    assert_eq!(
        prompts.strings("prompt").unwrap()[0],
        "Explain photosynthesis to a child."
    );

    let rest = read(&kept);
    assert_eq!(rest.column_names(), scored_fixture().column_names());
    assert_eq!(
        rest.strings("prompt_id").unwrap(),
        ["p01", "p01", "p03", "p03", "p05", "p05"]
    );
    assert_eq!(
        rest.floats("reward").unwrap(),
        [0.8, 0.2, 0.5, 0.5, 0.9, 0.7]
    );

    check_parquet_readers(&[regen, kept]);
}

#[test]
fn stdin_gives_the_same_selection_as_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let scored = dir.path().join("scored.parquet");
    write_parquet(&scored_fixture(), &scored);
    let bytes = std::fs::read(&scored).unwrap();
    let select = || {
        let mut command = opt_select();
        command.args(["--rho", "0.5", "--by", "gap"]);
        command
    };
    let from_file = run(select().arg(&scored), None);
    let selected = from_file.assert_success().stdout_shard();
    // Lowest gap: p03 (0.0), p05 (0.2), p02 (0.5).
    assert_eq!(
        selected.strings("prompt_id").unwrap(),
        ["p02", "p03", "p05"]
    );
    for stdin_run in [
        run(&mut select(), Some(&bytes)),
        run(select().arg("-"), Some(&bytes)),
    ] {
        assert_eq!(
            stdin_run.assert_success().stdout_shard().batch(),
            selected.batch()
        );
    }
}

#[test]
fn writes_jsonl_when_asked() {
    let outcome = run(
        opt_select()
            .args(["--rho", "1", "--format", "jsonl"])
            .arg(testdata("scored.jsonl")),
        None,
    );
    let text = outcome.assert_success().stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[0],
        r#"{"prompt_id":"p01","prompt":"Write a haiku about autumn.","topic":"poetry"}"#
    );
}

#[test]
fn output_format_follows_the_file_extension() {
    let dir = tempfile::tempdir().unwrap();
    let (regen, kept) = (
        dir.path().join("regen.jsonl"),
        dir.path().join("kept.parquet"),
    );
    let outcome = run(
        opt_select()
            .args(["--rho", "0.5", "-o"])
            .arg(&regen)
            .arg("--rest")
            .arg(&kept)
            .arg(testdata("scored.jsonl")),
        None,
    );
    outcome.assert_success();
    assert!(std::fs::read_to_string(&regen)
        .unwrap()
        .starts_with(r#"{"prompt_id":"p02""#));
    assert!(std::fs::read(&kept).unwrap().starts_with(b"PAR1"));
}

#[test]
fn composes_in_a_pipe() {
    // cat scored.jsonl | opt-select --rho 0.5 -o regen.parquet --rest - | opt-select --rho 0.3
    // The second stage ranks the prompts the first one kept: p01 (0.8), p03 (0.5), p05 (0.9).
    let dir = tempfile::tempdir().unwrap();
    let regen = dir.path().join("regen.parquet");
    let scored = std::fs::read(testdata("scored.jsonl")).unwrap();
    let outcomes = pipe(
        &mut [
            opt_select()
                .args(["--rho", "0.5", "--rest", "-", "-o"])
                .arg(&regen),
            opt_select().args(["--rho", "0.3"]),
        ],
        Some(&scored),
    );
    outcomes[0].assert_success();
    let selected = outcomes[1].assert_success().stdout_shard();
    assert_eq!(selected.strings("prompt_id").unwrap(), ["p03"]);
    assert_eq!(
        read(&regen).strings("prompt_id").unwrap(),
        ["p02", "p04", "p06"]
    );
}

#[test]
fn keeps_message_prompts() {
    // A scored shard whose prompts are chat messages keeps them in the output.
    // Best rewards: m01 0.2, m02 0.9, m03 0.6.
    let prompts = read(&testdata("prompts.jsonl"));
    let samples: ArrayRef = Arc::new(UInt32Array::from(vec![0, 1, 0, 1, 0, 1]));
    let rewards: ArrayRef = Arc::new(Float32Array::from(vec![0.1, 0.2, 0.9, 0.0, 0.5, 0.6]));
    let responses = prompts.take(&[0, 0, 1, 1, 2, 2]).unwrap();
    let responses = responses.with_column("sample", samples).unwrap();
    let responses = responses.with_column("reward", rewards).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (scored, regen) = (
        dir.path().join("scored.parquet"),
        dir.path().join("regen.parquet"),
    );
    write_parquet(&responses, &scored);
    run(
        opt_select()
            .args(["--rho", "0.3", "-o"])
            .arg(&regen)
            .arg(&scored),
        None,
    )
    .assert_success();
    let selected = read(&regen);
    assert_eq!(selected.column_names(), ["prompt_id", "messages", "topic"]);
    assert_eq!(selected.prompts().unwrap(), prompts.prompts().unwrap()[..1]);
    check_parquet_readers(&[scored, regen]);
}

#[test]
fn help_explains_what_and_when() {
    let help = run(opt_select().arg("--help"), None)
        .assert_success()
        .stdout_text();
    for fragment in [
        "rank lowest",
        "--rho <RHO>",
        "--rest <FILE>",
        "Possible values",
        "Examples:",
        "< scored.parquet",
        "--history <FILES>...",
        "--skip-flat <K>",
        "GRESO",
    ] {
        assert!(
            help.contains(fragment),
            "--help lacks {fragment:?}:\n{help}"
        );
    }
}

#[test]
fn history_ranks_by_every_round_and_skips_flat_prompts() {
    // testdata/shards/history (see its README): a flat in every round; b spread 1 in iteration
    // 1, then flat; c kept in iteration 2 (its iteration-1 rows copied), flat.
    let round = |i: u32| testdata(&format!("history/scored-iter{i}.jsonl"));
    let select = |extra: &[&str]| {
        let outcome = run(
            opt_select()
                .args(["--format", "jsonl", "--rho"])
                .args(extra)
                .arg(round(3))
                .arg("--history")
                .arg(round(1))
                .arg(round(2)),
            None,
        );
        outcome.assert_success();
        // No prompt selected: JSONL of no rows is empty.
        let ids: Vec<String> = if outcome.stdout.is_empty() {
            Vec::new()
        } else {
            let shard = outcome.stdout_shard();
            shard
                .strings("prompt_id")
                .unwrap()
                .into_iter()
                .map(String::from)
                .collect()
        };
        (ids, outcome.stderr.clone())
    };
    // Max over all rounds: a 0.9, b 1.0, c 0.1; the last round alone would pick b and c.
    let (ids, stderr) = select(&["0.6"]);
    assert_eq!(ids, ["a", "c"]);
    assert_eq!(stderr, "opt-select: rows_in=6 prompts=3 selected=2 rest_rows=2 rho=0.6 by=max strategy=lowest history=2\n");
    // Flat in the last 3 rounds: a only (c has 2 rounds, b spread in its first).
    let (ids, stderr) = select(&["1", "--skip-flat", "3", "--explore", "0"]);
    assert_eq!(ids, ["b", "c"]);
    assert!(stderr.ends_with(" history=2 skipped=1\n"), "{stderr}");
    let (ids, _) = select(&["1", "--skip-flat", "2", "--explore", "0"]);
    assert!(ids.is_empty(), "{ids:?}");
    let (ids, _) = select(&["1", "--skip-flat", "2", "--explore", "1"]);
    assert_eq!(ids, ["a", "b", "c"]);
    // --explore needs --skip-flat; K must be at least 1.
    for bad in [
        &["0.5", "--explore", "0.5"][..],
        &["0.5", "--skip-flat", "0"],
    ] {
        let outcome = run(opt_select().arg("--rho").args(bad).arg(round(3)), None);
        assert_eq!(
            outcome.status.code(),
            Some(2),
            "{bad:?}: {}",
            outcome.stderr
        );
    }
    // The input written after --history is taken as history, and stdin (empty here) as the
    // input: the error says so.
    let outcome = run(
        opt_select()
            .args(["--rho", "0.5", "--history"])
            .arg(round(1))
            .arg(round(3)),
        Some(b""),
    );
    assert!(
        !outcome.status.success() && outcome.stderr.contains("put INPUT before --history"),
        "{}",
        outcome.stderr
    );
}
