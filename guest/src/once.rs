//! `vkx-guest once`: one attestation, for scripts and systemd units (e.g.
//! before an encrypted disk is opened). One [`Agent::attempt`] whose
//! handler ends the session with `goodbye` as soon as it is attested.
//!
//! It makes exactly one attempt: retrying with backoff is the daemon's job
//! (`run`, with the retry policy), or systemd's, guided by the exit code:
//! 0 attested (and every configured key delivered), 2 permanent failure
//! (do not retry), 3 retryable failure, 4 attested but a configured key
//! was refused or could not be installed.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use vkx_common::errors::RetryClass;
use vkx_common::retry::Failure;
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{Guest, GuestEvent};

use vkx_common::wire::KeyName;

use crate::agent::{Agent, Handler, Reaction};
use crate::config::Config;
use crate::deliver::Deliver;

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
}

/// One attestation attempt.
pub async fn once(config: Config) -> Outcome {
    let agent = match Agent::new(&config) {
        Ok(a) => a,
        Err(e) => return Outcome::Permanent(format!("{e:#}")),
    };
    let (dir, derived_dir) = match crate::deliver::open_dirs(&config) {
        Ok(d) => d,
        Err(e) => return Outcome::Permanent(format!("{e:#}")),
    };
    let mut handler = Once {
        attested: None,
        deliver: Deliver::new(
            &config.keys,
            dir.as_ref(),
            &config.derive,
            derived_dir.as_ref(),
        ),
    };
    let (_keep, mut stop) = watch::channel(false);
    let attempt = agent.attempt(&mut handler, &mut stop).await;
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
            return Outcome::KeysMissing(what.join("; "));
        }
        return Outcome::Attested {
            session_id,
            reattest_after,
            keys: d.installed,
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
