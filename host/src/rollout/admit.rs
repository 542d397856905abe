//! Admission of a candidate rollout envelope (spec/ROLLOUT.md §8): what
//! stands between a source's bytes and the feature maps of every VM.
//!
//! The authority is asymmetric. Turning features off (towards the
//! fail-closed baseline) is cheap: an unsigned document is admitted when
//! it provably narrows, for every feature, the set of VMs that get
//! `enabled`. Turning features on must be authenticated: a change that
//! might widen needs a signature by a trusted key. Revisions only go up,
//! so a kill cannot be undone by replaying an older signed enable.
//!
//! What it trusts: `current` (the host's own last accepted state), host.toml's
//! generally-available list and trusted keys. What it bounds: the
//! candidate's size (before parsing) and, for unsigned candidates, how far
//! the revision may jump ([`MAX_UNSIGNED_REVISION_STEP`]).

use std::collections::BTreeSet;

use super::document::{BUCKETS, Document, DocumentError, Feature, Ring};
use super::envelope::{Envelope, TrustedKeys, VerifyError};

/// Largest revision increase an unsigned candidate may make. Without it a
/// writer without a key could publish a narrowing document at revision
/// u64::MAX and freeze every node forever (no later revision exists);
/// with it, reaching the end takes more than 10^13 admitted writes. Far
/// above any real edit rate, so a node that was down does catch up.
pub const MAX_UNSIGNED_REVISION_STEP: u64 = 1 << 20;

/// The document the host acts on, as it was admitted (or restored from
/// its own persisted file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    envelope: Vec<u8>,
    document: Document,
    signed_by: Option<String>,
}

impl Accepted {
    /// Rebuilds the accepted state from envelope bytes this host persisted
    /// itself: parsed and validated, but NOT admitted (no revision or
    /// narrowing check). Never call it with bytes from a source.
    /// `signed_by` is the key id if the signature verifies with `trusted`
    /// now; a document signed by a key since removed stays, unsigned.
    pub fn restore(envelope: Vec<u8>, trusted: &TrustedKeys) -> Result<Self, DocumentError> {
        let Envelope {
            document,
            signature,
        } = Envelope::parse(&envelope)?;
        let signed_by = signature
            .filter(|s| trusted.verify(&document, s).is_ok())
            .map(|s| s.key_id);
        Ok(Self {
            envelope,
            document,
            signed_by,
        })
    }

    /// The envelope bytes as the source delivered them (what is
    /// persisted).
    pub fn envelope(&self) -> &[u8] {
        &self.envelope
    }

    pub fn document(&self) -> &Document {
        &self.document
    }

    /// The trusted key that signed it; `None` if it was admitted unsigned
    /// (a narrowing change).
    pub fn signed_by(&self) -> Option<&str> {
        self.signed_by.as_deref()
    }
}

/// What [`admit`] decided when it did not refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// A new document to act on and persist.
    New(Accepted),
    /// The candidate's document is the current one (sources deliver the
    /// same value again): nothing to do.
    Unchanged,
}

/// Why a candidate was refused. The current document stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("malformed rollout document: {0}")]
    Malformed(DocumentError),
    #[error("rollout revision {revision} is not above the accepted revision {highest}")]
    Replay { revision: u64, highest: u64 },
    #[error(
        "unsigned rollout revision {revision} jumps more than {MAX_UNSIGNED_REVISION_STEP} \
         above the accepted revision {highest}; sign it"
    )]
    RevisionJump { revision: u64, highest: u64 },
    #[error("rollout document signed by key \"{key_id}\", which host.toml does not trust")]
    UnknownKey { key_id: String },
    #[error("rollout document signature by key \"{key_id}\" does not verify")]
    BadSignature { key_id: String },
    #[error(
        "unsigned rollout document may enable {feature} for VMs that do not have it now; \
         a widening change must be signed"
    )]
    UnsignedWidening { feature: Feature },
}

impl Refusal {
    /// A stable short label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Replay { .. } => "replay",
            Self::RevisionJump { .. } => "revision-jump",
            Self::UnknownKey { .. } => "unknown-key",
            Self::BadSignature { .. } => "bad-signature",
            Self::UnsignedWidening { .. } => "unsigned-widening",
        }
    }
}

