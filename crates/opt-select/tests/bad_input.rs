//! Every bad input ends opt-select with a non-zero exit, an error naming the
//! file, column or value, no panic, and nothing in the output directory.

use optune_testkit::{assert_failed_cleanly, run, testdata, write_bad_scored_inputs};
use std::path::Path;
use std::process::Command;

/// `opt-select ARGS -o OUT_DIR/regen.parquet`, to which each case adds.
fn opt_select(args: &[&str], out_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opt-select"));
    command
        .args(args)
        .arg("-o")
        .arg(out_dir.join("regen.parquet"));
    command
}

#[test]
fn bad_scored_shards_fail_cleanly() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for bad in write_bad_scored_inputs(inputs.path()) {
        let mut command = opt_select(&["--rho", "0.5"], out.path());
        command
            .arg("--rest")
            .arg(out.path().join("kept.parquet"))
            .arg(&bad.path);
        let expected: Vec<&str> = bad.expected.iter().map(String::as_str).collect();
        assert_failed_cleanly(bad.case, &run(&mut command, None), &expected, out.path());
    }
}

#[test]
fn bad_stdin_fails_cleanly_and_names_stdin() {
    let out = tempfile::tempdir().unwrap();
    let outcome = run(
        &mut opt_select(&["--rho", "0.5"], out.path()),
        Some(b"PAR1 but not really"),
    );
    let expected = ["<stdin>", "not a readable Parquet file"];
    assert_failed_cleanly("garbage on stdin", &outcome, &expected, out.path());
}

#[test]
fn bad_arguments_fail_cleanly() {
    let out = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], &[&str]); 7] = [
        ("rho 0", &["--rho", "0"], &["'0'", "--rho", "(0, 1]"]),
        ("rho 1.5", &["--rho", "1.5"], &["'1.5'", "--rho", "(0, 1]"]),
        ("rho NaN", &["--rho", "NaN"], &["'NaN'", "--rho", "(0, 1]"]),
        ("rho text", &["--rho", "most"], &["'most'", "not a number"]),
        ("no --rho", &[], &["--rho <RHO>"]),
        (
            "unknown --by",
            &["--rho", "0.5", "--by", "median"],
            &["'median'", "max, mean, min, gap"],
        ),
        (
            "unknown --strategy",
            &["--rho", "0.5", "--strategy", "best"],
            &["'best'", "lowest, random"],
        ),
    ];
    for (case, args, expected) in cases {
        let mut command = opt_select(args, out.path());
        command.arg(testdata("scored.jsonl"));
        assert_failed_cleanly(case, &run(&mut command, None), expected, out.path());
    }
}

#[test]
fn missing_inputs_and_unwritable_outputs_fail_cleanly() {
    let out = tempfile::tempdir().unwrap();
    let mut missing = opt_select(&["--rho", "0.5"], out.path());
    missing.arg(out.path().join("absent.parquet"));
    let expected = ["absent.parquet", "cannot read"];
    assert_failed_cleanly(
        "missing input",
        &run(&mut missing, None),
        &expected,
        out.path(),
    );

    let mut same_twice = opt_select(&["--rho", "0.5"], out.path());
    same_twice
        .arg("--rest")
        .arg(out.path().join("regen.parquet"))
        .arg(testdata("scored.jsonl"));
    let expected = ["--rest and -o"];
    assert_failed_cleanly(
        "same -o and --rest",
        &run(&mut same_twice, None),
        &expected,
        out.path(),
    );

    let mut csv = Command::new(env!("CARGO_BIN_EXE_opt-select"));
    csv.args(["--rho", "0.5", "-o"])
        .arg(out.path().join("regen.csv"));
    csv.arg(testdata("scored.jsonl"));
    let expected = ["regen.csv", "cannot write CSV"];
    assert_failed_cleanly("CSV output", &run(&mut csv, None), &expected, out.path());

    // With --rest: -o is checked before anything is written, so no --rest is left behind.
    let mut csv_with_rest = Command::new(env!("CARGO_BIN_EXE_opt-select"));
    csv_with_rest
        .args(["--rho", "0.5", "-o"])
        .arg(out.path().join("regen.csv"))
        .arg("--rest")
        .arg(out.path().join("kept.parquet"))
        .arg(testdata("scored.jsonl"));
    let outcome = run(&mut csv_with_rest, None);
    assert_failed_cleanly("CSV output with --rest", &outcome, &expected, out.path());

    let mut no_dir = opt_select(&["--rho", "0.5"], &out.path().join("nodir"));
    no_dir.arg(testdata("scored.jsonl"));
    let expected = ["nodir does not exist"];
    assert_failed_cleanly(
        "missing directory",
        &run(&mut no_dir, None),
        &expected,
        out.path(),
    );

    // One file, however it is spelled, cannot be both outputs.
    let sub = tempfile::tempdir().unwrap();
    let mut roundabout = opt_select(&["--rho", "0.5"], sub.path());
    roundabout
        .arg("--rest")
        .arg(
            sub.path()
                .join("../")
                .join(sub.path().file_name().unwrap())
                .join("regen.parquet"),
        )
        .arg(testdata("scored.jsonl"));
    let expected = ["--rest and -o"];
    assert_failed_cleanly(
        "-o and --rest spelled apart",
        &run(&mut roundabout, None),
        &expected,
        sub.path(),
    );

    // Nor an input: a failed write would then take the input with it.
    let input = sub.path().join("scored.jsonl");
    std::fs::copy(testdata("scored.jsonl"), &input).unwrap();
    let mut over_input = Command::new(env!("CARGO_BIN_EXE_opt-select"));
    over_input
        .args(["--rho", "0.5", "-o"])
        .arg(sub.path().join("regen.parquet"))
        .arg("--rest")
        .arg(&input)
        .arg(&input);
    let outcome = run(&mut over_input, None);
    assert!(!outcome.status.success(), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("--rest") && outcome.stderr.contains("is an input"),
        "{}",
        outcome.stderr
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        std::fs::read(testdata("scored.jsonl")).unwrap()
    );
}
