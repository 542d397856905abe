//! The host agent's metrics: counters and gauges kept in atomics (no lock
//! on any connection's path), rendered in the Prometheus text format
//! (version 0.0.4) by a minimal HTTP/1.0 endpoint of `vkx-host serve`.
//!
//! The endpoint listens on a Unix socket (`[metrics] socket`, default
//! [`DEFAULT_METRICS_SOCKET`], mode 0660) or on loopback TCP (`[metrics]
//! listen = "127.0.0.1:9461"`; any other address only with
//! `allow_non_loopback = true`). Without a `[metrics]` table there is no
//! endpoint. It answers `GET /metrics` and nothing else (404); a request
//! head is at most [`MAX_REQUEST_HEAD`] bytes and the whole exchange
//! [`EXCHANGE_TIMEOUT`]; at most [`MAX_METRICS_CONNECTIONS`] scrapes run
//! at once, more are closed at once. Nothing a guest sends reaches it.
//!
//! The counters are exact whatever the log limiter drops: every event is
//! counted where it happens, and the limiter's own count of dropped lines
//! is exported as `vkx_log_lines_suppressed_total`.
//!
//! `vkx-host metrics --socket S` ([`fetch`]) or
//! `curl --unix-socket S http://localhost/metrics` is the client.
//!
//! Metric families (see [`render`]): `vkx_connections_open`,
//! `vkx_connections`, `vkx_handshakes_in_progress`,
//! `vkx_sessions_established`, `vkx_peer_buckets`, `vkx_admission_limit`,
//! `vkx_handshakes_total{outcome}`, `vkx_handshake_duration_seconds`,
//! `vkx_errors_sent_total{code}`, `vkx_admissions_refused_total{reason}`,
//! `vkx_sessions_rate_limited_total`, `vkx_log_lines_suppressed_total`,
//! `vkx_keys_released_total`, `vkx_key_updates_pushed_total`,
//! `vkx_key_updates_acked_total{result}`, `vkx_reloads_total{outcome}`,
//! `vkx_reload_last_success_timestamp_seconds`; for the rollout and kill switch
//! `vkx_feature_sessions{feature,state}`, `vkx_rollout_feature_killed`,
//! `vkx_rollout_feature_stage`, `vkx_rollout_revision`,
//! `vkx_rollout_issued_timestamp_seconds`,
//! `vkx_rollout_accepted_timestamp_seconds`, `vkx_rollout_source_up`,
//! `vkx_rollout_source_last_ok_timestamp_seconds`,
//! `vkx_feature_updates_sent_total`,
//! `vkx_rollout_documents_refused_total{reason}`; the health signals per
//! ring of the rollout document (`crate::health`)
//! `vkx_health_sessions_total{ring}`, `vkx_health_sessions_lost_total{ring}`,
//! `vkx_health_attestation_failures_total{ring}`,
//! `vkx_health_requests_total{ring,feature}`,
//! `vkx_health_grants_total{ring,feature}`,
//! `vkx_health_refusals_total{ring,feature,code}`,
//! `vkx_health_errors_sent_total{ring,code}`,
//! `vkx_health_errors_received_total{ring,code}`,
//! `vkx_health_publishes_total{result}`,
//! `vkx_health_enabled_sessions{ring,feature}` (a gauge); the live drill
//! (spec/ROLLOUT.md §13.5) `vkx_live_drill_active{drill,feature,ring}`,
//! `vkx_live_drill_sessions_told_total{...}`,
//! `vkx_live_drill_requests_after_total{...}`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use vkx_common::errors::{ErrorCode, REGISTRY};
use vkx_common::rl_warn;
use vkx_common::wire::{FeatureState, Features, feature};

use crate::admission::{AdmissionControl, RefuseReason, Slots, Usage};
use crate::health::RingCounters;
use crate::rollout::Feature;

/// The Unix socket of a `[metrics]` table that names neither.
pub const DEFAULT_METRICS_SOCKET: &str = "/run/vkx/metrics.sock";
/// Longest request head (request line and headers) read.
pub const MAX_REQUEST_HEAD: usize = 4096;
/// Longest a scrape may take, request and response.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once.
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// Longest a client may take to send its request head: a scraper sends
/// it at once, and a client that trickles it holds a slot for no one.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Scrapes one local user (uid; over TCP, one address) may hold at once:
/// a local user who half-sends requests cannot take every slot.
pub const MAX_SCRAPES_PER_PEER: usize = 4;
/// Largest response the client ([`fetch`]) reads.
pub const MAX_RESPONSE: u64 = 1024 * 1024;

/// Upper bounds of the handshake latency histogram (accept to
/// Established): milliseconds and the `le` label. The last finite bucket
/// is `HANDSHAKE_DEADLINE`.
pub const HANDSHAKE_BUCKETS: [(u64, &str); 12] = [
    (10, "0.01"),
    (25, "0.025"),
    (50, "0.05"),
    (100, "0.1"),
    (250, "0.25"),
    (500, "0.5"),
    (1_000, "1"),
    (2_500, "2.5"),
    (5_000, "5"),
    (10_000, "10"),
    (20_000, "20"),
    (30_000, "30"),
];
const _: () = assert!(
    HANDSHAKE_BUCKETS[HANDSHAKE_BUCKETS.len() - 1].0
        == vkx_common::session::host::HANDSHAKE_DEADLINE.as_secs() * 1000
);

/// The `[metrics]` table of host.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Unix socket to serve on; the default when `listen` is not given.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// TCP address instead, e.g. "127.0.0.1:9461".
    #[serde(default)]
    pub listen: Option<String>,
    /// Allow a `listen` address that is not loopback.
    #[serde(default)]
    pub allow_non_loopback: bool,
}

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A `[metrics]` table that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsConfigError {
    #[error("give either socket or listen, not both")]
    Both,
    #[error("listen {0:?} is not an IP address and port, e.g. 127.0.0.1:9461")]
    BadAddress(String),
    #[error("listen {0} is not a loopback address; set allow_non_loopback = true to serve it")]
    NotLoopback(SocketAddr),
}

