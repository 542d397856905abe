//! Health signals for staged rollout (issue #12): what this host can
//! observe, per ring of the rollout document and per v1 feature, counted
//! where it happens and published as a compact summary for the rollout
//! controller (`vkx-host rollout run`), which compares the newly enabled
//! ring with the rings not yet enabled.
//!
//! What it counts ([`RingCounters`]): per (ring, feature) requests, grants
//! and refusals by registry code; per ring sessions established, sessions
//! lost (an Established session that ended other than in order: transport
//! dropped, timeout, protocol error), errors sent and received by code and
//! attestation failures; node-wide the log lines the rate limiter
//! suppressed. Two things are not counters: per (ring, feature) a gauge
//! of the Established sessions with the feature enabled now, and the
//! record of the live drill the node applies or applied last
//! ([`DrillCounters`], spec/ROLLOUT.md §13.5): when it applied and took
//! away the overlay, the sessions it told, their requests after. A VM's ring is [`crate::rollout::ring_of`] under the
//! accepted document, by name, so summaries of different nodes aggregate;
//! [`NO_RING`] when it is in none. A connection looks its ring up once per
//! document change ([`Health::ring`]) and keeps an `Arc` to the ring's
//! counters: an event is counted to the ring of its time, with relaxed
//! atomics and no lock per message.
//!
//! What it trusts: ring names from an accepted (validated) document, and
//! registry code names. A guest's bytes never become a name: an error code
//! the registry does not know is counted as `unknown`.
//!
//! What it bounds: ring slots ([`MAX_RING_SLOTS`]; a name of an older
//! document is evicted for one of the newest), the summary's bytes
//! ([`MAX_SUMMARY_BYTES`], checked before parsing), the rings and codes a
//! parsed summary may name, the summaries one read returns
//! ([`MAX_FLEET_SUMMARIES`]), and the publisher's rate
//! ([`MIN_INTERVAL`]..[`MAX_INTERVAL`]) and retries (the etcd source's
//! retry policy).
//!
//! The only I/O is the publisher task ([`publish`]) and the reader
//! ([`read_all`]): an etcd key per node (`<prefix>/<node>`) under a lease
//! of [`LEASE_INTERVALS`] × the interval, kept alive, so a dead node's
//! entry expires; or, with the file source (or none), the local file
//! `<node_dir>/rollout/health.json`, replaced atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vkx_common::errors::{ErrorCode, REGISTRY};
use vkx_common::wire::VmId;
use vkx_common::{rl_info, rl_warn};

use crate::rollout::document::{MAX_RINGS, check_node_name, check_ring_name};
use crate::rollout::drill_overlay::{DrillOverlay, check_drill_id};
use crate::rollout::{Document, Feature, View, VmFacts, ring_of};
use crate::source::{EtcdConfig, SourceKind};

/// The ring key of a VM in no ring (or on a node with no document).
/// Outside the ring-name charset (`[a-z0-9._-]`), so no ring of a
/// document can be named like it.
pub const NO_RING: &str = "(none)";
/// Rings with counters at once: the current document's (at most
/// [`MAX_RINGS`]) and as many of older documents, whose connections may
/// still count into them until they see the new one.
pub const MAX_RING_SLOTS: usize = 2 * MAX_RINGS;
/// The summary's format.
pub const FORMAT: u32 = 1;
/// Largest summary written or parsed. The worst case (every slot and
/// [`NO_RING`], every code of every map at `u64::MAX`) is ~230 KiB;
/// a real one is a few hundred bytes per ring.
pub const MAX_SUMMARY_BYTES: usize = 256 * 1024;
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

/// Slots of a by-code counter: one per registry row, one for `unknown`.
pub const CODE_SLOTS: usize = REGISTRY.len() + 1;
/// The label of codes the registry does not know.
pub const UNKNOWN_CODE: &str = "unknown";

fn code_slot(code: ErrorCode) -> usize {
    REGISTRY
        .iter()
        .position(|r| r.code == code)
        .unwrap_or(REGISTRY.len())
}

