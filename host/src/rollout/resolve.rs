//! Which ring a VM is in and which features it gets (spec/ROLLOUT.md §4
//! and §5): pure functions of the accepted document, the local override,
//! host.toml's generally-available (GA) list and the VM's facts.
//!
//! What it trusts: its inputs are already validated values. What it
//! bounds: the work per VM is one SHA-256 and one pass over the rings'
//! selector lists, all bounded by the document limits.

use std::collections::BTreeSet;
use std::fmt;

use ring::digest;
use vkx_common::wire::VmId;
use vkx_common::wire::{FeatureState, Features};

use super::document::{BUCKETS, Document, Feature, Ring};
use super::local_override::Override;

/// The domain-separation prefix of the bucket hash.
pub const BUCKET_DOMAIN: &[u8] = b"vkx-rollout-bucket-v1\0";

/// What the host knows about a VM that ring selectors can match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFacts {
    pub vm_id: VmId,
    /// The VM's image name, if the host knows it (from the registry or
    /// the policy match).
    pub image: Option<String>,
    /// The name of the node the VM runs on (host.toml).
    pub node: String,
}

/// Why a VM is a member of a ring: the first selector that matched, in
/// the order vm_ids, images, nodes, buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    VmId,
    Image,
    Node,
    Bucket { bucket: u32, below: u32 },
}

/// The ring a VM is in: the first ring of the document it is a member of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub index: usize,
    pub name: String,
    pub membership: Membership,
}

/// The VM's bucket in 0..[`BUCKETS`]: SHA-256 of [`BUCKET_DOMAIN`] and the
/// vm-id, the first 8 bytes as a big-endian integer, modulo 10000. Stable
/// across hosts, revisions and releases.
pub fn bucket(vm_id: &VmId) -> u32 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(BUCKET_DOMAIN);
    ctx.update(vm_id.as_str().as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    let b = u64::from_be_bytes(first) % u64::from(BUCKETS);
    // b < 10_000 fits a u32.
    #[allow(clippy::cast_possible_truncation)]
    let b = b as u32;
    b
}

impl Ring {
    /// Whether `vm` is a member of this ring, and through which selector.
    pub fn matches(&self, vm: &VmFacts) -> Option<Membership> {
        if self.vm_ids().iter().any(|id| id == vm.vm_id.as_str()) {
            return Some(Membership::VmId);
        }
        if let Some(image) = &vm.image
            && self.images().contains(image)
        {
            return Some(Membership::Image);
        }
        if self.nodes().contains(&vm.node) {
            return Some(Membership::Node);
        }
        let below = self.buckets_below()?;
        let bucket = bucket(&vm.vm_id);
        (bucket < below).then_some(Membership::Bucket { bucket, below })
    }
}

/// The VM's ring: the first ring of `doc` it is a member of, or none.
pub fn ring_of(doc: &Document, vm: &VmFacts) -> Option<Placement> {
    doc.rings().iter().enumerate().find_map(|(index, ring)| {
        ring.matches(vm).map(|membership| Placement {
            index,
            name: ring.name().to_owned(),
            membership,
        })
    })
}

/// The VM's complete v1 feature map (every v1 feature present).
pub fn resolve(
    doc: Option<&Document>,
    local: &Override,
    ga: &BTreeSet<u16>,
    vm: &VmFacts,
) -> Features {
    let ring = doc.and_then(|d| ring_of(d, vm)).map(|p| p.index);
    resolve_at(doc, local, ga, ring)
}

/// The feature map of a member of ring `ring` (an index into the
/// document's rings; `None` for a VM in no ring).
pub fn resolve_at(
    doc: Option<&Document>,
    local: &Override,
    ga: &BTreeSet<u16>,
    ring: Option<usize>,
) -> Features {
    Feature::ALL
        .into_iter()
        .map(|f| (f.id(), decide(doc, local, ga, ring, f).state()))
        .collect()
}

/// Which rule decided a feature's state, in the order the rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    OverrideKilled,
    Killed,
    StageNull,
    Staged { stage: usize, ring: Option<usize> },
    Fallback { ga: bool },
}

