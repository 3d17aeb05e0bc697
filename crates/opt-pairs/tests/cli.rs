//! opt-pairs as users run it: files, several inputs, stdin/stdout, a pipe
//! from opt-select, and --help.

use optune_shard::arrow::array::{Array, AsArray};
use optune_testkit::{
    check_parquet_readers, pipe, read, run, scored_fixture, sibling_binary, testdata, write_parquet,
};
use std::process::Command;

const OPT_PAIRS: &str = env!("CARGO_BIN_EXE_opt-pairs");

fn opt_pairs() -> Command {
    Command::new(OPT_PAIRS)
}

#[test]
fn pairs_the_fixture_and_skips_equal_rewards() {
    let dir = tempfile::tempdir().unwrap();
    let pairs_path = dir.path().join("pairs.parquet");
    let outcome = run(
        opt_pairs()
            .arg(testdata("scored.jsonl"))
            .arg("-o")
            .arg(&pairs_path),
        None,
    );
    outcome.assert_success();
    assert_eq!(
        outcome.stderr,
        "opt-pairs: rows_in=12 prompts=6 pairs=5 skipped_single=0 skipped_same=0 skipped_gap=1 min_gap=0\n"
    );

    let pairs = read(&pairs_path);
    assert_eq!(
        pairs.column_names(),
        [
            "prompt_id",
            "prompt",
            "topic",
            "chosen",
            "rejected",
            "chosen_reward",
            "rejected_reward",
            "reward_gap"
        ]
    );
    assert_eq!(
        pairs.strings("prompt_id").unwrap(),
        ["p01", "p02", "p04", "p05", "p06"]
    );
    assert_eq!(pairs.strings("chosen").unwrap()[3], "Taste as you go.");
    assert_eq!(
        pairs.strings("rejected").unwrap()[3],
        "Start with simple recipes and taste often."
    );
    let float32 = |values: [f64; 5]| values.map(|value| value as f32 as f64);
    assert_eq!(
        pairs.floats("chosen_reward").unwrap(),
        float32([0.8, 0.1, -0.3, 0.9, 0.4])
    );
    assert_eq!(
        pairs.floats("rejected_reward").unwrap(),
        float32([0.2, -0.4, -0.9, 0.7, -0.2])
    );
    let gaps = float32([0.8 - 0.2, 0.1 + 0.4, -0.3 + 0.9, 0.9 - 0.7, 0.4 + 0.2]);
    assert_eq!(pairs.floats("reward_gap").unwrap(), gaps);
    check_parquet_readers(&[pairs_path]);
}

