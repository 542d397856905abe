//! The daemon's decisions, without I/O: when to wake, whether an attempt
//! may start, and what to log and record when it ends.
//!
//! The daemon (`vkx-guest run`) is a thin async driver around a
//! [`Supervisor`]: it sleeps until [`Supervisor::next_wake`], asks
//! [`Supervisor::start_attempt`], runs one [`crate::agent::Agent`] attempt,
//! and hands the result to [`Supervisor::attempt_ended`], which answers
//! with the line to log (a [`LogLine`]: call site and text) and the status
//! change. The driver writes that line through the rate-limited macro of
//! the line's [`LogSite`], one macro invocation (so one
//! [`vkx_common::ratelimit::CallSite`]) per site.
//!
//! Nothing here sleeps, reads a clock or touches a socket: time is passed
//! in. That is what lets the fault-injection suite (`tests/tests/chaos_ab.rs`)
//! run the daemon's real decisions for hours of virtual time, and count
//! the attempts and the log lines an outage costs.
//!
//! The pacing itself is [`RetryPolicy`]'s (PROTOCOL.md §13); this type adds
//! what the daemon does around it: one log line per attempt that ends, one
//! per refusal of a spent budget, and nothing while it waits.

use std::time::Instant;

use vkx_common::retry::{Next, RetryConfig, RetryPolicy};
use vkx_common::session::CloseReason;

use crate::agent::Attempt;
use crate::status::State;

/// The daemon's log call sites on its retry path. Each is one
/// rate-limited macro invocation in the daemon's driver, so each has its
/// own token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogSite {
    /// The policy refused an attempt: the budget of the window is spent.
    BudgetSpent,
    /// An attested session ended in order (goodbye, re-attestation).
    SessionEnded,
    /// An attempt ended and the policy is dormant: only re-probes follow.
    Dormant,
    /// An attempt failed; the next one follows a backoff or `retry-after`.
    Retrying,
}

impl LogSite {
    /// Every site, for harnesses that keep one limiter per site.
    pub const ALL: [Self; 4] = [
        Self::BudgetSpent,
        Self::SessionEnded,
        Self::Dormant,
        Self::Retrying,
    ];

    /// The level the daemon logs this site at.
    pub const fn level(self) -> tracing::Level {
        match self {
            Self::SessionEnded => tracing::Level::INFO,
            Self::BudgetSpent | Self::Dormant | Self::Retrying => tracing::Level::WARN,
        }
    }
}

/// One line the daemon writes (if its call site's limiter admits it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub site: LogSite,
    /// The text: the agent's own words, never bytes from the host.
    pub message: String,
}

impl LogLine {
    pub const fn level(&self) -> tracing::Level {
        self.site.level()
    }
}

/// The daemon waits before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Not before this instant.
    pub until: Instant,
    /// What the status file says meanwhile: backing off or dormant.
    pub state: State,
}

/// The answer to [`Supervisor::start_attempt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Make the attempt now; the policy recorded it.
    Go,
    /// Too early (the driver woke before its time): wait until then.
    NotYet(Instant),
    /// The budget is spent: the policy went dormant. Log the line, then
    /// wait for the re-probe.
    BudgetSpent(LogLine),
}

/// What follows an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// When the next attempt may start.
    pub next: Next,
    /// The line to log.
    pub log: LogLine,
    /// For the status file: failures since the last success.
    pub consecutive_failures: u32,
    /// For the status file: the failure, if the attempt failed (kept
    /// until the next success).
    pub error: Option<String>,
}

/// The daemon's retry state and decisions.
#[derive(Debug, Clone)]
pub struct Supervisor {
    policy: RetryPolicy,
}

