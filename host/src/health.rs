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
//! away the overlay, the sessions it told, their requests after. A VM's
//! ring is [`crate::rollout::ring_of`] under the accepted document, by
//! name, so summaries of different nodes aggregate;
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
//! document is evicted for one of the newest) and, per ring, the codes
//! and features (fixed tables).
//!
//! Split by what it is for: the counters are here; the summary they are
//! published as, its strict parser and the fleet arithmetic the rollout
//! controller does with it are `crate::rollout::summary` (the controller's
//! input); where summaries go and come from (settings, the publisher task
//! [`publish`], the reader [`read_all`]) is `store`. Both are re-exported
//! here: the only I/O is the store's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use vkx_common::errors::{ErrorCode, REGISTRY};
use vkx_common::wire::VmId;

use crate::rollout::drill_overlay::DrillOverlay;
use crate::rollout::{Document, Feature, View, VmFacts, ring_of};

mod store;

pub use crate::rollout::summary::{
    DrillSummary, FORMAT, FeatureSummary, FleetDelta, HealthSummary, MAX_RING_SLOTS,
    MAX_SUMMARY_BYTES, NO_RING, RingSummary, SummaryError, UNKNOWN_CODE, aggregate, delta,
    fleet_delta,
};
pub use store::{
    DEFAULT_INTERVAL_MS, DEFAULT_PREFIX, Fleet, HEALTH_FILE, HealthSettings, HealthStore,
    LEASE_INTERVALS, MAX_FLEET_BYTES, MAX_FLEET_SUMMARIES, MAX_INTERVAL, MAX_PREFIX_BYTES,
    MIN_INTERVAL, MIN_LEASE_TTL_S, etcd_key, publish, read_all,
};

/// Slots of a by-code counter: one per registry row, one for `unknown`.
pub const CODE_SLOTS: usize = REGISTRY.len() + 1;

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
        use crate::prom::{by_label, family, sample};
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
            by_label(
                o,
                (name, "counter", help),
                "ring",
                rings.iter().map(|(ring, r)| (&**ring, value(r))),
            );
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

#[cfg(test)]
mod tests;
