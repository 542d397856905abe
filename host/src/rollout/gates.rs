//! The gates of a rollout plan evaluated over one bake window
//! (spec/ROLLOUT.md §13.2): the ring just enabled (the candidate) against
//! absolute ceilings, and against the rings not yet enabled (the
//! baseline).
//!
//! What it is: one pure function, [`evaluate`], from the plan's gates and
//! the fleet's per-ring counters over the window (differences of health
//! summaries, `super::summary::fleet_delta`) to a verdict with the figures
//! it was made from.
//!
//! The rules:
//! - **Counts** (`errors`, `lost`, `attest_failures`, `refusals`,
//!   `suppressed`) are compared with their ceilings whatever the sample
//!   size: a flood of errors in a small sample still fails. More of a
//!   counted thing never turns a failure into a pass.
//! - **Rates** need a sample: fewer than `min_requests` requests of the
//!   feature or `min_sessions` sessions in the candidate ring make the
//!   verdict inconclusive (unless a count already failed it).
//! - **Ratios** compare a rate with the baseline's:
//!   `candidate ≤ ratio × baseline + slack`. When the baseline has less
//!   traffic than `min_baseline_traffic` (the last ring has no baseline at
//!   all), ratio gates are skipped and the skip is reported; the absolute
//!   gates still decide.
//! - Codes listed as expected (by default `feature-disabled` and
//!   `feature-not-enabled`, which a stage change causes by design for
//!   requests racing it) count neither as errors nor as refusals.
//!
//! What it trusts: the counters (parsed and bounded by `crate::health`).
//! What it bounds: nothing to bound; arithmetic saturates.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::plan::{Gate, Gates, Metric};
use super::summary::RingSummary;

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum GateVerdict {
    Pass,
    Fail { breaches: Vec<Breach> },
    Inconclusive { reason: String },
}

impl GateVerdict {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail { .. } => "fail",
            Self::Inconclusive { .. } => "inconclusive",
        }
    }

    pub fn is_fail(&self) -> bool {
        matches!(self, Self::Fail { .. })
    }
}

impl fmt::Display for GateVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pass => f.write_str("pass"),
            Self::Fail { breaches } => {
                f.write_str("fail: ")?;
                for (i, b) in breaches.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{b}")?;
                }
                Ok(())
            }
            Self::Inconclusive { reason } => write!(f, "inconclusive: {reason}"),
        }
    }
}

/// One gate breached: which, what was observed, and the limit it
/// exceeded (for a ratio, `ratio × baseline + slack`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Breach {
    pub gate: String,
    pub metric: Metric,
    pub observed: f64,
    pub limit: f64,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {} over {} ({})",
            self.metric,
            short(self.observed),
            short(self.limit),
            self.gate
        )
    }
}

/// A number for a report: integers as such, rates to 4 significant
/// decimals.
pub fn short(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        format!("{x:.4}")
    }
}

/// The figures a verdict was made from.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Candidate ring: requests of the plan's feature, sessions
    /// established, traffic (sessions + requests of every feature).
    pub requests: u64,
    pub sessions: u64,
    pub traffic: u64,
    pub errors: u64,
    pub lost: u64,
    pub attest_failures: u64,
    pub refusals: u64,
    /// Fleet-wide log lines suppressed over the window.
    pub suppressed: u64,
    pub baseline_traffic: u64,
    /// Rates of the candidate and of the baseline, by metric name.
    pub rates: BTreeMap<String, f64>,
    pub baseline_rates: BTreeMap<String, f64>,
    /// Gates not evaluated, and why.
    pub skipped: Vec<String>,
}

/// The verdict and its figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub verdict: GateVerdict,
    pub figures: Figures,
}

/// Counts of one ring, with the expected codes taken out.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    sessions: u64,
    traffic: u64,
    errors: u64,
    lost: u64,
    attest_failures: u64,
    refusals: u64,
}