/// The label of code slot `i`.
pub fn code_label(i: usize) -> &'static str {
    REGISTRY.get(i).map_or(UNKNOWN_CODE, |r| r.name)
}

fn is_code_label(s: &str) -> bool {
    s == UNKNOWN_CODE || REGISTRY.iter().any(|r| r.name == s)
}

fn feature_slot(f: Feature) -> usize {
    Feature::ALL.iter().position(|x| *x == f).unwrap_or(0)
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

// ------------------------------------------------------------- counters

/// One feature's counters in one ring.
#[derive(Debug, Default)]
pub struct FeatureCounters {
    requests: AtomicU64,
    grants: AtomicU64,
    refusals: [AtomicU64; CODE_SLOTS],
    /// A gauge: Established sessions of the ring with the feature
    /// enabled now (`metrics::FeatureGauge` keeps it).
    enabled: AtomicU64,
}

/// One ring's counters. Units: a request is one `key-request` or
/// `derive-request` message (key-rotation: one pushed update); a grant is
/// one answered with everything asked (key-rotation: an update acked as
/// installed); a refusal is one refused, by the code the guest was told
/// (for a `key-release` that withheld keys, the first withheld key's).
#[derive(Debug, Default)]
pub struct RingCounters {
    sessions: AtomicU64,
    lost: AtomicU64,
    attest_failed: AtomicU64,
    errors_sent: [AtomicU64; CODE_SLOTS],
    errors_received: [AtomicU64; CODE_SLOTS],
    features: [FeatureCounters; 3],
}

impl RingCounters {
    pub fn request(&self, f: Feature) {
        add(&self.features[feature_slot(f)].requests);
    }

    pub fn grant(&self, f: Feature) {
        add(&self.features[feature_slot(f)].grants);
    }

    pub fn refusal(&self, f: Feature, code: ErrorCode) {
        add(&self.features[feature_slot(f)].refusals[code_slot(code)]);
    }

    /// An Established session of this ring has `f` enabled from now on
    /// (`on`), or no longer. Every `true` is matched by one `false`.
    pub fn enabled(&self, f: Feature, on: bool) {
        let c = &self.features[feature_slot(f)].enabled;
        if on {
            add(c);
        } else {
            // Saturating: a mismatch shows as zero, never as 2^64 - 1.
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// A session of this ring reached Established.
    pub fn established(&self) {
        add(&self.sessions);
    }

    /// An Established session of this ring ended other than in order.
    pub fn lost(&self) {
        add(&self.lost);
    }

    pub fn attestation_failed(&self) {
        add(&self.attest_failed);
    }

    pub fn error_sent(&self, code: ErrorCode) {
        add(&self.errors_sent[code_slot(code)]);
    }

    pub fn error_received(&self, code: ErrorCode) {
        add(&self.errors_received[code_slot(code)]);
    }

    fn summary(&self) -> RingSummary {
        let codes = |slots: &[AtomicU64; CODE_SLOTS]| -> BTreeMap<String, u64> {
            slots
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let n = get(c);
                    (n > 0).then(|| (code_label(i).to_owned(), n))
                })
                .collect()
        };
        RingSummary {
            sessions: get(&self.sessions),
            lost: get(&self.lost),
            attest_failed: get(&self.attest_failed),
            errors_sent: codes(&self.errors_sent),
            errors_received: codes(&self.errors_received),
            features: Feature::ALL
                .iter()
                .zip(&self.features)
                .map(|(f, c)| {
                    (
                        f.name().to_owned(),
                        FeatureSummary {
                            requests: get(&c.requests),
                            grants: get(&c.grants),
                            refusals: codes(&c.refusals),
                            enabled_sessions: get(&c.enabled),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// The ring table: names of the newest document seen, and the slots.
#[derive(Debug, Default)]
struct Table {
    /// The revision of the newest document seen, and its ring names.
    newest: u64,
    current: Vec<Arc<str>>,
    slots: Vec<(Arc<str>, Arc<RingCounters>)>,
}

/// What this node saw of a live drill (spec/ROLLOUT.md §14): when it
/// applied the overlay and took it away, and the sessions it told.
#[derive(Debug)]
pub struct DrillCounters {
    drill: String,
    feature: Feature,
    ring: String,
    applied_unix_ms: u64,
    /// 0 while the overlay is in force.
    ended_unix_ms: AtomicU64,
    told: AtomicU64,
    last_told_unix_ms: AtomicU64,
    requests_after: AtomicU64,
}

impl DrillCounters {
    /// A session told of the drill asked for its feature all the same.
    pub fn request_after(&self) {
        add(&self.requests_after);
    }

    pub fn feature(&self) -> Feature {
        self.feature
    }

    fn summary(&self) -> DrillSummary {
        let ended = get(&self.ended_unix_ms);
        DrillSummary {
            drill: self.drill.clone(),
            feature: self.feature.name().to_owned(),
            ring: self.ring.clone(),
            applied_unix_ms: self.applied_unix_ms,
            ended_unix_ms: (ended > 0).then_some(ended),
            told: get(&self.told),
            last_told_unix_ms: get(&self.last_told_unix_ms),
            requests_after: get(&self.requests_after),
        }
    }
}

/// Every ring's counters on this node, and the publisher's own.
#[derive(Debug, Default)]
pub struct Health {
    none: Arc<RingCounters>,
    /// Locked only when a connection looks its ring up (once per document
    /// change), by the publisher and by a scrape.
    table: RwLock<Table>,
    published: AtomicU64,
    publish_failed: AtomicU64,
    /// The live drill applied now, or the last one (locked per change of
    /// the overlay, per session told, and per summary).
    drill: RwLock<Option<Arc<DrillCounters>>>,
}

impl Health {
    /// The counters of the ring `vm` is in under `view` (`image`: its
    /// image name from the policy, if known).
    pub fn ring(&self, view: &View, vm: Option<&VmId>, image: Option<&str>) -> Arc<RingCounters> {
        let (Some(doc), Some(vm)) = (view.document(), vm) else {
            return self.none.clone();
        };
        let facts = VmFacts {
            vm_id: vm.clone(),
            image: image.map(str::to_owned),
            node: view.node.to_string(),
        };
        match ring_of(doc, &facts) {
            Some(p) => self.slot(&p.name, doc),
            None => self.none.clone(),
        }
    }

    /// The counters of ring `name` of `doc`: found, or given a slot,
    /// evicting a ring the newest document does not name if the table
    /// is full. A caller with an older document than the newest seen
    /// never evicts: it gets counters of their own (not published) if no
    /// slot is free, so nothing is counted to the wrong name.
    fn slot(&self, name: &str, doc: &Document) -> Arc<RingCounters> {
        {
            let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, c)) = t.slots.iter().find(|(n, _)| &**n == name) {
                return c.clone();
            }
        }
        let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
        Self::see(&mut t, doc);
        if let Some((_, c)) = t.slots.iter().find(|(n, _)| &**n == name) {
            return c.clone();
        }
        let fresh = Arc::new(RingCounters::default());
        if t.slots.len() < MAX_RING_SLOTS {
            t.slots.push((name.into(), fresh.clone()));
            return fresh;
        }
        if doc.revision() >= t.newest {
            let current = std::mem::take(&mut t.current);
            if let Some(i) = t
                .slots
                .iter()
                .position(|(n, _)| !current.iter().any(|c| c == n))
            {
                t.slots[i] = (name.into(), fresh.clone());
            }
            t.current = current;
        }
        fresh
    }

    /// Remembers `doc`'s ring names if it is the newest seen.
    fn see(t: &mut Table, doc: &Document) {
        if doc.revision() > t.newest || t.current.is_empty() {
            t.newest = doc.revision();
            t.current = doc.rings().iter().map(|r| Arc::from(r.name())).collect();
        }
    }

    /// The rollout task applied the overlay of `drill` at `now_ms`
    /// (again: nothing changes).
    pub fn drill_applied(&self, drill: &DrillOverlay, now_ms: u64) {
        let mut d = self.drill.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = &*d
            && c.drill == drill.drill()
            && get(&c.ended_unix_ms) == 0
        {
            return;
        }
        *d = Some(Arc::new(DrillCounters {
            drill: drill.drill().to_owned(),
            feature: drill.feature(),
            ring: drill.ring().to_owned(),
            applied_unix_ms: now_ms,
            ended_unix_ms: AtomicU64::new(0),
            told: AtomicU64::new(0),
            last_told_unix_ms: AtomicU64::new(0),
            requests_after: AtomicU64::new(0),
        }));
    }

    /// The overlay in force was taken away (removed or expired) at `now_ms`.
    pub fn drill_ended(&self, now_ms: u64) {
        let d = self.drill.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = &*d {
            let _ = c.ended_unix_ms.compare_exchange(
                0,
                now_ms.max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// A session was told that `drill` took its feature away, at
    /// `now_ms`: the drill's counters, for its later requests.
    pub fn drill_told(&self, drill: &str, now_ms: u64) -> Option<Arc<DrillCounters>> {
        let d = self.drill.read().unwrap_or_else(PoisonError::into_inner);
        let c = d.as_ref().filter(|c| c.drill == drill)?;
        add(&c.told);
        c.last_told_unix_ms.fetch_max(now_ms, Ordering::Relaxed);
        Some(c.clone())
    }

    fn drill_summary(&self) -> Option<DrillSummary> {
        let d = self.drill.read().unwrap_or_else(PoisonError::into_inner);
        d.as_ref().map(|c| c.summary())
    }

    /// The counters of VMs in no ring.
    pub fn no_ring(&self) -> Arc<RingCounters> {
        self.none.clone()
    }

    /// Gives every ring of `doc` a slot, so a summary shows the rings
    /// with no VMs on this node too (with zeros).
    pub fn track(&self, doc: &Document) {
        for r in doc.rings() {
            let _ = self.slot(r.name(), doc);
        }
    }

    /// Every ring's counters now, [`NO_RING`] first.
    fn rings(&self) -> Vec<(Arc<str>, Arc<RingCounters>)> {
        let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
        std::iter::once((Arc::from(NO_RING), self.none.clone()))
            .chain(t.slots.iter().cloned())
            .collect()
    }

    /// The summary of this node now.
    pub fn summary(
        &self,
        node: &str,
        revision: u64,
        at_unix: u64,
        suppressed: u64,
    ) -> HealthSummary {
        HealthSummary {
            format: FORMAT,
            node: node.to_owned(),
            at_unix,
            started_unix: started_unix(),
            revision,
            rings: self
                .rings()
                .into_iter()
                .map(|(n, c)| (n.to_string(), c.summary()))
                .collect(),
            suppressed,
            drill: self.drill_summary(),
        }
    }

    /// Publishes that succeeded and failed.
    pub fn publishes(&self) -> (u64, u64) {
        (get(&self.published), get(&self.publish_failed))
    }

    /// The Prometheus families of these counters (see `metrics`).
    pub(crate) fn render(&self, o: &mut String) {
        use crate::prom::{family, sample};
        let rings: Vec<(Arc<str>, RingSummary)> = self
            .rings()
            .into_iter()
            .map(|(n, c)| (n, c.summary()))
            .collect();
        let per_ring: [Family<RingSummary, u64>; 3] = [
            (
                "vkx_health_sessions_total",
                "Sessions established, by ring.",
                |r| r.sessions,
            ),
            (
                "vkx_health_sessions_lost_total",
                "Established sessions ended other than in order, by ring.",
                |r| r.lost,
            ),
            (
                "vkx_health_attestation_failures_total",
                "Evidence refused, by ring.",
                |r| r.attest_failed,
            ),
        ];
        for (name, help, value) in per_ring {
            family(o, name, "counter", help);
            for (ring, r) in &rings {
                sample(o, name, &format!("ring=\"{ring}\""), value(r));
            }
        }
        let per_feature: [Family<FeatureSummary, u64>; 2] = [
            (
                "vkx_health_requests_total",
                "Feature requests, by ring and feature.",
                |f| f.requests,
            ),
            (
                "vkx_health_grants_total",
                "Feature requests granted, by ring and feature.",
                |f| f.grants,
            ),
        ];
        for (name, help, value) in per_feature {
            family(o, name, "counter", help);
            for (ring, r) in &rings {
                for (fname, f) in &r.features {
                    sample(
                        o,
                        name,
                        &format!("ring=\"{ring}\",feature=\"{fname}\""),
                        value(f),
                    );
                }
            }
        }
        family(
            o,
            "vkx_health_refusals_total",
            "counter",
            "Feature requests refused, by ring, feature and code (codes seen only).",
        );
        for (ring, r) in &rings {
            for (fname, f) in &r.features {
                for (code, n) in &f.refusals {
                    sample(
                        o,
                        "vkx_health_refusals_total",
                        &format!("ring=\"{ring}\",feature=\"{fname}\",code=\"{code}\""),
                        *n,
                    );
                }
            }
        }
        type Codes = for<'a> fn(&'a RingSummary) -> &'a BTreeMap<String, u64>;
        let by_code: [(&str, &str, Codes); 2] = [
            (
                "vkx_health_errors_sent_total",
                "Errors sent to guests, by ring and code (codes seen only).",
                |r| &r.errors_sent,
            ),
            (
                "vkx_health_errors_received_total",
                "Errors received from guests, by ring and code (codes seen only).",
                |r| &r.errors_received,
            ),
        ];
        for (name, help, codes) in by_code {
            family(o, name, "counter", help);
            for (ring, r) in &rings {
                for (code, n) in codes(r) {
                    sample(o, name, &format!("ring=\"{ring}\",code=\"{code}\""), *n);
                }
            }
        }
        family(
            o,
            "vkx_health_publishes_total",
            "counter",
            "Health summaries published to the fleet store, by result.",
        );
        let (ok, failed) = self.publishes();
        sample(o, "vkx_health_publishes_total", "result=\"ok\"", ok);
        sample(o, "vkx_health_publishes_total", "result=\"failed\"", failed);
        // The live drill (its id is of [a-z0-9-], safe as a label).
        let drill = self.drill_summary();
        let per_drill: [Family<DrillSummary, u64>; 3] = [
            (
                "vkx_live_drill_active",
                "1 while a live drill's overlay is in force on this node.",
                |d| u64::from(d.ended_unix_ms.is_none()),
            ),
            (
                "vkx_live_drill_sessions_told_total",
                "Sessions sent a feature-update because of the live drill.",
                |d| d.told,
            ),
            (
                "vkx_live_drill_requests_after_total",
                "Requests for the drilled feature from sessions told of the drill.",
                |d| d.requests_after,
            ),
        ];
        for (name, help, value) in per_drill {
            family(
                o,
                name,
                if name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                },
                help,
            );
            if let Some(d) = &drill {
                sample(
                    o,
                    name,
                    &format!(
                        "drill=\"{}\",feature=\"{}\",ring=\"{}\"",
                        d.drill, d.feature, d.ring
                    ),
                    value(d),
                );
            }
        }
        family(
            o,
            "vkx_health_enabled_sessions",
            "gauge",
            "Established sessions with the feature enabled now, by ring and feature.",
        );
        for (ring, r) in &rings {
            for (fname, f) in &r.features {
                sample(
                    o,
                    "vkx_health_enabled_sessions",
                    &format!("ring=\"{ring}\",feature=\"{fname}\""),
                    f.enabled_sessions,
                );
            }
        }
    }
}

/// A metric family: name, help, and the value of one summary.
type Family<T, V> = (&'static str, &'static str, fn(&T) -> V);

/// When this process started (Unix seconds): a reader tells a restarted
/// node (counters from zero) from one whose counters went down.
fn started_unix() -> u64 {
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| unix(SystemTime::now()))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// -------------------------------------------------------------- summary

/// One node's counters, cumulative since `started_unix` (a reader takes
/// differences: [`delta`], [`fleet_delta`]). Parsed strictly
/// ([`HealthSummary::parse`]): it comes from the fleet store, untrusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSummary {
    pub format: u32,
    pub node: String,
    /// When it was taken (Unix seconds).
    pub at_unix: u64,
    /// When the node's process started: counters count from there.
    pub started_unix: u64,
    /// The accepted rollout document's revision (0: none).
    pub revision: u64,
    /// By ring name; [`NO_RING`] for VMs in none.
    pub rings: BTreeMap<String, RingSummary>,
    /// Log lines the rate limiter suppressed on the node.
    pub suppressed: u64,
    /// The live drill the node applies now or applied last, if any.
    #[serde(default)]
    pub drill: Option<DrillSummary>,
}

/// A node's view of a live drill ([`DrillCounters`]). Times are the
/// node's clock (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSummary {
    pub drill: String,
    pub feature: String,
    pub ring: String,
    pub applied_unix_ms: u64,
    /// When the node took the overlay away; `None` while in force.
    pub ended_unix_ms: Option<u64>,
    /// Sessions sent a `feature-update` because of the drill.
    pub told: u64,
    pub last_told_unix_ms: u64,
    /// Requests for the feature from sessions after they were told.
    pub requests_after: u64,
}

/// One ring's counters (also the per-ring totals of [`aggregate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingSummary {
    pub sessions: u64,
    pub lost: u64,
    pub attest_failed: u64,
    /// By registry code name (`unknown` for others); codes seen only.
    pub errors_sent: BTreeMap<String, u64>,
    pub errors_received: BTreeMap<String, u64>,
    /// By feature name (the three v1 features).
    pub features: BTreeMap<String, FeatureSummary>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSummary {
    pub requests: u64,
    pub grants: u64,
    pub refusals: BTreeMap<String, u64>,
    /// A gauge, not a counter: Established sessions with the feature
    /// enabled when the summary was taken (a difference keeps the later
    /// value).
    pub enabled_sessions: u64,
}

/// Why a summary was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SummaryError {
    #[error("health summary of {len} bytes is over the limit of {MAX_SUMMARY_BYTES}")]
    TooLarge { len: usize },
    #[error("health summary malformed: {0}")]
    Malformed(String),
    #[error("health summary format {0} is not {FORMAT}")]
    Format(u32),
    #[error("health summary invalid: {0}")]
    Invalid(String),
}

impl HealthSummary {
    /// Parses untrusted bytes: size first, then strict JSON, then every
    /// name checked (node, rings, features, codes) and every map bounded.
    pub fn parse(bytes: &[u8]) -> Result<Self, SummaryError> {
        if bytes.len() > MAX_SUMMARY_BYTES {
            return Err(SummaryError::TooLarge { len: bytes.len() });
        }
        let s: Self = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's message quotes at most a short token.
            SummaryError::Malformed(crate::rollout::shown(&e.to_string()))
        })?;
        s.validate()?;
        Ok(s)
    }

    /// The JSON of this summary, refused over [`MAX_SUMMARY_BYTES`].
    pub fn to_json(&self) -> Result<Vec<u8>, SummaryError> {
        let bytes = serde_json::to_vec(self).map_err(|e| SummaryError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_SUMMARY_BYTES {
            return Err(SummaryError::TooLarge { len: bytes.len() });
        }
        Ok(bytes)
    }

    fn validate(&self) -> Result<(), SummaryError> {
        let bad = |m: String| Err(SummaryError::Invalid(m));
        if self.format != FORMAT {
            return Err(SummaryError::Format(self.format));
        }
        if let Err(e) = check_node_name(&self.node) {
            return bad(format!("node: {e}"));
        }
        if self.rings.len() > MAX_RING_SLOTS + 1 {
            return bad(format!(
                "{} rings (at most {})",
                self.rings.len(),
                MAX_RING_SLOTS + 1
            ));
        }
        let codes = |what: &str, m: &BTreeMap<String, u64>| -> Result<(), SummaryError> {
            match m.keys().find(|k| !is_code_label(k)) {
                Some(k) => bad(format!(
                    "{what}: unknown code {:?}",
                    crate::rollout::shown(k)
                )),
                None => Ok(()),
            }
        };
        if let Some(d) = &self.drill {
            check_drill_id(&d.drill).map_err(|e| SummaryError::Invalid(e.to_string()))?;
            if let Err(e) = check_ring_name(&d.ring) {
                return bad(format!("drill ring: {e}"));
            }
            if Feature::from_name(&d.feature).is_none() {
                return bad(format!(
                    "drill feature {:?}",
                    crate::rollout::shown(&d.feature)
                ));
            }
        }
        for (name, ring) in &self.rings {
            if name != NO_RING && check_ring_name(name).is_err() {
                return bad(format!("ring name {:?}", crate::rollout::shown(name)));
            }
            codes("errors_sent", &ring.errors_sent)?;
            codes("errors_received", &ring.errors_received)?;
            for (fname, f) in &ring.features {
                if Feature::from_name(fname).is_none() {
                    return bad(format!("feature {:?}", crate::rollout::shown(fname)));
                }
                codes("refusals", &f.refusals)?;
            }
        }
        Ok(())
    }
}

fn sum_codes(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_default();
        *e = e.saturating_add(*v);
    }
}

impl RingSummary {
    fn add(&mut self, o: &RingSummary) {
        self.sessions = self.sessions.saturating_add(o.sessions);
        self.lost = self.lost.saturating_add(o.lost);
        self.attest_failed = self.attest_failed.saturating_add(o.attest_failed);
        sum_codes(&mut self.errors_sent, &o.errors_sent);
        sum_codes(&mut self.errors_received, &o.errors_received);
        for (name, f) in &o.features {
            let e = self.features.entry(name.clone()).or_default();
            e.requests = e.requests.saturating_add(f.requests);
            e.grants = e.grants.saturating_add(f.grants);
            sum_codes(&mut e.refusals, &f.refusals);
            e.enabled_sessions = e.enabled_sessions.saturating_add(f.enabled_sessions);
        }
    }

    /// `self - earlier`, or `None` if any counter went down (the ring's
    /// counters were reset: its slot was evicted and given again).
    fn minus(&self, earlier: &RingSummary) -> Option<RingSummary> {
        fn codes(
            l: &BTreeMap<String, u64>,
            e: &BTreeMap<String, u64>,
        ) -> Option<BTreeMap<String, u64>> {
            if e.iter().any(|(k, v)| l.get(k).copied().unwrap_or(0) < *v) {
                return None;
            }
            Some(
                l.iter()
                    .map(|(k, v)| (k.clone(), v - e.get(k).copied().unwrap_or(0)))
                    .filter(|(_, v)| *v > 0)
                    .collect(),
            )
        }
        let sub = |l: u64, e: u64| l.checked_sub(e);
        let zero = FeatureSummary::default();
        if earlier
            .features
            .keys()
            .any(|k| !self.features.contains_key(k))
        {
            return None;
        }
        let mut features = BTreeMap::new();
        for (name, l) in &self.features {
            let e = earlier.features.get(name).unwrap_or(&zero);
            features.insert(
                name.clone(),
                FeatureSummary {
                    requests: sub(l.requests, e.requests)?,
                    grants: sub(l.grants, e.grants)?,
                    refusals: codes(&l.refusals, &e.refusals)?,
                    enabled_sessions: l.enabled_sessions,
                },
            );
        }
        Some(RingSummary {
            sessions: sub(self.sessions, earlier.sessions)?,
            lost: sub(self.lost, earlier.lost)?,
            attest_failed: sub(self.attest_failed, earlier.attest_failed)?,
            errors_sent: codes(&self.errors_sent, &earlier.errors_sent)?,
            errors_received: codes(&self.errors_received, &earlier.errors_received)?,
            features,
        })
    }
}

/// Per-ring totals of `summaries` (by ring name, across nodes).
pub fn aggregate<'a>(
    summaries: impl IntoIterator<Item = &'a HealthSummary>,
) -> BTreeMap<String, RingSummary> {
    let mut totals: BTreeMap<String, RingSummary> = BTreeMap::new();
    for s in summaries {
        for (name, ring) in &s.rings {
            totals.entry(name.clone()).or_default().add(ring);
        }
    }
    totals
}

/// What one node counted between `earlier` and `later` (both its own):
/// per ring the differences. A node that restarted between them
/// (`started_unix` differs) counts from zero, so `later` is the
/// difference; so is a ring whose counters went down (reset), or a ring
/// new in `later`. `None` if they are of different nodes.
pub fn delta(later: &HealthSummary, earlier: &HealthSummary) -> Option<HealthSummary> {
    if later.node != earlier.node {
        return None;
    }
    let restarted = later.started_unix != earlier.started_unix;
    let rings = later
        .rings
        .iter()
        .map(|(name, l)| {
            let d = match earlier.rings.get(name) {
                Some(e) if !restarted => l.minus(e).unwrap_or_else(|| l.clone()),
                _ => l.clone(),
            };
            (name.clone(), d)
        })
        .collect();
    let suppressed = if restarted {
        later.suppressed
    } else {
        later.suppressed.saturating_sub(earlier.suppressed)
    };
    Some(HealthSummary {
        rings,
        suppressed,
        ..later.clone()
    })
}

/// What the fleet counted between two reads of the store
/// ([`fleet_delta`]), and what it could not see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetDelta {
    /// Per ring, summed over the nodes.
    pub rings: BTreeMap<String, RingSummary>,
    /// Log lines suppressed, summed over the nodes.
    pub suppressed: u64,
    /// Nodes in the earlier read and not the later one: gone (dead, or
    /// cut off from the store long enough for their entry to expire).
    /// Whatever they counted in the window is unknown.
    pub vanished: Vec<String>,
    /// Nodes whose process restarted in the window: counted from their
    /// restart; what they counted before it is unknown.
    pub restarted: Vec<String>,
    /// Nodes only in the later read whose counters began before the
    /// window: left out (their share of the window is unknown).
    pub left_out: Vec<String>,
}

