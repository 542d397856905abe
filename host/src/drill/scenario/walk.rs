//! The walks: `clean` and `seed-incident`, the rollout controller
//! (`crate::rollout_run::run`) walking every ring with [`drill_plan`],
//! and what they share with `etcd-loss` ([`start_walk`], [`RUN_LIMIT`]).
//! See [`super`] for their SLOs.

use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::mpsc;
use vkx_common::wire::FeatureState;

use super::harness::{Drill, FleetState, ensure_attached, quiet_after_kill};
use super::{ATTACH_LIMIT, FEATURE, KILL_TO_LAST_UPDATE, SAMPLE_INTERVAL, SETTLE_LIMIT, Size};
use crate::drill::DrillArgs;
use crate::drill::fleet::{Build, GuestPlan, Workload};
use crate::drill::sandbox::Sandbox;
use crate::drill::timeline::{Sample, Timeline};

/// SLO (seed-incident): the first unknown-message error in the hosts'
/// metrics → the controller's halting kill written, beyond the bake.
pub const FAULT_TO_HALT_BEYOND_BAKE: Duration = Duration::from_secs(2);
/// SLO (seed-incident): connection attempts of a bad-build guest after it
/// sent its unknown message (it must go dormant, not retry).
pub const BAD_GUEST_RETRIES: f64 = 0.0;
/// Longest a controller run may take (every bake of the plan, extended,
/// and then some).
pub(super) const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The controller's plan for the drills: every ring of the sandbox, a
/// short bake, a small sample (extended, not paused, while a small ring's
/// guests wait out their jitter), and ceilings that a single unexpected
/// error, lost session or refused attestation breaches.
pub(super) fn drill_plan(size: Size) -> String {
    let (bake, min_requests) = match size {
        Size::Reduced => (2, 1),
        Size::Full => (5, 4),
    };
    let rings: Vec<String> = Sandbox::ring_names()
        .iter()
        .map(|r| format!("\"{r}\""))
        .collect();
    format!(
        "format = 1\nfeature = \"{}\"\nrings = [{}]\nbake_s = {bake}\npoll_ms = 500\n\n\
         [inconclusive]\nextend_s = 1\nmax_bake_s = {}\n\n\
         [sample]\nmin_requests = {min_requests}\nmin_sessions = 0\n\n\
         [[gate]]\nmetric = \"errors\"\nmax = 0\n\
         [[gate]]\nmetric = \"lost\"\nmax = 0\n\
         [[gate]]\nmetric = \"attest_failures\"\nmax = 0\n\
         [[gate]]\nmetric = \"error_rate\"\nmax = 0.01\n",
        FEATURE.name(),
        rings.join(", "),
        // Extensions until every guest of the ring has asked: each asks
        // within the session's re-enable jitter of the feature turning on.
        bake + vkx_common::session::guest::FEATURE_REENABLE_JITTER.as_secs() + 1,
    )
}

