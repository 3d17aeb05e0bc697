//! Every bad input ends opt-pairs with a non-zero exit, an error naming the
//! file, column or value, no panic, and nothing in the output directory.

use optune_testkit::{assert_failed_cleanly, run, testdata, write_bad_scored_inputs};
use std::path::Path;
use std::process::Command;

/// `opt-pairs ARGS -o OUT_DIR/pairs.parquet`
fn opt_pairs<S: AsRef<std::ffi::OsStr>>(args: &[S], out_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opt-pairs"));
    command
        .args(args)
        .arg("-o")
        .arg(out_dir.join("pairs.parquet"));
    command
}

#[test]
fn bad_scored_shards_fail_cleanly_in_any_position() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let good = testdata("scored.jsonl");
    for bad in write_bad_scored_inputs(inputs.path()) {
        let expected: Vec<&str> = bad.expected.iter().map(String::as_str).collect();
        let alone = run(&mut opt_pairs(&[&bad.path], out.path()), None);
        assert_failed_cleanly(bad.case, &alone, &expected, out.path());
        if bad.case == "no rows" {
            continue; // beside rows from another input, an empty shard is fine (ρ = 1 keeps nothing)
        }
        let second = run(&mut opt_pairs(&[&good, &bad.path], out.path()), None);
        assert_failed_cleanly(bad.case, &second, &expected, out.path());
    }
}

#[test]
fn duplicate_responses_name_both_rows() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let scored = testdata("scored.jsonl");
    let again = inputs.path().join("again.jsonl");
    std::fs::write(
        &again,
        concat!(
            r#"{"prompt_id": "p09", "prompt": "q", "sample": 0, "response": "x", "reward": 0.5}"#,
            "\n",
            r#"{"prompt_id": "p04", "prompt": "q", "sample": 1, "response": "y", "reward": 0.5}"#,
            "\n",
        ),
    )
    .unwrap();
    let outcome = run(&mut opt_pairs(&[&scored, &again], out.path()), None);
    let expected = format!(
        "duplicate response (prompt_id 'p04', sample 1): {} row 8 and {} row 2",
        scored.display(),
        again.display()
    );
    assert_failed_cleanly("duplicate across files", &outcome, &[&expected], out.path());

    let outcome = run(&mut opt_pairs(&[&scored, &scored], out.path()), None);
    let expected = ["duplicate response (prompt_id 'p01', sample 0)"];
    assert_failed_cleanly("the same file twice", &outcome, &expected, out.path());
}

#[test]
fn conflicting_column_types_name_both_files() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let scored = testdata("scored.jsonl");
    let other = inputs.path().join("other.jsonl");
    let row = concat!(
        r#"{"prompt_id": "p09", "prompt": "q", "sample": 0, "response": "x", "reward": 0.5, "#,
        r#""topic": [1, 2]}"#
    );
    std::fs::write(&other, row).unwrap();
    let outcome = run(&mut opt_pairs(&[&scored, &other], out.path()), None);
    let expected = format!(
        "column 'topic': utf8 in {} conflicts with list<int64> in {}",
        scored.display(),
        other.display()
    );
    assert_failed_cleanly("type conflict", &outcome, &[&expected], out.path());
}

/// A reward beyond half of f32's range would leave an infinite reward or gap in the pairs.
#[test]
fn a_reward_beyond_f32_is_named_by_its_row() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let huge = inputs.path().join("huge.jsonl");
    std::fs::write(
        &huge,
        concat!(
            r#"{"prompt_id": "p1", "prompt": "q", "sample": 0, "response": "x", "reward": 0.5}"#,
            "\n",
            r#"{"prompt_id": "p1", "prompt": "q", "sample": 1, "response": "y", "reward": 1e300}"#,
            "\n",
        ),
    )
    .unwrap();
    let outcome = run(&mut opt_pairs(&[&huge], out.path()), None);
    let expected = ["huge.jsonl: column 'reward': 1e300 at row 2 is too large"];
    assert_failed_cleanly("huge reward", &outcome, &expected, out.path());
}

#[test]
fn bad_arguments_fail_cleanly() {
    let out = tempfile::tempdir().unwrap();
    let scored = testdata("scored.jsonl");
    let scored = scored.to_str().unwrap();
    let cases: [(&str, [&str; 2], &[&str]); 4] = [
        (
            "negative gap",
            [scored, "--min-gap=-0.5"],
            &["'-0.5'", "--min-gap", ">= 0"],
        ),
        (
            "NaN gap",
            [scored, "--min-gap=NaN"],
            &["'NaN'", "--min-gap", ">= 0"],
        ),
        (
            "text gap",
            [scored, "--min-gap=wide"],
            &["'wide'", "not a number"],
        ),
        (
            "--format csv",
            [scored, "--format=csv"],
            &["'csv'", "parquet, jsonl"],
        ),
    ];
    for (case, args, expected) in cases {
        assert_failed_cleanly(
            case,
            &run(&mut opt_pairs(&args, out.path()), None),
            expected,
            out.path(),
        );
    }
}
