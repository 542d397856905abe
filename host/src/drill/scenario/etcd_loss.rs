//! The `etcd-loss` scenario: the walk of `clean` with the sandbox's etcd
//! killed mid-walk and restarted on its data; the hosts hold their
//! last-known-good, a local kill reaches node 0's guests, the controller
//! holds and resumes (see [`super`] for its SLOs).

use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::mpsc;
use vkx_common::wire::FeatureState;

use super::harness::Drill;
use super::walk::{RUN_LIMIT, drill_plan, start_walk};
use super::{FEATURE, POLL, SAMPLE_INTERVAL, SETTLE_LIMIT};
use crate::drill::DrillArgs;
use crate::drill::fleet::Workload;
use crate::drill::timeline::Timeline;

/// SLO (etcd-loss): a local kill (`rollout kill --local`, the node's
/// override file) → the last guest of that node that held the feature
/// told, while the store is down.
pub const LOCAL_KILL_TO_LAST_UPDATE: Duration = Duration::from_secs(1);
/// SLO (etcd-loss): stages the controller set while the store was down.
pub const STAGES_DURING_OUTAGE: f64 = 0.0;
/// SLO (etcd-loss): hosts whose document revision changed while the
/// store was down (they hold their last-known-good).
pub const HOSTS_REVISION_CHANGED: f64 = 0.0;
/// SLO (every drill of the walk): sessions lost.
pub const SESSIONS_LOST: f64 = 0.0;
/// etcd-loss: the controller's lock lease, the shortest etcd grants, so
/// that the outage outlives it and the controller must take it again.
const ETCD_LOSS_LOCK_TTL: Duration = Duration::from_secs(crate::rollout_run::MIN_LOCK_TTL_S);
/// etcd-loss: the store stays down at least this long, past the lock's
/// lease and the keep-alive's timeouts, so that the lease lapses.
const ETCD_LOSS_MIN_OUTAGE: Duration = Duration::from_secs(3 * crate::rollout_run::MIN_LOCK_TTL_S);

/// etcd-loss: its guests keep deriving at this pace while the feature is
/// usable. A guest that asked once, within the re-enable jitter of the
/// stage, would have gone quiet before the bake of 1pct starts again
/// after the outage, and the controller would see no traffic to judge.
const ETCD_LOSS_DERIVE_EVERY: Duration = Duration::from_secs(1);

/// What the etcd-loss script saw, on the drill's clock.
#[derive(Debug, Default)]
struct Outage {
    stage_1pct: Option<(u64, Instant)>,
    lost: Option<Instant>,
    hosts_down: Option<Instant>,
    local_kill: Option<(Instant, Instant)>,
    last_told: Option<Instant>,
    told: usize,
    unkill: Option<Instant>,
    back: Option<Instant>,
    /// Host revisions seen while the store was down (distinct), and the
    /// samples they came from.
    revisions: Vec<u64>,
    outage_samples: usize,
    events: Vec<(Instant, crate::rollout::controller::RunEventKind)>,
}

