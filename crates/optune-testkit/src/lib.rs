//! Helpers for the optune tools' integration tests: the committed test
//! shards, running a tool binary (alone or in a pipe), checking that a bad
//! input failed cleanly, and the DuckDB/pyarrow cross-read.

pub mod memory;

pub use optune_resume::journal_path;
use optune_shard::arrow::array::{ArrayRef, Float32Array, StringArray};
use optune_shard::arrow::compute::cast;
use optune_shard::arrow::datatypes::DataType;
use optune_shard::{col, write_shard, Destination, OutputFormat, Shard};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;

/// The checkout the tests run in: two levels above the manifest of the crate under test, which
/// cargo names at run time. This crate's own compile-time directory would do in one checkout, but
/// a second checkout sharing the target directory (CI's clean clone) may leave this library built
/// from there, its path baked in.
pub fn workspace_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.join("../..")
}

/// The causal language models of testdata, one per family (llama; mistral, windowed; qwen2,
/// biased; qwen3, with norms of each query and key head; phi3, its projections stored fused;
/// smollm3, a layer without a rotary embedding; olmo2, norms after the sublayers and of the whole
/// q and k projections; olmo3, a sliding layer turned by the plain rotation beside a full one
/// turned by YaRN; exaone4, a sliding layer beside a full one without a rotary embedding;
/// gemma3, norms before and after each sublayer scaling by 1 + weight, a scaled embedding, a
/// GELU gate and a sliding layer on its local base; granite, four multipliers), for the tests
/// that run on each.
pub const FAMILY_MODELS: [&str; 11] = [
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-phi3",
    "tiny-smollm3",
    "tiny-olmo2",
    "tiny-olmo3",
    "tiny-exaone4",
    "tiny-gemma3",
    "tiny-granite",
];

/// The reward models of testdata, one per family but OLMo 3's, whose layers tiny-olmo3 runs, and
/// Granite's, which transformers has no class for
/// (`*ForSequenceClassification`, one label; tiny-rm-olmo2 without GQA, so its q and k norms are
/// of one width).
pub const REWARD_MODELS: [&str; 9] = [
    "tiny-rm-llama",
    "tiny-rm-mistral",
    "tiny-rm-qwen2",
    "tiny-rm-qwen3",
    "tiny-rm-phi3",
    "tiny-rm-smollm3",
    "tiny-rm-olmo2",
    "tiny-rm-exaone4",
    "tiny-rm-gemma3",
];

/// The seven projections of a llama block, the LoRA targets of a test that adapts them all.
pub const LLAMA_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A committed test shard in `testdata/shards/`.
pub fn testdata(name: &str) -> PathBuf {
    workspace_root().join("testdata/shards").join(name)
}

/// A copy of the committed test model `name` (`testdata/models/NAME`) at `copy`, for a test that
/// edits its files ([`edit_json`]).
pub fn copy_model(name: &str, copy: &Path) -> PathBuf {
    let model = workspace_root().join("testdata/models").join(name);
    std::fs::create_dir_all(copy).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    copy.to_path_buf()
}

/// Rewrites the JSON file `path` (a model's `config.json`, say) as `edit` changes it.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(path, json.to_string()).unwrap();
}

/// A copy, in `dir`, of the committed `tiny-llama-base` whose tokenizer adds no BOS to raw text
/// (a Llama tokenizer with `add_bos_token: false`, which transformers honours), so that an empty
/// raw-text prompt has no tokens at all.
pub fn base_model_without_bos(dir: &Path) -> PathBuf {
    let copy = copy_model("tiny-llama-base", &dir.join("tiny-llama-base-no-bos"));
    edit_json(&copy.join("tokenizer_config.json"), |config| {
        config["tokenizer_class"] = "LlamaTokenizerFast".into();
        config["add_bos_token"] = false.into();
    });
    copy
}

/// The committed scored shard: six prompts × two samples.
pub fn scored_fixture() -> Shard {
    read(&testdata("scored.jsonl"))
}

