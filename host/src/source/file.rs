//! A file as a rollout source: the rollout file, and the integrator's local
//! override file (the same watcher, another path).
//!
//! Watching is a poll through [`crate::publish::poll_and_publish`]: one
//! `stat` every [`FILE_POLL_INTERVAL`], and a read only when the file's
//! identity (device, inode, length, mtime, ctime) changed since the last
//! good read. A writer replaces the file atomically (a temporary file
//! renamed over the path, as [`write`] does): the new file is a new inode,
//! so the next poll, within one interval, reads it. Polling, rather than
//! inotify, because it needs no new dependency, sees a replaced parent
//! directory or a re-pointed symlink the same way, costs one `stat` per
//! interval, and is the shape the key-version watcher already uses.
//!
//! What it trusts: nothing about the file's content or size. It refuses a
//! path that is no regular file (a FIFO would block the read) and a file
//! over [`MAX_SOURCE_BYTES`], checked on the opened file before reading and
//! again while reading (the read stops one byte past the limit).
//!
//! Absent file: the value `None`, healthy (no document is a valid state).
//! Unreadable file: `Down`, the last value kept.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use vkx_common::{rl_info, rl_warn};

use super::{
    FileVersion, Health, MAX_SOURCE_BYTES, SourceCounters, SourceError, SourceStatus, Version,
    digest_prefix, io_error,
};
use crate::publish::{poll_and_publish, publish_if_changed};

/// How often a watched file is looked at: an atomic replace is seen within
/// this (plus one read), well inside the 1-s promise.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Mode of a written rollout file: the document is signed, not secret.
const FILE_MODE: u32 = 0o644;

/// Refuses a path the watcher and the writer cannot use: it must be
/// absolute and name a file in a directory.
pub fn validate_path(path: &Path) -> Result<(), SourceError> {
    if !path.is_absolute() {
        return Err(SourceError::Config(format!(
            "rollout file {} must be an absolute path",
            path.display()
        )));
    }
    if path.file_name().is_none() || path.parent().is_none() {
        return Err(SourceError::Config(format!(
            "rollout file {} must name a file",
            path.display()
        )));
    }
    Ok(())
}

/// Watches `path` and publishes its content on `tx` until `stop` turns
/// true or every receiver is gone. The first look happens at once; later
/// ones every `interval` (at least [`crate::publish::MIN_POLL_INTERVAL`]).
/// Reusable for any file the host follows (the local override file).
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<SourceStatus>,
    counters: Arc<SourceCounters>,
    stop: watch::Receiver<bool>,
) {
    let watcher = Arc::new(Watcher {
        path: path.into(),
        state: Mutex::new(WatchState {
            status: tx.borrow().clone(),
            good: None,
        }),
        counters,
    });
    if let Some(first) = watcher.step().await {
        publish_if_changed(&tx, first);
    }
    let poll = move || {
        let watcher = watcher.clone();
        async move { watcher.step().await }
    };
    poll_and_publish(interval, poll, tx, stop).await;
}

/// Replaces the file with `bytes` crash-safely: a temporary file in the
/// same directory, fsynced, renamed over the path, the directory fsynced.
/// With `expected`, first checks that the file is still at that version
/// (`Some(None)`: that it is absent).
pub(super) async fn write(
    path: &Path,
    bytes: &[u8],
    expected: Option<Option<Version>>,
) -> Result<Version, SourceError> {
    let path = path.to_path_buf();
    let bytes = bytes.to_vec();
    blocking(move || write_blocking(&path, &bytes, expected)).await
}

/// Reads the file once, bounded; `None` if it is absent.
pub(super) async fn read(path: &Path) -> Result<Option<(Vec<u8>, Version)>, SourceError> {
    let path = path.to_path_buf();
    blocking(move || Ok(read_bounded(&path)?.map(|(bytes, v)| (bytes, Version::File(v))))).await
}

#[derive(Debug)]
struct Watcher {
    path: Arc<Path>,
    state: Mutex<WatchState>,
    counters: Arc<SourceCounters>,
}

#[derive(Debug)]
struct WatchState {
    /// What this watcher published last.
    status: SourceStatus,
    /// The version of the last good read: an unchanged file is not read
    /// again.
    good: Option<FileVersion>,
}

