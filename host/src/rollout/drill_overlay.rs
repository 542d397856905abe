//! The live-drill overlay (spec/ROLLOUT.md §14): one feature narrowed for
//! one ring of the accepted document, for a bounded time, by
//! `vkx-host drill --live`. It sits beside the document in the store
//! (`<document key>.drill` in etcd, under the drill's lease; or
//! `<document file>.drill`) and every host applies it on top of its
//! resolved feature maps.
//!
//! Why it needs no signature: it can only turn `enabled` into `disabled`
//! for members of one ring, and only until `expires_unix` (or until the
//! key is gone, which the lease does by itself when the drill dies).
//! Removing it restores what the signed document already allows.
//!
//! What it trusts: nothing; the bytes come from the store. What it
//! bounds: the size before parsing ([`MAX_OVERLAY_BYTES`]), the id, ring
//! and feature names, and the time it may stay in force
//! ([`MAX_DRILL_DURATION_S`]). Duplicate and unknown fields are refused,
//! as in the document.

use serde::{Deserialize, Serialize};
use vkx_common::wire::{FeatureState, Features};

use super::document::{Feature, check_ring_name};
use super::shown;

/// The only overlay format this code reads.
pub const FORMAT: u32 = 1;
/// Largest overlay read: a few short names and three integers.
pub const MAX_OVERLAY_BYTES: usize = 1024;
/// Longest drill id.
pub const MAX_DRILL_ID: usize = 64;
/// Longest an overlay may stay in force: a drill is a rehearsal of
/// seconds to minutes; an hour-long "drill" is an outage by another name.
pub const MAX_DRILL_DURATION_S: u64 = 3600;

/// Why an overlay was refused (the host then applies none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay of {0} bytes is over the {MAX_OVERLAY_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("overlay is not valid: {0}")]
    Syntax(String),
    #[error("overlay format {0} is not format {FORMAT}")]
    Format(u32),
    #[error("drill id {0:?}: 1..=64 characters of [a-z0-9-]")]
    Id(String),
    #[error("unknown feature {0:?}")]
    Feature(String),
    #[error("ring {0:?}: {1}")]
    Ring(String, &'static str),
    #[error("expires_unix must be after started_unix and at most {MAX_DRILL_DURATION_S} s later")]
    Duration,
}

/// Drill ids: 1 to [`MAX_DRILL_ID`] characters of `[a-z0-9-]` (safe to
/// log and to use as a metric label).
pub fn check_drill_id(id: &str) -> Result<(), OverlayError> {
    if id.is_empty()
        || id.len() > MAX_DRILL_ID
        || !id
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        return Err(OverlayError::Id(shown(id)));
    }
    Ok(())
}

/// The overlay's fields as written (canonical order).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    format: u32,
    drill: String,
    feature: String,
    ring: String,
    started_unix: u64,
    expires_unix: u64,
}

/// A validated overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillOverlay {
    drill: String,
    feature: Feature,
    ring: String,
    started_unix: u64,
    expires_unix: u64,
}

impl DrillOverlay {
    /// A new overlay; the same checks as [`DrillOverlay::parse`].
    pub fn new(
        drill: &str,
        feature: Feature,
        ring: &str,
        started_unix: u64,
        expires_unix: u64,
    ) -> Result<Self, OverlayError> {
        Self::check(Wire {
            format: FORMAT,
            drill: drill.to_owned(),
            feature: feature.name().to_owned(),
            ring: ring.to_owned(),
            started_unix,
            expires_unix,
        })
    }

