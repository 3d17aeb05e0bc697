//! Reward from an external program that speaks JSON lines.
//!
//! The program is started once (no shell) and kept running across batches.
//! For each request it reads one line on stdin,
//! `{"prompt_id": "...", "prompt": "...", "response": "..."}`,
//! and must answer with one line on stdout, `{"reward": <number>}`, in the same
//! order, flushing after each answer (Python: `print(..., flush=True)`).
//! Other fields in the answer are ignored. What it writes to stderr is kept
//! (the last lines) for error messages.
//!
//! Any failure — early exit, a bad answer, no answer within the timeout —
//! kills the program: after a protocol error its later answers can no longer
//! be matched to requests. When a [`RewardCommand`] is dropped its stdin is
//! closed, the program gets up to the timeout to exit, and is killed after that.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::truncate;

/// Longest stdout or stderr line buffered; a longer answer line is an error.
const MAX_LINE_BYTES: u64 = 1 << 20;
const STDERR_TAIL_LINES: usize = 20;
const STDERR_LINE_CHARS: usize = 500;
const QUOTED_ANSWER_CHARS: usize = 200;
/// After stdout closes, how long to wait for the exit status and the last stderr lines.
const EXIT_GRACE: Duration = Duration::from_secs(1);
const EXIT_POLL: Duration = Duration::from_millis(10);

/// One row to score; serialised as one JSON line on the program's stdin.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RewardRequest<'a> {
    pub prompt_id: &'a str,
    /// The prompt as text; a message list is rendered to a string by the caller.
    pub prompt: &'a str,
    pub response: &'a str,
}

/// A running reward program; see the [module docs](self) for the protocol.
pub struct RewardCommand {
    /// Program and arguments, for error messages.
    command_line: String,
    child: Child,
    /// `None` once the program has failed and been killed.
    stdin: Option<ChildStdin>,
    output: OutputReaders,
    timeout: Duration,
}

/// Threads draining the program's stdout and stderr.
struct OutputReaders {
    answers: Receiver<StdoutLine>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: JoinHandle<()>,
}

enum StdoutLine {
    Line(String),
    Unreadable(String),
}

impl RewardCommand {
    /// Starts `program` with `args` (no shell). `timeout` bounds the wait for
    /// each answer, and the wait for the program to exit when dropped.
    ///
    /// # Errors
    /// The program cannot be started (the message names it).
    pub fn spawn(program: &str, args: &[String], timeout: Duration) -> Result<Self> {
        let command_line = std::iter::once(program)
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting reward program `{command_line}`"))?;
        let output = match (child.stdout.take(), child.stderr.take()) {
            (Some(stdout), Some(stderr)) => OutputReaders::start(stdout, stderr),
            _ => Err(anyhow!("its stdout and stderr are not piped")),
        };
        match (child.stdin.take(), output) {
            (Some(stdin), Ok(output)) => Ok(Self {
                command_line,
                child,
                stdin: Some(stdin),
                output,
                timeout,
            }),
            (_, output) => {
                let _ = child.kill();
                let _ = child.wait();
                let error = output
                    .err()
                    .unwrap_or_else(|| anyhow!("its stdin is not piped"));
                Err(error.context(format!("starting reward program `{command_line}`")))
            }
        }
    }

