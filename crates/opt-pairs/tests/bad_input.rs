//! Every bad input ends opt-pairs with a non-zero exit, an error naming the
//! file, column or value, no panic, and nothing in the output directory.

use optune_testkit::{assert_failed_cleanly, run, testdata, write_bad_scored_inputs};

const OPT_PAIRS: &str = env!("CARGO_BIN_EXE_opt-pairs");

#[test]
fn bad_scored_shards_fail_cleanly_in_any_position() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let pairs = out.path().join("pairs.parquet");
    let good = testdata("scored.jsonl");
    for bad in write_bad_scored_inputs(inputs.path()) {
        let expected: Vec<&str> = bad.expected.iter().map(String::as_str).collect();
        let alone = [bad.path.to_str().unwrap(), "-o", pairs.to_str().unwrap()];
        assert_failed_cleanly(
            bad.case,
            &run(OPT_PAIRS.as_ref(), &alone, None),
            &expected,
            out.path(),
        );
        if bad.case == "no rows" {
            continue; // beside rows from another input, an empty shard is fine (ρ = 1 keeps nothing)
        }
        let second = [
            good.to_str().unwrap(),
            bad.path.to_str().unwrap(),
            "-o",
            pairs.to_str().unwrap(),
        ];
        assert_failed_cleanly(
            bad.case,
            &run(OPT_PAIRS.as_ref(), &second, None),
            &expected,
            out.path(),
        );
    }
}

#[test]
fn duplicate_responses_name_both_rows() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let pairs = out.path().join("pairs.parquet");
    let scored = testdata("scored.jsonl");
    let again = inputs.path().join("again.jsonl");
    std::fs::write(
        &again,
        r#"{"prompt_id": "p09", "sample": 0, "response": "x", "reward": 0.5}
{"prompt_id": "p04", "sample": 1, "response": "y", "reward": 0.5}
"#,
    )
    .unwrap();
    let args = [
        scored.to_str().unwrap(),
        again.to_str().unwrap(),
        "-o",
        pairs.to_str().unwrap(),
    ];
    let expected = format!(
        "duplicate response (prompt_id 'p04', sample 1): {} row 8 and {} row 2",
        scored.display(),
        again.display()
    );
    assert_failed_cleanly(
        "duplicate across files",
        &run(OPT_PAIRS.as_ref(), &args, None),
        &[&expected],
        out.path(),
    );

    let args = [
        scored.to_str().unwrap(),
        scored.to_str().unwrap(),
        "-o",
        pairs.to_str().unwrap(),
    ];
    let outcome = run(OPT_PAIRS.as_ref(), &args, None);
    assert_failed_cleanly(
        "the same file twice",
        &outcome,
        &["duplicate response (prompt_id 'p01', sample 0)"],
        out.path(),
    );
}

#[test]
fn conflicting_column_types_name_both_files() {
    let inputs = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let pairs = out.path().join("pairs.parquet");
    let scored = testdata("scored.jsonl");
    let other = inputs.path().join("other.jsonl");
    std::fs::write(
        &other,
        r#"{"prompt_id": "p09", "sample": 0, "response": "x", "reward": 0.5, "topic": [1, 2]}"#,
    )
    .unwrap();
    let args = [
        scored.to_str().unwrap(),
        other.to_str().unwrap(),
        "-o",
        pairs.to_str().unwrap(),
    ];
    let expected = format!(
        "column 'topic': utf8 in {} conflicts with list<int64> in {}",
        scored.display(),
        other.display()
    );
    assert_failed_cleanly(
        "type conflict",
        &run(OPT_PAIRS.as_ref(), &args, None),
        &[&expected],
        out.path(),
    );
}

#[test]
fn bad_arguments_fail_cleanly() {
    let out = tempfile::tempdir().unwrap();
    let pairs = out.path().join("pairs.parquet");
    let scored = testdata("scored.jsonl");
    for (gap, expected) in [("-0.5", "'-0.5'"), ("NaN", "'NaN'"), ("wide", "'wide'")] {
        let min_gap = format!("--min-gap={gap}");
        let args = [
            scored.to_str().unwrap(),
            &min_gap,
            "-o",
            pairs.to_str().unwrap(),
        ];
        assert_failed_cleanly(
            gap,
            &run(OPT_PAIRS.as_ref(), &args, None),
            &[expected, "--min-gap"],
            out.path(),
        );
    }
    let args = [
        scored.to_str().unwrap(),
        "--format",
        "csv",
        "-o",
        pairs.to_str().unwrap(),
    ];
    assert_failed_cleanly(
        "--format csv",
        &run(OPT_PAIRS.as_ref(), &args, None),
        &["'csv'", "parquet, jsonl"],
        out.path(),
    );
}
