//! A key in etcd as a rollout source, with the maintained `etcd-client`
//! crate (gRPC).
//!
//! The loop (etcd's client does not re-establish watches itself):
//! 1. connect, `get` the key, publish it; remember the store revision;
//! 2. watch the key from `last revision + 1`: each event is applied in
//!    revision order and never goes back in time;
//! 3. the watch breaks (etcd stopped, connection reset, stream ended,
//!    cancelled): the source is `Down`, the last value stays published; it
//!    reconnects under the retry policy and resumes the watch from
//!    `last revision + 1`, so no event is lost;
//! 4. the watch is cancelled by a compaction (`compact_revision() > 0`):
//!    the revisions it missed are gone, so back to step 1 (a fresh get).
//!
//! What it trusts: the configured endpoints to be etcd. What it does not
//! trust: values (size-checked against [`MAX_SOURCE_BYTES`](super::MAX_SOURCE_BYTES); a value over
//! it is refused, the previous one kept and the source reported `Down`
//! until a good value arrives) and message sizes (gRPC decoding limits
//! below).
//!
//! What it bounds: every connect, get, put and watch creation has the
//! configured timeout; a live watch may be idle for hours, so its liveness
//! comes from HTTP/2 keepalive pings instead. Reconnects are spaced by
//! [`vkx_common::retry::RetryPolicy`] (full-jitter backoff with a cap, an
//! attempt budget per window, the first reconnect after a lost watch
//! spread so a fleet's hosts do not return in one burst). The loop itself
//! has no end while the host runs: a fail-static source keeps trying at
//! the capped rate for as long as it is needed, and its logs are written
//! on state changes only (rate-limited besides).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions, WatchStream,
};
use serde::Deserialize;
use tokio::sync::watch;
use vkx_common::retry::{Failure, RetryConfig, RetryPolicy};
use vkx_common::{rl_info, rl_warn};

use super::{Health, SourceCounters, SourceError, SourceStatus, Version, digest_prefix};
use crate::publish::publish_if_changed;

/// Most endpoints a configuration may list (a cluster has 3 to 7).
pub const MAX_ENDPOINTS: usize = 16;
/// Longest key accepted (etcd allows more; a rollout key is a short path).
pub const MAX_KEY_BYTES: usize = 1024;
/// Bounds of the per-call timeout: below 100 ms a loaded etcd times out
/// spuriously; above a minute a hung call hides an outage.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds of the reconnect backoff cap.
pub const MIN_BACKOFF_CAP: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF_CAP: Duration = Duration::from_secs(300);
/// First reconnect backoff ceiling; doubles per failure up to the cap.
pub const RECONNECT_BASE: Duration = Duration::from_millis(250);
/// Shortest wait between two attempts.
pub const RECONNECT_FLOOR: Duration = Duration::from_millis(100);
/// Attempts allowed per [`RECONNECT_WINDOW`] before the policy only
/// re-probes once per cap (plus jitter). With the default 10-s cap the
/// backoff alone makes ~120 attempts per window; the budget is the bound
/// if the cap is configured low.
pub const RECONNECT_BUDGET: u32 = 200;
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(600);
/// HTTP/2 keepalive on the watch connection: a silent peer (a partition,
/// a frozen etcd) breaks the watch within interval + timeout. etcd drops
/// clients that ping more often than every 5 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// gRPC decoding limit of a get: etcd's largest request (1.5 MiB by
/// default) plus framing. A value over [`MAX_SOURCE_BYTES`](super::MAX_SOURCE_BYTES) but under this
/// is refused by name; above it, by the decoder.
pub const GET_DECODE_LIMIT: usize = 2 * 1024 * 1024;
/// gRPC decoding limit of one watch response. A resumed watch can batch
/// several revisions into one response; one larger than this breaks the
/// watch, and the source re-reads the key instead of replaying the
/// history.
pub const WATCH_DECODE_LIMIT: usize = 4 * 1024 * 1024;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
pub const DEFAULT_KEY: &str = "/vkx/rollout/document";
const DEFAULT_TIMEOUT_MS: u64 = 2000;
const DEFAULT_BACKOFF_CAP_MS: u64 = 10_000;
const DEFAULT_RECONNECT_SPREAD_MS: u64 = 2000;

