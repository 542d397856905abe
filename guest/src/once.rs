//! `vkx-guest once`: one attestation, for scripts and systemd units (e.g.
//! before an encrypted disk is opened). One [`Agent::attempt`] whose
//! handler ends the session with `goodbye` as soon as it is attested.
//!
//! By default it makes exactly one attempt. With `--retry-for SECONDS`
//! ([`once_retrying`], for boot) it retries retryable failures within that
//! time, paced by the daemon's own retry policy, never systemd's fixed
//! restart delay. The exit code:
//! 0 attested (and every configured key delivered), 2 permanent failure
//! (do not retry), 3 retryable failure, 4 attested but a configured key
//! was refused or could not be installed. A key or derivation whose feature
//! the host has off is such a refusal: the text names the code
//! (`feature-disabled` or `feature-not-enabled`), the feature and its state
//! (`once` does not wait for the feature to come back).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use vkx_common::errors::RetryClass;
use vkx_common::retry::Failure;
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{Guest, GuestEvent};

use vkx_common::wire::KeyName;

use crate::agent::{Agent, Attempt, Handler, Reaction};
use crate::config::Config;
use crate::deliver::Deliver;
use crate::keys::KeyDir;
use crate::status::State;
use crate::supervisor::{Start, Supervisor};

/// How one attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Attested {
        session_id: [u8; 16],
        reattest_after: Duration,
        /// Keys delivered: name, version.
        keys: Vec<(KeyName, u32)>,
    },
    /// Attested, but some configured key was refused or not installed.
    KeysMissing(String),
    /// Not worth retrying automatically (class P, unknown code, TLS pin
    /// or ALPN refusal, local misconfiguration).
    Permanent(String),
    /// Worth retrying later (transport, timeouts, busy, ...).
    Retryable(String),
}

impl Outcome {
    /// The process exit code: 0 attested (and every configured key
    /// delivered), 2 permanent, 3 retryable, 4 attested but a key missing.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Attested { .. } => 0,
            Self::KeysMissing(_) => 4,
            Self::Permanent(_) => 2,
            Self::Retryable(_) => 3,
        }
    }
}

#[derive(Debug)]
struct Once<'a> {
    attested: Option<([u8; 16], Duration)>,
    deliver: Deliver<'a>,
}

impl Handler for Once<'_> {
    fn on_event(&mut self, ev: GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        if let GuestEvent::Attested {
            session_id,
            reattest_after,
            ..
        } = &ev
        {
            self.attested = Some((*session_id, *reattest_after));
        }
        let mut r = self.deliver.on_event(&ev, guest, now);
        // Done once attested and the keys are in (or refused).
        r.finish = self.attested.is_some() && self.deliver.complete();
        r
    }

    fn on_derived(&mut self, purpose: &vkx_common::wire::Purpose, key: &[u8]) {
        self.deliver.on_derived(purpose, key);
    }

    fn on_derive_failed(&mut self, purpose: &vkx_common::wire::Purpose, why: &str) {
        self.deliver.on_derive_failed(purpose, why);
    }

    fn on_derive_not_sent(
        &mut self,
        purpose: &vkx_common::wire::Purpose,
        length: u8,
        why: vkx_common::session::guest::RequestRefused,
    ) {
        self.deliver.on_derive_not_sent(purpose, length, why);
    }
}

/// One attestation attempt.
pub async fn once(config: Config) -> Outcome {
    let (agent, dirs) = match prepare(&config) {
        Ok(p) => p,
        Err(o) => return o,
    };
    let (_keep, mut stop) = watch::channel(false);
    one(&agent, &config, &dirs, &mut stop).await.0
}

/// Longest `--retry-for`: a day.
pub const MAX_RETRY_FOR: Duration = Duration::from_secs(24 * 3600);