pub fn read(path: &Path) -> Shard {
    Shard::read(Some(path)).unwrap_or_else(|err| panic!("reading {}: {err:#}", path.display()))
}

/// Writes a shard as Parquet, through the same writer the tools use.
pub fn write_parquet(shard: &Shard, path: &Path) {
    write_shard(
        shard,
        &Destination::File(path.to_path_buf()),
        OutputFormat::Parquet,
    )
    .unwrap_or_else(|err| panic!("writing {}: {err:#}", path.display()));
}

/// How a tool run ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Outcome {
    /// Panics with the tool's stderr unless it succeeded.
    pub fn assert_success(&self) -> &Outcome {
        assert!(
            self.status.success(),
            "failed with {}: {}",
            self.status,
            self.stderr
        );
        self
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("UTF-8 on stdout")
    }

    /// The shard the tool wrote to stdout.
    pub fn stdout_shard(&self) -> Shard {
        Shard::from_bytes("<stdout>", self.stdout.clone(), None)
            .unwrap_or_else(|err| panic!("reading stdout: {err:#}"))
    }
}

/// Runs `command`, feeding it `stdin` (nothing when `None`).
pub fn run(command: &mut Command, stdin: Option<&[u8]>) -> Outcome {
    pipe(&mut [command], stdin).pop().expect("one stage")
}

