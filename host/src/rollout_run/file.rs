//! The file lock (O_EXCL, owner's pid and start time; a stale one is
//! taken over under an advisory lock of a guard file) and the record
//! (replaced atomically).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::RunError;
use crate::rollout::controller::{MAX_PROGRESS_BYTES, Progress};

pub(super) struct FileStore {
    lock: PathBuf,
    record: PathBuf,
    token: String,
}

/// This process's start time in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`): with the pid, it names one process for good.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the lock file's owner still runs.
fn alive(token: &str) -> bool {
    let mut parts = token.split_whitespace();
    let (Some(pid), Some(start)) = (
        parts.next().and_then(|p| p.parse::<u32>().ok()),
        parts.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return false;
    };
    start_time(pid) == Some(start)
}

impl FileStore {
    pub(super) fn acquire(dir: &Path, feature: &str) -> Result<Self, RunError> {
        let io = |e: std::io::Error, p: &Path| RunError::Store(format!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
        let lock = dir.join(format!("controller-{feature}.lock"));
        let record = dir.join(format!("controller-{feature}.json"));
        let pid = std::process::id();
        let token = format!(
            "{pid} {} {}\n",
            start_time(pid).unwrap_or(0),
            super::holder()
        );
        // The check for a stale lock, its removal and the creation of
        // ours are one critical section under an advisory lock of a
        // guard file beside it: two controllers that both find the
        // same stale lock cannot both take it (the second then finds
        // the first's, alive). Held for a few file operations; the
        // kernel drops it if this process dies.
        let guard_path = dir.join(format!("controller-{feature}.lock.guard"));
        let guard = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&guard_path)
            .map_err(|e| io(e, &guard_path))?;
        guard.lock().map_err(|e| io(e, &guard_path))?;
        // Two tries: the second after removing a stale lock.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut f) => {
                    f.write_all(token.as_bytes()).map_err(|e| io(e, &lock))?;
                    f.sync_all().map_err(|e| io(e, &lock))?;
                    return Ok(Self {
                        lock,
                        record,
                        token,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let held = std::fs::read_to_string(&lock).unwrap_or_default();
                    if alive(&held) {
                        return Err(RunError::LockHeld {
                            feature: feature.to_owned(),
                            holder: format!(
                                "{} ({})",
                                crate::rollout::shown(held.trim()),
                                lock.display()
                            ),
                        });
                    }
                    vkx_common::rl_warn!(
                        lock = %lock.display(),
                        held = %crate::rollout::shown(held.trim()),
                        "removing a stale controller lock"
                    );
                    std::fs::remove_file(&lock).map_err(|e| io(e, &lock))?;
                }
                Err(e) => return Err(io(e, &lock)),
            }
        }
        Err(RunError::LockHeld {
            feature: feature.to_owned(),
            holder: format!("taken again meanwhile ({})", lock.display()),
        })
    }

    pub(super) fn load(&self) -> Result<Option<Progress>, RunError> {
        use std::io::Read as _;
        let f = match std::fs::File::open(&self.record) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(RunError::Store(format!("{}: {e}", self.record.display())));
            }
        };
        let mut bytes = Vec::new();
        f.take(u64::try_from(MAX_PROGRESS_BYTES).unwrap_or(u64::MAX) + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| RunError::Store(format!("{}: {e}", self.record.display())))?;
        Ok(Some(Progress::parse(&bytes)?))
    }

    pub(super) fn save(&self, p: &Progress) -> Result<(), RunError> {
        self.check_alive()?;
        let io = |e: std::io::Error| RunError::Store(format!("{}: {e}", self.record.display()));
        let tmp = self.record.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&p.to_json()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.record).map_err(io)?;
        if let Some(dir) = self.record.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// The lock file still holds this controller's token.
    pub(super) fn check_alive(&self) -> Result<(), RunError> {
        match std::fs::read_to_string(&self.lock) {
            Ok(t) if t == self.token => Ok(()),
            _ => Err(RunError::LockLost(format!(
                "{} no longer names this process",
                self.lock.display()
            ))),
        }
    }

    pub(super) fn release(self) {
        if self.check_alive().is_ok() {
            let _ = std::fs::remove_file(&self.lock);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn controllers_racing_for_one_stale_lock_take_it_once() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let lock = dir.path().join("controller-key-release.lock");
            std::fs::write(&lock, "999999999 1 gone\n").unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let won: Vec<bool> = (0..8)
                .map(|_| {
                    let (d, b) = (dir.path().to_path_buf(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        // Held (not released) until every thread is
                        // done, so a winner's lock stays alive.
                        FileStore::acquire(&d, "key-release")
                            .map(std::mem::forget)
                            .is_ok()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        }
    }

    #[test]
    fn a_live_lock_refuses_a_stale_one_gives_way() {
        let dir = tempfile::tempdir().unwrap();
        let first = FileStore::acquire(dir.path(), "key-release").unwrap();
        assert!(matches!(
            FileStore::acquire(dir.path(), "key-release"),
            Err(RunError::LockHeld { .. })
        ));
        // Another feature has its own lock.
        let other = FileStore::acquire(dir.path(), "key-rotation").unwrap();
        other.release();
        first.release();
        assert!(!dir.path().join("controller-key-release.lock").exists());
        // A lock of a process that is gone (pid 0 never runs a
        // program; a wrong start time is a reused pid).
        let lock = dir.path().join("controller-key-release.lock");
        std::fs::write(&lock, "999999999 1 gone\n").unwrap();
        let me = std::process::id();
        let s = FileStore::acquire(dir.path(), "key-release").unwrap();
        s.release();
        std::fs::write(&lock, format!("{me} 1 reused pid\n")).unwrap();
        let s = FileStore::acquire(dir.path(), "key-release").unwrap();
        // The record round-trips.
        let plan = crate::rollout::plan::Plan::parse(
            b"format = 1\nfeature = \"key-release\"\nrings = [\"a\"]\nbake_s = 1\n\
              [[gate]]\nmetric = \"errors\"\nmax = 1\n",
        )
        .unwrap();
        assert_eq!(s.load().unwrap(), None);
        let p = Progress::new(&plan);
        s.save(&p).unwrap();
        assert_eq!(s.load().unwrap(), Some(p));
        // Someone else's lock in its place: no more saves.
        std::fs::write(&lock, "1 1 someone\n").unwrap();
        assert!(matches!(
            s.save(&Progress::new(&plan)),
            Err(RunError::LockLost(_))
        ));
        s.release();
        assert!(lock.exists(), "never removes another's lock");
    }
}
