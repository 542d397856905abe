//! The health summary: one node's health counters as the versioned JSON
//! value it publishes to the fleet store (`crate::health`), and what the
//! rollout controller computes from the summaries of the fleet: per-ring
//! totals ([`aggregate`]), one node's differences between two reads
//! ([`delta`]) and the fleet's ([`fleet_delta`], with the nodes whose
//! counts are unknown).
//!
//! What it trusts: nothing of a summary it parses. One comes from the
//! fleet store, which any node (or anyone who can write under the
//! prefix) writes: [`HealthSummary::parse`] checks the size before
//! parsing, then parses strictly, then checks every name (node, rings,
//! features, codes) and bounds every map.
//!
//! What it bounds: a summary's bytes ([`MAX_SUMMARY_BYTES`]) and the rings
//! it may name ([`MAX_RING_SLOTS`] and [`NO_RING`]). Pure: no I/O, no
//! logging.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vkx_common::errors::REGISTRY;

use super::Feature;
use super::document::{MAX_RINGS, check_node_name, check_ring_name};
use super::drill_overlay::check_drill_id;

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
/// The label of codes the registry does not know.
pub const UNKNOWN_CODE: &str = "unknown";

fn is_code_label(s: &str) -> bool {
    s == UNKNOWN_CODE || REGISTRY.iter().any(|r| r.name == s)
}

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

/// A node's view of a live drill (`crate::health::DrillCounters`). Times are the
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