/// `[rollout.etcd]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://host:port` URLs (plain gRPC; TLS is not built in).
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    #[serde(default = "default_key")]
    pub key: String,
    /// Timeout of each connect, get, put and watch creation.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest wait between two reconnect attempts.
    #[serde(default = "default_backoff_cap_ms")]
    pub backoff_cap_ms: u64,
    /// The first reconnect after a lost watch waits up to this long: the
    /// hosts of a fleet that all lose etcd at once come back spread out.
    #[serde(default = "default_reconnect_spread_ms")]
    pub reconnect_spread_ms: u64,
}

fn default_endpoints() -> Vec<String> {
    vec![DEFAULT_ENDPOINT.to_owned()]
}
fn default_key() -> String {
    DEFAULT_KEY.to_owned()
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_backoff_cap_ms() -> u64 {
    DEFAULT_BACKOFF_CAP_MS
}
fn default_reconnect_spread_ms() -> u64 {
    DEFAULT_RECONNECT_SPREAD_MS
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: default_endpoints(),
            key: default_key(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            backoff_cap_ms: DEFAULT_BACKOFF_CAP_MS,
            reconnect_spread_ms: DEFAULT_RECONNECT_SPREAD_MS,
        }
    }
}

impl EtcdConfig {
    pub fn validate(&self) -> Result<(), SourceError> {
        let bad = |m: String| Err(SourceError::Config(m));
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return bad(format!("etcd.endpoints: 1 to {MAX_ENDPOINTS} URLs"));
        }
        for e in &self.endpoints {
            let Some(rest) = e.strip_prefix("http://") else {
                return bad(format!(
                    "etcd.endpoints: {e:?} must be an http:// URL (TLS is not supported yet)"
                ));
            };
            if rest.is_empty() || rest.contains('/') {
                return bad(format!("etcd.endpoints: {e:?} must be http://host:port"));
            }
        }
        if self.key.is_empty() || self.key.len() > MAX_KEY_BYTES {
            return bad(format!("etcd.key: 1 to {MAX_KEY_BYTES} bytes"));
        }
        let timeout = self.timeout();
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
            return bad(format!(
                "etcd.timeout_ms: {} to {}",
                MIN_TIMEOUT.as_millis(),
                MAX_TIMEOUT.as_millis()
            ));
        }
        let cap = Duration::from_millis(self.backoff_cap_ms);
        if !(MIN_BACKOFF_CAP..=MAX_BACKOFF_CAP).contains(&cap) {
            return bad(format!(
                "etcd.backoff_cap_ms: {} to {}",
                MIN_BACKOFF_CAP.as_millis(),
                MAX_BACKOFF_CAP.as_millis()
            ));
        }
        if self.reconnect_spread_ms > self.backoff_cap_ms {
            return bad("etcd.reconnect_spread_ms must not exceed backoff_cap_ms".into());
        }
        self.retry_config()
            .validate()
            .map_err(|e| SourceError::Config(format!("etcd reconnect policy: {e}")))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The reconnect policy: the project's retry policy with this source's
    /// base, cap and spread. A spent budget and a permanent failure both
    /// lead to re-probes once per cap, never to giving up.
    pub fn retry_config(&self) -> RetryConfig {
        let cap = Duration::from_millis(self.backoff_cap_ms);
        RetryConfig {
            base: RECONNECT_BASE,
            cap,
            floor: RECONNECT_FLOOR,
            budget: RECONNECT_BUDGET,
            window: RECONNECT_WINDOW,
            reprobe_interval: cap,
            reprobe_jitter: cap,
            default_retry_after: cap,
            max_retry_after: cap,
            reconnect_spread: Duration::from_millis(self.reconnect_spread_ms),
        }
    }
}