/// The controller's run as the drill saw it.
#[derive(Debug, Default)]
struct RunSeen {
    /// Stage sets: ring, revision, instant.
    stages: Vec<(String, u64, Instant)>,
    /// Verdicts: ring, verdict label, words, instant.
    verdicts: Vec<(String, &'static str, String, Instant)>,
    /// The halting kill: ring, revision, instant (written).
    halted: Option<(String, u64, Instant)>,
    completed: Option<Instant>,
    other: Vec<(String, String, Instant)>,
}

/// Runs the rollout controller (`vkx-host rollout run`'s library entry)
/// with [`drill_plan`] against the sandbox's store, signed with the
/// sandbox's key, as node 0's host.toml configures it (so the document
/// key, the health prefix and the etcd endpoints are the hosts' own).
/// Its events go to `tl` as they happen; `on_fail` runs when a verdict
/// fails (before the kill is written).
async fn run_controller(
    drill: &mut Drill,
    size: Size,
    tl: &mut Timeline,
) -> anyhow::Result<(crate::rollout::controller::Report, RunSeen)> {
    use crate::rollout::controller::RunEventKind;
    let plan = crate::rollout::plan::Plan::parse(drill_plan(size).as_bytes())
        .map_err(|e| anyhow::anyhow!("the drill's plan: {e}"))?;
    let node = crate::rollout_node::Node::load(&drill.sandbox.nodes[0].config)?;
    let key = crate::rollout::load_signing_key(&drill.sandbox.key_file)
        .map_err(|e| anyhow::anyhow!("the sandbox's key: {e}"))?;
    let signer = (key, crate::drill::sandbox::KEY_ID.to_owned());
    // RunEvent times are wall-clock: map them onto the drill's clock.
    let (sys0, inst0) = (std::time::SystemTime::now(), Instant::now());
    let at = |s: std::time::SystemTime| match s.duration_since(sys0) {
        Ok(d) => inst0 + d,
        Err(e) => inst0.checked_sub(e.duration()).unwrap_or(inst0),
    };
    let (tx, mut rx) = mpsc::channel(64);
    let runner = crate::rollout_run::run(
        plan,
        &node.settings,
        signer,
        crate::rollout_run::RunOptions::default(),
        Some(tx),
        std::future::pending::<()>(),
    );
    tokio::pin!(runner);
    let mut seen = RunSeen::default();
    let deadline = tokio::time::sleep(RUN_LIMIT);
    tokio::pin!(deadline);
    let handle = |e: crate::rollout::controller::RunEvent,
                  seen: &mut RunSeen,
                  tl: &mut Timeline,
                  drill: &mut Drill| {
        let t = at(e.at);
        match e.kind {
            RunEventKind::StageSet { ring, revision } => {
                tl.event(
                    drill.t(t),
                    format!("stage {ring}"),
                    format!("the controller set the stage at revision {revision} (signed)"),
                );
                seen.stages.push((ring, revision, t));
            }
            RunEventKind::Verdict { ring, evaluation } => {
                let label = evaluation.verdict.label();
                let f = &evaluation.figures;
                tl.event(
                    drill.t(t),
                    format!("verdict {ring}"),
                    format!(
                        "{} ({} requests, {} errors, {} lost)",
                        evaluation.verdict, f.requests, f.errors, f.lost
                    ),
                );
                if evaluation.verdict.is_fail() {
                    // The kill follows: host log lines are counted from here.
                    drill.mark_logs();
                }
                seen.verdicts
                    .push((ring, label, evaluation.verdict.to_string(), t));
            }
            RunEventKind::Halted { ring, revision } => {
                tl.event(
                    drill.t(t),
                    format!("kill rev {revision}"),
                    format!("the controller halted at {ring}: unsigned kill written"),
                );
                seen.halted = Some((ring, revision, t));
            }
            RunEventKind::Completed => {
                tl.event(drill.t(t), "completed", "every ring passed its gates");
                seen.completed = Some(t);
            }
            RunEventKind::Extended { ring, .. } => {
                tl.event(
                    drill.t(t),
                    format!("extend {ring}"),
                    "inconclusive: bake extended",
                );
            }
            RunEventKind::Paused { ring, reason } => {
                tl.event(drill.t(t), format!("paused {ring}"), reason.clone());
                seen.other.push(("paused".into(), reason, t));
            }
            RunEventKind::Stopped { reason } => {
                tl.event(drill.t(t), "stopped", reason.clone());
                seen.other.push(("stopped".into(), reason, t));
            }
            RunEventKind::StoreLost { ring, reason } => {
                tl.event(drill.t(t), format!("store lost {ring}"), reason.clone());
                seen.other.push(("store lost".into(), reason, t));
            }
            RunEventKind::StoreBack { ring, down_ms } => {
                tl.event(
                    drill.t(t),
                    "controller resumed",
                    format!(
                        "the store answered after {down_ms} ms: the bake of {ring} starts again"
                    ),
                );
                seen.other.push(("store back".into(), ring, t));
            }
            RunEventKind::Started { .. } | RunEventKind::Observed { .. } => {}
        }
    };
    let result = loop {
        tokio::select! {
            r = &mut runner => break r,
            Some(e) = rx.recv() => handle(e, &mut seen, tl, drill),
            () = &mut deadline => bail!("the controller ran longer than {RUN_LIMIT:?}"),
        }
    };
    while let Ok(e) = rx.try_recv() {
        handle(e, &mut seen, tl, drill);
    }
    let report = result.map_err(|e| anyhow::anyhow!("rollout run: {e}"))?;
    Ok((report, seen))
}

/// Sizes of the controller's drills: hosts and guests per host.
fn controller_size(size: Size) -> (usize, usize) {
    match size {
        Size::Reduced => (3, 32),
        Size::Full => (4, 256),
    }
}

/// Starts the sandbox (feature at stage none) and `plans`' guests, and
/// waits until every guest attested.
pub(super) async fn start_walk(
    args: &DrillArgs,
    bad_ring: Option<usize>,
    workload: Workload,
) -> anyhow::Result<(Timeline, Drill, Vec<Build>)> {
    let (nodes, per_node) = controller_size(args.size);
    let total = nodes * per_node;
    let (mut drill, mut tl) = Drill::for_scenario(args, nodes, total).await?;
    let builds: Vec<Build> = drill
        .sandbox
        .vms
        .iter()
        .map(|vm| {
            if Some(vm.ring) == bad_ring {
                Build::Bad
            } else {
                Build::Good
            }
        })
        .collect();
    let plans: Vec<GuestPlan> = builds
        .iter()
        .map(|b| GuestPlan {
            build: *b,
            delay: Duration::ZERO,
            workload,
        })
        .collect();
    let bad = builds.iter().filter(|b| **b == Build::Bad).count();
    drill.start_fleet(&plans, None)?;
    tl.event(
        tl.now(),
        "guests",
        format!(
            "{total} guests connect ({bad} of the bad build), {} at stage none",
            FEATURE.name()
        ),
    );
    let attached = drill
        .wait(ATTACH_LIMIT, |s| s.attested_count() == total)
        .await;
    ensure_attached(attached, &drill, total)?;
    // The hosts' health summaries include every session before the walk.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tl.event(
        tl.now(),
        "attested",
        format!("{total}/{total} guests attested; the controller starts"),
    );
    Ok((tl, drill, builds))
}

