//! `vkx-host drill`: a whole rollout rehearsed on one machine, in a
//! sandbox of its own, with a printed timeline, a verdict against the
//! scenario's SLOs and an SVG picture (issue #12, item 3).
//!
//! ```sh
//! vkx-host drill --scenario clean|seed-incident|etcd-loss|kill-under-load|live \
//!     [--size reduced|full] [--out DIR] [--etcd URL] [--keep]
//! vkx-host drill --live --feature F --ring R --config host.toml \
//!     [--ttl-s 10] [--max-duration-s 300] [--out DIR]
//! ```
//!
//! `--live` is the on-fleet variant ([`live`]): no sandbox; the real
//! store, hosts and guests, one feature narrowed for one ring by an
//! overlay that expires by itself.
//!
//! What it is: [`sandbox`] (temporary node directories, the sandbox's own
//! etcd or a given one below a drill prefix, several real `vkx-host serve`
//! processes), [`fleet`] (synthetic guests: the real guest agent, sessions
//! and retry policy, quoting with [`softtpm`]), [`scenario`] (what each
//! drill does and its SLOs), [`timeline`] (samples of the hosts' metrics,
//! events, verdict) and [`picture`] (plotters, SVG). The rollout is the
//! real one: documents are written by `vkx-host rollout ...` and admitted
//! by the hosts; nothing is re-implemented for the drill.
//!
//! What it trusts: this binary (it runs itself for every host and CLI
//! step), `etcd` on `PATH`, and a `--etcd` endpoint, written only below
//! `/vkx-drill/<sandbox id>`.
//!
//! What it bounds: the sandbox's size ([`sandbox::MAX_NODES`], one Unix
//! socket per VM), every wait (each scenario's phases have a limit), the
//! samples and events kept ([`timeline::MAX_SAMPLES`]). The soft vTPM is
//! confined to the sandbox: keys from a per-sandbox random seed, enrolled
//! only in the sandbox's own registries; the scenarios take no node
//! directory or registry argument.
//!
//! Its errors are `anyhow`, on purpose: the drill is an operator's
//! harness (~5,000 lines), and its failures (a process that would not
//! start, a wait past its limit, a CLI step that said no) end the drill
//! with one message for the operator; no caller matches on their cause,
//! so a typed error would only restate each message. The library modules
//! it drives (`rollout_run`, `rollout_node`, `source`, ...) keep their
//! typed errors, which it wraps with context.

pub mod fleet;
pub mod live;
pub mod picture;
pub mod sandbox;
pub mod scenario;
pub mod softtpm;
pub mod timeline;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

pub use scenario::{ScenarioName, Size};

/// `vkx-host drill`'s arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["scenario", "live"])))]
pub struct DrillArgs {
    /// The scenario to rehearse in a sandbox of its own.
    #[arg(long, value_enum)]
    pub scenario: Option<ScenarioName>,
    /// `reduced` (a few hosts, tens of guests, short bakes) or `full`.
    #[arg(long, value_enum, default_value = "reduced")]
    pub size: Size,
    /// Where the picture (`drill-<scenario>.svg`, `drill-<live id>.svg`)
    /// is written.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
    /// Use this etcd (below `/vkx-drill/<sandbox id>`) instead of starting
    /// one on loopback.
    #[arg(long, value_name = "URL", conflicts_with = "live")]
    pub etcd: Option<String>,
    /// Keep the sandbox's files (hosts' logs, configs) for a post-mortem.
    #[arg(long, conflicts_with = "live")]
    pub keep: bool,
    /// The on-fleet drill: narrow `--feature` for `--ring` through the
    /// store host.toml names (`--config`), with an expiring overlay;
    /// measure, restore, report (spec/ROLLOUT.md §14).
    #[arg(long, requires_all = ["feature", "ring", "config"])]
    pub live: bool,
    /// The feature a live drill narrows.
    #[arg(long, value_name = "FEATURE", requires = "live")]
    pub feature: Option<String>,
    /// The ring of the accepted document it narrows it for.
    #[arg(long, value_name = "RING", requires = "live")]
    pub ring: Option<String>,
    /// host.toml of a node of the fleet (its [rollout] store).
    #[arg(long, value_name = "FILE", requires = "live")]
    pub config: Option<PathBuf>,
    /// The overlay's lease (etcd) or renewal TTL (file): a drill that
    /// dies reverts within it.
    #[arg(long, default_value_t = live::DEFAULT_TTL_S, requires = "live")]
    pub ttl_s: u64,
    /// The overlay's hard end, enforced by every host on its own clock.
    #[arg(long, default_value_t = live::DEFAULT_MAX_DURATION_S, requires = "live")]
    pub max_duration_s: u64,
    /// SLO: overlay written -> every live session of the ring told.
    #[arg(long, default_value_t = live::DEFAULT_TOLD_BOUND_MS, requires = "live")]
    pub told_bound_ms: u64,
    /// SLO: overlay removed -> every node took it away.
    #[arg(long, default_value_t = live::DEFAULT_RESTORE_BOUND_MS, requires = "live")]
    pub restore_bound_ms: u64,
}

impl DrillArgs {
    /// The live drill's arguments, checked.
    fn live_args(&self) -> anyhow::Result<live::LiveArgs> {
        let name = self.feature.as_deref().unwrap_or_default();
        let feature = crate::rollout::Feature::from_name(name).ok_or_else(|| {
            anyhow::anyhow!("--feature {name:?}: one of key-release, key-derivation, key-rotation")
        })?;
        let ring = self.ring.clone().unwrap_or_default();
        crate::rollout::document::check_ring_name(&ring)
            .map_err(|e| anyhow::anyhow!("--ring {ring:?}: {e}"))?;
        Ok(live::LiveArgs {
            feature,
            ring,
            config: self.config.clone().unwrap_or_default(),
            ttl: Duration::from_secs(self.ttl_s),
            max_duration: Duration::from_secs(self.max_duration_s),
            told_bound: Duration::from_millis(self.told_bound_ms),
            restore_bound: Duration::from_millis(self.restore_bound_ms),
            out: self.out.clone(),
        })
    }
}

/// Runs the drill; prints the timeline and the verdict to `out`. `Ok(true)`
/// when every SLO is met.
pub fn run(args: &DrillArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    match args.scenario {
        Some(s) => scenario::run(args, s, out),
        None => live::run(&args.live_args()?, out),
    }
}
