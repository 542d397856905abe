//! A rollout plan (`vkx-host rollout run --plan PLAN.toml`, spec/ROLLOUT.md
//! §13.1): which feature to walk through which rings, how long each step
//! bakes, how often the health is read, and the gates that decide after
//! each bake whether to advance, pause or halt.
//!
//! What it is: a strict TOML parser and validator. Unknown keys, values
//! out of range and inconsistent settings are refused at load, each error
//! with the line and column of the value at fault, so a plan that loads
//! is one the controller can run to the end.
//!
//! What it trusts: nothing; the plan is operator input, checked whole.
//! Whether its rings exist in the rollout document is checked when the
//! controller reads the document (they may be authored in either order).
//!
//! What it bounds: the file's size ([`MAX_PLAN_BYTES`], before parsing),
//! the steps ([`MAX_STEPS`]), the gates ([`MAX_GATES`]), every duration
//! ([`MAX_BAKE`], [`MIN_POLL`]..[`MAX_POLL`]) and the number of
//! extensions of an inconclusive bake ([`MAX_EXTENSIONS`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use vkx_common::errors::REGISTRY;

use super::document::{Feature, MAX_RINGS, check_ring_name};

/// The plan format this build reads.
pub const PLAN_FORMAT: u32 = 1;
/// Largest plan file: a plan is a short list of rings and gates.
pub const MAX_PLAN_BYTES: usize = 64 * 1024;
/// Steps of one plan: one per ring of the document at most.
pub const MAX_STEPS: usize = MAX_RINGS;
/// Gates of one plan: a handful per metric is plenty; more is a generator
/// gone wrong.
pub const MAX_GATES: usize = 32;
/// Longest bake of one step, extensions included: a week. A longer bake
/// is a plan nobody watches.
pub const MAX_BAKE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Health poll interval bounds: below 500 ms there is nothing new to read
/// (hosts publish at most every 500 ms); above 10 minutes a bad ring runs
/// unwatched too long.
pub const MIN_POLL: Duration = Duration::from_millis(500);
pub const MAX_POLL: Duration = Duration::from_secs(600);
/// Extensions of one step's bake while the verdict is inconclusive.
pub const MAX_EXTENSIONS: u64 = 64;
/// Codes listed as expected (excluded from errors and refusals).
pub const MAX_EXPECTED_CODES: usize = 16;
/// The default poll interval.
pub const DEFAULT_POLL_MS: u64 = 5000;

/// Refusal and error codes a rollout causes by design at a stage's edge
/// (a request racing the change): not counted as errors or refusals.
pub const DEFAULT_EXPECTED_CODES: [&str; 2] = ["feature-disabled", "feature-not-enabled"];

/// What a gate measures, on the ring just enabled (the candidate) over
/// the bake window. Counts are sums; rates are a count over its
/// denominator (a zero denominator counts as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Errors sent and received, by any code but the expected ones.
    Errors,
    /// Errors per unit of traffic (a session established or a request of
    /// any feature).
    ErrorRate,
    /// Established sessions that ended other than in order.
    Lost,
    /// Lost sessions per session established.
    LostRate,
    /// Evidence refused.
    AttestFailures,
    /// Attestation failures per session established.
    AttestFailureRate,
    /// Refusals of the plan's feature, by any code but the expected ones.
    Refusals,
    /// Refusals per request of the plan's feature.
    RefusalRate,
    /// Log lines the hosts' rate limiters suppressed (fleet-wide: the
    /// hosts count them per node, not per ring).
    Suppressed,
}

impl Metric {
    /// Counts are compared with an absolute ceiling whatever the sample
    /// size (a flood in a small sample must still halt).
    pub fn is_count(self) -> bool {
        matches!(
            self,
            Self::Errors | Self::Lost | Self::AttestFailures | Self::Refusals | Self::Suppressed
        )
    }

