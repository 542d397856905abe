//! What a drill saw and its verdict: the hosts' metrics sampled at a fixed
//! interval ([`Samples`]), the timeline of events (t+seconds from the
//! drill's start), and the SLOs each scenario names as constants, checked
//! against what was measured ([`Slo`]).
//!
//! What it trusts: the sandbox's own hosts' metrics text (parsed
//! leniently: a line it does not understand is skipped). What it bounds:
//! samples kept ([`MAX_SAMPLES`]) and events ([`MAX_EVENTS`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Samples kept: 4 per second for an hour.
pub const MAX_SAMPLES: usize = 14_400;
/// Timeline events kept.
pub const MAX_EVENTS: usize = 256;

/// One scrape of every host, summed over the hosts.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since the drill's start.
    pub t: f64,
    /// Per ring: requests of every feature (`vkx_health_requests_total`).
    pub requests: BTreeMap<String, u64>,
    /// Per ring: requests of the rolled-out feature.
    pub feature_requests: BTreeMap<String, u64>,
    /// Per ring: errors sent (`vkx_health_errors_sent_total`).
    pub errors: BTreeMap<String, u64>,
    /// Per ring: `unknown-message` errors sent.
    pub unknown: BTreeMap<String, u64>,
    /// `vkx_feature_updates_sent_total`.
    pub updates_sent: u64,
    /// Hosts whose rollout source is up.
    pub sources_up: u64,
    /// Hosts that answered this scrape.
    pub hosts: usize,
    /// `vkx_rollout_revision` of each host that answered, in order.
    pub revisions: Vec<u64>,
}

impl Sample {
    /// Adds one host's metrics text.
    pub fn add(&mut self, text: &str, feature: &str) {
        self.hosts += 1;
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let v = v.max(0.0) as u64;
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let label = |key: &str| -> Option<&str> {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == key).then(|| v.trim_matches('"'))
                })
            };
            match name {
                "vkx_health_requests_total" => {
                    let Some(ring) = label("ring") else { continue };
                    *self.requests.entry(ring.to_owned()).or_default() += v;
                    if label("feature") == Some(feature) {
                        *self.feature_requests.entry(ring.to_owned()).or_default() += v;
                    }
                }
                "vkx_health_errors_sent_total" => {
                    let Some(ring) = label("ring") else { continue };
                    *self.errors.entry(ring.to_owned()).or_default() += v;
                    if label("code") == Some("unknown-message") {
                        *self.unknown.entry(ring.to_owned()).or_default() += v;
                    }
                }
                "vkx_feature_updates_sent_total" => self.updates_sent += v,
                "vkx_rollout_source_up" => self.sources_up += v,
                "vkx_rollout_revision" => self.revisions.push(v),
                _ => {}
            }
        }
    }

    pub fn total(map: &BTreeMap<String, u64>) -> u64 {
        map.values().sum()
    }
}

