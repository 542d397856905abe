//! The `kill-under-load` scenario: a connect storm with the feature
//! enabled everywhere, and the operator's kill at the storm's peak (see
//! [`super`] for its SLOs).

use std::time::{Duration, Instant};

use anyhow::Context;
use vkx_common::wire::FeatureState;

use super::harness::{Drill, Trigger, quiet_after_kill};
use super::{
    ATTACH_LIMIT, FEATURE, KILL_TO_LAST_UPDATE, POLL, SAMPLE_INTERVAL, SETTLE_LIMIT, Size,
};
use crate::drill::DrillArgs;
use crate::drill::fleet::{Build, GuestPlan, Workload};
use crate::drill::timeline::Timeline;

pub(super) async fn kill_under_load(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
    let (nodes, per_node) = match args.size {
        Size::Reduced => (2, 64),
        Size::Full => (4, 256),
    };
    let total = nodes * per_node;
    let (mut drill, mut tl) = Drill::for_scenario(args, nodes, total).await?;
    // The feature on everywhere before the storm.
    drill.stage_all(&mut tl).await?;
    // Let the hosts take the document before the first guest.
    let t = Instant::now();
    while t.elapsed() < SETTLE_LIMIT {
        let revs = drill.samples().last().map_or(0, |s| s.sources_up);
        if usize::try_from(revs).unwrap_or(usize::MAX) >= nodes {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let plans: Vec<GuestPlan> = (0..total)
        .map(|_| GuestPlan {
            build: Build::Good,
            delay: Duration::ZERO,
            workload: Workload::OncePerEnable,
        })
        .collect();
    let t_storm = Instant::now();
    drill.mark_logs();
    let (done, kill) = tokio::sync::oneshot::channel();
    drill.start_fleet(
        &plans,
        Some(Trigger {
            attested: total / 2,
            command: drill.sandbox.kill_command(),
            done,
        }),
    )?;
    tl.event(
        drill.t(t_storm),
        "storm",
        format!("{total} guests connect at once"),
    );
    let (t_kill, t_return, attested_at_kill, said) = tokio::time::timeout(ATTACH_LIMIT, kill)
        .await
        .context("the storm never reached half of the guests attested")??;
    let said = said?;
    let revision = said
        .split_whitespace()
        .skip_while(|w| *w != "revision")
        .nth(1)
        .unwrap_or("?")
        .trim_end_matches(['.', ',', ':'])
        .to_owned();
    tl.event(
        drill.t(t_kill),
        "kill",
        format!(
            "rollout kill {} at the storm's peak ({attested_at_kill}/{total} attested)",
            FEATURE.name()
        ),
    );
    tl.event(
        drill.t(t_return),
        format!("kill rev {revision}"),
        format!(
            "the kill command returned ({:.3} s)",
            (t_return - t_kill).as_secs_f64()
        ),
    );
    // Every guest attested in the end; every guest that held the feature
    // told.
    let settled = drill
        .wait(ATTACH_LIMIT, |s| {
            s.attested_count() == total
                && (0..total).all(|i| {
                    !s.attested_enabled[i]
                        || s.update_since(i, t_kill, FeatureState::Disabled).is_some()
                })
        })
        .await;
    let (last_told, told, holders, probes_sent, derived_after, lost, attested) =
        drill.with_state(|s| {
            let mut last: Option<Instant> = None;
            let mut told = 0;
            let mut holders = 0;
            let mut derived_after = 0;
            for i in 0..total {
                if s.attested_enabled[i]
                    || s.updates[i]
                        .iter()
                        .any(|(_, st)| *st == Some(FeatureState::Enabled))
                {
                    holders += 1;
                }
                if let Some(u) = s.update_since(i, t_kill, FeatureState::Disabled) {
                    told += 1;
                    last = Some(last.map_or(u, |l| l.max(u)));
                    derived_after += s.derived[i].iter().filter(|d| **d > u).count();
                }
            }
            (
                last,
                told,
                holders,
                s.probes_sent,
                derived_after,
                s.sessions_lost,
                s.attested_count(),
            )
        });
    if let Some(l) = last_told {
        tl.event(
            drill.t(l),
            "last guest told",
            format!("{told} guests told by feature-update"),
        );
    }
    // Quiet: a second of samples after the last update.
    tokio::time::sleep(Duration::from_secs(1) + SAMPLE_INTERVAL * 2).await;
    let quiet_from = last_told.unwrap_or(t_return);
    let requests_after = drill.feature_requests_since(quiet_from);
    tl.event(
        tl.now(),
        "quiet",
        "no request of the killed feature since the last update",
    );
    drill.finish().await;
    let logs = drill.log_lines_since_mark(|l| l.contains("rollout"));
    let most_lines = logs.iter().map(Vec::len).max().unwrap_or(0);
    tl.event(
        tl.now(),
        "recovered",
        format!("{attested}/{total} guests attested, every session stopped in order"),
    );

    #[allow(clippy::cast_precision_loss)]
    {
        tl.slo_duration(
            "kill -> last guest updated",
            last_told.map(|l| l.saturating_duration_since(t_return)),
            KILL_TO_LAST_UPDATE,
        );
        quiet_after_kill(
            &mut tl,
            requests_after.map(|r| r + derived_after as u64),
            probes_sent as u64,
            most_lines as u64,
        );
        tl.slo(
            "guests not attested after the storm",
            Some((total - attested) as f64),
            0.0,
            "guests",
        );
        tl.slo("sessions lost", Some(lost as f64), 0.0, "sessions");
    }
    tl.notes.push(format!(
        "{holders} guests held the feature before the kill, {told} told by update; settled: {settled}"
    ));
    Ok((tl, drill))
}