/// Watches the key and publishes it on `tx` until `stop` turns true or
/// every receiver is gone.
pub async fn watch_etcd(
    config: EtcdConfig,
    tx: watch::Sender<SourceStatus>,
    counters: Arc<SourceCounters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut policy = RetryPolicy::new(config.retry_config(), jitter_seed());
    let status = tx.borrow().clone();
    let mut publisher = Publisher {
        status,
        tx,
        counters,
    };
    let mut tracker = Tracker::default();
    let mut need_get = true;
    // The last connection failed: the next one is a reconnect.
    let mut failed = false;
    // For `closed()`: the task ends when every receiver is gone.
    let tx = publisher.tx.clone();
    // No end while the host runs (see the module primer): each iteration
    // is one connection, bounded by the call timeouts until the watch is
    // established, and the policy spaces the iterations (at most its
    // budget per window, then one per cap).
    loop {
        if *stop.borrow() || tx.is_closed() {
            return;
        }
        let now = tokio::time::Instant::now();
        let at = tokio::time::Instant::from_std(policy.next_attempt(now.into_std()).instant());
        if at > now {
            tokio::select! {
                () = stop_requested(&mut stop) => return,
                () = tx.closed() => return,
                () = tokio::time::sleep_until(at) => {}
            }
        }
        if !policy.attempt(tokio::time::Instant::now().into_std()) {
            continue;
        }
        if failed {
            SourceCounters::bump(&publisher.counters.reconnects);
        }
        // Stopping drops the session wherever it is: the tracker is
        // consistent after every applied event.
        let outcome = tokio::select! {
            o = session(&config, &mut tracker, &mut need_get, &mut publisher, &mut policy) => o,
            () = stop_requested(&mut stop) => return,
            () = tx.closed() => return,
        };
        let now = tokio::time::Instant::now().into_std();
        failed = matches!(outcome, Outcome::Failed { .. });
        match outcome {
            Outcome::Compacted => {
                SourceCounters::bump(&publisher.counters.compaction_rereads);
                rl_info!(
                    revision = tracker.last_rev,
                    "etcd compacted past the watched revision; reading the key again"
                );
                need_get = true;
                // Not a failure: read again at once (the budget still
                // counts the attempt).
                policy.succeeded();
            }
            Outcome::Failed { established, error } => {
                SourceCounters::bump(&publisher.counters.errors);
                if established {
                    SourceCounters::bump(&publisher.counters.watch_restarts);
                }
                if error.reread {
                    need_get = true;
                }
                publisher.down(&error.error, SystemTime::now());
                let failure = error.failure;
                if established {
                    policy.lost(now, failure);
                } else {
                    policy.failed(now, failure);
                }
            }
        }
    }
}

/// Puts `bytes` at the key; with `expected`, only if the key's
/// `mod_revision` is still the expected one (`Some(None)`: only if the key
/// is absent). Returns the new version.
pub(super) async fn write(
    config: &EtcdConfig,
    bytes: &[u8],
    expected: Option<Option<Version>>,
) -> Result<Version, SourceError> {
    write_fenced(config, bytes, expected, None).await
}

/// [`write`], with `fence` (if any) checked in the same transaction.
pub(super) async fn write_fenced(
    config: &EtcdConfig,
    bytes: &[u8],
    expected: Option<Option<Version>>,
    fence: Option<&super::Fence>,
) -> Result<Version, SourceError> {
    let t = config.timeout();
    let client = connect(config).await?;
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(GET_DECODE_LIMIT);
    let key = config.key.as_bytes();
    let Some(expected) = expected else {
        if fence.is_some() {
            return Err(SourceError::Config(
                "a fenced write is a compare-and-swap".into(),
            ));
        }
        let resp = timed(t, "put", kv.put(key, bytes, None)).await?;
        return Ok(Version::Etcd(resp.header().map_or(0, |h| h.revision())));
    };
    let revision = match expected {
        None | Some(Version::None) => 0,
        Some(Version::Etcd(r)) => r,
        Some(Version::File(_)) => {
            return Err(SourceError::Config(
                "a file version cannot be compared with an etcd key".into(),
            ));
        }
    };
    let mut when = vec![Compare::mod_revision(key, CompareOp::Equal, revision)];
    let mut otherwise = vec![TxnOp::get(key, Some(GetOptions::new().with_keys_only()))];
    if let Some(f) = fence {
        when.push(Compare::lease(f.key.as_str(), CompareOp::Equal, f.lease));
        otherwise.push(TxnOp::get(
            f.key.as_str(),
            Some(GetOptions::new().with_keys_only()),
        ));
    }
    let txn = Txn::new()
        .when(when)
        .and_then([TxnOp::put(key, bytes, None)])
        .or_else(otherwise);
    let resp = timed(t, "transaction", kv.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(Version::Etcd(resp.header().map_or(0, |h| h.revision())));
    }
    let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
        TxnOpResponse::Get(g) => Some(g),
        _ => None,
    });
    let found = gets
        .next()
        .and_then(|g| g.kvs().first().map(|kv| Version::Etcd(kv.mod_revision())));
    if let Some(f) = fence {
        let held = gets
            .next()
            .and_then(|g| g.kvs().first().map(etcd_client::KeyValue::lease));
        if held != Some(f.lease) {
            return Err(SourceError::Fenced { key: f.key.clone() });
        }
    }
    Err(SourceError::Conflict { expected, found })
}