    /// Rates that can be compared with the rings not yet enabled (where
    /// the feature is off, so its refusal rate means nothing).
    pub fn has_baseline(self) -> bool {
        matches!(
            self,
            Self::ErrorRate | Self::LostRate | Self::AttestFailureRate
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Errors => "errors",
            Self::ErrorRate => "error_rate",
            Self::Lost => "lost",
            Self::LostRate => "lost_rate",
            Self::AttestFailures => "attest_failures",
            Self::AttestFailureRate => "attest_failure_rate",
            Self::Refusals => "refusals",
            Self::RefusalRate => "refusal_rate",
            Self::Suppressed => "suppressed",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One gate: an absolute ceiling on the candidate, or a comparison with
/// the baseline (`candidate ≤ ratio × baseline + slack`).
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    Max {
        metric: Metric,
        max: f64,
    },
    Ratio {
        metric: Metric,
        ratio: f64,
        slack: f64,
    },
}

impl Gate {
    pub fn metric(&self) -> Metric {
        match self {
            Self::Max { metric, .. } | Self::Ratio { metric, .. } => *metric,
        }
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Max { metric, max } => write!(f, "{metric} <= {max}"),
            Self::Ratio {
                metric,
                ratio,
                slack,
            } => write!(f, "{metric} <= {ratio} x baseline + {slack}"),
        }
    }
}

/// The gates and the sample a verdict needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    /// Requests of the plan's feature in the candidate ring for a
    /// conclusive verdict.
    pub min_requests: u64,
    /// Sessions established in the candidate ring for a conclusive
    /// verdict.
    pub min_sessions: u64,
    /// Traffic of the baseline (sessions + requests) below which ratio
    /// gates are skipped (reported, not inconclusive: the last ring has
    /// no baseline at all).
    pub min_baseline_traffic: u64,
    /// Codes not counted as errors or refusals.
    pub expected_codes: Vec<String>,
    pub list: Vec<Gate>,
    /// The plan's feature, whose requests and refusals are measured.
    pub feature: Feature,
}

/// A checked plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub feature: Feature,
    /// The rings walked, in order, and each step's bake.
    pub steps: Vec<Step>,
    /// How often the health (and the document) is read during a bake.
    pub poll: Duration,
    /// An inconclusive verdict at the end of a bake extends it by
    /// `extend`, while the step's whole bake stays within `max_bake`;
    /// then the rollout pauses.
    pub extend: Duration,
    pub max_bake: Duration,
    pub gates: Gates,
    /// SHA-256 of the plan file, in hex: a controller's progress belongs
    /// to one plan.
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub ring: String,
    pub bake: Duration,
}

/// Why a plan was refused: where (1-based line and column, when known)
/// and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", at.map_or(String::new(), |(l, c)| format!("line {l}, column {c}: ")))]
pub struct PlanError {
    pub at: Option<(usize, usize)>,
    pub message: String,
}

impl PlanError {
    pub fn line(&self) -> Option<usize> {
        self.at.map(|(l, _)| l)
    }
}