fn counts(gates: &Gates, r: &RingSummary) -> Counts {
    let unexpected = |m: &BTreeMap<String, u64>| -> u64 {
        m.iter()
            .filter(|(code, _)| !gates.expected_codes.iter().any(|c| c == *code))
            .fold(0u64, |a, (_, n)| a.saturating_add(*n))
    };
    let feature = r.features.get(gates.feature.name());
    let all_requests = r
        .features
        .values()
        .fold(0u64, |a, f| a.saturating_add(f.requests));
    Counts {
        requests: feature.map_or(0, |f| f.requests),
        sessions: r.sessions,
        traffic: r.sessions.saturating_add(all_requests),
        errors: unexpected(&r.errors_sent).saturating_add(unexpected(&r.errors_received)),
        lost: r.lost,
        attest_failures: r.attest_failed,
        refusals: feature.map_or(0, |f| unexpected(&f.refusals)),
    }
}

/// `n / d`, a zero denominator counting as one.
#[allow(clippy::cast_precision_loss)]
fn rate(n: u64, d: u64) -> f64 {
    n as f64 / d.max(1) as f64
}

impl Counts {
    #[allow(clippy::cast_precision_loss)]
    fn value(&self, m: Metric, suppressed: u64) -> f64 {
        match m {
            Metric::Errors => self.errors as f64,
            Metric::ErrorRate => rate(self.errors, self.traffic),
            Metric::Lost => self.lost as f64,
            Metric::LostRate => rate(self.lost, self.sessions),
            Metric::AttestFailures => self.attest_failures as f64,
            Metric::AttestFailureRate => rate(self.attest_failures, self.sessions),
            Metric::Refusals => self.refusals as f64,
            Metric::RefusalRate => rate(self.refusals, self.requests),
            Metric::Suppressed => suppressed as f64,
        }
    }
}

