//! Outputs that appear whole or not at all. Every file and directory an optune tool writes is
//! built under a temporary name beside its destination and renamed into place once complete, so
//! a failed or killed run never leaves a torn output under the final name (a killed run may leave
//! a `.NAME.*.partial` file or a `.NAME.tmp-HOST:PID-*` directory, which no reader mistakes for
//! an output, and which the next write of that directory on that machine removes).
//! A destination that is a device, a pipe or a symbolic link (`-o /dev/null`, `/dev/stdout`, a
//! FIFO, a link to a file) is written in place, through the link: a rename would put a regular
//! file in the place of the device or the link itself.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The directory `path` sits in (`.` for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The one path `path` names however it is spelt: the canonical form (links followed) of its
/// longest existing ancestor, joined with the components below it that do not exist yet; `None`
/// when no ancestor resolves. Two spellings of one file, or a link and its target, resolve alike.
pub fn resolved(path: &Path) -> Option<PathBuf> {
    let relative_base = Path::new(".");
    let mut existing = path;
    let mut missing = Vec::new();
    loop {
        let base = if existing.as_os_str().is_empty() {
            relative_base
        } else {
            existing
        };
        if let Ok(canonical) = base.canonicalize() {
            return Some(
                missing
                    .iter()
                    .rev()
                    .fold(canonical, |at, part| at.join(part)),
            );
        }
        missing.push(existing.file_name()?);
        existing = existing.parent()?;
    }
}

/// Refuses a file whose directory does not exist, by the directory's name: a write of it could
/// only fail, naming a temporary file that never existed.
pub fn require_parent_dir(path: &Path) -> Result<()> {
    let directory = parent_of(path);
    if !directory.is_dir() {
        bail!(
            "directory {} does not exist (for {})",
            directory.display(),
            path.display()
        );
    }
    Ok(())
}

fn name_of(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?
        .to_string_lossy()
        .into_owned())
}

/// Whether `path` is a device or a pipe (`/dev/null`, `/dev/stdout` on a pipe, a FIFO), links
/// followed: written through as a stream, never replaced, and nothing to resume into.
pub fn is_stream(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Writes the file at `path` through `write`, atomically. The file gets the usual permissions
/// (0666 less the umask), not a temporary file's private ones.
pub fn write_file_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
) -> Result<()> {
    let linked = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if linked || is_stream(path) {
        let mut device = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut out = BufWriter::new(&mut device);
        write(&mut out)?;
        out.flush()
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(());
    }
    let mut temporary = staging_file(path, ".partial")?;
    {
        let mut out = BufWriter::new(temporary.as_file_mut());
        write(&mut out)?;
        out.flush()?;
    }
    temporary
        .persist(path)
        .with_context(|| format!("renaming the finished file to {}", path.display()))?;
    Ok(())
}

/// A temporary file beside `path`, named `.NAME.*SUFFIX` so that no reader takes it for an
/// output, with the mode of a file others read (0666 less the umask); removed when dropped,
/// unless persisted to `path` once complete. [`write_file_atomically`] writes through one; a
/// writer that needs a path with a given extension (an image library) draws into one itself.
pub fn staging_file(path: &Path, suffix: &str) -> Result<tempfile::NamedTempFile> {
    let directory = parent_of(path);
    require_parent_dir(path)?;
    let prefix = format!(".{}.", name_of(path)?);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(suffix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder
        .tempfile_in(&directory)
        .with_context(|| format!("creating a temporary file in {}", directory.display()))
}

/// [`write_file_atomically`] of a byte string.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_atomically(path, |out| Ok(out.write_all(bytes)?))
}

/// A tensor whose bytes are made only when they are written (copied off a device, cast,
/// converted), so that a save holds one tensor's bytes at a time.
pub trait LazyTensor {
    fn dtype(&self) -> safetensors::Dtype;
    fn shape(&self) -> &[usize];
    /// The tensor's little-endian bytes, as many as its shape and dtype make.
    fn bytes(&self) -> Result<Vec<u8>>;
}