impl MetricsConfig {
    pub fn endpoint(&self) -> Result<Endpoint, MetricsConfigError> {
        match (&self.socket, &self.listen) {
            (Some(_), Some(_)) => Err(MetricsConfigError::Both),
            (Some(p), None) => Ok(Endpoint::Unix(p.clone())),
            (None, None) => Ok(Endpoint::Unix(PathBuf::from(DEFAULT_METRICS_SOCKET))),
            (None, Some(l)) => {
                let addr: SocketAddr = l
                    .parse()
                    .map_err(|_| MetricsConfigError::BadAddress(l.clone()))?;
                if !addr.ip().is_loopback() && !self.allow_non_loopback {
                    return Err(MetricsConfigError::NotLoopback(addr));
                }
                Ok(Endpoint::Tcp(addr))
            }
        }
    }
}

/// How a handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// Reached Established.
    Attested,
    /// The host turned the peer away: admission (`busy`, `rate-limited`),
    /// its evidence or identity (`attestation-failed`), or no common
    /// version.
    Refused,
    /// TLS failure, end of stream, protocol violation, local failure.
    Failed,
    /// A deadline expired: the TLS handshake timeout or a session deadline.
    Timeout,
}

impl HandshakeOutcome {
    pub const ALL: [Self; 4] = [Self::Attested, Self::Refused, Self::Failed, Self::Timeout];

    pub fn label(self) -> &'static str {
        match self {
            Self::Attested => "attested",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Attested => 0,
            Self::Refused => 1,
            Self::Failed => 2,
            Self::Timeout => 3,
        }
    }

    /// The outcome of a handshake that ended by sending `code`.
    pub fn for_code(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Timeout => Self::Timeout,
            ErrorCode::Busy
            | ErrorCode::RateLimited
            | ErrorCode::AttestationFailed
            | ErrorCode::UnsupportedVersion => Self::Refused,
            _ => Self::Failed,
        }
    }
}

fn refuse_index(r: RefuseReason) -> usize {
    match r {
        RefuseReason::MaxOpen => 0,
        RefuseReason::MaxConnections => 1,
        RefuseReason::MaxHandshakes => 2,
        RefuseReason::PeerConnectionRate => 3,
        RefuseReason::PeerOpen => 4,
        RefuseReason::PeerHandshakes => 5,
    }
}

/// Slots of `errors_sent`: one per registry row, and one for codes the
/// registry does not know.
const ERROR_SLOTS: usize = REGISTRY.len() + 1;

/// Every counter and gauge the host keeps itself. All relaxed atomics:
/// each value is exact; a scrape is not a consistent snapshot across them.
#[derive(Debug, Default)]
pub struct Metrics {
    established: AtomicU64,
    handshakes: [AtomicU64; 4],
    latency_buckets: [AtomicU64; HANDSHAKE_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    errors_sent: [AtomicU64; ERROR_SLOTS],
    refused: [AtomicU64; RefuseReason::ALL.len()],
    sessions_rate_limited: AtomicU64,
    /// Rewound TPM states seen: refused, flagged.
    rewinds: [AtomicU64; 2],
    keys_released: AtomicU64,
    updates_pushed: AtomicU64,
    updates_installed: AtomicU64,
    updates_failed: AtomicU64,
    /// Reloads (SIGHUP) of the policy and CID map: applied, refused.
    reloads: [AtomicU64; 2],
    /// When the last reload was applied (Unix seconds; 0: none yet).
    reload_last_ok_unix: AtomicU64,
    /// The rollout and kill switch ([`RolloutMetrics`]).
    pub rollout: RolloutMetrics,
    /// Health signals per ring and feature ([`crate::health`]).
    pub health: crate::health::Health,
}

/// The v1 features, in the order of the rollout series.
pub const FEATURES: [(u16, &str); 3] = [
    (feature::KEY_RELEASE, "key-release"),
    (feature::KEY_DERIVATION, "key-derivation"),
    (feature::KEY_ROTATION, "key-rotation"),
];

/// The feature states, in the order of the rollout series.
const STATES: [(FeatureState, &str); 3] = [
    (FeatureState::Enabled, "enabled"),
    (FeatureState::Disabled, "disabled"),
    (FeatureState::NotYet, "not-yet"),
];

/// Why a rollout document was not accepted, as counted (the labels of
/// `crate::rollout`'s refusals; anything else is `other`).
pub const ROLLOUT_REFUSALS: [&str; 9] = [
    "malformed",
    "replay",
    "revision-jump",
    "unsigned-widening",
    "bad-signature",
    "unknown-key",
    "persist-failed",
    "drill-overlay",
    "other",
];

/// What the rollout machinery of `serve` counts: the accepted document,
/// its source's health, refusals, the feature updates sent, and how many
/// live sessions see each feature in each state.
#[derive(Debug, Default)]
pub struct RolloutMetrics {
    /// Live Established sessions by [feature][state].
    sessions: [[AtomicU64; 3]; 3],
    updates_sent: AtomicU64,
    revision: AtomicU64,
    issued_unix: AtomicU64,
    accepted_unix: AtomicU64,
    /// 1 while the source answers, 0 while it is down (the last accepted
    /// document is served meanwhile).
    source_up: AtomicU64,
    source_last_ok_unix: AtomicU64,
    refused: [AtomicU64; ROLLOUT_REFUSALS.len()],
    /// Per feature: killed (document or local override).
    killed: [AtomicU64; 3],
    /// Per feature: the stage ring's index + 1 (0: no stage).
    stage: [AtomicU64; 3],
}

fn feature_index(id: u16) -> Option<usize> {
    FEATURES.iter().position(|(f, _)| *f == id)
}

fn state_index(s: FeatureState) -> usize {
    STATES.iter().position(|(x, _)| *x == s).unwrap_or(1)
}

impl RolloutMetrics {
    /// A `feature-update` was sent to one session.
    pub fn update_sent(&self) {
        add(&self.updates_sent, 1);
    }

