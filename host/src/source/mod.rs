//! Where the host reads the rollout document from: a file on the node or a
//! key in etcd. A source hands on opaque bytes; the document's format and
//! signature are checked elsewhere (the host verifies what it gets here
//! before acting on it).
//!
//! A running source publishes a [`SourceStatus`] on a
//! [`tokio::sync::watch`]: the latest value seen, its [`Version`], the
//! source's [`Health`] and when it was last known good. The rule is
//! fail-static: whatever fails (a read, a connection, a value over the
//! size limit), the last value stays published and only the health
//! changes. A missing file or key is a value (`None`), not a failure.
//!
//! What it trusts: the configuration (validated at load). What it does not
//! trust: the bytes and sizes it reads; every value is bounded by
//! [`MAX_SOURCE_BYTES`] before it is kept, and nothing logs a value, only
//! its length, version and a digest prefix.
//!
//! What it bounds: the bytes kept per value (one value, the latest); every
//! etcd call has a timeout; reconnects follow [`vkx_common::retry`]'s
//! full-jitter backoff with a cap and an attempt budget; log lines are
//! rate-limited and written on state changes, not per retry.
//!
//! - [`file`]: watch a path (the rollout file, the local override file),
//!   write it crash-safely.
//! - [`etcd`]: get, then watch from the next revision; resume after a
//!   disconnect, re-read after a compaction.

pub mod etcd;
pub mod file;
pub mod lease;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

pub use etcd::EtcdConfig;
pub use file::FILE_POLL_INTERVAL;

/// Largest document a source accepts (and `write` refuses to store): a
/// rollout document is a few KiB of rings and flags; 256 KiB leaves two
/// orders of magnitude of room while a bad generator that doubles its
/// output (Cloudflare, Nov 2025) is refused as an error, not loaded.
pub const MAX_SOURCE_BYTES: usize = 256 * 1024;

/// The default rollout file.
pub const DEFAULT_FILE: &str = "/etc/vkx/rollout.json";

/// Which kind of source the host reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A file on the node ([`SourceConfig::file`]); the default.
    #[default]
    File,
    /// A key in etcd ([`SourceConfig::etcd`]).
    Etcd,
}

/// `[rollout]`'s source keys:
///
/// ```toml
/// [rollout]
/// source = "file"            # or "etcd"
/// file = "/etc/vkx/rollout.json"
/// [rollout.etcd]
/// endpoints = ["http://127.0.0.1:2379"]
/// key = "/vkx/rollout/document"
/// ```
///
/// Deserializable on its own (tests, tools). A table that has other keys
/// too cannot `#[serde(flatten)]` it (serde ignores `deny_unknown_fields`
/// under flatten), so embed the three fields with the same attributes and
/// build this with [`SourceConfig::new`]:
///
/// ```ignore
/// #[serde(default)] source: SourceKind,
/// #[serde(default = "vkx_host::source::default_file")] file: PathBuf,
/// #[serde(default)] etcd: EtcdConfig,
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(default)]
    pub source: SourceKind,
    #[serde(default = "default_file")]
    pub file: PathBuf,
    #[serde(default)]
    pub etcd: EtcdConfig,
}

/// The suffix of the live-drill overlay's key or file
/// ([`SourceConfig::overlay`]).
pub const OVERLAY_SUFFIX: &str = ".drill";

/// [`DEFAULT_FILE`], for `#[serde(default = ...)]`.
pub fn default_file() -> PathBuf {
    PathBuf::from(DEFAULT_FILE)
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self::new(SourceKind::File, default_file(), EtcdConfig::default())
    }
}

impl SourceConfig {
    pub fn new(source: SourceKind, file: PathBuf, etcd: EtcdConfig) -> Self {
        Self { source, file, etcd }
    }

    /// Where the live-drill overlay sits beside the document
    /// (spec/ROLLOUT.md §14): the key or file name with
    /// [`OVERLAY_SUFFIX`].
    pub fn overlay(&self) -> SourceConfig {
        let mut c = self.clone();
        c.etcd.key.push_str(OVERLAY_SUFFIX);
        let mut file = c.file.into_os_string();
        file.push(OVERLAY_SUFFIX);
        c.file = file.into();
        c
    }

