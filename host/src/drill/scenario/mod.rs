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
//!   all with the plan of [`walk::drill_plan`] (2-s bakes reduced, a sample of
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
//! (the controller's run: [`walk::RUN_LIMIT`]).
//!
//! One scenario per file (`kill_under_load.rs`; `walk.rs`: `clean` and
//! `seed-incident`; `etcd_loss.rs`; `live.rs`: the live drill rehearsed),
//! the harness they share in `harness.rs` ([`Drill`], [`FleetState`]).

mod etcd_loss;
mod harness;
mod kill_under_load;
mod live;
mod walk;

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;

pub use self::etcd_loss::{
    HOSTS_REVISION_CHANGED, LOCAL_KILL_TO_LAST_UPDATE, SESSIONS_LOST, STAGES_DURING_OUTAGE,
};
pub(super) use self::harness::ensure_attached;
pub use self::harness::{Drill, FleetState};
pub use self::walk::{BAD_GUEST_RETRIES, FAULT_TO_HALT_BEYOND_BAKE};
use super::DrillArgs;
use super::picture;
use super::sandbox::Sandbox;
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
        ScenarioName::KillUnderLoad => rt.block_on(kill_under_load::kill_under_load(args))?,
        ScenarioName::Clean => rt.block_on(walk::clean(args))?,
        ScenarioName::SeedIncident => rt.block_on(walk::seed_incident(args))?,
        ScenarioName::EtcdLoss => rt.block_on(etcd_loss::etcd_loss(args))?,
        ScenarioName::Live => rt.block_on(live::live(args))?,
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
