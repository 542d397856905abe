//! The harness every scenario shares: [`Drill`] (the sandbox, its hosts,
//! the metrics sampler, the synthetic guests and what they reported, in
//! [`FleetState`]), the ring quotas, and the SLOs every scenario with a
//! kill checks ([`quiet_after_kill`]).
//!
//! What it bounds: the guests' goodbye ([`STOP_LIMIT`]), open files (two
//! per guest and [`FD_HEADROOM`]), every wait (its caller's limit).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::{mpsc, watch};
use vkx_common::wire::FeatureState;

use super::{
    ATTACH_LIMIT, FEATURE, LOG_LINES_PER_HOST, POLL, REQUESTS_AFTER_KILL, SAMPLE_INTERVAL,
};
use crate::drill::DrillArgs;
use crate::drill::fleet::{Fleet, GuestPlan, Report};
use crate::drill::sandbox::{Sandbox, Spec, ensure_fd_limit, output_ok};
use crate::drill::timeline::{Sample, Samples, Timeline};

/// Longest the guests get to say goodbye.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Open files beyond two per guest (hosts' listeners are theirs).
const FD_HEADROOM: u64 = 512;
/// The hosts' health interval in [`Drill::for_scenario`]'s drills.
const HEALTH_INTERVAL_MS: u64 = 500;

/// What the guests reported so far.
#[derive(Debug, Default)]
pub struct FleetState {
    pub attested: Vec<Option<Instant>>,
    /// The feature's state in the map each guest attested with, last.
    pub attested_enabled: Vec<bool>,
    pub live: Vec<bool>,
    pub updates: Vec<Vec<(Instant, Option<FeatureState>)>>,
    pub attempts: Vec<Vec<Instant>>,
    pub derived: Vec<Vec<Instant>>,
    pub unknown: Vec<Option<Instant>>,
    pub dormant: Vec<Option<Instant>>,
    pub probes_sent: usize,
    pub probes_refused: usize,
    pub sessions_lost: usize,
    pub failed: BTreeMap<String, usize>,
}

impl FleetState {
    fn new(n: usize) -> Self {
        Self {
            attested: vec![None; n],
            attested_enabled: vec![false; n],
            live: vec![false; n],
            updates: vec![Vec::new(); n],
            attempts: vec![Vec::new(); n],
            derived: vec![Vec::new(); n],
            unknown: vec![None; n],
            dormant: vec![None; n],
            ..Self::default()
        }
    }

    fn take(&mut self, r: Report) {
        match r {
            Report::Attempt { id, at } => self.attempts[id].push(at),
            Report::Attested { id, at, enabled } => {
                self.attested[id] = Some(at);
                self.attested_enabled[id] = enabled;
                self.live[id] = true;
            }
            Report::Update { id, at, state } => self.updates[id].push((at, state)),
            Report::Derived { id, at, .. } => self.derived[id].push(at),
            Report::Probe { sent, .. } => {
                if sent {
                    self.probes_sent += 1;
                } else {
                    self.probes_refused += 1;
                }
            }
            Report::Unknown { id, at } => self.unknown[id] = Some(at),
            Report::Ended {
                id,
                established,
                stopped,
                detail,
                ..
            } => {
                self.live[id] = false;
                if stopped {
                } else if established {
                    self.sessions_lost += 1;
                } else {
                    let cause = detail.split(" (").next().unwrap_or(&detail).to_owned();
                    *self.failed.entry(cause).or_default() += 1;
                }
            }
            Report::Dormant { id, at } => self.dormant[id] = Some(at),
        }
    }

    pub fn holding(&self) -> usize {
        self.live.iter().filter(|l| **l).count()
    }

    pub fn attested_count(&self) -> usize {
        self.attested.iter().filter(|a| a.is_some()).count()
    }

    /// Whether guest `id` was last told the feature is enabled: by its
    /// last `feature-update`, or else by the map it attested with.
    pub fn told_enabled(&self, id: usize) -> bool {
        self.updates[id]
            .last()
            .map_or(self.attested_enabled[id], |(_, st)| {
                *st == Some(FeatureState::Enabled)
            })
    }

    /// Guest `id`'s first update at or after `since` with `state`.
    pub fn update_since(&self, id: usize, since: Instant, state: FeatureState) -> Option<Instant> {
        self.updates[id]
            .iter()
            .find(|(t, s)| *t >= since && *s == Some(state))
            .map(|(t, _)| *t)
    }
}

