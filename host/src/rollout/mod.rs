//! Staged rollout and kill switch: which v1 features (§12 of PROTOCOL.md)
//! each VM gets, from a signed, versioned rollout document
//! (spec/ROLLOUT.md).
//!
//! What it is: pure functions and plain values. A document is parsed
//! strictly and validated ([`document`]); a VM's ring and feature map are
//! computed from the document, the node's local override file and
//! host.toml's generally-available list ([`mod@resolve`]); a candidate
//! document from a source is admitted or refused against the last
//! accepted one ([`mod@admit`]): revisions only go up, and a change that can
//! widen the set of VMs with a feature enabled must carry a signature
//! from a trusted key, while one that provably narrows it need not.
//! Operators' edits ([`edit`]) are pure functions from one document to
//! the next; [`envelope`] signs and verifies. What every live session
//! reads of it is one value, the [`View`] ([`view`]), which the runtime of
//! `serve` (`rollout_service`) publishes. The only I/O is the small
//! crash-safe persistence file ([`persist`]) and reading key and override
//! files.
//!
//! The rollout controller's core is here too: a plan ([`plan`]), its
//! health gates ([`gates`]) over the fleet's health summaries
//! ([`summary`], which `health` publishes) and the state machine that
//! walks the rings ([`controller`]); its driver is `rollout_run`.
//!
//! What it trusts: host.toml's trusted keys and generally-available list,
//! the local override file, and the file it persisted itself. Everything
//! a source delivers is untrusted until [`admit()`] says otherwise.
//!
//! What it bounds: every size and count of a document (named constants
//! in [`document`]), checked before the work they would cause. No
//! logging here: results are typed values; the caller logs, rate-limited.

pub mod admit;
pub mod controller;
pub mod document;
pub mod drill_overlay;
pub mod edit;
pub mod envelope;
pub mod gates;
pub mod local_override;
pub mod persist;
pub mod plan;
pub mod resolve;
pub mod summary;
pub mod view;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod vectors;

pub use admit::{Accepted, Admitted, MAX_UNSIGNED_REVISION_STEP, Refusal, admit};
pub use document::{Document, DocumentError, Feature, FeatureRollout, Ring};
pub use drill_overlay::{DrillOverlay, OverlayError};
pub use edit::{EditError, kill, set_stage, unkill};
pub use envelope::{
    Envelope, KeyError, SIGNING_CONTEXT, Signature, TrustedKey, TrustedKeys, keygen,
    load_signing_key, public_key_hex, sign, signed_message, unsigned, write_signing_key,
};
pub use local_override::{Override, OverrideError};
pub use persist::{ACCEPTED_FILE, PersistError, load, store};
pub use resolve::{
    Explanation, FeatureExplanation, Membership, Placement, RingRow, VmFacts, bucket, explain,
    resolve, resolve_at, ring_of, ring_table, state_name,
};
pub use view::View;

/// A short, escaped prefix of an untrusted string, safe to put in an
/// error message that will be logged.
pub(crate) fn shown(s: &str) -> String {
    /// Characters of an untrusted value shown in a message.
    const MAX_SHOWN: usize = 48;
    let mut out: String = s
        .chars()
        .take(MAX_SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().count() > MAX_SHOWN {
        out.push_str("...");
    }
    out
}
