//! What the guest does with an attested session's keys: asks for the keys
//! its configuration names, installs each released key in the key
//! directory ([`crate::keys::KeyDir`]), and installs and acknowledges every
//! rotation the host pushes. Shared by `once` (which ends the session when
//! the keys are in) and the daemon (which holds it for rotations).
//!
//! Feature rollout (PROTOCOL.md §12): a key request or derivation that
//! the session will not send because its feature is off or held back, or
//! that the host refused with `feature-disabled` / `feature-not-enabled`,
//! is recorded in [`Deliver::failed`] with the code and an actionable text
//! (`once`), or, for the daemon ([`Deliver::resuming`]), kept until
//! [`GuestEvent::FeatureUsable`] and then asked for exactly once, with no
//! log line per request not sent: the daemon logs the feature states when
//! they change, and that is the whole story.
//!
//! Logs name keys and versions, never material; a refusal is logged with
//! its code only (the reason stays on the host).

use std::time::Instant;

use vkx_common::errors::ErrorCode;
use vkx_common::session::Output;
use vkx_common::session::guest::{
    Guest, GuestEvent, RequestRefused, feature_off_state, feature_off_text,
};
use vkx_common::wire::{KeyMaterial, KeyName, Purpose, ReleasedKey, feature};
use vkx_common::{rl_info, rl_log, rl_warn};

use crate::agent::Reaction;
use crate::config::Config;
use crate::keys::KeyDir;

/// The delivery state of one session.
#[derive(Debug)]
pub struct Deliver<'a> {
    names: &'a [KeyName],
    dir: Option<&'a KeyDir>,
    derive: &'a [(Purpose, u8)],
    derived_dir: Option<&'a KeyDir>,
    /// Derivations not yet confirmed or failed.
    pub derive_pending: usize,
    /// Derived keys installed in this session (by purpose).
    pub derived: Vec<Purpose>,
    /// Keys installed in this session: name, version.
    pub installed: Vec<(KeyName, u32)>,
    /// Keys the host refused or that could not be installed.
    pub failed: Vec<(KeyName, String)>,
    /// The initial request is answered (or there was nothing to ask).
    pub done: bool,
    /// Wait for a feature that is off or held back, and ask when it becomes
    /// usable, instead of recording a failure.
    resume: bool,
    /// The configured keys wait for key release to become usable.
    keys_waiting: bool,
    /// Derivations waiting for key derivation to become usable (at most
    /// the configured ones: each is either here, queued or running).
    derive_waiting: Vec<(Purpose, u8)>,
}

impl<'a> Deliver<'a> {
    pub fn new(
        names: &'a [KeyName],
        dir: Option<&'a KeyDir>,
        derive: &'a [(Purpose, u8)],
        derived_dir: Option<&'a KeyDir>,
    ) -> Self {
        Self {
            names,
            dir,
            derive,
            derived_dir,
            derive_pending: 0,
            derived: Vec::new(),
            installed: Vec::new(),
            failed: Vec::new(),
            done: false,
            resume: false,
            keys_waiting: false,
            derive_waiting: Vec::new(),
        }
    }

    /// The daemon's mode: what a feature that is off or held back gates is
    /// asked for once the feature becomes usable in this session.
    pub fn resuming(mut self) -> Self {
        self.resume = true;
        self
    }

    /// The configured keys wait for key release to become usable.
    pub fn keys_waiting(&self) -> bool {
        self.keys_waiting
    }

    /// Derivations waiting for key derivation to become usable.
    pub fn derive_waiting(&self) -> &[(Purpose, u8)] {
        &self.derive_waiting
    }

    /// Everything asked for is answered (keys and derivations).
    pub fn complete(&self) -> bool {
        self.done && self.derive_pending == 0
    }