/// Reads the key once; `None` if it is absent.
pub(super) async fn read(config: &EtcdConfig) -> Result<Option<(Vec<u8>, Version)>, SourceError> {
    let client = connect(config).await?;
    let resp = get(&client, config).await?;
    match resp.value {
        None => Ok(None),
        Some((bytes, rev)) => {
            super::check_size(bytes.len())?;
            Ok(Some((bytes, Version::Etcd(rev))))
        }
    }
}

/// How one connection ended.
#[derive(Debug)]
enum Outcome {
    /// The watch was cancelled because its start revision was compacted.
    Compacted,
    Failed {
        /// The watch had been established (and the policy told so).
        established: bool,
        error: SessionError,
    },
}

#[derive(Debug)]
struct SessionError {
    error: SourceError,
    failure: Failure,
    /// Resuming from the revision cannot work (a batch too large to
    /// decode): read the key again instead.
    reread: bool,
}

impl From<SourceError> for SessionError {
    fn from(error: SourceError) -> Self {
        let failure = match &error {
            SourceError::Config(_) => Failure::Permanent,
            _ => Failure::Transport,
        };
        let reread =
            matches!(&error, SourceError::Etcd(m) if m.contains("message length too large"));
        Self {
            error,
            failure,
            reread,
        }
    }
}

/// One connection: (get), watch from the next revision, apply events
/// until the watch ends.
async fn session(
    config: &EtcdConfig,
    tracker: &mut Tracker,
    need_get: &mut bool,
    publisher: &mut Publisher,
    policy: &mut RetryPolicy,
) -> Outcome {
    let failed = |e: SourceError| Outcome::Failed {
        established: false,
        error: e.into(),
    };
    let t = config.timeout();
    let client = match connect(config).await {
        Ok(c) => c,
        Err(e) => return failed(e),
    };
    if *need_get {
        let got = match get(&client, config).await {
            Ok(g) => g,
            Err(e) => return failed(e),
        };
        let refused = tracker.apply_get(got.value, got.revision);
        if let Some(e) = &refused {
            SourceCounters::bump(&publisher.counters.errors);
            rl_warn!(error = %e, "etcd: rollout document refused; keeping the last value");
        }
        *need_get = false;
    }
    let opts = WatchOptions::new().with_start_revision(tracker.last_rev.saturating_add(1));
    let mut watch_client = client
        .watch_client()
        .max_decoding_message_size(WATCH_DECODE_LIMIT);
    let mut stream: WatchStream = match timed(
        t,
        "watch",
        watch_client.watch(config.key.as_bytes(), Some(opts)),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    // The first response says whether the watch exists (or was cancelled
    // at once: a compacted start revision).
    match timed(t, "watch creation", stream.message()).await {
        Ok(Some(resp)) if resp.compact_revision() > 0 => return Outcome::Compacted,
        Ok(Some(resp)) if resp.canceled() => {
            return failed(SourceError::Etcd(format!(
                "watch refused: {}",
                resp.cancel_reason()
            )));
        }
        Ok(Some(resp)) if resp.created() => {}
        Ok(Some(_)) => return failed(SourceError::Etcd("watch: no creation response".into())),
        Ok(None) => return failed(SourceError::Etcd("watch stream ended".into())),
        Err(e) => return failed(e),
    }
    policy.succeeded();
    publisher.up(tracker, SystemTime::now());
    let lost = |e: SourceError| Outcome::Failed {
        established: true,
        error: e.into(),
    };
    // One iteration per watch response, for as long as the watch lives;
    // a dead connection ends it through the keepalive.
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return lost(SourceError::Etcd("watch stream ended".into())),
            Err(e) => return lost(etcd_error(e)),
        };
        if resp.compact_revision() > 0 {
            return Outcome::Compacted;
        }
        if resp.canceled() {
            return lost(SourceError::Etcd(format!(
                "watch cancelled: {}",
                resp.cancel_reason()
            )));
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let put = match event.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            if let Some(e) = tracker.apply_event(put, kv.mod_revision()) {
                SourceCounters::bump(&publisher.counters.errors);
                rl_warn!(error = %e, "etcd: rollout document refused; keeping the last value");
            }
        }
        publisher.up(tracker, SystemTime::now());
    }
}

