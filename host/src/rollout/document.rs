//! The rollout document (spec/ROLLOUT.md §3): its rings and how far each
//! feature has gone, parsed strictly and validated into a [`Document`]
//! that cannot hold an invalid value.
//!
//! What it trusts: nothing; the bytes come from a source (a file, etcd)
//! or an operator. What it bounds: the document's size before parsing
//! ([`MAX_DOCUMENT_BYTES`]), then every count and name length below.
//! Duplicate keys are refused everywhere: every JSON object is a struct
//! with `deny_unknown_fields`, whose derived visitor refuses a repeated
//! field; there are no free-form maps.
//!
//! The canonical bytes of a document ([`Document::canonical_bytes`]) are
//! `serde_json::to_vec` of the validated value: struct fields in
//! declaration order, no whitespace. Signatures cover these bytes, so the
//! field order below is part of the format.

use std::collections::BTreeSet;
use std::fmt;

use crate::policy::{MAX_IMAGE_NAME, check_image_name};
use serde::{Deserialize, Deserializer, Serialize};
use vkx_common::wire::VmId;
use vkx_common::wire::feature;

use super::shown;

/// The only document format this code reads.
pub const FORMAT: u32 = 1;
/// Largest envelope (document plus signature) read from a source or a
/// file: a few thousand ring members fit, and a runaway generator (the
/// Cloudflare 2025 feature file) is refused before parsing.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Rings per document: stages are a short ordered list (canary, a few
/// percentages, all); more is a generator bug.
pub const MAX_RINGS: usize = 32;
/// Entries in one selector list (`vm_ids`, `images`, `nodes`) of a ring:
/// explicit lists are for canaries; percentages use buckets.
pub const MAX_RING_MEMBERS: usize = 1024;
/// Longest ring name: a short label shown in `rollout explain`.
pub const MAX_RING_NAME: usize = 32;
/// Longest node name: the image-name alphabet and length, so a node name
/// is always safe to log.
pub const MAX_NODE_NAME: usize = MAX_IMAGE_NAME;
/// Buckets a VM hashes into (basis points: 100 buckets = 1 %).
pub const BUCKETS: u32 = 10_000;

// ------------------------------------------------------------- features

/// A v1 feature (PROTOCOL.md §12.1), by its document name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    KeyRelease,
    KeyDerivation,
    KeyRotation,
}

impl Feature {
    /// Every v1 feature, in id order.
    pub const ALL: [Feature; 3] = [Self::KeyRelease, Self::KeyDerivation, Self::KeyRotation];

    /// The wire id (§12.1).
    pub fn id(self) -> u16 {
        match self {
            Self::KeyRelease => feature::KEY_RELEASE,
            Self::KeyDerivation => feature::KEY_DERIVATION,
            Self::KeyRotation => feature::KEY_ROTATION,
        }
    }

