//! [`Fingerprint`]: the identity of a run, as named values.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Display;
use std::hash::Hasher;
use std::path::Path;
use std::time::UNIX_EPOCH;

/// What makes a run's results what they are, as `(name, value)` pairs in a fixed order: the
/// arguments that change the output (named as on the command line) and the identity of the
/// inputs (digests of their contents, or [`file_stamps`] for large files). Arguments that do not
/// change the output (batch size, threads) stay out, so a run can continue with other ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint(Vec<(String, String)>);

impl Fingerprint {
    pub fn new() -> Fingerprint {
        Fingerprint::default()
    }

    pub fn with(mut self, name: impl Into<String>, value: impl Display) -> Fingerprint {
        self.0.push((name.into(), value.to_string()));
        self
    }

    /// The values that differ from `then`'s, as `NAME: VALUE then, VALUE now`.
    pub fn differences(&self, then: &Fingerprint) -> Vec<String> {
        let value = |fingerprint: &Fingerprint, name: &str| {
            fingerprint
                .0
                .iter()
                .find(|(n, _)| n == name)
                .map_or_else(|| "(none)".to_string(), |(_, v)| v.clone())
        };
        let mut names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        for (name, _) in &then.0 {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        names
            .into_iter()
            .filter_map(|name| {
                let (before, now) = (value(then, name), value(self, name));
                (before != now).then(|| format!("{name}: {before} then, {now} now"))
            })
            .collect()
    }

    /// Fails unless `then`, the fingerprint stored in `kept` (a journal, a training state), is
    /// this one: the error names every value that differs and how to go on.
    pub fn check(&self, then: &Fingerprint, kept: &Path) -> Result<()> {
        let differences = self.differences(then);
        if !differences.is_empty() {
            bail!(
                "{} holds the unfinished work of a run with other arguments or inputs ({}); \
                 run that command again to finish it, or delete {} to start this one from scratch",
                kept.display(),
                differences.join("; "),
                kept.display()
            );
        }
        Ok(())
    }
}

/// A digest of inputs (FNV-1a, 64 bits): enough to tell a changed input from the same one, not
/// a defence against forgery. Every update is prefixed with its length, so that the pieces'
/// boundaries count.
#[derive(Default)]
pub struct Digest(fnv::FnvHasher);

impl Digest {
    pub fn new() -> Digest {
        Digest::default()
    }

    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Digest {
        self.0.write_u64(bytes.len() as u64);
        self.0.write(bytes);
        self
    }

    pub fn str(&mut self, text: &str) -> &mut Digest {
        self.bytes(text.as_bytes())
    }

    pub fn u32s(&mut self, values: &[u32]) -> &mut Digest {
        self.0.write_u64(values.len() as u64);
        for value in values {
            self.0.write(&value.to_le_bytes());
        }
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Digest {
        self.0.write(&value.to_le_bytes());
        self
    }

    /// The digest as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0.finish())
    }
}

/// The name, size and modification time of a file, or of every file directly in a directory
/// (sorted by name): the identity of a model too large to read for a fingerprint. Rewriting a
/// file (a policy trained anew into the same directory) changes it.
pub fn file_stamps(path: &Path) -> Result<String> {
    let stamp = |file: &Path| -> Result<String> {
        let metadata =
            std::fs::metadata(file).with_context(|| format!("{}: cannot stat", file.display()))?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_nanos());
        let name = file.file_name().map_or_else(
            || file.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        Ok(format!("{name} {} {modified}", metadata.len()))
    };
    if !path.is_dir() {
        return stamp(path);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("{}: cannot list", path.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    let stamps: Vec<String> = files.iter().map(|f| stamp(f)).collect::<Result<_>>()?;
    Ok(stamps.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_changed_added_or_missing_value() {
        let then = Fingerprint::new()
            .with("--seed", 1)
            .with("--n", 2)
            .with("--top-k", 0);
        let now = Fingerprint::new()
            .with("--seed", 2)
            .with("--n", 2)
            .with("--dtype", "f32");
        assert_eq!(
            now.differences(&then),
            [
                "--seed: 1 then, 2 now",
                "--dtype: (none) then, f32 now",
                "--top-k: 0 then, (none) now"
            ]
        );
        assert!(now.differences(&now.clone()).is_empty());
        let err = now
            .check(&then, Path::new("out.journal"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("out.journal holds the unfinished work of a run with other arguments or inputs (--seed: 1 then, 2 now; "), "{err}");
        assert!(
            err.ends_with("or delete out.journal to start this one from scratch"),
            "{err}"
        );
    }

    #[test]
    fn digests_see_piece_boundaries() {
        let ab_c = Digest::new().str("ab").str("c").hex();
        let a_bc = Digest::new().str("a").str("bc").hex();
        assert_ne!(ab_c, a_bc);
        assert_eq!(ab_c, Digest::new().str("ab").str("c").hex());
        assert_eq!(ab_c.len(), 16);
    }

    #[test]
    fn file_stamps_change_when_a_file_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.bin"), b"12").unwrap();
        std::fs::write(dir.path().join("a.json"), b"{}").unwrap();
        let before = file_stamps(dir.path()).unwrap();
        assert!(before.starts_with("a.json 2 "), "{before}");
        assert!(before.contains(", b.bin 2 "), "{before}");
        std::fs::write(dir.path().join("b.bin"), b"123").unwrap();
        assert_ne!(file_stamps(dir.path()).unwrap(), before);
        assert!(file_stamps(&dir.path().join("missing")).is_err());
    }
}