    /// Handles the key-related events; returns what to send and the
    /// derivations to run.
    pub fn on_event(&mut self, ev: &GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        let mut out = Output::default();
        let mut derive = Vec::new();
        match ev {
            GuestEvent::Attested { .. } => {
                derive = self.derive.to_vec();
                self.derive_pending = derive.len();
                if self.names.is_empty() {
                    self.done = true;
                } else if let Guest::Established(s) = guest {
                    match s.request_keys(self.names.to_vec(), now) {
                        Ok(o) => out = o,
                        Err(e) => self.keys_not_sent(e),
                    }
                }
            }
            GuestEvent::FeatureUsable {
                feature: feature::KEY_RELEASE,
            } if self.keys_waiting => {
                self.keys_waiting = false;
                if let Guest::Established(s) = guest {
                    match s.request_keys(self.names.to_vec(), now) {
                        Ok(o) => out = o,
                        Err(e) => self.keys_not_sent(e),
                    }
                }
            }
            GuestEvent::FeatureUsable {
                feature: feature::KEY_DERIVATION,
            } => {
                derive = std::mem::take(&mut self.derive_waiting);
            }
            GuestEvent::Keys(release) => {
                for key in &release.released {
                    self.install(key);
                }
                for r in &release.refused {
                    rl_warn!(key = %r.name, code = %r.code, "the host withheld a key");
                    self.failed
                        .push((r.name.clone(), format!("refused: {}", r.code)));
                }
                self.done = true;
            }
            GuestEvent::FeatureHeld {
                feature: feature::KEY_RELEASE,
                until,
                code,
            } => {
                let why = match feature_off_state(*code) {
                    Some(state) => RequestRefused::FeatureOff {
                        feature: feature::KEY_RELEASE,
                        state,
                    },
                    None => RequestRefused::FeatureHeld {
                        feature: feature::KEY_RELEASE,
                        until: *until,
                    },
                };
                // The host answered the request it got just before a
                // change of its feature map; the feature-update says the
                // rest (and is logged by the daemon).
                rl_log!(debug, code = %code, "the host refused the key request");
                self.keys_not_sent(why);
            }
            GuestEvent::KeyUpdate { update_id, key } => {
                let installed = self.install(key);
                if let Guest::Established(s) = guest {
                    out = s.ack_update(*update_id, key, installed, now);
                }
            }
            _ => {}
        }
        Reaction {
            out,
            derive,
            finish: false,
        }
    }

    /// The session would not send the key request (or the host refused it
    /// for its rollout state): wait for the feature (daemon), or record why
    /// each key is missing.
    fn keys_not_sent(&mut self, why: RequestRefused) {
        self.done = true;
        if self.resume && why.is_feature_wait() {
            self.keys_waiting = true;
            return;
        }
        if !why.is_feature_wait() {
            rl_warn!(error = %why, "keys not requested");
        }
        let text = refusal_text(why);
        for name in self.names {
            self.failed.push((name.clone(), text.clone()));
        }
    }

    /// A derivation was not sent because of `why` (see
    /// [`crate::agent::Handler::on_derive_not_sent`]).
    pub fn on_derive_not_sent(&mut self, purpose: &Purpose, length: u8, why: RequestRefused) {
        if self.resume && why.is_feature_wait() {
            self.derive_waiting.push((purpose.clone(), length));
            return;
        }
        if !why.is_feature_wait() {
            self.on_derive_failed(purpose, &why.to_string());
            return;
        }
        self.derive_pending = self.derive_pending.saturating_sub(1);
        if let Ok(name) = KeyName::new(purpose.as_str()) {
            self.failed.push((name, refusal_text(why)));
        }
    }

    /// K for `purpose` is confirmed: install it in the derived directory.
    pub fn on_derived(&mut self, purpose: &Purpose, key: &[u8]) {
        self.derive_pending = self.derive_pending.saturating_sub(1);
        let (Some(dir), Ok(name)) = (self.derived_dir, KeyName::new(purpose.as_str())) else {
            return;
        };
        let k = ReleasedKey {
            name,
            version: 1,
            material: KeyMaterial::new(key.to_vec()),
        };
        match dir.install(&k) {
            Ok(path) => {
                rl_info!(purpose = %purpose, path = %path.display(), "derived key delivered");
                self.derived.push(purpose.clone());
            }
            Err(e) => {
                rl_warn!(purpose = %purpose, error = %e, "derived key not installed");
                self.failed
                    .push((k.name, format!("derived key not installed: {e}")));
            }
        }
    }

    pub fn on_derive_failed(&mut self, purpose: &Purpose, why: &str) {
        self.derive_pending = self.derive_pending.saturating_sub(1);
        rl_warn!(purpose = %purpose, why, "no derived key");
        if let Ok(name) = KeyName::new(purpose.as_str()) {
            self.failed.push((name, format!("derivation: {why}")));
        }
    }

