//! The host's file-system helpers: size-capped reads, bounded directory
//! scans, private files and directories, and the crash-safe write (temp
//! file → fsync → rename or link → fsync of the directory), with one typed
//! error ([`FsError`]) that names the path.
//!
//! What it trusts: nothing in the files. What it bounds: every read (the
//! caller's limit, checked by reading one byte more, never by trusting a
//! size from `stat`) and every scan (the caller's entry limit). The
//! modules that keep state on disk (key store, registry, vTPM CA and
//! secrets, node identity, evidence files) map [`FsError`] into their own
//! errors; none keeps a copy of these steps.

use std::fs::{self, DirEntry, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Mode of every file the host writes for itself: owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory the host makes for itself: owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// A file-system step that failed, with its path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// Open, read, write, fsync or rename failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The directory could not be listed or fsynced.
    #[error("directory {}: {source}", path.display())]
    Directory { path: PathBuf, source: io::Error },
    /// Something other than a regular file where one was expected.
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// A file above the caller's cap.
    #[error("{} is larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    /// A directory with more entries than the caller scans.
    #[error("directory {} holds more than {limit} entries", path.display())]
    TooManyEntries { path: PathBuf, limit: usize },
}

impl FsError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn dir(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Directory {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The I/O error underneath, if any (e.g. to tell `NotFound`).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Io { source, .. } | Self::Directory { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// Reads the whole regular file `path`, of at most `limit` bytes.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, FsError> {
    let file = File::open(path).map_err(FsError::io(path))?;
    if !file.metadata().map_err(FsError::io(path))?.is_file() {
        return Err(FsError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut raw = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut raw)
        .map_err(FsError::io(path))?;
    if raw.len() as u64 > limit {
        return Err(FsError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(raw)
}

/// The entries of `dir`, at most `limit` of them: a directory holding
/// more is refused rather than listed in part.
pub fn entries_bounded(dir: &Path, limit: usize) -> Result<Vec<DirEntry>, FsError> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir).map_err(FsError::dir(dir))? {
        if out.len() >= limit {
            return Err(FsError::TooManyEntries {
                path: dir.to_path_buf(),
                limit,
            });
        }
        out.push(item.map_err(FsError::dir(dir))?);
    }
    Ok(out)
}

/// Opens a new file `path` for writing, owner-only ([`PRIVATE_FILE_MODE`]);
/// fails if anything exists there.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
}

/// Creates the directory `path` (not its parents), owner-only
/// ([`PRIVATE_DIR_MODE`]); fails if it exists.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(path)
}

/// Creates `path` and its missing parents, owner-only
/// ([`PRIVATE_DIR_MODE`]); an existing directory is fine.
pub fn create_private_dirs(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
}

/// Writes `bytes` to the new file `path` (owner-only) and fsyncs it.
/// Not atomic by itself: [`write_temp`] and [`replace`] are.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let mut f = create_private_file(path).map_err(FsError::io(path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(FsError::io(path))
}

/// Writes `bytes` to a new temporary file in `dir` named
/// `<prefix><pid>-<nanos><suffix>`, fsynced, and returns its path and the
/// open file (e.g. to lock it); removed again if the write fails. The
/// caller renames or links it into place, then [`sync_dir`]s.
pub fn write_temp(
    dir: &Path,
    prefix: &str,
    suffix: &str,
    bytes: &[u8],
    before_write: impl FnOnce(&File) -> io::Result<()>,
) -> Result<(PathBuf, File), FsError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let path = dir.join(format!("{prefix}{}-{nanos}{suffix}", std::process::id()));
    let mut file = create_private_file(&path).map_err(FsError::io(&path))?;
    let written = before_write(&file)
        .and_then(|()| file.write_all(bytes))
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        let _ = fs::remove_file(&path);
        return Err(FsError::Io { path, source });
    }
    Ok((path, file))
}

/// Replaces `target` (a file in `dir`) with `bytes` atomically: temporary
/// file, fsync, rename, fsync of `dir`. A crash leaves the old content or
/// the new, and at most a temporary file named `<temp_prefix>...`.
pub fn replace(dir: &Path, target: &Path, temp_prefix: &str, bytes: &[u8]) -> Result<(), FsError> {
    let (temp, _file) = write_temp(dir, temp_prefix, "", bytes, |_| Ok(()))?;
    if let Err(source) = fs::rename(&temp, target) {
        let _ = fs::remove_file(&temp);
        return Err(FsError::Io {
            path: target.to_path_buf(),
            source,
        });
    }
    sync_dir(dir)
}

/// fsyncs the directory `dir`, so that a rename, link or unlink in it
/// survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(FsError::dir(dir))
}

/// Largest `/proc/self/status` read: the file is about 1.5 KiB.
const MAX_PROC_STATUS: u64 = 64 * 1024;

/// This process's effective uid: the second field of the `Uid:` line of
/// `/proc/self/status` (real, effective, saved, filesystem). Read from
/// the kernel's text rather than through `geteuid(2)`, which would need
/// unsafe FFI in this `forbid(unsafe_code)` crate.
pub fn effective_uid() -> std::io::Result<u32> {
    use std::io::Read as _;
    let mut status = String::new();
    File::open("/proc/self/status")?
        .take(MAX_PROC_STATUS)
        .read_to_string(&mut status)?;
    parse_effective_uid(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no well-formed Uid: line in /proc/self/status",
        )
    })
}

pub(crate) fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut fields = line.split_whitespace();
    fields.next()?;
    fields.next()?.parse().ok()
}

/// Whether this test runs as root (needed to give a file or a directory
/// away to another uid): the node's and the key store's tests use it.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn running_as_root(test: &str) -> bool {
    let root = effective_uid().unwrap() == 0;
    if !root {
        eprintln!("{test}: skipped, not running as root: cannot chown to another uid");
    }
    root
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn reads_up_to_the_cap_and_refuses_one_byte_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, [7u8; 10]).unwrap();
        assert_eq!(read_capped(&path, 10).unwrap(), vec![7u8; 10]);
        assert!(matches!(
            read_capped(&path, 9),
            Err(FsError::TooLarge { limit: 9, .. })
        ));
        assert!(matches!(
            read_capped(dir.path(), 10),
            Err(FsError::NotAFile { .. })
        ));
        let e = read_capped(&dir.path().join("absent"), 10).unwrap_err();
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn scans_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            fs::write(dir.path().join(i.to_string()), b"").unwrap();
        }
        assert_eq!(entries_bounded(dir.path(), 3).unwrap().len(), 3);
        assert!(matches!(
            entries_bounded(dir.path(), 2),
            Err(FsError::TooManyEntries { limit: 2, .. })
        ));
    }

    #[test]
    fn writes_are_private_and_replacements_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        write_new(&target, b"old").unwrap();
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, PRIVATE_FILE_MODE);
        assert!(matches!(write_new(&target, b"x"), Err(FsError::Io { .. })));
        replace(dir.path(), &target, ".tmp-", b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let sub = dir.path().join("d");
        create_private_dir(&sub).unwrap();
        let mode = fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, PRIVATE_DIR_MODE);
        assert!(create_private_dir(&sub).is_err());
    }
}
