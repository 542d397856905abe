//! `vkx-guest get NAME`: one key, for scripts (`vkx-guest get disk |
//! cryptsetup open --key-file=- ...`). One [`Agent::attempt`] whose
//! handler asks for the key as soon as the session is attested and ends
//! the session with `goodbye` once the host answered.
//!
//! Like `once` it makes exactly one attempt; the exit code tells the
//! caller what to do: 0 the key (on stdout), 4 the host refused it (the
//! wire code says why; retrying now will not help), 2 permanent failure,
//! 3 retryable failure.
//!
//! The material stays in [`KeyMaterial`] (zeroized on drop, redacted in
//! `Debug`) until the caller writes it out.

use std::time::Instant;

use tokio::sync::watch;
use vkx_common::errors::{ErrorCode, RetryClass};
use vkx_common::retry::Failure;
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_common::wire::{KeyMaterial, KeyName, KeyRelease};

use crate::agent::{Agent, Attempt, Handler, Reaction};
use crate::config::Config;

/// How `get` ended.
#[derive(Debug)]
pub enum GetOutcome {
    /// The host released the key.
    Key(KeyMaterial),
    /// The host refused the key, or key release for this VM.
    Refused(ErrorCode),
    /// Not worth retrying automatically (class P, unknown code, TLS pin
    /// or ALPN refusal, local misconfiguration).
    Permanent(String),
    /// Worth retrying later (transport, timeouts, busy, ...).
    Retryable(String),
}

/// Writes key material to `fd` (stdout, for `vkx-guest get`) with
/// write(2) directly: `std::io::Stdout` would copy it into its line
/// buffer, a process-wide allocation that is never zeroized. `fd` is
/// duplicated for the write; the caller flushes anything it printed
/// before.
pub fn write_key(fd: std::os::fd::BorrowedFd<'_>, material: &KeyMaterial) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::fs::File::from(fd.try_clone_to_owned()?);
    out.write_all(material.expose())
}

impl GetOutcome {
    /// The process exit code: 0 key, 4 refused, 2 permanent, 3 retryable.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Key(_) => 0,
            Self::Refused(_) => 4,
            Self::Permanent(_) => 2,
            Self::Retryable(_) => 3,
        }
    }
}

/// The handler: asks for one key once attested, records the answer.
#[derive(Debug)]
pub struct GetKey {
    name: KeyName,
    result: Option<Result<KeyMaterial, ErrorCode>>,
    /// The session would not send the request for a local reason (never
    /// expected for one valid name on a fresh session).
    local: Option<String>,
}

impl GetKey {
    pub fn new(name: KeyName) -> Self {
        Self {
            name,
            result: None,
            local: None,
        }
    }

    /// The key, or the host's refusal code; `None` if the host never
    /// answered.
    pub fn result(&self) -> Option<&Result<KeyMaterial, ErrorCode>> {
        self.result.as_ref()
    }

    fn finish() -> Reaction {
        Reaction {
            finish: true,
            ..Reaction::default()
        }
    }

    fn on_release(&mut self, release: KeyRelease) {
        let KeyRelease { released, refused } = release;
        if let Some(k) = released.into_iter().find(|k| k.name == self.name) {
            self.result = Some(Ok(k.material));
        } else if let Some(r) = refused.into_iter().find(|r| r.name == self.name) {
            self.result = Some(Err(r.code));
        } else {
            // The session checks that the answer names exactly what was
            // asked; this is only a second line.
            self.local = Some(format!("the host's answer does not name key {}", self.name));
        }
    }
}

