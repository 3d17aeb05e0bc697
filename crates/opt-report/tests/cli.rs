//! opt-report end to end on small hand-made runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REPORT: &str = env!("CARGO_BIN_EXE_opt-report");

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(
        out.status.success(),
        "{bin} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes JSONL rows as a Parquet shard.
fn parquet(path: &Path, rows: &[String]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let jsonl = path.with_extension("jsonl");
    fs::write(&jsonl, rows.join("\n") + "\n").unwrap();
    let shard = optune_shard::Shard::read(Some(&jsonl)).unwrap();
    let destination = optune_shard::Destination::from_arg(Some(path));
    optune_shard::write_shard(&shard, &destination, optune_shard::OutputFormat::Parquet).unwrap();
    fs::remove_file(jsonl).unwrap();
}

fn scored_rows(prompts: &[&str], rewards: &[f64]) -> Vec<String> {
    let mut rows = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for s in 0..2 {
            rows.push(format!(
                r#"{{"prompt_id":"{p}","prompt":"say something about {p}","sample":{s},"response":"r{s}","response_tokens":4,"reward":{}}}"#,
                rewards[2 * i + s]
            ));
        }
    }
    rows
}

fn pair_rows(gaps: &[f64]) -> Vec<String> {
    gaps.iter()
        .enumerate()
        .map(|(i, g)| {
            format!(r#"{{"prompt_id":"p{i}","prompt":"x","chosen":"a","rejected":"b","chosen_reward":{g},"rejected_reward":0.0,"reward_gap":{g}}}"#)
        })
        .collect()
}

/// A two-iteration run: iteration 1 on p1-p4, iteration 2 regenerating p1 and p2.
fn make_run(dir: &Path, rho: &str, gen_seconds: [f64; 2]) {
    let it1 = dir.join("iter1");
    let all1 = scored_rows(
        &["p1", "p2", "p3", "p4"],
        &[0.0, 0.2, -0.4, 0.0, 0.6, 0.8, 0.4, 1.0],
    );
    parquet(&it1.join("new_scored.parquet"), &all1);
    parquet(&it1.join("scored.parquet"), &all1);
    parquet(
        &it1.join("pairs.parquet"),
        &pair_rows(&[0.2, 0.4, 0.2, 0.6]),
    );
    fs::write(
        it1.join("timings.csv"),
        format!("stage,seconds,rows,tokens\ngen,{},8,32\nscore,1.0,8,\npairs,0.5,4,\ntrain,10.0,4,400\n", gen_seconds[0]),
    )
    .unwrap();
    fs::write(
        it1.join("metrics.csv"),
        "step,epoch,loss,rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies\n1,0.5000,0.69,0,0,0.0,0.5\n2,1.0000,0.60,0.1,-0.1,0.2,0.75\n",
    )
    .unwrap();

    let it2 = dir.join("iter2");
    parquet(
        &it2.join("regen.parquet"),
        &[
            r#"{"prompt_id":"p1","prompt":"say something about p1"}"#.to_string(),
            r#"{"prompt_id":"p2","prompt":"say something about p2"}"#.to_string(),
        ],
    );
    let new2 = scored_rows(&["p1", "p2"], &[0.5, 0.7, 0.1, 0.3]);
    parquet(&it2.join("new_scored.parquet"), &new2);
    let mut all2 = new2.clone();
    all2.extend(scored_rows(&["p3", "p4"], &[0.6, 0.8, 0.4, 1.0]));
    parquet(&it2.join("scored.parquet"), &all2);
    parquet(
        &it2.join("pairs.parquet"),
        &pair_rows(&[0.2, 0.2, 0.2, 0.6]),
    );
    fs::write(
        it2.join("timings.csv"),
        format!("stage,seconds,rows,tokens\ngen,{},4,16\nscore,1.0,4,\nselect,0.5,2,\npairs,0.5,4,\ntrain,10.0,4,400\n", gen_seconds[1]),
    )
    .unwrap();
    fs::write(
        it2.join("metrics.csv"),
        "step,epoch,loss,rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies\n1,0.5000,0.65,0,0,0.1,0.5\n2,1.0000,0.55,0.2,-0.2,0.4,1.0\n",
    )
    .unwrap();
    fs::write(
        dir.join("run.env"),
        format!("PIPELINE=pipelines/test.mk\nRHO={rho}\nN=2\n"),
    )
    .unwrap();
}

fn is_png(path: &Path) -> bool {
    fs::read(path)
        .map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
        .unwrap_or(false)
}

#[test]
fn report_tabulates_each_iteration_and_draws_four_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    make_run(&dir, "0.5", [20.0, 10.0]);
    let stderr = ok(REPORT, &[dir.to_str().unwrap()]);
    assert!(stderr.starts_with("opt-report: "), "{stderr}");

    let md = fs::read_to_string(dir.join("report.md")).unwrap();
    // Iteration 1: 4 prompts, 8 fresh samples with mean 0.325; 4 pairs, mean gap 0.35;
    // wall time 31.5 s; last DPO margin 0.2, accuracy 0.75.
    assert!(
        md.contains("| 1 | 4 | 8 | 0.3250 | 0.3000 | 0.3250 | 0.3000 | – | 4 | 0.3500 | 31.5 | 0.2000 | 0.750 |"),
        "{md}"
    );
    // Iteration 2: 2 regenerated, fresh mean 0.4, all mean 0.55.
    assert!(
        md.contains("| 2 | 2 | 4 | 0.4000 | 0.4000 | 0.5500 |"),
        "{md}"
    );
    assert!(
        md.contains("| 2 | 10.0 | 1.0 | 0.5 | 0.5 | 10.0 | 22.0 | 16 | 1.6 |"),
        "{md}"
    );
    assert!(md.contains("`RHO=0.5`"), "{md}");
    for png in [
        "reward_mean.png",
        "reward_hist.png",
        "wall_time.png",
        "dpo_margins.png",
    ] {
        assert!(is_png(&dir.join("plots").join(png)), "{png}");
        assert!(md.contains(&format!("(plots/{png})")), "{md}");
    }
}

