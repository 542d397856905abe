//! The controller's progress record: what it saves in the store after
//! every change of step or phase, and what a resumed run starts from.
//!
//! What it trusts: nothing of a record it reads (the store is shared):
//! [`Progress::parse`] checks the size before parsing, then parses
//! strictly; [`Progress::check`] refuses the record of another plan,
//! feature or step count. What it bounds: the record's size
//! ([`MAX_PROGRESS_BYTES`]) and its verdict history ([`MAX_HISTORY`],
//! kept by the controller).

use serde::{Deserialize, Serialize};

use crate::rollout::plan::Plan;

/// The progress record's format.
pub const PROGRESS_FORMAT: u32 = 1;
/// Largest progress record written or read: the history of a full plan
/// is a few KiB.
pub const MAX_PROGRESS_BYTES: usize = 256 * 1024;
/// Verdicts kept in the record: every step's final verdict and each
/// extension's, with room to spare (32 steps × 64 extensions would not
/// fit; older entries are dropped first).
pub const MAX_HISTORY: usize = 256;

/// What the controller saves in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub format: u32,
    /// [`Plan::digest`] of the plan being run.
    pub plan_digest: String,
    pub feature: String,
    /// Index of the current step in the plan's rings.
    pub step: usize,
    pub phase: Phase,
    /// Every document revision this controller wrote.
    pub revisions: Vec<Written>,
    /// Verdicts, oldest first (at most [`MAX_HISTORY`]).
    pub history: Vec<VerdictRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum Phase {
    /// The step's stage is to be written.
    Widening,
    /// The step's stage is written; baking since then.
    Baking { since_unix: u64 },
    /// Stopped at this step with an inconclusive verdict; running again
    /// bakes the step again.
    Paused { reason: String },
    /// The feature was killed at `revision`.
    Halted { revision: u64 },
    /// Every ring passed.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Written {
    pub ring: String,
    pub revision: u64,
    /// `stage` or `kill`.
    pub kind: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictRecord {
    pub ring: String,
    pub at_unix: u64,
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
    /// The verdict in words (breaches, or why inconclusive).
    pub detail: String,
}

/// Why a progress record cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProgressError {
    #[error("progress record of {len} bytes is over the limit of {MAX_PROGRESS_BYTES}")]
    TooLarge { len: usize },
    #[error("progress record malformed: {0}")]
    Malformed(String),
    #[error("progress record format {0} is not {PROGRESS_FORMAT}")]
    Format(u32),
    #[error(
        "the progress in the store belongs to another plan (digest {found}, this plan {expected}); \
         finish or remove that rollout's record first"
    )]
    OtherPlan { expected: String, found: String },
    #[error("the progress in the store is of feature {found}, this plan's is {expected}")]
    OtherFeature { expected: String, found: String },
    #[error("the progress in the store is at step {step}; this plan has {steps}")]
    StepOutOfRange { step: usize, steps: usize },
}

impl Progress {
    /// The record of a fresh run of `plan`.
    pub fn new(plan: &Plan) -> Self {
        Self {
            format: PROGRESS_FORMAT,
            plan_digest: plan.digest.clone(),
            feature: plan.feature.name().to_owned(),
            step: 0,
            phase: Phase::Widening,
            revisions: Vec::new(),
            history: Vec::new(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ProgressError> {
        if bytes.len() > MAX_PROGRESS_BYTES {
            return Err(ProgressError::TooLarge { len: bytes.len() });
        }
        let p: Self = serde_json::from_slice(bytes)
            .map_err(|e| ProgressError::Malformed(crate::rollout::shown(&e.to_string())))?;
        if p.format != PROGRESS_FORMAT {
            return Err(ProgressError::Format(p.format));
        }
        Ok(p)
    }

    /// The record's JSON (pretty: operators read it).
    pub fn to_json(&self) -> Vec<u8> {
        // A plain struct of strings and integers always serialises.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks that this record belongs to `plan`.
    pub fn check(&self, plan: &Plan) -> Result<(), ProgressError> {
        if self.plan_digest != plan.digest {
            return Err(ProgressError::OtherPlan {
                expected: plan.digest.clone(),
                found: crate::rollout::shown(&self.plan_digest),
            });
        }
        if self.feature != plan.feature.name() {
            return Err(ProgressError::OtherFeature {
                expected: plan.feature.name().to_owned(),
                found: crate::rollout::shown(&self.feature),
            });
        }
        if self.step >= plan.steps.len() && self.phase != Phase::Done {
            return Err(ProgressError::StepOutOfRange {
                step: self.step,
                steps: plan.steps.len(),
            });
        }
        Ok(())
    }
}
