//! `vkx-guest once`: one attestation, for scripts and systemd units (e.g.
//! before an encrypted disk is opened). One [`Agent::attempt`] whose
//! handler ends the session with `goodbye` as soon as it is attested.
//!
//! It makes exactly one attempt: retrying with backoff is the daemon's job
//! (`run`, with the retry policy), or systemd's, guided by the exit code:
//! 0 attested, 2 permanent failure (do not retry), 3 retryable failure.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use vkx_common::errors::RetryClass;
use vkx_common::retry::Failure;
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{Guest, GuestEvent};

use crate::agent::{Agent, Handler, Reaction};
use crate::config::Config;

/// How one attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Attested {
        session_id: [u8; 16],
        reattest_after: Duration,
    },
    /// Not worth retrying automatically (class P, unknown code, TLS pin
    /// or ALPN refusal, local misconfiguration).
    Permanent(String),
    /// Worth retrying later (transport, timeouts, busy, ...).
    Retryable(String),
}

impl Outcome {
    /// The process exit code: 0 attested, 2 permanent, 3 retryable.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Attested { .. } => 0,
            Self::Permanent(_) => 2,
            Self::Retryable(_) => 3,
        }
    }
}

#[derive(Debug, Default)]
struct Once {
    attested: Option<([u8; 16], Duration)>,
}

impl Handler for Once {
    fn on_event(&mut self, ev: GuestEvent, _guest: &mut Guest, _now: Instant) -> Reaction {
        match ev {
            GuestEvent::Attested {
                session_id,
                reattest_after,
                ..
            } => {
                self.attested = Some((session_id, reattest_after));
                Reaction {
                    finish: true,
                    ..Reaction::default()
                }
            }
            _ => Reaction::default(),
        }
    }
}

/// One attestation attempt.
pub async fn once(config: Config) -> Outcome {
    let agent = match Agent::new(&config) {
        Ok(a) => a,
        Err(e) => return Outcome::Permanent(format!("{e:#}")),
    };
    let mut handler = Once::default();
    let (_keep, mut stop) = watch::channel(false);
    let attempt = agent.attempt(&mut handler, &mut stop).await;
    if let Some((session_id, reattest_after)) = handler.attested {
        return Outcome::Attested {
            session_id,
            reattest_after,
        };
    }
    let permanent = match attempt.close {
        CloseReason::Failed(Failure::Permanent) => true,
        CloseReason::Failed(Failure::Code { code, .. }) => code.class() == RetryClass::Permanent,
        CloseReason::Failed(Failure::Transport) | CloseReason::Orderly { .. } => false,
    };
    if permanent {
        Outcome::Permanent(attempt.detail)
    } else {
        Outcome::Retryable(attempt.detail)
    }
}