impl Supervisor {
    /// `seed` feeds the jitter: from the OS in the daemon, a constant in
    /// tests.
    pub fn new(config: RetryConfig, seed: u64) -> Self {
        Self {
            policy: RetryPolicy::new(config, seed),
        }
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// `None` if an attempt may start at `now`; else how long to wait and
    /// what to report meanwhile.
    pub fn next_wake(&self, now: Instant) -> Option<Wait> {
        let next = self.policy.next_attempt(now);
        if next.instant() <= now {
            return None;
        }
        let state = if self.policy.is_dormant() {
            State::Dormant
        } else {
            State::BackingOff
        };
        Some(Wait {
            until: next.instant(),
            state,
        })
    }

    /// Asks to start an attempt at `now`.
    pub fn start_attempt(&mut self, now: Instant) -> Start {
        let next = self.policy.next_attempt(now).instant();
        if next > now {
            return Start::NotYet(next);
        }
        if self.policy.attempt(now) {
            return Start::Go;
        }
        // Allowed by time but refused: the budget of the window is spent,
        // and the policy went dormant.
        let config = self.policy.config();
        Start::BudgetSpent(LogLine {
            site: LogSite::BudgetSpent,
            message: format!(
                "retry budget spent: {} attempts in {} s; dormant",
                config.budget,
                config.window.as_secs()
            ),
        })
    }

    /// The attempt that [`Supervisor::start_attempt`] allowed ended at
    /// `now`, as `attempt` says.
    pub fn attempt_ended(&mut self, attempt: &Attempt, now: Instant) -> Ended {
        if attempt.established {
            self.policy.succeeded();
        }
        let next = match &attempt.close {
            CloseReason::Orderly { retry_after } => self.policy.closed(now, *retry_after),
            // The host vanished under an attested session: every guest of
            // the node may be seeing the same; spread the return (§13.2).
            CloseReason::Failed(f) if attempt.established => self.policy.lost(now, *f),
            CloseReason::Failed(f) => self.policy.failed(now, *f),
        };
        let wait = next.instant().saturating_duration_since(now);
        let log = match (&attempt.close, next) {
            (CloseReason::Orderly { .. }, _) if attempt.established => LogLine {
                site: LogSite::SessionEnded,
                message: format!(
                    "session ended ({}); next attempt in {} ms",
                    attempt.detail,
                    wait.as_millis()
                ),
            },
            (_, Next::Dormant(_)) => LogLine {
                site: LogSite::Dormant,
                message: format!(
                    "{}; dormant: next re-probe in {} s",
                    attempt.detail,
                    wait.as_secs()
                ),
            },
            _ => LogLine {
                site: LogSite::Retrying,
                message: format!(
                    "{}; retrying in {} ms (failure {} in a row)",
                    attempt.detail,
                    wait.as_millis(),
                    self.policy.consecutive_failures()
                ),
            },
        };
        Ended {
            next,
            log,
            consecutive_failures: self.policy.consecutive_failures(),
            error: attempt.failure().map(|_| attempt.detail.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tracing::Level;
    use vkx_common::errors::ErrorCode;
    use vkx_common::retry::Failure;

    use super::*;

    fn failed(failure: Failure, detail: &str) -> Attempt {
        Attempt {
            established: false,
            close: CloseReason::Failed(failure),
            detail: detail.into(),
        }
    }

    #[test]
    fn a_transport_failure_backs_off_and_says_so() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(RetryConfig::default(), 1);
        assert_eq!(s.next_wake(t0), None);
        assert_eq!(s.start_attempt(t0), Start::Go);
        let e = s.attempt_ended(&failed(Failure::Transport, "connect: refused"), t0);
        assert_eq!(e.log.site, LogSite::Retrying);
        assert!(e.log.message.starts_with("connect: refused; retrying in "));
        assert_eq!(e.consecutive_failures, 1);
        assert_eq!(e.error.as_deref(), Some("connect: refused"));
        let w = s.next_wake(t0).unwrap();
        assert_eq!(w.state, State::BackingOff);
        assert_eq!(w.until, e.next.instant());
        // Waking early changes nothing and logs nothing.
        assert_eq!(s.start_attempt(t0), Start::NotYet(w.until));
        assert_eq!(s.start_attempt(w.until), Start::Go);
    }

    #[test]
    fn a_permanent_answer_goes_dormant_until_the_reprobe() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(RetryConfig::default(), 2);
        assert_eq!(s.start_attempt(t0), Start::Go);
        let e = s.attempt_ended(
            &failed(
                Failure::Code {
                    code: ErrorCode::UnknownMessage,
                    retry_after: None,
                },
                "the host answered unknown-message",
            ),
            t0,
        );
        assert_eq!(e.log.site, LogSite::Dormant);
        assert_eq!(e.log.level(), Level::WARN);
        let w = s.next_wake(t0).unwrap();
        assert_eq!(w.state, State::Dormant);
        assert!(w.until >= t0 + s.policy().config().reprobe_interval);
    }

    #[test]
    fn an_orderly_end_after_a_session_is_info_and_clears_the_error() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(RetryConfig::default(), 3);
        assert_eq!(s.start_attempt(t0), Start::Go);
        let e = s.attempt_ended(
            &Attempt {
                established: true,
                close: CloseReason::Orderly {
                    retry_after: Some(Duration::from_secs(2)),
                },
                detail: "session closed".into(),
            },
            t0,
        );
        assert_eq!(e.log.site, LogSite::SessionEnded);
        assert_eq!(e.log.level(), Level::INFO);
        assert!(
            e.log.message.contains("next attempt in 2"),
            "{}",
            e.log.message
        );
        assert_eq!(e.error, None);
        assert_eq!(e.consecutive_failures, 0);
    }

    #[test]
    fn a_lost_session_reconnects_within_the_spread() {
        let t0 = Instant::now();
        let lost = Attempt {
            established: true,
            close: CloseReason::Failed(Failure::Transport),
            detail: "connection lost".into(),
        };
        let ended = |seed| {
            let mut s = Supervisor::new(RetryConfig::default(), seed);
            assert_eq!(s.start_attempt(t0), Start::Go);
            s.attempt_ended(&lost, t0)
        };
        let e = ended(5);
        assert_eq!(e.log.site, LogSite::Retrying);
        assert_eq!(e.consecutive_failures, 1);
        let wait = e.next.instant() - t0;
        assert!(
            wait <= vkx_common::retry::RECONNECT_SPREAD && wait >= Duration::from_millis(100),
            "{wait:?}"
        );
        // Not the ordinary first backoff (U[0, 2 s]) for some seed.
        assert!((0..64).any(|seed| ended(seed).next.instant() - t0 > Duration::from_secs(2)));
    }

    #[test]
    fn a_new_vm_generation_reattests_at_once_and_a_storm_of_them_is_bounded() {
        // Each change ends the held session in order (goodbye(reattest),
        // no retry-after): the next attempt may start at once, with no
        // failure counted ...
        let t0 = Instant::now();
        let config = RetryConfig::default();
        let mut s = Supervisor::new(config, 6);
        let ended_by_change = Attempt {
            established: true,
            close: CloseReason::Orderly { retry_after: None },
            detail: "the VM generation changed: attesting again".into(),
        };
        assert_eq!(s.start_attempt(t0), Start::Go);
        let e = s.attempt_ended(&ended_by_change, t0);
        assert_eq!(e.next.instant(), t0);
        assert_eq!(e.log.site, LogSite::SessionEnded);
        assert_eq!(
            e.log.message,
            "session ended (the VM generation changed: attesting again); next attempt in 0 ms"
        );
        assert_eq!(e.consecutive_failures, 0);
        assert_eq!(s.next_wake(t0), None);
        // ... but a VM restored over and over (or a forged uevent in a
        // loop) costs at most the retry budget of attempts per window, then
        // one re-probe per reprobe interval.
        let mut t = t0;
        let mut attempts = 1;
        for _ in 0..10 * config.budget {
            t += Duration::from_millis(100);
            if let Some(w) = s.next_wake(t) {
                assert_eq!(w.state, State::Dormant);
                assert!(w.until >= t + config.reprobe_interval - Duration::from_secs(1));
                break;
            }
            match s.start_attempt(t) {
                Start::Go => {
                    attempts += 1;
                    s.attempt_ended(&ended_by_change, t);
                }
                Start::BudgetSpent(l) => assert_eq!(l.site, LogSite::BudgetSpent),
                Start::NotYet(_) => unreachable!(),
            }
        }
        assert_eq!(attempts, config.budget);
        assert!(s.policy().is_dormant());
    }

    #[test]
    fn a_spent_budget_ends_in_dormancy_with_one_line_per_attempt() {
        let t0 = Instant::now();
        let config = RetryConfig {
            budget: 2,
            ..RetryConfig::default()
        };
        let mut s = Supervisor::new(config, 4);
        // Orderly ends ask for no backoff, so only the budget holds the
        // guest back.
        let orderly = Attempt {
            established: false,
            close: CloseReason::Orderly { retry_after: None },
            detail: "done".into(),
        };
        let mut t = t0;
        let mut lines = Vec::new();
        let mut attempts = 0;
        for _ in 0..10 {
            if let Some(w) = s.next_wake(t) {
                assert_eq!(w.state, State::Dormant);
                break;
            }
            match s.start_attempt(t) {
                Start::Go => {
                    attempts += 1;
                    lines.push(s.attempt_ended(&orderly, t).log.site);
                }
                Start::BudgetSpent(l) => lines.push(l.site),
                Start::NotYet(_) => unreachable!(),
            }
            t += Duration::from_millis(1);
        }
        assert!(s.policy().is_dormant());
        assert_eq!(attempts, 2);
        assert_eq!(lines, [LogSite::Retrying, LogSite::Dormant]);
    }
}
