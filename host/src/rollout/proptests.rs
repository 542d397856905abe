//! Property tests of ring membership, resolution and admission over
//! generated documents and VMs: the rules of spec/ROLLOUT.md as
//! invariants (a kill always disables; raising a stage never disables;
//! a VM keeps its ring under unrelated edits; an unsigned change that is
//! admitted never enables a feature for a VM that did not have it).

use std::collections::BTreeSet;

use proptest::prelude::*;
use vkx_common::wire::{FeatureState, VmId};

use super::admit::{Admitted, admit};
use super::document::{BUCKETS, Document, Feature};
use super::edit::{kill, set_stage, unkill};
use super::envelope::{TrustedKeys, unsigned};
use super::local_override::Override;
use super::resolve::{VmFacts, bucket, explain, resolve, ring_of};

/// A ring as generated: indexes into small universes of ids, images and
/// nodes, so that generated VMs often match.
#[derive(Debug, Clone)]
struct RingSpec {
    vm_ids: BTreeSet<u8>,
    images: BTreeSet<u8>,
    nodes: BTreeSet<u8>,
    buckets_below: Option<u32>,
}

#[derive(Debug, Clone)]
struct DocSpec {
    revision: u64,
    rings: Vec<RingSpec>,
    /// Per feature: absent, or (stage as a ring index, killed).
    features: [Option<(Option<usize>, bool)>; 3],
}

fn ring_spec() -> impl Strategy<Value = RingSpec> {
    (
        prop::collection::btree_set(0u8..40, 0..4),
        prop::collection::btree_set(0u8..4, 0..2),
        prop::collection::btree_set(0u8..4, 0..2),
        prop::option::of(prop_oneof![1u32..=BUCKETS, Just(BUCKETS)]),
    )
        .prop_map(|(vm_ids, images, nodes, mut buckets_below)| {
            if vm_ids.is_empty() && images.is_empty() && nodes.is_empty() {
                buckets_below.get_or_insert(BUCKETS / 2);
            }
            RingSpec {
                vm_ids,
                images,
                nodes,
                buckets_below,
            }
        })
}

fn doc_spec() -> impl Strategy<Value = DocSpec> {
    (
        1u64..1000,
        prop::collection::vec(ring_spec(), 0..6),
        prop::array::uniform3(prop::option::of((
            prop::option::of(0usize..6),
            any::<bool>(),
        ))),
    )
        .prop_map(|(revision, rings, mut features)| {
            for entry in features.iter_mut().flatten() {
                entry.0 = entry.0.filter(|&i| i < rings.len());
            }
            DocSpec {
                revision,
                rings,
                features,
            }
        })
}

impl DocSpec {
    fn json(&self) -> String {
        let list = |prefix: &str, set: &BTreeSet<u8>| {
            let items: Vec<String> = set.iter().map(|i| format!("\"{prefix}{i}\"")).collect();
            items.join(",")
        };
        let rings: Vec<String> = self
            .rings
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut fields = vec![format!("\"name\":\"r{i}\"")];
                if !r.vm_ids.is_empty() {
                    fields.push(format!("\"vm_ids\":[{}]", list("vm-", &r.vm_ids)));
                }
                if !r.images.is_empty() {
                    fields.push(format!("\"images\":[{}]", list("img-", &r.images)));
                }
                if !r.nodes.is_empty() {
                    fields.push(format!("\"nodes\":[{}]", list("node-", &r.nodes)));
                }
                if let Some(b) = r.buckets_below {
                    fields.push(format!("\"buckets_below\":{b}"));
                }
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        let features: Vec<String> = Feature::ALL
            .iter()
            .zip(&self.features)
            .filter_map(|(f, entry)| {
                let (stage, killed) = (*entry)?;
                let stage = stage.map_or("null".to_owned(), |i| format!("\"r{i}\""));
                Some(format!("\"{f}\":{{\"stage\":{stage},\"killed\":{killed}}}"))
            })
            .collect();
        format!(
            "{{\"format\":1,\"revision\":{},\"issued_at\":0,\"rings\":[{}],\"features\":{{{}}}}}",
            self.revision,
            rings.join(","),
            features.join(",")
        )
    }

    fn document(&self) -> Document {
        Document::parse(self.json().as_bytes()).unwrap()
    }
}

