//! RewardCommand against small python3 programs in testdata/reward_cmd.

use std::path::Path;
use std::time::{Duration, Instant};

use optune_reward::{RewardCommand, RewardRequest};

const TIMEOUT: Duration = Duration::from_secs(10);

fn spawn_script(script: &str, extra_args: &[String], timeout: Duration) -> RewardCommand {
    let path = Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("testdata/reward_cmd")
    .join(script);
    let mut args = vec![path.display().to_string()];
    args.extend_from_slice(extra_args);
    RewardCommand::spawn("python3", &args, timeout).expect("python3 starts")
}

struct Row {
    prompt_id: String,
    prompt: String,
    response: String,
}

impl Row {
    fn request(&self) -> RewardRequest<'_> {
        RewardRequest {
            prompt_id: &self.prompt_id,
            prompt: &self.prompt,
            response: &self.response,
        }
    }
}

fn rows(count: usize, response_len: impl Fn(usize) -> usize) -> Vec<Row> {
    (0..count)
        .map(|index| Row {
            prompt_id: format!("p{index}"),
            prompt: format!("Say something \"quoted\" #{index}\nsecond line"),
            response: "é".repeat(response_len(index)),
        })
        .collect()
}

#[test]
fn rewards_come_back_in_request_order() {
    let rows = rows(5, |index| [30, 10, 250, 0, 70][index]);
    let mut command = spawn_script("length_reward.py", &[], TIMEOUT);
    let rewards = command.score(rows.iter().map(Row::request)).unwrap();
    assert_eq!(rewards, vec![0.3, 0.1, 2.5, 0.0, 0.7]);
}

#[test]
fn large_batch_does_not_deadlock_on_full_pipes() {
    // ~10 MB of requests: far beyond the pipe buffers in both directions.
    let rows = rows(5_000, |index| 1_000 + index % 100);
    let mut command = spawn_script("length_reward.py", &[], TIMEOUT);
    let rewards = command.score(rows.iter().map(Row::request)).unwrap();
    let expected: Vec<f32> = (0..5_000)
        .map(|index| ((1_000 + index % 100) as f64 / 100.0) as f32)
        .collect();
    assert_eq!(rewards, expected);
}

#[test]
fn the_program_keeps_running_across_batches() {
    let rows = rows(4, |_| 1);
    let mut command = spawn_script("running_count.py", &[], TIMEOUT);
    assert_eq!(
        command.score(rows[..2].iter().map(Row::request)).unwrap(),
        vec![1.0, 2.0]
    );
    assert_eq!(
        command.score(rows[2..].iter().map(Row::request)).unwrap(),
        vec![3.0, 4.0]
    );
    assert!(command.score(std::iter::empty()).unwrap().is_empty());
}

/// Scores `row_count` one-character rows and returns the error with its context chain.
fn score_error(command: &mut RewardCommand, row_count: usize) -> String {
    let rows = rows(row_count, |_| 1);
    let error = command.score(rows.iter().map(Row::request)).unwrap_err();
    format!("{error:#}")
}

#[track_caller]
fn assert_mentions(message: &str, expected: &[&str]) {
    for part in expected {
        assert!(message.contains(part), "missing {part:?} in: {message}");
    }
}

#[test]
fn early_exit_names_the_row_status_and_stderr() {
    let mut command = spawn_script("exit_after_two.py", &[], TIMEOUT);
    let message = score_error(&mut command, 4);
    assert_mentions(
        &message,
        &[
            "row 2",
            "\"p2\"",
            "exit status: 3",
            "giving up after two rows",
        ],
    );
    assert_mentions(&score_error(&mut command, 1), &["no longer running"]);
}

#[test]
fn non_json_answer_is_quoted() {
    let mut command = spawn_script("garbage.py", &[], TIMEOUT);
    let message = score_error(&mut command, 2);
    assert_mentions(
        &message,
        &["row 0", "\"p0\"", "not JSON", "the reward is high"],
    );
}

#[test]
fn nan_reward_is_rejected() {
    let mut command = spawn_script("nan_reward.py", &[], TIMEOUT);
    let message = score_error(&mut command, 2);
    assert_mentions(&message, &["row 1", "\"p1\"", "not a finite number", "NaN"]);
}

#[test]
fn missing_reward_field_is_rejected() {
    let mut command = spawn_script("missing_reward.py", &[], TIMEOUT);
    let message = score_error(&mut command, 1);
    assert_mentions(&message, &["row 0", "no \"reward\" field", "score"]);
}

#[test]
fn hung_program_times_out_and_is_reaped() {
    let pid_file =
        std::env::temp_dir().join(format!("optune-reward-hang-{}.pid", std::process::id()));
    let started = Instant::now();
    let mut command = spawn_script(
        "hang.py",
        &[pid_file.display().to_string()],
        Duration::from_secs(1),
    );
    let message = score_error(&mut command, 3);
    drop(command);
    let elapsed = started.elapsed();
    // A 1 s timeout, with room for Python's start on a loaded CI machine.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert_mentions(
        &message,
        &[
            "row 0",
            "\"p0\"",
            "no answer within 1s",
            "pretending to load a model",
        ],
    );

    let pid = std::fs::read_to_string(&pid_file).expect("hang.py wrote its pid");
    let _ = std::fs::remove_file(&pid_file);
    if cfg!(target_os = "linux") {
        // Killed and waited for: not even a zombie entry is left.
        assert!(
            !Path::new("/proc").join(pid.trim()).exists(),
            "process {pid} still exists"
        );
    }
}

#[test]
fn missing_program_is_named() {
    let error = RewardCommand::spawn("optune-no-such-reward-program", &[], TIMEOUT)
        .err()
        .unwrap();
    assert!(
        error.to_string().contains("optune-no-such-reward-program"),
        "{error}"
    );
}
