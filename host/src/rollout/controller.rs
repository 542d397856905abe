//! The rollout controller's state machine (`vkx-host rollout run`,
//! spec/ROLLOUT.md §13.3), without I/O.
//!
//! What it is: a [`Controller`] walks a [`Plan`]'s rings one step at a
//! time: widen the feature's stage to the step's ring (a signed write),
//! bake while reading the fleet's health every poll interval, evaluate the
//! plan's gates ([`super::gates`]), then advance, pause (the verdict stayed
//! inconclusive through every extension) or halt (an unsigned kill of the
//! feature at a new revision). Like the protocol sessions, it is driven:
//! [`Controller::step`] takes what happened ([`Input`]) and the current
//! time, and returns the one thing to do next ([`Action`]); the driver
//! (`rollout_run`) does it and reports back. Timeline events
//! ([`RunEvent`]) queue up for [`Controller::poll_event`].
//!
//! Its progress ([`Progress`]) is saved to the store after every change of
//! step or phase, so a crashed controller resumes where it stopped: a
//! progress record of another plan (digest) is refused; a step whose stage
//! write reached the store but not the record is recognised in the
//! document and not written again. A resumed bake starts its window again
//! (the counters of the crashed run's window are not kept: a snapshot of a
//! large fleet's summaries is too large for the record).
//!
//! What it trusts: the plan (checked at load) and the document (parsed and
//! validated by the driver). It never fights an operator: a kill of the
//! feature, or a stage other than the one it set, found in the document
//! mid-run stops it with a report.
//!
//! What it bounds: write attempts after conflicts
//! ([`MAX_WRITE_ATTEMPTS`], [`MAX_KILL_ATTEMPTS`]), the verdict history
//! ([`MAX_HISTORY`]), the progress record's size ([`MAX_PROGRESS_BYTES`]),
//! and every bake (the plan's `max_bake`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::document::{Document, Feature};
use super::gates::{Evaluation, GateVerdict, evaluate};
use super::plan::Plan;
use crate::health::{FleetDelta, HealthSummary, NO_RING, RingSummary, fleet_delta};
use crate::source::Version;

/// The progress record's format.
pub const PROGRESS_FORMAT: u32 = 1;
/// Largest progress record written or read: the history of a full plan
/// is a few KiB.
pub const MAX_PROGRESS_BYTES: usize = 256 * 1024;
/// Verdicts kept in the record: every step's final verdict and each
/// extension's, with room to spare (32 steps × 64 extensions would not
/// fit; older entries are dropped first).
pub const MAX_HISTORY: usize = 256;
/// Attempts at a stage write that conflicted with another writer before
/// the controller pauses (the same bound as the operator's edits).
pub const MAX_WRITE_ATTEMPTS: usize = super::edit::MAX_EDIT_ATTEMPTS;
/// Attempts at the halting kill: a halt must happen, so it gets more.
pub const MAX_KILL_ATTEMPTS: usize = 16;
/// A health read this close to the end of the bake decides: a driver's
/// timer may wake a little early by the wall clock.
const DEADLINE_SLACK: Duration = Duration::from_millis(50);
/// How long the store may stay unreachable before the run gives up
/// (outcome paused, the progress record as last saved; spec/ROLLOUT.md
/// §13.3). While it is down the controller writes nothing and decides
/// nothing: it waits (the driver retries with the shared retry policy).
pub const STORE_OUTAGE_LIMIT: Duration = Duration::from_secs(10 * 60);
/// The reason of a pause for an outage.
pub const STORE_UNAVAILABLE: &str = "store unavailable";
/// Outages one step may see before the run pauses: a store that answers
/// reads but keeps failing writes or saves (a permanent write error, a
/// lock that cannot be kept) would otherwise hold, recover and hold again
/// without end.
pub const MAX_OUTAGES_PER_STEP: u32 = 8;