    pub fn updates_sent(&self) -> u64 {
        get(&self.updates_sent)
    }

    /// A document was accepted: its revision and times (Unix seconds).
    pub fn accepted(&self, revision: u64, issued_unix: u64, accepted_unix: u64) {
        self.revision.store(revision, Ordering::Relaxed);
        self.issued_unix.store(issued_unix, Ordering::Relaxed);
        self.accepted_unix.store(accepted_unix, Ordering::Relaxed);
    }

    pub fn source(&self, up: bool, last_ok_unix: Option<u64>) {
        self.source_up.store(u64::from(up), Ordering::Relaxed);
        if let Some(t) = last_ok_unix {
            self.source_last_ok_unix.store(t, Ordering::Relaxed);
        }
    }

    /// A document was refused; `label` names why.
    pub fn refused(&self, label: &str) {
        let i = ROLLOUT_REFUSALS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(ROLLOUT_REFUSALS.len() - 1);
        add(&self.refused[i], 1);
    }

    pub fn refusals(&self, label: &str) -> u64 {
        ROLLOUT_REFUSALS
            .iter()
            .position(|l| *l == label)
            .map_or(0, |i| get(&self.refused[i]))
    }

    /// The node-wide state of `feature`: killed, and its stage ring's
    /// index (`None`: no stage).
    pub fn feature(&self, feature: u16, killed: bool, stage: Option<usize>) {
        if let Some(i) = feature_index(feature) {
            self.killed[i].store(u64::from(killed), Ordering::Relaxed);
            self.stage[i].store(
                stage.map_or(0, |s| wide(s).saturating_add(1)),
                Ordering::Relaxed,
            );
        }
    }

