//! `vkx-host rollout run --plan PLAN.toml`: the driver of the rollout
//! controller (`crate::rollout::controller`, spec/ROLLOUT.md §13.3).
//!
//! What it is: a thin async shell. It takes the controller lock, loads the
//! saved progress, and then does what the controller asks: read the
//! document from the configured source, sign and write a stage or write
//! an unsigned kill (compare-and-swap on the version read, each write
//! checked against the admission rules first, as `rollout set-stage` and
//! `rollout kill` do), read every node's health summary, save the
//! progress, sleep. [`run`] is the library entry (the drill calls it with
//! an event channel); [`cli`] is the command.
//!
//! The lock and the progress record live in the store:
//! - etcd: the lock is the key `<dir>/controller/<feature>` (`<dir>`: the
//!   document key's parent), created only if absent, under a lease of
//!   `--lock-ttl-s` kept alive every third of it, so a crashed controller's
//!   lock expires by itself; the record is `<dir>/controller/<feature>/progress`
//!   (no lease: it outlives the controller), written only while the lock
//!   key is under this controller's lease and the record is at the
//!   revision this controller last wrote (one transaction).
//! - file: the lock is `<node_dir>/rollout/controller-<feature>.lock`,
//!   created exclusively and holding the owner's pid and process start
//!   time (a lock whose process is gone, or whose pid now names another
//!   process, is stale and taken over, under an advisory lock of a guard
//!   file so that two controllers cannot both take it); the record is
//!   `controller-<feature>.json` beside it, replaced atomically.
//!
//! What it trusts: host.toml, the plan, the operator's key. The document
//! and the health summaries are parsed strictly before use.
//!
//! An unreachable store (a read, a write or a save that fails, or the
//! lock's lease lapsing) is the controller's to decide on
//! (`Input::StoreFailed`): it holds, writing and deciding nothing, while
//! this driver retries with the shared retry policy (`vkx_common::retry`,
//! waits up to [`STORE_RETRY_CAP`]); when the store answers, the driver
//! takes the lock again if its lease lapsed (and no one else took it) and
//! checks that the progress record is still the one it saved, then the
//! controller reads the document again and bakes the ring anew. Past the
//! outage limit ([`RunOptions::store_outage_limit`]) the run ends paused
//! (exit 4), its record as last saved.
//!
//! What it bounds: consecutive malformed documents ([`MAX_STORE_FAILURES`]),
//! an outage of the store (the outage limit), the time of every etcd call
//! (the source's timeout), the sizes of what it reads (the source's and
//! the record's limits).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::health;
use crate::rollout::controller::{
    Action, Controller, Input, Outcome, Phase, Progress, ProgressError, Report, RunEvent,
    RunEventKind,
};
use crate::rollout::plan::Plan;
use crate::rollout::{Accepted, sign, unsigned};
use crate::rollout_node::{ConfigArgs, KeyArgs, Node, check, expected, signer};
use crate::rollout_service::Settings;
use crate::source::{self, SourceConfig, SourceError, SourceKind, Version};

/// Consecutive malformed documents before the run gives up (the progress
/// is saved; run again to resume). An unreachable store is waited out up
/// to the controller's outage limit instead.
pub const MAX_STORE_FAILURES: u32 = 30;
/// Longest wait between two calls to an unreachable store (the retry
/// policy's cap; its first waits are shorter).
pub const STORE_RETRY_CAP: Duration = Duration::from_secs(5);
/// Lock TTL: default and bounds (etcd grants at least 2 s; past 5 minutes
/// a crashed controller blocks its successor too long).
pub const DEFAULT_LOCK_TTL_S: u64 = 15;
pub const MIN_LOCK_TTL_S: u64 = 2;
pub const MAX_LOCK_TTL_S: u64 = 300;
/// Wait after a failed store call, at most (or the plan's poll, if
/// shorter).
const RETRY_WAIT: Duration = Duration::from_secs(1);

/// Exit codes of `vkx-host rollout run` (2 is any other error).
pub const EXIT_COMPLETED: u8 = 0;
pub const EXIT_HALTED: u8 = 3;
pub const EXIT_PAUSED: u8 = 4;
pub const EXIT_STOPPED: u8 = 5;
pub const EXIT_REFUSED: u8 = 6;

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