/// The samples of a drill, in time order.
#[derive(Debug, Default)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    pub fn push(&mut self, s: Sample) {
        if self.0.len() < MAX_SAMPLES {
            self.0.push(s);
        }
    }

    /// The first sample at or after `t` whose `f` holds.
    pub fn first_after(&self, t: f64, f: impl Fn(&Sample) -> bool) -> Option<&Sample> {
        self.0.iter().find(|s| s.t >= t && f(s))
    }

    /// The last sample at or before `t`.
    pub fn at(&self, t: f64) -> Option<&Sample> {
        self.0.iter().rev().find(|s| s.t <= t)
    }

    pub fn last(&self) -> Option<&Sample> {
        self.0.last()
    }

    /// Every ring named in any sample, in the order of `order` first.
    pub fn rings(&self, order: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = order.iter().map(|s| (*s).to_owned()).collect();
        for s in &self.0 {
            for r in s.requests.keys().chain(s.errors.keys()) {
                if !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }
}

/// One event of the timeline.
#[derive(Debug, Clone)]
pub struct Event {
    pub t: f64,
    /// A short tag the picture prints at its marker ("stage 10pct").
    pub tag: String,
    pub detail: String,
}

/// A service-level objective and what was measured.
#[derive(Debug, Clone)]
pub struct Slo {
    pub name: &'static str,
    /// The measured figure, `None` when it could not be measured (a miss).
    pub measured: Option<f64>,
    pub bound: f64,
    pub unit: &'static str,
}

impl Slo {
    pub fn pass(&self) -> bool {
        self.measured.is_some_and(|m| m <= self.bound)
    }

    fn fmt_value(v: f64, unit: &str) -> String {
        if unit == "s" {
            format!("{v:.3} s")
        } else {
            #[allow(clippy::cast_possible_truncation)]
            let n = v.round() as i64;
            format!("{n} {unit}")
        }
    }
}

/// A drill's record: its start, events and SLOs.
#[derive(Debug)]
pub struct Timeline {
    pub start: Instant,
    pub events: Vec<Event>,
    pub slos: Vec<Slo>,
    /// Facts printed after the timeline (sizes, wall times).
    pub notes: Vec<String>,
}

impl Timeline {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            events: Vec::new(),
            slos: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Seconds from the drill's start to `at`.
    pub fn t(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    pub fn now(&self) -> f64 {
        self.t(Instant::now())
    }

    pub fn event(&mut self, t: f64, tag: impl Into<String>, detail: impl Into<String>) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(Event {
                t,
                tag: tag.into(),
                detail: detail.into(),
            });
        }
    }

    pub fn slo(
        &mut self,
        name: &'static str,
        measured: Option<f64>,
        bound: f64,
        unit: &'static str,
    ) {
        self.slos.push(Slo {
            name,
            measured,
            bound,
            unit,
        });
    }

    pub fn slo_duration(
        &mut self,
        name: &'static str,
        measured: Option<Duration>,
        bound: Duration,
    ) {
        self.slo(
            name,
            measured.map(|d| d.as_secs_f64()),
            bound.as_secs_f64(),
            "s",
        );
    }

    pub fn pass(&self) -> bool {
        self.slos.iter().all(Slo::pass)
    }

    /// The timeline and the verdict, as the drill prints them.
    pub fn render(&self, scenario: &str, picture: Option<&Path>) -> String {
        let mut events = self.events.clone();
        events.sort_by(|a, b| a.t.total_cmp(&b.t));
        let mut out = format!("drill {scenario}: timeline\n");
        for e in &events {
            out += &format!("  t+{:>7.3}s  {:<20} {}\n", e.t, e.tag, e.detail);
        }
        out += "SLOs\n";
        for s in &self.slos {
            let measured = s
                .measured
                .map_or_else(|| "not measured".to_owned(), |m| Slo::fmt_value(m, s.unit));
            out += &format!(
                "  {:<44} {:>14}  (bound {})  {}\n",
                s.name,
                measured,
                Slo::fmt_value(s.bound, s.unit),
                if s.pass() { "PASS" } else { "MISS" }
            );
        }
        for n in &self.notes {
            out += &format!("  note: {n}\n");
        }
        if let Some(p) = picture {
            out += &format!("picture: {}\n", p.display());
        }
        out += &format!(
            "verdict: {} ({scenario}: {}/{} SLOs met)\n",
            if self.pass() { "PASS" } else { "FAIL" },
            self.slos.iter().filter(|s| s.pass()).count(),
            self.slos.len()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_sums_rings_over_hosts() {
        let text = "vkx_health_requests_total{ring=\"1pct\",feature=\"key-derivation\"} 3\n\
                    vkx_health_requests_total{ring=\"1pct\",feature=\"key-release\"} 2\n\
                    vkx_health_errors_sent_total{ring=\"1pct\",code=\"unknown-message\"} 4\n\
                    vkx_feature_updates_sent_total 7\n# HELP x\ngarbage line\n";
        let mut s = Sample::default();
        s.add(text, "key-derivation");
        s.add(text, "key-derivation");
        assert_eq!(s.requests["1pct"], 10);
        assert_eq!(s.feature_requests["1pct"], 6);
        assert_eq!(s.unknown["1pct"], 8);
        assert_eq!(s.updates_sent, 14);
        assert_eq!(s.hosts, 2);
    }

    #[test]
    fn a_missing_measurement_misses() {
        let mut t = Timeline::new(Instant::now());
        t.slo("x", None, 1.0, "s");
        t.slo("y", Some(0.5), 1.0, "s");
        assert!(!t.pass());
        let text = t.render("clean", None);
        assert!(text.contains("verdict: FAIL"), "{text}");
        assert!(text.contains("not measured"), "{text}");
    }
}