/// Admits or refuses `candidate` (envelope bytes from a source) against
/// the current accepted state, in this order: parse and validate;
/// same document as the current one → [`Admitted::Unchanged`]; revision
/// must be above the current one; a present signature must verify with a
/// trusted key; an unsigned candidate must stay within
/// [`MAX_UNSIGNED_REVISION_STEP`] and provably narrow every feature
/// against the current document (or, with none, the no-document
/// baseline: `ga` features enabled everywhere, others nowhere).
pub fn admit(
    candidate: &[u8],
    current: Option<&Accepted>,
    ga: &BTreeSet<u16>,
    trusted: &TrustedKeys,
) -> Result<Admitted, Refusal> {
    let Envelope {
        document,
        signature,
    } = Envelope::parse(candidate).map_err(Refusal::Malformed)?;
    let baseline = current.map(Accepted::document);
    if baseline == Some(&document) {
        return Ok(Admitted::Unchanged);
    }
    let highest = baseline.map(Document::revision);
    if let Some(highest) = highest
        && document.revision() <= highest
    {
        return Err(Refusal::Replay {
            revision: document.revision(),
            highest,
        });
    }
    let signed_by = match signature {
        Some(sig) => match trusted.verify(&document, &sig) {
            Ok(()) => Some(sig.key_id),
            Err(VerifyError::UnknownKey) => {
                return Err(Refusal::UnknownKey { key_id: sig.key_id });
            }
            Err(VerifyError::BadSignature) => {
                return Err(Refusal::BadSignature { key_id: sig.key_id });
            }
        },
        None => {
            let highest = highest.unwrap_or(0);
            if document.revision() - highest > MAX_UNSIGNED_REVISION_STEP {
                return Err(Refusal::RevisionJump {
                    revision: document.revision(),
                    highest,
                });
            }
            if let Some(feature) = first_widening(baseline, &document, ga) {
                return Err(Refusal::UnsignedWidening { feature });
            }
            None
        }
    };
    Ok(Admitted::New(Accepted {
        envelope: candidate.to_vec(),
        document,
        signed_by,
    }))
}

/// The first feature (in id order) for which `new` does not provably
/// enable a subset of the VMs `old` enables.
pub fn first_widening(
    old: Option<&Document>,
    new: &Document,
    ga: &BTreeSet<u16>,
) -> Option<Feature> {
    Feature::ALL
        .into_iter()
        .find(|&f| !enabled_set(Some(new), ga, f).provably_within(&enabled_set(old, ga, f)))
}

/// The VMs that get `enabled` for one feature, in the three shapes the
/// narrowing rule can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnabledSet<'a> {
    /// Killed, stage null, or not named and not GA.
    Nobody,
    /// Not named and GA, or staged at a prefix holding a ring of every
    /// bucket.
    Everyone,
    /// Staged at ring k: the members of rings 0..=k.
    Prefix(&'a [Ring]),
}

fn enabled_set<'a>(doc: Option<&'a Document>, ga: &BTreeSet<u16>, f: Feature) -> EnabledSet<'a> {
    let Some((doc, entry)) = doc.and_then(|d| d.feature(f).map(|e| (d, e))) else {
        return if ga.contains(&f.id()) {
            EnabledSet::Everyone
        } else {
            EnabledSet::Nobody
        };
    };
    if entry.killed() {
        return EnabledSet::Nobody;
    }
    let Some(stage) = doc.stage_index(f) else {
        return EnabledSet::Nobody;
    };
    // stage_index is an index of rings, so the range is in bounds.
    let prefix = &doc.rings()[..=stage];
    if prefix.iter().any(|r| r.buckets_below() == Some(BUCKETS)) {
        EnabledSet::Everyone
    } else {
        EnabledSet::Prefix(prefix)
    }
}

