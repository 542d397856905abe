//! What goes in and out of the controller: the driver's answers
//! ([`Input`]), the one thing to do next ([`Action`]), the timeline
//! events ([`RunEvent`]) and the final [`Report`] with its [`Outcome`].
//! Plain values; the events and the report serialise for the timeline
//! and `--json`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::progress::{Progress, VerdictRecord, Written};
use crate::rollout::document::{Document, Feature};
use crate::rollout::gates::Evaluation;
use crate::rollout::summary::HealthSummary;
use crate::source::Version;

/// What happened (the driver's answer to the last [`Action`]).
#[derive(Debug, Clone)]
pub enum Input {
    /// The run begins.
    Started,
    /// The source's document (`None`: there is none) and its version.
    DocumentRead(Option<Document>, Version),
    /// The last write reached the store.
    Written { revision: u64 },
    /// The last write lost a compare-and-swap: the document changed.
    WriteConflict,
    /// The progress record was saved.
    Saved,
    /// Every node's health summary, read now.
    Health {
        fleet: Vec<HealthSummary>,
        /// Entries the reader refused (malformed, over-size, a key that
        /// does not name its node): missing data, so the read cannot
        /// show a pass; it can still show a failure.
        refused: usize,
    },
    /// The health could not be read.
    HealthFailed(String),
    /// A [`Action::Sleep`] or [`Action::WaitForStore`] ended.
    Tick,
    /// The store could not be reached: a read failed, a write's fate is
    /// unknown, a save failed, or the controller lock's lease lapsed.
    StoreFailed(String),
    /// After an outage: the lock is this controller's (taken again if it
    /// had lapsed) and the progress record is the one it last saved.
    StoreChecked,
}

/// What to do next.
#[derive(Debug, Clone)]
pub enum Action {
    ReadDocument,
    /// Sign `document` with the operator's key and write it if the source
    /// is still at `expected`.
    WriteStage {
        ring: String,
        document: Document,
        expected: Version,
    },
    /// Write `document` unsigned if the source is still at `expected`.
    WriteKill {
        document: Document,
        expected: Version,
    },
    ReadHealth,
    SaveProgress(Progress),
    Sleep(SystemTime),
    /// The store is unreachable: wait as the retry policy says, then
    /// [`Input::Tick`] (the controller reads the document again).
    WaitForStore,
    /// The store answered again: take the lock again if it lapsed (if no
    /// one else holds it), check that the progress record is still this
    /// `Progress` (or the one last saved), then [`Input::StoreChecked`].
    CheckStore(Progress),
    Finish(Report),
}

// ---------------------------------------------------------------- events

/// A timeline event: what happened, and when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunEvent {
    #[serde(serialize_with = "unix_ms")]
    pub at: SystemTime,
    #[serde(flatten)]
    pub kind: RunEventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEventKind {
    /// The run began (`resumed`: from a saved record).
    Started {
        #[serde(serialize_with = "feature_name")]
        feature: Feature,
        step: usize,
        ring: Option<String>,
        resumed: bool,
    },
    /// The feature's stage was set to `ring` at `revision`.
    StageSet { ring: String, revision: u64 },
    /// A health read during a bake: the window's figures so far.
    Observed {
        ring: String,
        evaluation: Evaluation,
    },
    /// A decision: at the end of a bake, or a failure during one.
    Verdict {
        ring: String,
        evaluation: Evaluation,
    },
    /// An inconclusive bake was extended.
    Extended {
        ring: String,
        #[serde(serialize_with = "unix_ms")]
        until: SystemTime,
    },
    /// The feature was killed at `revision` (unsigned).
    Halted { ring: String, revision: u64 },
    /// The rollout paused at `ring`.
    Paused { ring: String, reason: String },
    /// Someone else changed the feature; the controller stopped.
    Stopped { reason: String },
    /// The store became unreachable; the controller holds (writes
    /// nothing, decides nothing) until it answers again.
    StoreLost { ring: String, reason: String },
    /// The store answered again after `down_ms`; the bake of `ring`
    /// starts again (the fleet's health during the outage is unknown).
    StoreBack { ring: String, down_ms: u64 },
    /// Every ring passed.
    Completed,
}

fn feature_name<S: serde::Serializer>(f: &Feature, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.name())
}

fn unix_ms<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    s.serialize_u64(ms)
}

// ---------------------------------------------------------------- report

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Halted,
    Paused,
    /// Someone else's kill or stage change.
    Stopped,
    /// The plan does not fit the document (or the feature is killed).
    Refused,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Completed => "completed",
            Self::Halted => "halted",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Refused => "refused",
        })
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    #[serde(serialize_with = "feature_name")]
    pub feature: Feature,
    pub plan_digest: String,
    pub outcome: Outcome,
    /// The step (and its ring) where it ended.
    pub step: usize,
    pub ring: Option<String>,
    pub reason: Option<String>,
    pub revisions: Vec<Written>,
    pub history: Vec<VerdictRecord>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rollout of {}: {}{}",
            self.feature,
            self.outcome,
            self.ring.as_ref().map_or(String::new(), |r| format!(
                " at ring {r} (step {})",
                self.step + 1
            ))
        )?;
        if let Some(r) = &self.reason {
            writeln!(f, "reason: {r}")?;
        }
        writeln!(f)?;
        writeln!(f, "{:<12} {:<6} {:>9}", "ring", "write", "revision")?;
        for w in &self.revisions {
            writeln!(f, "{:<12} {:<6} {:>9}", w.ring, w.kind, w.revision)?;
        }
        writeln!(f)?;
        writeln!(f, "{:<12} {:<13} detail", "ring", "verdict")?;
        for v in &self.history {
            writeln!(f, "{:<12} {:<13} {}", v.ring, v.verdict, v.detail)?;
        }
        Ok(())
    }
}
