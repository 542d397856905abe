//! Operators' edits (`vkx-host rollout kill|unkill|stage`): pure
//! functions from the current document to the next one, at
//! `revision + 1` and `issued_at = now`. With no current document, an
//! edit starts from an empty one (no rings, no features) at revision 1.
//!
//! What it trusts: the current document is a validated value. What it
//! guarantees: the result is valid (a stage always names a ring). Whether
//! the result needs a signature is [`super::admit()`]'s decision: a kill
//! never does, an unkill or a raised stage does.

use super::document::{Document, Feature, FeatureRollout};
use super::shown;

/// Edits retried when another writer changed the document between our
/// read and our write (compare-and-swap conflicts): the operator's
/// (`vkx-host rollout kill|unkill|set-stage`) and the controller's.
pub const MAX_EDIT_ATTEMPTS: usize = 3;

/// Why an edit could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    #[error("the rollout revision is at its maximum; no later revision exists")]
    RevisionExhausted,
    #[error("the rollout document has no ring \"{ring}\"")]
    UnknownRing { ring: String },
}

/// Kills `feature` (its stage is kept, so [`unkill`] restores it). A
/// feature the document did not name gets `{"stage": null, "killed":
/// true}`.
pub fn kill(current: Option<&Document>, feature: Feature, now: u64) -> Result<Document, EditError> {
    edit(current, now, |doc| {
        doc.feature_slot(feature)
            .get_or_insert_with(|| FeatureRollout::new(None, false))
            .set_killed(true);
        Ok(())
    })
}

/// Clears `feature`'s kill flag; its stage applies again. An entry with
/// no stage is removed instead, so a feature that [`kill`] added to the
/// document returns to the node's generally-available default, as it was
/// before the kill. A feature the document does not name is left as it is
/// (only the revision moves).
pub fn unkill(
    current: Option<&Document>,
    feature: Feature,
    now: u64,
) -> Result<Document, EditError> {
    edit(current, now, |doc| {
        let slot = doc.feature_slot(feature);
        if slot.as_ref().is_some_and(|e| e.stage().is_none()) {
            *slot = None;
        } else if let Some(entry) = slot {
            entry.set_killed(false);
        }
        Ok(())
    })
}

/// Sets `feature`'s stage to the ring named `stage` (or null). A feature
/// the document did not name gets the stage and `killed: false`; a killed
/// feature stays killed.
pub fn set_stage(
    current: Option<&Document>,
    feature: Feature,
    stage: Option<&str>,
    now: u64,
) -> Result<Document, EditError> {
    edit(current, now, |doc| {
        if let Some(ring) = stage
            && doc.ring_index(ring).is_none()
        {
            return Err(EditError::UnknownRing { ring: shown(ring) });
        }
        doc.feature_slot(feature)
            .get_or_insert_with(|| FeatureRollout::new(None, false))
            .set_stage(stage.map(str::to_owned));
        Ok(())
    })
}

fn edit(
    current: Option<&Document>,
    now: u64,
    change: impl FnOnce(&mut Document) -> Result<(), EditError>,
) -> Result<Document, EditError> {
    let mut next = match current {
        Some(doc) => doc.next(now).ok_or(EditError::RevisionExhausted)?,
        None => Document::empty(1, now),
    };
    change(&mut next)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::document::EXAMPLE;

    fn example() -> Document {
        Document::parse(EXAMPLE.as_bytes()).unwrap()
    }

    #[test]
    fn edits_bump_the_revision_and_stay_valid() {
        let d = example();
        let k = kill(Some(&d), Feature::KeyRotation, 42).unwrap();
        assert_eq!((k.revision(), k.issued_at()), (8, 42));
        let entry = k.feature(Feature::KeyRotation).unwrap();
        assert!(entry.killed());
        assert_eq!(entry.stage(), Some("canary"));
        let u = unkill(Some(&k), Feature::KeyRotation, 43).unwrap();
        assert_eq!(
            u.feature(Feature::KeyRotation),
            d.feature(Feature::KeyRotation)
        );
        assert_eq!(u.revision(), 9);
        let s = set_stage(Some(&d), Feature::KeyRotation, Some("10pct"), 1).unwrap();
        assert_eq!(s.stage_index(Feature::KeyRotation), Some(3));
        let s = set_stage(Some(&d), Feature::KeyRotation, None, 1).unwrap();
        assert_eq!(s.stage_index(Feature::KeyRotation), None);
        assert_eq!(
            set_stage(Some(&d), Feature::KeyRotation, Some("nope"), 1),
            Err(EditError::UnknownRing {
                ring: "nope".into()
            })
        );
        // Every edit's output parses back to itself.
        for doc in [&k, &u, &s] {
            assert_eq!(&Document::parse(&doc.canonical_bytes()).unwrap(), doc);
        }
    }

    #[test]
    fn edits_without_a_document_start_empty() {
        let k = kill(None, Feature::KeyRelease, 5).unwrap();
        assert_eq!(k.revision(), 1);
        assert!(k.rings().is_empty());
        assert!(k.feature(Feature::KeyRelease).unwrap().killed());
        assert_eq!(k.feature(Feature::KeyRotation), None);
        let u = unkill(None, Feature::KeyRelease, 5).unwrap();
        assert_eq!(u.feature(Feature::KeyRelease), None);
        // A kill that added the entry is undone by removing it: the
        // feature falls back to the node's generally-available default.
        let u = unkill(Some(&k), Feature::KeyRelease, 6).unwrap();
        assert_eq!(u.feature(Feature::KeyRelease), None);
        assert_eq!(u.revision(), 2);
        assert!(matches!(
            set_stage(None, Feature::KeyRelease, Some("all"), 5),
            Err(EditError::UnknownRing { .. })
        ));
    }

    #[test]
    fn the_last_revision_cannot_be_edited() {
        let text = EXAMPLE.replace("\"revision\": 7", &format!("\"revision\": {}", u64::MAX));
        let d = Document::parse(text.as_bytes()).unwrap();
        assert_eq!(
            kill(Some(&d), Feature::KeyRelease, 1),
            Err(EditError::RevisionExhausted)
        );
    }
}