impl Decision {
    fn state(self) -> FeatureState {
        match self {
            Self::OverrideKilled | Self::Killed => FeatureState::Disabled,
            Self::StageNull => FeatureState::NotYet,
            Self::Staged { stage, ring } => match ring {
                Some(i) if i <= stage => FeatureState::Enabled,
                _ => FeatureState::NotYet,
            },
            Self::Fallback { ga: true } => FeatureState::Enabled,
            Self::Fallback { ga: false } => FeatureState::NotYet,
        }
    }
}

fn decide(
    doc: Option<&Document>,
    local: &Override,
    ga: &BTreeSet<u16>,
    ring: Option<usize>,
    f: Feature,
) -> Decision {
    if local.kills(f) {
        return Decision::OverrideKilled;
    }
    match doc.and_then(|d| d.feature(f).map(|entry| (d, entry))) {
        Some((_, entry)) if entry.killed() => Decision::Killed,
        Some((d, _)) => match d.stage_index(f) {
            Some(stage) => Decision::Staged { stage, ring },
            None => Decision::StageNull,
        },
        None => Decision::Fallback {
            ga: ga.contains(&f.id()),
        },
    }
}

/// The name of a state as the spec and the CLI write it.
pub fn state_name(state: FeatureState) -> &'static str {
    match state {
        FeatureState::Enabled => "enabled",
        FeatureState::Disabled => "disabled",
        FeatureState::NotYet => "not-yet",
    }
}

// ------------------------------------------------------------- explain

/// Why a VM gets each feature's state (`vkx-host rollout explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub vm_id: VmId,
    /// The accepted document's revision, if any.
    pub revision: Option<u64>,
    pub placement: Option<Placement>,
    /// One line per v1 feature, in id order.
    pub features: Vec<FeatureExplanation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureExplanation {
    pub feature: Feature,
    pub state: FeatureState,
    /// A sentence ending in `-> <state>`.
    pub reason: String,
}

impl Explanation {
    /// The feature map the explanation describes (equal to [`resolve`]'s).
    pub fn features(&self) -> Features {
        self.features
            .iter()
            .map(|e| (e.feature.id(), e.state))
            .collect()
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.features {
            writeln!(
                f,
                "{:<15} {:<8} {}",
                e.feature.name(),
                state_name(e.state),
                e.reason
            )?;
        }
        Ok(())
    }
}

/// Explains [`resolve`] for one VM, feature by feature.
pub fn explain(
    doc: Option<&Document>,
    local: &Override,
    ga: &BTreeSet<u16>,
    vm: &VmFacts,
) -> Explanation {
    let placement = doc.and_then(|d| ring_of(d, vm));
    let ring = placement.as_ref().map(|p| p.index);
    let features = Feature::ALL
        .into_iter()
        .map(|f| {
            let decision = decide(doc, local, ga, ring, f);
            let state = decision.state();
            let reason = reason(doc, vm, placement.as_ref(), f, decision, state);
            FeatureExplanation {
                feature: f,
                state,
                reason,
            }
        })
        .collect();
    Explanation {
        vm_id: vm.vm_id.clone(),
        revision: doc.map(Document::revision),
        placement,
        features,
    }
}

fn reason(
    doc: Option<&Document>,
    vm: &VmFacts,
    placement: Option<&Placement>,
    f: Feature,
    decision: Decision,
    state: FeatureState,
) -> String {
    let outcome = state_name(state);
    let vm_id = vm.vm_id.as_str();
    let revision = doc.map_or(0, Document::revision);
    match decision {
        Decision::OverrideKilled => {
            format!("{f} is killed by the node's local override file -> {outcome}")
        }
        Decision::Killed => {
            format!("{f} is killed in rollout document revision {revision} -> {outcome}")
        }
        Decision::StageNull => {
            format!("{f} stage is null in revision {revision} (rolled out to no ring) -> {outcome}")
        }
        Decision::Staged { stage, .. } => {
            let stage_name = doc
                .and_then(|d| d.rings().get(stage))
                .map_or("?", Ring::name);
            let place = match placement {
                Some(p) => {
                    let why = match (p.membership, vm.image.as_deref()) {
                        (Membership::VmId, _) => "listed in vm_ids".to_owned(),
                        (Membership::Image, Some(image)) => format!("image '{image}'"),
                        (Membership::Image, None) => "image".to_owned(),
                        (Membership::Node, _) => format!("node '{}'", vm.node),
                        (Membership::Bucket { bucket, below }, _) => {
                            format!("bucket {bucket} < {below}")
                        }
                    };
                    format!("{vm_id} is in ring '{}' (index {}; {why})", p.name, p.index)
                }
                None => format!("{vm_id} is in no ring (bucket {})", bucket(&vm.vm_id)),
            };
            format!("{place}; {f} stage is '{stage_name}' (index {stage}) -> {outcome}")
        }
        Decision::Fallback { ga } => {
            let source = match doc {
                Some(d) => format!("revision {} does not name {f}", d.revision()),
                None => "no rollout document accepted".to_owned(),
            };
            let listed = if ga { "lists" } else { "does not list" };
            format!("{source}; host.toml {listed} {f} as generally available -> {outcome}")
        }
    }
}

