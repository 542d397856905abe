//! The `live` scenario: `vkx-host drill --live` ([`crate::drill::live`])
//! rehearsed in the sandbox, as an operator runs it against a fleet, and
//! checked from the guests' side, which the live drill cannot see:
//!
//! 1. the feature enabled everywhere and every guest attested, the live
//!    drill narrows it for one ring and restores it; its own verdict must
//!    pass, every guest of the ring must have been told (and no guest
//!    outside it), and every one must have it back afterwards;
//! 2. a second live drill is SIGKILLed once the ring's guests were told:
//!    the overlay's lease lapses and every guest of the ring gets the
//!    feature back within the TTL and a little more, with no one to
//!    restore it.

use std::io::Read as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use vkx_common::wire::FeatureState;

use super::{ATTACH_LIMIT, Drill, FEATURE, FleetState, POLL, SETTLE_LIMIT, Size, ensure_attached};
use crate::drill::DrillArgs;
use crate::drill::fleet::{Build, GuestPlan, Workload};
use crate::drill::sandbox::Sandbox;
use crate::drill::timeline::Timeline;

/// The ring the rehearsal narrows.
const RING: &str = "10pct";
/// The live drill's lease here: its minimum, so the crash reverts soonest.
const TTL_S: u64 = 3;
/// SLO: a live drill SIGKILLed → every guest of its ring has the feature
/// back: the lease's TTL, etcd's lease expiry check (500 ms) and the
/// watch, with room.
pub(super) const KILLED_TO_RESTORED: Duration = Duration::from_secs(TTL_S + 2);
/// Longest one `drill --live` run may take here (its own waits are
/// bounded by seconds of summaries).
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// Lines of the live drill's own report kept as notes.
const MAX_REPORT_LINES: usize = 40;

/// Guest `i` was told the feature is off at or after `since`: when.
fn told(s: &FleetState, i: usize, since: Instant) -> Option<Instant> {
    s.update_since(i, since, FeatureState::Disabled)
}

/// Guest `i` got the feature back after being told it was off at or
/// after `since`: when.
fn back(s: &FleetState, i: usize, since: Instant) -> Option<Instant> {
    let off = told(s, i, since)?;
    s.update_since(i, off, FeatureState::Enabled)
}

/// Runs `cmd` to its end, at most [`RUN_LIMIT`]: exit success and what it
/// printed.
async fn run_bounded(mut cmd: std::process::Command) -> anyhow::Result<(bool, String)> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<(bool, String)> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run vkx-host drill --live")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let mut stderr = child.stderr.take().context("stderr")?;
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + RUN_LIMIT;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(POLL);
        };
        let text = format!(
            "{}{}",
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default()
        );
        match status {
            Some(st) => Ok((st.success(), text)),
            None => anyhow::bail!("drill --live ran past {RUN_LIMIT:?}:\n{text}"),
        }
    })
    .await?
}

/// The measured figure of the live drill's SLO line starting with `name`.
fn slo_figure(report: &str, name: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.trim_start().starts_with(name))?;
    let rest = line.trim_start().strip_prefix(name)?;
    rest.split_whitespace().next()?.parse().ok()
}