/// Runs the commands as a shell pipe (each one's stdout into the next one's
/// stdin), feeding `stdin` to the first. Returns every stage's outcome; only
/// the last one's stdout is captured.
pub fn pipe(commands: &mut [&mut Command], stdin: Option<&[u8]>) -> Vec<Outcome> {
    let mut children = Vec::new();
    let mut upstream = Some(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let last = commands.len() - 1;
    for (index, command) in commands.iter_mut().enumerate() {
        let mut child = command
            .stdin(upstream.take().expect("stdin for every stage"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {command:?}: {err}"));
        if index < last {
            upstream = Some(Stdio::from(child.stdout.take().expect("piped stdout")));
        }
        children.push(child);
    }
    if let Some(bytes) = stdin {
        let mut first_stdin = children[0].stdin.take().expect("piped stdin");
        // A tool that fails early stops reading: a broken pipe here is its answer, not ours.
        let _ = first_stdin.write_all(bytes);
    }
    children
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().expect("waiting for a tool");
            Outcome {
                status: output.status,
                stdout: output.stdout,
                stderr: String::from_utf8_lossy(&output.stderr).into(),
            }
        })
        .collect()
}

/// Another tool of the workspace, next to this test's own binaries. Cargo
/// builds every binary of the workspace before running the tests of
/// `cargo test --workspace`; `None` when it was not built.
pub fn sibling_binary(own_binary: &str, name: &str) -> Option<PathBuf> {
    let sibling =
        Path::new(own_binary).with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    sibling.exists().then_some(sibling)
}

/// Checks that a tool rejected a bad input the way users need: a non-zero
/// exit that is not a panic, the `expected` fragments (file, column, value)
/// on stderr, and nothing at all left in `output_dir`.
pub fn assert_failed_cleanly(case: &str, outcome: &Outcome, expected: &[&str], output_dir: &Path) {
    let stderr = &outcome.stderr;
    assert!(
        !outcome.status.success(),
        "{case}: succeeded; stderr: {stderr}"
    );
    assert!(
        matches!(outcome.status.code(), Some(1 | 2)),
        "{case}: exited with {}: {stderr}",
        outcome.status
    );
    assert!(!stderr.contains("panicked"), "{case}: panicked: {stderr}");
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "{case}: stderr lacks {fragment:?}: {stderr}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(output_dir)
        .expect("listing the output directory")
        .map(|entry| entry.expect("directory entry").file_name())
        .collect();
    assert!(
        left.is_empty(),
        "{case}: left {left:?} in the output directory"
    );
}

/// A bad scored input and the fragments its error must show.
pub struct BadInput {
    pub case: &'static str,
    pub path: PathBuf,
    pub expected: Vec<String>,
}

/// Writes into `dir` the bad scored shards both tools must reject: a
/// truncated Parquet file, a text file named .parquet, an empty file, a
/// shard with no rows, no `reward`, `reward` as text, and a NaN reward.
pub fn write_bad_scored_inputs(dir: &Path) -> Vec<BadInput> {
    let scored = scored_fixture();
    let mut cases = Vec::new();
    let mut case = |case: &'static str, file: &str, bytes: Vec<u8>, expected: &[&str]| {
        let path = dir.join(file);
        std::fs::write(&path, bytes).expect("writing a bad input");
        let mut expected: Vec<String> = expected
            .iter()
            .map(|fragment| fragment.to_string())
            .collect();
        expected.push(path.display().to_string());
        cases.push(BadInput {
            case,
            path,
            expected,
        });
    };

    let parquet = parquet_bytes(&scored, dir);
    case(
        "truncated parquet",
        "truncated.parquet",
        parquet[..parquet.len() / 2].to_vec(),
        &["not a readable Parquet file"],
    );
    case(
        "text named .parquet",
        "notes.parquet",
        b"prompt_id,reward\np1,0.5\n".to_vec(),
        &["not a readable Parquet file", "PAR1"],
    );
    case("empty file", "empty.parquet", Vec::new(), &["empty input"]);
    case(
        "no rows",
        "no_rows.parquet",
        parquet_bytes(&scored.take(&[]).expect("no rows"), dir),
        &["no rows"],
    );

    let keep: Vec<usize> = (0..scored.batch().num_columns())
        .filter(|&index| scored.schema().field(index).name() != col::REWARD)
        .collect();
    let no_reward = Shard::new("", scored.batch().project(&keep).expect("projection"));
    case(
        "missing reward",
        "no_reward.parquet",
        parquet_bytes(&no_reward, dir),
        &["missing required column 'reward'"],
    );

    let reward = scored.column(col::REWARD).expect("fixture has rewards");
    let text_reward = cast(reward, &DataType::Utf8).expect("cast to text");
    let text_reward = scored
        .clone()
        .with_column(col::REWARD, text_reward)
        .expect("same length");
    case(
        "reward as text",
        "text_reward.parquet",
        parquet_bytes(&text_reward, dir),
        &["column 'reward': expected float, found utf8"],
    );

    let mut rewards: Vec<f32> = scored
        .floats(col::REWARD)
        .expect("float rewards")
        .iter()
        .map(|&r| r as f32)
        .collect();
    rewards[2] = f32::NAN;
    let nan_reward = scored.clone().with_column(
        col::REWARD,
        Arc::new(Float32Array::from(rewards)) as ArrayRef,
    );
    case(
        "NaN reward",
        "nan_reward.parquet",
        parquet_bytes(&nan_reward.expect("same length"), dir),
        &["column 'reward': NaN at row 3"],
    );

    let mut prompts: Vec<Option<String>> = scored
        .strings(col::PROMPT)
        .expect("text prompts")
        .iter()
        .map(|p| Some(p.to_string()))
        .collect();
    prompts[3] = None;
    let null_prompt = scored.clone().with_column(
        col::PROMPT,
        Arc::new(StringArray::from(prompts)) as ArrayRef,
    );
    case(
        "null prompt",
        "null_prompt.parquet",
        parquet_bytes(&null_prompt.expect("same length"), dir),
        &["column 'prompt': null at row 4"],
    );
    cases
}

fn parquet_bytes(shard: &Shard, scratch_dir: &Path) -> Vec<u8> {
    let path = scratch_dir.join(".scratch.parquet");
    write_parquet(shard, &path);
    let bytes = std::fs::read(&path).expect("reading back");
    std::fs::remove_file(&path).expect("removing scratch file");
    bytes
}