    /// The name in documents, override files and host.toml.
    pub fn name(self) -> &'static str {
        match self {
            Self::KeyRelease => "key-release",
            Self::KeyDerivation => "key-derivation",
            Self::KeyRotation => "key-rotation",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn from_id(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.id() == id)
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Feature {
    type Err = DocumentError;
    fn from_str(s: &str) -> Result<Self, DocumentError> {
        Self::from_name(s).ok_or_else(|| DocumentError::UnknownFeature { name: shown(s) })
    }
}

// --------------------------------------------------------------- errors

/// Why bytes were refused as a rollout envelope or document. The message
/// says what and where; untrusted values appear escaped and shortened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    #[error("rollout envelope is {len} bytes; at most {MAX_DOCUMENT_BYTES} are read")]
    TooLarge { len: usize },
    #[error("rollout envelope is not valid JSON for vkx: {0}")]
    Syntax(String),
    #[error("rollout document format {found}: this host reads format {FORMAT}")]
    Format { found: u32 },
    #[error("rollout document has {count} rings; at most {MAX_RINGS}")]
    TooManyRings { count: usize },
    #[error("rings[{index}].name \"{name}\": {rule}")]
    RingName {
        index: usize,
        name: String,
        rule: &'static str,
    },
    #[error("rings[{index}].name \"{name}\" is used by an earlier ring")]
    DuplicateRing { index: usize, name: String },
    #[error("ring '{ring}' has no selector (vm_ids, images, nodes or buckets_below)")]
    EmptyRing { ring: String },
    #[error("ring '{ring}': {selector} is empty; omit it instead")]
    EmptySelector {
        ring: String,
        selector: &'static str,
    },
    #[error("ring '{ring}': {selector} has {count} entries; at most {MAX_RING_MEMBERS}")]
    TooManyMembers {
        ring: String,
        selector: &'static str,
        count: usize,
    },
    #[error("ring '{ring}': {selector}[{index}] \"{value}\": {reason}")]
    BadMember {
        ring: String,
        selector: &'static str,
        index: usize,
        value: String,
        reason: String,
    },
    #[error("ring '{ring}': {selector}[{index}] \"{value}\" is listed twice")]
    DuplicateMember {
        ring: String,
        selector: &'static str,
        index: usize,
        value: String,
    },
    #[error("ring '{ring}': buckets_below {value} is outside 1..={BUCKETS}")]
    Buckets { ring: String, value: u32 },
    #[error("features.{feature}.stage \"{stage}\" names no ring of the document")]
    UnknownStage { feature: Feature, stage: String },
    #[error("unknown feature \"{name}\" (v1 has key-release, key-derivation, key-rotation)")]
    UnknownFeature { name: String },
    #[error("signature: {0}")]
    Signature(String),
}

// ----------------------------------------------------------- the value

/// A validated rollout document. Only [`Document::parse`], envelope
/// parsing and the edits of [`super::edit`] make one, so every value is
/// valid. Field order is the canonical order (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Document {
    format: u32,
    revision: u64,
    issued_at: u64,
    rings: Vec<Ring>,
    features: FeatureTable,
}

/// One ring: a VM is a member if it matches any selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ring {
    name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    vm_ids: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    nodes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    buckets_below: Option<u32>,
}

/// How far one feature has gone: enabled for the rings up to and
/// including `stage` (none if `stage` is null), unless `killed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureRollout {
    stage: Option<String>,
    killed: bool,
}

/// The three optional v1 feature entries, in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
struct FeatureTable {
    #[serde(rename = "key-release", skip_serializing_if = "Option::is_none")]
    key_release: Option<FeatureRollout>,
    #[serde(rename = "key-derivation", skip_serializing_if = "Option::is_none")]
    key_derivation: Option<FeatureRollout>,
    #[serde(rename = "key-rotation", skip_serializing_if = "Option::is_none")]
    key_rotation: Option<FeatureRollout>,
}

impl FeatureTable {
    fn get(&self, f: Feature) -> Option<&FeatureRollout> {
        match f {
            Feature::KeyRelease => self.key_release.as_ref(),
            Feature::KeyDerivation => self.key_derivation.as_ref(),
            Feature::KeyRotation => self.key_rotation.as_ref(),
        }
    }

    fn slot(&mut self, f: Feature) -> &mut Option<FeatureRollout> {
        match f {
            Feature::KeyRelease => &mut self.key_release,
            Feature::KeyDerivation => &mut self.key_derivation,
            Feature::KeyRotation => &mut self.key_rotation,
        }
    }
}

impl Document {
    /// Parses and validates a bare document (not an envelope).
    pub fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        check_size(bytes)?;
        let wire: DocumentWire = from_json(bytes)?;
        wire.validate()
    }

    /// A document with no rings and no features: the start of a first
    /// edit when no document was ever accepted.
    pub(crate) fn empty(revision: u64, issued_at: u64) -> Self {
        Self {
            format: FORMAT,
            revision,
            issued_at,
            rings: Vec::new(),
            features: FeatureTable::default(),
        }
    }

    pub fn format(&self) -> u32 {
        self.format
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Seconds since the Unix epoch when the document was made, as its
    /// author says; informational, never checked against a clock.
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    pub fn rings(&self) -> &[Ring] {
        &self.rings
    }

    /// The document's entry for `f`, if it names the feature.
    pub fn feature(&self, f: Feature) -> Option<&FeatureRollout> {
        self.features.get(f)
    }

    /// The index of the ring named `name`.
    pub fn ring_index(&self, name: &str) -> Option<usize> {
        self.rings.iter().position(|r| r.name == name)
    }

    /// The index of the ring `f` is staged at, if the document names the
    /// feature with a non-null stage.
    pub fn stage_index(&self, f: Feature) -> Option<usize> {
        let stage = self.feature(f)?.stage.as_deref()?;
        self.ring_index(stage)
    }

    /// The bytes a signature covers (after [`super::SIGNING_CONTEXT`]).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        to_json(self)
    }

    pub(crate) fn next(&self, issued_at: u64) -> Option<Self> {
        let mut next = self.clone();
        next.revision = self.revision.checked_add(1)?;
        next.issued_at = issued_at;
        Some(next)
    }

    pub(crate) fn feature_slot(&mut self, f: Feature) -> &mut Option<FeatureRollout> {
        self.features.slot(f)
    }
}