/// One look at the file.
#[derive(Debug)]
enum Look {
    Absent,
    /// Same identity as the last good read.
    Unchanged,
    Read(Vec<u8>, FileVersion),
    Failed(SourceError),
}

impl Watcher {
    /// Looks once and returns the status to publish (`None` only if the
    /// state lock is poisoned, which no code path here can cause).
    async fn step(&self) -> Option<SourceStatus> {
        let good = self.state.lock().ok()?.good;
        let path = self.path.clone();
        let look = match tokio::task::spawn_blocking(move || look(&path, good)).await {
            Ok(look) => look,
            Err(e) => Look::Failed(io_error(&self.path, std::io::Error::other(e.to_string()))),
        };
        let now = SystemTime::now();
        let mut state = self.state.lock().ok()?;
        let old = state.status.clone();
        let next = match look {
            Look::Unchanged if old.is_healthy() => old.clone(),
            Look::Unchanged => old.healthy(now),
            Look::Absent => {
                state.good = None;
                SourceStatus {
                    value: None,
                    version: Version::None,
                    health: Health::Healthy,
                    last_good: Some(now),
                }
            }
            Look::Read(bytes, version) => {
                state.good = Some(version);
                SourceStatus {
                    value: Some(bytes.into()),
                    version: Version::File(version),
                    health: Health::Healthy,
                    last_good: Some(now),
                }
            }
            Look::Failed(e) => {
                state.good = None;
                SourceCounters::bump(&self.counters.errors);
                old.down(now, &e)
            }
        };
        self.log_transition(&old, &next);
        state.status = next.clone();
        Some(next)
    }

    fn log_transition(&self, old: &SourceStatus, new: &SourceStatus) {
        let path = self.path.display();
        if let Health::Down { error, .. } = &new.health {
            if !matches!(old.health, Health::Down { .. }) {
                rl_warn!(path = %path, error = %error, "rollout file unreadable; keeping the last value");
            }
            return;
        }
        if matches!(old.health, Health::Down { .. }) {
            rl_info!(path = %path, "rollout file readable again");
        }
        if old.value != new.value || old.version != new.version {
            SourceCounters::bump(&self.counters.changes);
            match &new.value {
                Some(v) => vkx_common::rl_log!(
                    debug,
                    path = %path,
                    len = v.len(),
                    sha256 = %digest_prefix(v),
                    "rollout file changed"
                ),
                None => rl_info!(path = %path, "rollout file absent"),
            }
        }
    }
}

/// One look: `stat`, and a bounded read if the identity changed since
/// `good`.
fn look(path: &Path, good: Option<FileVersion>) -> Look {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Look::Absent,
        Err(e) => return Look::Failed(io_error(path, e)),
        Ok(m) if !m.is_file() => return Look::Failed(SourceError::NotAFile(path.to_path_buf())),
        Ok(m) if good == Some(version_of(&m)) => return Look::Unchanged,
        Ok(_) => {}
    }
    match read_bounded(path) {
        Ok(Some((bytes, version))) => Look::Read(bytes, version),
        Ok(None) => Look::Absent,
        Err(e) => Look::Failed(e),
    }
}

/// Opens `path`, checks the opened file (regular, at most
/// [`MAX_SOURCE_BYTES`]) and reads at most one byte past the limit.
fn read_bounded(path: &Path) -> Result<Option<(Vec<u8>, FileVersion)>, SourceError> {
    // A FIFO would block open(2): refuse anything but a regular file
    // first (a swap between this stat and the open is caught below, a FIFO
    // swapped in exactly then is the one case this does not catch).
    match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, e)),
        Ok(m) if !m.is_file() => return Err(SourceError::NotAFile(path.to_path_buf())),
        Ok(_) => {}
    }
    let file = match File::open(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        r => r.map_err(|e| io_error(path, e))?,
    };
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if !meta.is_file() {
        return Err(SourceError::NotAFile(path.to_path_buf()));
    }
    let version = version_of(&meta);
    check_len(meta.len())?;
    let cap = usize::try_from(meta.len()).unwrap_or(MAX_SOURCE_BYTES);
    let mut bytes = Vec::with_capacity(cap);
    let limit = u64::try_from(MAX_SOURCE_BYTES).unwrap_or(u64::MAX) + 1;
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    // The file grew while being read.
    check_len(u64::try_from(bytes.len()).unwrap_or(u64::MAX))?;
    Ok(Some((bytes, version)))
}

