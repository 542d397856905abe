//! `vkx-host rollout run`'s command: its arguments ([`RunArgs`]), the
//! run on a current-thread runtime stopped by Ctrl-C, the timeline as it
//! happens ([`timeline_line`]), the report (and `--report` JSON), the exit
//! code. Its errors are a [`RunCliError`]; the run's own end (halted,
//! paused, refused, ...) is an exit code, not an error.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::{
    DEFAULT_LOCK_TTL_S, EXIT_REFUSED, MAX_LOCK_TTL_S, MIN_LOCK_TTL_S, RunError, RunOptions,
    exit_code, run,
};
use crate::rollout::controller::{RunEvent, RunEventKind};
use crate::rollout::plan::Plan;
use crate::rollout_node::{ConfigArgs, KeyArgs, Node, RolloutCliError, signer};

/// Why `vkx-host rollout run` failed (exit 2); refusals are not errors
/// but [`EXIT_REFUSED`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunCliError {
    /// host.toml or the key could not be loaded.
    #[error(transparent)]
    Node(Box<RolloutCliError>),
    /// No signing key given.
    #[error("rollout run writes signed stages: pass --key and --key-id (a key host.toml trusts)")]
    NoSigner,
    /// `--lock-ttl-s` out of its bounds.
    #[error("--lock-ttl-s: {MIN_LOCK_TTL_S} to {MAX_LOCK_TTL_S}")]
    LockTtl,
    /// The runtime could not be started.
    #[error("start the runtime")]
    Runtime(#[source] std::io::Error),
    /// The run failed (not a refusal).
    #[error(transparent)]
    Run(#[from] RunError),
    /// `--report FILE` could not be written.
    #[error("write {}", path.display())]
    WriteReport {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The report could not be put as JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Writing the output failed.
    #[error(transparent)]
    Output(#[from] std::io::Error),
}

impl From<RolloutCliError> for RunCliError {
    fn from(e: RolloutCliError) -> Self {
        Self::Node(Box::new(e))
    }
}

/// `vkx-host rollout run`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The plan (spec/ROLLOUT.md §13.1).
    #[arg(long, value_name = "FILE")]
    pub plan: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The operator's signing key: each stage write is signed with it.
    #[command(flatten)]
    pub key: KeyArgs,
    /// Write the report and the timeline as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// The controller lock's lease (etcd), in seconds.
    #[arg(long, default_value_t = DEFAULT_LOCK_TTL_S)]
    pub lock_ttl_s: u64,
    /// Start again at the first ring when the saved progress is finished
    /// (completed, halted or paused).
    #[arg(long)]
    pub restart: bool,
}

/// Runs the command; the exit code. Refusals are printed to stderr and
/// give [`EXIT_REFUSED`]; other failures are errors (exit 2).
pub fn cli(args: RunArgs, out: &mut dyn std::io::Write) -> Result<u8, RunCliError> {
    let plan = match Plan::load(&args.plan) {
        Ok(p) => p,
        Err(e) => {
            writeln!(out, "refused: plan {}: {e}", args.plan.display())?;
            return Ok(EXIT_REFUSED);
        }
    };
    let node = Node::load(&args.config.config)?;
    let signer = signer(&args.key)?.ok_or(RunCliError::NoSigner)?;
    if !(MIN_LOCK_TTL_S..=MAX_LOCK_TTL_S).contains(&args.lock_ttl_s) {
        return Err(RunCliError::LockTtl);
    }
    let options = RunOptions {
        lock_ttl: Duration::from_secs(args.lock_ttl_s),
        restart: args.restart,
        ..RunOptions::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunCliError::Runtime)?;
    let (tx, mut rx) = mpsc::channel::<RunEvent>(64);
    let started = SystemTime::now();
    let result = rt.block_on(async {
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let runner = run(plan, &node.settings, signer, options, Some(tx), stop);
        tokio::pin!(runner);
        let mut events = Vec::new();
        // Print the timeline as it happens; the run ends when `runner` does.
        let result = loop {
            tokio::select! {
                r = &mut runner => break r,
                Some(e) = rx.recv() => {
                    let _ = writeln!(out, "{}", timeline_line(started, &e));
                    events.push(e);
                }
            }
        };
        while let Ok(e) = rx.try_recv() {
            let _ = writeln!(out, "{}", timeline_line(started, &e));
            events.push(e);
        }
        (result, events)
    });
    let (result, events) = result;
    match result {
        Ok(report) => {
            writeln!(out)?;
            write!(out, "{report}")?;
            if let Some(path) = &args.report {
                let json = serde_json::json!({ "report": report, "events": events });
                std::fs::write(path, serde_json::to_vec_pretty(&json)?).map_err(|source| {
                    RunCliError::WriteReport {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            Ok(exit_code(report.outcome))
        }
        Err(e) if e.is_refusal() => {
            writeln!(out, "refused: {e}")?;
            Ok(EXIT_REFUSED)
        }
        Err(e) => Err(e.into()),
    }
}

/// One line of the printed timeline.
pub fn timeline_line(started: SystemTime, e: &RunEvent) -> String {
    let t =
        e.at.duration_since(started)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
    let what = match &e.kind {
        RunEventKind::Started {
            feature,
            step,
            ring,
            resumed,
        } => format!(
            "{} rollout of {feature} at step {} ({})",
            if *resumed { "resumed" } else { "started" },
            step + 1,
            ring.as_deref().unwrap_or("-")
        ),
        RunEventKind::StageSet { ring, revision } => {
            format!("stage set to {ring} at revision {revision} (signed)")
        }
        RunEventKind::Observed { ring, evaluation } => format!(
            "{ring}: {} requests, {} sessions, {} errors so far",
            evaluation.figures.requests, evaluation.figures.sessions, evaluation.figures.errors
        ),
        RunEventKind::Verdict { ring, evaluation } => {
            format!("verdict for {ring}: {}", evaluation.verdict)
        }
        RunEventKind::Extended { ring, .. } => format!("bake of {ring} extended"),
        RunEventKind::Halted { ring, revision } => {
            format!("HALTED at {ring}: killed at revision {revision} (unsigned)")
        }
        RunEventKind::Paused { ring, reason } => format!("paused at {ring}: {reason}"),
        RunEventKind::Stopped { reason } => format!("stopped: {reason}"),
        RunEventKind::StoreLost { ring, reason } => {
            format!("store lost in the bake of {ring}: holding ({reason})")
        }
        RunEventKind::StoreBack { ring, down_ms } => format!(
            "store back after {:.1} s: resumed, the bake of {ring} starts again",
            *down_ms as f64 / 1000.0
        ),
        RunEventKind::Completed => "completed".to_owned(),
    };
    format!("t+{t:7.1}s  {what}")
}
