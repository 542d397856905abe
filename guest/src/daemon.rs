//! `vkx-guest run`: the guest agent as a daemon. It keeps one attested
//! session with its host, re-attests when the session asks (the host's
//! `reattest-after`, or its `goodbye(reattest)`), and reconnects after any
//! loss, paced by [`vkx_common::retry::RetryPolicy`] (PROTOCOL.md §13):
//! full-jitter backoff, at most `budget` attempts in any rolling window,
//! `retry-after` honoured, permanent failures and a spent budget lead to
//! dormancy with one re-probe per `reprobe_interval`.
//!
//! In a session, keys and derivations whose feature is off (or that the
//! host refused for its rollout state) are asked for again once the
//! feature becomes usable ([`GuestEvent::FeatureUsable`]: after the
//! re-enable delay of §12.3), exactly once per enablement, on the same
//! session ([`Deliver::resuming`]). While a feature is off nothing is sent
//! for it and nothing is logged per request: one line when the host
//! changes the feature states.
//!
//! The decisions (when to wake, whether to start, what to log and record
//! after an attempt) are [`Supervisor`]'s, without I/O, so they can be
//! tested in virtual time; this module is the async driver around it.
//!
//! A new VM generation (a snapshot restored, a clone: the kernel's
//! VM-fork record in its log, [`crate::vmgenid`]) ends the held session in
//! order (`goodbye(reattest)`, PROTOCOL.md §11.4) and the next attempt
//! follows at once, as after any orderly end: the retry budget bounds a
//! storm of changes, and changes that arrive while no session is held are
//! covered by the next attempt's quote anyway. Changes coalesce (a `watch`
//! channel): many before the daemon looks are one re-attestation.
//!
//! The loop is bounded by construction: every iteration either waits until
//! the policy's next allowed instant or makes one attempt the policy
//! recorded, and an attempt is bounded by the transport and session
//! deadlines. Every log line goes through the rate-limited macros (one
//! call site per [`LogSite`]), and the status file (`vkx-guest status`)
//! says what the daemon is doing.

use std::time::Instant;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;
use vkx_common::session::guest::{Guest, GuestEvent, RequestRefused, describe_features};
use vkx_common::{rl_info, rl_warn};