    /// Refuses settings the sources cannot run with. Only the settings of
    /// the selected kind are checked, so a node may keep an unused
    /// `[rollout.etcd]` table around.
    pub fn validate(&self) -> Result<(), SourceError> {
        match self.source {
            SourceKind::File => file::validate_path(&self.file),
            SourceKind::Etcd => self.etcd.validate(),
        }
    }
}

/// What identifies the value a source published, for comparisons and
/// compare-and-swap writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Nothing seen yet, or the file is absent.
    None,
    /// etcd: the key's `mod_revision`; for an absent key, the revision at
    /// which it was seen absent (its deletion, or the store's revision at
    /// the read). Only goes up.
    Etcd(i64),
    /// A file: identity and timestamps of the file read. An atomic replace
    /// (rename over the path) always gives a new inode while the old file
    /// is open; `ctime` changes on every write in place.
    File(FileVersion),
}

/// See [`Version::File`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileVersion {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    /// Nanoseconds since the epoch (saturating).
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// How a source is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not yet read once.
    Connecting,
    /// The value is current: the last look succeeded (file), or the watch
    /// is established (etcd).
    Healthy,
    /// The last look or connection failed since `since`; the published
    /// value is the last good one.
    Down { since: SystemTime, error: String },
}

/// What a source publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// The latest value read; `None` when the file or key is absent (or
    /// nothing was read yet: see `health`). Never over
    /// [`MAX_SOURCE_BYTES`].
    pub value: Option<Arc<[u8]>>,
    pub version: Version,
    pub health: Health,
    /// The last instant the source was known to serve `value`: set when
    /// it is read or confirmed, and when the source goes down (the last
    /// good instant before the failure). Not refreshed on every poll, so
    /// that an unchanged source wakes nobody; use
    /// [`SourceStatus::stale_for`].
    pub last_good: Option<SystemTime>,
}

impl Default for SourceStatus {
    fn default() -> Self {
        Self::connecting()
    }
}

impl SourceStatus {
    /// The status before the first read.
    pub fn connecting() -> Self {
        Self {
            value: None,
            version: Version::None,
            health: Health::Connecting,
            last_good: None,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.health == Health::Healthy
    }

    /// How long the value may have been out of date at `now`: zero while
    /// healthy, since the last good instant otherwise (`None` if the
    /// source was never good).
    pub fn stale_for(&self, now: SystemTime) -> Option<Duration> {
        match self.health {
            Health::Healthy => Some(Duration::ZERO),
            _ => self
                .last_good
                .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO)),
        }
    }

    /// The same value, now healthy, good as of `now`.
    fn healthy(&self, now: SystemTime) -> Self {
        Self {
            value: self.value.clone(),
            version: self.version,
            health: Health::Healthy,
            last_good: Some(now),
        }
    }

    /// The same value (fail-static), down since the first failure of this
    /// run of failures. `good_until` is the last instant the source was
    /// known good (for a healthy source: now).
    fn down(&self, now: SystemTime, error: &dyn std::fmt::Display) -> Self {
        let (since, last_good) = match &self.health {
            Health::Down { since, .. } => (*since, self.last_good),
            Health::Healthy => (now, Some(now)),
            Health::Connecting => (now, self.last_good),
        };
        Self {
            value: self.value.clone(),
            version: self.version,
            health: Health::Down {
                since,
                error: error.to_string(),
            },
            last_good,
        }
    }
}

/// Counters a source keeps for the metrics endpoint. Monotonic; read them
/// with [`SourceCounters::snapshot`].
#[derive(Debug, Default)]
pub struct SourceCounters {
    errors: AtomicU64,
    reconnects: AtomicU64,
    watch_restarts: AtomicU64,
    compaction_rereads: AtomicU64,
    changes: AtomicU64,
}

/// A copy of [`SourceCounters`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Failed looks, calls and refused values (over-size).
    pub errors: u64,
    /// etcd: connection attempts after a failure.
    pub reconnects: u64,
    /// etcd: established watches that broke and were resumed from the
    /// last revision + 1.
    pub watch_restarts: u64,
    /// etcd: watches cancelled by a compaction, followed by a fresh read.
    pub compaction_rereads: u64,
    /// New values published.
    pub changes: u64,
}

