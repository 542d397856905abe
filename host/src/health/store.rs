//! Where the health summaries go and come from: the `[rollout]` health
//! settings checked ([`HealthSettings`]), the publisher task ([`publish`])
//! and the reader of the fleet's summaries ([`read_all`]).
//!
//! The store is an etcd key per node (`<prefix>/<node>`) under a lease of
//! [`LEASE_INTERVALS`] × the interval, kept alive, so a dead node's entry
//! expires; or, with the file source (or none), the local file
//! `<node_dir>/rollout/health.json`, replaced atomically, and a directory
//! of collected summaries beside it.
//!
//! What it trusts: nothing it reads. Every entry is parsed strictly
//! ([`HealthSummary::parse`]) and an etcd entry's node must match its
//! key; what is refused is counted, for the controller to treat as
//! missing data.
//!
//! What it bounds: the publisher's rate ([`MIN_INTERVAL`]..
//! [`MAX_INTERVAL`]) and retries (the etcd source's retry policy), the
//! prefix ([`MAX_PREFIX_BYTES`]), the summaries and bytes one read takes
//! ([`MAX_FLEET_SUMMARIES`], [`MAX_FLEET_BYTES`]) and each summary's
//! bytes, checked before parsing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use vkx_common::{rl_info, rl_warn};

use super::{Health, add, unix};
use crate::rollout::View;
use crate::rollout::summary::{HealthSummary, MAX_SUMMARY_BYTES};
use crate::source::{EtcdConfig, SourceKind};

/// Summaries one [`read_all`] returns: a fleet store holds one per node.
pub const MAX_FLEET_SUMMARIES: usize = 4096;
/// Bytes of summaries one read of the fleet takes in all: past it the
/// read fails (missing data, never a pass) instead of parsing a flood a
/// hostile writer under the prefix could put there.
pub const MAX_FLEET_BYTES: usize = 64 * 1024 * 1024;
/// Summaries fetched from etcd per range request.
const ETCD_PAGE: usize = 64;
/// The publisher's interval: default, and bounds (below 500 ms the
/// store's write load grows for no better signal; above a minute a dead
/// node lingers too long).
pub const DEFAULT_INTERVAL_MS: u64 = 2000;
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// The lease's TTL in publishing intervals: two publishes may fail before
/// the entry expires.
pub const LEASE_INTERVALS: u32 = 3;
/// Shortest lease TTL etcd grants (its minimum is 1.5 × the election
/// timeout, rounded up: 2 s with the defaults).
pub const MIN_LEASE_TTL_S: i64 = 2;
/// Where the summaries live in etcd, one key per node below it.
pub const DEFAULT_PREFIX: &str = "/vkx/health";
/// The local summary file, in the node's rollout state directory.
pub const HEALTH_FILE: &str = "health.json";
/// Longest prefix accepted.
pub const MAX_PREFIX_BYTES: usize = 512;

// ------------------------------------------------------------ settings

/// Where the summaries go and come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthStore {
    /// One key per node, `<prefix>/<node>`, under a lease.
    Etcd { config: EtcdConfig, prefix: String },
    /// The node's own file; a reader may also read a directory of
    /// collected `*.json` summaries.
    File { file: PathBuf, dir: Option<PathBuf> },
}

/// The `[rollout]` health settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    pub store: HealthStore,
}