/// Errors sent by every host, summed, in the last sample.
fn errors_sent(drill: &Drill) -> Option<u64> {
    drill.samples().last().map(|s| Sample::total(&s.errors))
}

pub(super) async fn clean(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
    let (mut tl, mut drill, _) = start_walk(args, None, Workload::OncePerEnable).await?;
    let total = drill.sandbox.vms.len();
    let errors_before = errors_sent(&drill);
    let (report, seen) = run_controller(&mut drill, args.size, &mut tl).await?;
    // Every guest told the feature is on (the last ring is everyone).
    let all_on = drill
        .wait(SETTLE_LIMIT, |s| (0..total).all(|i| s.told_enabled(i)))
        .await;
    let (on, derived, last_on) = drill.with_state(|s| {
        let last = (0..total)
            .filter_map(|i| s.update_since(i, drill.start, FeatureState::Enabled))
            .max();
        (
            (0..total).filter(|i| s.told_enabled(*i)).count(),
            s.derived.iter().filter(|d| !d.is_empty()).count(),
            last,
        )
    });
    if let Some(l) = last_on {
        tl.event(
            drill.t(l),
            "last guest enabled",
            format!("{on}/{total} guests hold {}", FEATURE.name()),
        );
    }
    tokio::time::sleep(SAMPLE_INTERVAL * 3).await;
    let errors_after = errors_sent(&drill);
    drill.finish().await;
    let (lost, attested) = drill.with_state(|s| (s.sessions_lost, s.attested_count()));
    tl.event(
        tl.now(),
        "stopped",
        format!("{attested}/{total} guests attested, every session stopped in order"),
    );
    #[allow(clippy::cast_precision_loss)]
    {
        tl.slo(
            "rollout not completed",
            Some(
                if report.outcome == crate::rollout::controller::Outcome::Completed {
                    0.0
                } else {
                    1.0
                },
            ),
            0.0,
            "runs",
        );
        tl.slo(
            "errors sent by the hosts",
            errors_after.map(|a| a.saturating_sub(errors_before.unwrap_or(0)) as f64),
            0.0,
            "errors",
        );
        tl.slo("sessions lost", Some(lost as f64), 0.0, "sessions");
        tl.slo(
            "guests without the feature at the end",
            Some((total - on) as f64),
            0.0,
            "guests",
        );
    }
    tl.notes.push(format!(
        "controller: {}, {} stages set, {} verdicts; {derived}/{total} guests derived; settled: {all_on}",
        report.outcome,
        seen.stages.len(),
        seen.verdicts.len()
    ));
    Ok((tl, drill))
}