    /// Sends every request and returns the rewards in request order.
    ///
    /// # Errors
    /// The program exits early (with its exit status and last stderr lines),
    /// answers a line that is not JSON, lacks a numeric `reward`, gives a
    /// non-finite reward, or does not answer within the timeout. Errors name
    /// the row (0-based index in this batch) and its prompt id; after any of
    /// them the program has been killed and later calls fail.
    pub fn score<'a>(
        &mut self,
        requests: impl IntoIterator<Item = RewardRequest<'a>>,
    ) -> Result<Vec<f32>> {
        let mut batch = Vec::new();
        let mut prompt_ids = Vec::new();
        for request in requests {
            serde_json::to_writer(&mut batch, &request).context("serialising a reward request")?;
            batch.push(b'\n');
            prompt_ids.push(request.prompt_id.to_string());
        }
        if prompt_ids.is_empty() {
            return Ok(Vec::new());
        }
        let Some(mut stdin) = self.stdin.take() else {
            bail!(
                "reward program `{}` is no longer running: it failed on an earlier batch",
                self.command_line
            );
        };

        // Written from its own thread so that a batch larger than the pipe
        // buffers cannot deadlock: the program may answer before reading on.
        // Not joined on failure: killing the program unblocks it, and a
        // grandchild holding the pipe must not hang this call.
        let writer = thread::Builder::new()
            .name("reward-stdin".into())
            .spawn(move || {
                let written = stdin.write_all(&batch).and_then(|()| stdin.flush());
                (stdin, written)
            });
        let writer = match writer {
            Ok(writer) => writer,
            Err(error) => {
                self.kill();
                return Err(anyhow!(error).context("starting the reward program's stdin writer"));
            }
        };

        let mut rewards = Vec::with_capacity(prompt_ids.len());
        for (row, prompt_id) in prompt_ids.iter().enumerate() {
            match self.next_reward() {
                Ok(reward) => rewards.push(reward),
                Err(error) => {
                    self.kill();
                    return Err(error.context(format!(
                        "reward program `{}`, row {row} (prompt_id {prompt_id:?})",
                        self.command_line
                    )));
                }
            }
        }
        // Every answer arrived, so the program read every line; the writer is done or nearly.
        match writer.join() {
            Ok((stdin, Ok(()))) => self.stdin = Some(stdin),
            Ok((_, Err(error))) => {
                self.kill();
                return Err(anyhow!(error).context(format!(
                    "writing requests to reward program `{}`",
                    self.command_line
                )));
            }
            Err(_) => bail!(
                "the stdin writer of reward program `{}` panicked",
                self.command_line
            ),
        }
        Ok(rewards)
    }

    fn next_reward(&mut self) -> Result<f32> {
        match self.output.answers.recv_timeout(self.timeout) {
            Ok(StdoutLine::Line(line)) => parse_reward(&line),
            Ok(StdoutLine::Unreadable(why)) => bail!("could not read its answer: {why}"),
            Err(RecvTimeoutError::Timeout) => {
                // Killed first so that its stderr closes and the tail is complete.
                self.kill();
                bail!(
                    "no answer within {:?}; killed it{}",
                    self.timeout,
                    self.stderr_summary()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = match wait_or_kill(&mut self.child, EXIT_GRACE) {
                    Ok(status) => status.to_string(),
                    Err(error) => format!("exit status unknown: {error}"),
                };
                bail!(
                    "it closed its stdout before answering ({status}){}",
                    self.stderr_summary()
                )
            }
        }
    }

    /// The last stderr lines, formatted for an error message (empty if none).
    fn stderr_summary(&self) -> String {
        let deadline = Instant::now() + EXIT_GRACE;
        while !self.output.stderr_reader.is_finished() && Instant::now() < deadline {
            thread::sleep(EXIT_POLL);
        }
        let tail = self
            .output
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if tail.is_empty() {
            return String::new();
        }
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!("; last lines of its stderr:\n  {}", lines.join("\n  "))
    }

    fn kill(&mut self) {
        self.stdin = None;
        // Errors mean it has already exited; wait() then reaps it or returns the known status.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OutputReaders {
    fn start(stdout: ChildStdout, stderr: ChildStderr) -> Result<Self> {
        let (sender, answers) = mpsc::channel();
        thread::Builder::new()
            .name("reward-stdout".into())
            .spawn(move || read_stdout_lines(stdout, &sender))
            .context("starting the stdout reader")?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        let stderr_reader = thread::Builder::new()
            .name("reward-stderr".into())
            .spawn(move || keep_stderr_tail(stderr, &tail))
            .context("starting the stderr reader")?;
        Ok(Self {
            answers,
            stderr_tail,
            stderr_reader,
        })
    }
}

impl Drop for RewardCommand {
    fn drop(&mut self) {
        // Closing stdin is the program's signal to finish.
        self.stdin = None;
        let _ = wait_or_kill(&mut self.child, self.timeout);
    }
}

fn parse_reward(line: &str) -> Result<f32> {
    let quoted = truncate(line, QUOTED_ANSWER_CHARS);
    let answer: serde_json::Value = match serde_json::from_str(line) {
        Ok(answer) => answer,
        // Python's json.dumps writes NaN and Infinity, which are not JSON.
        Err(_) if line.contains("NaN") || line.contains("Infinity") => {
            bail!("reward is not a finite number: {quoted:?}")
        }
        Err(_) => bail!("answer is not JSON: {quoted:?}"),
    };
    let Some(reward) = answer.get("reward") else {
        bail!("answer has no \"reward\" field: {quoted:?}");
    };
    let Some(reward) = reward.as_f64() else {
        bail!("\"reward\" is not a number: {quoted:?}");
    };
    let reward = reward as f32;
    if !reward.is_finite() {
        bail!("reward is not a finite 32-bit float: {quoted:?}");
    }
    Ok(reward)
}

/// Sends each stdout line (without its line ending) until EOF; EOF drops the sender.
fn read_stdout_lines(stdout: ChildStdout, answers: &mpsc::Sender<StdoutLine>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line);
        let message = match read {
            Ok(0) => return,
            Ok(_) if !line.ends_with(b"\n") && line.len() as u64 == MAX_LINE_BYTES => {
                StdoutLine::Unreadable(format!(
                    "an answer line is longer than {MAX_LINE_BYTES} bytes"
                ))
            }
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                StdoutLine::Line(text.trim_end_matches(['\n', '\r']).to_string())
            }
            Err(error) => StdoutLine::Unreadable(error.to_string()),
        };
        let is_last = matches!(message, StdoutLine::Unreadable(_));
        if answers.send(message).is_err() || is_last {
            return;
        }
    }
}

/// Keeps the last stderr lines; reading also stops a chatty program from
/// blocking on a full stderr pipe.
fn keep_stderr_tail(stderr: ChildStderr, tail: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        // A newline-free flood is cut into pieces rather than buffered whole.
        match (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = truncate(text.trim_end_matches(['\n', '\r']), STDERR_LINE_CHARS);
                let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
        }
    }
}

/// Waits up to `grace` for the program to exit, then kills it; always reaps it.
fn wait_or_kill(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    let Some(deadline) = Instant::now().checked_add(grace) else {
        return child.wait();
    };
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        thread::sleep(EXIT_POLL);
    }
    let _ = child.kill();
    child.wait()
}