    fn install(&mut self, key: &ReleasedKey) -> bool {
        let Some(dir) = self.dir else {
            self.failed
                .push((key.name.clone(), "no key directory".into()));
            return false;
        };
        match dir.install(key) {
            Ok(path) => {
                rl_info!(
                    key = %key.name,
                    version = key.version,
                    path = %path.display(),
                    "key delivered"
                );
                self.installed.push((key.name.clone(), key.version));
                true
            }
            Err(e) => {
                rl_warn!(key = %key.name, error = %e, "key not installed");
                self.failed.push((key.name.clone(), e.to_string()));
                false
            }
        }
    }
}

/// The code (when the host would refuse with one) and the text of a
/// request the session did not send.
fn refusal_text(why: RequestRefused) -> String {
    match why.code() {
        Some(code) => format!("{code}: {why}"),
        None => why.to_string(),
    }
}

/// What to tell a person about a refusal code: for the rollout codes
/// (`feature-disabled`, `feature-not-enabled`) which feature, which state,
/// and that nothing on this VM is at fault.
pub fn describe_refusal(feature: u16, code: ErrorCode) -> String {
    match feature_off_state(code) {
        Some(state) => format!("{code}: {}", feature_off_text(feature, state)),
        None => code.to_string(),
    }
}

/// Opens the key directory and the derived-key directory the
/// configuration needs (none when it asks for nothing), warning when one
/// is not on a tmpfs.
pub fn open_dirs(config: &Config) -> anyhow::Result<(Option<KeyDir>, Option<KeyDir>)> {
    let open = |wanted: bool, path: &std::path::Path| -> anyhow::Result<Option<KeyDir>> {
        if !wanted {
            return Ok(None);
        }
        let d = KeyDir::open(path, config.key_owner, config.key_group)
            .map_err(|e| anyhow::anyhow!("key directory: {e}"))?;
        if !d.on_tmpfs() {
            rl_warn!(
                dir = %path.display(),
                "not on a tmpfs: delivered keys reach a disk"
            );
        }
        Ok(Some(d))
    };
    Ok((
        open(!config.keys.is_empty(), &config.key_dir)?,
        open(!config.derive.is_empty(), &config.derived_dir)?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use vkx_common::session::guest::FEATURE_REENABLE_JITTER;
    use vkx_common::wire::{FeatureState, Message};

    use super::*;
    use crate::testutil::{established, feature_update, features, logs, refusal};

    const ON: FeatureState = FeatureState::Enabled;
    const OFF: FeatureState = FeatureState::Disabled;

    fn names() -> Vec<KeyName> {
        vec![KeyName::new("disk").unwrap()]
    }

    fn purposes() -> Vec<(Purpose, u8)> {
        vec![(Purpose::new("app-a").unwrap(), 32)]
    }

    /// The key requests among the payloads the reaction sends.
    fn key_requests(r: &Reaction) -> usize {
        r.out
            .send
            .iter()
            .filter(|b| matches!(Message::decode(b), Ok(Message::KeyRequest(_))))
            .count()
    }

    /// The host's answer that withholds every key in `names`.
    fn withheld(names: &[KeyName]) -> Vec<u8> {
        Message::KeyRelease(vkx_common::wire::KeyRelease {
            released: vec![],
            refused: names
                .iter()
                .map(|n| vkx_common::wire::KeyRefusal {
                    name: n.clone(),
                    code: ErrorCode::NotPermitted,
                })
                .collect(),
        })
        .encode()
        .unwrap()
        .to_vec()
    }

    /// A session fed through `deliver`: every event the session emits goes
    /// to the handler, as the driver does; returns the reactions.
    struct Run<'a> {
        guest: Guest,
        deliver: Deliver<'a>,
        reactions: Vec<Reaction>,
    }

    impl Run<'_> {
        fn feed(&mut self, out: Output<GuestEvent>, now: Instant) {
            assert!(out.close.is_none(), "{out:?}");
            for ev in out.events {
                let r = self.deliver.on_event(&ev, &mut self.guest, now);
                self.reactions.push(r);
            }
        }

        fn payload(&mut self, p: &[u8], now: Instant) {
            let g = std::mem::replace(&mut self.guest, Guest::Closed);
            let (g, out) = g.on_payload(p, now);
            self.guest = g;
            self.feed(out, now);
        }

        fn timeout(&mut self, now: Instant) {
            let g = std::mem::replace(&mut self.guest, Guest::Closed);
            let (g, out) = g.on_timeout(now);
            self.guest = g;
            self.feed(out, now);
        }

        fn key_requests(&self) -> usize {
            self.reactions.iter().map(key_requests).sum()
        }
    }

    /// The daemon's delivery over a session attested with key release in
    /// `release`.
    fn daemon<'a>(names: &'a [KeyName], release: FeatureState, t0: Instant) -> Run<'a> {
        let (guest, attested) = established(features(release, ON), 3, t0);
        let mut run = Run {
            guest,
            deliver: Deliver::new(names, None, &[], None).resuming(),
            reactions: Vec::new(),
        };
        let r = run.deliver.on_event(&attested, &mut run.guest, t0);
        run.reactions.push(r);
        run
    }

    #[test]
    fn attested_with_key_release_off_asks_nothing_and_warns_nothing() {
        let names = names();
        for state in [FeatureState::Disabled, FeatureState::NotYet] {
            let t0 = Instant::now();
            let (run, log) = logs(|| daemon(&names, state, t0));
            assert_eq!(run.key_requests(), 0);
            assert!(run.reactions.iter().all(|r| r.out.send.is_empty()));
            assert!(run.deliver.keys_waiting());
            assert!(run.deliver.failed.is_empty(), "{:?}", run.deliver.failed);
            assert!(!log.contains("WARN"), "{log}");
        }
    }

    #[test]
    fn an_unkill_asks_for_the_keys_once_after_the_delay() {
        let names = names();
        let t0 = Instant::now();
        let (mut run, log) = logs(|| {
            let mut run = daemon(&names, OFF, t0);
            run.payload(&feature_update(features(ON, ON)), t0);
            run
        });
        assert!(log.is_empty(), "{log}");
        // Not at the update: at the drawn instant the session wakes for.
        assert_eq!(run.key_requests(), 0);
        let at = run.guest.deadline().unwrap();
        assert!(at - t0 <= FEATURE_REENABLE_JITTER && at > t0);
        run.timeout(at - Duration::from_millis(1));
        assert_eq!(run.key_requests(), 0);
        run.timeout(at);
        assert_eq!(run.key_requests(), 1);
        assert!(!run.deliver.keys_waiting());
        run.payload(&withheld(&names), at);
        assert_eq!(run.deliver.failed.len(), 1);
        // Exactly once: later wake-ups and further updates that keep the
        // feature on ask nothing more.
        for s in [30, 60, 90] {
            run.timeout(at + Duration::from_secs(s));
        }
        run.payload(&feature_update(features(ON, OFF)), at);
        run.timeout(at + FEATURE_REENABLE_JITTER);
        assert_eq!(run.key_requests(), 1);
    }

    #[test]
    fn killed_again_before_the_delay_asks_nothing() {
        let names = names();
        let t0 = Instant::now();
        let mut run = daemon(&names, OFF, t0);
        run.payload(&feature_update(features(ON, ON)), t0);
        let at = run.guest.deadline().unwrap();
        run.payload(
            &feature_update(features(OFF, ON)),
            at - Duration::from_millis(1),
        );
        for s in [0, 10, 60] {
            run.timeout(at + Duration::from_secs(s));
        }
        assert_eq!(run.key_requests(), 0);
        assert!(run.deliver.keys_waiting());
        // The next unkill still brings them, once.
        let t1 = at + Duration::from_secs(60);
        run.payload(&feature_update(features(ON, ON)), t1);
        run.timeout(t1 + FEATURE_REENABLE_JITTER);
        assert_eq!(run.key_requests(), 1);
    }

    #[test]
    fn a_host_refusal_waits_for_the_unkill_and_its_hold() {
        let names = names();
        let t0 = Instant::now();
        let mut run = daemon(&names, ON, t0);
        assert_eq!(run.key_requests(), 1);
        // The kill crosses the request: update, then the refusal.
        let (_, log) = logs(|| {
            run.payload(&feature_update(features(OFF, ON)), t0);
            run.payload(&refusal(ErrorCode::FeatureDisabled, 30_000), t0);
        });
        assert!(!log.contains("WARN"), "{log}");
        assert!(run.deliver.keys_waiting());
        assert!(run.deliver.failed.is_empty());
        // Unkilled at once: the 30 s hold outlasts the delay.
        run.payload(&feature_update(features(ON, ON)), t0);
        run.timeout(t0 + Duration::from_secs(29));
        assert_eq!(run.key_requests(), 1);
        run.timeout(t0 + Duration::from_secs(30));
        assert_eq!(run.key_requests(), 2);
    }

    #[test]
    fn derivations_wait_for_key_derivation_and_run_once_it_is_usable() {
        let names = names();
        let purposes = purposes();
        let t0 = Instant::now();
        let (guest, attested) = established(features(ON, OFF), 3, t0);
        let mut run = Run {
            guest,
            deliver: Deliver::new(&names, None, &purposes, None).resuming(),
            reactions: Vec::new(),
        };
        let r = run.deliver.on_event(&attested, &mut run.guest, t0);
        assert_eq!(r.derive, purposes);
        // The driver could not send them: key derivation is off.
        let (_, log) = logs(|| {
            for (p, l) in &purposes {
                run.deliver.on_derive_not_sent(
                    p,
                    *l,
                    RequestRefused::FeatureOff {
                        feature: feature::KEY_DERIVATION,
                        state: OFF,
                    },
                );
            }
        });
        assert!(log.is_empty(), "{log}");
        assert_eq!(run.deliver.derive_waiting(), purposes.as_slice());
        assert!(run.deliver.failed.is_empty());
        // Answer the key request so the session is free.
        run.payload(&withheld(&names), t0);
        run.payload(&feature_update(features(ON, ON)), t0);
        run.timeout(t0 + FEATURE_REENABLE_JITTER);
        let derive: Vec<_> = run
            .reactions
            .iter()
            .flat_map(|r| r.derive.clone())
            .collect();
        assert_eq!(derive, purposes);
        assert!(run.deliver.derive_waiting().is_empty());
    }

    #[test]
    fn once_records_the_exact_code_and_says_whose_switch_it_is() {
        let names = names();
        let purposes = purposes();
        for (state, code) in [
            (FeatureState::Disabled, ErrorCode::FeatureDisabled),
            (FeatureState::NotYet, ErrorCode::FeatureNotEnabled),
        ] {
            let t0 = Instant::now();
            let (mut guest, attested) = established(features(state, state), 3, t0);
            let mut d = Deliver::new(&names, None, &purposes, None);
            let (r, log) = logs(|| {
                let r = d.on_event(&attested, &mut guest, t0);
                for (p, l) in &purposes {
                    d.on_derive_not_sent(
                        p,
                        *l,
                        RequestRefused::FeatureOff {
                            feature: feature::KEY_DERIVATION,
                            state,
                        },
                    );
                }
                r
            });
            assert!(r.out.send.is_empty());
            assert!(!log.contains("WARN"), "{log}");
            assert!(d.complete());
            let [(key, why), (derived, dwhy)] = &d.failed[..] else {
                panic!("{:?}", d.failed)
            };
            assert_eq!(key.as_str(), "disk");
            assert!(
                why.starts_with(&format!("{code}: key-release is ")),
                "{why}"
            );
            assert!(why.ends_with("nothing to fix on this VM"), "{why}");
            assert_eq!(derived.as_str(), "app-a");
            assert!(
                dwhy.starts_with(&format!("{code}: key-derivation is ")),
                "{dwhy}"
            );
        }
        let t0 = Instant::now();
        let (mut guest, attested) = established(features(OFF, ON), 3, t0);
        let mut d = Deliver::new(&names, None, &[], None);
        d.on_event(&attested, &mut guest, t0);
        assert_eq!(
            d.failed[0].1,
            format!(
                "{}: key-release is disabled by the host's kill switch; \
                 nothing to fix on this VM",
                ErrorCode::FeatureDisabled
            )
        );
    }

    #[test]
    fn once_reports_a_host_refusal_with_the_hosts_code() {
        let names = names();
        let t0 = Instant::now();
        let (mut guest, attested) = established(features(ON, ON), 3, t0);
        let mut d = Deliver::new(&names, None, &[], None);
        d.on_event(&attested, &mut guest, t0);
        let (g, out) = guest.on_payload(&refusal(ErrorCode::FeatureNotEnabled, 5000), t0);
        let mut guest = g;
        for ev in out.events {
            d.on_event(&ev, &mut guest, t0);
        }
        assert!(d.complete());
        assert!(
            d.failed[0].1.starts_with(&format!(
                "{}: key-release is not-yet enabled",
                ErrorCode::FeatureNotEnabled
            )),
            "{:?}",
            d.failed
        );
    }
}