fn check_len(len: u64) -> Result<(), SourceError> {
    if len > u64::try_from(MAX_SOURCE_BYTES).unwrap_or(u64::MAX) {
        return Err(SourceError::TooLarge { len });
    }
    Ok(())
}

fn version_of(m: &std::fs::Metadata) -> FileVersion {
    FileVersion {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: nanos(m.mtime(), m.mtime_nsec()),
        ctime_ns: nanos(m.ctime(), m.ctime_nsec()),
    }
}

fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

fn write_blocking(
    path: &Path,
    bytes: &[u8],
    expected: Option<Option<Version>>,
) -> Result<Version, SourceError> {
    validate_path(path)?;
    super::check_size(bytes.len())?;
    if let Some(expected) = expected {
        let found = read_bounded(path)?.map(|(_, v)| Version::File(v));
        if found != expected {
            return Err(SourceError::Conflict { expected, found });
        }
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(SourceError::Config(format!(
            "rollout file {} must name a file",
            path.display()
        )));
    };
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), temp_suffix()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(|e| io_error(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io_error(&tmp, e))?;
        f.sync_all().map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(dir, e))
    })();
    if let Err(e) = result {
        // Best effort: the rename did not happen, so the temporary file
        // is ours to remove.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    Ok(Version::File(version_of(&meta)))
}

/// A unique enough suffix for a temporary name (`create_new` refuses a
/// collision anyway).
fn temp_suffix() -> String {
    let mut r = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r).is_err() {
        // No randomness: the pid and the clock still separate writers.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return format!("{}-{nanos}", std::process::id());
    }
    hex::encode(r)
}

async fn blocking<T, F>(f: F) -> Result<T, SourceError>
where
    F: FnOnce() -> Result<T, SourceError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SourceError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths_must_be_absolute_files() {
        assert!(validate_path(Path::new("/etc/vkx/rollout.json")).is_ok());
        assert!(validate_path(Path::new("rollout.json")).is_err());
        assert!(validate_path(Path::new("/")).is_err());
    }

    #[test]
    fn look_reads_once_and_skips_an_unchanged_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollout.json");
        assert!(matches!(look(&path, None), Look::Absent));
        std::fs::write(&path, b"one").unwrap();
        let Look::Read(bytes, v1) = look(&path, None) else {
            panic!()
        };
        assert_eq!(bytes, b"one");
        assert!(matches!(look(&path, Some(v1)), Look::Unchanged));
        // An atomic replace with the same length is a new identity.
        let v = write_blocking(&path, b"two", None).unwrap();
        let Look::Read(bytes, v2) = look(&path, Some(v1)) else {
            panic!()
        };
        assert_eq!(bytes, b"two");
        assert_ne!(v1, v2);
        assert_eq!(v, Version::File(v2));
    }

    #[test]
    fn oversize_and_non_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'x'; MAX_SOURCE_BYTES + 1]).unwrap();
        assert!(matches!(
            look(&path, None),
            Look::Failed(SourceError::TooLarge { .. })
        ));
        std::fs::write(&path, vec![b'x'; MAX_SOURCE_BYTES]).unwrap();
        assert!(matches!(look(&path, None), Look::Read(..)));
        assert!(matches!(
            look(dir.path(), None),
            Look::Failed(SourceError::NotAFile(_))
        ));
    }

    #[test]
    fn write_if_checks_the_version_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollout.json");
        let v1 = write_blocking(&path, b"a", Some(None)).unwrap();
        assert!(matches!(
            write_blocking(&path, b"b", Some(None)),
            Err(SourceError::Conflict { .. })
        ));
        let v2 = write_blocking(&path, b"b", Some(Some(v1))).unwrap();
        assert!(matches!(
            write_blocking(&path, b"c", Some(Some(v1))),
            Err(SourceError::Conflict { .. })
        ));
        write_blocking(&path, b"c", Some(Some(v2))).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"c");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left: {names:?}");
    }
}