impl Handler for GetKey {
    fn on_event(&mut self, ev: GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        match ev {
            GuestEvent::Attested { .. } => {
                let Guest::Established(s) = guest else {
                    self.local = Some("attested, but the session is not established".into());
                    return Self::finish();
                };
                match s.request_keys(vec![self.name.clone()], now) {
                    Ok(out) => Reaction {
                        out,
                        ..Reaction::default()
                    },
                    Err(e) => {
                        // Key release off for this VM: the code the host
                        // would have refused with (its state, exactly).
                        match e.code() {
                            Some(code) => self.result = Some(Err(code)),
                            None => self.local = Some(format!("key request not sent: {e}")),
                        }
                        Self::finish()
                    }
                }
            }
            GuestEvent::Keys(release) => {
                self.on_release(release);
                Self::finish()
            }
            GuestEvent::FeatureHeld { code, .. } => {
                self.result = Some(Err(code));
                Self::finish()
            }
            _ => Reaction::default(),
        }
    }
}

/// One attempt to fetch `name`.
pub async fn get(config: Config, name: KeyName) -> GetOutcome {
    let agent = match Agent::new(&config) {
        Ok(a) => a,
        Err(e) => return GetOutcome::Permanent(format!("{e:#}")),
    };
    let mut handler = GetKey::new(name);
    let (_keep, mut stop) = watch::channel(false);
    let attempt = agent.attempt(&mut handler, &mut stop).await;
    outcome(handler, &attempt)
}