/// Options of [`run`].
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub lock_ttl: Duration,
    pub restart: bool,
    /// How long an outage of the store is waited out before the run
    /// pauses (the controller's `STORE_OUTAGE_LIMIT` by default).
    pub store_outage_limit: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            lock_ttl: Duration::from_secs(DEFAULT_LOCK_TTL_S),
            restart: false,
            store_outage_limit: crate::rollout::controller::STORE_OUTAGE_LIMIT,
        }
    }
}

/// Why a run did not get to a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Another controller holds the lock of this feature's rollout.
    #[error("another controller runs the rollout of {feature}: {holder}")]
    LockHeld { feature: String, holder: String },
    /// The saved progress does not fit this plan.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    /// The lock was taken by another controller (its lease having lapsed
    /// in an outage), or the progress record changed under this one:
    /// another controller may be running now, so this one stopped before
    /// writing anything.
    #[error("the controller lock was lost ({0}); stopped without writing")]
    LockLost(String),
    /// The store failed too often in a row.
    #[error("the store failed {MAX_STORE_FAILURES} times in a row: {0}")]
    Store(String),
    /// A setting the run cannot work with.
    #[error("{0}")]
    Config(String),
    /// Stopped by the caller (Ctrl-C); the progress is saved.
    #[error("interrupted; the progress is saved, run again to resume")]
    Interrupted,
}

impl RunError {
    /// Refusals (exit code [`EXIT_REFUSED`]): nothing was attempted.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::LockHeld { .. } | Self::Progress(_) | Self::Config(_)
        )
    }
}

/// The exit code of a report's outcome.
pub fn exit_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Completed => EXIT_COMPLETED,
        Outcome::Halted => EXIT_HALTED,
        Outcome::Paused => EXIT_PAUSED,
        Outcome::Stopped => EXIT_STOPPED,
        Outcome::Refused => EXIT_REFUSED,
    }
}

// ------------------------------------------------------------------- cli