/// Ends when `stop` turns true or its sender is gone (one wake-up per
/// change of `stop`, so not a busy loop).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// What a get returned: the value with its `mod_revision`, and the store
/// revision of the read.
#[derive(Debug)]
struct Got {
    value: Option<(Vec<u8>, i64)>,
    revision: i64,
}

async fn connect(config: &EtcdConfig) -> Result<Client, SourceError> {
    let t = config.timeout();
    let options = ConnectOptions::new()
        .with_connect_timeout(t)
        .with_timeout(t)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(false)
        .with_require_leader(true);
    timed(
        t,
        "connect",
        Client::connect(&config.endpoints, Some(options)),
    )
    .await
}

async fn get(client: &Client, config: &EtcdConfig) -> Result<Got, SourceError> {
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(GET_DECODE_LIMIT);
    let mut resp = timed(config.timeout(), "get", kv.get(config.key.as_bytes(), None)).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let value = resp.take_kvs().into_iter().next().map(|kv| {
        let rev = kv.mod_revision();
        (kv.into_key_value().1, rev)
    });
    Ok(Got { value, revision })
}

/// Runs one etcd call with a timeout.
async fn timed<T>(
    after: Duration,
    what: &'static str,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, SourceError> {
    match tokio::time::timeout(after, call).await {
        Ok(r) => r.map_err(etcd_error),
        Err(_) => Err(SourceError::Timeout { what, after }),
    }
}

/// etcd's error, with "database space exceeded" as its own variant.
fn etcd_error(e: etcd_client::Error) -> SourceError {
    classify(e.to_string())
}

fn classify(text: String) -> SourceError {
    if text.contains("database space exceeded") {
        SourceError::SpaceExceeded
    } else {
        SourceError::Etcd(text)
    }
}

fn jitter_seed() -> u64 {
    let mut seed = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).is_ok() {
        return u64::from_le_bytes(seed);
    }
    // Jitter needs spread, not secrecy: the clock and the pid differ
    // between hosts.
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) ^ (u64::from(std::process::id()) << 32)
}

/// The key's state as applied so far: sans-I/O, so the ordering rules are
/// unit-tested without etcd.
#[derive(Debug, Default)]
struct Tracker {
    value: Option<Arc<[u8]>>,
    version: Option<i64>,
    /// The highest revision applied: the watch resumes after it.
    last_rev: i64,
    /// Why the newest value was refused (over-size), until a good one
    /// arrives.
    refused: Option<String>,
}

impl Tracker {
    /// Applies a get at store revision `revision`. A value older than the
    /// one held is ignored (never back in time). Returns the error of a
    /// refused value.
    fn apply_get(&mut self, value: Option<(Vec<u8>, i64)>, revision: i64) -> Option<SourceError> {
        if revision < self.last_rev {
            return None;
        }
        self.last_rev = revision;
        match value {
            Some((bytes, rev)) => self.apply(Some(&bytes), rev),
            None => self.apply(None, revision),
        }
    }

    /// Applies one watch event (`None`: a delete) at `revision`. Events at
    /// or below the last applied revision are duplicates and ignored.
    fn apply_event(&mut self, put: Option<&[u8]>, revision: i64) -> Option<SourceError> {
        if revision <= self.last_rev {
            return None;
        }
        self.last_rev = revision;
        self.apply(put, revision)
    }