pub(super) async fn seed_incident(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
    // The ring after the canary runs the bad build.
    let (mut tl, mut drill, builds) = start_walk(args, Some(1), Workload::OncePerEnable).await?;
    let total = drill.sandbox.vms.len();
    let bad: Vec<usize> = (0..total).filter(|i| builds[*i] == Build::Bad).collect();
    let good: Vec<usize> = (0..total).filter(|i| builds[*i] == Build::Good).collect();
    let (report, seen) = run_controller(&mut drill, args.size, &mut tl).await?;
    let bake = Duration::from_secs(match args.size {
        Size::Reduced => 2,
        Size::Full => 5,
    });
    // The first unknown-message error the hosts counted.
    let fault = drill
        .samples()
        .first_after(0.0, |s| Sample::total(&s.unknown) > 0)
        .map(|s| s.t);
    if let Some(f) = fault {
        tl.event(
            f,
            "first fault",
            "first unknown-message error in the hosts' metrics",
        );
    }
    let t_kill = seen.halted.as_ref().map(|(_, _, t)| *t);
    // Every guest that held the feature told it is off.
    let held = |s: &FleetState, i: usize, before: Instant| -> bool {
        s.attested_enabled[i]
            || s.updates[i]
                .iter()
                .any(|(t, st)| *t < before && *st == Some(FeatureState::Enabled))
    };
    let kill_at = t_kill.unwrap_or_else(Instant::now);
    let settled = drill
        .wait(SETTLE_LIMIT, |s| {
            good.iter().all(|i| {
                s.live[*i]
                    && (!held(s, *i, kill_at)
                        || s.update_since(*i, kill_at, FeatureState::Disabled)
                            .is_some())
            })
        })
        .await;
    let (last_told, told, holders, derived_after) = drill.with_state(|s| {
        let mut last: Option<Instant> = None;
        let (mut told, mut holders, mut derived_after) = (0, 0, 0);
        for i in 0..total {
            if !s.live[i] {
                continue;
            }
            if held(s, i, kill_at) {
                holders += 1;
            }
            if let Some(u) = s.update_since(i, kill_at, FeatureState::Disabled) {
                told += 1;
                last = Some(last.map_or(u, |l| l.max(u)));
                derived_after += s.derived[i].iter().filter(|d| **d > u).count();
            }
        }
        (last, told, holders, derived_after)
    });
    if let Some(l) = last_told {
        tl.event(
            drill.t(l),
            "last guest updated",
            format!("{told} live guests told by feature-update ({holders} held the feature)"),
        );
    }
    tokio::time::sleep(Duration::from_secs(1) + SAMPLE_INTERVAL * 2).await;
    let quiet_from = last_told.unwrap_or(kill_at);
    let requests_after = drill.feature_requests_since(quiet_from);
    tl.event(
        tl.now(),
        "quiet",
        "no request of the killed feature since the last update",
    );
    let (retries, dormant, good_live, probes_sent) = drill.with_state(|s| {
        let retries: usize = bad
            .iter()
            .map(|i| match s.unknown[*i] {
                Some(u) => s.attempts[*i].iter().filter(|a| **a > u).count(),
                None => 0,
            })
            .sum();
        (
            retries,
            bad.iter().filter(|i| s.dormant[**i].is_some()).count(),
            good.iter().filter(|i| s.live[**i]).count(),
            s.probes_sent,
        )
    });
    let unknown_sent =
        drill.with_state(|s| bad.iter().filter(|i| s.unknown[**i].is_some()).count());
    tl.event(
        tl.now(),
        "recovered",
        format!(
            "{good_live}/{} good guests attested and live; {dormant}/{} bad guests dormant",
            good.len(),
            bad.len()
        ),
    );
    drill.finish().await;
    let logs = drill.log_lines_since_mark(|l| l.contains("rollout"));
    let most_lines = logs.iter().map(Vec::len).max().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    {
        tl.slo_duration(
            "fault onset -> halt (kill written)",
            match (fault, t_kill) {
                (Some(f), Some(k)) => Some(Duration::from_secs_f64((drill.t(k) - f).max(0.0))),
                _ => None,
            },
            bake + FAULT_TO_HALT_BEYOND_BAKE,
        );
        tl.slo_duration(
            "kill -> last guest updated",
            match (t_kill, last_told) {
                (Some(k), Some(l)) => Some(l.saturating_duration_since(k)),
                // Nobody held the feature: nobody to tell.
                (Some(_), None) if holders == 0 => Some(Duration::ZERO),
                _ => None,
            },
            KILL_TO_LAST_UPDATE,
        );
        quiet_after_kill(
            &mut tl,
            requests_after.map(|r| r + derived_after as u64),
            probes_sent as u64,
            most_lines as u64,
        );
        tl.slo(
            "retries by bad-build guests",
            Some(retries as f64),
            BAD_GUEST_RETRIES,
            "attempts",
        );
        tl.slo(
            "bad-build guests not dormant",
            Some((bad.len() - dormant) as f64),
            0.0,
            "guests",
        );
        tl.slo(
            "good guests not live at the end",
            Some((good.len() - good_live) as f64),
            0.0,
            "guests",
        );
        tl.slo(
            "rollout not halted",
            Some(
                if report.outcome == crate::rollout::controller::Outcome::Halted {
                    0.0
                } else {
                    1.0
                },
            ),
            0.0,
            "runs",
        );
    }
    tl.notes.push(format!(
        "controller: {} at {}; {unknown_sent}/{} bad guests sent the unknown type; settled: {settled}",
        report.outcome,
        report.ring.as_deref().unwrap_or("-"),
        bad.len()
    ));
    Ok((tl, drill))
}
