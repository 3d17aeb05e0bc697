//! opt-score as users run it: --lexicon, --shard, stdin/stdout and the pipe into opt-select.

mod common;

use common::{opt_score, responses, tiny_lexicon, write_jsonl, OPT_SCORE};
use optune_testkit::{pipe, read, run, sibling_binary, write_parquet};
use std::process::Command;

/// Four prompts, two responses each, with lexicon scores worked out by hand from
/// tiny_lexicon.txt (compound = x / sqrt(x² + 15) of the summed valence x).
const ROWS: [(&str, &str, &str, f64); 8] = [
    // good = 2.0 → 0.458831
    ("p1", "Rate the film.", "good", 0.458831),
    // not good = 2.0 × -0.74 → -0.356959
    ("p1", "Rate the film.", "not good", -0.356959),
    // very good = 2.0 + 0.293 → 0.509457
    ("p2", "Rate the food.", "very good", 0.509457),
    ("p2", "Rate the food.", "the cat sat on the mat", 0.0),
    // good × 0.5 + bad × 1.5 = -2.75 → -0.578947
    ("p3", "Rate the hotel.", "good but bad", -0.578947),
    // no problem = -1.5 × -0.74 → 0.275509
    ("p3", "Rate the hotel.", "no problem", 0.275509),
    // bad = -2.5 → -2.5 / sqrt(21.25) = -0.542326
    ("p4", "Rate the trip.", "bad", -0.542326),
    ("p4", "Rate the trip.", "", 0.0),
];

fn write_rows(path: &std::path::Path, rows: &[(&str, &str, &str, f64)]) {
    let triples: Vec<(&str, &str, &str)> = rows.iter().map(|row| (row.0, row.1, row.2)).collect();
    write_jsonl(path, &responses(&triples));
}

#[test]
fn lexicon_scores_the_response_text() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    let output = dir.path().join("scored.parquet");
    write_rows(&input, &ROWS);
    let outcome = run(
        opt_score()
            .arg(&input)
            .arg("--lexicon")
            .arg(tiny_lexicon())
            .arg("-o")
            .arg(&output),
        None,
    );
    outcome.assert_success();
    assert!(outcome.stdout.is_empty());
    assert!(
        outcome.stderr.starts_with(
            "opt-score: rows=8 reward_model=lexicon:tiny_lexicon.txt mean_reward=-0.0293 total_s="
        ),
        "{}",
        outcome.stderr
    );
    let scored = read(&output);
    // (serde_json writes the JSONL keys sorted.)
    assert_eq!(
        scored.column_names(),
        [
            "prompt",
            "prompt_id",
            "response",
            "sample",
            "reward",
            "reward_model"
        ]
    );
    for (row, (reward, expected)) in scored
        .floats("reward")
        .unwrap()
        .iter()
        .zip(ROWS.map(|row| row.3))
        .enumerate()
    {
        assert!(
            (reward - expected).abs() < 1e-5,
            "row {}: {reward} vs {expected}",
            row + 1
        );
    }
    assert_eq!(
        scored.strings("reward_model").unwrap(),
        ["lexicon:tiny_lexicon.txt"; 8]
    );
}

#[test]
fn rescoring_replaces_the_reward_columns_and_stdin_works() {
    let dir = tempfile::tempdir().unwrap();
    let scored = dir.path().join("scored.parquet");
    // The committed scored fixture already has reward and reward_model (from another source).
    write_parquet(&optune_testkit::scored_fixture(), &scored);
    let bytes = std::fs::read(&scored).unwrap();
    let mut command = opt_score();
    command
        .arg("--lexicon")
        .arg(tiny_lexicon())
        .args(["--reward-name", "vader-tiny"]);
    let rescored = run(&mut command, Some(&bytes))
        .assert_success()
        .stdout_shard();
    let fixture = optune_testkit::scored_fixture();
    assert_eq!(rescored.column_names(), fixture.column_names());
    assert_eq!(rescored.num_rows(), fixture.num_rows());
    assert_eq!(
        rescored.strings("response").unwrap(),
        fixture.strings("response").unwrap()
    );
    assert_eq!(
        rescored.strings("reward_model").unwrap(),
        vec!["vader-tiny"; fixture.num_rows()]
    );
    assert_ne!(
        rescored.floats("reward").unwrap(),
        fixture.floats("reward").unwrap()
    );
}