    fn apply(&mut self, put: Option<&[u8]>, revision: i64) -> Option<SourceError> {
        if self.version.is_some_and(|v| revision < v) {
            return None;
        }
        if let Some(Err(e)) = put.map(|b| super::check_size(b.len())) {
            self.refused = Some(e.to_string());
            return Some(e);
        }
        self.refused = None;
        // An unchanged key (a re-read of the same revision) keeps its
        // allocation and wakes nobody.
        if self.version != Some(revision) || self.value.as_deref() != put {
            self.value = put.map(Arc::from);
        }
        self.version = Some(revision);
        None
    }
}

/// Publishes statuses and logs the state changes.
#[derive(Debug)]
struct Publisher {
    tx: watch::Sender<SourceStatus>,
    counters: Arc<SourceCounters>,
    /// The last status published.
    status: SourceStatus,
}

impl Publisher {
    /// The watch is established and `tracker` is current.
    fn up(&mut self, tracker: &Tracker, now: SystemTime) {
        let version = tracker.version.map_or(Version::None, Version::Etcd);
        if let Some(error) = &tracker.refused {
            let next = self.status.down(now, error);
            self.publish(next);
            return;
        }
        let same = self.status.value == tracker.value && self.status.version == version;
        if same && self.status.is_healthy() {
            return;
        }
        let next = SourceStatus {
            value: tracker.value.clone(),
            version,
            health: Health::Healthy,
            last_good: Some(now),
        };
        self.publish(next);
    }

    /// The connection or the watch failed: same value, `Down`.
    fn down(&mut self, error: &SourceError, now: SystemTime) {
        let next = self.status.down(now, error);
        self.publish(next);
    }