/// One change of a generated document, for documents that differ from
/// their predecessor in a few places (as real edits do).
#[derive(Debug, Clone)]
enum Change {
    Entry(usize, Option<(Option<usize>, bool)>),
    Kill(usize, bool),
    AppendRing(RingSpec),
    ReplaceRing(usize, RingSpec),
    Truncate(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (
            0usize..3,
            prop::option::of((prop::option::of(0usize..6), any::<bool>()))
        )
            .prop_map(|(f, e)| Change::Entry(f, e)),
        (0usize..3, any::<bool>()).prop_map(|(f, k)| Change::Kill(f, k)),
        ring_spec().prop_map(Change::AppendRing),
        (0usize..6, ring_spec()).prop_map(|(i, r)| Change::ReplaceRing(i, r)),
        (0usize..6).prop_map(Change::Truncate),
    ]
}

impl DocSpec {
    fn apply(&self, changes: &[Change]) -> DocSpec {
        let mut next = self.clone();
        for c in changes {
            match c.clone() {
                Change::Entry(f, e) => next.features[f] = e,
                Change::Kill(f, k) => {
                    if let Some(entry) = &mut next.features[f] {
                        entry.1 = k;
                    }
                }
                Change::AppendRing(r) => next.rings.push(r),
                Change::ReplaceRing(i, r) => {
                    if i < next.rings.len() {
                        next.rings[i] = r;
                    }
                }
                Change::Truncate(n) => next.rings.truncate(n),
            }
        }
        let n = next.rings.len();
        for entry in next.features.iter_mut().flatten() {
            entry.0 = entry.0.filter(|&i| i < n);
        }
        next
    }
}

fn vm_facts() -> impl Strategy<Value = VmFacts> {
    (
        prop_oneof![(0u8..60).prop_map(|i| format!("vm-{i}")), "[a-z0-9-]{1,20}",],
        prop::option::of((0u8..6).prop_map(|i| format!("img-{i}"))),
        (0u8..6).prop_map(|i| format!("node-{i}")),
    )
        .prop_map(|(id, image, node)| VmFacts {
            vm_id: VmId::new(id).unwrap(),
            image,
            node,
        })
}

fn ga_set() -> impl Strategy<Value = BTreeSet<u16>> {
    prop::collection::btree_set(1u16..=3, 0..=3)
}

fn feature() -> impl Strategy<Value = Feature> {
    prop::sample::select(Feature::ALL.to_vec())
}