/// Writes `tensors` as one safetensors file with `metadata`, each tensor's bytes made as the
/// writer reaches it ([`LazyTensor::bytes`]). safetensors writes through a temporary file beside
/// `path` and renames it into place; the file then gets the usual mode of a file others read
/// (0644, not the temporary file's 0600). A tensor whose bytes fail is the error.
pub fn write_safetensors_lazily<T: LazyTensor>(
    tensors: impl IntoIterator<Item = (String, T)>,
    metadata: std::collections::HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let failed = std::cell::RefCell::new(None);
    let views = tensors.into_iter().map(|(name, tensor)| {
        let view = WrittenTensor {
            tensor,
            failed: &failed,
        };
        (name, view)
    });
    let written = safetensors::serialize_to_file(views, Some(metadata), path);
    if let Some(err) = failed.into_inner() {
        return Err(err.context(format!("writing {}", path.display())));
    }
    written.with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

/// A [`LazyTensor`] as safetensors' writer takes it. `View::data` cannot fail, so a tensor whose
/// bytes fail leaves its error in `failed` (and zeros of the right length in its place) for
/// [`write_safetensors_lazily`] to report.
struct WrittenTensor<'a, T> {
    tensor: T,
    failed: &'a std::cell::RefCell<Option<anyhow::Error>>,
}

impl<T: LazyTensor> safetensors::View for WrittenTensor<'_, T> {
    fn dtype(&self) -> safetensors::Dtype {
        self.tensor.dtype()
    }

    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.tensor.bytes() {
            Ok(bytes) => std::borrow::Cow::Owned(bytes),
            Err(err) => {
                self.failed.borrow_mut().get_or_insert(err);
                std::borrow::Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape().iter().product::<usize>() * self.dtype().bitsize() / 8
    }
}