/// Runs `scripts/check_parquet_readers.py` (DuckDB and pyarrow read every
/// file) when the Python in `OPTUNE_PYTHON` (default `python3`) has both
/// modules; otherwise prints SKIP, or fails when `OPTUNE_REQUIRE_DUCKDB` is
/// set (CI sets it so the check cannot silently vanish).
pub fn check_parquet_readers(paths: &[PathBuf]) {
    let python = std::env::var("OPTUNE_PYTHON").unwrap_or_else(|_| "python3".into());
    let importable = Command::new(&python)
        .args(["-c", "import duckdb, pyarrow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !importable {
        let message = format!("SKIP: {python} cannot import duckdb and pyarrow, so the Parquet cross-read did not run");
        assert!(
            std::env::var_os("OPTUNE_REQUIRE_DUCKDB").is_none(),
            "{message} (OPTUNE_REQUIRE_DUCKDB is set)"
        );
        eprintln!("{message}");
        return;
    }
    let output = Command::new(&python)
        .arg(workspace_root().join("scripts/check_parquet_readers.py"))
        .args(paths)
        .output()
        .unwrap_or_else(|err| panic!("running {python}: {err}"));
    assert!(
        output.status.success(),
        "check_parquet_readers.py failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let checked = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        checked
            .lines()
            .filter(|line| line.starts_with("ok "))
            .count(),
        paths.len(),
        "{checked}"
    );
}

/// Rows in OUTPUT.journal (its lines less the header line; 0 when there is none).
pub fn journal_rows(output: &Path) -> usize {
    std::fs::read(journal_path(output))
        .map(|bytes| {
            bytes
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                .saturating_sub(1)
        })
        .unwrap_or(0)
}

/// A tool running with its stdout discarded and its stderr read on the side (so that a full pipe
/// never stalls it), for a test that signals it mid-run.
pub struct Running {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<String>>,
    started: std::time::Instant,
}

impl Running {
    pub fn start(command: &mut Command) -> Running {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the tool starts");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut text).ok();
            text
        });
        Running {
            child,
            reader: Some(reader),
            started: std::time::Instant::now(),
        }
    }

    /// Polls `ready()` every 20 ms until it holds. Panics when the tool ends first or makes no
    /// progress for ten minutes.
    pub fn wait_until(&mut self, ready: impl Fn() -> bool) {
        while !ready() {
            if let Some(status) = self.child.try_wait().expect("waiting for the tool") {
                panic!(
                    "the tool ended ({status}) before the moment to signal it:\n{}",
                    self.stderr()
                );
            }
            assert!(
                self.started.elapsed() < std::time::Duration::from_secs(600),
                "no progress in ten minutes"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`KILL`, `TERM`, `INT`); on return the tool has been sent it.
    pub fn signal(&mut self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Waits for the tool to end; how it ended, with its stderr.
    pub fn wait(mut self) -> Outcome {
        let status = self.child.wait().expect("reaping the tool");
        Outcome {
            status,
            stdout: Vec::new(),
            stderr: self.stderr(),
        }
    }

    /// What the tool wrote to stderr; call once it has ended.
    fn stderr(&mut self) -> String {
        self.reader
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default()
    }
}

/// Starts `command`, waits until `ready()` holds, sends it `signal` and waits for it to end (see
/// [`Running`]); returns how it ended and how many seconds it took to end after the signal.
pub fn signal_when(
    command: &mut Command,
    signal: &str,
    ready: impl Fn() -> bool,
) -> (Outcome, f64) {
    let mut running = Running::start(command);
    running.wait_until(ready);
    let signalled = std::time::Instant::now();
    running.signal(signal);
    let outcome = running.wait();
    (outcome, signalled.elapsed().as_secs_f64())
}

/// SIGKILLs `command` once the journal of `output` holds at least `rows` rows (see
/// [`signal_when`]); returns the rows it then holds.
pub fn kill_when_journalled(command: &mut Command, output: &Path, rows: usize) -> usize {
    signal_when(command, "KILL", || journal_rows(output) >= rows);
    journal_rows(output)
}

/// Runs `command` to its end like [`run`] (no stdin), and the CPU seconds it used (user and
/// system, its threads together). CPU time, not wall time: the tests that compare two runs' times
/// run beside other tests and builds, whose load stretches one run's wall time and not the
/// other's, while a run's CPU time hardly moves with load.
// The child is reaped by wait4, which gives its resource usage; std's wait does not.
#[allow(clippy::zombie_processes)]
pub fn timed(command: &mut Command) -> (Outcome, f64) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("starting {command:?}: {err}"));
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).map(|_| bytes)
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    let mut raw_status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which nothing else waits for (`child` is not waited on or
    // killed after this), writing into the two locals.
    let waited = unsafe { libc::wait4(pid, &mut raw_status, 0, &mut usage) };
    assert_eq!(
        waited,
        pid,
        "waiting for {command:?}: {}",
        std::io::Error::last_os_error()
    );
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let cpu = seconds(usage.ru_utime) + seconds(usage.ru_stime);
    use std::os::unix::process::ExitStatusExt;
    let outcome = Outcome {
        status: ExitStatus::from_raw(raw_status),
        stdout: stdout.join().unwrap().expect("reading stdout"),
        stderr: String::from_utf8_lossy(&stderr.join().unwrap().expect("reading stderr")).into(),
    };
    (outcome, cpu)
}

