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
//! an event channel); [`cli()`] is the command.
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
//!
//! Where: `cli.rs` the command, this file the driver, `store.rs` the lock
//! and record of either store, `etcd.rs` and `file.rs` the two stores.

mod cli;
mod etcd;
mod file;
mod store;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::health;
use crate::rollout::controller::{
    Action, Controller, Input, Outcome, Phase, Progress, ProgressError, Report, RunEvent,
};
use crate::rollout::plan::Plan;
use crate::rollout::{Accepted, sign, unsigned};
use crate::rollout_node::{check, expected};
use crate::rollout_service::Settings;
use crate::source::{self, SourceConfig, SourceError, Version};

pub use self::cli::{RunArgs, RunCliError, cli, timeline_line};
use self::store::Store;

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

/// The etcd lock key of `feature`'s controller, for tools and tests.
pub fn etcd_lock_key(document_key: &str, feature: &str) -> String {
    etcd::lock_key(document_key, feature)
}

/// The file source's progress record of `feature`.
pub fn progress_file(state_dir: &Path, feature: &str) -> PathBuf {
    state_dir.join(format!("controller-{feature}.json"))
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