/// A command the collector runs once enough guests have attested.
#[derive(Debug)]
pub(in crate::drill) struct Trigger {
    pub(super) attested: usize,
    pub(super) command: std::process::Command,
    pub(super) done:
        tokio::sync::oneshot::Sender<(Instant, Instant, usize, anyhow::Result<String>)>,
}

/// A running drill: sandbox, hosts, sampler, guests.
#[derive(Debug)]
pub struct Drill {
    pub sandbox: Sandbox,
    pub start: Instant,
    samples: Arc<Mutex<Samples>>,
    state: Arc<Mutex<FleetState>>,
    stop_sampler: watch::Sender<bool>,
    fleet: Option<Fleet>,
    log_marks: Vec<u64>,
}

impl Drill {
    /// The drill most scenarios run: `nodes` hosts, `total` guests spread
    /// over the rings ([`ring_guests`]), health published every
    /// [`HEALTH_INTERVAL_MS`], the etcd `args` names (or the sandbox's
    /// own); with its timeline from the start.
    pub(super) async fn for_scenario(
        args: &DrillArgs,
        nodes: usize,
        total: usize,
    ) -> anyhow::Result<(Self, Timeline)> {
        let drill = Self::start(Spec {
            nodes,
            ring_guests: ring_guests(total),
            feature: FEATURE,
            health_interval_ms: Some(HEALTH_INTERVAL_MS),
            external_etcd: args.etcd.clone(),
        })
        .await?;
        let tl = Timeline::new(drill.start);
        Ok((drill, tl))
    }

    /// The feature enabled in every ring (a signed stage document),
    /// noted on `tl`.
    pub(super) async fn stage_all(&self, tl: &mut Timeline) -> anyhow::Result<()> {
        self.cli(self.sandbox.set_stage_command("all")).await?;
        tl.event(
            tl.now(),
            "stage all",
            format!("{} enabled in every ring (signed)", FEATURE.name()),
        );
        Ok(())
    }

    /// Makes the sandbox, starts its hosts and the metrics sampler.
    pub(in crate::drill) async fn start(spec: Spec) -> anyhow::Result<Self> {
        let guests: usize = spec.ring_guests.iter().sum();
        ensure_fd_limit(2 * guests as u64 + FD_HEADROOM)?;
        let mut sandbox = tokio::task::spawn_blocking(move || -> anyhow::Result<Sandbox> {
            let mut sb = Sandbox::create(&spec)?;
            sb.start_hosts()?;
            Ok(sb)
        })
        .await??;
        let start = Instant::now();
        let samples = Arc::new(Mutex::new(Samples::default()));
        let (stop_sampler, stop_rx) = watch::channel(false);
        let sockets: Vec<PathBuf> = sandbox.nodes.iter().map(|n| n.metrics.clone()).collect();
        tokio::spawn(sample_hosts(sockets, start, samples.clone(), stop_rx));
        let n = sandbox.vms.len();
        let marks = (0..sandbox.nodes.len())
            .map(|i| sandbox.host_log_since(i, 0).1)
            .collect();
        // Nothing of the set-up is kept in the timeline's t = 0.
        let _ = &mut sandbox;
        Ok(Self {
            sandbox,
            start,
            samples,
            state: Arc::new(Mutex::new(FleetState::new(n))),
            stop_sampler,
            fleet: None,
            log_marks: marks,
        })
    }

