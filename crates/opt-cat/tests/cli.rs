//! opt-cat end to end.

use std::fs;
use std::process::{Command, Output};

const CAT: &str = env!("CARGO_BIN_EXE_opt-cat");

fn run(args: &[&str]) -> Output {
    Command::new(CAT)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "opt-cat {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cat_slices_and_stacks_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.jsonl");
    let b = tmp.path().join("b.jsonl");
    fs::write(&a, "{\"prompt_id\":\"p1\",\"n\":1}\n{\"prompt_id\":\"p2\",\"n\":2}\n{\"prompt_id\":\"p3\",\"n\":3}\n").unwrap();
    fs::write(&b, "{\"prompt_id\":\"p4\",\"extra\":\"x\"}\n").unwrap();
    let out = tmp.path().join("out.jsonl");
    let (a, b, o) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        out.to_str().unwrap(),
    );

    let stderr = ok(&[a, b, "-o", o]);
    assert!(
        stderr.contains("opt-cat: inputs=2 rows_in=4 rows=4"),
        "{stderr}"
    );
    let text = fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 4);
    assert!(
        text.lines().last().unwrap().contains("\"extra\":\"x\""),
        "{text}"
    );
    assert!(
        text.lines().next().unwrap().contains("\"extra\":null")
            || !text.lines().next().unwrap().contains("extra"),
        "{text}"
    );

    ok(&["--skip", "1", "--head", "2", a, "-o", o]);
    let ids: Vec<String> = fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| l[14..16].to_string())
        .collect();
    assert_eq!(ids, ["p2", "p3"]);

    ok(&["--head", "10", a, "-o", o]);
    assert_eq!(fs::read_to_string(&out).unwrap().lines().count(), 3);

    let failed = run(&["--skip", "3", a, "-o", o]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("--skip 3 leaves none of the 3 rows"));
}

#[test]
fn cat_checks_that_shard_outputs_cover_their_input() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, ids: &[&str]| {
        let path = tmp.path().join(name);
        let lines: String = ids
            .iter()
            .map(|id| format!("{{\"prompt_id\":\"{id}\"}}\n"))
            .collect();
        fs::write(&path, lines).unwrap();
        path.to_str().unwrap().to_string()
    };
    let prompts = write("prompts.jsonl", &["p3", "p1", "p2"]);
    // Two samples per prompt; --shard 1/2 takes p1, 2/2 takes p2 and p3.
    let first = write("1.jsonl", &["p1", "p1"]);
    let second = write("2.jsonl", &["p2", "p2", "p3", "p3"]);
    let out = tmp.path().join("out.jsonl");
    let o = out.to_str().unwrap();
    let stderr = ok(&["--slices-of", &prompts, &first, &second, "-o", o]);
    assert!(
        stderr.contains("opt-cat: inputs=2 rows_in=6 rows=6 rows_per_ref_row=2"),
        "{stderr}"
    );

    let short = write("2short.jsonl", &["p2", "p2"]);
    let refused = tmp.path().join("refused.jsonl");
    let failed = run(&[
        "--slices-of",
        &prompts,
        &first,
        &short,
        "-o",
        refused.to_str().unwrap(),
    ]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("2short.jsonl (slice 2/2 of")
            && stderr.contains("prompt_id 'p3' is missing"),
        "{stderr}"
    );
    assert!(!refused.exists(), "no output once the check fails");
}