impl SourceCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            errors: self.errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            watch_restarts: self.watch_restarts.load(Ordering::Relaxed),
            compaction_rereads: self.compaction_rereads.load(Ordering::Relaxed),
            changes: self.changes.load(Ordering::Relaxed),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What went wrong with a source, by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// Local I/O on the rollout file or its directory.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path exists but is no regular file (a directory, a FIFO).
    #[error("{}: not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// A value over [`MAX_SOURCE_BYTES`] (read or about to be written).
    #[error("rollout document of {len} bytes is over the limit of {max} bytes", max = MAX_SOURCE_BYTES)]
    TooLarge { len: u64 },
    /// etcd refused a write because its backend is over its quota (the
    /// NOSPACE alarm): every write fails until an operator frees space.
    #[error(
        "etcd: database space exceeded (NOSPACE alarm): writes are refused, reads still work. \
         Free space: `etcdctl compact <current revision>`, `etcdctl defrag`, then \
         `etcdctl alarm disarm`; or raise etcd's --quota-backend-bytes. Enable \
         --auto-compaction-* so it does not recur"
    )]
    SpaceExceeded,
    /// A fenced write (etcd) found its fence key no longer under the
    /// writer's lease: its lock lapsed, and someone else may hold it.
    #[error("etcd key {key} is no longer held under this writer's lease: nothing written")]
    Fenced { key: String },
    /// A compare-and-swap write found another version than expected.
    #[error("the rollout document changed meanwhile: expected {expected:?}, found {found:?}")]
    Conflict {
        expected: Option<Version>,
        found: Option<Version>,
    },
    /// An etcd call did not finish in time.
    #[error("etcd: {what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// Any other etcd failure (transport, gRPC status, watch cancelled).
    #[error("etcd: {0}")]
    Etcd(String),
    /// A setting the sources cannot run with.
    #[error("rollout source configuration: {0}")]
    Config(String),
}

/// Runs the configured source until `stop` turns true (or every receiver
/// of `tx` is gone), publishing on `tx`. The caller creates the channel
/// with [`SourceStatus::connecting`].
pub async fn run(
    config: SourceConfig,
    tx: watch::Sender<SourceStatus>,
    counters: Arc<SourceCounters>,
    stop: watch::Receiver<bool>,
) {
    match config.source {
        SourceKind::File => {
            file::watch_file(config.file, FILE_POLL_INTERVAL, tx, counters, stop).await;
        }
        SourceKind::Etcd => etcd::watch_etcd(config.etcd, tx, counters, stop).await,
    }
}

/// Stores `bytes` as the document (`vkx-host rollout push`): the file is
/// replaced crash-safely; etcd gets a put.
pub async fn write(config: &SourceConfig, bytes: &[u8]) -> Result<Version, SourceError> {
    check_size(bytes.len())?;
    match config.source {
        SourceKind::File => file::write(&config.file, bytes, None).await,
        SourceKind::Etcd => etcd::write(&config.etcd, bytes, None).await,
    }
}

/// Like [`write`], only if the stored document is still at `expected`
/// (`None`: only if there is none). Atomic on etcd (a transaction on the
/// key's `mod_revision`); on a file, the check and the rename are two
/// steps (good enough for one operator on one node, not a lock).
pub async fn write_if(
    config: &SourceConfig,
    bytes: &[u8],
    expected: Option<Version>,
) -> Result<Version, SourceError> {
    check_size(bytes.len())?;
    match config.source {
        SourceKind::File => file::write(&config.file, bytes, Some(expected)).await,
        SourceKind::Etcd => etcd::write(&config.etcd, bytes, Some(expected)).await,
    }
}

/// A lock a write depends on: the etcd key `key`, held under lease
/// `lease` ([`write_fenced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub lease: i64,
}

/// Like [`write_if`], and on etcd only while `fence` still holds: the
/// compare-and-swap and the check of the fence key's lease are one
/// transaction, so a writer whose lock lapsed (a paused process, a long
/// outage) cannot write over its successor ([`SourceError::Fenced`]).
/// The file source's lock is not a lease; `fence` is ignored there.
pub async fn write_fenced(
    config: &SourceConfig,
    bytes: &[u8],
    expected: Option<Version>,
    fence: Option<&Fence>,
) -> Result<Version, SourceError> {
    check_size(bytes.len())?;
    match config.source {
        SourceKind::File => file::write(&config.file, bytes, Some(expected)).await,
        SourceKind::Etcd => etcd::write_fenced(&config.etcd, bytes, Some(expected), fence).await,
    }
}