pub(super) async fn etcd_loss(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
    use crate::rollout::controller::{Outcome, RunEventKind};
    let (mut tl, mut drill, _) =
        start_walk(args, None, Workload::Every(ETCD_LOSS_DERIVE_EVERY)).await?;
    let total = drill.sandbox.vms.len();
    let nodes = drill.sandbox.nodes.len();
    // The guests of canary and 1pct hold the feature once 1pct's stage is
    // set; node 0's of them take the local kill.
    let holders: Vec<usize> = (0..total)
        .filter(|i| drill.sandbox.vms[*i].ring <= 1)
        .collect();
    let node0: Vec<usize> = holders
        .iter()
        .copied()
        .filter(|i| drill.sandbox.vms[*i].node == 0)
        .collect();
    let plan = crate::rollout::plan::Plan::parse(drill_plan(args.size).as_bytes())
        .map_err(|e| anyhow::anyhow!("the drill's plan: {e}"))?;
    let node = crate::rollout_node::Node::load(&drill.sandbox.nodes[0].config)?;
    let key = crate::rollout::load_signing_key(&drill.sandbox.key_file)
        .map_err(|e| anyhow::anyhow!("the sandbox's key: {e}"))?;
    let signer = (key, crate::drill::sandbox::KEY_ID.to_owned());
    let (sys0, inst0) = (std::time::SystemTime::now(), Instant::now());
    let at = move |s: std::time::SystemTime| match s.duration_since(sys0) {
        Ok(d) => inst0 + d,
        Err(e) => inst0.checked_sub(e.duration()).unwrap_or(inst0),
    };
    let (tx, mut rx) = mpsc::channel(64);
    let runner = crate::rollout_run::run(
        plan,
        &node.settings,
        signer,
        crate::rollout_run::RunOptions {
            lock_ttl: ETCD_LOSS_LOCK_TTL,
            ..crate::rollout_run::RunOptions::default()
        },
        Some(tx),
        std::future::pending::<()>(),
    );
    let cfg0 = drill.sandbox.nodes[0].config.display().to_string();
    let local = |verb: &str| {
        drill.sandbox.command(&[
            "rollout",
            verb,
            FEATURE.name(),
            "--local",
            "--config",
            &cfg0,
        ])
    };
    let (kill_cmd, unkill_cmd) = (local("kill"), local("unkill"));
    let d = &mut drill;
    let (holders, node0_list) = (&holders, &node0);
    let script = async move {
        let mut o = Outage::default();
        let mut killed = false;
        let inner: anyhow::Result<()> = async {
            // The walk, up to 1pct's stage.
            while let Some(e) = rx.recv().await {
                let t = at(e.at);
                if let RunEventKind::StageSet { ring, revision } = &e.kind
                    && ring == "1pct"
                {
                    o.stage_1pct = Some((*revision, t));
                }
                o.events.push((t, e.kind));
                if o.stage_1pct.is_some() {
                    break;
                }
            }
            if o.stage_1pct.is_none() {
                bail!("the controller ended before setting 1pct's stage");
            };
            // Every host at 1pct's revision, every holder told.
            let settled = d
                .wait(SETTLE_LIMIT, |s| {
                    holders.iter().all(|i| {
                        s.updates[*i].last().map_or(s.attested_enabled[*i], |(_, st)| {
                            *st == Some(FeatureState::Enabled)
                        })
                    })
                })
                .await;
            if !settled {
                bail!("the guests of canary and 1pct were not all told within {SETTLE_LIMIT:?}");
            }
            // The store dies.
            if !d.sandbox.kill_etcd() {
                bail!("etcd-loss needs the sandbox's own etcd (not --etcd)");
            }
            killed = true;
            let t_lost = Instant::now();
            o.lost = Some(t_lost);
            // Every host notices (vkx_rollout_source_up 0) and holds.
            let deadline = Instant::now() + SETTLE_LIMIT;
            while Instant::now() < deadline {
                let down = d.samples().last().is_some_and(|s| {
                    s.t >= d.t(t_lost) && s.hosts == nodes && s.sources_up == 0
                });
                if down {
                    o.hosts_down = Some(Instant::now());
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            // The local kill on node 0, while the store is down.
            let t_kill = Instant::now();
            d.cli(kill_cmd).await?;
            o.local_kill = Some((t_kill, Instant::now()));
            d.wait(SETTLE_LIMIT, |s| {
                node0_list
                    .iter()
                    .all(|i| s.update_since(*i, t_kill, FeatureState::Disabled).is_some())
            })
            .await;
            let (last, told) = d.with_state(|s| {
                let t: Vec<Instant> = node0_list
                    .iter()
                    .filter_map(|i| s.update_since(*i, t_kill, FeatureState::Disabled))
                    .collect();
                (t.iter().max().copied(), t.len())
            });
            (o.last_told, o.told) = (last, told);
            d.cli(unkill_cmd).await?;
            o.unkill = Some(Instant::now());
            // The controller holds before the store comes back.
            let deadline = tokio::time::sleep(SETTLE_LIMIT);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    e = rx.recv() => {
                        let Some(e) = e else { bail!("the controller ended while the store was down") };
                        let lost = matches!(e.kind, RunEventKind::StoreLost { .. });
                        o.events.push((at(e.at), e.kind));
                        if lost {
                            break;
                        }
                    }
                    () = &mut deadline => bail!("the controller did not notice the outage within {SETTLE_LIMIT:?}"),
                }
            }
            // Let a few samples show the hosts holding, and the lease
            // lapse, then bring it back.
            tokio::time::sleep(SAMPLE_INTERVAL * 4).await;
            tokio::time::sleep_until((t_lost + ETCD_LOSS_MIN_OUTAGE).into()).await;
            Ok(())
        }
        .await;
        if killed {
            let from = o.lost.map_or(0.0, |t| d.t(t));
            let samples = d.samples();
            let during: Vec<&crate::drill::timeline::Sample> =
                samples.0.iter().filter(|s| s.t >= from).collect();
            o.outage_samples = during.len();
            o.revisions = during
                .iter()
                .flat_map(|s| s.revisions.iter().copied())
                .collect();
            o.revisions.sort_unstable();
            o.revisions.dedup();
            drop(samples);
            d.sandbox.restart_etcd()?;
            o.back = Some(Instant::now());
        }
        inner?;
        while let Some(e) = rx.recv().await {
            o.events.push((at(e.at), e.kind));
        }
        anyhow::Ok(o)
    };
    let (result, outage) = tokio::time::timeout(RUN_LIMIT, async { tokio::join!(runner, script) })
        .await
        .map_err(|_| anyhow::anyhow!("the etcd-loss drill ran longer than {RUN_LIMIT:?}"))?;
    let o = outage?;
    let report = result.map_err(|e| anyhow::anyhow!("rollout run: {e}"))?;
    let (t_lost, t_back) = (o.lost.unwrap_or(drill.start), o.back.unwrap_or(drill.start));
    // The timeline.
    let mut stages_in_outage = 0usize;
    let mut resumed = None;
    let mut completed = None;
    for (t, kind) in &o.events {
        let t = *t;
        match kind {
            RunEventKind::StageSet { ring, revision } => {
                if t >= t_lost && t <= t_back {
                    stages_in_outage += 1;
                }
                tl.event(
                    drill.t(t),
                    format!("stage {ring}"),
                    format!("the controller set the stage at revision {revision} (signed)"),
                );
            }
            RunEventKind::Verdict { ring, evaluation } => tl.event(
                drill.t(t),
                format!("verdict {ring}"),
                evaluation.verdict.to_string(),
            ),
            RunEventKind::StoreLost { ring, reason } => tl.event(
                drill.t(t),
                "controller holds",
                format!(
                    "in the bake of {ring}: {}",
                    reason.split(": ").take(3).collect::<Vec<_>>().join(": ")
                ),
            ),
            RunEventKind::StoreBack { ring, down_ms } => {
                resumed = Some(t);
                tl.event(
                    drill.t(t),
                    "controller resumed",
                    format!(
                        "the store answered after {down_ms} ms; the bake of {ring} starts again"
                    ),
                );
            }
            RunEventKind::Completed => {
                completed = Some(t);
                tl.event(drill.t(t), "completed", "every ring passed its gates");
            }
            RunEventKind::Paused { ring, reason } => {
                tl.event(drill.t(t), format!("paused {ring}"), reason.clone());
            }
            RunEventKind::Stopped { reason } => tl.event(drill.t(t), "stopped", reason.clone()),
            _ => {}
        }
    }
    let revision = o.stage_1pct.map_or(0, |(r, _)| r);
    tl.event(drill.t(t_lost), "store lost", "the sandbox's etcd killed");
    if let Some(h) = o.hosts_down {
        tl.event(
            drill.t(h),
            "hosts hold",
            format!(
                "vkx_rollout_source_up 0 on every host; each keeps revision {revision} (last-known-good)"
            ),
        );
    }
    if let Some((k, r)) = o.local_kill {
        tl.event(
            drill.t(k),
            "local kill",
            format!(
                "rollout kill {} --local on {} ({:.3} s)",
                FEATURE.name(),
                drill.sandbox.nodes[0].name,
                (r - k).as_secs_f64()
            ),
        );
    }
    if let Some(l) = o.last_told {
        tl.event(
            drill.t(l),
            "last guest of node told",
            format!(
                "{}/{} guests of the node told by feature-update",
                o.told,
                node0.len()
            ),
        );
    }
    if let Some(u) = o.unkill {
        tl.event(
            drill.t(u),
            "local unkill",
            "rollout unkill --local: the override removed",
        );
    }
    tl.event(
        drill.t(t_back),
        "store back",
        "the sandbox's etcd restarted on its data",
    );
    tl.events.sort_by(|a, b| a.t.total_cmp(&b.t));
    // The end: every guest holds the feature (the last ring is everyone).
    let all_on = drill
        .wait(SETTLE_LIMIT, |s| (0..total).all(|i| s.told_enabled(i)))
        .await;
    drill.finish().await;
    let (lost, attested) = drill.with_state(|s| (s.sessions_lost, s.attested_count()));
    tl.event(
        tl.now(),
        "stopped",
        format!("{attested}/{total} guests attested, every session stopped in order"),
    );
    let changed = o.revisions.iter().filter(|r| **r != revision).count();
    // The guests of canary and 1pct on the other nodes kept the feature
    // through the outage.
    let dropped = drill.with_state(|s| {
        holders
            .iter()
            .filter(|i| !node0.contains(i))
            .filter(|i| {
                s.updates[**i].iter().any(|(t, st)| {
                    *t >= t_lost && *t <= t_back && *st != Some(FeatureState::Enabled)
                })
            })
            .count()
    });
    #[allow(clippy::cast_precision_loss)]
    {
        tl.slo(
            "sessions lost",
            Some(lost as f64),
            SESSIONS_LOST,
            "sessions",
        );
        tl.slo_duration(
            "local kill -> last guest of the node updated",
            match (o.local_kill, o.last_told) {
                (Some((_, r)), Some(l)) if o.told == node0.len() => {
                    Some(l.saturating_duration_since(r))
                }
                _ => None,
            },
            LOCAL_KILL_TO_LAST_UPDATE,
        );
        tl.slo(
            "stages set while the store was down",
            Some(stages_in_outage as f64),
            STAGES_DURING_OUTAGE,
            "stages",
        );
        tl.slo(
            "host revisions other than last-known-good in the outage",
            (o.hosts_down.is_some() && !o.revisions.is_empty()).then_some(changed as f64),
            HOSTS_REVISION_CHANGED,
            "revisions",
        );
        tl.slo(
            "canary/1pct guests of other nodes told off in the outage",
            Some(dropped as f64),
            0.0,
            "guests",
        );
        tl.slo(
            "rollout not completed after the store returned",
            Some(
                if report.outcome == Outcome::Completed
                    && resumed.is_some_and(|r| r >= t_back)
                    && completed.is_some_and(|c| c > t_back)
                {
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
        "controller: {}; store down {:.1} s (the controller's lock lease: {} s); host revisions in the outage's {} samples: {:?}; settled: {all_on}",
        report.outcome,
        (t_back - t_lost).as_secs_f64(),
        ETCD_LOSS_LOCK_TTL.as_secs(),
        o.outage_samples,
        o.revisions
    ));
    Ok((tl, drill))
}