impl HealthSettings {
    /// From `[rollout] health_interval_ms` and `health_prefix`, the
    /// source kind and the node's rollout state directory.
    pub fn new(
        interval_ms: u64,
        prefix: &str,
        source: Option<(SourceKind, &EtcdConfig)>,
        state_dir: &Path,
    ) -> Result<Self, String> {
        let interval = Duration::from_millis(interval_ms);
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
            return Err(format!(
                "health_interval_ms: {} to {}",
                MIN_INTERVAL.as_millis(),
                MAX_INTERVAL.as_millis()
            ));
        }
        check_prefix(prefix)?;
        let store = match source {
            Some((SourceKind::Etcd, etcd)) => HealthStore::Etcd {
                config: etcd.clone(),
                prefix: prefix.trim_end_matches('/').to_owned(),
            },
            _ => HealthStore::File {
                file: state_dir.join(HEALTH_FILE),
                dir: None,
            },
        };
        Ok(Self { interval, store })
    }

    /// With the file store: also read the collected summaries in `dir`
    /// (`[rollout] health_dir`). An error with the etcd store, where every
    /// node publishes to the store itself.
    pub fn with_collected(mut self, dir: Option<PathBuf>) -> Result<Self, String> {
        let Some(d) = dir else { return Ok(self) };
        match &mut self.store {
            HealthStore::File { dir, .. } => {
                *dir = Some(d);
                Ok(self)
            }
            HealthStore::Etcd { .. } => Err(
                "health_dir is for the file source; with etcd every node publishes to the store"
                    .into(),
            ),
        }
    }

    /// The lease TTL: [`LEASE_INTERVALS`] intervals, whole seconds, at
    /// least [`MIN_LEASE_TTL_S`].
    pub fn lease_ttl_s(&self) -> i64 {
        let ms = self
            .interval
            .as_millis()
            .saturating_mul(u128::from(LEASE_INTERVALS));
        i64::try_from(ms.div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(MIN_LEASE_TTL_S)
    }
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/')
        || prefix.len() > MAX_PREFIX_BYTES
        || prefix.trim_end_matches('/').is_empty()
        || prefix.chars().any(char::is_control)
    {
        return Err(format!(
            "health_prefix: an absolute key path of at most {MAX_PREFIX_BYTES} bytes, like {DEFAULT_PREFIX:?}"
        ));
    }
    Ok(())
}

/// The etcd key of `node`'s summary.
pub fn etcd_key(prefix: &str, node: &str) -> String {
    format!("{}/{node}", prefix.trim_end_matches('/'))
}

// ----------------------------------------------------------- publisher

/// Publishes this node's summary every `settings.interval` until `stop`
/// (see the module primer). Fail-static: a failed write is counted, logged
/// (once per change of state, rate-limited besides) and retried at the
/// next tick, or later under the etcd retry policy.
pub async fn publish(
    health: Arc<Health>,
    settings: HealthSettings,
    view: watch::Receiver<Arc<View>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sink = match &settings.store {
        HealthStore::Etcd { config, prefix } => Sink::Etcd(Box::new(etcd::Publisher::new(
            config.clone(),
            etcd_key(prefix, &view.borrow().node),
            settings.lease_ttl_s(),
        ))),
        HealthStore::File { file, .. } => Sink::File(file.clone()),
    };
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // One iteration per interval until shutdown; each write is bounded
    // by the etcd timeouts or the blocking file write.
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let v = view.borrow().clone();
        if let Some(doc) = v.document() {
            health.track(doc);
        }
        let summary = health.summary(
            &v.node,
            v.revision(),
            unix(SystemTime::now()),
            vkx_common::ratelimit::suppressed_total(),
        );
        let result = match summary.to_json() {
            Ok(bytes) => sink.write(bytes).await,
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                add(&health.published);
                if failing {
                    rl_info!("health summary published again");
                }
                failing = false;
            }
            Err(e) => {
                add(&health.publish_failed);
                if !failing {
                    rl_warn!(error = %e, "health summary not published; retrying");
                }
                failing = true;
            }
        }
    }
    if let Sink::Etcd(p) = &mut sink {
        p.close().await;
    }
}

enum Sink {
    Etcd(Box<etcd::Publisher>),
    File(PathBuf),
}