use crate::agent::{Agent, Handler, Reaction};
use crate::config::Config;
use crate::deliver::Deliver;
use crate::status::{State, Status, StatusFile};
use crate::supervisor::{LogLine, LogSite, Start, Supervisor};

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
                features,
            } => {
                rl_info!(
                    session = %hex::encode(session_id),
                    reattest_after_s = reattest_after.as_secs(),
                    features = %describe_features(&features),
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
                rl_info!(
                    features = %describe_features(&f),
                    "the host changed the feature states"
                );
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

    fn on_derive_not_sent(
        &mut self,
        purpose: &vkx_common::wire::Purpose,
        length: u8,
        why: RequestRefused,
    ) {
        self.deliver.on_derive_not_sent(purpose, length, why);
    }
}

/// Writes `line` through its call site's rate-limited macro: one macro
/// invocation, so one limiter, per [`LogSite`]. `once --retry-for` writes
/// its lines here too.
pub(crate) fn log(line: &LogLine) {
    let text = &line.message;
    match line.site {
        LogSite::BudgetSpent => rl_warn!("{text}"),
        LogSite::SessionEnded => rl_info!("{text}"),
        LogSite::Dormant => rl_warn!("{text}"),
        LogSite::Retrying => rl_warn!("{text}"),
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
    let mut supervisor = Supervisor::new(config.retry, u64::from_le_bytes(seed));
    let mut status = StatusFile::new(&config.run_dir);
    let (dir, derived_dir) = crate::deliver::open_dirs(&config)?;
    rl_info!(host = ?agent.host(), "vkx-guest running");
    // Closed bursts of suppressed log lines, reported (§13.8).
    let summaries = {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    () = tokio::time::sleep(vkx_common::ratelimit::SUMMARY_INTERVAL) => {}
                }
                vkx_common::ratelimit::log_summaries(Instant::now());
            }
        })
    };
    let _abort = AbortOnDrop(summaries);
    let (generation_tx, mut generation) = watch::channel(0u64);
    std::thread::Builder::new()
        .name("vkx-vmgenid".into())
        .spawn(move || watch_generation(generation_tx))
        .map_err(|e| anyhow::anyhow!("start the VM generation watch: {e}"))?;
    while !*stop.borrow() {
        if let Some(wait) = supervisor.next_wake(Instant::now()) {
            let at = StatusFile::at(wait.until);
            report(&mut status, |s| {
                s.state = wait.state;
                s.next_attempt_unix = Some(at);
            });
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wait.until)) => {}
            }
        }
        match supervisor.start_attempt(Instant::now()) {
            Start::Go => {}
            // Woke early: the next iteration waits again.
            Start::NotYet(_) => continue,
            // The policy went dormant; the next iteration waits for the
            // re-probe.
            Start::BudgetSpent(line) => {
                log(&line);
                continue;
            }
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
            )
            .resuming(),
        };
        let attempt = agent
            .attempt_watching(&mut hold, &mut stop, Some(&mut generation))
            .await;
        let ended = supervisor.attempt_ended(&attempt, Instant::now());
        log(&ended.log);
        report(&mut status, |s| {
            s.consecutive_failures = ended.consecutive_failures;
            if ended.error.is_some() {
                s.last_error.clone_from(&ended.error);
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

/// Feeds VM generation changes into `tx` (a counter: the daemon sees the
/// latest, so changes coalesce), on a thread of its own (it waits on the
/// kernel log device), until the daemon drops the receiver or the watch
/// fails. Where the kernel log cannot be read (no `CAP_SYSLOG`, a sandbox)
/// the daemon runs on without it, and says so once.
fn watch_generation(tx: watch::Sender<u64>) {
    let mut w = match crate::vmgenid::Watch::open() {
        Ok(w) => w,
        Err(e) => {
            rl_warn!(error = %e, "VM generation changes are not watched: the kernel log cannot be read");
            return;
        }
    };
    rl_info!("watching the kernel log for VM generation changes");
    // Each turn waits at most RECEIVE_TIMEOUT and reads at most
    // MAX_RECORDS_PER_RECEIVE records, so the thread ends soon after
    // the daemon is gone.
    while !tx.is_closed() {
        match w.receive() {
            Ok(None) => {}
            Ok(Some(signal)) => {
                let why = match signal {
                    crate::vmgenid::Signal::Changed => "the VM generation changed",
                    crate::vmgenid::Signal::Overflow => {
                        "kernel log records were overwritten unread: the VM generation may have \
                         changed"
                    }
                };
                rl_info!("{why}: attesting again");
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
            Err(e) => {
                rl_warn!(error = %e, "VM generation changes are no longer watched");
                return;
            }
        }
    }
}

/// Aborts a helper task when the daemon's loop ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use vkx_common::session::Output;
    use vkx_common::session::guest::FEATURE_REENABLE_JITTER;
    use vkx_common::wire::{FeatureState, KeyName, Message};

    use super::*;
    use crate::testutil::{established, feature_update, features, logs};

    const ON: FeatureState = FeatureState::Enabled;
    const OFF: FeatureState = FeatureState::Disabled;

    #[test]
    fn a_kill_and_an_unkill_cost_one_line_each_and_one_key_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut status = StatusFile::new(dir.path());
        let names = vec![KeyName::new("disk").unwrap()];
        let mut hold = Hold {
            status: &mut status,
            deliver: Deliver::new(&names, None, &[], None).resuming(),
        };
        let t0 = Instant::now();
        let (mut guest, attested) = established(features(OFF, ON), 3, t0);
        let mut sent = Vec::new();
        let ((), log) = logs(|| {
            let mut feed =
                |hold: &mut Hold<'_>, guest: &mut Guest, out: Output<GuestEvent>, now| {
                    for ev in out.events {
                        let r = hold.on_event(ev, guest, now);
                        sent.extend(r.out.send.iter().map(|b| Message::decode(b).unwrap()));
                    }
                };
            let r = hold.on_event(attested, &mut guest, t0);
            assert!(r.out.send.is_empty());
            // Key derivation is killed too, then both come back; time
            // passes past the re-enable delay.
            let mut now = t0;
            for map in [features(OFF, OFF), features(ON, ON)] {
                let (g, out) = guest.on_payload(&feature_update(map), now);
                guest = g;
                feed(&mut hold, &mut guest, out, now);
            }
            now += FEATURE_REENABLE_JITTER;
            let (g, out) = guest.on_timeout(now);
            guest = g;
            feed(&mut hold, &mut guest, out, now);
        });
        assert!(
            matches!(&sent[..], [Message::KeyRequest(r)] if r.names == names),
            "{sent:?}"
        );
        assert!(!log.contains("WARN"), "{log}");
        let info: Vec<&str> = log.lines().filter(|l| l.contains(" INFO ")).collect();
        assert_eq!(info.len(), 3, "{log}");
        assert!(
            info[0].contains("attested")
                && info[0].contains("key-release=disabled, key-derivation=enabled"),
            "{log}"
        );
        assert!(
            info[1].contains("the host changed the feature states")
                && info[1].contains("key-release=disabled, key-derivation=disabled"),
            "{log}"
        );
        assert!(
            info[2].contains("key-release=enabled, key-derivation=enabled"),
            "{log}"
        );
    }
}