    /// Parses and validates untrusted bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, OverlayError> {
        if bytes.len() > MAX_OVERLAY_BYTES {
            return Err(OverlayError::TooLarge(bytes.len()));
        }
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| OverlayError::Syntax(e.to_string()))?;
        Self::check(wire)
    }

    fn check(w: Wire) -> Result<Self, OverlayError> {
        if w.format != FORMAT {
            return Err(OverlayError::Format(w.format));
        }
        check_drill_id(&w.drill)?;
        let feature = Feature::from_name(&w.feature)
            .ok_or_else(|| OverlayError::Feature(shown(&w.feature)))?;
        check_ring_name(&w.ring).map_err(|e| OverlayError::Ring(shown(&w.ring), e))?;
        if w.expires_unix <= w.started_unix
            || w.expires_unix - w.started_unix > MAX_DRILL_DURATION_S
        {
            return Err(OverlayError::Duration);
        }
        Ok(Self {
            drill: w.drill,
            feature,
            ring: w.ring,
            started_unix: w.started_unix,
            expires_unix: w.expires_unix,
        })
    }

    /// The canonical bytes (fields in declaration order, no whitespace).
    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = Wire {
            format: FORMAT,
            drill: self.drill.clone(),
            feature: self.feature.name().to_owned(),
            ring: self.ring.clone(),
            started_unix: self.started_unix,
            expires_unix: self.expires_unix,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// The same overlay in force until `expires_unix` (the file store's
    /// renewal); the same checks apply.
    pub fn renewed(&self, expires_unix: u64) -> Result<Self, OverlayError> {
        Self::new(
            &self.drill,
            self.feature,
            &self.ring,
            self.started_unix,
            expires_unix,
        )
    }

    pub fn drill(&self) -> &str {
        &self.drill
    }

    pub fn feature(&self) -> Feature {
        self.feature
    }

    pub fn ring(&self) -> &str {
        &self.ring
    }

    pub fn started_unix(&self) -> u64 {
        self.started_unix
    }

    pub fn expires_unix(&self) -> u64 {
        self.expires_unix
    }

    /// Whether it is in force at `now_unix`.
    pub fn in_force(&self, now_unix: u64) -> bool {
        now_unix < self.expires_unix
    }

    /// Narrows `features`, the map of a VM in ring `ring` (`None`: in no
    /// ring): the drill's feature goes from enabled to disabled for
    /// members of its ring. Never widens; other states are left as they
    /// are (a VM that does not use the feature is not disturbed).
    pub fn narrow(&self, ring: Option<&str>, features: &mut Features) {
        if ring == Some(self.ring.as_str())
            && let Some(state) = features.get_mut(&self.feature.id())
            && *state == FeatureState::Enabled
        {
            *state = FeatureState::Disabled;
        }
    }
}

/// Vectors of spec/ROLLOUT.md §14 (consumed by the tests below and by
/// `rollout::vectors`).
#[cfg(test)]
pub(crate) const EXAMPLE: &str = r#"{"format":1,"drill":"d-20261204-1","feature":"key-release","ring":"canary","started_unix":1764860000,"expires_unix":1764860600}"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn err(s: &str) -> OverlayError {
        DrillOverlay::parse(s.as_bytes()).unwrap_err()
    }

    #[test]
    fn the_example_parses_and_round_trips_canonically() {
        let o = DrillOverlay::parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(o.drill(), "d-20261204-1");
        assert_eq!(o.feature(), Feature::KeyRelease);
        assert_eq!(o.ring(), "canary");
        assert_eq!(o.to_bytes(), EXAMPLE.as_bytes());
        assert!(o.in_force(1_764_860_599));
        assert!(!o.in_force(1_764_860_600));
    }

    #[test]
    fn anything_the_spec_does_not_allow_is_refused() {
        let base = EXAMPLE;
        let cases = [
            base.replace(r#""format":1"#, r#""format":2"#),
            base.replace(r#""drill":"d-20261204-1""#, r#""drill":"D 1""#),
            base.replace(r#""drill":"d-20261204-1""#, r#""drill":"""#),
            base.replace(
                r#""drill":"d-20261204-1""#,
                &format!(r#""drill":"{}""#, "a".repeat(65)),
            ),
            base.replace("key-release", "key-teleport"),
            base.replace(r#""ring":"canary""#, r#""ring":"Canary""#),
            base.replace("1764860600", "1764860000"),
            base.replace("1764860600", "1764863601"),
            base.replace('}', r#","extra":1}"#),
            base.replace(r#""ring":"canary""#, r#""ring":"canary","ring":"all""#),
            base.replace(r#","expires_unix":1764860600"#, ""),
            format!("{base}{{}}"),
        ];
        for c in &cases {
            assert!(DrillOverlay::parse(c.as_bytes()).is_err(), "accepted: {c}");
        }
        assert!(matches!(
            err(&" ".repeat(MAX_OVERLAY_BYTES + 1)),
            OverlayError::TooLarge(_)
        ));
        assert!(matches!(err(&cases[9]), OverlayError::Syntax(e) if e.contains("duplicate")));
    }

    #[test]
    fn it_only_ever_narrows_its_feature_for_its_ring() {
        let o = DrillOverlay::parse(EXAMPLE.as_bytes()).unwrap();
        let all =
            |s: FeatureState| -> Features { Feature::ALL.iter().map(|f| (f.id(), s)).collect() };
        for state in [
            FeatureState::Enabled,
            FeatureState::Disabled,
            FeatureState::NotYet,
        ] {
            for ring in [None, Some("canary"), Some("all")] {
                let mut m = all(state);
                o.narrow(ring, &mut m);
                for f in Feature::ALL {
                    let expect = if ring == Some("canary")
                        && f == Feature::KeyRelease
                        && state == FeatureState::Enabled
                    {
                        FeatureState::Disabled
                    } else {
                        state
                    };
                    assert_eq!(m[&f.id()], expect, "{state:?} {ring:?} {f:?}");
                }
            }
        }
    }
}