impl EnabledSet<'_> {
    /// Whether `self` ⊆ `old` is provable from the shapes alone: self is
    /// nobody, old is everyone, or self's rings (definitions and order)
    /// are a prefix of old's.
    fn provably_within(&self, old: &Self) -> bool {
        match (self, old) {
            (Self::Nobody, _) | (_, Self::Everyone) => true,
            (Self::Prefix(new), Self::Prefix(old)) => old.starts_with(new),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::document::EXAMPLE;
    use crate::rollout::edit::{kill, set_stage, unkill};
    use crate::rollout::envelope::{TrustedKey, public_key_hex, sign, unsigned};
    use ring::signature::Ed25519KeyPair;

    fn pair(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn trusted() -> TrustedKeys {
        TrustedKeys::new([TrustedKey {
            id: "release-2026".into(),
            public_key: public_key_hex(&pair(1)),
        }])
        .unwrap()
    }

    fn example() -> Document {
        Document::parse(EXAMPLE.as_bytes()).unwrap()
    }

    fn accept(bytes: &[u8], current: Option<&Accepted>) -> Result<Accepted, Refusal> {
        match admit(bytes, current, &BTreeSet::new(), &trusted())? {
            Admitted::New(a) => Ok(a),
            Admitted::Unchanged => panic!("unchanged"),
        }
    }

    fn signed(doc: &Document) -> Vec<u8> {
        sign(doc, &pair(1), "release-2026").unwrap()
    }

    #[test]
    fn kill_is_narrowing_and_accepted_unsigned() {
        let current = accept(&signed(&example()), None).unwrap();
        assert_eq!(current.signed_by(), Some("release-2026"));
        let killed = kill(Some(current.document()), Feature::KeyRelease, 100).unwrap();
        assert_eq!(killed.revision(), 8);
        let next = accept(&unsigned(&killed), Some(&current)).unwrap();
        assert_eq!(next.signed_by(), None);
        assert_eq!(next.document(), &killed);
        // The same value again is not an error.
        assert_eq!(
            admit(
                &unsigned(&killed),
                Some(&next),
                &BTreeSet::new(),
                &trusted()
            ),
            Ok(Admitted::Unchanged)
        );
    }

    #[test]
    fn widening_needs_a_signature() {
        let first = accept(&signed(&example()), None).unwrap();
        let killed = kill(Some(first.document()), Feature::KeyRotation, 1).unwrap();
        let current = accept(&unsigned(&killed), Some(&first)).unwrap();
        let d = current.document();
        let unkilled = unkill(Some(d), Feature::KeyRotation, 2).unwrap();
        let raised = set_stage(Some(d), Feature::KeyRelease, None, 2)
            .and_then(|d| unkill(Some(&d), Feature::KeyRotation, 2))
            .and_then(|d| set_stage(Some(&d), Feature::KeyRotation, Some("1pct"), 2))
            .unwrap();
        // Unkilling a feature whose stage is null enables nobody: narrowing.
        let harmless = unkill(Some(d), Feature::KeyDerivation, 2).unwrap();
        assert!(accept(&unsigned(&harmless), Some(&current)).is_ok());
        for (doc, feature) in [
            (&unkilled, Feature::KeyRotation),
            (&raised, Feature::KeyRotation),
        ] {
            assert_eq!(
                accept(&unsigned(doc), Some(&current)),
                Err(Refusal::UnsignedWidening { feature })
            );
            assert!(accept(&signed(doc), Some(&current)).is_ok());
        }
        // Lowering a stage narrows.
        let lowered = set_stage(Some(d), Feature::KeyRelease, Some("10pct"), 1).unwrap();
        assert!(accept(&unsigned(&lowered), Some(&current)).is_ok());
        // Editing a ring inside a feature's prefix is not provably narrowing.
        let current = first;
        let text = EXAMPLE
            .replace("\"vm-2\"]", "\"vm-2\", \"vm-3\"]")
            .replace("7,", "8,");
        let edited = Document::parse(text.as_bytes()).unwrap();
        assert_eq!(
            accept(&unsigned(&edited), Some(&current)),
            Err(Refusal::UnsignedWidening {
                feature: Feature::KeyRotation
            })
        );
    }

    #[test]
    fn forged_and_unknown_signatures_are_refused_even_when_narrowing() {
        let current = accept(&signed(&example()), None).unwrap();
        let killed = kill(Some(current.document()), Feature::KeyRelease, 1).unwrap();
        let good = String::from_utf8(signed(&killed)).unwrap();
        // Flip one bit of the signature's last hex digit.
        let at = good.rfind('"').unwrap() - 1;
        let mut flipped = good.clone().into_bytes();
        flipped[at] = if flipped[at] == b'0' { b'1' } else { b'0' };
        let e = accept(&flipped, Some(&current)).unwrap_err();
        assert_eq!(e.label(), "bad-signature");
        let other = sign(&killed, &pair(2), "release-2026").unwrap();
        assert_eq!(
            accept(&other, Some(&current)).unwrap_err().label(),
            "bad-signature"
        );
        let unknown = sign(&killed, &pair(1), "someone-else").unwrap();
        assert_eq!(
            accept(&unknown, Some(&current)),
            Err(Refusal::UnknownKey {
                key_id: "someone-else".into()
            })
        );
    }

    #[test]
    fn an_old_signed_enable_cannot_undo_a_kill() {
        let enable = signed(&example());
        let current = accept(&enable, None).unwrap();
        let killed = kill(Some(current.document()), Feature::KeyRelease, 1).unwrap();
        let after_kill = accept(&unsigned(&killed), Some(&current)).unwrap();
        assert_eq!(
            accept(&enable, Some(&after_kill)),
            Err(Refusal::Replay {
                revision: 7,
                highest: 8
            })
        );
    }

    #[test]
    fn malformed_and_huge_jumps_are_refused() {
        let e = accept(b"{\"document\":{}}", None).unwrap_err();
        assert_eq!(e.label(), "malformed");
        let current = accept(&signed(&example()), None).unwrap();
        let text = EXAMPLE.replace(
            "\"revision\": 7",
            &format!("\"revision\": {}", 7 + MAX_UNSIGNED_REVISION_STEP + 1),
        );
        let far = kill(
            Some(&Document::parse(text.as_bytes()).unwrap()),
            Feature::KeyRelease,
            1,
        )
        .unwrap();
        assert_eq!(
            accept(&unsigned(&far), Some(&current)).unwrap_err().label(),
            "revision-jump"
        );
        assert!(accept(&signed(&far), Some(&current)).is_ok());
    }

    #[test]
    fn with_no_document_the_baseline_is_ga() {
        let ga: BTreeSet<u16> = [Feature::KeyRelease.id()].into();
        // Killing a GA feature narrows.
        let first = kill(None, Feature::KeyRelease, 1).unwrap();
        assert!(matches!(
            admit(&unsigned(&first), None, &ga, &trusted()),
            Ok(Admitted::New(_))
        ));
        // Staging a non-GA feature widens; a document that names no
        // feature changes nothing.
        let text = r#"{"format":1,"revision":1,"issued_at":0,"rings":[{"name":"c","vm_ids":["vm-1"]}],
            "features":{"key-rotation":{"stage":"c","killed":false}}}"#;
        let staged = Document::parse(text.as_bytes()).unwrap();
        assert_eq!(
            admit(&unsigned(&staged), None, &ga, &trusted()),
            Err(Refusal::UnsignedWidening {
                feature: Feature::KeyRotation
            })
        );
        let empty = Document::empty(1, 0);
        assert!(admit(&unsigned(&empty), None, &ga, &trusted()).is_ok());
    }

    #[test]
    fn a_prefix_with_a_full_bucket_ring_is_everyone() {
        let d = example();
        // key-release at "all" (buckets_below 10000): forgetting it back to
        // GA fallback, or staging anything lower, is within everyone.
        assert_eq!(
            enabled_set(Some(&d), &BTreeSet::new(), Feature::KeyRelease),
            EnabledSet::Everyone
        );
        assert!(matches!(
            enabled_set(Some(&d), &BTreeSet::new(), Feature::KeyRotation),
            EnabledSet::Prefix(p) if p.len() == 1
        ));
    }
}