/// Reads the stored document once (`vkx-host rollout show`); `None` if
/// there is none.
pub async fn read(config: &SourceConfig) -> Result<Option<(Vec<u8>, Version)>, SourceError> {
    match config.source {
        SourceKind::File => file::read(&config.file).await,
        SourceKind::Etcd => etcd::read(&config.etcd).await,
    }
}

fn check_size(len: usize) -> Result<(), SourceError> {
    if len > MAX_SOURCE_BYTES {
        return Err(SourceError::TooLarge {
            len: u64::try_from(len).unwrap_or(u64::MAX),
        });
    }
    Ok(())
}

/// A short digest of a value for logs: the first 8 bytes of its SHA-256,
/// in hex. Logs never carry the value itself.
pub fn digest_prefix(value: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, value);
    hex::encode(&d.as_ref()[..8])
}

fn io_error(path: &Path, source: std::io::Error) -> SourceError {
    SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_defaults_are_the_file_source() {
        let c: SourceConfig = toml::from_str("").unwrap();
        assert_eq!(c, SourceConfig::default());
        assert_eq!(c.source, SourceKind::File);
        assert_eq!(c.file, PathBuf::from(DEFAULT_FILE));
        c.validate().unwrap();
    }

    #[test]
    fn config_parses_the_documented_example_and_refuses_typos() {
        let c: SourceConfig = toml::from_str(
            "source = \"etcd\"\nfile = \"/etc/vkx/rollout.json\"\n[etcd]\n\
             endpoints = [\"http://127.0.0.1:2379\"]\nkey = \"/vkx/rollout/document\"\n",
        )
        .unwrap();
        assert_eq!(c.source, SourceKind::Etcd);
        assert_eq!(c.etcd.key, "/vkx/rollout/document");
        c.validate().unwrap();
        assert!(toml::from_str::<SourceConfig>("sorce = \"etcd\"\n").is_err());
        assert!(toml::from_str::<SourceConfig>("source = \"http\"\n").is_err());
        assert!(toml::from_str::<SourceConfig>("[etcd]\nendpoint = []\n").is_err());
    }

    #[test]
    fn only_the_selected_kind_is_validated() {
        let mut c = SourceConfig::default();
        c.etcd.endpoints.clear();
        c.validate().unwrap();
        c.source = SourceKind::Etcd;
        assert!(matches!(c.validate(), Err(SourceError::Config(_))));
        c.source = SourceKind::File;
        c.file = PathBuf::from("relative/rollout.json");
        assert!(c.validate().is_err());
    }

    #[test]
    fn down_keeps_the_value_and_the_first_failure_time() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let ok = SourceStatus {
            value: Some(Arc::from(&b"doc"[..])),
            version: Version::Etcd(7),
            health: Health::Healthy,
            last_good: Some(t0),
        };
        let e = SourceError::Etcd("gone".into());
        let d1 = ok.down(t0 + Duration::from_secs(5), &e);
        assert_eq!(d1.value, ok.value);
        assert_eq!(d1.version, Version::Etcd(7));
        assert_eq!(d1.last_good, Some(t0 + Duration::from_secs(5)));
        // A second failure changes nothing: nobody is woken.
        let d2 = d1.down(t0 + Duration::from_secs(9), &e);
        assert_eq!(d1, d2);
        assert_eq!(
            d2.stale_for(t0 + Duration::from_secs(15)),
            Some(Duration::from_secs(10))
        );
        let back = d2.healthy(t0 + Duration::from_secs(20));
        assert_eq!(back.stale_for(t0), Some(Duration::ZERO));
        assert_eq!(back.value, ok.value);
        // Never good: no staleness to report.
        let never = SourceStatus::connecting().down(t0, &e);
        assert_eq!(never.stale_for(t0), None);
    }

    #[test]
    fn writes_over_the_limit_are_refused_before_any_io() {
        assert!(check_size(MAX_SOURCE_BYTES).is_ok());
        assert!(matches!(
            check_size(MAX_SOURCE_BYTES + 1),
            Err(SourceError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_digest_prefix_is_short_and_stable() {
        assert_eq!(digest_prefix(b""), "e3b0c44298fc1c14");
    }
}