// ------------------------------------------------------------- raw form

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    format: Spanned<u32>,
    feature: Spanned<String>,
    rings: Spanned<Vec<Spanned<String>>>,
    bake_s: Spanned<u64>,
    #[serde(default)]
    bake_s_by_ring: BTreeMap<String, Spanned<u64>>,
    #[serde(default)]
    poll_ms: Option<Spanned<u64>>,
    #[serde(default)]
    inconclusive: Option<Spanned<RawInconclusive>>,
    #[serde(default)]
    sample: Option<Spanned<RawSample>>,
    #[serde(default)]
    gate: Vec<Spanned<RawGate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInconclusive {
    extend_s: Spanned<u64>,
    max_bake_s: Spanned<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSample {
    #[serde(default)]
    min_requests: u64,
    #[serde(default)]
    min_sessions: u64,
    #[serde(default)]
    min_baseline_traffic: u64,
    #[serde(default)]
    expected_codes: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    metric: Metric,
    #[serde(default)]
    max: Option<Spanned<f64>>,
    #[serde(default)]
    ratio: Option<Spanned<f64>>,
    #[serde(default)]
    slack: Option<Spanned<f64>>,
}

// ---------------------------------------------------------------- load

impl Plan {
    /// Parses and checks a plan file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, PlanError> {
        if bytes.len() > MAX_PLAN_BYTES {
            return Err(PlanError {
                at: None,
                message: format!(
                    "plan of {} bytes is over the limit of {MAX_PLAN_BYTES}",
                    bytes.len()
                ),
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| PlanError {
            at: None,
            message: format!("not UTF-8: {e}"),
        })?;
        let at = |span: Range<usize>| Some(line_col(text, span.start));
        let raw: RawPlan = toml::from_str(text).map_err(|e| PlanError {
            at: e.span().and_then(at),
            message: e.message().trim().to_owned(),
        })?;
        let err = |span: Range<usize>, message: String| PlanError {
            at: at(span),
            message,
        };
        if *raw.format.get_ref() != PLAN_FORMAT {
            return Err(err(
                raw.format.span(),
                format!("format must be {PLAN_FORMAT}"),
            ));
        }
        let feature = Feature::from_name(raw.feature.get_ref()).ok_or_else(|| {
            err(
                raw.feature.span(),
                format!(
                    "unknown feature {:?} (one of key-release, key-derivation, key-rotation)",
                    super::shown(raw.feature.get_ref())
                ),
            )
        })?;
        let bake = secs(&raw.bake_s, "bake_s", &err)?;
        let rings = raw.rings.get_ref();
        if rings.is_empty() || rings.len() > MAX_STEPS {
            return Err(err(
                raw.rings.span(),
                format!("rings: 1 to {MAX_STEPS} ring names"),
            ));
        }
        let mut steps: Vec<Step> = Vec::with_capacity(rings.len());
        for r in rings {
            let name = r.get_ref();
            check_ring_name(name)
                .map_err(|e| err(r.span(), format!("ring {:?}: {e}", super::shown(name))))?;
            if steps.iter().any(|s| s.ring == *name) {
                return Err(err(r.span(), format!("ring {name:?} is listed twice")));
            }
            steps.push(Step {
                ring: name.clone(),
                bake,
            });
        }
        for (ring, s) in &raw.bake_s_by_ring {
            let Some(step) = steps.iter_mut().find(|st| st.ring == *ring) else {
                return Err(err(
                    s.span(),
                    format!("bake_s_by_ring: {:?} is not in rings", super::shown(ring)),
                ));
            };
            step.bake = secs(s, "bake_s_by_ring", &err)?;
        }
        let poll = match &raw.poll_ms {
            None => Duration::from_millis(DEFAULT_POLL_MS),
            Some(p) => {
                let d = Duration::from_millis(*p.get_ref());
                if !(MIN_POLL..=MAX_POLL).contains(&d) {
                    return Err(err(
                        p.span(),
                        format!(
                            "poll_ms: {} to {}",
                            MIN_POLL.as_millis(),
                            MAX_POLL.as_millis()
                        ),
                    ));
                }
                d
            }
        };
        let longest = steps.iter().map(|s| s.bake).max().unwrap_or(bake);
        let (extend, max_bake) = match &raw.inconclusive {
            None => (Duration::ZERO, longest),
            Some(i) => {
                let i = i.get_ref();
                let extend = secs(&i.extend_s, "extend_s", &err)?;
                let max_bake = secs(&i.max_bake_s, "max_bake_s", &err)?;
                if max_bake < longest {
                    return Err(err(
                        i.max_bake_s.span(),
                        format!(
                            "max_bake_s ({}) is shorter than a step's bake ({})",
                            max_bake.as_secs(),
                            longest.as_secs()
                        ),
                    ));
                }
                let shortest = steps.iter().map(|s| s.bake).min().unwrap_or(bake);
                let extensions = (max_bake - shortest).as_secs().div_ceil(extend.as_secs());
                if extensions > MAX_EXTENSIONS {
                    return Err(err(
                        i.extend_s.span(),
                        format!(
                            "extend_s: {extensions} extensions to reach max_bake_s; at most {MAX_EXTENSIONS}"
                        ),
                    ));
                }
                (extend, max_bake)
            }
        };
        let sample = raw.sample.as_ref().map(Spanned::get_ref);
        let default_sample = RawSample::default();
        let sample = sample.unwrap_or(&default_sample);
        let expected_codes = match &sample.expected_codes {
            None => DEFAULT_EXPECTED_CODES.map(str::to_owned).to_vec(),
            Some(list) => {
                if list.get_ref().len() > MAX_EXPECTED_CODES {
                    return Err(err(
                        list.span(),
                        format!("expected_codes: at most {MAX_EXPECTED_CODES}"),
                    ));
                }
                let mut out = Vec::new();
                for c in list.get_ref() {
                    if !REGISTRY.iter().any(|r| r.name == c.get_ref()) {
                        return Err(err(
                            c.span(),
                            format!(
                                "expected_codes: {:?} is no error code of the registry",
                                super::shown(c.get_ref())
                            ),
                        ));
                    }
                    out.push(c.get_ref().clone());
                }
                out
            }
        };
        if raw.gate.len() > MAX_GATES {
            let span = raw.gate[MAX_GATES].span();
            return Err(err(span, format!("at most {MAX_GATES} gates")));
        }
        let mut list = Vec::with_capacity(raw.gate.len());
        for g in &raw.gate {
            list.push(gate(g, &err)?);
        }
        if list.is_empty() {
            return Err(PlanError {
                at: None,
                message: "a plan needs at least one [[gate]]".into(),
            });
        }
        let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        Ok(Self {
            feature,
            steps,
            poll,
            extend,
            max_bake,
            gates: Gates {
                min_requests: sample.min_requests,
                min_sessions: sample.min_sessions,
                min_baseline_traffic: sample.min_baseline_traffic,
                expected_codes,
                list,
                feature,
            },
            digest,
        })
    }

    /// Reads and checks a plan file (size checked before reading it all).
    pub fn load(path: &std::path::Path) -> Result<Self, PlanError> {
        use std::io::Read as _;
        let io = |e: std::io::Error| PlanError {
            at: None,
            message: format!("{}: {e}", path.display()),
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        f.take(u64::try_from(MAX_PLAN_BYTES).unwrap_or(u64::MAX) + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Self::parse(&bytes)
    }
}

fn secs(
    v: &Spanned<u64>,
    what: &str,
    err: &impl Fn(Range<usize>, String) -> PlanError,
) -> Result<Duration, PlanError> {
    let d = Duration::from_secs(*v.get_ref());
    if d.is_zero() || d > MAX_BAKE {
        return Err(err(
            v.span(),
            format!("{what}: 1 to {} seconds", MAX_BAKE.as_secs()),
        ));
    }
    Ok(d)
}

fn gate(
    g: &Spanned<RawGate>,
    err: &impl Fn(Range<usize>, String) -> PlanError,
) -> Result<Gate, PlanError> {
    let raw = g.get_ref();
    let m = raw.metric;
    let finite = |v: &Spanned<f64>, what: &str| -> Result<f64, PlanError> {
        let x = *v.get_ref();
        if !x.is_finite() || x < 0.0 {
            return Err(err(
                v.span(),
                format!("{what}: a finite number of at least 0"),
            ));
        }
        if !m.is_count() && what == "max" && x > 1.0 {
            return Err(err(v.span(), format!("max: {m} is a rate, 0 to 1")));
        }
        Ok(x)
    };
    match (&raw.max, &raw.ratio) {
        (Some(max), None) => {
            if let Some(s) = &raw.slack {
                return Err(err(s.span(), "slack goes with ratio, not max".into()));
            }
            Ok(Gate::Max {
                metric: m,
                max: finite(max, "max")?,
            })
        }
        (None, Some(ratio)) => {
            if !m.has_baseline() {
                return Err(err(
                    ratio.span(),
                    format!(
                        "ratio: {m} cannot be compared with the baseline \
                         (only error_rate, lost_rate, attest_failure_rate)"
                    ),
                ));
            }
            let r = finite(ratio, "ratio")?;
            if r < 1.0 {
                return Err(err(
                    ratio.span(),
                    "ratio: at least 1 (the candidate may do as well as the baseline)".into(),
                ));
            }
            let slack = match &raw.slack {
                Some(s) => finite(s, "slack")?,
                None => 0.0,
            };
            Ok(Gate::Ratio {
                metric: m,
                ratio: r,
                slack,
            })
        }
        _ => Err(err(
            g.span(),
            format!("gate on {m}: exactly one of max or ratio"),
        )),
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit_once('\n')
        .map_or(before, |(_, l)| l)
        .chars()
        .count()
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const EXAMPLE: &str = include_str!("../../../spec/examples/plan.toml");

    /// Line 5 is a free slot for top-level keys; tables go after line 8.
    const MINIMAL: &str = "format = 1\nfeature = \"key-rotation\"\nrings = [\"canary\", \"all\"]\n\
                           bake_s = 2\n# slot\n[[gate]]\nmetric = \"errors\"\nmax = 10\n";

    fn err(text: &str) -> PlanError {
        Plan::parse(text.as_bytes()).unwrap_err()
    }

    /// `MINIMAL` with lines replaced (1-based), or appended past its end.
    fn with(edits: &[(usize, &str)]) -> String {
        let mut lines: Vec<String> = MINIMAL.lines().map(str::to_owned).collect();
        for (line, new) in edits {
            if *line > lines.len() {
                lines.push((*new).to_owned());
            } else {
                lines[line - 1] = (*new).to_owned();
            }
        }
        lines.join("\n") + "\n"
    }

    #[test]
    fn the_spec_example_loads() {
        let p = Plan::parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(p.feature, Feature::KeyRelease);
        let rings: Vec<&str> = p.steps.iter().map(|s| s.ring.as_str()).collect();
        assert_eq!(rings, ["canary", "1pct", "10pct", "50pct", "all"]);
        assert_eq!(p.steps[0].bake, Duration::from_secs(1800));
        assert_eq!(p.steps[1].bake, Duration::from_secs(600));
        assert_eq!(p.poll, Duration::from_secs(10));
        assert_eq!(p.extend, Duration::from_secs(300));
        assert_eq!(p.max_bake, Duration::from_secs(3600));
        assert_eq!(p.gates.min_requests, 200);
        assert_eq!(p.gates.expected_codes, DEFAULT_EXPECTED_CODES);
        assert!(p.gates.list.contains(&Gate::Ratio {
            metric: Metric::ErrorRate,
            ratio: 2.0,
            slack: 0.001
        }));
        assert_eq!(p.digest.len(), 64);
    }

    #[test]
    fn a_minimal_plan_has_defaults() {
        let p = Plan::parse(MINIMAL.as_bytes()).unwrap();
        assert_eq!(p.poll, Duration::from_millis(DEFAULT_POLL_MS));
        assert_eq!(p.extend, Duration::ZERO);
        assert_eq!(p.max_bake, Duration::from_secs(2));
        assert_eq!(p.gates.min_requests, 0);
        assert_ne!(
            p.digest,
            Plan::parse(with(&[(4, "bake_s = 3")]).as_bytes())
                .unwrap()
                .digest
        );
    }

    #[test]
    fn errors_name_the_line() {
        // (line edits, the line the error names, what it says)
        type Case<'a> = (&'a [(usize, &'a str)], usize, &'a str);
        let cases: &[Case<'_>] = &[
            (&[(1, "format = 2")], 1, "format must be 1"),
            (&[(2, "feature = \"key-teleport\"")], 2, "unknown feature"),
            (&[(3, "rings = []")], 3, "rings: 1 to 32"),
            (&[(3, "rings = [\"canary\", \"Canary\"]")], 3, "[a-z0-9._-]"),
            (
                &[(3, "rings = [\"canary\", \"canary\"]")],
                3,
                "listed twice",
            ),
            (&[(4, "bake_s = 0")], 4, "bake_s: 1 to"),
            (&[(4, "bake_s = 604801")], 4, "bake_s: 1 to"),
            (&[(4, "bake_s = -1")], 4, ""),
            (&[(5, "poll_ms = 100")], 5, "poll_ms: 500 to"),
            (&[(5, "colour = \"red\"")], 5, "unknown field"),
            (&[(8, "max = 10\nmx = 3")], 9, "unknown field"),
            (&[(8, "ratio = 2.0")], 8, "cannot be compared"),
            (&[(7, "metric = \"error_rate\"")], 8, "is a rate"),
            (
                &[(7, "metric = \"lost_rate\""), (8, "ratio = 0.5")],
                8,
                "at least 1",
            ),
            (&[(7, "metric = \"latency\"")], 7, "unknown variant"),
            (
                &[(8, "max = 1\nratio = 2")],
                6,
                "exactly one of max or ratio",
            ),
            (&[(9, "[bake_s_by_ring]\nfast = 1")], 10, "not in rings"),
            (
                &[(9, "[inconclusive]\nextend_s = 1\nmax_bake_s = 1")],
                11,
                "shorter than",
            ),
            (
                &[(9, "[inconclusive]\nextend_s = 1\nmax_bake_s = 100")],
                10,
                "extensions",
            ),
            (
                &[(9, "[sample]\nexpected_codes = [\"nope\"]")],
                10,
                "no error code",
            ),
            (&[(9, "[sample]\nmin_request = 3")], 10, "unknown field"),
        ];
        for (edits, want_line, want) in cases {
            let text = with(edits);
            let new = edits;
            let e = err(&text);
            assert_eq!(e.line(), Some(*want_line), "{new:?}: {e}\n{text}");
            assert!(e.to_string().contains(want), "{new:?}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("line {want_line}, column "))
            );
        }
    }

    #[test]
    fn missing_keys_and_bounds_are_refused() {
        assert!(err("format = 1\n").message.contains("missing field"));
        let no_gate = MINIMAL.replace("[[gate]]\nmetric = \"errors\"\nmax = 10\n", "");
        assert!(err(&no_gate).message.contains("at least one [[gate]]"));
        let many = format!(
            "{MINIMAL}{}",
            "[[gate]]\nmetric = \"lost\"\nmax = 1\n".repeat(MAX_GATES)
        );
        let e = err(&many);
        assert!(e.message.contains("at most 32 gates"), "{e}");
        assert!(e.line().is_some());
        let big = vec![b'#'; MAX_PLAN_BYTES + 1];
        assert!(
            Plan::parse(&big)
                .unwrap_err()
                .message
                .contains("over the limit")
        );
        let rings: Vec<String> = (0..=MAX_STEPS).map(|i| format!("\"r{i}\"")).collect();
        let e = err(&with(&[(3, &format!("rings = [{}]", rings.join(", ")))]));
        assert_eq!(e.line(), Some(3));
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("x", 99), (1, 2));
    }
}