impl Ring {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vm_ids(&self) -> &[String] {
        &self.vm_ids
    }

    pub fn images(&self) -> &[String] {
        &self.images
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn buckets_below(&self) -> Option<u32> {
        self.buckets_below
    }
}

impl FeatureRollout {
    pub(crate) fn new(stage: Option<String>, killed: bool) -> Self {
        Self { stage, killed }
    }

    pub fn stage(&self) -> Option<&str> {
        self.stage.as_deref()
    }

    pub fn killed(&self) -> bool {
        self.killed
    }

    pub(crate) fn set_killed(&mut self, killed: bool) {
        self.killed = killed;
    }

    pub(crate) fn set_stage(&mut self, stage: Option<String>) {
        self.stage = stage;
    }
}

// ------------------------------------------------------ parsing helpers

pub(crate) fn check_size(bytes: &[u8]) -> Result<(), DocumentError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(DocumentError::TooLarge { len: bytes.len() });
    }
    Ok(())
}

pub(crate) fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DocumentError> {
    serde_json::from_slice(bytes).map_err(|e| DocumentError::Syntax(e.to_string()))
}

/// Compact JSON of a value made only of structs, strings, integers,
/// booleans, options and vectors.
pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // serde_json fails only when the writer fails (a Vec never does) or a
    // map has non-string keys (these types have no maps).
    #[allow(clippy::expect_used)]
    serde_json::to_vec(value).expect("JSON of plain structs into a Vec cannot fail")
}

/// A field that may be absent but, when present, must not be `null`
/// (serde would otherwise read `null` as absent).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

