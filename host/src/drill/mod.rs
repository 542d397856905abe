//! `vkx-host drill`: a whole rollout rehearsed on one machine, in a
//! sandbox of its own, with a printed timeline, a verdict against the
//! scenario's SLOs and an SVG picture (issue #12, item 3).
//!
//! ```sh
//! vkx-host drill --scenario clean|seed-incident|etcd-loss|kill-under-load \
//!     [--size reduced|full] [--out DIR] [--etcd URL] [--keep]
//! ```
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

pub mod fleet;
pub mod picture;
pub mod sandbox;
pub mod scenario;
pub mod softtpm;
pub mod timeline;

use std::io::Write;
use std::path::PathBuf;

pub use scenario::{ScenarioName, Size};

/// `vkx-host drill`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    /// The scenario to rehearse.
    #[arg(long, value_enum)]
    pub scenario: ScenarioName,
    /// `reduced` (a few hosts, tens of guests, short bakes) or `full`.
    #[arg(long, value_enum, default_value = "reduced")]
    pub size: Size,
    /// Where the picture (`drill-<scenario>.svg`) is written.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
    /// Use this etcd (below `/vkx-drill/<sandbox id>`) instead of starting
    /// one on loopback.
    #[arg(long, value_name = "URL")]
    pub etcd: Option<String>,
    /// Keep the sandbox's files (hosts' logs, configs) for a post-mortem.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the drill; prints the timeline and the verdict to `out`. `Ok(true)`
/// when every SLO is met.
pub fn run(args: &DrillArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    scenario::run(args, out)
}