/// Fills a fresh temporary directory beside `dir` with `fill`, then puts it in `dir`'s place
/// (a directory already there is replaced).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = name_of(dir)?;
    // This process as the staging names record it: `HOST:PID`, so that a clean-up on a shared
    // file system (a Slurm run's nodes) never takes another machine's live writer for a dead one.
    let host = host_name();
    let writer = format!("{host}:{}", std::process::id());
    #[cfg(unix)]
    remove_stale_staging(&parent, &name, dir, &host);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-{writer}-"))
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    fill(tmp.path())?;
    let old = parent.join(format!(".{name}.old-{writer}"));
    let replaced = dir.exists();
    if replaced {
        std::fs::rename(dir, &old)
            .with_context(|| format!("moving the old {} aside", dir.display()))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, dir)
        .with_context(|| format!("moving the new directory to {}", dir.display()))?;
    if replaced {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

/// Removes what killed writes of `parent/name` left: `.NAME.tmp-HOST:PID-*` staging directories
/// and `.NAME.old-HOST:PID` replaced ones of this machine and this user whose process no longer
/// runs (a signal skips the clean-up, and a checkpoint's staging holds the whole model). A writer
/// killed between its two renames left `dir` missing and the only copies in those two names:
/// its entries are then kept. Only where `/proc` tells which processes run; a failure to remove
/// is no error of this write.
#[cfg(unix)]
fn remove_stale_staging(parent: &Path, name: &str, dir: &Path, host: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata("/proc/self") else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    // (path, writer's pid, whether it is a replaced `.old-` directory)
    let mut stale: Vec<(PathBuf, u32, bool)> = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let writer = [".tmp-", ".old-"].iter().find_map(|kind| {
            let rest = file_name.strip_prefix(&format!(".{name}{kind}"))?;
            let (entry_host, tail) = rest.rsplit_once(':')?;
            let pid = tail.split('-').next()?.parse::<u32>().ok()?;
            Some((entry_host == host, pid, *kind == ".old-"))
        });
        let Some((this_host, pid, old)) = writer else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|m| m.uid() == me.uid());
        if this_host && ours && !Path::new(&format!("/proc/{pid}")).exists() {
            stale.push((entry.path(), pid, old));
        }
    }
    let between_renames = |pid: u32| !dir.exists() && stale.iter().any(|s| s.1 == pid && s.2);
    for (path, pid, _) in &stale {
        if !between_renames(*pid) {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn resolved_names_one_path_however_spelt() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("o");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("s.parquet"), "x").unwrap();
        let canonical = dir.canonicalize().unwrap();
        assert_eq!(
            resolved(&tmp.path().join("o/../o/s.parquet")),
            Some(canonical.join("s.parquet"))
        );
        std::os::unix::fs::symlink(dir.join("s.parquet"), tmp.path().join("link")).unwrap();
        assert_eq!(
            resolved(&tmp.path().join("link")),
            Some(canonical.join("s.parquet"))
        );
        // Components that do not exist yet are joined to the ancestor that does.
        assert_eq!(
            resolved(&dir.join("new/m.csv")),
            Some(canonical.join("new").join("m.csv"))
        );
        let here = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(
            resolved(Path::new("not-here.csv")),
            Some(here.join("not-here.csv"))
        );
    }

    /// A link is written through: it stays a link, and its file gets the bytes.
    #[cfg(unix)]
    #[test]
    fn a_link_is_written_through_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (file, link) = (tmp.path().join("file.txt"), tmp.path().join("link.txt"));
        std::fs::write(&file, b"old contents, longer than the new").unwrap();
        std::os::unix::fs::symlink(&file, &link).unwrap();
        write_bytes_atomically(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
    }

    /// Renaming onto a pipe (or `/dev/null`) would put a regular file in its place: the bytes
    /// go through it instead, and it stays a pipe.
    #[cfg(unix)]
    #[test]
    fn a_pipe_is_written_through_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (sent, received) = std::sync::mpsc::channel();
        let reader = fifo.clone();
        // Opening a pipe to read waits for a writer: a replaced pipe would never get one.
        std::thread::spawn(move || sent.send(std::fs::read(reader).unwrap()));
        write_bytes_atomically(&fifo, b"through the pipe").unwrap();
        let got = received
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("nothing came through the pipe");
        assert_eq!(got, b"through the pipe");
        let kind = std::fs::metadata(&fifo).unwrap().file_type();
        assert!(kind.is_fifo(), "the pipe was replaced: {kind:?}");
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_keeps_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("out.txt");
        write_bytes_atomically(&path, b"first").unwrap();
        let failed = write_file_atomically(&path, |out| {
            out.write_all(b"half")?;
            anyhow::bail!("interrupted")
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
    }

    #[test]
    fn a_directory_is_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        write_dir_atomically(&dir, |d| Ok(std::fs::write(d.join("a"), "1")?)).unwrap();
        write_dir_atomically(&dir, |d| Ok(std::fs::write(d.join("b"), "2")?)).unwrap();
        assert!(!dir.join("a").exists());
        assert_eq!(std::fs::read_to_string(dir.join("b")).unwrap(), "2");
        assert!(write_dir_atomically(&dir, |_| anyhow::bail!("failed")).is_err());
        assert_eq!(std::fs::read_to_string(dir.join("b")).unwrap(), "2");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    /// What a killed write left (its process gone) is removed by the next write of that
    /// directory; a running writer's staging, another machine's and other names are left alone,
    /// and so is a writer's pair of names when it was killed between its two renames (the
    /// directory missing: they hold its only copies).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_killed_writes_staging_is_removed_by_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let host = host_name();
        // Above the kernel's largest process id (2^22): no such processes.
        let dead = [1u32 << 23, (1 << 23) + 1, (1 << 23) + 2];
        let killed_filling = format!(".model.tmp-{host}:{}-abc", dead[0]);
        let killed_between = [
            format!(".model.tmp-{host}:{}-new", dead[1]),
            format!(".model.old-{host}:{}", dead[1]),
        ];
        let kept = [
            format!(".model.tmp-{host}:1-abc"),
            format!(".model.tmp-elsewhere:{}-abc", dead[0]),
            format!(".other.tmp-{host}:{}-x", dead[0]),
        ];
        let make = |name: &String| {
            std::fs::create_dir(tmp.path().join(name)).unwrap();
            std::fs::write(tmp.path().join(name).join("weights"), "x").unwrap();
        };
        [&killed_filling]
            .into_iter()
            .chain(&killed_between)
            .chain(&kept)
            .for_each(make);
        let listing = || {
            let mut left: Vec<String> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            left
        };
        let sorted = |names: Vec<String>| {
            let mut names = names;
            names.sort();
            names
        };
        // `model` is missing: the writer with both names was killed between its renames.
        write_dir_atomically(&dir, |d| Ok(std::fs::write(d.join("a"), "1")?)).unwrap();
        let mut want: Vec<String> = kept.iter().chain(&killed_between).cloned().collect();
        want.push("model".into());
        assert_eq!(listing(), sorted(want));
        // With `model` in place, a replaced directory left alone is stale too.
        make(&format!(".model.old-{host}:{}", dead[2]));
        write_dir_atomically(&dir, |d| Ok(std::fs::write(d.join("a"), "2")?)).unwrap();
        let mut want: Vec<String> = kept.to_vec();
        want.push("model".into());
        assert_eq!(listing(), sorted(want));
    }
}