    fn count(&self, features: &Features, delta: i64) {
        for (i, (id, _)) in FEATURES.iter().enumerate() {
            let state = features.get(id).copied().unwrap_or(FeatureState::Disabled);
            let c = &self.sessions[i][state_index(state)];
            if delta > 0 {
                c.fetch_add(1, Ordering::Relaxed);
            } else {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Live sessions that see `feature` in `state`.
    pub fn sessions(&self, feature: u16, state: FeatureState) -> u64 {
        feature_index(feature).map_or(0, |i| get(&self.sessions[i][state_index(state)]))
    }
}

/// One Established session's feature map, counted in
/// [`RolloutMetrics`] and, per feature enabled, in its ring's health
/// counters (`crate::health`) while it lives.
#[derive(Debug)]
pub struct FeatureGauge {
    metrics: Arc<Metrics>,
    features: Features,
    ring: Arc<RingCounters>,
}

impl FeatureGauge {
    pub fn new(metrics: Arc<Metrics>, features: Features, ring: Arc<RingCounters>) -> Self {
        metrics.rollout.count(&features, 1);
        count_enabled(&ring, &features, true);
        Self {
            metrics,
            features,
            ring,
        }
    }

    /// The session now has `features`, as a member of `ring`.
    pub fn set(&mut self, ring: &Arc<RingCounters>, features: &Features) {
        if *features != self.features {
            self.metrics.rollout.count(&self.features, -1);
            self.metrics.rollout.count(features, 1);
        }
        if *features != self.features || !Arc::ptr_eq(ring, &self.ring) {
            count_enabled(&self.ring, &self.features, false);
            count_enabled(ring, features, true);
            self.features = features.clone();
            self.ring = ring.clone();
        }
    }
}

impl Drop for FeatureGauge {
    fn drop(&mut self) {
        self.metrics.rollout.count(&self.features, -1);
        count_enabled(&self.ring, &self.features, false);
    }
}

fn count_enabled(ring: &RingCounters, features: &Features, on: bool) {
    for (id, state) in features {
        if *state == FeatureState::Enabled
            && let Some(f) = Feature::from_id(*id)
        {
            ring.enabled(f, on);
        }
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Counts one established session while it lives.
#[derive(Debug)]
pub struct EstablishedGuard(Arc<Metrics>);

impl Drop for EstablishedGuard {
    fn drop(&mut self) {
        self.0.established.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// A session reached Established; the gauge counts it until the guard
    /// is dropped.
    pub fn established(self: &Arc<Self>) -> EstablishedGuard {
        add(&self.established, 1);
        EstablishedGuard(self.clone())
    }

    /// Sessions established now.
    pub fn sessions_established(&self) -> u64 {
        get(&self.established)
    }

    pub fn handshake(&self, outcome: HandshakeOutcome) {
        add(&self.handshakes[outcome.index()], 1);
    }

    /// Accept to Established.
    pub fn handshake_latency(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let i = HANDSHAKE_BUCKETS
            .iter()
            .position(|(le, _)| ms <= *le)
            .unwrap_or(HANDSHAKE_BUCKETS.len());
        add(&self.latency_buckets[i], 1);
        add(
            &self.latency_sum_us,
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        );
    }

    pub fn error_sent(&self, code: ErrorCode) {
        let i = REGISTRY
            .iter()
            .position(|r| r.code == code)
            .unwrap_or(REGISTRY.len());
        add(&self.errors_sent[i], 1);
    }

    pub fn refused(&self, reason: RefuseReason) {
        add(&self.refused[refuse_index(reason)], 1);
    }

    /// A quote showed a rewound TPM state (§15.8), refused or flagged.
    pub fn rewind(&self, refused: bool) {
        add(&self.rewinds[usize::from(!refused)], 1);
    }

    /// A reload ended: applied (`ok`, at `unix`) or refused.
    pub fn reload(&self, ok: bool, unix: u64) {
        add(&self.reloads[usize::from(!ok)], 1);
        if ok {
            self.reload_last_ok_unix.store(unix, Ordering::Relaxed);
        }
    }

    /// A session closed for sending faster than its message budget.
    pub fn session_rate_limited(&self) {
        add(&self.sessions_rate_limited, 1);
    }

    /// Keys handed out in one `key-release`.
    pub fn keys_released(&self, n: usize) {
        add(&self.keys_released, u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn update_pushed(&self) {
        add(&self.updates_pushed, 1);
    }

    pub fn update_acked(&self, installed: bool) {
        add(
            if installed {
                &self.updates_installed
            } else {
                &self.updates_failed
            },
            1,
        );
    }
}

pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub(crate) fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn wide(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The Prometheus text exposition of `m`, the admission `usage` and the
/// log limiter's `suppressed` count.
pub fn render(m: &Metrics, usage: &Usage, suppressed: u64) -> String {
    let mut o = String::with_capacity(4096);
    let gauges: [(&str, &str, usize); 4] = [
        (
            "vkx_connections_open",
            "Transport connections held, served or being refused.",
            usage.open,
        ),
        (
            "vkx_connections",
            "Connections being served (any session state).",
            usage.connections,
        ),
        (
            "vkx_handshakes_in_progress",
            "Served connections not yet Established.",
            usage.handshakes,
        ),
        (
            "vkx_peer_buckets",
            "Peers with a connection-rate bucket.",
            usage.peers,
        ),
    ];
    for (name, help, v) in gauges {
        family(&mut o, name, "gauge", help);
        sample(&mut o, name, "", wide(v));
    }
    family(
        &mut o,
        "vkx_sessions_established",
        "gauge",
        "Sessions in Established.",
    );
    sample(&mut o, "vkx_sessions_established", "", get(&m.established));
    family(
        &mut o,
        "vkx_admission_limit",
        "gauge",
        "Configured admission limits.",
    );
    let l = &usage.limits;
    for (name, v) in [
        ("max_open", l.max_open),
        ("max_connections", l.max_connections),
        ("max_handshakes", l.max_handshakes),
        ("max_peers", l.max_peers),
    ] {
        sample(
            &mut o,
            "vkx_admission_limit",
            &format!("limit=\"{name}\""),
            wide(v),
        );
    }
    family(
        &mut o,
        "vkx_handshakes_total",
        "counter",
        "Handshakes by outcome (attested, refused, failed, timeout).",
    );
    for h in HandshakeOutcome::ALL {
        sample(
            &mut o,
            "vkx_handshakes_total",
            &format!("outcome=\"{}\"", h.label()),
            get(&m.handshakes[h.index()]),
        );
    }
    family(
        &mut o,
        "vkx_handshake_duration_seconds",
        "histogram",
        "Accept to Established.",
    );
    let mut cumulative = 0u64;
    for (i, (_, le)) in HANDSHAKE_BUCKETS.iter().enumerate() {
        cumulative += get(&m.latency_buckets[i]);
        sample(
            &mut o,
            "vkx_handshake_duration_seconds_bucket",
            &format!("le=\"{le}\""),
            cumulative,
        );
    }
    cumulative += get(&m.latency_buckets[HANDSHAKE_BUCKETS.len()]);
    sample(
        &mut o,
        "vkx_handshake_duration_seconds_bucket",
        "le=\"+Inf\"",
        cumulative,
    );
    let us = get(&m.latency_sum_us);
    let _ = writeln!(
        o,
        "vkx_handshake_duration_seconds_sum {}.{:06}",
        us / 1_000_000,
        us % 1_000_000
    );
    sample(
        &mut o,
        "vkx_handshake_duration_seconds_count",
        "",
        cumulative,
    );
    family(
        &mut o,
        "vkx_errors_sent_total",
        "counter",
        "Error messages sent to guests, by registry code name.",
    );
    for (i, r) in REGISTRY.iter().enumerate() {
        sample(
            &mut o,
            "vkx_errors_sent_total",
            &format!("code=\"{}\"", r.name),
            get(&m.errors_sent[i]),
        );
    }
    sample(
        &mut o,
        "vkx_errors_sent_total",
        "code=\"unknown\"",
        get(&m.errors_sent[REGISTRY.len()]),
    );
    family(
        &mut o,
        "vkx_admissions_refused_total",
        "counter",
        "Connections not served, by the limit that refused them.",
    );
    for r in RefuseReason::ALL {
        sample(
            &mut o,
            "vkx_admissions_refused_total",
            &format!("reason=\"{}\"", r.label()),
            get(&m.refused[refuse_index(r)]),
        );
    }
    family(
        &mut o,
        "vkx_attestation_rewinds_total",
        "counter",
        "Quotes whose TPM clock state went back (snapshot restore or clone), by action.",
    );
    for (i, action) in ["refused", "flagged"].iter().enumerate() {
        sample(
            &mut o,
            "vkx_attestation_rewinds_total",
            &format!("action=\"{action}\""),
            get(&m.rewinds[i]),
        );
    }
    let counters: [(&str, &str, u64); 4] = [
        (
            "vkx_sessions_rate_limited_total",
            "Sessions closed with rate-limited for exceeding their message budget.",
            get(&m.sessions_rate_limited),
        ),
        (
            "vkx_log_lines_suppressed_total",
            "Log lines the rate limiter dropped (counted, not written).",
            suppressed,
        ),
        (
            "vkx_keys_released_total",
            "Keys released in key-release messages.",
            get(&m.keys_released),
        ),
        (
            "vkx_key_updates_pushed_total",
            "Rotated keys pushed to live sessions.",
            get(&m.updates_pushed),
        ),
    ];
    for (name, help, v) in counters {
        family(&mut o, name, "counter", help);
        sample(&mut o, name, "", v);
    }
    family(
        &mut o,
        "vkx_key_updates_acked_total",
        "counter",
        "Key-update acknowledgements, by result.",
    );
    sample(
        &mut o,
        "vkx_key_updates_acked_total",
        "result=\"installed\"",
        get(&m.updates_installed),
    );
    sample(
        &mut o,
        "vkx_key_updates_acked_total",
        "result=\"failed\"",
        get(&m.updates_failed),
    );
    family(
        &mut o,
        "vkx_reloads_total",
        "counter",
        "Reloads of the policy and CID map (SIGHUP), by outcome: ok (applied) or invalid (refused, nothing applied).",
    );
    for (i, outcome) in ["ok", "invalid"].iter().enumerate() {
        sample(
            &mut o,
            "vkx_reloads_total",
            &format!("outcome=\"{outcome}\""),
            get(&m.reloads[i]),
        );
    }
    family(
        &mut o,
        "vkx_reload_last_success_timestamp_seconds",
        "gauge",
        "When the last reload was applied (Unix time; 0 if none since the start).",
    );
    sample(
        &mut o,
        "vkx_reload_last_success_timestamp_seconds",
        "",
        get(&m.reload_last_ok_unix),
    );
    render_rollout(&mut o, &m.rollout);
    m.health.render(&mut o);
    o
}

fn render_rollout(o: &mut String, r: &RolloutMetrics) {
    family(
        o,
        "vkx_feature_sessions",
        "gauge",
        "Established sessions by the state their feature map gives each feature.",
    );
    for (fi, (_, fname)) in FEATURES.iter().enumerate() {
        for (si, (_, sname)) in STATES.iter().enumerate() {
            sample(
                o,
                "vkx_feature_sessions",
                &format!("feature=\"{fname}\",state=\"{sname}\""),
                get(&r.sessions[fi][si]),
            );
        }
    }
    family(
        o,
        "vkx_rollout_feature_killed",
        "gauge",
        "1 if the feature is killed on this node (rollout document or local override).",
    );
    for (fi, (_, fname)) in FEATURES.iter().enumerate() {
        sample(
            o,
            "vkx_rollout_feature_killed",
            &format!("feature=\"{fname}\""),
            get(&r.killed[fi]),
        );
    }
    family(
        o,
        "vkx_rollout_feature_stage",
        "gauge",
        "The feature's stage: index of the last enabled ring plus one (0: no ring).",
    );
    for (fi, (_, fname)) in FEATURES.iter().enumerate() {
        sample(
            o,
            "vkx_rollout_feature_stage",
            &format!("feature=\"{fname}\""),
            get(&r.stage[fi]),
        );
    }
    let gauges: [(&str, &str, u64); 5] = [
        (
            "vkx_rollout_revision",
            "Revision of the accepted rollout document (0: none).",
            get(&r.revision),
        ),
        (
            "vkx_rollout_issued_timestamp_seconds",
            "issued_at of the accepted rollout document (Unix time; its age is now minus this).",
            get(&r.issued_unix),
        ),
        (
            "vkx_rollout_accepted_timestamp_seconds",
            "When this host accepted its rollout document (Unix time).",
            get(&r.accepted_unix),
        ),
        (
            "vkx_rollout_source_up",
            "1 while the rollout source answers; 0 while the last accepted document is served without it.",
            get(&r.source_up),
        ),
        (
            "vkx_rollout_source_last_ok_timestamp_seconds",
            "Last time the rollout source answered (Unix time).",
            get(&r.source_last_ok_unix),
        ),
    ];
    for (name, help, v) in gauges {
        family(o, name, "gauge", help);
        sample(o, name, "", v);
    }
    family(
        o,
        "vkx_feature_updates_sent_total",
        "counter",
        "feature-update messages sent to live sessions.",
    );
    sample(
        o,
        "vkx_feature_updates_sent_total",
        "",
        get(&r.updates_sent),
    );
    family(
        o,
        "vkx_rollout_documents_refused_total",
        "counter",
        "Rollout documents not accepted, by reason (the previous state is kept).",
    );
    for (i, label) in ROLLOUT_REFUSALS.iter().enumerate() {
        sample(
            o,
            "vkx_rollout_documents_refused_total",
            &format!("reason=\"{label}\""),
            get(&r.refused[i]),
        );
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    /// Anything else, malformed requests included.
    NotFound,
}

/// Routes a request head: `GET /metrics` (a query string is ignored) over
/// HTTP/1.0 or 1.1 is [`Route::Metrics`]; everything else is not found.
pub fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::NotFound;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::NotFound;
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if method == "GET" && path == "/metrics" && matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Whether `head` holds a whole request head (ends with an empty line).
fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// Reads a request head: until the empty line, end of stream or
/// [`MAX_REQUEST_HEAD`] bytes, whichever comes first.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while head.len() < MAX_REQUEST_HEAD && !head_complete(&head) {
        let room = (MAX_REQUEST_HEAD - head.len()).min(buf.len());
        let n = s.read(&mut buf[..room]).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

fn response(status: &str, body: &str, content_type: &str) -> String {
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn exchange<S>(
    mut s: S,
    metrics: &Metrics,
    admission: &AdmissionControl,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read_head(&mut s))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no whole request head in time",
            )
        })??;
    let reply = match route(&head) {
        Route::Metrics => response(
            "200 OK",
            &render(
                metrics,
                &admission.usage(),
                vkx_common::ratelimit::suppressed_total(),
            ),
            CONTENT_TYPE,
        ),
        Route::NotFound => response("404 Not Found", "not found\n", "text/plain"),
    };
    s.write_all(reply.as_bytes()).await?;
    s.shutdown().await
}

/// A bound metrics listener.
#[derive(Debug)]
pub enum MetricsListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Binds the endpoint: a Unix socket (replacing a stale one, mode 0660) or
/// a TCP listener.
pub async fn bind(endpoint: &Endpoint) -> std::io::Result<MetricsListener> {
    match endpoint {
        Endpoint::Unix(path) => crate::listen::bind_local(path).map(MetricsListener::Unix),
        Endpoint::Tcp(addr) => TcpListener::bind(addr).await.map(MetricsListener::Tcp),
    }
}

/// Serves scrapes until `stop` turns true: at most
/// [`MAX_METRICS_CONNECTIONS`] at once, each for at most
/// [`EXCHANGE_TIMEOUT`].
pub async fn serve(
    listener: MetricsListener,
    metrics: Arc<Metrics>,
    admission: Arc<AdmissionControl>,
    stop: watch::Receiver<bool>,
) {
    let slots = Slots::new(MAX_METRICS_CONNECTIONS);
    let per_peer = Arc::new(crate::admission::PerKey::new(MAX_SCRAPES_PER_PEER));
    let serve = move |stream: Stream| {
        let key = match &stream {
            Stream::Unix(s) => s.peer_cred().map_or(u64::MAX, |c| u64::from(c.uid())),
            Stream::Tcp(s) => s.peer_addr().map_or(u64::MAX, |a| match a.ip() {
                std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
                std::net::IpAddr::V6(v6) => {
                    let b = v6.octets();
                    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                }
            }),
        };
        let Some(mine) = per_peer.try_acquire(key) else {
            rl_warn!("metrics: too many scrapes from one user at once; closing one");
            return None;
        };
        let Some(slot) = slots.try_acquire() else {
            rl_warn!("metrics: too many scrapes at once; closing one");
            return None;
        };
        let (metrics, admission) = (metrics.clone(), admission.clone());
        Some(async move {
            let done = match stream {
                Stream::Unix(s) => {
                    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(s, &metrics, &admission)).await
                }
                Stream::Tcp(s) => {
                    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(s, &metrics, &admission)).await
                }
            };
            if let Ok(Err(e)) = done {
                rl_warn!(error = %e, "metrics: scrape failed");
            }
            drop(slot);
            drop(mine);
        })
    };
    crate::listen::accept_loop(listener, "metrics", serve, stop).await;
}

/// One accepted scrape connection.
#[derive(Debug)]
pub enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl crate::listen::Accept for MetricsListener {
    type Conn = Stream;

    async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            MetricsListener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            MetricsListener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

/// Why [`fetch`] got no metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error("connect {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("metrics endpoint sent more than {MAX_RESPONSE} bytes")]
    TooLarge,
    #[error("metrics endpoint answered: {0}")]
    Status(String),
    #[error("metrics endpoint sent something that is not an HTTP response")]
    Malformed,
}

/// The client: `GET /metrics` on the Unix socket `socket`; the body.
pub async fn fetch(socket: &Path) -> Result<String, FetchError> {
    let work = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| FetchError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        (&mut s)
            .take(MAX_RESPONSE + 1)
            .read_to_end(&mut reply)
            .await?;
        if wide(reply.len()) > MAX_RESPONSE {
            return Err(FetchError::TooLarge);
        }
        parse_response(&reply)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, work)
        .await
        .map_err(|_| FetchError::Timeout(EXCHANGE_TIMEOUT))?
}

/// The body of a 200 response.
fn parse_response(reply: &[u8]) -> Result<String, FetchError> {
    let text = std::str::from_utf8(reply).map_err(|_| FetchError::Malformed)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or(FetchError::Malformed)?;
    let status = head.lines().next().ok_or(FetchError::Malformed)?;
    let code = status
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..))
        .ok_or(FetchError::Malformed)?;
    if !code.starts_with("200") {
        return Err(FetchError::Status(code.to_owned()));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::admission::{AdmissionConfig, Limits};
    use std::time::Instant;

    fn usage() -> Usage {
        Usage {
            open: 5,
            connections: 4,
            handshakes: 3,
            peers: 2,
            limits: Limits::new(2048, &AdmissionConfig::default()).unwrap(),
        }
    }

    /// The value of one sample line, e.g. `name{label="x"}`.
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let m = Arc::new(Metrics::default());
        m.handshake(HandshakeOutcome::Attested);
        m.handshake(HandshakeOutcome::Refused);
        m.handshake(HandshakeOutcome::Refused);
        m.error_sent(ErrorCode::Busy);
        m.error_sent(ErrorCode::Busy);
        m.error_sent(ErrorCode::RateLimited);
        m.error_sent(ErrorCode::Unknown(999));
        m.refused(RefuseReason::MaxHandshakes);
        m.keys_released(3);
        m.update_pushed();
        m.update_acked(true);
        m.update_acked(false);
        m.session_rate_limited();
        m.rewind(true);
        m.reload(true, 1_700_000_000);
        m.reload(false, 0);
        m.reload(false, 0);
        let guard = m.established();
        let all_on: Features = FEATURES
            .iter()
            .map(|(f, _)| (*f, FeatureState::Enabled))
            .collect();
        let ring = m.health.no_ring();
        let mut gauge = FeatureGauge::new(m.clone(), all_on.clone(), ring.clone());
        let _other = FeatureGauge::new(m.clone(), all_on.clone(), ring.clone());
        let mut killed = all_on.clone();
        killed.insert(feature::KEY_RELEASE, FeatureState::Disabled);
        gauge.set(&ring, &killed);
        m.rollout.update_sent();
        m.rollout.refused("replay");
        m.rollout.refused("no-such-label");
        m.rollout.accepted(7, 100, 200);
        m.rollout.feature(feature::KEY_RELEASE, true, Some(2));
        let none = m.health.no_ring();
        none.established();
        none.lost();
        none.request(crate::rollout::Feature::KeyRelease);
        none.refusal(
            crate::rollout::Feature::KeyRelease,
            ErrorCode::FeatureNotEnabled,
        );
        none.error_sent(ErrorCode::UnknownMessage);
        none.error_received(ErrorCode::Timeout);
        let t = render(&m, &usage(), 42);
        for (series, v) in [
            ("vkx_connections_open", "5"),
            ("vkx_connections", "4"),
            ("vkx_handshakes_in_progress", "3"),
            ("vkx_peer_buckets", "2"),
            ("vkx_sessions_established", "1"),
            ("vkx_admission_limit{limit=\"max_open\"}", "4096"),
            ("vkx_admission_limit{limit=\"max_handshakes\"}", "256"),
            ("vkx_handshakes_total{outcome=\"attested\"}", "1"),
            ("vkx_handshakes_total{outcome=\"refused\"}", "2"),
            ("vkx_handshakes_total{outcome=\"timeout\"}", "0"),
            ("vkx_errors_sent_total{code=\"busy\"}", "2"),
            ("vkx_errors_sent_total{code=\"rate-limited\"}", "1"),
            ("vkx_errors_sent_total{code=\"malformed\"}", "0"),
            ("vkx_errors_sent_total{code=\"unknown\"}", "1"),
            (
                "vkx_admissions_refused_total{reason=\"max_handshakes\"}",
                "1",
            ),
            ("vkx_admissions_refused_total{reason=\"max_open\"}", "0"),
            ("vkx_sessions_rate_limited_total", "1"),
            ("vkx_attestation_rewinds_total{action=\"refused\"}", "1"),
            ("vkx_attestation_rewinds_total{action=\"flagged\"}", "0"),
            ("vkx_log_lines_suppressed_total", "42"),
            ("vkx_reloads_total{outcome=\"ok\"}", "1"),
            ("vkx_reloads_total{outcome=\"invalid\"}", "2"),
            ("vkx_reload_last_success_timestamp_seconds", "1700000000"),
            ("vkx_keys_released_total", "3"),
            ("vkx_key_updates_pushed_total", "1"),
            ("vkx_key_updates_acked_total{result=\"installed\"}", "1"),
            ("vkx_key_updates_acked_total{result=\"failed\"}", "1"),
            (
                "vkx_feature_sessions{feature=\"key-release\",state=\"enabled\"}",
                "1",
            ),
            (
                "vkx_feature_sessions{feature=\"key-release\",state=\"disabled\"}",
                "1",
            ),
            (
                "vkx_feature_sessions{feature=\"key-rotation\",state=\"enabled\"}",
                "2",
            ),
            ("vkx_feature_updates_sent_total", "1"),
            (
                "vkx_rollout_documents_refused_total{reason=\"replay\"}",
                "1",
            ),
            ("vkx_rollout_documents_refused_total{reason=\"other\"}", "1"),
            ("vkx_rollout_revision", "7"),
            ("vkx_rollout_feature_killed{feature=\"key-release\"}", "1"),
            ("vkx_rollout_feature_stage{feature=\"key-release\"}", "3"),
            ("vkx_health_sessions_total{ring=\"(none)\"}", "1"),
            ("vkx_health_sessions_lost_total{ring=\"(none)\"}", "1"),
            (
                "vkx_health_attestation_failures_total{ring=\"(none)\"}",
                "0",
            ),
            (
                "vkx_health_requests_total{ring=\"(none)\",feature=\"key-release\"}",
                "1",
            ),
            (
                "vkx_health_grants_total{ring=\"(none)\",feature=\"key-release\"}",
                "0",
            ),
            // Two sessions with everything on, one of them then killed.
            (
                "vkx_health_enabled_sessions{ring=\"(none)\",feature=\"key-release\"}",
                "1",
            ),
            (
                "vkx_health_enabled_sessions{ring=\"(none)\",feature=\"key-rotation\"}",
                "2",
            ),
            (
                "vkx_health_refusals_total{ring=\"(none)\",feature=\"key-release\",code=\"feature-not-enabled\"}",
                "1",
            ),
            (
                "vkx_health_errors_sent_total{ring=\"(none)\",code=\"unknown-message\"}",
                "1",
            ),
            (
                "vkx_health_errors_received_total{ring=\"(none)\",code=\"timeout\"}",
                "1",
            ),
            ("vkx_health_publishes_total{result=\"failed\"}", "0"),
        ] {
            assert_eq!(value(&t, series).as_deref(), Some(v), "{series}\n{t}");
        }
        drop(guard);
        drop(gauge);
        let t = render(&m, &usage(), 42);
        assert_eq!(
            value(
                &t,
                "vkx_feature_sessions{feature=\"key-release\",state=\"disabled\"}"
            )
            .as_deref(),
            Some("0"),
            "a session's gauge goes with it"
        );
        assert_eq!(value(&t, "vkx_sessions_established").as_deref(), Some("0"));
        // Every registry code has its series.
        for r in REGISTRY {
            assert!(t.contains(&format!("code=\"{}\"", r.name)), "{}", r.name);
        }
        // Format: every sample's family is declared once, before it.
        let mut declared = Vec::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!declared.contains(&name.to_owned()), "{name} twice");
                declared.push(name.to_owned());
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.iter().any(|d| name == d
                        || name
                            .strip_prefix(d.as_str())
                            .is_some_and(|s| { ["_bucket", "_sum", "_count"].contains(&s) })),
                    "{line}"
                );
            }
        }
        assert!(t.ends_with('\n'));
    }

    #[test]
    fn the_latency_histogram_is_cumulative() {
        let m = Metrics::default();
        for ms in [5, 10, 11, 700, 29_000, 90_000] {
            m.handshake_latency(Duration::from_millis(ms));
        }
        let t = render(&m, &usage(), 0);
        let b = |le: &str| {
            value(
                &t,
                &format!("vkx_handshake_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(b("0.01").as_deref(), Some("2"));
        assert_eq!(b("0.025").as_deref(), Some("3"));
        assert_eq!(b("1").as_deref(), Some("4"));
        assert_eq!(b("30").as_deref(), Some("5"));
        assert_eq!(b("+Inf").as_deref(), Some("6"));
        assert_eq!(
            value(&t, "vkx_handshake_duration_seconds_count").as_deref(),
            Some("6")
        );
        assert_eq!(
            value(&t, "vkx_handshake_duration_seconds_sum").as_deref(),
            Some("119.726000")
        );
    }

    #[test]
    fn outcomes_follow_the_error_sent() {
        assert_eq!(
            HandshakeOutcome::for_code(ErrorCode::Timeout),
            HandshakeOutcome::Timeout
        );
        for c in [
            ErrorCode::Busy,
            ErrorCode::RateLimited,
            ErrorCode::AttestationFailed,
            ErrorCode::UnsupportedVersion,
        ] {
            assert_eq!(HandshakeOutcome::for_code(c), HandshakeOutcome::Refused);
        }
        for c in [ErrorCode::Malformed, ErrorCode::Internal] {
            assert_eq!(HandshakeOutcome::for_code(c), HandshakeOutcome::Failed);
        }
    }

    #[test]
    fn only_get_metrics_is_served() {
        for ok in [
            &b"GET /metrics HTTP/1.0\r\n\r\n"[..],
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            b"GET /metrics?x=1 HTTP/1.0\n\n",
        ] {
            assert_eq!(route(ok), Route::Metrics, "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"POST /metrics HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET /metricsx HTTP/1.0\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.0\r\n\r\n",
            b"GET /metrics HTTP/1.0 extra\r\n\r\n",
            b"get /metrics HTTP/1.0\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.0\r\n\r\n",
        ] {
            assert_eq!(route(bad), Route::NotFound, "{bad:?}");
        }
        assert!(head_complete(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!head_complete(b"GET / HTTP/1.0\r\n"));
    }

    #[test]
    fn responses_parse_and_statuses_are_checked() {
        let ok = response("200 OK", "a 1\n", CONTENT_TYPE);
        assert_eq!(parse_response(ok.as_bytes()).unwrap(), "a 1\n");
        let nf = response("404 Not Found", "not found\n", "text/plain");
        assert!(matches!(
            parse_response(nf.as_bytes()),
            Err(FetchError::Status(s)) if s.starts_with("404")
        ));
        assert!(matches!(
            parse_response(b"garbage"),
            Err(FetchError::Malformed)
        ));
    }

    #[test]
    fn the_endpoint_is_loopback_unless_allowed() {
        let c = |socket: Option<&str>, listen: Option<&str>, allow| MetricsConfig {
            socket: socket.map(PathBuf::from),
            listen: listen.map(str::to_owned),
            allow_non_loopback: allow,
        };
        assert_eq!(
            c(None, None, false).endpoint(),
            Ok(Endpoint::Unix(PathBuf::from(DEFAULT_METRICS_SOCKET)))
        );
        assert_eq!(
            c(Some("/m.sock"), None, false).endpoint(),
            Ok(Endpoint::Unix(PathBuf::from("/m.sock")))
        );
        assert!(matches!(
            c(None, Some("127.0.0.1:9461"), false).endpoint(),
            Ok(Endpoint::Tcp(_))
        ));
        assert!(matches!(
            c(None, Some("[::1]:9461"), false).endpoint(),
            Ok(Endpoint::Tcp(_))
        ));
        assert!(matches!(
            c(None, Some("0.0.0.0:9461"), false).endpoint(),
            Err(MetricsConfigError::NotLoopback(_))
        ));
        assert!(matches!(
            c(None, Some("0.0.0.0:9461"), true).endpoint(),
            Ok(Endpoint::Tcp(_))
        ));
        assert!(matches!(
            c(None, Some("localhost:9461"), false).endpoint(),
            Err(MetricsConfigError::BadAddress(_))
        ));
        assert_eq!(
            c(Some("/m"), Some("127.0.0.1:1"), false).endpoint(),
            Err(MetricsConfigError::Both)
        );
    }

    #[tokio::test]
    async fn serves_a_scrape_over_a_unix_socket_and_404s_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let listener = bind(&Endpoint::Unix(path.clone())).await.unwrap();
        let metrics = Arc::new(Metrics::default());
        metrics.error_sent(ErrorCode::Busy);
        let limits = Limits::new(4, &AdmissionConfig::default()).unwrap();
        let admission = Arc::new(AdmissionControl::new(limits, Instant::now()));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(serve(listener, metrics, admission, stop));
        let body = fetch(&path).await.unwrap();
        assert_eq!(
            value(&body, "vkx_errors_sent_total{code=\"busy\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&body, "vkx_admission_limit{limit=\"max_connections\"}").as_deref(),
            Some("4")
        );
        // Anything else: 404. An oversized head: answered, not read forever.
        for req in [
            b"GET /other HTTP/1.0\r\n\r\n".to_vec(),
            vec![b'A'; MAX_REQUEST_HEAD * 4],
        ] {
            let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
            let _ = s.write_all(&req).await;
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply).await;
            let reply = String::from_utf8(reply).unwrap();
            assert!(reply.starts_with("HTTP/1.0 404"), "{reply}");
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn half_sent_requests_of_one_user_cannot_blind_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let listener = bind(&Endpoint::Unix(path.clone())).await.unwrap();
        let limits = Limits::new(4, &AdmissionConfig::default()).unwrap();
        let admission = Arc::new(AdmissionControl::new(limits, Instant::now()));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            Arc::new(Metrics::default()),
            admission,
            stop,
        ));
        // A local user opens every slot and half-sends a request in each.
        let mut stalled = Vec::new();
        for _ in 0..MAX_METRICS_CONNECTIONS {
            let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
            // Refused ones may be closed before this lands.
            let _ = s.write_all(b"GET /metr").await;
            stalled.push(s);
        }
        // At most MAX_SCRAPES_PER_PEER are held for it; the others are
        // closed at once (this test is one uid, so a scrape of its own is
        // refused too until the head deadline frees them).
        let t = Instant::now();
        let mut closed = 0;
        for s in &mut stalled {
            let mut b = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(40), s.read(&mut b)).await
            {
                closed += 1;
            }
        }
        assert_eq!(closed, MAX_METRICS_CONNECTIONS - MAX_SCRAPES_PER_PEER);
        // The held ones are dropped at the head deadline: a scrape works
        // again soon after, stalled connections still open.
        let body = loop {
            if let Ok(b) = fetch(&path).await {
                break b;
            }
            assert!(t.elapsed() < REQUEST_HEAD_TIMEOUT * 3, "never served");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(body.contains("vkx_connections"), "{body}");
        drop(stalled);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn per_key_slots_are_capped_and_given_back() {
        let p = Arc::new(crate::admission::PerKey::new(2));
        let a = p.try_acquire(7).unwrap();
        let _b = p.try_acquire(7).unwrap();
        assert!(p.try_acquire(7).is_none());
        assert!(p.try_acquire(8).is_some(), "another user is not affected");
        drop(a);
        assert!(p.try_acquire(7).is_some());
    }
}