// ------------------------------------------------------------ wire form

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DocumentWire {
    format: u32,
    revision: u64,
    issued_at: u64,
    rings: Vec<RingWire>,
    features: FeatureTableWire,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RingWire {
    name: String,
    #[serde(default, deserialize_with = "present")]
    vm_ids: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    images: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    nodes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    buckets_below: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureTableWire {
    #[serde(rename = "key-release", default, deserialize_with = "present")]
    key_release: Option<FeatureRolloutWire>,
    #[serde(rename = "key-derivation", default, deserialize_with = "present")]
    key_derivation: Option<FeatureRolloutWire>,
    #[serde(rename = "key-rotation", default, deserialize_with = "present")]
    key_rotation: Option<FeatureRolloutWire>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureRolloutWire {
    // `deserialize_with` makes the key required: `null` is spelt out.
    #[serde(deserialize_with = "Option::deserialize")]
    stage: Option<String>,
    killed: bool,
}

impl DocumentWire {
    pub(crate) fn validate(self) -> Result<Document, DocumentError> {
        if self.format != FORMAT {
            return Err(DocumentError::Format { found: self.format });
        }
        if self.rings.len() > MAX_RINGS {
            return Err(DocumentError::TooManyRings {
                count: self.rings.len(),
            });
        }
        let mut names = BTreeSet::new();
        let mut rings = Vec::with_capacity(self.rings.len());
        for (index, wire) in self.rings.into_iter().enumerate() {
            let ring = wire.validate(index)?;
            if !names.insert(ring.name.clone()) {
                return Err(DocumentError::DuplicateRing {
                    index,
                    name: ring.name,
                });
            }
            rings.push(ring);
        }
        let t = self.features;
        let mut features = FeatureTable::default();
        for (f, entry) in [
            (Feature::KeyRelease, t.key_release),
            (Feature::KeyDerivation, t.key_derivation),
            (Feature::KeyRotation, t.key_rotation),
        ] {
            let Some(entry) = entry else { continue };
            if let Some(stage) = &entry.stage
                && !names.contains(stage)
            {
                return Err(DocumentError::UnknownStage {
                    feature: f,
                    stage: shown(stage),
                });
            }
            *features.slot(f) = Some(FeatureRollout {
                stage: entry.stage,
                killed: entry.killed,
            });
        }
        Ok(Document {
            format: self.format,
            revision: self.revision,
            issued_at: self.issued_at,
            rings,
            features,
        })
    }
}

impl RingWire {
    fn validate(self, index: usize) -> Result<Ring, DocumentError> {
        check_ring_name(&self.name).map_err(|rule| DocumentError::RingName {
            index,
            name: shown(&self.name),
            rule,
        })?;
        let ring = &self.name;
        if self.vm_ids.is_none()
            && self.images.is_none()
            && self.nodes.is_none()
            && self.buckets_below.is_none()
        {
            return Err(DocumentError::EmptyRing { ring: ring.clone() });
        }
        let vm_ids = members(ring, "vm_ids", self.vm_ids, |s| {
            VmId::new(s).map(drop).map_err(|e| e.to_string())
        })?;
        let images = members(ring, "images", self.images, check_image_name)?;
        let nodes = members(ring, "nodes", self.nodes, check_node_name)?;
        if let Some(value) = self.buckets_below
            && !(1..=BUCKETS).contains(&value)
        {
            return Err(DocumentError::Buckets {
                ring: ring.clone(),
                value,
            });
        }
        Ok(Ring {
            name: self.name,
            vm_ids,
            images,
            nodes,
            buckets_below: self.buckets_below,
        })
    }
}

/// Checks one selector list: present lists are non-empty, bounded, valid
/// and free of repeats.
fn members(
    ring: &str,
    selector: &'static str,
    list: Option<Vec<String>>,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<Vec<String>, DocumentError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if list.is_empty() {
        return Err(DocumentError::EmptySelector {
            ring: ring.to_owned(),
            selector,
        });
    }
    if list.len() > MAX_RING_MEMBERS {
        return Err(DocumentError::TooManyMembers {
            ring: ring.to_owned(),
            selector,
            count: list.len(),
        });
    }
    let mut seen = BTreeSet::new();
    for (index, value) in list.iter().enumerate() {
        check(value).map_err(|reason| DocumentError::BadMember {
            ring: ring.to_owned(),
            selector,
            index,
            value: shown(value),
            reason,
        })?;
        if !seen.insert(value.as_str()) {
            return Err(DocumentError::DuplicateMember {
                ring: ring.to_owned(),
                selector,
                index,
                value: value.clone(),
            });
        }
    }
    Ok(list)
}

/// Ring names: 1 to [`MAX_RING_NAME`] characters of `[a-z0-9._-]`.
pub(crate) fn check_ring_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_RING_NAME {
        return Err("a ring name has 1..=32 characters");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err("a ring name has only characters of [a-z0-9._-]");
    }
    Ok(())
}

/// Node names: the image-name rule (1 to 64 characters of
/// `[A-Za-z0-9._:+-]`).
pub fn check_node_name(name: &str) -> Result<(), String> {
    check_image_name(name).map_err(|e| e.replacen("image name", "node name", 1))
}

/// The example document of spec/ROLLOUT.md.
#[cfg(test)]
pub(crate) const EXAMPLE: &str = r#"{
      "format": 1, "revision": 7, "issued_at": 1764860000,
      "rings": [
        {"name": "canary", "vm_ids": ["vm-1", "vm-2"]},
        {"name": "debian", "images": ["debian-12"], "nodes": ["node-a"]},
        {"name": "1pct",  "buckets_below": 100},
        {"name": "10pct", "buckets_below": 1000},
        {"name": "50pct", "buckets_below": 5000},
        {"name": "all",   "buckets_below": 10000}
      ],
      "features": {
        "key-release":    {"stage": "all",    "killed": false},
        "key-rotation":   {"stage": "canary", "killed": false},
        "key-derivation": {"stage": null,     "killed": true}
      }
    }"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Document, DocumentError> {
        Document::parse(s.as_bytes())
    }

    fn err(s: &str) -> String {
        parse(s).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn the_example_parses_and_canonicalises() {
        let d = parse(EXAMPLE).unwrap();
        assert_eq!(d.revision(), 7);
        assert_eq!(d.rings().len(), 6);
        assert_eq!(d.stage_index(Feature::KeyRelease), Some(5));
        assert_eq!(d.stage_index(Feature::KeyRotation), Some(0));
        assert!(d.feature(Feature::KeyDerivation).unwrap().killed());
        let canon = d.canonical_bytes();
        assert_eq!(
            std::str::from_utf8(&canon).unwrap(),
            r#"{"format":1,"revision":7,"issued_at":1764860000,"rings":[{"name":"canary","vm_ids":["vm-1","vm-2"]},{"name":"debian","images":["debian-12"],"nodes":["node-a"]},{"name":"1pct","buckets_below":100},{"name":"10pct","buckets_below":1000},{"name":"50pct","buckets_below":5000},{"name":"all","buckets_below":10000}],"features":{"key-release":{"stage":"all","killed":false},"key-derivation":{"stage":null,"killed":true},"key-rotation":{"stage":"canary","killed":false}}}"#
        );
        // Canonical bytes are a fixed point.
        assert_eq!(Document::parse(&canon).unwrap(), d);
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_level() {
        let minimal = |body: &str| format!(r#"{{{body}}}"#);
        let cases = [
            minimal(r#""format":1,"format":1,"revision":1,"issued_at":0,"rings":[],"features":{}"#),
            minimal(
                r#""format":1,"revision":1,"issued_at":0,"rings":[{"name":"a","name":"b","buckets_below":1}],"features":{}"#,
            ),
            minimal(
                r#""format":1,"revision":1,"issued_at":0,"rings":[{"name":"a","buckets_below":1,"buckets_below":2}],"features":{}"#,
            ),
            minimal(
                r#""format":1,"revision":1,"issued_at":0,"rings":[],"features":{"key-release":{"stage":null,"killed":true},"key-release":{"stage":null,"killed":false}}"#,
            ),
            minimal(
                r#""format":1,"revision":1,"issued_at":0,"rings":[],"features":{"key-release":{"stage":null,"killed":true,"killed":false}}"#,
            ),
        ];
        for case in cases {
            let e = err(&case);
            assert!(e.contains("duplicate field"), "{case}: {e}");
        }
    }

    #[test]
    fn unknown_fields_and_features_are_refused() {
        let e =
            err(r#"{"format":1,"revision":1,"issued_at":0,"rings":[],"features":{},"extra":1}"#);
        assert!(e.contains("unknown field `extra`"), "{e}");
        let e = err(
            r#"{"format":1,"revision":1,"issued_at":0,"rings":[],"features":{"key-relaese":{"stage":null,"killed":true}}}"#,
        );
        assert!(e.contains("unknown field `key-relaese`"), "{e}");
        let e = err(
            r#"{"format":1,"revision":1,"issued_at":0,"rings":[{"name":"a","buckets_below":1,"weight":3}],"features":{}}"#,
        );
        assert!(e.contains("unknown field `weight`"), "{e}");
    }

    #[test]
    fn stage_and_killed_are_required_and_null_is_not_absent() {
        let e = err(
            r#"{"format":1,"revision":1,"issued_at":0,"rings":[],"features":{"key-release":{"killed":true}}}"#,
        );
        assert!(e.contains("missing field `stage`"), "{e}");
        let e = err(
            r#"{"format":1,"revision":1,"issued_at":0,"rings":[],"features":{"key-release":{"stage":null}}}"#,
        );
        assert!(e.contains("missing field `killed`"), "{e}");
        let e = err(
            r#"{"format":1,"revision":1,"issued_at":0,"rings":[],"features":{"key-release":null}}"#,
        );
        assert!(e.contains("invalid type: null"), "{e}");
        let e = err(
            r#"{"format":1,"revision":1,"issued_at":0,"rings":[{"name":"a","vm_ids":null}],"features":{}}"#,
        );
        assert!(e.contains("invalid type: null"), "{e}");
    }

    #[test]
    fn validation_names_what_and_where() {
        let doc = |rings: &str, features: &str| {
            format!(
                r#"{{"format":1,"revision":1,"issued_at":0,"rings":[{rings}],"features":{{{features}}}}}"#
            )
        };
        let cases: &[(String, &str)] = &[
            (
                r#"{"format":2,"revision":1,"issued_at":0,"rings":[],"features":{}}"#.into(),
                "format 2",
            ),
            (
                doc(
                    r#"{"name":"a","buckets_below":1},{"name":"a","buckets_below":2}"#,
                    "",
                ),
                "rings[1].name \"a\" is used by an earlier ring",
            ),
            (doc(r#"{"name":"a"}"#, ""), "ring 'a' has no selector"),
            (doc(r#"{"name":"a","vm_ids":[]}"#, ""), "vm_ids is empty"),
            (
                doc(r#"{"name":"A","buckets_below":1}"#, ""),
                "rings[0].name",
            ),
            (
                doc(r#"{"name":"a","buckets_below":0}"#, ""),
                "buckets_below 0 is outside",
            ),
            (
                doc(r#"{"name":"a","buckets_below":10001}"#, ""),
                "buckets_below 10001 is outside",
            ),
            (
                doc(r#"{"name":"a","vm_ids":["vm 1"]}"#, ""),
                "vm_ids[0] \"vm 1\"",
            ),
            (
                doc(r#"{"name":"a","images":["ok","bad/x"]}"#, ""),
                "images[1] \"bad/x\"",
            ),
            (
                doc(r#"{"name":"a","nodes":["n\u0007"]}"#, ""),
                "nodes[0] \"n\\u{7}\": node name",
            ),
            (
                doc(r#"{"name":"a","nodes":["n","n"]}"#, ""),
                "nodes[1] \"n\" is listed twice",
            ),
            (
                doc(
                    r#"{"name":"a","buckets_below":1}"#,
                    r#""key-rotation":{"stage":"b","killed":false}"#,
                ),
                "features.key-rotation.stage \"b\" names no ring",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let big = vec![b' '; MAX_DOCUMENT_BYTES + 1];
        assert_eq!(
            Document::parse(&big),
            Err(DocumentError::TooLarge {
                len: MAX_DOCUMENT_BYTES + 1
            })
        );
        let rings: Vec<String> = (0..=MAX_RINGS)
            .map(|i| format!(r#"{{"name":"r{i}","buckets_below":1}}"#))
            .collect();
        let text = format!(
            r#"{{"format":1,"revision":1,"issued_at":0,"rings":[{}],"features":{{}}}}"#,
            rings.join(",")
        );
        assert_eq!(
            parse(&text),
            Err(DocumentError::TooManyRings {
                count: MAX_RINGS + 1
            })
        );
        let ids: Vec<String> = (0..=MAX_RING_MEMBERS)
            .map(|i| format!(r#""vm-{i}""#))
            .collect();
        let text = format!(
            r#"{{"format":1,"revision":1,"issued_at":0,"rings":[{{"name":"c","vm_ids":[{}]}}],"features":{{}}}}"#,
            ids.join(",")
        );
        assert!(matches!(
            parse(&text),
            Err(DocumentError::TooManyMembers { count, .. }) if count == MAX_RING_MEMBERS + 1
        ));
        let long = "r".repeat(MAX_RING_NAME + 1);
        let text = format!(
            r#"{{"format":1,"revision":1,"issued_at":0,"rings":[{{"name":"{long}","buckets_below":1}}],"features":{{}}}}"#
        );
        assert!(matches!(parse(&text), Err(DocumentError::RingName { .. })));
    }

    #[test]
    fn feature_names_and_ids_agree_with_the_wire() {
        for f in Feature::ALL {
            assert_eq!(Feature::from_name(f.name()), Some(f));
            assert_eq!(Feature::from_id(f.id()), Some(f));
        }
        assert_eq!(Feature::KeyRelease.id(), 1);
        assert_eq!(Feature::KeyDerivation.id(), 2);
        assert_eq!(Feature::KeyRotation.id(), 3);
        assert!("key-relase".parse::<Feature>().is_err());
    }
}