#[test]
fn min_gap_skips_close_calls() {
    // Gaps: p01 0.6, p02 0.5, p03 0, p04 0.6, p05 0.2, p06 0.6.
    let outcome = run(
        opt_pairs()
            .args(["--min-gap", "0.5"])
            .arg(testdata("scored.jsonl")),
        None,
    );
    let pairs = outcome.assert_success().stdout_shard();
    assert_eq!(pairs.strings("prompt_id").unwrap(), ["p01", "p04", "p06"]);
    assert!(
        outcome
            .stderr
            .contains("pairs=3 skipped_single=0 skipped_same=0 skipped_gap=3"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn top_frac_keeps_the_largest_margins() {
    // Pairs and gaps: p01 0.6, p02 0.5, p04 0.6, p05 0.2, p06 0.6 (p03's gap is 0).
    let keep = |frac: &str| {
        let outcome = run(
            opt_pairs()
                .args(["--top-frac", frac])
                .arg(testdata("scored.jsonl")),
            None,
        );
        let pairs = outcome.assert_success().stdout_shard();
        let ids: Vec<String> = pairs
            .strings("prompt_id")
            .unwrap()
            .into_iter()
            .map(String::from)
            .collect();
        (ids, outcome.stderr.clone())
    };
    // ⌈0.8 · 5⌉ = 4: all but p05.
    let (ids, stderr) = keep("0.8");
    assert_eq!(ids, ["p01", "p02", "p04", "p06"]);
    assert_eq!(
        stderr,
        "opt-pairs: rows_in=12 prompts=6 pairs=4 skipped_single=0 skipped_same=0 skipped_gap=1 min_gap=0 \
         skipped_top_frac=1 top_frac=0.8\n"
    );
    // ⌈0.2 · 5⌉ = 1: three pairs tie at 0.6, the lowest prompt_id stays.
    assert_eq!(keep("0.2").0, ["p01"]);
    let outcome = run(
        opt_pairs()
            .args(["--top-frac", "0"])
            .arg(testdata("scored.jsonl")),
        None,
    );
    assert_eq!(outcome.status.code(), Some(2), "{}", outcome.stderr);
}

#[test]
fn merges_kept_rows_with_new_rows_from_another_format() {
    // The kept rows of p01 and p03 as Parquet, plus second samples for p03 and p07 (new) as JSONL
    // with a column the Parquet file lacks.
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("kept.parquet");
    write_parquet(&scored_fixture().take(&[0, 1, 4]).unwrap(), &kept);
    let new = dir.path().join("new.jsonl");
    std::fs::write(
        &new,
        concat!(
            r#"{"prompt_id": "p03", "prompt": "Name three prime numbers.", "sample": 7,"#,
            r#" "response": "2, 3, 5", "reward": 0.75, "judge": "ok"}"#,
            "\n",
            r#"{"prompt_id": "p07", "prompt": "Say hi.", "sample": 0, "response": "hi", "reward": 1}"#,
            "\n",
        ),
    )
    .unwrap();
    let outcome = run(
        opt_pairs().arg(&kept).arg(&new).args(["--format", "jsonl"]),
        None,
    );
    let pairs = outcome.assert_success().stdout_shard();
    let summary = "rows_in=5 prompts=3 pairs=2 skipped_single=1 skipped_same=0 skipped_gap=0";
    assert!(outcome.stderr.contains(summary), "{}", outcome.stderr);
    assert_eq!(pairs.strings("prompt_id").unwrap(), ["p01", "p03"]);
    assert_eq!(pairs.strings("chosen").unwrap()[1], "2, 3, 5");
    assert_eq!(pairs.strings("rejected").unwrap()[1], "2, 3 and 5.");
    // JSONL prints a float32 in its shortest form, so 0.6 reads back as 0.6.
    assert_eq!(pairs.floats("reward_gap").unwrap(), [0.6, 0.25]);
    // judge, which the Parquet file lacks, differs between p03's responses: it goes with each
    // side (the chosen reply's "ok", nulls elsewhere).
    assert!(!pairs.has_column("judge"));
    let chosen_judge = pairs.column("chosen_judge").unwrap();
    let chosen_judge = chosen_judge.as_string::<i32>();
    assert!(chosen_judge.is_null(0) && chosen_judge.value(1) == "ok");
    assert_eq!(
        pairs.column("rejected_judge").unwrap().logical_null_count(),
        2
    );
}

#[test]
fn reads_stdin_and_writes_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let scored = dir.path().join("scored.parquet");
    write_parquet(&scored_fixture(), &scored);
    let bytes = std::fs::read(&scored).unwrap();
    let expected = run(opt_pairs().arg(&scored), None)
        .assert_success()
        .stdout_shard();
    assert_eq!(expected.num_rows(), 5);
    for stdin_run in [
        run(&mut opt_pairs(), Some(&bytes)),
        run(opt_pairs().arg("-"), Some(&bytes)),
    ] {
        assert_eq!(
            stdin_run.assert_success().stdout_shard().batch(),
            expected.batch()
        );
    }
}

#[test]
fn pairs_what_opt_select_kept_in_a_pipe() {
    // cat scored.jsonl | opt-select --rho 0.5 -o regen.parquet --rest - | opt-pairs - rescored.jsonl
    let Some(opt_select) = sibling_binary(OPT_PAIRS, "opt-select") else {
        eprintln!("SKIP: opt-select is not built next to opt-pairs; run cargo test --workspace");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let regen = dir.path().join("regen.parquet");
    // New samples for the regenerated prompts p02, p04 and p06, as opt-gen and opt-score would
    // add them.
    let rescored = dir.path().join("rescored.jsonl");
    let new_rows: String = ["p02", "p04", "p06"]
        .iter()
        .flat_map(|id| {
            (2..4).map(move |sample| {
                format!(
                    concat!(
                        r#"{{"prompt_id": "{id}", "prompt": "?", "topic": "new", "sample": {sample},"#,
                        r#" "response": "{id}-{sample}", "reward": {sample}.5}}"#,
                        "\n"
                    ),
                    id = id,
                    sample = sample
                )
            })
        })
        .collect();
    std::fs::write(&rescored, new_rows).unwrap();

    let scored = std::fs::read(testdata("scored.jsonl")).unwrap();
    let outcomes = pipe(
        &mut [
            Command::new(opt_select)
                .args(["--rho", "0.5", "--rest", "-", "-o"])
                .arg(&regen),
            opt_pairs().arg("-").arg(&rescored),
        ],
        Some(&scored),
    );
    outcomes[0].assert_success();
    let pairs = outcomes[1].assert_success().stdout_shard();
    assert_eq!(
        read(&regen).strings("prompt_id").unwrap(),
        ["p02", "p04", "p06"]
    );
    // Kept: p01, p03 (equal rewards: skipped), p05; regenerated: p02, p04, p06. Sorted.
    assert_eq!(
        pairs.strings("prompt_id").unwrap(),
        ["p01", "p02", "p04", "p05", "p06"]
    );
    let chosen = pairs.strings("chosen").unwrap();
    assert_eq!(
        [chosen[1], chosen[2], chosen[4]],
        ["p02-3", "p04-3", "p06-3"]
    );
    let topics = pairs.strings("topic").unwrap();
    assert_eq!([topics[0], topics[3]], ["poetry", "advice"]);
    let summary = "rows_in=12 prompts=6 pairs=5 skipped_single=0 skipped_same=0 skipped_gap=1";
    assert!(
        outcomes[1].stderr.contains(summary),
        "{}",
        outcomes[1].stderr
    );
}

/// A reader that closes the pipe before the tool writes (`opt-pairs … | head -0`) ends it with
/// status 0 and nothing on stderr, as it ends `cat`, in either output format. The pipe's reading
/// end is closed before the tool starts: closed after, it could still be open in a child that
/// another test thread was starting at that moment (a fork holds it until its exec), and the
/// tool's write would then succeed.
#[test]
fn a_reader_gone_early_ends_the_tool_quietly() {
    for format in ["jsonl", "parquet"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let child = opt_pairs()
            .arg(testdata("scored.jsonl"))
            .args(["--format", format])
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "{format}: {:?} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// An -o that names an input, however spelt, is refused before any work and leaves it as it was.
#[test]
fn an_output_over_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("scored.jsonl");
    std::fs::copy(testdata("scored.jsonl"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let spelt_apart = dir.path().join(".").join("scored.jsonl");
    let outcome = run(
        opt_pairs()
            .arg(testdata("scored.jsonl"))
            .arg(&input)
            .arg("-o")
            .arg(&spelt_apart),
        None,
    );
    assert!(!outcome.status.success());
    assert!(
        outcome.stderr.contains(&format!(
            "-o {} is an input ({}): write the output elsewhere",
            spelt_apart.display(),
            input.display()
        )),
        "{}",
        outcome.stderr
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn help_explains_what_and_when() {
    let help = run(opt_pairs().arg("--help"), None)
        .assert_success()
        .stdout_text();
    for fragment in [
        "chosen",
        "--min-gap <GAP>",
        "--top-frac <F>",
        "Less is More",
        "[INPUT]...",
        "Examples:",
        "opt-pairs kept.parquet rescored.parquet",
    ] {
        assert!(
            help.contains(fragment),
            "--help lacks {fragment:?}:\n{help}"
        );
    }
}