pub(super) async fn live(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
    let (nodes, per_node) = match args.size {
        Size::Reduced => (2, 48),
        Size::Full => (4, 256),
    };
    let total = nodes * per_node;
    let (mut drill, mut tl) = Drill::for_scenario(args, nodes, total).await?;
    drill.stage_all(&mut tl).await?;
    let plans: Vec<GuestPlan> = (0..total)
        .map(|_| GuestPlan {
            build: Build::Good,
            delay: Duration::ZERO,
            workload: Workload::OncePerEnable,
        })
        .collect();
    drill.start_fleet(&plans, None)?;
    let ring = Sandbox::ring_names()
        .iter()
        .position(|r| *r == RING)
        .context("the sandbox has no ring 10pct")?;
    let members: Vec<usize> = (0..total)
        .filter(|i| drill.sandbox.vms[*i].ring == ring)
        .collect();
    let others: Vec<usize> = (0..total)
        .filter(|i| drill.sandbox.vms[*i].ring != ring)
        .collect();
    // Attested, and holding the feature (told at attestation, or by the
    // update of a document the host took after the guest attested).
    let attached = drill
        .wait(ATTACH_LIMIT, |s| {
            s.attested_count() == total && (0..total).all(|i| s.told_enabled(i))
        })
        .await;
    ensure_attached(attached, &drill, total)?;
    // The hosts' summaries (every 500 ms) show every session.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tl.event(
        tl.now(),
        "attested",
        format!(
            "{total}/{total} guests hold {}; {} of them in ring {RING}",
            FEATURE.name(),
            members.len()
        ),
    );

    // 1. The live drill, run as an operator runs it.
    let config = drill.sandbox.nodes[0].config.display().to_string();
    let out = drill.sandbox.root().join("live");
    let out = out.display().to_string();
    let ttl = TTL_S.to_string();
    let live_args = [
        "drill",
        "--live",
        "--feature",
        FEATURE.name(),
        "--ring",
        RING,
        "--config",
        &config,
        "--ttl-s",
        &ttl,
        "--out",
        &out,
    ];
    let t1 = Instant::now();
    tl.event(
        drill.t(t1),
        "live drill",
        format!(
            "vkx-host drill --live --feature {} --ring {RING}",
            FEATURE.name()
        ),
    );
    let (ok, report) = run_bounded(drill.sandbox.command(&live_args)).await?;
    let t1_end = Instant::now();
    let met = report
        .lines()
        .find_map(|l| l.strip_prefix("verdict: "))
        .unwrap_or("none")
        .to_owned();
    tl.event(
        drill.t(t1_end),
        "live drill done",
        format!("exit {}; verdict {met}", if ok { 0 } else { 1 }),
    );
    let all_back = drill
        .wait(SETTLE_LIMIT, |s| {
            members.iter().all(|i| back(s, *i, t1).is_some())
        })
        .await;
    let (told_n, last_told, outside, back_n) = drill.with_state(|s| {
        let t: Vec<Instant> = members.iter().filter_map(|i| told(s, *i, t1)).collect();
        (
            t.len(),
            t.iter().max().copied(),
            others.iter().filter(|i| told(s, **i, t1).is_some()).count(),
            members
                .iter()
                .filter(|i| back(s, **i, t1).is_some())
                .count(),
        )
    });
    if let Some(l) = last_told {
        tl.event(
            drill.t(l),
            "last guest told",
            format!(
                "{told_n}/{} guests of {RING} told (their side)",
                members.len()
            ),
        );
    }

    // 2. A live drill killed once the ring was told: the lease reverts it.
    let t2 = Instant::now();
    let mut child = drill
        .sandbox
        .command(&live_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("run vkx-host drill --live")?;
    let applied = drill
        .wait(SETTLE_LIMIT, |s| {
            members.iter().all(|i| told(s, *i, t2).is_some())
        })
        .await;
    let _ = child.kill();
    let _ = child.wait();
    let t_kill = Instant::now();
    tl.event(
        drill.t(t_kill),
        "live drill killed",
        format!(
            "SIGKILL once {RING} was told ({}); no one restores it",
            if applied { "all" } else { "not all" }
        ),
    );
    let restored = drill
        .wait(KILLED_TO_RESTORED + SETTLE_LIMIT, |s| {
            members.iter().all(|i| back(s, *i, t2).is_some())
        })
        .await;
    let t_restored = drill.with_state(|s| {
        members
            .iter()
            .map(|i| back(s, *i, t2))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max())
    });
    if let Some(t) = t_restored {
        tl.event(
            drill.t(t),
            "restored",
            format!(
                "every guest of {RING} has {} back (lease {TTL_S} s)",
                FEATURE.name()
            ),
        );
    }
    drill.finish().await;

    let missed = report
        .lines()
        .filter(|l| l.trim_end().ends_with("MISS"))
        .count();
    // A run that did not pass misses at least one, whatever it printed.
    let missed = if ok && met.starts_with("PASS") {
        missed
    } else {
        missed.max(1)
    };
    #[allow(clippy::cast_precision_loss)]
    {
        tl.slo(
            "live drill: its SLOs missed",
            Some(missed as f64),
            0.0,
            "SLOs",
        );
        tl.slo(
            "live drill: ring guests not told (their side)",
            Some((members.len() - told_n) as f64),
            0.0,
            "guests",
        );
        tl.slo(
            "live drill: guests outside the ring told",
            Some(outside as f64),
            0.0,
            "guests",
        );
        tl.slo(
            "live drill: ring guests without it after",
            Some((members.len() - back_n) as f64),
            0.0,
            "guests",
        );
    }
    tl.slo_duration(
        "killed live drill -> ring restored",
        t_restored
            .filter(|_| applied && restored)
            .map(|t| t.saturating_duration_since(t_kill)),
        KILLED_TO_RESTORED,
    );
    if let Some(f) = slo_figure(&report, "overlay written -> every live session told") {
        tl.notes.push(format!(
            "the live drill measured overlay written -> every live session told {f:.3} s (hosts' clocks); \
             guests' side, from the command's start (process start included): {}",
            last_told.map_or("n/a".to_owned(), |l| format!(
                "{:.3} s",
                l.saturating_duration_since(t1).as_secs_f64()
            ))
        ));
    }
    tl.notes.push(format!(
        "settled: back {all_back}, restored after the kill {restored}"
    ));
    for line in report.lines().take(MAX_REPORT_LINES) {
        tl.notes.push(format!("live | {line}"));
    }
    Ok((tl, drill))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_report_is_read_by_its_slo_names() {
        let report = "SLOs\n  overlay written -> every live session told    0.042 s  (bound 1.000 s)  PASS\n\
                      verdict: PASS (live key-derivation 10pct: 3/3 SLOs met)\n";
        assert_eq!(
            slo_figure(report, "overlay written -> every live session told"),
            Some(0.042)
        );
        assert_eq!(slo_figure(report, "nothing"), None);
    }
}