/// Runs the command; the exit code. Refusals are printed to stderr and
/// give [`EXIT_REFUSED`]; other failures are errors (exit 2).
pub fn cli(args: RunArgs, out: &mut dyn std::io::Write) -> anyhow::Result<u8> {
    let plan = match Plan::load(&args.plan) {
        Ok(p) => p,
        Err(e) => {
            writeln!(out, "refused: plan {}: {e}", args.plan.display())?;
            return Ok(EXIT_REFUSED);
        }
    };
    let node = Node::load(&args.config.config)?;
    let signer = signer(&args.key)?.context(
        "rollout run writes signed stages: pass --key and --key-id (a key host.toml trusts)",
    )?;
    if !(MIN_LOCK_TTL_S..=MAX_LOCK_TTL_S).contains(&args.lock_ttl_s) {
        anyhow::bail!("--lock-ttl-s: {MIN_LOCK_TTL_S} to {MAX_LOCK_TTL_S}");
    }
    let options = RunOptions {
        lock_ttl: Duration::from_secs(args.lock_ttl_s),
        restart: args.restart,
        ..RunOptions::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
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
                std::fs::write(path, serde_json::to_vec_pretty(&json)?)
                    .with_context(|| format!("write {}", path.display()))?;
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

// ---------------------------------------------------------------- driver

/// Runs `plan` against the store of `settings` (see the module primer):
/// takes the lock, resumes or starts, and drives the controller to its
/// end. Timeline events go to `events` if given (a full channel delays
/// the run; a closed one is ignored). `stop` ends the run early (the
/// progress is kept; [`RunError::Interrupted`]).
pub async fn run(
    plan: Plan,
    settings: &Settings,
    signer: (ring::signature::Ed25519KeyPair, String),
    options: RunOptions,
    events: Option<mpsc::Sender<RunEvent>>,
    stop: impl Future<Output = ()>,
) -> Result<Report, RunError> {
    let source = settings.source.clone().ok_or_else(|| {
        RunError::Config("host.toml has no [rollout] table, so no source to run against".into())
    })?;
    let mut store =
        Store::acquire(&source, settings, plan.feature.name(), options.lock_ttl).await?;
    let result = drive(
        plan, settings, &source, &signer, options, &mut store, events, stop,
    )
    .await;
    store.release().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    plan: Plan,
    settings: &Settings,
    source: &SourceConfig,
    (pair, key_id): &(ring::signature::Ed25519KeyPair, String),
    options: RunOptions,
    store: &mut Store,
    events: Option<mpsc::Sender<RunEvent>>,
    stop: impl Future<Output = ()>,
) -> Result<Report, RunError> {
    let saved = store.load().await?;
    let finished = |p: &Progress| {
        matches!(
            p.phase,
            Phase::Done | Phase::Halted { .. } | Phase::Paused { .. }
        )
    };
    let saved = match saved {
        // A finished record of another plan, or any finished one with
        // --restart, gives way to a fresh run.
        Some(p) if finished(&p) && (options.restart || p.plan_digest != plan.digest) => None,
        other => other,
    };
    let poll = plan.poll;
    let mut controller =
        Controller::new(plan, saved)?.with_outage_limit(options.store_outage_limit);
    // Waits while the store is unreachable: the shared retry policy
    // (full jitter, capped at STORE_RETRY_CAP).
    let mut backoff = store_retry_policy();
    tokio::pin!(stop);
    let mut input = Input::Started;
    let mut failures = 0u32;
    // The document as last read (for the admission check of a write).
    let mut current: Option<Accepted> = None;
    // One iteration per controller action; every action is bounded (store
    // timeouts, sleeps the controller computed from the plan), and store
    // failures are counted.
    loop {
        let action = controller.step(SystemTime::now(), input);
        while let Some(e) = controller.poll_event() {
            if let Some(tx) = &events {
                let _ = tx.send(e).await;
            }
        }
        let retry = |failures: &mut u32, e: String| -> Result<Duration, RunError> {
            *failures += 1;
            if *failures >= MAX_STORE_FAILURES {
                return Err(RunError::Store(e));
            }
            vkx_common::rl_warn!(error = %e, "rollout run: the store failed; retrying");
            Ok(RETRY_WAIT.min(poll))
        };
        input = match action {
            Action::ReadDocument => match source::read(source).await {
                Ok(None) => {
                    failures = 0;
                    backoff.succeeded();
                    current = None;
                    Input::DocumentRead(None, Version::None)
                }
                Ok(Some((bytes, version))) => match Accepted::restore(bytes, &settings.trusted) {
                    Ok(a) => {
                        failures = 0;
                        backoff.succeeded();
                        let doc = a.document().clone();
                        current = Some(a);
                        Input::DocumentRead(Some(doc), version)
                    }
                    Err(e) => {
                        let wait = retry(&mut failures, format!("the document is malformed: {e}"))?;
                        pause(wait, &mut stop).await?;
                        Input::Tick
                    }
                },
                Err(e) => Input::StoreFailed(e.to_string()),
            },
            Action::WriteStage {
                document,
                expected: v,
                ..
            } => {
                if let Err(e) = store.check_alive() {
                    // Never write without the lock: take it again first.
                    input = Input::StoreFailed(e.to_string());
                    continue;
                }
                let bytes = sign(&document, pair, key_id)
                    .map_err(|e| RunError::Config(format!("signing: {e}")))?;
                if let Err(e) = check(&bytes, current.as_ref(), settings) {
                    return Err(RunError::Config(format!("{e:#}")));
                }
                write(source, store, &bytes, v, document.revision(), &mut failures).await?
            }
            Action::WriteKill {
                document,
                expected: v,
            } => {
                if let Err(e) = store.check_alive() {
                    input = Input::StoreFailed(e.to_string());
                    continue;
                }
                let bytes = unsigned(&document);
                write(source, store, &bytes, v, document.revision(), &mut failures).await?
            }
            Action::ReadHealth => match health::read_all(&settings.health.store).await {
                Ok(fleet) => Input::Health {
                    fleet: fleet.summaries,
                    refused: fleet.refused,
                },
                Err(e) => Input::HealthFailed(e),
            },
            Action::SaveProgress(p) => match store.save(&p).await {
                Ok(()) => Input::Saved,
                Err(RunError::Store(e)) => Input::StoreFailed(e),
                Err(RunError::LockLost(e)) => Input::StoreFailed(format!("lock lost: {e}")),
                Err(e) => return Err(e),
            },
            Action::Sleep(until) => {
                let wait = until
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                pause(wait, &mut stop).await?;
                match store.check_alive() {
                    Ok(()) => Input::Tick,
                    Err(e) => Input::StoreFailed(e.to_string()),
                }
            }
            Action::WaitForStore => {
                let now = std::time::Instant::now();
                let next = backoff.failed(now, vkx_common::retry::Failure::Transport);
                pause(next.instant().saturating_duration_since(now), &mut stop).await?;
                Input::Tick
            }
            Action::CheckStore(p) => match store.recheck(&p).await {
                Ok(()) => {
                    backoff.succeeded();
                    Input::StoreChecked
                }
                Err(RunError::Store(e)) => Input::StoreFailed(e),
                Err(e) => return Err(e),
            },
            Action::Finish(report) => return Ok(report),
        };
    }
}

/// The retry policy of an unreachable store: the shared one
/// (`vkx_common::retry`), with short waits (the outage limit bounds the
/// total) and a budget that the limit never spends.
fn store_retry_policy() -> vkx_common::retry::RetryPolicy {
    use vkx_common::retry::{MAX_RETRY_BUDGET, RetryConfig, RetryPolicy};
    let config = RetryConfig {
        base: Duration::from_millis(250),
        cap: STORE_RETRY_CAP,
        budget: MAX_RETRY_BUDGET,
        reprobe_interval: STORE_RETRY_CAP,
        reprobe_jitter: Duration::from_secs(1),
        reconnect_spread: STORE_RETRY_CAP,
        ..RetryConfig::default()
    };
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| {
            u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0)
        });
    RetryPolicy::new(config, seed ^ u64::from(std::process::id()))
}