// ---------------------------------------------------------------- show

/// One row of `vkx-host rollout show`: the feature map of a member of a
/// ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingRow {
    /// The ring's index and name; `None` for VMs in no ring.
    pub ring: Option<(usize, String)>,
    pub features: Features,
}

/// The feature map of a member of each ring, in ring order, then of a VM
/// in no ring (the last row).
pub fn ring_table(doc: Option<&Document>, local: &Override, ga: &BTreeSet<u16>) -> Vec<RingRow> {
    let rings = doc.map_or(&[][..], Document::rings);
    rings
        .iter()
        .enumerate()
        .map(|(i, r)| RingRow {
            ring: Some((i, r.name().to_owned())),
            features: resolve_at(doc, local, ga, Some(i)),
        })
        .chain(std::iter::once(RingRow {
            ring: None,
            features: resolve_at(doc, local, ga, None),
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::document::EXAMPLE;

    fn vm(id: &str, image: Option<&str>, node: &str) -> VmFacts {
        VmFacts {
            vm_id: VmId::new(id).unwrap(),
            image: image.map(str::to_owned),
            node: node.to_owned(),
        }
    }

    fn ga(features: &[Feature]) -> BTreeSet<u16> {
        features.iter().map(|f| f.id()).collect()
    }

    fn map(release: FeatureState, derivation: FeatureState, rotation: FeatureState) -> Features {
        [(1, release), (2, derivation), (3, rotation)]
            .into_iter()
            .collect()
    }

    use vkx_common::wire::FeatureState::{Disabled, Enabled, NotYet};

    #[test]
    fn bucket_is_the_specified_hash() {
        // sha256("vkx-rollout-bucket-v1\0vm-1"), computed independently
        // with `printf 'vkx-rollout-bucket-v1\0vm-1' | sha256sum`.
        let id = VmId::new("vm-1").unwrap();
        let d = ring::digest::digest(&ring::digest::SHA256, b"vkx-rollout-bucket-v1\0vm-1");
        let first = u64::from_be_bytes(d.as_ref()[..8].try_into().unwrap());
        assert_eq!(u64::from(bucket(&id)), first % 10_000);
    }

    #[test]
    fn first_matching_ring_wins() {
        let d = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let p = ring_of(&d, &vm("vm-2", Some("debian-12"), "node-a")).unwrap();
        assert_eq!((p.index, p.membership), (0, Membership::VmId));
        let p = ring_of(&d, &vm("vm-9", Some("debian-12"), "node-z")).unwrap();
        assert_eq!((p.index, p.membership), (1, Membership::Image));
        let p = ring_of(&d, &vm("vm-9", None, "node-a")).unwrap();
        assert_eq!((p.index, p.membership), (1, Membership::Node));
        // Everyone else lands in a bucket ring; "all" catches the rest.
        let p = ring_of(&d, &vm("vm-9", None, "node-z")).unwrap();
        let Membership::Bucket { bucket: b, below } = p.membership else {
            panic!("{p:?}")
        };
        assert_eq!(b, bucket(&VmId::new("vm-9").unwrap()));
        assert!(b < below);
    }

    #[test]
    fn resolution_follows_the_rules() {
        let d = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let none = Override::default();
        let canary = vm("vm-1", None, "node-z");
        // key-release at "all", key-derivation killed, key-rotation at canary.
        assert_eq!(
            resolve(Some(&d), &none, &ga(&[]), &canary),
            map(Enabled, Disabled, Enabled)
        );
        let debian = vm("vm-9", Some("debian-12"), "node-z");
        assert_eq!(
            resolve(Some(&d), &none, &ga(&Feature::ALL), &debian),
            map(Enabled, Disabled, NotYet)
        );
        let kill = Override::killing([Feature::KeyRelease]);
        assert_eq!(
            resolve(Some(&d), &kill, &ga(&[]), &canary),
            map(Disabled, Disabled, Enabled)
        );
        // No document: GA features everywhere, others not yet.
        assert_eq!(
            resolve(None, &none, &ga(&[Feature::KeyRelease]), &canary),
            map(Enabled, NotYet, NotYet)
        );
        assert_eq!(
            resolve(None, &kill, &ga(&[Feature::KeyRelease]), &canary),
            map(Disabled, NotYet, NotYet)
        );
    }

    #[test]
    fn a_vm_in_no_ring_gets_not_yet_for_staged_features() {
        let text = r#"{"format":1,"revision":1,"issued_at":0,
            "rings":[{"name":"canary","vm_ids":["vm-1"]}],
            "features":{"key-release":{"stage":"canary","killed":false}}}"#;
        let d = Document::parse(text.as_bytes()).unwrap();
        let other = vm("vm-2", None, "n");
        assert_eq!(ring_of(&d, &other), None);
        let all = ga(&Feature::ALL);
        assert_eq!(
            resolve(Some(&d), &Override::default(), &all, &other),
            map(NotYet, Enabled, Enabled)
        );
        let e = explain(Some(&d), &Override::default(), &all, &other);
        assert!(
            e.features[0]
                .reason
                .starts_with("vm-2 is in no ring (bucket "),
            "{e}"
        );
        assert!(
            e.features[1]
                .reason
                .contains("does not name key-derivation"),
            "{e}"
        );
    }

    #[test]
    fn explain_agrees_with_resolve_and_says_why() {
        let d = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let ga = ga(&[]);
        let none = Override::default();
        for id in ["vm-1", "vm-17", "vm-300", "x"] {
            let facts = vm(id, None, "node-z");
            let e = explain(Some(&d), &none, &ga, &facts);
            assert_eq!(e.features(), resolve(Some(&d), &none, &ga, &facts));
        }
        let facts = vm("vm-17", None, "node-z");
        let b = bucket(&facts.vm_id);
        let e = explain(Some(&d), &none, &ga, &facts);
        let p = e.placement.clone().unwrap();
        let want = format!(
            "vm-17 is in ring '{}' (index {}; bucket {b} < ",
            p.name, p.index
        );
        assert!(e.features[0].reason.starts_with(&want), "{e}");
        assert!(
            e.features[0]
                .reason
                .ends_with("key-release stage is 'all' (index 5) -> enabled"),
            "{e}"
        );
        assert_eq!(
            e.features[1].reason,
            "key-derivation is killed in rollout document revision 7 -> disabled"
        );
        let e = explain(
            None,
            &Override::killing([Feature::KeyRotation]),
            &ga,
            &facts,
        );
        assert_eq!(
            e.features[0].reason,
            "no rollout document accepted; host.toml does not list key-release as generally available -> not-yet"
        );
        assert_eq!(
            e.features[2].reason,
            "key-rotation is killed by the node's local override file -> disabled"
        );
    }

    #[test]
    fn ring_table_has_one_row_per_ring_and_one_for_none() {
        let d = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let rows = ring_table(Some(&d), &Override::default(), &BTreeSet::new());
        assert_eq!(rows.len(), 7);
        assert_eq!(rows[0].ring, Some((0, "canary".to_owned())));
        assert_eq!(rows[0].features, map(Enabled, Disabled, Enabled));
        assert_eq!(rows[1].features, map(Enabled, Disabled, NotYet));
        assert_eq!(rows[6].ring, None);
        assert_eq!(rows[6].features, map(NotYet, Disabled, NotYet));
        let rows = ring_table(None, &Override::default(), &ga(&[Feature::KeyRelease]));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].features, map(Enabled, NotYet, NotYet));
    }
}
