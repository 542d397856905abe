//! The drills' scenarios, their sizes and SLOs, and the harness they share
//! ([`Drill`]: sandbox, hosts, metrics sampler, synthetic guests, their
//! reports).
//!
//! - `kill-under-load`: the feature is enabled everywhere; every guest
//!   connects at once (a connect storm of 1,024 at full size) and at the
//!   storm's peak (half of them attested) the operator's kill is written
//!   to the store (`vkx-host rollout kill`, unsigned). SLOs: the last guest
//!   that held the feature told within [`KILL_TO_LAST_UPDATE`] of the
//!   command's return, no request of the killed feature afterwards (host
//!   metrics and the guests' own probes), at most one host log line about
//!   the rollout per host, and every guest attested in the end.
//!
//! - `clean`: the feature at stage `none`, every guest (good builds)
//!   attested; then the rollout controller (`crate::rollout_run::run`,
//!   what `vkx-host rollout run` runs) walks canary, 1pct, 10pct, 50pct,
//!   all with the plan of [`drill_plan`] (2-s bakes reduced, a sample of
//!   one request, ceilings of 0 on errors, lost sessions and refused
//!   attestations). A guest asks for its derivation up to 10 s after the
//!   feature turns on (the session's re-enable jitter), so a small ring's
//!   first bake is often inconclusive and extended. SLOs: completed, no
//!   error sent, no session lost, every guest holding the feature.
//! - `seed-incident`: the same walk, with the ring after the canary
//!   (1pct) running the bad build ([`Build::Bad`]: one frame of an unknown
//!   type once the feature is on). The hosts answer `unknown-message`,
//!   the bad guests go dormant, the gate fails and the controller halts
//!   with its unsigned kill. SLOs: first unknown-message error in the
//!   hosts' metrics → kill written within the bake + [`FAULT_TO_HALT_BEYOND_BAKE`];
//!   kill → last live guest told within [`KILL_TO_LAST_UPDATE`]; no request
//!   or probe of the feature afterwards; at most one host log line about
//!   the rollout per host from the failing verdict on; no attempt by a bad
//!   guest after its unknown message, every bad guest dormant, every good
//!   guest attested and live; the run halted.
//! - `etcd-loss`: the walk of `clean` (reduced: 3 hosts, 96 guests), with
//!   the controller's lock lease at its shortest (2 s). Once 1pct's stage
//!   is set and every canary/1pct guest holds the feature, the sandbox's
//!   etcd is killed. The hosts hold their last-known-good (source down,
//!   revision unchanged, the feature still on); `rollout kill --local` on
//!   node 0 reaches its guests from the override file alone, then
//!   `unkill --local` undoes it; the controller, meanwhile, holds
//!   (`StoreLost`: no write, no verdict). After at least
//!   `ETCD_LOSS_MIN_OUTAGE` (three lock TTLs) etcd is restarted on its data,
//!   the controller takes its lock again (the lease lapsed), checks its
//!   record, bakes 1pct anew (`StoreBack`) and completes. SLOs: no session
//!   lost; local kill → last guest of the node told within
//!   [`LOCAL_KILL_TO_LAST_UPDATE`]; [`STAGES_DURING_OUTAGE`] stages set and
//!   [`HOSTS_REVISION_CHANGED`] host revisions changed while the store
//!   was down; no canary/1pct guest of another node told off; completed
//!   after the store came back.
//!
//! The controller runs against the sandbox's store as node 0's host.toml
//! configures it (document key, etcd endpoints, health prefix: the
//! hosts' own), signs with the sandbox's key, and takes its lock and
//! progress record below the sandbox's prefix.
//!
//! What it trusts and bounds: see [`super`]; every phase has a limit
//! (the controller's run: [`RUN_LIMIT`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, watch};
use vkx_common::wire::FeatureState;

use super::DrillArgs;
use super::fleet::{Build, Fleet, GuestPlan, Report, Workload};
use super::picture;
use super::sandbox::{Sandbox, Spec, ensure_fd_limit, output_ok};
use super::timeline::{Sample, Samples, Timeline};
use crate::rollout::Feature;

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScenarioName {
    Clean,
    SeedIncident,
    EtcdLoss,
    KillUnderLoad,
    /// `drill --live` rehearsed in the sandbox: run as an operator runs
    /// it, and once killed mid-drill.
    Live,
}

impl ScenarioName {
    pub fn name(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::SeedIncident => "seed-incident",
            Self::EtcdLoss => "etcd-loss",
            Self::KillUnderLoad => "kill-under-load",
            Self::Live => "live",
        }
    }
}

/// A drill's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// 3 hosts, 96 guests, 2-s bakes (`make test`).
    Reduced,
    /// 4 hosts, 1,024 guests.
    Full,
}