/// `once --retry-for D`, for boot (a disk to unlock while the host may be
/// restarting): attempts until one attests, a failure is permanent or a
/// key is refused, or the next attempt would start more than `retry_for`
/// after the first. The pacing is the daemon's own, [`Supervisor`] with
/// the configured [`vkx_common::retry::RetryConfig`]: full-jitter backoff,
/// `retry-after` honoured, the attempt budget, and no attempt at all once
/// the policy is dormant; each failed attempt writes one line through the
/// daemon's rate-limited call sites. `stop` (SIGTERM) ends the wait.
/// Returns the last outcome and the number of attempts.
pub async fn once_retrying(
    config: Config,
    retry_for: Duration,
    mut stop: watch::Receiver<bool>,
) -> (Outcome, u32) {
    let (agent, dirs) = match prepare(&config) {
        Ok(p) => p,
        Err(o) => return (o, 0),
    };
    let mut seed = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).is_err() {
        return (
            Outcome::Permanent("no randomness for the retry jitter".into()),
            0,
        );
    }
    let mut sup = Supervisor::new(config.retry, u64::from_le_bytes(seed));
    let deadline = Instant::now() + retry_for.min(MAX_RETRY_FOR);
    let mut attempts = 0;
    let mut last = Outcome::Retryable("no attempt made".into());
    // Bounded: each pass waits for the policy, makes one attempt (at most
    // the budget's worth in all) or returns; a wait that would end past
    // the deadline, or dormancy, returns.
    loop {
        if let Some(wait) = sup.next_wake(Instant::now()) {
            if wait.state == State::Dormant || wait.until > deadline {
                let why = match &last {
                    Outcome::Retryable(w) => w.clone(),
                    other => format!("{other:?}"),
                };
                let because = if wait.state == State::Dormant {
                    "the retry policy went dormant"
                } else {
                    "the next attempt would fall after --retry-for"
                };
                return (
                    Outcome::Retryable(format!(
                        "{why}; gave up after {attempts} attempt(s): {because}"
                    )),
                    attempts,
                );
            }
            tokio::select! {
                _ = stop.changed() => return (last, attempts),
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(wait.until)) => {}
            }
        }
        match sup.start_attempt(Instant::now()) {
            Start::Go => {}
            Start::NotYet(_) => continue,
            Start::BudgetSpent(line) => {
                crate::daemon::log(&line);
                continue;
            }
        }
        attempts += 1;
        let (outcome, attempt) = one(&agent, &config, &dirs, &mut stop).await;
        match outcome {
            Outcome::Retryable(_) if !*stop.borrow() => {
                let ended = sup.attempt_ended(&attempt, Instant::now());
                crate::daemon::log(&ended.log);
                last = outcome;
            }
            done => return (done, attempts),
        }
    }
}

type Dirs = (Option<KeyDir>, Option<KeyDir>);

fn prepare(config: &Config) -> Result<(Agent, Dirs), Outcome> {
    let agent = Agent::new(config).map_err(|e| Outcome::Permanent(format!("{e:#}")))?;
    let dirs =
        crate::deliver::open_dirs(config).map_err(|e| Outcome::Permanent(format!("{e:#}")))?;
    Ok((agent, dirs))
}

/// One attempt, its outcome and how it ended (for the retry policy).
async fn one(
    agent: &Agent,
    config: &Config,
    (dir, derived_dir): &Dirs,
    stop: &mut watch::Receiver<bool>,
) -> (Outcome, Attempt) {
    let mut handler = Once {
        attested: None,
        deliver: Deliver::new(
            &config.keys,
            dir.as_ref(),
            &config.derive,
            derived_dir.as_ref(),
        ),
    };
    let attempt = agent.attempt(&mut handler, stop).await;
    if let Some((session_id, reattest_after)) = handler.attested {
        let d = handler.deliver;
        if !d.failed.is_empty()
            || d.installed.len() < config.keys.len()
            || d.derived.len() < config.derive.len()
        {
            let what: Vec<String> = d
                .failed
                .iter()
                .map(|(k, why)| format!("{k}: {why}"))
                .collect();
            return (Outcome::KeysMissing(what.join("; ")), attempt);
        }
        return (
            Outcome::Attested {
                session_id,
                reattest_after,
                keys: d.installed,
            },
            attempt,
        );
    }
    let permanent = match attempt.close {
        CloseReason::Failed(Failure::Permanent) => true,
        CloseReason::Failed(Failure::Code { code, .. }) => code.class() == RetryClass::Permanent,
        CloseReason::Failed(Failure::Transport) | CloseReason::Orderly { .. } => false,
    };
    let outcome = if permanent {
        Outcome::Permanent(attempt.detail.clone())
    } else {
        Outcome::Retryable(attempt.detail.clone())
    };
    (outcome, attempt)
}
