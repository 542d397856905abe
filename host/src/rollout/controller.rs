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
//!
//! Split along its seams: the progress record is `progress`; what goes in
//! and out (inputs, actions, timeline events, the report) is `messages`.
//! Both are re-exported here.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::document::{Document, Feature};
use super::gates::{Evaluation, GateVerdict, evaluate};
use super::plan::Plan;
use super::summary::{FleetDelta, HealthSummary, NO_RING, RingSummary, fleet_delta};
use crate::source::Version;

mod messages;
mod progress;

pub use messages::{Action, Input, Outcome, Report, RunEvent, RunEventKind};
pub use progress::{
    MAX_HISTORY, MAX_PROGRESS_BYTES, PROGRESS_FORMAT, Phase, Progress, ProgressError,
    VerdictRecord, Written,
};

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
mod tests;