fn outcome(handler: GetKey, attempt: &Attempt) -> GetOutcome {
    match handler.result {
        Some(Ok(material)) => return GetOutcome::Key(material),
        Some(Err(code)) => return GetOutcome::Refused(code),
        None => {}
    }
    if let Some(why) = handler.local {
        return GetOutcome::Permanent(why);
    }
    let permanent = match attempt.close {
        CloseReason::Failed(Failure::Permanent) => true,
        CloseReason::Failed(Failure::Code { code, .. }) => code.class() == RetryClass::Permanent,
        CloseReason::Failed(Failure::Transport) | CloseReason::Orderly { .. } => false,
    };
    if permanent {
        GetOutcome::Permanent(attempt.detail.clone())
    } else {
        GetOutcome::Retryable(attempt.detail.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use vkx_common::wire::{
        ErrorMessage, FeatureState, Features, KeyRefusal, Message, ReleasedKey, feature,
    };

    use super::*;

    #[test]
    fn the_key_is_written_whole_and_unbuffered() {
        use std::io::Read;
        use std::os::fd::AsFd;
        let (mut r, w) = std::io::pipe().unwrap();
        let key = KeyMaterial::new((0..=255u8).cycle().take(1024).collect());
        write_key(w.as_fd(), &key).unwrap();
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, key.expose());
    }

    fn name(s: &str) -> KeyName {
        KeyName::new(s).unwrap()
    }

    fn features(release: FeatureState) -> Features {
        [(feature::KEY_RELEASE, release)].into()
    }

    /// A session attested with key release in `release`.
    fn established(release: FeatureState, now: Instant) -> (Guest, GuestEvent) {
        crate::testutil::established(features(release), 3, now)
    }

    fn release(released: &[(&str, &[u8])], refused: &[(&str, ErrorCode)]) -> GuestEvent {
        GuestEvent::Keys(KeyRelease {
            released: released
                .iter()
                .map(|(n, m)| ReleasedKey {
                    name: name(n),
                    version: 1,
                    material: KeyMaterial::new(m.to_vec()),
                })
                .collect(),
            refused: refused
                .iter()
                .map(|(n, code)| KeyRefusal {
                    name: name(n),
                    code: *code,
                })
                .collect(),
        })
    }

    fn closed_attempt(close: CloseReason) -> Attempt {
        Attempt {
            established: true,
            close,
            detail: "detail".into(),
        }
    }

    #[test]
    fn attested_sends_one_key_request() {
        let now = Instant::now();
        let (mut g, ev) = established(FeatureState::Enabled, now);
        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(ev, &mut g, now);
        assert!(!r.finish);
        assert!(r.out.close.is_none());
        assert_eq!(r.out.send.len(), 1);
        let sent = Message::decode(&r.out.send[0]).unwrap();
        let Message::KeyRequest(req) = sent else {
            panic!("not a key request: {sent:?}");
        };
        assert_eq!(req.names, [name("disk")]);
        assert!(h.result().is_none());
    }

    #[test]
    fn a_rollout_refusal_says_which_feature_which_state_and_whose_switch() {
        use crate::deliver::describe_refusal;
        assert_eq!(
            describe_refusal(feature::KEY_RELEASE, ErrorCode::FeatureDisabled),
            "feature-disabled (8): key-release is disabled by the host's kill switch; \
             nothing to fix on this VM"
        );
        let not_yet = describe_refusal(feature::KEY_RELEASE, ErrorCode::FeatureNotEnabled);
        assert!(
            not_yet.starts_with("feature-not-enabled (9): key-release is not-yet enabled")
                && not_yet.contains("staged rollout")
                && not_yet.ends_with("nothing to fix on this VM"),
            "{not_yet}"
        );
        assert_eq!(
            describe_refusal(feature::KEY_RELEASE, ErrorCode::NotPermitted),
            ErrorCode::NotPermitted.to_string()
        );
    }

    #[test]
    fn attested_without_key_release_is_refused_locally() {
        for (state, code) in [
            (FeatureState::Disabled, ErrorCode::FeatureDisabled),
            (FeatureState::NotYet, ErrorCode::FeatureNotEnabled),
        ] {
            let now = Instant::now();
            let (mut g, ev) = established(state, now);
            let mut h = GetKey::new(name("disk"));
            let r = h.on_event(ev, &mut g, now);
            assert!(r.finish);
            assert!(r.out.send.is_empty());
            assert_eq!(h.result(), Some(&Err(code)));
        }
    }

    #[test]
    fn the_whole_exchange_over_the_session() {
        let now = Instant::now();
        let (mut g, ev) = established(FeatureState::Enabled, now);
        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(ev, &mut g, now);
        assert!(!r.finish);
        let answer = Message::KeyRelease(KeyRelease {
            released: vec![ReleasedKey {
                name: name("disk"),
                version: 3,
                material: KeyMaterial::new(b"0123456789abcdef".to_vec()),
            }],
            refused: vec![],
        })
        .encode()
        .unwrap();
        let (mut g, mut out) = g.on_payload(&answer, now);
        assert!(out.close.is_none());
        let ev = out.events.remove(0);
        let r = h.on_event(ev, &mut g, now);
        assert!(r.finish);
        let o = outcome(
            h,
            &closed_attempt(CloseReason::Orderly { retry_after: None }),
        );
        let GetOutcome::Key(m) = &o else {
            panic!("{o:?}");
        };
        assert_eq!(m.expose(), b"0123456789abcdef");
        assert_eq!(o.exit_code(), 0);
    }

    #[test]
    fn a_host_hold_over_the_session_keeps_the_hosts_code() {
        for code in [ErrorCode::FeatureDisabled, ErrorCode::FeatureNotEnabled] {
            let now = Instant::now();
            let (mut g, ev) = established(FeatureState::Enabled, now);
            let mut h = GetKey::new(name("disk"));
            h.on_event(ev, &mut g, now);
            let held = Message::Error(ErrorMessage {
                retry_after_ms: Some(5000),
                ..ErrorMessage::new(code)
            })
            .encode()
            .unwrap();
            let (mut g, mut out) = g.on_payload(&held, now);
            assert!(out.close.is_none());
            let ev = out.events.remove(0);
            assert!(matches!(ev, GuestEvent::FeatureHeld { .. }));
            let r = h.on_event(ev, &mut g, now);
            assert!(r.finish);
            let o = outcome(
                h,
                &closed_attempt(CloseReason::Orderly { retry_after: None }),
            );
            assert!(matches!(o, GetOutcome::Refused(c) if c == code), "{o:?}");
            assert_eq!(o.exit_code(), 4);
        }
    }

    #[test]
    fn keys_records_the_material_or_the_refusal() {
        let now = Instant::now();
        let mut g = Guest::Closed;
        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(release(&[("disk", b"k1")], &[]), &mut g, now);
        assert!(r.finish);
        assert_eq!(h.result(), Some(&Ok(KeyMaterial::new(b"k1".to_vec()))));

        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(
            release(&[], &[("disk", ErrorCode::NotPermitted)]),
            &mut g,
            now,
        );
        assert!(r.finish);
        assert_eq!(h.result(), Some(&Err(ErrorCode::NotPermitted)));
        let o = outcome(
            h,
            &closed_attempt(CloseReason::Orderly { retry_after: None }),
        );
        assert!(matches!(o, GetOutcome::Refused(ErrorCode::NotPermitted)));
        assert_eq!(o.exit_code(), 4);
    }

    #[test]
    fn an_answer_without_the_name_is_permanent() {
        let now = Instant::now();
        let mut g = Guest::Closed;
        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(release(&[("other", b"k")], &[]), &mut g, now);
        assert!(r.finish);
        assert!(h.result().is_none());
        let o = outcome(
            h,
            &closed_attempt(CloseReason::Orderly { retry_after: None }),
        );
        assert!(matches!(o, GetOutcome::Permanent(_)), "{o:?}");
        assert_eq!(o.exit_code(), 2);
    }

    #[test]
    fn feature_held_finishes_with_feature_disabled() {
        let now = Instant::now();
        let mut g = Guest::Closed;
        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(
            GuestEvent::FeatureHeld {
                feature: feature::KEY_RELEASE,
                until: now + Duration::from_secs(60),
                code: ErrorCode::FeatureDisabled,
            },
            &mut g,
            now,
        );
        assert!(r.finish);
        assert_eq!(h.result(), Some(&Err(ErrorCode::FeatureDisabled)));
    }

    #[test]
    fn attested_on_a_session_that_is_not_established_is_permanent() {
        let now = Instant::now();
        let mut g = Guest::Closed;
        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(
            GuestEvent::Attested {
                session_id: [0; 16],
                reattest_after: Duration::from_secs(3600),
                features: features(FeatureState::Enabled),
            },
            &mut g,
            now,
        );
        assert!(r.finish);
        assert!(r.out.send.is_empty());
        let o = outcome(
            h,
            &closed_attempt(CloseReason::Orderly { retry_after: None }),
        );
        assert!(matches!(o, GetOutcome::Permanent(_)), "{o:?}");
    }

    #[test]
    fn other_events_are_ignored() {
        let now = Instant::now();
        let mut g = Guest::Closed;
        let mut h = GetKey::new(name("disk"));
        let r = h.on_event(
            GuestEvent::Features(features(FeatureState::Enabled)),
            &mut g,
            now,
        );
        assert!(!r.finish);
        assert!(r.out.send.is_empty());
        assert!(h.result().is_none());
    }

    #[test]
    fn no_answer_is_classified_like_once() {
        let cases = [
            (CloseReason::Failed(Failure::Transport), 3),
            (CloseReason::Orderly { retry_after: None }, 3),
            (CloseReason::Failed(Failure::Permanent), 2),
            (
                CloseReason::Failed(Failure::Code {
                    code: ErrorCode::AttestationFailed,
                    retry_after: None,
                }),
                2,
            ),
            (
                CloseReason::Failed(Failure::Code {
                    code: ErrorCode::Busy,
                    retry_after: Some(Duration::from_secs(1)),
                }),
                3,
            ),
        ];
        for (close, exit) in cases {
            let o = outcome(GetKey::new(name("disk")), &closed_attempt(close.clone()));
            assert_eq!(o.exit_code(), exit, "{close:?}: {o:?}");
        }
    }

    #[test]
    fn debug_shows_no_material() {
        let o = GetOutcome::Key(KeyMaterial::new(b"SUPERSECRET".to_vec()));
        let mut h = GetKey::new(name("disk"));
        h.on_event(
            release(&[("disk", b"SUPERSECRET")], &[]),
            &mut Guest::Closed,
            Instant::now(),
        );
        let text = format!("{o:?} {h:?}");
        assert!(!text.contains("SUPERSECRET"), "{text}");
    }
}