/// Sleeps `wait`, unless stopped.
async fn pause(
    wait: Duration,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), RunError> {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = stop.as_mut() => return Err(RunError::Interrupted),
    }
    Ok(())
}

/// Writes a stage or a kill, fenced by the controller lock: on etcd the
/// write happens only while the lock key is under this controller's
/// lease (one transaction with the compare-and-swap).
async fn write(
    source: &SourceConfig,
    store: &mut Store,
    bytes: &[u8],
    version: Version,
    revision: u64,
    failures: &mut u32,
) -> Result<Input, RunError> {
    let fence = store.fence();
    match source::write_fenced(source, bytes, expected(version), fence.as_ref()).await {
        Ok(_) => {
            *failures = 0;
            Ok(Input::Written { revision })
        }
        Err(SourceError::Conflict { .. }) => Ok(Input::WriteConflict),
        // The lock lapsed under this controller: nothing was written; an
        // outage, after which the lock is taken again (if no one else
        // holds it) before anything else is written.
        Err(e @ SourceError::Fenced { .. }) => {
            store.mark_lost();
            Ok(Input::StoreFailed(e.to_string()))
        }
        // The write may or may not have landed: the controller re-reads
        // once the store answers, and recognises its own write.
        Err(e) => Ok(Input::StoreFailed(e.to_string())),
    }
}

// ----------------------------------------------------------------- store

/// The controller lock and the progress record (see the module primer).
enum Store {
    Etcd(Box<etcd::EtcdStore>),
    File(file::FileStore),
}

impl Store {
    async fn acquire(
        source: &SourceConfig,
        settings: &Settings,
        feature: &str,
        ttl: Duration,
    ) -> Result<Self, RunError> {
        match source.source {
            SourceKind::Etcd => Ok(Self::Etcd(Box::new(
                etcd::EtcdStore::acquire(&source.etcd, feature, ttl).await?,
            ))),
            SourceKind::File => Ok(Self::File(file::FileStore::acquire(
                &settings.state_dir,
                feature,
            )?)),
        }
    }

    async fn load(&mut self) -> Result<Option<Progress>, RunError> {
        match self {
            Self::Etcd(s) => s.load().await,
            Self::File(s) => s.load(),
        }
    }

    async fn save(&mut self, p: &Progress) -> Result<(), RunError> {
        match self {
            Self::Etcd(s) => s.save(p).await,
            Self::File(s) => s.save(p),
        }
    }

    /// After an outage: the lock is this controller's again (taken anew
    /// if its lease lapsed and no one else holds it) and the record is
    /// the one it last saved (or `expected`).
    async fn recheck(&mut self, expected: &Progress) -> Result<(), RunError> {
        match self {
            Self::Etcd(s) => s.recheck(expected).await,
            Self::File(s) => s.check_alive(),
        }
    }

    fn check_alive(&mut self) -> Result<(), RunError> {
        match self {
            Self::Etcd(s) => s.check_alive(),
            Self::File(s) => s.check_alive(),
        }
    }

    /// What a document write is fenced by (etcd: the lock key under this
    /// controller's lease).
    fn fence(&self) -> Option<source::Fence> {
        match self {
            Self::Etcd(s) => Some(s.fence()),
            Self::File(_) => None,
        }
    }

    /// A write found the lock no longer ours: take it again before
    /// anything else ([`Store::recheck`]).
    fn mark_lost(&mut self) {
        if let Self::Etcd(s) = self {
            s.mark_lost();
        }
    }