/// The rows of an opt-wdpo `metrics.csv` at `path` without their timing columns (the last two:
/// tokens_per_s and seconds), to compare two runs' figures.
pub fn untimed_metrics(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| line.rsplitn(3, ',').nth(2).unwrap().to_string())
        .collect()
}

/// Asserts that `got` and `want` have the same length and each value of `got` is within
/// `tolerance` × max(|want|, 1) of `want`'s, naming the first row (from 1) that is not.
pub fn assert_floats_close(got: &[f64], want: &[f64], tolerance: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (row, (x, y)) in got.iter().zip(want).enumerate() {
        assert!(
            (x - y).abs() <= tolerance * y.abs().max(1.0),
            "{what}: row {}: {x} against {y}",
            row + 1
        );
    }
}

/// Whether these tests run on the generic kernels (`OPTUNE_KERNELS=generic`, inherited by the
/// tools: the op graph CUDA runs, tested on the CPU by `make test`'s second pass).
pub fn generic_kernels() -> bool {
    std::env::var("OPTUNE_KERNELS").as_deref() == Ok("generic")
}

/// Checks a rerun after a kill: it succeeded, took `kept` rows from the journal (its summary's
/// `resumed=`), wrote `resumed` as the uninterrupted run wrote `whole`, and removed the journal.
/// "As": byte for byte on the fused kernels, where a sequence's numbers do not depend on its
/// batch; on the generic kernels, whose decode attends over the batch with a mask, the same
/// rows with `logp` equal to rounding (1e-4 relative).
pub fn assert_resumed(outcome: &Outcome, kept: usize, resumed: &Path, whole: &Path) {
    outcome.assert_success();
    assert!(
        outcome.stderr.contains(&format!(" resumed={kept} ")),
        "{}",
        outcome.stderr
    );
    let what = format!(
        "{} against the uninterrupted run's {}",
        resumed.display(),
        whole.display()
    );
    if !generic_kernels() {
        assert!(
            std::fs::read(resumed).unwrap() == std::fs::read(whole).unwrap(),
            "{what}: the bytes differ"
        );
    } else {
        let (got, want) = (read(resumed), read(whole));
        assert_eq!(got.column_names(), want.column_names(), "{what}");
        for name in want.column_names() {
            if name == "logp" {
                let (a, b) = (got.floats(name).unwrap(), want.floats(name).unwrap());
                assert_floats_close(&a, &b, 1e-4, &format!("{what}: logp"));
            } else {
                assert_eq!(
                    got.column(name).unwrap(),
                    want.column(name).unwrap(),
                    "{what}: column {name}"
                );
            }
        }
    }
    assert!(
        !journal_path(resumed).exists(),
        "the journal is removed once the output is written"
    );
}