// ------------------------------------------------------------- progress

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
            .map_err(|e| ProgressError::Malformed(super::shown(&e.to_string())))?;
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
                found: super::shown(&self.plan_digest),
            });
        }
        if self.feature != plan.feature.name() {
            return Err(ProgressError::OtherFeature {
                expected: plan.feature.name().to_owned(),
                found: super::shown(&self.feature),
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

// --------------------------------------------------------- inputs, actions

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

// ------------------------------------------------------------ controller

/// What the controller waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Reading the document, then writing the step's stage.
    Widen,
    WritingStage,
    /// Baking: each tick reads the document (for an operator's change),
    /// then the health.
    Bake,
    /// Reading the document, then writing the kill.
    Halt,
    WritingKill,
    /// Saving the record, then finishing.
    Finishing(Outcome),
    Finished,
}

/// The bake of the current step.
#[derive(Debug, Clone)]
struct Bake {
    started: SystemTime,
    deadline: SystemTime,
    /// The fleet's summaries at the start of the window, and when they
    /// were read (this controller's clock).
    snapshot: Option<(Vec<HealthSummary>, SystemTime)>,
}

/// See the module primer.
#[derive(Debug)]
pub struct Controller {
    plan: Plan,
    progress: Progress,
    mode: Mode,
    resumed: bool,
    document: Option<Document>,
    bake: Option<Bake>,
    attempts: usize,
    reason: Option<String>,
    events: VecDeque<RunEvent>,
    /// Since when the store is unreachable.
    outage: Option<SystemTime>,
    outage_limit: Duration,
    /// After an outage: read the document before anything else.
    recheck: bool,
    /// Since when the store was unreachable, while its return is not yet
    /// confirmed (lock checked, record saved): a failure in that time
    /// continues the same outage and its clock.
    recovering: Option<SystemTime>,
    /// Outages seen in the current step ([`MAX_OUTAGES_PER_STEP`]).
    outages: u32,
}

impl Controller {
    /// A controller for `plan`, fresh (`None`) or resuming a saved record.
    pub fn new(plan: Plan, progress: Option<Progress>) -> Result<Self, ProgressError> {
        let resumed = progress.is_some();
        let progress = match progress {
            Some(p) => {
                p.check(&plan)?;
                p
            }
            None => Progress::new(&plan),
        };
        Ok(Self {
            plan,
            progress,
            mode: Mode::Widen,
            resumed,
            document: None,
            bake: None,
            attempts: 0,
            reason: None,
            events: VecDeque::new(),
            outage: None,
            outage_limit: STORE_OUTAGE_LIMIT,
            recheck: false,
            recovering: None,
            outages: 0,
        })
    }

    /// How long an outage of the store may last before the run pauses
    /// (default [`STORE_OUTAGE_LIMIT`]).
    #[must_use]
    pub fn with_outage_limit(mut self, limit: Duration) -> Self {
        self.outage_limit = limit;
        self
    }

    /// Whether the store is unreachable now.
    pub fn store_lost(&self) -> bool {
        self.outage.is_some()
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The next timeline event, oldest first.
    pub fn poll_event(&mut self) -> Option<RunEvent> {
        self.events.pop_front()
    }

    fn ring(&self) -> Option<&str> {
        self.plan
            .steps
            .get(self.progress.step)
            .map(|s| s.ring.as_str())
    }

    fn ring_owned(&self) -> String {
        self.ring().unwrap_or("").to_owned()
    }

    fn emit(&mut self, at: SystemTime, kind: RunEventKind) {
        self.events.push_back(RunEvent { at, kind });
    }

    /// Handles `input` at `now`; returns what to do next.
    pub fn step(&mut self, now: SystemTime, input: Input) -> Action {
        match input {
            Input::Started => self.on_started(now),
            Input::DocumentRead(doc, version) => self.on_document(now, doc, version),
            Input::Written { revision } => self.on_written(now, revision),
            Input::WriteConflict => self.on_conflict(now),
            Input::Saved => self.on_saved(now),
            Input::Health { fleet, refused } => self.on_health(now, fleet, refused),
            Input::HealthFailed(e) => self.on_health_failed(now, e),
            Input::StoreFailed(e) => self.on_store_failed(now, e),
            Input::StoreChecked => {
                if self.mode == Mode::Bake {
                    // The health during the outage is unknown: a new window.
                    self.start_bake(now);
                    self.progress.phase = Phase::Baking {
                        since_unix: unix(now),
                    };
                }
                // Save first: a save may have failed in the outage.
                self.recheck = true;
                Action::SaveProgress(self.progress.clone())
            }
            Input::Tick if self.outage.is_some() => Action::ReadDocument,
            Input::Tick => match self.mode {
                Mode::Finished | Mode::Finishing(_) => Action::Finish(self.report()),
                _ => Action::ReadDocument,
            },
        }
    }

    fn on_started(&mut self, now: SystemTime) -> Action {
        self.emit(
            now,
            RunEventKind::Started {
                feature: self.plan.feature,
                step: self.progress.step,
                ring: self.ring().map(str::to_owned),
                resumed: self.resumed,
            },
        );
        match self.progress.phase.clone() {
            Phase::Done => self.finish_now(Outcome::Completed),
            Phase::Halted { .. } => self.finish_now(Outcome::Halted),
            Phase::Widening => {
                self.mode = Mode::Widen;
                Action::ReadDocument
            }
            Phase::Baking { .. } | Phase::Paused { .. } => {
                // The stage is written: bake again, with a fresh window.
                self.start_bake(now);
                self.progress.phase = Phase::Baking {
                    since_unix: unix(now),
                };
                Action::ReadDocument
            }
        }
    }

    fn start_bake(&mut self, now: SystemTime) {
        let bake = self
            .plan
            .steps
            .get(self.progress.step)
            .map_or(Duration::ZERO, |s| s.bake);
        self.bake = Some(Bake {
            started: now,
            deadline: now + bake,
            snapshot: None,
        });
        self.mode = Mode::Bake;
    }

    /// Checks the document against the plan and the controller's own
    /// writes; `Err` is why to stop.
    fn check_document(&self, doc: &Document) -> Result<(), (Outcome, String)> {
        let f = self.plan.feature;
        let first = self.document.is_none();
        // The plan's rings, in document order.
        let mut last = None;
        for s in &self.plan.steps {
            let Some(i) = doc.ring_index(&s.ring) else {
                return Err((
                    if first {
                        Outcome::Refused
                    } else {
                        Outcome::Stopped
                    },
                    format!(
                        "the document (revision {}) has no ring {:?}",
                        doc.revision(),
                        s.ring
                    ),
                ));
            };
            if last.is_some_and(|l| i <= l) {
                return Err((
                    if first {
                        Outcome::Refused
                    } else {
                        Outcome::Stopped
                    },
                    format!(
                        "ring {:?} comes before the plan's previous ring in the document",
                        s.ring
                    ),
                ));
            }
            last = Some(i);
        }
        let entry = doc.feature(f);
        if entry.is_some_and(|e| e.killed()) {
            let outcome = if first {
                Outcome::Refused
            } else {
                Outcome::Stopped
            };
            return Err((
                outcome,
                format!(
                    "{f} is killed in the document (revision {}); the controller does not \
                     undo a kill (unkill it first, then run again)",
                    doc.revision()
                ),
            ));
        }
        let stage = doc.stage_index(f);
        let ring_index = |step: usize| {
            self.plan
                .steps
                .get(step)
                .and_then(|s| doc.ring_index(&s.ring))
        };
        let step = self.progress.step;
        let here = ring_index(step);
        match self.mode {
            Mode::Widen | Mode::WritingStage => {
                // Before the step's write: the previous step's stage (or,
                // for the first step, anything below the first ring); or
                // the step's own stage if the write landed unrecorded.
                let ok = if step == 0 {
                    stage.is_none() || stage <= here
                } else {
                    stage == ring_index(step - 1) || stage == here
                };
                if !ok {
                    return Err((
                        if first && step == 0 {
                            Outcome::Refused
                        } else {
                            Outcome::Stopped
                        },
                        format!(
                            "{f}'s stage in the document (revision {}) is {}, not where this \
                             rollout left it",
                            doc.revision(),
                            stage_name(doc, f)
                        ),
                    ));
                }
            }
            Mode::Bake if stage != here => {
                return Err((
                    Outcome::Stopped,
                    format!(
                        "{f}'s stage was changed to {} by someone else (revision {})",
                        stage_name(doc, f),
                        doc.revision()
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The store failed: hold, and pause after the outage limit.
    fn on_store_failed(&mut self, now: SystemTime, error: String) -> Action {
        match self.mode {
            Mode::Finished => return Action::Finish(self.report()),
            // The write may or may not have landed: read and decide
            // again once the store is back (the controller recognises
            // its own write).
            Mode::WritingStage => self.mode = Mode::Widen,
            Mode::WritingKill => self.mode = Mode::Halt,
            _ => {}
        }
        let ring = self.ring_owned();
        if self.outage.is_none() {
            // A failure before the return was confirmed: the same outage.
            self.outage = self.recovering.take();
        }
        let Some(since) = self.outage else {
            self.outage = Some(now);
            self.outages = self.outages.saturating_add(1);
            if self.outages > MAX_OUTAGES_PER_STEP {
                let reason = format!(
                    "{STORE_UNAVAILABLE}: {} outages in this step (limit {MAX_OUTAGES_PER_STEP}): {error}",
                    self.outages
                );
                self.emit(
                    now,
                    RunEventKind::Paused {
                        ring,
                        reason: reason.clone(),
                    },
                );
                self.reason = Some(reason);
                return self.finish_now(Outcome::Paused);
            }
            self.emit(
                now,
                RunEventKind::StoreLost {
                    ring,
                    reason: format!("{STORE_UNAVAILABLE}: {error}"),
                },
            );
            return Action::WaitForStore;
        };
        let down = now.duration_since(since).unwrap_or(Duration::ZERO);
        if down < self.outage_limit {
            return Action::WaitForStore;
        }
        // Nothing can be saved: the record stays as last saved, and a
        // run started again resumes from it (a bake starts again).
        let reason = format!(
            "{STORE_UNAVAILABLE} for {} s (limit {} s): {error}",
            down.as_secs(),
            self.outage_limit.as_secs()
        );
        self.emit(
            now,
            RunEventKind::Paused {
                ring,
                reason: reason.clone(),
            },
        );
        self.reason = Some(reason);
        self.finish_now(Outcome::Paused)
    }

    fn on_document(&mut self, now: SystemTime, doc: Option<Document>, version: Version) -> Action {
        if let Some(since) = self.outage.take() {
            self.recovering = Some(since);
            // The store is back. What this read saw is not acted on: the
            // lock and the record are checked first, then the document is
            // read again.
            let _ = (doc, version);
            let down_ms = now
                .duration_since(since)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let ring = self.ring_owned();
            self.emit(now, RunEventKind::StoreBack { ring, down_ms });
            // Checked against the record last sent to be saved (whose
            // answer may have been lost); the bake restarts after.
            return Action::CheckStore(self.progress.clone());
        }
        let Some(doc) = doc else {
            let outcome = if self.document.is_none() {
                Outcome::Refused
            } else {
                Outcome::Stopped
            };
            return self.stop(
                now,
                outcome,
                "there is no rollout document in the source (author its rings first)".into(),
            );
        };
        let halting = matches!(self.mode, Mode::Halt | Mode::WritingKill);
        if halting {
            if doc.feature(self.plan.feature).is_some_and(|e| e.killed()) {
                // Killed already (by an operator, or our kill landed and
                // its answer was lost): halted either way.
                let revision = doc.revision();
                self.document = Some(doc);
                return self.halted(now, revision, false);
            }
            let next = match super::edit::kill(Some(&doc), self.plan.feature, unix(now)) {
                Ok(d) => d,
                Err(e) => return self.stop(now, Outcome::Stopped, format!("cannot kill: {e}")),
            };
            self.document = Some(doc);
            self.mode = Mode::WritingKill;
            return Action::WriteKill {
                document: next,
                expected: version,
            };
        }
        if let Err((outcome, reason)) = self.check_document(&doc) {
            self.document = Some(doc);
            return self.stop(now, outcome, reason);
        }
        let ring = self.ring_owned();
        let at_ring = doc.stage_index(self.plan.feature) == doc.ring_index(&ring);
        match self.mode {
            Mode::Widen | Mode::WritingStage => {
                if at_ring {
                    // Written before a crash, not recorded: no second write.
                    let revision = doc.revision();
                    self.document = Some(doc);
                    return self.stage_written(now, revision, false);
                }
                let next =
                    super::edit::set_stage(Some(&doc), self.plan.feature, Some(&ring), unix(now));
                self.document = Some(doc);
                match next {
                    Ok(d) => {
                        self.mode = Mode::WritingStage;
                        Action::WriteStage {
                            ring,
                            document: d,
                            expected: version,
                        }
                    }
                    Err(e) => {
                        self.stop(now, Outcome::Stopped, format!("cannot set the stage: {e}"))
                    }
                }
            }
            Mode::Bake => {
                self.document = Some(doc);
                Action::ReadHealth
            }
            _ => {
                self.document = Some(doc);
                Action::Finish(self.report())
            }
        }
    }

    fn on_written(&mut self, now: SystemTime, revision: u64) -> Action {
        match self.mode {
            Mode::WritingStage => self.stage_written(now, revision, true),
            Mode::WritingKill => self.halted(now, revision, true),
            _ => Action::ReadDocument,
        }
    }

    fn stage_written(&mut self, now: SystemTime, revision: u64, ours: bool) -> Action {
        self.attempts = 0;
        let ring = self.ring_owned();
        if ours {
            self.progress.revisions.push(Written {
                ring: ring.clone(),
                revision,
                kind: "stage".into(),
                at_unix: unix(now),
            });
            self.emit(now, RunEventKind::StageSet { ring, revision });
        }
        self.progress.phase = Phase::Baking {
            since_unix: unix(now),
        };
        self.start_bake(now);
        Action::SaveProgress(self.progress.clone())
    }

    fn halted(&mut self, now: SystemTime, revision: u64, ours: bool) -> Action {
        let ring = self.ring_owned();
        if ours {
            self.progress.revisions.push(Written {
                ring: ring.clone(),
                revision,
                kind: "kill".into(),
                at_unix: unix(now),
            });
        }
        self.emit(now, RunEventKind::Halted { ring, revision });
        self.progress.phase = Phase::Halted { revision };
        self.mode = Mode::Finishing(Outcome::Halted);
        Action::SaveProgress(self.progress.clone())
    }

    fn on_conflict(&mut self, now: SystemTime) -> Action {
        self.attempts += 1;
        match self.mode {
            Mode::WritingStage if self.attempts >= MAX_WRITE_ATTEMPTS => {
                self.attempts = 0;
                self.pause(
                    now,
                    format!(
                        "the document kept changing under the stage write ({MAX_WRITE_ATTEMPTS} attempts)"
                    ),
                )
            }
            Mode::WritingStage => {
                self.mode = Mode::Widen;
                Action::ReadDocument
            }
            Mode::WritingKill if self.attempts >= MAX_KILL_ATTEMPTS => self.stop(
                now,
                Outcome::Stopped,
                format!(
                    "the halting kill lost {MAX_KILL_ATTEMPTS} compare-and-swaps in a row: \
                     KILL THE FEATURE BY HAND (`vkx-host rollout kill {}`)",
                    self.plan.feature
                ),
            ),
            Mode::WritingKill => {
                self.mode = Mode::Halt;
                Action::ReadDocument
            }
            _ => Action::ReadDocument,
        }
    }

    fn on_saved(&mut self, now: SystemTime) -> Action {
        if std::mem::take(&mut self.recheck) {
            // The lock is ours and the record saved: the store is back.
            self.recovering = None;
            if !matches!(self.mode, Mode::Finishing(_) | Mode::Finished) {
                return Action::ReadDocument;
            }
        }
        match self.mode.clone() {
            Mode::Finishing(outcome) => self.finish_now(outcome),
            Mode::Finished => Action::Finish(self.report()),
            Mode::Bake => match &self.bake {
                Some(b) if b.snapshot.is_none() => Action::ReadHealth,
                _ => self.sleep(now),
            },
            _ => Action::ReadDocument,
        }
    }

    fn sleep(&self, now: SystemTime) -> Action {
        let next = now + self.plan.poll;
        match &self.bake {
            Some(b) if b.deadline > now && b.deadline < next => Action::Sleep(b.deadline),
            _ => Action::Sleep(next),
        }
    }

    fn on_health(&mut self, now: SystemTime, fleet: Vec<HealthSummary>, refused: usize) -> Action {
        if self.mode != Mode::Bake {
            return Action::ReadDocument;
        }
        let Some(bake) = &mut self.bake else {
            return Action::ReadDocument;
        };
        let deadline = bake.deadline;
        let Some(snapshot) = bake.snapshot.take() else {
            bake.snapshot = Some((fleet, now));
            return self.sleep(now);
        };
        let window = fleet_delta(&fleet, &snapshot.0, unix(snapshot.1));
        let mut evaluation = self.evaluate(&window);
        if refused > 0 && !evaluation.verdict.is_fail() {
            evaluation.verdict = GateVerdict::Inconclusive {
                reason: format!(
                    "{refused} health entries refused: the fleet's health is incomplete"
                ),
            };
        }
        if let Some(gaps) = window.gaps()
            && !evaluation.verdict.is_fail()
        {
            evaluation.verdict = GateVerdict::Inconclusive {
                reason: format!("the fleet's health is incomplete: {gaps}"),
            };
        }
        if let Some(b) = &mut self.bake {
            b.snapshot = Some(snapshot);
        }
        let ring = self.ring_owned();
        if evaluation.verdict.is_fail() {
            self.record(now, &ring, &evaluation.verdict);
            self.emit(now, RunEventKind::Verdict { ring, evaluation });
            self.mode = Mode::Halt;
            self.attempts = 0;
            return Action::ReadDocument;
        }
        if now + DEADLINE_SLACK < deadline {
            self.emit(now, RunEventKind::Observed { ring, evaluation });
            return self.sleep(now);
        }
        self.decide(now, ring, evaluation)
    }

    fn on_health_failed(&mut self, now: SystemTime, error: String) -> Action {
        if self.mode != Mode::Bake {
            return Action::ReadDocument;
        }
        match &self.bake {
            Some(b) if now + DEADLINE_SLACK >= b.deadline => {
                let ring = self.ring_owned();
                let evaluation = Evaluation {
                    verdict: GateVerdict::Inconclusive {
                        reason: format!("the health could not be read: {error}"),
                    },
                    figures: super::gates::Figures::default(),
                };
                self.decide(now, ring, evaluation)
            }
            _ => self.sleep(now),
        }
    }

    /// The end of a bake: advance, extend, or pause.
    fn decide(&mut self, now: SystemTime, ring: String, evaluation: Evaluation) -> Action {
        self.record(now, &ring, &evaluation.verdict);
        let verdict = evaluation.verdict.clone();
        self.emit(
            now,
            RunEventKind::Verdict {
                ring: ring.clone(),
                evaluation,
            },
        );
        match verdict {
            GateVerdict::Pass => {
                self.progress.step += 1;
                self.outages = 0;
                if self.progress.step >= self.plan.steps.len() {
                    self.progress.phase = Phase::Done;
                    self.emit(now, RunEventKind::Completed);
                    self.mode = Mode::Finishing(Outcome::Completed);
                } else {
                    self.progress.phase = Phase::Widening;
                    self.mode = Mode::Widen;
                    self.bake = None;
                }
                Action::SaveProgress(self.progress.clone())
            }
            GateVerdict::Inconclusive { reason } => {
                let Some(b) = &mut self.bake else {
                    return self.pause(now, reason);
                };
                let baked = now.duration_since(b.started).unwrap_or(Duration::ZERO);
                let extend = self.plan.extend;
                if !extend.is_zero() && baked + extend <= self.plan.max_bake {
                    b.deadline = now + extend;
                    let until = b.deadline;
                    self.emit(now, RunEventKind::Extended { ring, until });
                    self.sleep(now)
                } else {
                    self.pause(now, reason)
                }
            }
            // Handled by the caller; kept total.
            GateVerdict::Fail { .. } => {
                self.mode = Mode::Halt;
                Action::ReadDocument
            }
        }
    }

    fn pause(&mut self, now: SystemTime, reason: String) -> Action {
        let ring = self.ring_owned();
        self.emit(
            now,
            RunEventKind::Paused {
                ring,
                reason: reason.clone(),
            },
        );
        self.reason = Some(reason.clone());
        self.progress.phase = Phase::Paused { reason };
        self.mode = Mode::Finishing(Outcome::Paused);
        Action::SaveProgress(self.progress.clone())
    }

    /// Stops without writing: someone else changed the feature, or the
    /// plan does not fit the document. The record is left as it is, so
    /// the run can be looked at (and resumed once the cause is fixed).
    fn stop(&mut self, now: SystemTime, outcome: Outcome, reason: String) -> Action {
        self.emit(
            now,
            RunEventKind::Stopped {
                reason: reason.clone(),
            },
        );
        self.reason = Some(reason);
        self.finish_now(outcome)
    }

    fn finish_now(&mut self, outcome: Outcome) -> Action {
        self.mode = Mode::Finished;
        let mut r = self.report();
        r.outcome = outcome;
        Action::Finish(r)
    }

    fn record(&mut self, now: SystemTime, ring: &str, verdict: &GateVerdict) {
        if self.progress.history.len() >= MAX_HISTORY {
            self.progress.history.remove(0);
        }
        self.progress.history.push(VerdictRecord {
            ring: ring.to_owned(),
            at_unix: unix(now),
            verdict: verdict.label().to_owned(),
            detail: verdict.to_string(),
        });
    }

    /// The gates over the window: the rings the step enabled against the
    /// rings not yet enabled (and VMs in none).
    fn evaluate(&self, window: &FleetDelta) -> Evaluation {
        let (candidate, baseline) = self.split(&window.rings);
        evaluate(&self.plan.gates, &candidate, &baseline, window.suppressed)
    }

    fn split(&self, per_ring: &BTreeMap<String, RingSummary>) -> (RingSummary, RingSummary) {
        let mut candidate = RingSummary::default();
        let mut baseline = RingSummary::default();
        let Some(doc) = &self.document else {
            return (candidate, baseline);
        };
        let step = self.progress.step;
        let index = |i: usize| self.plan.steps.get(i).and_then(|s| doc.ring_index(&s.ring));
        let (Some(here), from) = (
            index(step),
            step.checked_sub(1).and_then(index).map_or(0, |p| p + 1),
        ) else {
            return (candidate, baseline);
        };
        for (name, r) in per_ring {
            if name == NO_RING {
                add(&mut baseline, r);
                continue;
            }
            match doc.ring_index(name) {
                Some(i) if (from..=here).contains(&i) => add(&mut candidate, r),
                Some(i) if i > here => add(&mut baseline, r),
                _ => {}
            }
        }
        (candidate, baseline)
    }

    /// The report of the run so far.
    pub fn report(&self) -> Report {
        let outcome = match (&self.mode, &self.progress.phase) {
            (Mode::Finishing(o), _) => *o,
            (_, Phase::Done) => Outcome::Completed,
            (_, Phase::Halted { .. }) => Outcome::Halted,
            (_, Phase::Paused { .. }) => Outcome::Paused,
            _ => Outcome::Stopped,
        };
        let reason = self.reason.clone().or_else(|| match &self.progress.phase {
            Phase::Paused { reason } => Some(reason.clone()),
            Phase::Halted { revision } => self
                .progress
                .history
                .iter()
                .rev()
                .find(|v| v.verdict == "fail")
                .map(|v| format!("{} (killed at revision {revision})", v.detail)),
            _ => None,
        });
        Report {
            feature: self.plan.feature,
            plan_digest: self.plan.digest.clone(),
            outcome,
            step: self
                .progress
                .step
                .min(self.plan.steps.len().saturating_sub(1)),
            ring: self
                .plan
                .steps
                .get(
                    self.progress
                        .step
                        .min(self.plan.steps.len().saturating_sub(1)),
                )
                .map(|s| s.ring.clone()),
            reason,
            revisions: self.progress.revisions.clone(),
            history: self.progress.history.clone(),
        }
    }
}

fn stage_name(doc: &Document, f: Feature) -> String {
    doc.feature(f)
        .and_then(|e| e.stage())
        .map_or("none".to_owned(), |s| format!("{s:?}"))
}

/// Adds `r`'s counters to `into` (saturating).
fn add(into: &mut RingSummary, r: &RingSummary) {
    fn codes(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
        for (k, v) in from {
            let e = into.entry(k.clone()).or_default();
            *e = e.saturating_add(*v);
        }
    }
    into.sessions = into.sessions.saturating_add(r.sessions);
    into.lost = into.lost.saturating_add(r.lost);
    into.attest_failed = into.attest_failed.saturating_add(r.attest_failed);
    codes(&mut into.errors_sent, &r.errors_sent);
    codes(&mut into.errors_received, &r.errors_received);
    for (name, f) in &r.features {
        let e = into.features.entry(name.clone()).or_default();
        e.requests = e.requests.saturating_add(f.requests);
        e.grants = e.grants.saturating_add(f.grants);
        codes(&mut e.refusals, &f.refusals);
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::health::FeatureSummary;

    const RINGS: [&str; 4] = ["canary", "1pct", "10pct", "all"];
    const F: Feature = Feature::KeyRelease;

    fn plan(extra: &str) -> Plan {
        let text = format!(
            "format = 1\nfeature = \"key-release\"\n\
             rings = [\"canary\", \"1pct\", \"10pct\", \"all\"]\nbake_s = 10\npoll_ms = 1000\n\
             {extra}\n[sample]\nmin_requests = 50\nmin_sessions = 5\nmin_baseline_traffic = 10\n\
             [[gate]]\nmetric = \"errors\"\nmax = 20\n\
             [[gate]]\nmetric = \"error_rate\"\nratio = 2.0\nslack = 0.001\n"
        );
        Plan::parse(text.as_bytes()).unwrap()
    }

    fn document() -> Document {
        Document::parse(
            br#"{"format":1,"revision":5,"issued_at":1,"rings":[
              {"name":"canary","vm_ids":["vm-1"]},{"name":"1pct","buckets_below":100},
              {"name":"10pct","buckets_below":1000},{"name":"all","buckets_below":10000}],
              "features":{"key-release":{"stage":null,"killed":false}}}"#,
        )
        .unwrap()
    }

    /// Per second and ring: sessions, requests when enabled, errors.
    type Rates = fn(&str, bool) -> (u64, u64, u64);

    fn healthy(_: &str, enabled: bool) -> (u64, u64, u64) {
        (10, if enabled { 100 } else { 0 }, 0)
    }

    /// An operator's edit of the document.
    type Edit = fn(&Document) -> Document;

    /// The store, the fleet and the clock, as the driver would see them.
    struct World {
        now: SystemTime,
        doc: Document,
        version: i64,
        writes: Vec<(String, u64, bool)>,
        saved: Vec<Progress>,
        rates: Rates,
        counters: BTreeMap<String, RingSummary>,
        last: SystemTime,
        /// An operator's edit, applied once the clock passes its time.
        operator: Option<(SystemTime, Edit)>,
        events: Vec<RunEvent>,
        /// The store is down from the first to the second time, once the
        /// feature's stage is the ring given.
        outage: Option<(&'static str, Duration)>,
        down: Option<(SystemTime, SystemTime)>,
        checks: usize,
        /// Every save fails while reads succeed.
        saves_fail: bool,
        /// Saves whose record is stored but whose answer is lost.
        lose_save_answers: usize,
        /// Entries every health read refuses.
        refused: usize,
        /// A second node, present at the first health read only (it
        /// dies, and its entry expires).
        vanishing: bool,
        health_reads: usize,
    }

    impl World {
        fn new(rates: Rates) -> Self {
            let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            Self {
                now: t0,
                doc: document(),
                version: 1,
                writes: Vec::new(),
                saved: Vec::new(),
                rates,
                counters: BTreeMap::new(),
                last: t0,
                operator: None,
                events: Vec::new(),
                outage: None,
                down: None,
                checks: 0,
                saves_fail: false,
                lose_save_answers: 0,
                refused: 0,
                vanishing: false,
                health_reads: 0,
            }
        }

        fn is_down(&mut self) -> bool {
            if let Some((ring, length)) = self.outage
                && self.doc.feature(F).and_then(|e| e.stage()) == Some(ring)
            {
                // Mid-bake: a second after the stage was written.
                let from = self.now + Duration::from_secs(1);
                self.down = Some((from, from + length));
                self.outage = None;
            }
            self.down
                .is_some_and(|(from, until)| self.now >= from && self.now < until)
        }

        fn enabled(&self, ring: &str) -> bool {
            let e = self.doc.feature(F);
            !e.is_some_and(|e| e.killed())
                && self.doc.stage_index(F) >= self.doc.ring_index(ring)
                && self.doc.stage_index(F).is_some()
        }

        fn health(&mut self) -> Vec<HealthSummary> {
            let dt = self.now.duration_since(self.last).unwrap().as_secs();
            self.last = self.now;
            for ring in RINGS.iter().copied().chain([NO_RING]) {
                let (s, r, e) = (self.rates)(ring, self.enabled(ring));
                let c = self.counters.entry(ring.to_owned()).or_default();
                c.sessions += s * dt;
                if e > 0 {
                    *c.errors_sent.entry("unknown-message".into()).or_default() += e * dt;
                }
                let f: &mut FeatureSummary = c.features.entry(F.name().into()).or_default();
                f.requests += r * dt;
                f.grants += r * dt;
            }
            let a = HealthSummary {
                format: 1,
                node: "node-a".into(),
                at_unix: unix(self.now),
                started_unix: 1,
                revision: self.doc.revision(),
                rings: self.counters.clone(),
                suppressed: 0,
                drill: None,
            };
            self.health_reads += 1;
            let mut fleet = vec![a.clone()];
            if self.vanishing && self.health_reads == 1 {
                fleet.push(HealthSummary {
                    node: "node-b".into(),
                    ..a
                });
            }
            fleet
        }

        /// Runs `c` until it finishes; the report.
        fn run(&mut self, c: &mut Controller) -> Report {
            let mut input = Input::Started;
            for _ in 0..10_000 {
                if let Some((at, edit)) = self.operator
                    && self.now >= at
                {
                    self.doc = edit(&self.doc);
                    self.version += 1;
                    self.operator = None;
                }
                let action = c.step(self.now, input);
                while let Some(e) = c.poll_event() {
                    self.events.push(e);
                }
                let down = self.is_down();
                input = match action {
                    Action::ReadDocument
                    | Action::WriteStage { .. }
                    | Action::WriteKill { .. }
                    | Action::SaveProgress(_)
                    | Action::CheckStore(_)
                        if down =>
                    {
                        Input::StoreFailed("connection refused".into())
                    }
                    Action::WaitForStore => {
                        self.now += Duration::from_secs(1);
                        Input::Tick
                    }
                    Action::CheckStore(p) => {
                        self.checks += 1;
                        // What the store holds is what was last sent.
                        if let Some(last) = self.saved.last() {
                            assert_eq!(last, &p, "checked against the record last sent");
                        }
                        Input::StoreChecked
                    }
                    Action::ReadDocument => {
                        Input::DocumentRead(Some(self.doc.clone()), Version::Etcd(self.version))
                    }
                    Action::WriteStage {
                        ring,
                        document,
                        expected,
                    } => self.write(expected, document, format!("stage {ring}"), true),
                    Action::WriteKill { document, expected } => {
                        self.write(expected, document, "kill".into(), false)
                    }
                    Action::ReadHealth => Input::Health {
                        fleet: self.health(),
                        refused: self.refused,
                    },
                    Action::SaveProgress(_) if self.saves_fail => {
                        Input::StoreFailed("permission denied".into())
                    }
                    Action::SaveProgress(p) => {
                        let bytes = p.to_json();
                        self.saved.push(Progress::parse(&bytes).unwrap());
                        if self.lose_save_answers > 0
                            && !self.saved.is_empty()
                            && self.writes.len() == 1
                        {
                            self.lose_save_answers -= 1;
                            Input::StoreFailed("timed out".into())
                        } else {
                            Input::Saved
                        }
                    }
                    Action::Sleep(until) => {
                        assert!(until > self.now, "sleeps go forward");
                        self.now = until;
                        Input::Tick
                    }
                    Action::Finish(report) => return report,
                };
            }
            panic!("the controller did not finish");
        }

        fn write(&mut self, expected: Version, doc: Document, what: String, signed: bool) -> Input {
            if expected != Version::Etcd(self.version) {
                return Input::WriteConflict;
            }
            assert_eq!(doc.revision(), self.doc.revision() + 1, "a new revision");
            self.doc = doc;
            self.version += 1;
            self.writes.push((what, self.doc.revision(), signed));
            Input::Written {
                revision: self.doc.revision(),
            }
        }

        fn count(&self, pred: impl Fn(&RunEventKind) -> bool) -> usize {
            self.events.iter().filter(|e| pred(&e.kind)).count()
        }
    }

    #[test]
    fn a_clean_rollout_walks_every_ring_and_completes() {
        let mut w = World::new(healthy);
        let mut c = Controller::new(plan(""), None).unwrap();
        let t0 = w.now;
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Completed, "{r}");
        let writes: Vec<&str> = w.writes.iter().map(|(s, _, _)| s.as_str()).collect();
        assert_eq!(
            writes,
            ["stage canary", "stage 1pct", "stage 10pct", "stage all"]
        );
        assert!(w.writes.iter().all(|(_, _, signed)| *signed));
        assert_eq!(w.doc.feature(F).unwrap().stage(), Some("all"));
        assert_eq!(r.history.len(), 4);
        assert!(r.history.iter().all(|v| v.verdict == "pass"), "{r}");
        assert_eq!(
            r.revisions.iter().map(|w| w.revision).collect::<Vec<_>>(),
            [6, 7, 8, 9]
        );
        assert_eq!(w.count(|k| matches!(k, RunEventKind::StageSet { .. })), 4);
        assert_eq!(w.count(|k| matches!(k, RunEventKind::Completed)), 1);
        // Four bakes of 10 s, nothing longer.
        assert_eq!(w.now.duration_since(t0).unwrap(), Duration::from_secs(40));
        assert_eq!(w.saved.last().unwrap().phase, Phase::Done);
        // The last ring has no baseline but VMs in no ring: ratio gates ran.
        assert!(r.to_string().contains("completed"));
        // Running a finished plan again does nothing.
        let mut again = Controller::new(plan(""), w.saved.last().cloned()).unwrap();
        let before = w.writes.len();
        assert_eq!(w.run(&mut again).outcome, Outcome::Completed);
        assert_eq!(w.writes.len(), before);
    }

    fn bad_in_1pct(ring: &str, enabled: bool) -> (u64, u64, u64) {
        let (s, r, _) = healthy(ring, enabled);
        (s, r, if ring == "1pct" && enabled { 30 } else { 0 })
    }

    /// The store dies in the bake of 1pct and comes back: no write while it
    /// is down, the bake of 1pct starts again, the run completes.
    #[test]
    fn a_store_outage_mid_bake_holds_then_resumes_and_completes() {
        let mut w = World::new(healthy);
        w.outage = Some(("1pct", Duration::from_secs(30)));
        let mut c = Controller::new(plan(""), None).unwrap();
        let t0 = w.now;
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Completed, "{r}");
        let (from, until) = w.down.unwrap();
        let at = |k: fn(&RunEventKind) -> bool| {
            w.events
                .iter()
                .filter(|e| k(&e.kind))
                .map(|e| e.at)
                .collect::<Vec<_>>()
        };
        let lost = at(|k| matches!(k, RunEventKind::StoreLost { .. }));
        let back = at(|k| matches!(k, RunEventKind::StoreBack { .. }));
        assert_eq!(lost.len(), 1);
        assert_eq!(back.len(), 1);
        assert!(lost[0] >= from && lost[0] < until && back[0] >= until);
        // Nothing written, no verdict while the store was down.
        let stages = at(|k| matches!(k, RunEventKind::StageSet { .. }));
        assert!(stages.iter().all(|t| *t < from || *t >= until));
        let verdicts = at(|k| matches!(k, RunEventKind::Verdict { .. }));
        assert!(verdicts.iter().all(|t| *t < from || *t >= until));
        assert_eq!(w.writes.len(), 4);
        assert_eq!(w.checks, 1);
        let back_event = w
            .events
            .iter()
            .find(|e| matches!(e.kind, RunEventKind::StoreBack { .. }))
            .unwrap();
        assert!(matches!(&back_event.kind, RunEventKind::StoreBack { ring, .. } if ring == "1pct"));
        // 1pct's verdict comes a full bake after the store came back.
        let pct = w
            .events
            .iter()
            .find(|e| matches!(&e.kind, RunEventKind::Verdict { ring, .. } if ring == "1pct"))
            .unwrap();
        assert!(pct.at >= back[0] + Duration::from_secs(10));
        assert!(r.history.iter().all(|v| v.verdict == "pass"), "{r}");
        assert!(w.now.duration_since(t0).unwrap() >= Duration::from_secs(70));
        assert_eq!(w.saved.last().unwrap().phase, Phase::Done);
    }

    /// A store that answers reads but refuses every save: the outage's
    /// clock runs on through each short return, so the run pauses at the
    /// limit instead of holding and recovering for ever.
    #[test]
    fn a_store_that_reads_but_never_saves_pauses_within_the_limit() {
        let mut w = World::new(healthy);
        w.saves_fail = true;
        let mut c = Controller::new(plan(""), None)
            .unwrap()
            .with_outage_limit(Duration::from_secs(60));
        let t0 = w.now;
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Paused, "{r}");
        let took = w.now.duration_since(t0).unwrap();
        assert!(took <= Duration::from_secs(62), "paused after {took:?}");
        // The first stage, written before its save failed; never again.
        assert_eq!(w.writes.len(), 1, "{:?}", w.writes);
    }

    /// A save that reached the store but whose answer was lost: the store
    /// is checked against that record (not one with a new bake start),
    /// and the run goes on to complete.
    #[test]
    fn a_save_whose_answer_was_lost_is_recognised() {
        let mut w = World::new(healthy);
        w.lose_save_answers = 1;
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Completed, "{r}");
        assert_eq!(w.lose_save_answers, 0, "an answer was lost");
        assert!(w.checks >= 1, "the store was checked after the lost answer");
    }

    /// An outage longer than the limit: paused, the record as last saved
    /// (baking 1pct), so a run started again bakes 1pct again.
    #[test]
    fn a_store_outage_past_the_limit_pauses_keeping_the_progress() {
        let mut w = World::new(healthy);
        w.outage = Some(("1pct", Duration::from_secs(3600)));
        let mut c = Controller::new(plan(""), None)
            .unwrap()
            .with_outage_limit(Duration::from_secs(60));
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Paused, "{r}");
        assert!(
            r.reason.as_deref().unwrap().starts_with(STORE_UNAVAILABLE),
            "{r}"
        );
        assert_eq!(r.ring.as_deref(), Some("1pct"));
        assert_eq!(w.writes.len(), 2);
        let (from, _) = w.down.unwrap();
        let paused = w
            .events
            .iter()
            .find(|e| matches!(e.kind, RunEventKind::Paused { .. }))
            .unwrap();
        assert!(paused.at >= from + Duration::from_secs(60));
        let last = w.saved.last().unwrap().clone();
        assert_eq!(last.step, 1);
        assert!(matches!(last.phase, Phase::Baking { .. }));
        // The store back, a run resumes the bake of 1pct and completes
        // without writing 1pct's stage again.
        w.down = None;
        let mut again = Controller::new(plan(""), Some(last)).unwrap();
        let r = w.run(&mut again);
        assert_eq!(r.outcome, Outcome::Completed, "{r}");
        assert_eq!(w.writes.len(), 4);
    }

    /// Refused health entries are missing data: a healthy ring cannot
    /// pass (the run pauses), a failing one still halts.
    #[test]
    fn refused_health_entries_never_pass_but_do_not_hide_a_failure() {
        let mut w = World::new(healthy);
        w.refused = 1;
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Paused, "{r}");
        assert_eq!(r.ring.as_deref(), Some("canary"), "{r}");
        fn bad_in_canary(ring: &str, enabled: bool) -> (u64, u64, u64) {
            let (s, r, _) = healthy(ring, enabled);
            (s, r, if ring == "canary" && enabled { 30 } else { 0 })
        }
        let mut w = World::new(bad_in_canary);
        w.refused = 1;
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Halted, "{r}");
        assert_eq!(r.ring.as_deref(), Some("canary"), "{r}");
    }

    #[test]
    fn a_node_that_vanishes_in_the_window_never_passes_but_does_not_hide_a_failure() {
        let mut w = World::new(healthy);
        w.vanishing = true;
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Paused, "{r}");
        assert_eq!(r.ring.as_deref(), Some("canary"), "{r}");
        assert!(
            w.saved
                .last()
                .unwrap()
                .history
                .iter()
                .any(|v| v.detail.contains("node-b")),
            "the verdict names the node"
        );
        fn bad_in_canary(ring: &str, enabled: bool) -> (u64, u64, u64) {
            let (s, r, _) = healthy(ring, enabled);
            (s, r, if ring == "canary" && enabled { 30 } else { 0 })
        }
        let mut w = World::new(bad_in_canary);
        w.vanishing = true;
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Halted, "{r}");
    }

    #[test]
    fn a_bad_ring_halts_with_an_unsigned_kill_at_a_new_revision() {
        let mut w = World::new(bad_in_1pct);
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Halted, "{r}");
        assert_eq!(r.ring.as_deref(), Some("1pct"));
        let last = w.writes.last().unwrap();
        assert_eq!((last.0.as_str(), last.1, last.2), ("kill", 8, false));
        let entry = w.doc.feature(F).unwrap();
        assert!(entry.killed());
        assert_eq!(entry.stage(), Some("1pct"), "the kill keeps the stage");
        assert_eq!(r.revisions.last().unwrap().kind, "kill");
        assert_eq!(w.saved.last().unwrap().phase, Phase::Halted { revision: 8 });
        // Halted at the first poll that saw the errors, not at the bake's end.
        let stage_at = w.events.iter().find_map(|e| match &e.kind {
            RunEventKind::StageSet { ring, .. } if ring == "1pct" => Some(e.at),
            _ => None,
        });
        let halt_at = w.events.iter().find_map(|e| match &e.kind {
            RunEventKind::Halted { .. } => Some(e.at),
            _ => None,
        });
        let took = halt_at.unwrap().duration_since(stage_at.unwrap()).unwrap();
        assert!(took <= Duration::from_secs(2), "{took:?}");
        assert!(r.reason.unwrap().contains("errors = 30 over 20"));
        // A halted rollout stays halted.
        let mut again = Controller::new(plan(""), w.saved.last().cloned()).unwrap();
        assert_eq!(w.run(&mut again).outcome, Outcome::Halted);
    }

    fn quiet(_: &str, _: bool) -> (u64, u64, u64) {
        (1, 0, 0)
    }

    #[test]
    fn too_little_traffic_extends_the_bake_then_pauses() {
        let mut w = World::new(quiet);
        let p = plan("[inconclusive]\nextend_s = 5\nmax_bake_s = 20");
        let mut c = Controller::new(p.clone(), None).unwrap();
        let t0 = w.now;
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Paused, "{r}");
        assert_eq!(w.count(|k| matches!(k, RunEventKind::Extended { .. })), 2);
        assert_eq!(w.now.duration_since(t0).unwrap(), Duration::from_secs(20));
        assert!(
            matches!(&w.saved.last().unwrap().phase, Phase::Paused { reason }
            if reason.contains("too little traffic"))
        );
        assert_eq!(w.writes.len(), 1, "no write after the first stage");
        // Running it again bakes the same step again, without a write.
        w.rates = healthy;
        let mut again = Controller::new(p, w.saved.last().cloned()).unwrap();
        let r = w.run(&mut again);
        assert_eq!(r.outcome, Outcome::Completed, "{r}");
        let stages: Vec<&str> = w.writes.iter().map(|(s, _, _)| s.as_str()).collect();
        assert_eq!(
            stages,
            ["stage canary", "stage 1pct", "stage 10pct", "stage all"]
        );
    }

    #[test]
    fn a_resumed_controller_does_not_write_its_stage_again() {
        // Crash mid-bake of step 2: the record says Baking.
        let mut w = World::new(healthy);
        let mut c = Controller::new(plan(""), None).unwrap();
        w.run(&mut c);
        let mid = w
            .saved
            .iter()
            .find(|p| p.step == 1 && matches!(p.phase, Phase::Baking { .. }))
            .cloned()
            .unwrap();
        let mut w = World::new(healthy);
        w.doc = super::super::edit::set_stage(Some(&w.doc), F, Some("1pct"), 2).unwrap();
        let mut c = Controller::new(plan(""), Some(mid)).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Completed, "{r}");
        let stages: Vec<&str> = w.writes.iter().map(|(s, _, _)| s.as_str()).collect();
        assert_eq!(stages, ["stage 10pct", "stage all"]);
        assert!(matches!(
            w.events[0].kind,
            RunEventKind::Started {
                step: 1,
                resumed: true,
                ..
            }
        ));

        // Crash between the stage write and the record: the record says
        // Widening at step 2 but the document is already there.
        let widening = Progress {
            step: 1,
            phase: Phase::Widening,
            ..Progress::new(&plan(""))
        };
        let mut w = World::new(healthy);
        w.doc = super::super::edit::set_stage(Some(&w.doc), F, Some("1pct"), 2).unwrap();
        let mut c = Controller::new(plan(""), Some(widening)).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Completed, "{r}");
        assert_eq!(w.writes.len(), 2);
    }

    #[test]
    fn another_plans_progress_is_refused() {
        let other = Progress::new(&plan("[bake_s_by_ring]\nall = 3"));
        let e = Controller::new(plan(""), Some(other)).unwrap_err();
        assert!(matches!(e, ProgressError::OtherPlan { .. }));
        assert!(Progress::parse(b"{\"format\":2}").is_err());
        let mut p = Progress::new(&plan(""));
        p.format = 2;
        assert_eq!(Progress::parse(&p.to_json()), Err(ProgressError::Format(2)));
        assert!(matches!(
            Progress::parse(&vec![b' '; MAX_PROGRESS_BYTES + 1]),
            Err(ProgressError::TooLarge { .. })
        ));
    }

    #[test]
    fn an_operators_kill_mid_run_stops_the_controller() {
        let mut w = World::new(healthy);
        w.operator = Some((w.now + Duration::from_secs(15), |d| {
            super::super::edit::kill(Some(d), F, 3).unwrap()
        }));
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Stopped, "{r}");
        assert!(r.reason.unwrap().contains("killed"));
        let stages: Vec<&str> = w.writes.iter().map(|(s, _, _)| s.as_str()).collect();
        assert_eq!(
            stages,
            ["stage canary", "stage 1pct"],
            "nothing after the kill"
        );
        assert!(w.doc.feature(F).unwrap().killed());
        // A lowered stage stops it too.
        let mut w = World::new(healthy);
        w.operator = Some((w.now + Duration::from_secs(15), |d| {
            super::super::edit::set_stage(Some(d), F, Some("canary"), 3).unwrap()
        }));
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Stopped, "{r}");
        assert!(r.reason.unwrap().contains("changed to \"canary\""));
    }

    #[test]
    fn a_plan_that_does_not_fit_the_document_is_refused() {
        let mut w = World::new(healthy);
        w.doc = super::super::edit::kill(Some(&w.doc), F, 2).unwrap();
        let mut c = Controller::new(plan(""), None).unwrap();
        let r = w.run(&mut c);
        assert_eq!(r.outcome, Outcome::Refused);
        assert!(w.writes.is_empty());
        let p = Plan::parse(
            b"format = 1\nfeature = \"key-release\"\nrings = [\"10pct\", \"canary\"]\nbake_s = 1\n\
              [[gate]]\nmetric = \"errors\"\nmax = 1\n",
        )
        .unwrap();
        let mut w = World::new(healthy);
        let r = w.run(&mut Controller::new(p, None).unwrap());
        assert_eq!(r.outcome, Outcome::Refused);
        assert!(r.reason.unwrap().contains("comes before"));
    }

    #[test]
    fn conflicting_writes_are_retried_then_pause() {
        let w = World::new(healthy);
        let mut c = Controller::new(plan(""), None).unwrap();
        let now = w.now;
        assert!(matches!(c.step(now, Input::Started), Action::ReadDocument));
        for _ in 0..MAX_WRITE_ATTEMPTS - 1 {
            let a = c.step(
                now,
                Input::DocumentRead(Some(w.doc.clone()), Version::Etcd(1)),
            );
            assert!(matches!(a, Action::WriteStage { .. }));
            assert!(matches!(
                c.step(now, Input::WriteConflict),
                Action::ReadDocument
            ));
        }
        let _ = c.step(
            now,
            Input::DocumentRead(Some(w.doc.clone()), Version::Etcd(1)),
        );
        let Action::SaveProgress(p) = c.step(now, Input::WriteConflict) else {
            panic!("pauses")
        };
        assert!(matches!(p.phase, Phase::Paused { .. }));
        let Action::Finish(r) = c.step(now, Input::Saved) else {
            panic!()
        };
        assert_eq!(r.outcome, Outcome::Paused);
    }
}
