//! What every live session of `vkx-host serve` reads of the rollout: the
//! accepted document, the local override, the generally-available
//! features and the node's name, as one value ([`View`]) the rollout
//! runtime (`rollout_service`) publishes on a `tokio::sync::watch`; and
//! the feature map of one VM resolved from it, narrowed by the live drill
//! while one is in force.
//!
//! Pure: no I/O, no logging.

use std::collections::BTreeSet;
use std::sync::Arc;

use vkx_common::wire::{FeatureState, Features, VmId};

use super::{Accepted, Document, DrillOverlay, Override, VmFacts, resolve, ring_of};

/// What every session reads: the accepted document, the local override,
/// the generally-available features and this node's name.
#[derive(Debug, Clone)]
pub struct View {
    pub accepted: Option<Arc<Accepted>>,
    pub local: Override,
    pub ga: Arc<BTreeSet<u16>>,
    pub node: Arc<str>,
    /// The live drill's overlay while it is in force (spec/ROLLOUT.md §14).
    pub drill: Option<Arc<DrillOverlay>>,
}

impl View {
    pub fn document(&self) -> Option<&Document> {
        self.accepted.as_deref().map(Accepted::document)
    }

    fn facts(&self, vm: &VmId, image: Option<&str>) -> VmFacts {
        VmFacts {
            vm_id: vm.clone(),
            image: image.map(str::to_owned),
            node: self.node.to_string(),
        }
    }

    /// The complete v1 feature map of `vm` (whose image the policy names):
    /// the document's, narrowed by the live drill if one is in force.
    pub fn features_for(&self, vm: &VmId, image: Option<&str>) -> Features {
        let facts = self.facts(vm, image);
        let doc = self.document();
        let mut map = resolve(doc, &self.local, &self.ga, &facts);
        if let (Some(o), Some(d)) = (&self.drill, doc) {
            o.narrow(ring_of(d, &facts).map(|p| p.name).as_deref(), &mut map);
        }
        map
    }

    /// The live drill, if it is what takes a feature away from `vm` now
    /// (the VM is in its ring, and the document alone enables it).
    pub fn drill_narrows(&self, vm: &VmId, image: Option<&str>) -> Option<&DrillOverlay> {
        let o = self.drill.as_deref()?;
        let doc = self.document()?;
        let facts = self.facts(vm, image);
        let ring = ring_of(doc, &facts)?;
        let base = resolve(Some(doc), &self.local, &self.ga, &facts);
        (ring.name == o.ring() && base.get(&o.feature().id()) == Some(&FeatureState::Enabled))
            .then_some(o)
    }

    /// The accepted revision (0: none).
    pub fn revision(&self) -> u64 {
        self.document().map_or(0, Document::revision)
    }
}
