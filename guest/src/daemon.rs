//! `vkx-guest run`: the guest agent as a daemon. It keeps one attested
//! session with its host, re-attests when the session asks (the host's
//! `reattest-after`, or its `goodbye(reattest)`), and reconnects after any
//! loss, paced by [`RetryPolicy`] (PROTOCOL.md §13): full-jitter backoff,
//! at most `budget` attempts in any rolling window, `retry-after` honoured,
//! permanent failures and a spent budget lead to dormancy with one
//! re-probe per `reprobe_interval`.
//!
//! The loop is bounded by construction: every iteration either waits until
//! the policy's next allowed instant or makes one attempt the policy
//! recorded, and an attempt is bounded by the transport and session
//! deadlines. Every log line goes through the rate-limited macros, and the
//! status file (`vkx-guest status`) says what the daemon is doing.

use std::time::Instant;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;
use vkx_common::retry::{Next, RetryPolicy};
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_common::{rl_info, rl_warn};

use crate::agent::{Agent, Handler, Reaction};
use crate::config::Config;
use crate::deliver::Deliver;
use crate::status::{State, Status, StatusFile};

/// What the daemon does with its session: hold it, keep its keys
/// delivered and current.
#[derive(Debug)]
struct Hold<'a> {
    status: &'a mut StatusFile,
    deliver: Deliver<'a>,
}

fn report(status: &mut StatusFile, change: impl FnOnce(&mut Status)) {
    if let Err(e) = status.update(change) {
        rl_warn!(error = %e, "could not write the status file");
    }
}

impl Handler for Hold<'_> {
    fn on_event(&mut self, ev: GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        let r = self.deliver.on_event(&ev, guest, now);
        match ev {
            GuestEvent::Attested {
                session_id,
                reattest_after,
                ..
            } => {
                rl_info!(
                    session = %hex::encode(session_id),
                    reattest_after_s = reattest_after.as_secs(),
                    "attested"
                );
                let t = StatusFile::at(Instant::now());
                report(self.status, |s| {
                    s.state = State::Established;
                    s.sessions_established += 1;
                    s.last_success_unix = Some(t);
                    s.consecutive_failures = 0;
                    s.last_error = None;
                });
            }
            GuestEvent::Features(f) => {
                rl_info!(features = ?f, "the host changed the feature states");
            }
            _ => {}
        }
        r
    }

    fn on_derived(&mut self, purpose: &vkx_common::wire::Purpose, key: &[u8]) {
        self.deliver.on_derived(purpose, key);
    }

    fn on_derive_failed(&mut self, purpose: &vkx_common::wire::Purpose, why: &str) {
        self.deliver.on_derive_failed(purpose, why);
    }
}

/// Runs until `stop` turns true. Fails only on local misconfiguration.
pub async fn run(config: Config, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let agent = Agent::new(&config)?;
    std::fs::create_dir_all(&config.run_dir)
        .map_err(|e| anyhow::anyhow!("create {}: {e}", config.run_dir.display()))?;
    let mut seed = [0u8; 8];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| anyhow::anyhow!("no randomness for the retry jitter"))?;
    let mut policy = RetryPolicy::new(config.retry, u64::from_le_bytes(seed));
    let mut status = StatusFile::new(&config.run_dir);
    let (dir, derived_dir) = crate::deliver::open_dirs(&config)?;
    rl_info!(host = ?agent.host(), "vkx-guest running");
    while !*stop.borrow() {
        let now = Instant::now();
        let next = policy.next_attempt(now);
        if next.instant() > now {
            let state = if policy.is_dormant() {
                State::Dormant
            } else {
                State::BackingOff
            };
            let at = StatusFile::at(next.instant());
            report(&mut status, |s| {
                s.state = state;
                s.next_attempt_unix = Some(at);
            });
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next.instant())) => {}
            }
        }
        if !policy.attempt(Instant::now()) {
            // The budget is spent: the policy went dormant; the next
            // iteration waits for the re-probe.
            rl_warn!(
                "retry budget spent: {} attempts in {} s; dormant",
                policy.config().budget,
                policy.config().window.as_secs()
            );
            continue;
        }
        report(&mut status, |s| {
            s.state = State::Connecting;
            s.next_attempt_unix = None;
            s.attempts += 1;
        });
        let mut hold = Hold {
            status: &mut status,
            deliver: Deliver::new(
                &config.keys,
                dir.as_ref(),
                &config.derive,
                derived_dir.as_ref(),
            ),
        };
        let attempt = agent.attempt(&mut hold, &mut stop).await;
        if attempt.established {
            policy.succeeded();
        }
        let now = Instant::now();
        let next = match &attempt.close {
            CloseReason::Orderly { retry_after } => policy.closed(now, *retry_after),
            CloseReason::Failed(f) => policy.failed(now, *f),
        };
        let wait = next.instant().saturating_duration_since(now);
        match (&attempt.close, next) {
            (CloseReason::Orderly { .. }, _) if attempt.established => {
                rl_info!(
                    "session ended ({}); next attempt in {} ms",
                    attempt.detail,
                    wait.as_millis()
                );
            }
            (_, Next::Dormant(_)) => {
                rl_warn!(
                    "{}; dormant: next re-probe in {} s",
                    attempt.detail,
                    wait.as_secs()
                );
            }
            _ => {
                rl_warn!(
                    "{}; retrying in {} ms (failure {} in a row)",
                    attempt.detail,
                    wait.as_millis(),
                    policy.consecutive_failures()
                );
            }
        }
        let failures = policy.consecutive_failures();
        let error = attempt.failure().map(|_| attempt.detail.clone());
        report(&mut status, |s| {
            s.consecutive_failures = failures;
            if error.is_some() {
                s.last_error.clone_from(&error);
            }
        });
    }
    report(&mut status, |s| {
        s.state = State::Stopped;
        s.next_attempt_unix = None;
    });
    rl_info!("vkx-guest stopped");
    Ok(())
}