/// The feature every drill rolls out: its requests are derivations, which
/// each guest makes when the feature becomes usable for it.
pub const FEATURE: Feature = Feature::KeyDerivation;
/// SLO: the kill's command returned (kill-under-load) or the
/// controller's kill written (seed-incident) → the last guest that held
/// the feature told (`feature-update`).
pub const KILL_TO_LAST_UPDATE: Duration = Duration::from_secs(1);
/// SLO: requests of the killed feature reaching the hosts after the last
/// guest was told.
pub const REQUESTS_AFTER_KILL: f64 = 0.0;
/// SLO: host log lines about the rollout after the kill, per host (the
/// accepted document; no line per guest).
pub const LOG_LINES_PER_HOST: f64 = 1.0;
/// How often the hosts' metrics are sampled.
pub(super) const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait for every guest to attest.
pub(super) const ATTACH_LIMIT: Duration = Duration::from_secs(300);
/// Longest wait for something that should follow within seconds.
pub(super) const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// Longest the guests get to say goodbye.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Open files beyond two per guest (hosts' listeners are theirs).
const FD_HEADROOM: u64 = 512;
pub(super) const POLL: Duration = Duration::from_millis(20);

/// Runs the scenario of `args`; prints to `out`; whether every SLO held.
pub fn run(args: &DrillArgs, scenario: ScenarioName, out: &mut dyn Write) -> anyhow::Result<bool> {
    // One thread for the guests and the sampler (a node's worth of guests
    // fits on one, as in chaos case g); CLI steps run on the blocking pool.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    let wall = Instant::now();
    let (mut timeline, mut drill) = match scenario {
        ScenarioName::KillUnderLoad => rt.block_on(kill_under_load(args))?,
        ScenarioName::Clean => rt.block_on(clean(args))?,
        ScenarioName::SeedIncident => rt.block_on(seed_incident(args))?,
        ScenarioName::EtcdLoss => rt.block_on(etcd_loss(args))?,
        ScenarioName::Live => rt.block_on(super::rehearse_live::live(args))?,
    };
    timeline.notes.push(format!(
        "wall time {:.1} s; {} hosts, {} guests",
        wall.elapsed().as_secs_f64(),
        drill.sandbox.nodes.len(),
        drill.sandbox.vms.len()
    ));
    std::fs::create_dir_all(&args.out)?;
    let svg = args.out.join(format!("drill-{}.svg", scenario.name()));
    let rings = drill.samples().rings(&Sandbox::ring_names());
    picture::draw(
        &svg,
        &format!(
            "vkx drill {}: requests and errors per ring",
            scenario.name()
        ),
        &drill.samples(),
        &rings,
        &timeline.events,
    )?;
    if args.keep {
        let root = drill.sandbox.keep();
        timeline
            .notes
            .push(format!("sandbox kept in {}", root.display()));
    }
    write!(out, "{}", timeline.render(scenario.name(), Some(&svg)))?;
    Ok(timeline.pass())
}