    fn publish(&mut self, next: SourceStatus) {
        let old = std::mem::replace(&mut self.status, next.clone());
        match (&old.health, &next.health) {
            (Health::Down { .. }, Health::Down { .. }) => {}
            (_, Health::Down { error, .. }) => {
                rl_warn!(error = %error, "etcd rollout source down; keeping the last value");
            }
            (Health::Down { since, .. }, _) => {
                let down_for = SystemTime::now()
                    .duration_since(*since)
                    .unwrap_or(Duration::ZERO);
                rl_info!(
                    down_for_ms = u64::try_from(down_for.as_millis()).unwrap_or(u64::MAX),
                    "etcd rollout source healthy again"
                );
            }
            _ => {}
        }
        if old.value != next.value || old.version != next.version {
            SourceCounters::bump(&self.counters.changes);
            let revision = match next.version {
                Version::Etcd(r) => r,
                _ => 0,
            };
            match &next.value {
                Some(v) => vkx_common::rl_log!(
                    debug,
                    revision,
                    len = v.len(),
                    sha256 = %digest_prefix(v),
                    "etcd rollout document changed"
                ),
                None => rl_info!(revision, "etcd rollout document absent"),
            }
        }
        publish_if_changed(&self.tx, next);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::source::MAX_SOURCE_BYTES;

    #[test]
    fn defaults_validate_and_bad_settings_do_not() {
        EtcdConfig::default().validate().unwrap();
        let bad = [
            EtcdConfig {
                endpoints: vec![],
                ..EtcdConfig::default()
            },
            EtcdConfig {
                endpoints: vec!["https://10.0.0.1:2379".into()],
                ..EtcdConfig::default()
            },
            EtcdConfig {
                endpoints: vec!["127.0.0.1:2379".into()],
                ..EtcdConfig::default()
            },
            EtcdConfig {
                endpoints: vec!["http://127.0.0.1:2379".into(); MAX_ENDPOINTS + 1],
                ..EtcdConfig::default()
            },
            EtcdConfig {
                key: String::new(),
                ..EtcdConfig::default()
            },
            EtcdConfig {
                key: "k".repeat(MAX_KEY_BYTES + 1),
                ..EtcdConfig::default()
            },
            EtcdConfig {
                timeout_ms: 10,
                ..EtcdConfig::default()
            },
            EtcdConfig {
                backoff_cap_ms: 500,
                ..EtcdConfig::default()
            },
            EtcdConfig {
                backoff_cap_ms: 2000,
                reconnect_spread_ms: 3000,
                ..EtcdConfig::default()
            },
        ];
        for c in bad {
            assert!(matches!(c.validate(), Err(SourceError::Config(_))), "{c:?}");
        }
    }

    #[test]
    fn the_reconnect_policy_is_capped_and_never_gives_up() {
        let cfg = EtcdConfig::default();
        let mut p = RetryPolicy::new(cfg.retry_config(), 1);
        let cap = Duration::from_millis(cfg.backoff_cap_ms);
        let t0 = std::time::Instant::now();
        let mut t = t0;
        // A day of failures: every wait is at most the cap (2 × the cap
        // once the budget is spent), and attempts go on.
        let mut attempts = 0u32;
        while t < t0 + Duration::from_secs(24 * 3600) {
            if p.attempt(t) {
                attempts += 1;
                let next = p.failed(t, Failure::Transport).instant();
                assert!(next - t <= 2 * cap, "{:?}", next - t);
            }
            t = p
                .next_attempt(t)
                .instant()
                .max(t + Duration::from_millis(1));
        }
        assert!(attempts > 24 * 360 / 2, "{attempts}");
    }

    #[test]
    fn events_apply_in_revision_order_and_never_go_back() {
        let mut t = Tracker::default();
        assert!(t.apply_get(Some((b"a".to_vec(), 5)), 9).is_none());
        assert_eq!(t.version, Some(5));
        assert_eq!(t.last_rev, 9);
        // A replayed event at or below the last revision is ignored.
        t.apply_event(Some(b"old"), 9);
        assert_eq!(t.value.as_deref(), Some(&b"a"[..]));
        t.apply_event(Some(b"b"), 10);
        assert_eq!(t.value.as_deref(), Some(&b"b"[..]));
        t.apply_event(None, 11);
        assert_eq!((t.value.clone(), t.version), (None, Some(11)));
        // A get from an older store revision (a lagging member) is ignored.
        t.apply_get(Some((b"a".to_vec(), 5)), 8);
        assert_eq!((t.value.clone(), t.last_rev), (None, 11));
        // A get of an absent key versions it at the read's revision.
        t.apply_get(None, 20);
        assert_eq!(t.version, Some(20));
    }

    #[test]
    fn an_oversize_value_is_refused_and_the_last_one_kept() {
        let mut t = Tracker::default();
        t.apply_event(Some(b"good"), 3);
        let big = vec![0u8; MAX_SOURCE_BYTES + 1];
        assert!(matches!(
            t.apply_event(Some(&big), 4),
            Some(SourceError::TooLarge { .. })
        ));
        assert_eq!(t.value.as_deref(), Some(&b"good"[..]));
        assert_eq!(t.version, Some(3));
        assert_eq!(t.last_rev, 4, "the refused revision is not replayed");
        assert!(t.refused.is_some());
        t.apply_event(Some(b"better"), 5);
        assert!(t.refused.is_none());
        assert_eq!(t.version, Some(5));
    }

    #[test]
    fn space_exceeded_is_its_own_error() {
        let e = classify(
            "grpc request error: status: ResourceExhausted, message: \"etcdserver: mvcc: database space exceeded\"".into(),
        );
        assert!(matches!(e, SourceError::SpaceExceeded));
        assert!(e.to_string().contains("etcdctl defrag"));
        assert!(matches!(
            classify("connection refused".into()),
            SourceError::Etcd(_)
        ));
    }

    #[tokio::test]
    async fn publisher_wakes_receivers_only_on_change_and_keeps_the_value_when_down() {
        let (tx, mut rx) = watch::channel(SourceStatus::connecting());
        let status = tx.borrow().clone();
        let mut p = Publisher {
            status,
            tx,
            counters: Arc::default(),
        };
        let mut t = Tracker::default();
        t.apply_event(Some(b"doc"), 2);
        let now = SystemTime::now();
        p.up(&t, now);
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().is_healthy());
        p.up(&t, now + Duration::from_secs(1));
        assert!(!rx.has_changed().unwrap(), "same value, same health");
        p.down(&SourceError::Etcd("reset".into()), now);
        let s = rx.borrow_and_update().clone();
        assert!(matches!(s.health, Health::Down { .. }));
        assert_eq!(s.value.as_deref(), Some(&b"doc"[..]));
        p.up(&t, now);
        assert!(rx.borrow_and_update().is_healthy());
        assert_eq!(p.counters.snapshot().changes, 1);
    }
}