    async fn release(self) {
        match self {
            Self::Etcd(s) => s.release().await,
            Self::File(s) => s.release(),
        }
    }
}

/// Who holds a lock, for the refusal message.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!(
        "pid {} on {host}, started {}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    )
}

mod etcd {
    //! The etcd lock (a lease) and the record (a transaction).

    use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

    use crate::source::lease::{keep_alive, timed};

    use super::{Arc, AtomicBool, Duration, Ordering, Progress, RunError};
    use crate::rollout::controller::MAX_PROGRESS_BYTES;
    use crate::source::EtcdConfig;

    pub(super) struct EtcdStore {
        client: Client,
        timeout: Duration,
        ttl: Duration,
        lease: i64,
        lock_key: String,
        progress_key: String,
        /// The record's mod revision as last read or written (0: none).
        revision: i64,
        lost: Arc<AtomicBool>,
        keeper: tokio::task::JoinHandle<()>,
    }

    /// `<dir>/controller/<feature>`, `<dir>` the document key's parent.
    pub(super) fn lock_key(document_key: &str, feature: &str) -> String {
        let dir = document_key.rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/controller/{feature}")
    }

    impl EtcdStore {
        pub(super) async fn acquire(
            config: &EtcdConfig,
            feature: &str,
            ttl: Duration,
        ) -> Result<Self, RunError> {
            let t = config.timeout();
            let store = |e: String| RunError::Store(e);
            let mut client = timed(t, Client::connect(&config.endpoints, None))
                .await
                .map_err(store)?;
            let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
            let lease = timed(t, client.lease_grant(ttl_s, None))
                .await
                .map_err(store)?
                .id();
            let lock_key = lock_key(&config.key, feature);
            let progress_key = format!("{lock_key}/progress");
            let txn = Txn::new()
                .when([Compare::create_revision(
                    lock_key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    lock_key.as_str(),
                    super::holder(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(lock_key.as_str(), None)]);
            let resp = timed(t, client.txn(txn)).await.map_err(store)?;
            if !resp.succeeded() {
                let holder =
                    resp.op_responses()
                        .into_iter()
                        .find_map(|r| match r {
                            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                                crate::rollout::shown(&String::from_utf8_lossy(kv.value()))
                            }),
                            _ => None,
                        })
                        .unwrap_or_default();
                let _ = timed(t, client.lease_revoke(lease)).await;
                return Err(RunError::LockHeld {
                    feature: feature.to_owned(),
                    holder: format!("{holder} (etcd key {lock_key})"),
                });
            }
            let lost = Arc::new(AtomicBool::new(false));
            let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl, t, lost.clone()));
            Ok(Self {
                client,
                timeout: t,
                ttl,
                lease,
                lock_key,
                progress_key,
                revision: 0,
                lost,
                keeper,
            })
        }

        pub(super) async fn load(&mut self) -> Result<Option<Progress>, RunError> {
            let resp = timed(
                self.timeout,
                self.client.get(self.progress_key.as_str(), None),
            )
            .await
            .map_err(RunError::Store)?;
            let Some(kv) = resp.kvs().first() else {
                self.revision = 0;
                return Ok(None);
            };
            self.revision = kv.mod_revision();
            if kv.value().len() > MAX_PROGRESS_BYTES {
                return Err(crate::rollout::controller::ProgressError::TooLarge {
                    len: kv.value().len(),
                }
                .into());
            }
            Ok(Some(Progress::parse(kv.value())?))
        }

        pub(super) async fn save(&mut self, p: &Progress) -> Result<(), RunError> {
            self.check_alive()?;
            let txn = Txn::new()
                .when([
                    Compare::lease(self.lock_key.as_str(), CompareOp::Equal, self.lease),
                    Compare::mod_revision(
                        self.progress_key.as_str(),
                        CompareOp::Equal,
                        self.revision,
                    ),
                ])
                .and_then([TxnOp::put(self.progress_key.as_str(), p.to_json(), None)]);
            let resp = timed(self.timeout, self.client.txn(txn))
                .await
                .map_err(RunError::Store)?;
            if !resp.succeeded() {
                self.lost.store(true, Ordering::Relaxed);
                return Err(RunError::LockLost(
                    "the lock key or the progress record changed under this controller".into(),
                ));
            }
            self.revision = resp.header().map_or(self.revision, |h| h.revision());
            Ok(())
        }

        /// See `Store::recheck`.
        pub(super) async fn recheck(&mut self, expected: &Progress) -> Result<(), RunError> {
            let t = self.timeout;
            if self.lost.load(Ordering::Relaxed) {
                // The lease lapsed (or may have): give it up, and take the
                // lock under a new one if the key is gone or still ours.
                self.keeper.abort();
                let _ = timed(t, self.client.lease_revoke(self.lease)).await;
                let ttl_s = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
                let lease = timed(t, self.client.lease_grant(ttl_s, None))
                    .await
                    .map_err(RunError::Store)?
                    .id();
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        self.lock_key.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(
                        self.lock_key.as_str(),
                        super::holder(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(self.lock_key.as_str(), None)]);
                let resp = match timed(t, self.client.txn(txn)).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = timed(t, self.client.lease_revoke(lease)).await;
                        return Err(RunError::Store(e));
                    }
                };
                if !resp.succeeded() {
                    let _ = timed(t, self.client.lease_revoke(lease)).await;
                    return Err(RunError::LockLost(format!(
                        "the lease lapsed in the store's outage and etcd key {} is held by \
                         another controller now",
                        self.lock_key
                    )));
                }
                self.lease = lease;
                self.lost.store(false, Ordering::Relaxed);
                self.keeper = tokio::spawn(keep_alive(
                    self.client.clone(),
                    lease,
                    self.ttl,
                    t,
                    self.lost.clone(),
                ));
                vkx_common::rl_warn!(
                    key = %self.lock_key,
                    "rollout run: the controller lock lapsed in the store's outage; taken again"
                );
            }
            // The record: the revision this controller last wrote, or
            // (a save whose answer was lost) the progress it holds.
            let resp = timed(t, self.client.get(self.progress_key.as_str(), None))
                .await
                .map_err(RunError::Store)?;
            let (revision, found) = match resp.kvs().first() {
                Some(kv) => (kv.mod_revision(), Progress::parse(kv.value()).ok()),
                None => (0, None),
            };
            if revision == self.revision || found.as_ref() == Some(expected) {
                self.revision = revision;
                return Ok(());
            }
            self.lost.store(true, Ordering::Relaxed);
            Err(RunError::LockLost(
                "the progress record was changed by someone else during the store's outage".into(),
            ))
        }

        pub(super) fn fence(&self) -> crate::source::Fence {
            crate::source::Fence {
                key: self.lock_key.clone(),
                lease: self.lease,
            }
        }

        pub(super) fn mark_lost(&self) {
            self.lost.store(true, Ordering::Relaxed);
        }

        pub(super) fn check_alive(&self) -> Result<(), RunError> {
            if self.lost.load(Ordering::Relaxed) {
                return Err(RunError::LockLost(
                    "the lease could not be kept alive".into(),
                ));
            }
            Ok(())
        }

        pub(super) async fn release(mut self) {
            self.keeper.abort();
            let _ = timed(self.timeout, self.client.lease_revoke(self.lease)).await;
        }
    }
}