    /// Starts the guests with `plans`. With `trigger`, the collector runs
    /// its command the moment `attested` guests have attested (in report
    /// order, not at the next poll: a storm keeps this thread busy) and
    /// sends when it started and returned, and what it said.
    pub(in crate::drill) fn start_fleet(
        &mut self,
        plans: &[GuestPlan],
        trigger: Option<Trigger>,
    ) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.fleet = Some(Fleet::start(&self.sandbox, plans, tx)?);
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut trigger = trigger;
            while let Some(r) = rx.recv().await {
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                s.take(r);
                if trigger
                    .as_ref()
                    .is_some_and(|t| s.attested_count() >= t.attested)
                    && let Some(t) = trigger.take()
                {
                    let at = s.attested_count();
                    drop(s);
                    tokio::task::spawn_blocking(move || {
                        let start = Instant::now();
                        let said = output_ok(t.command);
                        let _ = t.done.send((start, Instant::now(), at, said));
                    });
                }
            }
        });
        Ok(())
    }

    /// Waits until `done` holds on the guests' reports, at most `limit`.
    pub(in crate::drill) async fn wait(
        &self,
        limit: Duration,
        done: impl Fn(&FleetState) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.state.lock().unwrap_or_else(PoisonError::into_inner)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub(in crate::drill) fn with_state<T>(&self, f: impl FnOnce(&FleetState) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(in crate::drill) fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests of the drill's feature the hosts counted after `from`:
    /// from the first sample at or after it to the last sample (`None`
    /// when there is no such sample).
    pub(super) fn feature_requests_since(&self, from: Instant) -> Option<u64> {
        let s = self.samples();
        let at = s.first_after(self.t(from), |_| true)?;
        let end = s.last()?;
        Some(
            Sample::total(&end.feature_requests)
                .saturating_sub(Sample::total(&at.feature_requests)),
        )
    }

    pub(in crate::drill) fn t(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    /// Marks the hosts' logs: [`Drill::log_lines_since_mark`] counts from here.
    pub(super) fn mark_logs(&mut self) {
        self.log_marks = (0..self.sandbox.nodes.len())
            .map(|i| self.sandbox.host_log_since(i, 0).1)
            .collect();
    }

    /// Per host: log lines since the mark that match `pred`.
    pub(super) fn log_lines_since_mark(&self, pred: impl Fn(&str) -> bool) -> Vec<Vec<String>> {
        (0..self.sandbox.nodes.len())
            .map(|i| {
                self.sandbox
                    .host_log_since(i, self.log_marks[i])
                    .0
                    .into_iter()
                    .filter(|l| pred(l))
                    .collect()
            })
            .collect()
    }

    /// Runs a CLI step (`vkx-host rollout ...`) on the blocking pool, so
    /// the guests keep running meanwhile; its stdout.
    pub(in crate::drill) async fn cli(&self, cmd: std::process::Command) -> anyhow::Result<String> {
        tokio::task::spawn_blocking(move || output_ok(cmd)).await?
    }

    /// Stops the guests (goodbye) and the sampler, after one last sample.
    pub(in crate::drill) async fn finish(&mut self) {
        if let Some(f) = self.fleet.take() {
            f.stop(STOP_LIMIT).await;
        }
        tokio::time::sleep(SAMPLE_INTERVAL * 2).await;
        let _ = self.stop_sampler.send(true);
    }
}

/// Samples every host's metrics each [`SAMPLE_INTERVAL`] until `stop`.
async fn sample_hosts(
    sockets: Vec<PathBuf>,
    start: Instant,
    samples: Arc<Mutex<Samples>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let mut s = Sample {
            t: start.elapsed().as_secs_f64(),
            ..Sample::default()
        };
        for socket in &sockets {
            if let Ok(Ok(text)) =
                tokio::time::timeout(SAMPLE_INTERVAL * 4, crate::metrics::fetch(socket)).await
            {
                s.add(&text, FEATURE.name());
            }
        }
        samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(s);
    }
}

/// Ring quotas: canary, 1 %, 10 %, 50 %, all.
pub(in crate::drill) fn ring_guests(total: usize) -> [usize; 5] {
    let canary = (total / 24).max(2);
    let one = total / 8;
    let ten = total / 5;
    let fifty = total * 3 / 10;
    [canary, one, ten, fifty, total - canary - one - ten - fifty]
}

/// Fails the drill, with what the guests said, unless every guest attested.
pub(in crate::drill) fn ensure_attached(
    attached: bool,
    drill: &Drill,
    total: usize,
) -> anyhow::Result<()> {
    if !attached {
        let (n, failed) = drill.with_state(|s| (s.attested_count(), s.failed.clone()));
        bail!("only {n}/{total} guests attested within {ATTACH_LIMIT:?}: {failed:?}");
    }
    Ok(())
}

/// The SLOs every scenario with a kill shares: no request of the killed
/// feature after the guests were told (the hosts' count and the guests'
/// own derivations), no probe, at most one log line per host.
#[allow(clippy::cast_precision_loss)]
pub(super) fn quiet_after_kill(
    tl: &mut Timeline,
    requests: Option<u64>,
    probes: u64,
    most_lines: u64,
) {
    tl.slo(
        "requests of the killed feature after the update",
        requests.map(|r| r as f64),
        REQUESTS_AFTER_KILL,
        "requests",
    );
    tl.slo(
        "probes sent by guests after the update",
        Some(probes as f64),
        0.0,
        "requests",
    );
    tl.slo(
        "host log lines about the rollout after the kill",
        Some(most_lines as f64),
        LOG_LINES_PER_HOST,
        "lines/host",
    );
}
