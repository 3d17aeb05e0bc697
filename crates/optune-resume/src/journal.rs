//! [`Journal`]: the finished rows of an output, kept beside it through a crash.

use crate::fingerprint::Fingerprint;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often finished rows reach the file: a kill loses at most this much work.
const WRITE_EVERY: Duration = Duration::from_secs(2);

/// The first line of a journal.
#[derive(Serialize, Deserialize)]
struct Header {
    journal: u32,
    fingerprint: Fingerprint,
}

const FORMAT: u32 = 1;

/// The rows a tool has finished for an output, in `OUTPUT.journal` beside it: a header line with
/// the run's [`Fingerprint`], then one JSON line per row, appended every few seconds. The same
/// command run again after a kill reads them back and computes only the rest; a run with other
/// arguments or inputs is refused. A line cut short by the kill is dropped. The tool removes
/// the journal once the output is written.
pub struct Journal<R> {
    path: PathBuf,
    file: File,
    buffer: Vec<u8>,
    last_write: Instant,
    rows: PhantomData<fn(R)>,
}

/// Where `output`'s journal lives: `OUTPUT.journal`.
pub fn journal_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

impl<R: Serialize + DeserializeOwned> Journal<R> {
    /// Opens `output`'s journal for a run with `fingerprint`: the rows an earlier run with the
    /// same fingerprint finished (none when there is no journal yet), and the journal to add
    /// the new ones to. A journal of another run is an error that names the values that differ.
    pub fn open(output: &Path, fingerprint: &Fingerprint) -> Result<(Journal<R>, Vec<R>)> {
        let path = journal_path(output);
        let existing = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                return Err(err).with_context(|| format!("{}: cannot read", path.display()))
            }
        };
        // Everything up to the last newline; after it, at most a line the kill cut short.
        let complete = existing
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let mut lines = existing[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty());
        let mut rows = Vec::new();
        let kept = match lines.next() {
            None => 0,
            Some(first) => {
                let header: Header = serde_json::from_slice(first).with_context(|| {
                    format!(
                        "{}: line 1 is not a journal header (delete the file to start over)",
                        path.display()
                    )
                })?;
                if header.journal != FORMAT {
                    bail!("{}: journal format {} (this build writes {FORMAT}); delete it to start over", path.display(), header.journal);
                }
                fingerprint.check(&header.fingerprint, &path)?;
                for (index, line) in lines.enumerate() {
                    rows.push(serde_json::from_slice(line).with_context(|| {
                        format!("{}: line {} is not a row of this journal (delete the file to start over)", path.display(), index + 2)
                    })?);
                }
                complete
            }
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        file.set_len(kept as u64)?;
        let mut journal = Journal {
            path,
            file,
            buffer: Vec::new(),
            last_write: Instant::now(),
            rows: PhantomData,
        };
        if kept == 0 {
            let header = Header {
                journal: FORMAT,
                fingerprint: fingerprint.clone(),
            };
            serde_json::to_writer(&mut journal.buffer, &header)?;
            journal.buffer.push(b'\n');
            journal.flush()?;
        }
        Ok((journal, rows))
    }

    /// Adds a finished row. Rows reach the file when a few seconds have passed since the last
    /// write, on [`Journal::flush`], and when the journal is dropped (an error ending the run).
    pub fn push(&mut self, row: &R) -> Result<()> {
        serde_json::to_writer(&mut self.buffer, row)?;
        self.buffer.push(b'\n');
        if self.last_write.elapsed() >= WRITE_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Appends the rows pushed so far, whole lines in one write.
    pub fn flush(&mut self) -> Result<()> {
        if !self.buffer.is_empty() {
            self.file
                .write_all(&self.buffer)
                .with_context(|| format!("{}: cannot write", self.path.display()))?;
            self.buffer.clear();
        }
        self.last_write = Instant::now();
        Ok(())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the journal: call once the output holds its rows.
    pub fn remove(mut self) -> Result<()> {
        self.buffer.clear();
        std::fs::remove_file(&self.path)
            .with_context(|| format!("{}: cannot remove", self.path.display()))
    }
}

impl<R> Drop for Journal<R> {
    fn drop(&mut self) {
        // Keep what was finished when the run ends in an error; `remove` empties the buffer.
        if !self.buffer.is_empty() {
            let _ = self.file.write_all(&self.buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    type Row = (String, u32);

    fn fingerprint(seed: u64) -> Fingerprint {
        Fingerprint::new().with("--seed", seed)
    }

    #[test]
    fn rows_survive_until_removed_and_a_cut_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.parquet");
        let (mut journal, rows) = Journal::<Row>::open(&output, &fingerprint(1)).unwrap();
        assert!(rows.is_empty());
        assert_eq!(journal.path(), dir.path().join("out.parquet.journal"));
        journal.push(&("a".into(), 0)).unwrap();
        journal.push(&("a".into(), 1)).unwrap();
        journal.flush().unwrap();
        journal.push(&("b".into(), 0)).unwrap();
        drop(journal); // an error: the buffered row is written too
                       // A kill in the middle of a write.
        let path = journal_path(&output);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"[\"c\",")
            .unwrap();

        let (mut journal, rows) = Journal::<Row>::open(&output, &fingerprint(1)).unwrap();
        assert_eq!(rows, [("a".into(), 0), ("a".into(), 1), ("b".into(), 0)]);
        journal.push(&("c".into(), 0)).unwrap();
        journal.flush().unwrap();
        let (journal, rows) = Journal::<Row>::open(&output, &fingerprint(1)).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[3], ("c".into(), 0));
        journal.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn another_runs_journal_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.parquet");
        let (mut journal, _) = Journal::<Row>::open(&output, &fingerprint(1)).unwrap();
        journal.push(&("a".into(), 0)).unwrap();
        drop(journal);
        let path = journal_path(&output);
        let before = std::fs::read(&path).unwrap();
        let err = Journal::<Row>::open(&output, &fingerprint(2))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--seed: 1 then, 2 now"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);

        std::fs::write(&path, "not a header\n").unwrap();
        let err = Journal::<Row>::open(&output, &fingerprint(1))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("line 1 is not a journal header"), "{err}");
        // A header cut short: nothing was finished, start afresh.
        std::fs::write(&path, "{\"journal\":1,").unwrap();
        let (_, rows) = Journal::<Row>::open(&output, &fingerprint(1)).unwrap();
        assert!(rows.is_empty());
    }
}