mod file {
    //! The file lock (O_EXCL, owner's pid and start time; a stale one is
    //! taken over under an advisory lock of a guard file) and the record
    //! (replaced atomically).

    use std::io::Write as _;
    use std::path::PathBuf;

    use super::{Path, Progress, RunError};
    use crate::rollout::controller::MAX_PROGRESS_BYTES;

    pub(super) struct FileStore {
        lock: PathBuf,
        record: PathBuf,
        token: String,
    }

    /// This process's start time in clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`): with the pid, it names one process for good.
    fn start_time(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses.
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(19)?.parse().ok()
    }

    /// Whether the lock file's owner still runs.
    fn alive(token: &str) -> bool {
        let mut parts = token.split_whitespace();
        let (Some(pid), Some(start)) = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            return false;
        };
        start_time(pid) == Some(start)
    }

    impl FileStore {
        pub(super) fn acquire(dir: &Path, feature: &str) -> Result<Self, RunError> {
            let io = |e: std::io::Error, p: &Path| RunError::Store(format!("{}: {e}", p.display()));
            std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
            let lock = dir.join(format!("controller-{feature}.lock"));
            let record = dir.join(format!("controller-{feature}.json"));
            let pid = std::process::id();
            let token = format!(
                "{pid} {} {}\n",
                start_time(pid).unwrap_or(0),
                super::holder()
            );
            // The check for a stale lock, its removal and the creation of
            // ours are one critical section under an advisory lock of a
            // guard file beside it: two controllers that both find the
            // same stale lock cannot both take it (the second then finds
            // the first's, alive). Held for a few file operations; the
            // kernel drops it if this process dies.
            let guard_path = dir.join(format!("controller-{feature}.lock.guard"));
            let guard = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&guard_path)
                .map_err(|e| io(e, &guard_path))?;
            guard.lock().map_err(|e| io(e, &guard_path))?;
            // Two tries: the second after removing a stale lock.
            for _ in 0..2 {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&lock)
                {
                    Ok(mut f) => {
                        f.write_all(token.as_bytes()).map_err(|e| io(e, &lock))?;
                        f.sync_all().map_err(|e| io(e, &lock))?;
                        return Ok(Self {
                            lock,
                            record,
                            token,
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let held = std::fs::read_to_string(&lock).unwrap_or_default();
                        if alive(&held) {
                            return Err(RunError::LockHeld {
                                feature: feature.to_owned(),
                                holder: format!(
                                    "{} ({})",
                                    crate::rollout::shown(held.trim()),
                                    lock.display()
                                ),
                            });
                        }
                        vkx_common::rl_warn!(
                            lock = %lock.display(),
                            held = %crate::rollout::shown(held.trim()),
                            "removing a stale controller lock"
                        );
                        std::fs::remove_file(&lock).map_err(|e| io(e, &lock))?;
                    }
                    Err(e) => return Err(io(e, &lock)),
                }
            }
            Err(RunError::LockHeld {
                feature: feature.to_owned(),
                holder: format!("taken again meanwhile ({})", lock.display()),
            })
        }

        pub(super) fn load(&self) -> Result<Option<Progress>, RunError> {
            use std::io::Read as _;
            let f = match std::fs::File::open(&self.record) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(RunError::Store(format!("{}: {e}", self.record.display())));
                }
            };
            let mut bytes = Vec::new();
            f.take(u64::try_from(MAX_PROGRESS_BYTES).unwrap_or(u64::MAX) + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| RunError::Store(format!("{}: {e}", self.record.display())))?;
            Ok(Some(Progress::parse(&bytes)?))
        }

        pub(super) fn save(&self, p: &Progress) -> Result<(), RunError> {
            self.check_alive()?;
            let io = |e: std::io::Error| RunError::Store(format!("{}: {e}", self.record.display()));
            let tmp = self.record.with_extension("json.tmp");
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&p.to_json()).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &self.record).map_err(io)?;
            if let Some(dir) = self.record.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
            }
            Ok(())
        }

        /// The lock file still holds this controller's token.
        pub(super) fn check_alive(&self) -> Result<(), RunError> {
            match std::fs::read_to_string(&self.lock) {
                Ok(t) if t == self.token => Ok(()),
                _ => Err(RunError::LockLost(format!(
                    "{} no longer names this process",
                    self.lock.display()
                ))),
            }
        }

        pub(super) fn release(self) {
            if self.check_alive().is_ok() {
                let _ = std::fs::remove_file(&self.lock);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]
        use super::*;

        #[test]
        fn controllers_racing_for_one_stale_lock_take_it_once() {
            for _ in 0..20 {
                let dir = tempfile::tempdir().unwrap();
                let lock = dir.path().join("controller-key-release.lock");
                std::fs::write(&lock, "999999999 1 gone\n").unwrap();
                let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
                let won: Vec<bool> = (0..8)
                    .map(|_| {
                        let (d, b) = (dir.path().to_path_buf(), barrier.clone());
                        std::thread::spawn(move || {
                            b.wait();
                            // Held (not released) until every thread is
                            // done, so a winner's lock stays alive.
                            FileStore::acquire(&d, "key-release")
                                .map(std::mem::forget)
                                .is_ok()
                        })
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|t| t.join().unwrap())
                    .collect();
                assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
            }
        }

        #[test]
        fn a_live_lock_refuses_a_stale_one_gives_way() {
            let dir = tempfile::tempdir().unwrap();
            let first = FileStore::acquire(dir.path(), "key-release").unwrap();
            assert!(matches!(
                FileStore::acquire(dir.path(), "key-release"),
                Err(RunError::LockHeld { .. })
            ));
            // Another feature has its own lock.
            let other = FileStore::acquire(dir.path(), "key-rotation").unwrap();
            other.release();
            first.release();
            assert!(!dir.path().join("controller-key-release.lock").exists());
            // A lock of a process that is gone (pid 0 never runs a
            // program; a wrong start time is a reused pid).
            let lock = dir.path().join("controller-key-release.lock");
            std::fs::write(&lock, "999999999 1 gone\n").unwrap();
            let me = std::process::id();
            let s = FileStore::acquire(dir.path(), "key-release").unwrap();
            s.release();
            std::fs::write(&lock, format!("{me} 1 reused pid\n")).unwrap();
            let s = FileStore::acquire(dir.path(), "key-release").unwrap();
            // The record round-trips.
            let plan = crate::rollout::plan::Plan::parse(
                b"format = 1\nfeature = \"key-release\"\nrings = [\"a\"]\nbake_s = 1\n\
                  [[gate]]\nmetric = \"errors\"\nmax = 1\n",
            )
            .unwrap();
            assert_eq!(s.load().unwrap(), None);
            let p = Progress::new(&plan);
            s.save(&p).unwrap();
            assert_eq!(s.load().unwrap(), Some(p));
            // Someone else's lock in its place: no more saves.
            std::fs::write(&lock, "1 1 someone\n").unwrap();
            assert!(matches!(
                s.save(&Progress::new(&plan)),
                Err(RunError::LockLost(_))
            ));
            s.release();
            assert!(lock.exists(), "never removes another's lock");
        }
    }
}

