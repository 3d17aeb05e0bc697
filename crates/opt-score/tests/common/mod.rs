//! What the opt-score test files share: the binary, the test data and a JSONL writer.

#![allow(dead_code)] // each test file uses its own part

use optune_testkit::workspace_root;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const OPT_SCORE: &str = env!("CARGO_BIN_EXE_opt-score");

pub fn opt_score() -> Command {
    Command::new(OPT_SCORE)
}

/// A file under the workspace root.
pub fn repo_file(relative: &str) -> PathBuf {
    workspace_root().join(relative)
}

/// optune-reward's hand-written lexicon (good 2.0, bad -2.5, problem -1.5, …).
pub fn tiny_lexicon() -> PathBuf {
    repo_file("crates/optune-reward/testdata/lexicon/tiny_lexicon.txt")
}

/// A reward program: this crate's testdata/reward_cmd, else optune-reward's.
pub fn reward_script(name: &str) -> PathBuf {
    let own = repo_file("crates/opt-score/testdata/reward_cmd").join(name);
    if own.exists() {
        own
    } else {
        repo_file("crates/optune-reward/testdata/reward_cmd").join(name)
    }
}

/// Writes one JSON object per line.
pub fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|row| format!("{row}\n")).collect();
    std::fs::write(path, text).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
}

/// Response rows `(prompt_id, prompt text, response)`, numbered by sample within a prompt.
pub fn responses(rows: &[(&str, &str, &str)]) -> Vec<Value> {
    rows.iter()
        .enumerate()
        .map(|(index, &(prompt_id, prompt, response))| {
            let sample = rows[..index].iter().filter(|row| row.0 == prompt_id).count();
            json!({"prompt_id": prompt_id, "prompt": prompt, "sample": sample, "response": response})
        })
        .collect()
}