/// Evaluates `gates` on `candidate` (the ring just enabled) against
/// `baseline` (the rings not yet enabled, summed), with `suppressed` the
/// fleet's suppressed log lines, all over the same window.
pub fn evaluate(
    gates: &Gates,
    candidate: &RingSummary,
    baseline: &RingSummary,
    suppressed: u64,
) -> Evaluation {
    let c = counts(gates, candidate);
    let b = counts(gates, baseline);
    let mut figures = Figures {
        requests: c.requests,
        sessions: c.sessions,
        traffic: c.traffic,
        errors: c.errors,
        lost: c.lost,
        attest_failures: c.attest_failures,
        refusals: c.refusals,
        suppressed,
        baseline_traffic: b.traffic,
        ..Figures::default()
    };
    let mut short_of = Vec::new();
    if c.requests < gates.min_requests {
        short_of.push(format!(
            "{} requests of {} (need {})",
            c.requests,
            gates.feature.name(),
            gates.min_requests
        ));
    }
    if c.sessions < gates.min_sessions {
        short_of.push(format!(
            "{} sessions (need {})",
            c.sessions, gates.min_sessions
        ));
    }
    let conclusive = short_of.is_empty();
    let baseline_ok = b.traffic >= gates.min_baseline_traffic && b.traffic > 0;
    let mut breaches = Vec::new();
    for g in &gates.list {
        let m = g.metric();
        let observed = c.value(m, suppressed);
        if !m.is_count() {
            figures.rates.insert(m.name().to_owned(), observed);
        }
        let limit = match g {
            Gate::Max { max, .. } => {
                if !m.is_count() && !conclusive {
                    continue;
                }
                *max
            }
            Gate::Ratio { ratio, slack, .. } => {
                if !conclusive {
                    continue;
                }
                if !baseline_ok {
                    figures.skipped.push(format!(
                        "{g}: baseline traffic {} below {}",
                        b.traffic,
                        gates.min_baseline_traffic.max(1)
                    ));
                    continue;
                }
                let base = b.value(m, 0);
                figures.baseline_rates.insert(m.name().to_owned(), base);
                ratio * base + slack
            }
        };
        if observed > limit {
            breaches.push(Breach {
                gate: g.to_string(),
                metric: m,
                observed,
                limit,
            });
        }
    }
    let verdict = if !breaches.is_empty() {
        GateVerdict::Fail { breaches }
    } else if !conclusive {
        GateVerdict::Inconclusive {
            reason: format!("too little traffic: {}", short_of.join(", ")),
        }
    } else {
        GateVerdict::Pass
    };
    Evaluation { verdict, figures }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;
    use crate::rollout::Feature;
    use crate::rollout::plan::DEFAULT_EXPECTED_CODES;
    use crate::rollout::summary::FeatureSummary;

    fn gates(list: Vec<Gate>) -> Gates {
        Gates {
            min_requests: 100,
            min_sessions: 10,
            min_baseline_traffic: 50,
            expected_codes: DEFAULT_EXPECTED_CODES.map(str::to_owned).to_vec(),
            list,
            feature: Feature::KeyRelease,
        }
    }

    fn all_gates() -> Vec<Gate> {
        vec![
            Gate::Max {
                metric: Metric::Errors,
                max: 20.0,
            },
            Gate::Max {
                metric: Metric::ErrorRate,
                max: 0.05,
            },
            Gate::Max {
                metric: Metric::RefusalRate,
                max: 0.1,
            },
            Gate::Max {
                metric: Metric::Suppressed,
                max: 100.0,
            },
            Gate::Ratio {
                metric: Metric::ErrorRate,
                ratio: 2.0,
                slack: 0.001,
            },
            Gate::Ratio {
                metric: Metric::LostRate,
                ratio: 2.0,
                slack: 0.01,
            },
        ]
    }

    fn ring(sessions: u64, requests: u64, errors: u64, lost: u64) -> RingSummary {
        let mut r = RingSummary {
            sessions,
            lost,
            ..RingSummary::default()
        };
        if errors > 0 {
            r.errors_sent.insert("unknown-message".into(), errors);
        }
        r.features.insert(
            "key-release".into(),
            FeatureSummary {
                requests,
                grants: requests,
                refusals: BTreeMap::new(),
                enabled_sessions: 0,
            },
        );
        r
    }

    #[test]
    fn a_healthy_ring_passes_and_reports_its_figures() {
        let e = evaluate(
            &gates(all_gates()),
            &ring(20, 200, 1, 0),
            &ring(100, 0, 1, 0),
            3,
        );
        assert_eq!(e.verdict, GateVerdict::Pass);
        assert_eq!(e.figures.requests, 200);
        assert_eq!(e.figures.traffic, 220);
        assert_eq!(e.figures.baseline_traffic, 100);
        assert!((e.figures.rates["error_rate"] - 1.0 / 220.0).abs() < 1e-12);
        assert!((e.figures.baseline_rates["error_rate"] - 0.01).abs() < 1e-12);
    }

    #[test]
    fn a_ring_worse_than_its_baseline_fails_with_each_breach_named() {
        // 5 % errors, under the 5 % ceiling... but 5x the baseline's 1 %.
        let e = evaluate(
            &gates(all_gates()),
            &ring(20, 180, 10, 0),
            &ring(100, 0, 1, 0),
            0,
        );
        let GateVerdict::Fail { breaches } = &e.verdict else {
            panic!("{:?}", e.verdict)
        };
        assert_eq!(breaches.len(), 1);
        assert_eq!(breaches[0].metric, Metric::ErrorRate);
        assert!((breaches[0].observed - 0.05).abs() < 1e-12);
        assert!((breaches[0].limit - 0.021).abs() < 1e-12);
        assert!(
            e.verdict
                .to_string()
                .contains("error_rate = 0.0500 over 0.0210")
        );
    }

    #[test]
    fn too_little_traffic_is_inconclusive_but_a_flood_still_fails() {
        let quiet = evaluate(
            &gates(all_gates()),
            &ring(2, 5, 1, 1),
            &ring(100, 0, 0, 0),
            0,
        );
        assert!(
            matches!(&quiet.verdict, GateVerdict::Inconclusive { reason }
                if reason.contains("5 requests of key-release (need 100)")
                    && reason.contains("2 sessions (need 10)")),
            "{:?}",
            quiet.verdict
        );
        let flood = evaluate(
            &gates(all_gates()),
            &ring(2, 0, 500, 0),
            &ring(100, 0, 0, 0),
            0,
        );
        assert!(flood.verdict.is_fail(), "{:?}", flood.verdict);
        let logs = evaluate(
            &gates(all_gates()),
            &ring(2, 0, 0, 0),
            &ring(0, 0, 0, 0),
            101,
        );
        assert!(logs.verdict.is_fail());
    }

    #[test]
    fn without_a_baseline_ratio_gates_are_skipped_and_reported() {
        let e = evaluate(
            &gates(all_gates()),
            &ring(20, 200, 1, 0),
            &RingSummary::default(),
            0,
        );
        assert_eq!(e.verdict, GateVerdict::Pass);
        assert_eq!(e.figures.skipped.len(), 2);
        assert!(e.figures.skipped[0].contains("baseline traffic 0 below 50"));
    }

    #[test]
    fn expected_codes_are_neither_errors_nor_refusals() {
        let mut c = ring(20, 200, 0, 0);
        c.errors_sent.insert("feature-disabled".into(), 40);
        c.features
            .get_mut("key-release")
            .unwrap()
            .refusals
            .insert("feature-disabled".into(), 40);
        let e = evaluate(&gates(all_gates()), &c, &ring(100, 0, 0, 0), 0);
        assert_eq!(e.verdict, GateVerdict::Pass);
        assert_eq!((e.figures.errors, e.figures.refusals), (0, 0));
        c.features
            .get_mut("key-release")
            .unwrap()
            .refusals
            .insert("not-permitted".into(), 40);
        let e = evaluate(&gates(all_gates()), &c, &ring(100, 0, 0, 0), 0);
        assert!(e.verdict.is_fail());
        assert_eq!(e.figures.refusals, 40);
    }

    fn arb_ring() -> impl Strategy<Value = RingSummary> {
        (0u64..200, 0u64..400, 0u64..100, 0u64..50).prop_map(|(s, r, e, l)| ring(s, r, e, l))
    }

    proptest! {
        #[test]
        fn more_errors_never_turn_a_failure_into_a_pass(
            cand in arb_ring(),
            base in arb_ring(),
            extra in 1u64..1000,
            suppressed in 0u64..200,
        ) {
            let g = gates(all_gates());
            let before = evaluate(&g, &cand, &base, suppressed).verdict;
            let mut worse = cand.clone();
            *worse.errors_sent.entry("unknown-message".into()).or_default() += extra;
            let after = evaluate(&g, &worse, &base, suppressed).verdict;
            if before.is_fail() {
                prop_assert!(after.is_fail(), "{before:?} -> {after:?}");
            }
            // Errors never change conclusiveness.
            let inconclusive = |v: &GateVerdict| matches!(v, GateVerdict::Inconclusive { .. });
            if inconclusive(&after) {
                prop_assert!(inconclusive(&before));
            }
            if before == GateVerdict::Pass {
                prop_assert!(!inconclusive(&after));
            }
        }

        #[test]
        fn below_the_sample_only_counts_decide(
            sessions in 0u64..10,
            requests in 0u64..100,
            errors in 0u64..100,
            lost in 0u64..50,
            base in arb_ring(),
        ) {
            let g = gates(all_gates());
            let e = evaluate(&g, &ring(sessions, requests, errors, lost), &base, 0).verdict;
            if errors > 20 {
                prop_assert!(e.is_fail());
            } else {
                let inconclusive = matches!(e, GateVerdict::Inconclusive { .. });
                prop_assert!(inconclusive, "{e:?}");
            }
        }
    }
}
