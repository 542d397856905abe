//! The host agent's metrics: counters and gauges kept in atomics (no lock
//! on any connection's path), rendered in the Prometheus text format
//! (version 0.0.4) by a minimal HTTP/1.0 endpoint of `vkx-host serve`.
//!
//! - this file: the counters ([`Metrics`], [`RolloutMetrics`]) and the
//!   guards that count a live session ([`EstablishedGuard`],
//!   [`FeatureGauge`]);
//! - [`render`](mod@render): the text exposition of all of them;
//! - [`http`]: the endpoint (`[metrics]` of host.toml), its limits and
//!   its client ([`fetch`]).
//!
//! The counters are exact whatever the log limiter drops: every event is
//! counted where it happens, and the limiter's own count of dropped lines
//! is exported as `vkx_log_lines_suppressed_total`.
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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vkx_common::errors::{ErrorCode, REGISTRY};
use vkx_common::wire::{FeatureState, Features, feature};

use crate::admission::RefuseReason;
use crate::health::RingCounters;
use crate::rollout::Feature;

mod http;
mod render;

pub use http::{
    DEFAULT_METRICS_SOCKET, EXCHANGE_TIMEOUT, Endpoint, FetchError, MAX_METRICS_CONNECTIONS,
    MAX_REQUEST_HEAD, MAX_RESPONSE, MAX_SCRAPES_PER_PEER, MetricsConfig, MetricsConfigError,
    MetricsListener, REQUEST_HEAD_TIMEOUT, Route, Stream, bind, fetch, route, serve,
};
pub use render::render;

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
    pub health: Arc<crate::health::Health>,
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

fn wide(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