#[test]
fn shards_concatenate_to_the_unsplit_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    write_rows(&input, &ROWS);
    let score = |extra: &[&str]| {
        let mut command = opt_score();
        command
            .arg(&input)
            .arg("--lexicon")
            .arg(tiny_lexicon())
            .args(["--format", "jsonl"])
            .args(extra);
        run(&mut command, None).assert_success().stdout_text()
    };
    let whole = score(&[]);
    for count in [2, 3, 5] {
        let parts: Vec<String> = (1..=count)
            .map(|k| score(&["--shard", &format!("{k}/{count}")]))
            .collect();
        assert_eq!(parts.concat(), whole, "--shard K/{count}");
        if count == 3 {
            // Four prompts in three slices: p1 | p2 | p3, p4; a prompt's responses stay together.
            assert_eq!(
                parts
                    .iter()
                    .map(|part| part.lines().count())
                    .collect::<Vec<_>>(),
                [2, 2, 4]
            );
        }
    }
}

#[test]
fn shards_of_an_unsorted_input_come_out_sorted_by_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    let shuffled = [ROWS[6], ROWS[0], ROWS[2], ROWS[7], ROWS[1]];
    write_rows(&input, &shuffled);
    let output = dir.path().join("part.parquet");
    let outcome = run(
        opt_score()
            .arg(&input)
            .arg("--lexicon")
            .arg(tiny_lexicon())
            .args(["--shard", "1/2", "-o"])
            .arg(&output),
        None,
    );
    outcome.assert_success();
    let part = read(&output);
    // Distinct ids p1, p2, p4: the first slice is p1; its rows in input order.
    assert_eq!(part.strings("prompt_id").unwrap(), ["p1", "p1"]);
    assert_eq!(part.strings("response").unwrap(), ["good", "not good"]);
}

#[test]
fn scores_pipe_into_opt_select() {
    // opt-score responses.jsonl --lexicon tiny_lexicon.txt | opt-select --rho 0.5
    let Some(opt_select) = sibling_binary(OPT_SCORE, "opt-select") else {
        eprintln!("SKIP: opt-select is not built next to opt-score; run cargo test --workspace");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("responses.jsonl");
    write_rows(&input, &ROWS);
    let outcomes = pipe(
        &mut [
            opt_score().arg(&input).arg("--lexicon").arg(tiny_lexicon()),
            Command::new(opt_select).args(["--rho", "0.5"]),
        ],
        None,
    );
    outcomes[0].assert_success();
    let regen = outcomes[1].assert_success().stdout_shard();
    // Best response per prompt: p1 0.459, p2 0.509, p3 0.276, p4 0.0: the two lowest are p3 and
    // p4, listed in input order, one row each without the response-level columns.
    assert_eq!(regen.strings("prompt_id").unwrap(), ["p3", "p4"]);
    assert_eq!(regen.column_names(), ["prompt", "prompt_id"]);
    assert!(
        outcomes[1]
            .stderr
            .contains("rows_in=8 prompts=4 selected=2"),
        "{}",
        outcomes[1].stderr
    );
}

#[test]
fn help_explains_the_sources() {
    let help = run(opt_score().arg("--help"), None)
        .assert_success()
        .stdout_text();
    for fragment in [
        "--rm <DIR>",
        "--reward-cmd <PROGRAM [ARGS]>",
        "--lexicon <FILE>",
        "last user",
        "--shard <K/N>",
        "Examples:",
    ] {
        assert!(help.contains(fragment), "--help lacks {fragment:?}");
    }
}
