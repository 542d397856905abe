//! The tests of the rollout controller's state machine, in virtual time.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::rollout::summary::FeatureSummary;

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