/// The etcd lock key of `feature`'s controller, for tools and tests.
pub fn etcd_lock_key(document_key: &str, feature: &str) -> String {
    etcd::lock_key(document_key, feature)
}

/// The file source's progress record of `feature`.
pub fn progress_file(state_dir: &Path, feature: &str) -> PathBuf {
    state_dir.join(format!("controller-{feature}.json"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::rollout::{Document, Envelope, TrustedKey};
    use crate::rollout_service::RolloutConfig;

    /// The whole driver over the file source: signed stage writes, the
    /// health file, the lock file and the progress record.
    #[test]
    fn a_rollout_through_the_file_source_completes_and_leaves_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let doc_file = dir.path().join("rollout.json");
        let node_dir = dir.path().join("node");
        let (pkcs8, public) = crate::rollout::keygen().unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let config = RolloutConfig {
            file: doc_file.clone(),
            node_name: Some("node-a".into()),
            trusted_key: vec![TrustedKey {
                id: "release".into(),
                public_key: public,
            }],
            ..RolloutConfig::default()
        };
        let settings = Settings::new(Some(&config), &node_dir).unwrap();
        let doc = Document::parse(
            br#"{"format":1,"revision":1,"issued_at":1,"rings":[
              {"name":"canary","vm_ids":["vm-1"]},{"name":"all","buckets_below":10000}],
              "features":{}}"#,
        )
        .unwrap();
        std::fs::write(&doc_file, sign(&doc, &pair, "release").unwrap()).unwrap();
        std::fs::create_dir_all(&settings.state_dir).unwrap();
        std::fs::write(
            settings.state_dir.join(health::HEALTH_FILE),
            br#"{"format":1,"node":"node-a","at_unix":1,"started_unix":1,"revision":1,
                 "rings":{},"suppressed":0}"#,
        )
        .unwrap();
        let plan = Plan::parse(
            b"format = 1\nfeature = \"key-rotation\"\nrings = [\"canary\", \"all\"]\n\
              bake_s = 1\npoll_ms = 500\n[[gate]]\nmetric = \"errors\"\nmax = 5\n",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let report = rt
            .block_on(run(
                plan,
                &settings,
                (pair, "release".into()),
                RunOptions::default(),
                Some(tx),
                std::future::pending(),
            ))
            .unwrap();
        assert_eq!(report.outcome, Outcome::Completed, "{report}");
        let mut kinds = Vec::new();
        while let Ok(e) = rx.try_recv() {
            kinds.push(serde_json::to_value(&e).unwrap()["event"].clone());
        }
        assert_eq!(kinds.first().unwrap(), "started");
        assert_eq!(kinds.last().unwrap(), "completed");
        let now = Envelope::parse(&std::fs::read(&doc_file).unwrap()).unwrap();
        assert_eq!(now.document.revision(), 3);
        assert_eq!(
            now.document
                .feature(crate::rollout::Feature::KeyRotation)
                .unwrap()
                .stage(),
            Some("all")
        );
        assert!(now.signature.is_some());
        let record = std::fs::read(progress_file(&settings.state_dir, "key-rotation")).unwrap();
        assert_eq!(Progress::parse(&record).unwrap().phase, Phase::Done);
        assert!(
            !settings
                .state_dir
                .join("controller-key-rotation.lock")
                .exists()
        );
    }
}