// ---------------------------------------------------------------- harness

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
pub(super) struct Trigger {
    attested: usize,
    command: std::process::Command,
    done: tokio::sync::oneshot::Sender<(Instant, Instant, usize, anyhow::Result<String>)>,
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
    /// Makes the sandbox, starts its hosts and the metrics sampler.
    pub(super) async fn start(spec: Spec) -> anyhow::Result<Self> {
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
    pub(super) fn start_fleet(
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
    pub(super) async fn wait(&self, limit: Duration, done: impl Fn(&FleetState) -> bool) -> bool {
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

    pub(super) fn with_state<T>(&self, f: impl FnOnce(&FleetState) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn t(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    /// Marks the hosts' logs: [`Drill::log_lines_since_mark`] counts from here.
    fn mark_logs(&mut self) {
        self.log_marks = (0..self.sandbox.nodes.len())
            .map(|i| self.sandbox.host_log_since(i, 0).1)
            .collect();
    }

    /// Per host: log lines since the mark that match `pred`.
    fn log_lines_since_mark(&self, pred: impl Fn(&str) -> bool) -> Vec<Vec<String>> {
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
    pub(super) async fn cli(&self, cmd: std::process::Command) -> anyhow::Result<String> {
        tokio::task::spawn_blocking(move || output_ok(cmd)).await?
    }

    /// Stops the guests (goodbye) and the sampler, after one last sample.
    pub(super) async fn finish(&mut self) {
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
pub(super) fn ring_guests(total: usize) -> [usize; 5] {
    let canary = (total / 24).max(2);
    let one = total / 8;
    let ten = total / 5;
    let fifty = total * 3 / 10;
    [canary, one, ten, fifty, total - canary - one - ten - fifty]
}

// ------------------------------------------------------- kill-under-load

async fn kill_under_load(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
    let (nodes, per_node) = match args.size {
        Size::Reduced => (2, 64),
        Size::Full => (4, 256),
    };
    let total = nodes * per_node;
    let mut drill = Drill::start(Spec {
        nodes,
        ring_guests: ring_guests(total),
        feature: FEATURE,
        health_interval_ms: Some(500),
        external_etcd: args.etcd.clone(),
    })
    .await?;
    let mut tl = Timeline::new(drill.start);
    // The feature on everywhere before the storm.
    drill.cli(drill.sandbox.set_stage_command("all")).await?;
    tl.event(
        tl.now(),
        "stage all",
        format!("{} enabled in every ring (signed)", FEATURE.name()),
    );
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
    let (req_at, req_end) = {
        let s = drill.samples();
        let at = s
            .first_after(drill.t(quiet_from), |_| true)
            .map(|x| Sample::total(&x.feature_requests));
        let end = s.last().map(|x| Sample::total(&x.feature_requests));
        (at, end)
    };
    let requests_after = match (req_at, req_end) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
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

// ------------------------------------------------- clean, seed-incident

/// SLO (seed-incident): the first unknown-message error in the hosts'
/// metrics → the controller's halting kill written, beyond the bake.
pub const FAULT_TO_HALT_BEYOND_BAKE: Duration = Duration::from_secs(2);
/// SLO (seed-incident): connection attempts of a bad-build guest after it
/// sent its unknown message (it must go dormant, not retry).
pub const BAD_GUEST_RETRIES: f64 = 0.0;
/// Longest a controller run may take (every bake of the plan, extended,
/// and then some).
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The controller's plan for the drills: every ring of the sandbox, a
/// short bake, a small sample (extended, not paused, while a small ring's
/// guests wait out their jitter), and ceilings that a single unexpected
/// error, lost session or refused attestation breaches.
fn drill_plan(size: Size) -> String {
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
    let signer = (key, super::sandbox::KEY_ID.to_owned());
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
async fn start_walk(
    args: &DrillArgs,
    bad_ring: Option<usize>,
    workload: Workload,
) -> anyhow::Result<(Timeline, Drill, Vec<Build>)> {
    let (nodes, per_node) = controller_size(args.size);
    let total = nodes * per_node;
    let mut drill = Drill::start(Spec {
        nodes,
        ring_guests: ring_guests(total),
        feature: FEATURE,
        health_interval_ms: Some(500),
        external_etcd: args.etcd.clone(),
    })
    .await?;
    let mut tl = Timeline::new(drill.start);
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

pub(super) fn ensure_attached(attached: bool, drill: &Drill, total: usize) -> anyhow::Result<()> {
    if !attached {
        let (n, failed) = drill.with_state(|s| (s.attested_count(), s.failed.clone()));
        bail!("only {n}/{total} guests attested within {ATTACH_LIMIT:?}: {failed:?}");
    }
    Ok(())
}

/// Errors sent by every host, summed, in the last sample.
fn errors_sent(drill: &Drill) -> Option<u64> {
    drill.samples().last().map(|s| Sample::total(&s.errors))
}

async fn clean(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
    let (mut tl, mut drill, _) = start_walk(args, None, Workload::OncePerEnable).await?;
    let total = drill.sandbox.vms.len();
    let errors_before = errors_sent(&drill);
    let (report, seen) = run_controller(&mut drill, args.size, &mut tl).await?;
    // Every guest told the feature is on (the last ring is everyone).
    let enabled = |s: &FleetState, i: usize| -> bool {
        s.updates[i]
            .last()
            .map_or(s.attested_enabled[i], |(_, st)| {
                *st == Some(FeatureState::Enabled)
            })
    };
    let all_on = drill
        .wait(SETTLE_LIMIT, |s| (0..total).all(|i| enabled(s, i)))
        .await;
    let (on, derived, last_on) = drill.with_state(|s| {
        let last = (0..total)
            .filter_map(|i| s.update_since(i, drill.start, FeatureState::Enabled))
            .max();
        (
            (0..total).filter(|i| enabled(s, *i)).count(),
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

async fn seed_incident(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
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
    let (req_at, req_end) = {
        let s = drill.samples();
        let at = s
            .first_after(drill.t(quiet_from), |_| true)
            .map(|x| Sample::total(&x.feature_requests));
        (at, s.last().map(|x| Sample::total(&x.feature_requests)))
    };
    let requests_after = match (req_at, req_end) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
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

// -------------------------------------------------------------- etcd-loss

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

async fn etcd_loss(args: &DrillArgs) -> anyhow::Result<(Timeline, Drill)> {
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
    let signer = (key, super::sandbox::KEY_ID.to_owned());
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
            let during: Vec<&super::timeline::Sample> =
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
    let enabled = |s: &FleetState, i: usize| -> bool {
        s.updates[i]
            .last()
            .map_or(s.attested_enabled[i], |(_, st)| {
                *st == Some(FeatureState::Enabled)
            })
    };
    let all_on = drill
        .wait(SETTLE_LIMIT, |s| (0..total).all(|i| enabled(s, i)))
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

/// The SLOs every scenario with a kill shares: no request of the killed
/// feature after the guests were told (the hosts' count and the guests'
/// own derivations), no probe, at most one log line per host.
#[allow(clippy::cast_precision_loss)]
fn quiet_after_kill(tl: &mut Timeline, requests: Option<u64>, probes: u64, most_lines: u64) {
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