impl FleetDelta {
    /// Nodes whose counts in the window are partly or wholly unknown: a
    /// verdict that would pass cannot (spec/ROLLOUT.md §13.2).
    pub fn gaps(&self) -> Option<String> {
        let mut parts = Vec::new();
        for (what, nodes) in [("vanished", &self.vanished), ("restarted", &self.restarted)] {
            if !nodes.is_empty() {
                let shown: Vec<&str> = nodes.iter().take(8).map(String::as_str).collect();
                parts.push(format!(
                    "{} node(s) {what} in the window ({}{})",
                    nodes.len(),
                    shown.join(", "),
                    if nodes.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ));
            }
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// The fleet's per-ring totals between two reads of the store: each
/// node's [`delta`], summed. `since` is when the earlier read was taken
/// (Unix seconds, the reader's clock). A node only in `later` counts if
/// it started at or after `since` (its counters are all new); otherwise
/// its history is unknown and it is left out. A node only in `earlier`
/// contributes nothing and is reported as vanished; a node that
/// restarted counts from its restart and is reported.
pub fn fleet_delta(later: &[HealthSummary], earlier: &[HealthSummary], since: u64) -> FleetDelta {
    let before: BTreeMap<&str, &HealthSummary> =
        earlier.iter().map(|s| (s.node.as_str(), s)).collect();
    let after: std::collections::BTreeSet<&str> = later.iter().map(|s| s.node.as_str()).collect();
    let mut out = FleetDelta {
        vanished: before
            .keys()
            .filter(|n| !after.contains(*n))
            .map(|n| (*n).to_owned())
            .collect(),
        ..FleetDelta::default()
    };
    let mut deltas: Vec<HealthSummary> = Vec::with_capacity(later.len());
    for l in later {
        match before.get(l.node.as_str()) {
            Some(e) => {
                if l.started_unix != e.started_unix {
                    out.restarted.push(l.node.clone());
                }
                deltas.extend(delta(l, e));
            }
            None if l.started_unix >= since => deltas.push(l.clone()),
            None => out.left_out.push(l.node.clone()),
        }
    }
    out.suppressed = deltas
        .iter()
        .map(|d| d.suppressed)
        .fold(0u64, u64::saturating_add);
    out.rings = aggregate(&deltas);
    out
}

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
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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

fn read_files(file: &Path, dir: Option<&Path>) -> Result<Fleet, String> {
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

#[cfg(test)]
mod tests;