impl Sink {
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        match self {
            Sink::Etcd(p) => p.put(bytes).await,
            Sink::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || write_file(&path, &bytes))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Replaces `path` atomically (a temporary file beside it, renamed).
pub(super) fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{HEALTH_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

// -------------------------------------------------------------- reader

/// What [`read_all`] found: the summaries that parsed, and how many
/// entries were refused (malformed, over-size, a key that does not name
/// its node): a controller should treat those as missing data.
#[derive(Debug, Default)]
pub struct Fleet {
    pub summaries: Vec<HealthSummary>,
    pub refused: usize,
}

/// Reads every node's summary from `store` (at most
/// [`MAX_FLEET_SUMMARIES`]).
pub async fn read_all(store: &HealthStore) -> Result<Fleet, String> {
    match store {
        HealthStore::Etcd { config, prefix } => etcd::read_all(config, prefix).await,
        HealthStore::File { file, dir } => {
            let (file, dir) = (file.clone(), dir.clone());
            tokio::task::spawn_blocking(move || read_files(&file, dir.as_deref()))
                .await
                .map_err(|e| e.to_string())?
        }
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let f = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    f.take(u64::try_from(MAX_SUMMARY_BYTES).unwrap_or(u64::MAX) + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

pub(super) fn read_files(file: &Path, dir: Option<&Path>) -> Result<Fleet, String> {
    let mut fleet = Fleet::default();
    let take = |bytes: &[u8], fleet: &mut Fleet| match HealthSummary::parse(bytes) {
        Ok(s) => fleet.summaries.push(s),
        Err(_) => fleet.refused += 1,
    };
    match read_bounded(file) {
        Ok(b) => take(&b, &mut fleet),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", file.display())),
    }
    if let Some(dir) = dir {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten().take(MAX_FLEET_SUMMARIES) {
            let p = entry.path();
            if p.extension().is_some_and(|x| x == "json") && p != file {
                match read_bounded(&p) {
                    Ok(b) => take(&b, &mut fleet),
                    Err(_) => fleet.refused += 1,
                }
            }
        }
    }
    dedupe(&mut fleet);
    Ok(fleet)
}

/// One summary per node: a node's file and a collected copy of it (or a
/// stale second file) would count it twice. The newest is kept; the
/// others count as refused.
fn dedupe(fleet: &mut Fleet) {
    let mut newest: BTreeMap<String, HealthSummary> = BTreeMap::new();
    for s in std::mem::take(&mut fleet.summaries) {
        match newest.get(&s.node) {
            Some(kept) if kept.at_unix >= s.at_unix => fleet.refused += 1,
            Some(_) => {
                fleet.refused += 1;
                newest.insert(s.node.clone(), s);
            }
            None => {
                newest.insert(s.node.clone(), s);
            }
        }
    }
    fleet.summaries = newest.into_values().collect();
}

mod etcd {
    //! The etcd side: a lease per publisher connection, kept alive at
    //! every put; the reader's paged prefix get.

    use etcd_client::{Client, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
    use vkx_common::retry::{Failure, RetryPolicy};

    use super::{
        ETCD_PAGE, Fleet, HealthSummary, MAX_FLEET_BYTES, MAX_FLEET_SUMMARIES, MAX_SUMMARY_BYTES,
    };
    use crate::source::EtcdConfig;

    /// gRPC decoding limit of one page of summaries.
    const PAGE_DECODE_LIMIT: usize = ETCD_PAGE * MAX_SUMMARY_BYTES + 64 * 1024;

    struct Live {
        client: Client,
        lease: i64,
        keeper: LeaseKeeper,
        acks: LeaseKeepAliveStream,
    }

    pub(super) struct Publisher {
        config: EtcdConfig,
        key: String,
        ttl_s: i64,
        live: Option<Live>,
        policy: RetryPolicy,
    }

    impl Publisher {
        pub(super) fn new(config: EtcdConfig, key: String, ttl_s: i64) -> Self {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()))
                ^ (u64::from(std::process::id()) << 32);
            let policy = RetryPolicy::new(config.retry_config(), seed);
            Self {
                config,
                key,
                ttl_s,
                live: None,
                policy,
            }
        }

        /// One put of `bytes` under the lease (granted first if there is
        /// none), and one keep-alive of it. Without a connection, an
        /// attempt is made only when the retry policy allows one.
        pub(super) async fn put(&mut self, bytes: Vec<u8>) -> Result<(), String> {
            let now = std::time::Instant::now();
            if self.live.is_none() {
                if self.policy.next_attempt(now).instant() > now || !self.policy.attempt(now) {
                    return Err("etcd: waiting to reconnect".into());
                }
                match self.connect().await {
                    Ok(l) => self.live = Some(l),
                    Err(e) => {
                        self.policy.failed(now, Failure::Transport);
                        return Err(e);
                    }
                }
            }
            match self.put_live(bytes).await {
                Ok(()) => {
                    self.policy.succeeded();
                    Ok(())
                }
                Err(e) => {
                    // A new connection and lease next time.
                    self.live = None;
                    self.policy.lost(now, Failure::Transport);
                    Err(e)
                }
            }
        }

        async fn connect(&self) -> Result<Live, String> {
            let t = self.config.timeout();
            let mut client = timed(t, Client::connect(&self.config.endpoints, None)).await?;
            let grant = timed(t, client.lease_grant(self.ttl_s, None)).await?;
            let lease = grant.id();
            let (keeper, acks) = timed(t, client.lease_keep_alive(lease)).await?;
            Ok(Live {
                client,
                lease,
                keeper,
                acks,
            })
        }

        async fn put_live(&mut self, bytes: Vec<u8>) -> Result<(), String> {
            let t = self.config.timeout();
            let Some(l) = &mut self.live else {
                return Err("etcd: not connected".into());
            };
            timed(t, async { l.keeper.keep_alive().await }).await?;
            match timed(t, async { l.acks.message().await }).await? {
                Some(r) if r.ttl() > 0 => {}
                Some(_) => return Err("etcd: the health lease expired".into()),
                None => return Err("etcd: lease keep-alive stream ended".into()),
            }
            let opts = PutOptions::new().with_lease(l.lease);
            timed(t, l.client.put(self.key.as_bytes(), bytes, Some(opts))).await?;
            Ok(())
        }

        /// At shutdown: revoke the lease, so the entry goes at once (an
        /// orderly stop is not a dead node).
        pub(super) async fn close(&mut self) {
            if let Some(mut l) = self.live.take() {
                let _ = timed(self.config.timeout(), l.client.lease_revoke(l.lease)).await;
            }
        }
    }

    async fn timed<T>(
        after: std::time::Duration,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(after, call).await {
            Ok(r) => r.map_err(|e| format!("etcd: {e}")),
            Err(_) => Err(format!("etcd: timed out after {after:?}")),
        }
    }

    /// Every `<prefix>/<node>` key, page by page, each value parsed
    /// strictly and its node checked against its key.
    pub(super) async fn read_all(config: &EtcdConfig, prefix: &str) -> Result<Fleet, String> {
        let t = config.timeout();
        let client = timed(t, Client::connect(&config.endpoints, None)).await?;
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(PAGE_DECODE_LIMIT);
        let dir = format!("{}/", prefix.trim_end_matches('/'));
        let mut range_end = dir.clone().into_bytes();
        if let Some(last) = range_end.last_mut() {
            *last += 1; // '/' + 1 = '0': the end of the prefix's range
        }
        let mut from = dir.clone().into_bytes();
        let mut fleet = Fleet::default();
        let page = i64::try_from(ETCD_PAGE).unwrap_or(64);
        let mut bytes = 0usize;
        // Bounded: at most MAX_FLEET_SUMMARIES / ETCD_PAGE + 1 pages.
        for _ in 0..=MAX_FLEET_SUMMARIES / ETCD_PAGE {
            let opts = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(page);
            let resp = timed(t, kv.get(from.clone(), Some(opts))).await?;
            for item in resp.kvs() {
                bytes = bytes.saturating_add(item.value().len());
                if bytes > MAX_FLEET_BYTES {
                    return Err(format!(
                        "the health summaries under {prefix} exceed {MAX_FLEET_BYTES} bytes"
                    ));
                }
                let node = item.key().strip_prefix(dir.as_bytes()).unwrap_or_default();
                match HealthSummary::parse(item.value()) {
                    Ok(s) if s.node.as_bytes() == node => fleet.summaries.push(s),
                    _ => fleet.refused += 1,
                }
                if fleet.summaries.len() + fleet.refused >= MAX_FLEET_SUMMARIES {
                    return Ok(fleet);
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(fleet)
    }
}
