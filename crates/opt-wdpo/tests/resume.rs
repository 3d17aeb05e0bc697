//! opt-wdpo through crashes: a run SIGKILLed with --save-steps 2 resumes from its last state and
//! writes the uninterrupted run's model.safetensors byte for byte, in less time; SIGTERM makes
//! it write a state at the next step boundary and exit with an error; a rerun with other
//! arguments is refused; --reference-only --shard splits the reference pass without changing
//! the trained weights.

use optune_testkit::{
    generic_kernels, signal_when, timed, untimed_metrics, workspace_root, Outcome, Running,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use tempfile::TempDir;

/// The tests of this file time whole runs: one at a time, so that they do not slow each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Pairs per optimiser step: 32, or 8 on the generic kernels (the `make test` pass that tests
/// the op graph CUDA runs), which train about four times slower. Every run takes 12 steps.
fn batch() -> usize {
    if generic_kernels() {
        8
    } else {
        32
    }
}

/// 12 × batch() pairs of 100 to 200 made-up words a side: 12 optimiser steps of about half a
/// second each on 2 cores with the tiny llama, so the steps outweigh loading and the reference
/// pass.
fn write_pairs(path: &Path) {
    let words = [
        "good", "bad", "the", "movie", "was", "really", "not", "great", "plot", "fun", "happy",
        "sad",
    ];
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut text = String::new();
    for i in 0..12 * batch() {
        let mut side = || {
            let length = 100 + next() % 100;
            (0..length)
                .map(|_| words[next() % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (chosen, rejected) = (side(), side());
        let row = serde_json::json!({
            "prompt_id": format!("p{i:03}"),
            "prompt": format!("Tell me about film {i}."),
            "chosen": chosen,
            "rejected": rejected,
            "reward_gap": 1.0 + (i % 7) as f64 * 0.1,
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// This file's lock (see [`ONE_AT_A_TIME`]), a temporary directory and the pairs in it.
fn setup() -> (MutexGuard<'static, ()>, TempDir, PathBuf) {
    let serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs);
    (serial, dir, pairs)
}

/// opt-wdpo training LoRA adapters (rank 4, dropout 0.1) on the tiny llama, with `extra`.
fn wdpo(pairs: &Path, output: &Path, extra: &[&str]) -> Command {
    let lora = ["--lora-rank", "4", "--lora-dropout", "0.1"];
    full_wdpo(pairs, output, &[&lora[..], extra].concat())
}

/// opt-wdpo training every weight of the tiny llama, with `extra`.
fn full_wdpo(pairs: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opt-wdpo"));
    command
        .arg("--policy")
        .arg(workspace_root().join("testdata/models/tiny-llama"))
        .arg(pairs)
        .arg("-o")
        .arg(output)
        .args(["--lr", "1e-3", "--max-length", "256"])
        .args(extra);
    if !extra.contains(&"--batch-size") {
        command.args(["--batch-size", &batch().to_string()]);
    }
    command
}

fn state_dir(output: &Path) -> PathBuf {
    PathBuf::from(format!("{}.state", output.display()))
}

/// The step of the state beside `output` (0 when there is none).
fn state_step(output: &Path) -> u64 {
    std::fs::read_to_string(state_dir(output).join("state.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|state| state["position"]["step"].as_u64())
        .unwrap_or(0)
}

fn model_bytes(output: &Path) -> Vec<u8> {
    std::fs::read(output.join("model.safetensors")).unwrap()
}

/// Runs `command` (opt-wdpo into `resumed`), SIGKILLs it once its state reaches step `at`, and
/// runs it again, which must resume from the kept step and write `whole`'s model byte for byte.
/// Returns the kept step and the rerun's CPU seconds.
fn kill_and_resume(
    command: impl Fn() -> Command,
    resumed: &Path,
    whole: &Path,
    at: u64,
) -> (u64, f64) {
    signal_when(&mut command(), "KILL", || state_step(resumed) >= at);
    let kept = state_step(resumed);
    assert!(!resumed.exists(), "a killed run leaves no checkpoint");
    let (outcome, rerun_secs) = timed(&mut command());
    outcome.assert_success();
    assert!(
        outcome.stderr.contains(&format!(" resumed_from={kept} ")),
        "{}",
        outcome.stderr
    );
    assert!(
        model_bytes(resumed) == model_bytes(whole),
        "the resumed model.safetensors differs from the uninterrupted run's"
    );
    (kept, rerun_secs)
}

fn assert_failed(outcome: &Outcome, expected: &str) {
    assert!(!outcome.status.success(), "succeeded: {}", outcome.stderr);
    assert!(outcome.stderr.contains(expected), "{}", outcome.stderr);
}

#[test]
fn a_killed_run_resumes_from_its_last_state_to_the_same_weights() {
    let (_serial, dir, pairs) = setup();
    let whole = dir.path().join("whole");
    let (outcome, whole_secs) = timed(&mut wdpo(&pairs, &whole, &["--save-steps", "2"]));
    outcome.assert_success();
    assert!(outcome.stderr.contains(" steps=12 "), "{}", outcome.stderr);
    assert!(
        !state_dir(&whole).exists(),
        "a finished run leaves no state"
    );

    let resumed = dir.path().join("resumed");
    let rerun = || wdpo(&pairs, &resumed, &["--save-steps", "2"]);
    let (kept, rerun_secs) = kill_and_resume(rerun, &resumed, &whole, 6);
    assert!(
        !state_dir(&resumed).exists(),
        "the state is removed once the checkpoint is written"
    );
    eprintln!(
        "uninterrupted {whole_secs:.1} CPU s; killed after step {kept} of 12; rerun {rerun_secs:.1} CPU s ({:.0} %)",
        100.0 * rerun_secs / whole_secs
    );
    assert!(
        rerun_secs < 0.75 * whole_secs,
        "rerun took {rerun_secs:.1} CPU s against {whole_secs:.1} uninterrupted"
    );
}

#[test]
fn sigterm_writes_a_state_at_the_next_step_and_the_rerun_completes() {
    let (_serial, dir, pairs) = setup();
    // Pairs whose two sides are one text, which the run drops: the state must hold what the
    // rerun trains on (it once held the kept pairs' reference for all the pairs, and refused).
    let mut text = std::fs::read_to_string(&pairs).unwrap();
    for i in 0..3 {
        let row = serde_json::json!({"prompt_id": format!("same{i}"), "prompt": "Say it.",
            "chosen": "The same.", "rejected": "The same.", "reward_gap": 1.0});
        text.push_str(&format!("{row}\n"));
    }
    std::fs::write(&pairs, text).unwrap();
    let whole = dir.path().join("whole");
    timed(&mut wdpo(&pairs, &whole, &[])).0.assert_success();

    // Without --save-steps: the only state is the one SIGTERM asks for.
    let output = dir.path().join("policy");
    let metrics = dir.path().join("metrics.csv");
    let logged = || {
        std::fs::read_to_string(&metrics)
            .map(|text| text.lines().count().saturating_sub(1))
            .unwrap_or(0)
    };
    let command = &mut wdpo(&pairs, &output, &["--metrics", metrics.to_str().unwrap()]);
    // The signal comes in the middle of a step, some time after the third one ended. A loaded
    // machine may let a step or more end between a reading of the log and the signal's arrival,
    // so the steps logged once `kill` has returned bound the step the state may be at.
    let mut running = Running::start(command);
    running.wait_until(|| logged() >= 3);
    std::thread::sleep(std::time::Duration::from_millis(150));
    let signalled = std::time::Instant::now();
    running.signal("TERM");
    let at_signal = logged() as u64;
    let outcome = running.wait();
    let seconds = signalled.elapsed().as_secs_f64();
    let step = state_step(&output);
    assert_failed(
        &outcome,
        &format!(
            "SIGTERM: stopped after step {step} of 12; the training state is in {}",
            state_dir(&output).display()
        ),
    );
    assert!(
        (at_signal..=at_signal + 1).contains(&step),
        "state at step {step}, {at_signal} steps logged once the signal was sent: more than one step later"
    );
    eprintln!(
        "SIGTERM with {at_signal} steps logged: state at step {step}, exit {seconds:.2} s later"
    );
    assert!(!output.exists());

    let (outcome, _) = timed(&mut wdpo(
        &pairs,
        &output,
        &["--metrics", metrics.to_str().unwrap()],
    ));
    outcome.assert_success();
    assert!(
        outcome.stderr.contains(&format!(" resumed_from={step} "))
            && outcome.stderr.contains(" skipped_identical=3 "),
        "{}",
        outcome.stderr
    );
    assert!(model_bytes(&output) == model_bytes(&whole));
    assert_eq!(logged(), 12, "the metrics file holds every step once");
    assert!(!state_dir(&output).exists());
    // Every figure but the timings equals the uninterrupted run's, to the last digit of `lr`.
    assert_eq!(
        untimed_metrics(&metrics),
        untimed_metrics(&whole.join("metrics.csv"))
    );
}

/// Two replicas on the host with `--save-steps 2`: `command` (opt-wdpo with `more`) runs through,
/// then again killed once its state reaches step 4, and resumes to the same weights.
fn a_data_parallel_run_killed_and_resumed(
    command: fn(&Path, &Path, &[&str]) -> Command,
    more: &[&str],
) {
    let (_serial, dir, pairs) = setup();
    let half = (batch() / 2).to_string();
    let data_parallel = [
        "--save-steps",
        "2",
        "--devices",
        "cpu,cpu",
        "--batch-size",
        &half,
    ];
    let extra = [&data_parallel[..], more].concat();
    let whole = dir.path().join("whole");
    let (outcome, _) = timed(&mut command(&pairs, &whole, &extra));
    outcome.assert_success();
    assert!(
        outcome.stderr.contains(" steps=12 ") && outcome.stderr.contains(" replicas=2 "),
        "{}",
        outcome.stderr
    );
    let resumed = dir.path().join("resumed");
    kill_and_resume(|| command(&pairs, &resumed, &extra), &resumed, &whole, 4);
}

/// A data-parallel run (LoRA dropout on) killed mid-way resumes to the uninterrupted run's
/// weights: each micro-batch's dropout masks come from its place in the run, whichever replica
/// draws them.
#[test]
fn a_killed_data_parallel_run_resumes_to_the_same_weights() {
    a_data_parallel_run_killed_and_resumed(wdpo, &[]);
}

/// Full fine-tuning in bf16 over two replicas (on the generic kernels) killed mid-way resumes to
/// the uninterrupted run's weights: the state holds each weight's f32 master, gathered from its
/// owner, and the resumed run puts it back there (the other replica holds a bf16 copy only).
#[test]
fn a_killed_bf16_data_parallel_run_resumes_to_the_same_weights() {
    let bf16 = ["--dtype", "bf16", "--kernels", "generic"];
    a_data_parallel_run_killed_and_resumed(full_wdpo, &bf16);
}

#[test]
fn a_state_of_other_arguments_is_refused() {
    let (_serial, dir, pairs) = setup();
    let output = dir.path().join("policy");
    let command = &mut wdpo(&pairs, &output, &["--save-steps", "2"]);
    signal_when(command, "KILL", || state_step(&output) >= 2);
    let state = std::fs::read(state_dir(&output).join("state.json")).unwrap();

    let (outcome, _) = timed(&mut wdpo(&pairs, &output, &["--beta", "0.2"]));
    assert_failed(
        &outcome,
        "policy.state holds the unfinished work of a run with other arguments or inputs (--beta: 0.1 then, 0.2 now)",
    );
    // Another precision: on a CPU with bf16 products, --dtype bf16 keeps f32 tensors and takes
    // bf16 products, which the state has to tell from f32.
    let (outcome, _) = timed(&mut wdpo(&pairs, &output, &["--dtype", "bf16"]));
    assert_failed(&outcome, "(--dtype: f32 then, ");
    // Replicas: each step would take twice the pairs.
    let (outcome, _) = timed(&mut wdpo(&pairs, &output, &["--devices", "cpu,cpu"]));
    assert_failed(&outcome, "(--devices (replicas): 1 then, 2 now)");
    // Other pairs: one chosen reply changed.
    let other = dir.path().join("other.jsonl");
    let text = std::fs::read_to_string(&pairs).unwrap();
    std::fs::write(
        &other,
        text.replacen("\"chosen\":\"", "\"chosen\":\"great ", 1),
    )
    .unwrap();
    let (outcome, _) = timed(&mut wdpo(&other, &output, &[]));
    assert_failed(
        &outcome,
        &format!(
            "the pairs (input, --max-length, template): {} pairs, ",
            12 * batch()
        ),
    );
    assert!(!output.exists());
    assert_eq!(
        std::fs::read(state_dir(&output).join("state.json")).unwrap(),
        state,
        "a refused run leaves the state alone"
    );
}

#[test]
fn reference_shards_join_into_the_reference_of_the_whole_run() {
    let (_serial, dir, pairs) = setup();
    let inline = dir.path().join("inline");
    timed(&mut wdpo(&pairs, &inline, &[])).0.assert_success();

    // Three slices, another batch size: the same values, so the same trained weights.
    let mut jsonl = String::new();
    for k in 1..=3 {
        let part = dir.path().join(format!("ref{k}.jsonl"));
        let slice = format!("{k}/3");
        let (outcome, _) = timed(&mut wdpo(
            &pairs,
            &part,
            &["--reference-only", "--shard", &slice, "--batch-size", "5"],
        ));
        outcome.assert_success();
        assert!(
            outcome
                .stderr
                .contains(&format!("opt-wdpo: pairs={} ", 4 * batch())),
            "{}",
            outcome.stderr
        );
        jsonl.push_str(&std::fs::read_to_string(&part).unwrap());
    }
    let joined = dir.path().join("pairs_ref.jsonl");
    std::fs::write(&joined, jsonl).unwrap();
    let sharded = dir.path().join("sharded");
    timed(&mut wdpo(&joined, &sharded, &[])).0.assert_success();
    assert!(model_bytes(&sharded) == model_bytes(&inline));
}