fn state(doc: &Document, ga: &BTreeSet<u16>, vm: &VmFacts, f: Feature) -> FeatureState {
    resolve(Some(doc), &Override::default(), ga, vm)[&f.id()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_v1_feature_is_always_present(
        spec in prop::option::of(doc_spec()), ga in ga_set(), vm in vm_facts(),
    ) {
        let doc = spec.map(|s| s.document());
        let features = resolve(doc.as_ref(), &Override::default(), &ga, &vm);
        let ids: Vec<u16> = features.keys().copied().collect();
        prop_assert_eq!(ids, vec![1, 2, 3]);
        let e = explain(doc.as_ref(), &Override::default(), &ga, &vm);
        prop_assert_eq!(e.features(), features);
    }

    #[test]
    fn raising_a_stage_never_disables(
        spec in doc_spec(), ga in ga_set(), vms in prop::collection::vec(vm_facts(), 1..20),
        f in feature(), from in prop::option::of(0usize..6), to in 0usize..6,
    ) {
        let doc = spec.document();
        let n = doc.rings().len();
        prop_assume!(n > 0 && !doc.feature(f).is_some_and(|e| e.killed()));
        let from = from.filter(|&i| i < n);
        let to = to % n;
        prop_assume!(from.is_none_or(|i| i <= to));
        let name = |i: usize| doc.rings()[i].name().to_owned();
        let low = set_stage(Some(&doc), f, from.map(name).as_deref(), 1).unwrap();
        let high = set_stage(Some(&low), f, Some(&name(to)), 2).unwrap();
        for vm in &vms {
            if state(&low, &ga, vm, f) == FeatureState::Enabled {
                prop_assert_eq!(state(&high, &ga, vm, f), FeatureState::Enabled);
            }
        }
    }

    #[test]
    fn a_killed_feature_is_disabled_everywhere(
        spec in doc_spec(), ga in ga_set(), vm in vm_facts(), f in feature(),
    ) {
        let killed = kill(Some(&spec.document()), f, 1).unwrap();
        prop_assert_eq!(state(&killed, &ga, &vm, f), FeatureState::Disabled);
    }

    #[test]
    fn an_override_kill_wins_over_everything(
        spec in prop::option::of(doc_spec()), ga in ga_set(), vm in vm_facts(), f in feature(),
    ) {
        let doc = spec.map(|s| s.document());
        let local = Override::killing([f]);
        let features = resolve(doc.as_ref(), &local, &ga, &vm);
        prop_assert_eq!(features[&f.id()], FeatureState::Disabled);
    }

    #[test]
    fn a_vms_ring_is_stable_under_unrelated_edits(
        spec in doc_spec(), vm in vm_facts(), f in feature(),
        appended in prop::collection::vec(ring_spec(), 0..3),
        replacement in ring_spec(),
    ) {
        let doc = spec.document();
        let before = ring_of(&doc, &vm);
        // Stage and kill edits.
        let stage = doc.rings().last().map(|r| r.name().to_owned());
        for edited in [
            kill(Some(&doc), f, 1).unwrap(),
            unkill(Some(&doc), f, 1).unwrap(),
            set_stage(Some(&doc), f, stage.as_deref(), 1).unwrap(),
        ] {
            prop_assert_eq!(ring_of(&edited, &vm), before.clone());
        }
        // Rings appended at the end, or any ring after the VM's ring
        // redefined (a VM in no ring may of course join a new ring).
        if let Some(p) = &before {
            let mut longer = spec.clone();
            longer.rings.extend(appended);
            prop_assert_eq!(ring_of(&longer.document(), &vm), before.clone());
            if p.index + 1 < spec.rings.len() {
                let mut edited = spec.clone();
                edited.rings[p.index + 1] = replacement;
                prop_assert_eq!(ring_of(&edited.document(), &vm), before.clone());
            }
        }
    }

    #[test]
    fn an_admitted_unsigned_change_never_enables_anything_new(
        old in prop::option::of(doc_spec()), fresh in doc_spec(), ga in ga_set(),
        changes in prop::collection::vec(change(), 1..4), derived in any::<bool>(),
        vms in prop::collection::vec(vm_facts(), 1..30),
    ) {
        // The new document is either unrelated to the old one or the old
        // one with a few changes (which admission accepts far more often).
        let new = match (&old, derived) {
            (Some(o), true) => o.apply(&changes),
            _ => fresh,
        };
        let old_doc = old.as_ref().map(DocSpec::document);
        let current = old_doc.as_ref().map(|d| {
            let bytes = unsigned(d);
            super::admit::Accepted::restore(bytes, &TrustedKeys::default()).unwrap()
        });
        let mut new = new;
        new.revision = old.as_ref().map_or(1, |o| o.revision + 1);
        let new_doc = new.document();
        let outcome = admit(&unsigned(&new_doc), current.as_ref(), &ga, &TrustedKeys::default());
        if let Ok(Admitted::New(_)) = outcome {
            for vm in &vms {
                let before = resolve(old_doc.as_ref(), &Override::default(), &ga, vm);
                let after = resolve(Some(&new_doc), &Override::default(), &ga, vm);
                for f in Feature::ALL {
                    if after[&f.id()] == FeatureState::Enabled {
                        prop_assert_eq!(before[&f.id()], FeatureState::Enabled, "{} {:?}", f, vm);
                    }
                }
            }
        }
    }

    #[test]
    fn a_kill_is_always_admitted_unsigned(
        old in prop::option::of(doc_spec()), ga in ga_set(), f in feature(),
    ) {
        let old_doc = old.as_ref().map(DocSpec::document);
        let current = old_doc.as_ref().map(|d| {
            super::admit::Accepted::restore(unsigned(d), &TrustedKeys::default()).unwrap()
        });
        let killed = kill(old_doc.as_ref(), f, 1).unwrap();
        let outcome = admit(&unsigned(&killed), current.as_ref(), &ga, &TrustedKeys::default());
        prop_assert!(matches!(outcome, Ok(Admitted::New(_))), "{:?}", outcome);
    }

    #[test]
    fn buckets_are_in_range(id in "[A-Za-z0-9._:+-]{1,64}") {
        prop_assert!(bucket(&VmId::new(id).unwrap()) < BUCKETS);
    }
}

/// The bucket function spreads sequential ids evenly: each tenth of the
/// bucket space gets 10 % ± 1 % of 20,000 ids.
#[test]
fn buckets_are_evenly_spread() {
    let n = 20_000u32;
    let mut deciles = [0u32; 10];
    for i in 0..n {
        let b = bucket(&VmId::new(format!("vm-{i}")).unwrap());
        deciles[usize::try_from(b / 1000).unwrap()] += 1;
    }
    for (d, count) in deciles.iter().enumerate() {
        assert!(
            (1800..=2200).contains(count),
            "decile {d} got {count} of {n}: {deciles:?}"
        );
    }
}