#[test]
fn report_on_a_run_still_in_its_first_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("early");
    let it1 = dir.join("iter1");
    fs::create_dir_all(&it1).unwrap();
    fs::write(it1.join("timings.csv"), "stage,seconds,rows,tokens\n").unwrap();
    let out = tmp.path().join("out").join("r.md");
    ok(
        REPORT,
        &[
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-plots",
        ],
    );
    let md = fs::read_to_string(out).unwrap();
    assert!(md.contains("| 1 | – | – | – |"), "{md}");
}

#[test]
fn sweep_gives_speedups_against_rho_one() {
    let tmp = tempfile::tempdir().unwrap();
    let half: PathBuf = tmp.path().join("x-rho0.5");
    let one: PathBuf = tmp.path().join("x-rho1.0");
    make_run(&half, "0.5", [20.0, 10.0]);
    make_run(&one, "1.0", [20.0, 20.0]);
    let out = tmp.path().join("x-sweep.md");
    ok(
        REPORT,
        &[
            "--sweep",
            half.to_str().unwrap(),
            one.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let md = fs::read_to_string(&out).unwrap();
    // ρ = 0.5: iteration 2 takes 22 s against 32 s, generation 10 s against 20 s.
    assert!(md.contains("| 0.5 | – | `x-rho0.5` | 2 | 0.4000 | 0.5500 | – | 30.0 | 53.5 | 10.0 | 22.0 | 2.00× | 1.45× | 1.19× |"), "{md}");
    assert!(md.contains("| 1 | – | `x-rho1.0` | 2 |"), "{md}");
    assert!(is_png(&tmp.path().join("x-sweep.png")));
    assert!(md.contains("![rho sweep](x-sweep.png)"), "{md}");
}

#[test]
fn sweep_names_each_runs_selection() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = [
        (
            "x-max-rho1.0",
            "SELECT_BY=max\nSELECT_ARGS=\nSELECT_HISTORY=0\n",
        ),
        (
            "x-random-rho0.5",
            "SELECT_BY=max\nSELECT_ARGS=--strategy random\nSELECT_HISTORY=0\n",
        ),
        (
            "x-history-rho0.5",
            "SELECT_BY=max\nSELECT_ARGS=--skip-flat 2\nSELECT_HISTORY=1\n",
        ),
    ];
    let mut dirs = Vec::new();
    for (name, selection) in settings {
        let dir = tmp.path().join(name);
        make_run(&dir, name.rsplit_once("-rho").unwrap().1, [20.0, 10.0]);
        let env = fs::read_to_string(dir.join("run.env")).unwrap();
        fs::write(dir.join("run.env"), env + selection).unwrap();
        dirs.push(dir.to_str().unwrap().to_string());
    }
    let out = tmp.path().join("x-sweep.md");
    let mut args: Vec<&str> = vec!["--sweep"];
    args.extend(dirs.iter().map(String::as_str));
    args.extend(["-o", out.to_str().unwrap()]);
    ok(REPORT, &args);
    let md = fs::read_to_string(&out).unwrap();
    for row in [
        "| 1 | `--by max` | `x-max-rho1.0` |",
        "| 0.5 | `--by max --strategy random` | `x-random-rho0.5` |",
        "| 0.5 | `--by max --skip-flat 2 + history` | `x-history-rho0.5` |",
    ] {
        assert!(md.contains(row), "{row} not in {md}");
    }
}

#[test]
fn report_refuses_several_runs_without_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        REPORT,
        &[tmp.path().to_str().unwrap(), tmp.path().to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sweep"));
}

/// A timing that is no finite number is named by file, line and column: an infinite one hung
/// the plots, and a dropped one would understate the totals.
#[test]
fn a_timing_that_is_no_finite_number_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let it1 = tmp.path().join("run").join("iter1");
    fs::create_dir_all(&it1).unwrap();
    for (value, column) in [("1e999", "seconds"), ("three", "seconds")] {
        fs::write(
            it1.join("timings.csv"),
            format!("stage,seconds,rows,tokens\ngen,2.5,4,100\nscore,{value},4,\n"),
        )
        .unwrap();
        let out = run(REPORT, &[tmp.path().join("run").to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let expected = format!("timings.csv line 3: column '{column}': \"{value}\"");
        assert!(stderr.contains(&expected), "{stderr}");
    }
}
