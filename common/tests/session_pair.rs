//! The guest and host sessions together, through the deterministic
//! in-memory pair of `vkx_common::testing::pair` (virtual time; local work
//! done by the harness); faults are injected by the tests.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // Test code.

use std::time::{Duration, Instant};

use vkx_common::errors::{ErrorCode, RetryClass};
use vkx_common::retry::Failure;
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{self, Guest, GuestEvent, RequestRefused};
use vkx_common::session::host::{self, DeriveAnswer, Host, HostEvent, PushRefused};
use vkx_common::testing::pair::{Pair, features, guest_config};
use vkx_common::wire::*;

fn guest_failure(p: &Pair) -> Failure {
    match &p.guest_closed {
        Some(CloseReason::Failed(f)) => *f,
        other => panic!("guest did not fail: {other:?}"),
    }
}

#[test]
fn handshake_reaches_established_with_one_transcript() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    assert!(p.established(), "guest {:?} host {:?}", p.guest, p.host);
    assert_eq!(p.quote_th, p.verify_th);
    assert!(
        p.guest_events
            .iter()
            .any(|e| matches!(e, GuestEvent::Attested { .. }))
    );
    assert!(
        p.host_events
            .iter()
            .any(|e| matches!(e, HostEvent::Attested { .. }))
    );
}

#[test]
fn different_exporters_give_different_transcripts_and_rejection() {
    // A relay: the guest's channel is not the host's.
    let now = Instant::now();
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    let (g, out) = Guest::start(guest_config(1, 1), [8u8; 32], [3; 32], now);
    p.guest = g;
    p.to_host.clear();
    p.take_guest(out);
    p.run();
    assert_ne!(p.quote_th, p.verify_th);
    assert!(!p.established());
    assert_eq!(
        guest_failure(&p),
        Failure::Code {
            code: ErrorCode::AttestationFailed,
            retry_after: None
        }
    );
}

#[test]
fn unsupported_version_is_permanent_on_both_sides() {
    let mut p = Pair::new((2, 3), Some("vm-1"), FeatureState::Enabled);
    p.run();
    let f = guest_failure(&p);
    assert_eq!(
        f,
        Failure::Code {
            code: ErrorCode::UnsupportedVersion,
            retry_after: None
        }
    );
    let Failure::Code { code, .. } = f else {
        unreachable!()
    };
    assert_eq!(code.class(), RetryClass::Permanent);
    assert_eq!(p.host_closed, Some(CloseReason::Failed(Failure::Permanent)));
}

#[test]
fn unmapped_peer_learns_only_attestation_failed() {
    let mut p = Pair::new((1, 1), None, FeatureState::Enabled);
    p.run();
    assert_eq!(
        guest_failure(&p),
        Failure::Code {
            code: ErrorCode::AttestationFailed,
            retry_after: None
        }
    );
}

#[test]
fn unknown_and_unexpected_messages_are_typed_permanent_errors() {
    // Unknown type 99 to the host.
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.to_host.clear();
    p.to_host.push_back(hex::decode("821863a0").unwrap());
    p.run();
    assert_eq!(p.host_closed, Some(CloseReason::Failed(Failure::Permanent)));
    assert_eq!(
        guest_failure(&p),
        Failure::Code {
            code: ErrorCode::UnknownMessage,
            retry_after: None
        }
    );

    // A ping before hello: known, but unexpected.
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.to_host.clear();
    p.to_host.push_back(
        Message::Ping(Ping { sequence: 1 })
            .encode()
            .unwrap()
            .to_vec(),
    );
    p.run();
    assert_eq!(
        guest_failure(&p),
        Failure::Code {
            code: ErrorCode::UnexpectedMessage,
            retry_after: None
        }
    );
}

#[test]
fn a_silent_host_times_the_guest_out() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.to_host.clear(); // hello lost
    p.advance(guest::AWAIT_CHALLENGE_TIMEOUT);
    assert_eq!(
        guest_failure(&p),
        Failure::Code {
            code: ErrorCode::Timeout,
            retry_after: None
        }
    );
}

#[test]
fn keepalive_keeps_an_idle_session_alive_until_reattestation() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    for _ in 0..29 {
        p.advance(Duration::from_secs(120));
        assert!(p.established());
    }
    // At reattest-after (3600 s less this session's spread, §6.6) the
    // guest re-attests (orderly).
    p.advance(Duration::from_secs(120));
    assert_eq!(
        p.guest_closed,
        Some(CloseReason::Orderly { retry_after: None })
    );
}

#[test]
fn host_closes_idle_sessions() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    // The guest's keepalive is lost on the way.
    p.now += host::IDLE_TIMEOUT;
    let host = std::mem::replace(&mut p.host, Host::Closed);
    let (h, out) = host.on_timeout(p.now);
    p.host = h;
    p.take_host(out);
    p.run();
    assert_eq!(
        p.host_closed,
        Some(CloseReason::Orderly { retry_after: None })
    );
    assert_eq!(
        p.guest_closed,
        Some(CloseReason::Orderly { retry_after: None })
    );
}

#[test]
fn keys_are_released_and_refused_per_key() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    let names = vec![
        KeyName::new("disk").unwrap(),
        KeyName::new("secret").unwrap(),
    ];
    let Guest::Established(s) = &mut p.guest else {
        panic!()
    };
    let out = s.request_keys(names.clone(), p.now).unwrap();
    // One request at a time.
    assert_eq!(
        s.request_keys(names, p.now).unwrap_err(),
        RequestRefused::Busy
    );
    p.take_guest(out);
    p.run();
    let keys = p
        .guest_events
        .iter()
        .find_map(|e| match e {
            GuestEvent::Keys(k) => Some(k),
            _ => None,
        })
        .unwrap();
    assert_eq!(keys.released.len(), 1);
    assert_eq!(keys.refused[0].code, ErrorCode::NotPermitted);
    assert!(p.established());
}

#[test]
fn kill_switch_holds_requests_without_ending_the_session() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    // The host flips the kill switch; the guest learns it.
    let Host::Established(h) = &mut p.host else {
        panic!()
    };
    let out = h.update_features(features(FeatureState::Disabled));
    p.take_host(out);
    p.run();
    let Guest::Established(s) = &mut p.guest else {
        panic!()
    };
    assert_eq!(
        s.request_keys(vec![KeyName::new("disk").unwrap()], p.now)
            .unwrap_err(),
        RequestRefused::FeatureOff {
            feature: feature::KEY_RELEASE,
            state: FeatureState::Disabled
        }
    );

    // A guest that raced the flip is told to wait, and holds off.
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    let Guest::Established(s) = &mut p.guest else {
        panic!()
    };
    let out = s
        .request_keys(vec![KeyName::new("disk").unwrap()], p.now)
        .unwrap();
    let Host::Established(h) = &mut p.host else {
        panic!()
    };
    let _ = h.update_features(features(FeatureState::Disabled)); // lost in flight
    p.take_guest(out);
    p.run();
    assert!(p.established());
    let until = p
        .guest_events
        .iter()
        .find_map(|e| match e {
            GuestEvent::FeatureHeld { until, .. } => Some(*until),
            _ => None,
        })
        .unwrap();
    assert_eq!(until, p.now + Duration::from_secs(300));
}

#[test]
fn key_updates_are_acked_and_bounded() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    let key = |v| ReleasedKey {
        name: KeyName::new("disk").unwrap(),
        version: v,
        material: KeyMaterial::new(vec![v as u8; 32]),
    };
    let Host::Established(h) = &mut p.host else {
        panic!()
    };
    for v in 1..=host::MAX_UNACKED_UPDATES as u32 {
        let out = h.push_key_update(key(v), p.now).unwrap();
        p.to_guest.extend(out.send.iter().map(|b| b.to_vec()));
    }
    assert_eq!(
        h.push_key_update(key(99), p.now).unwrap_err(),
        PushRefused::TooManyOutstanding
    );
    p.run();
    // The guest installs each and acks.
    let updates: Vec<(u64, ReleasedKey)> = p
        .guest_events
        .drain(..)
        .filter_map(|e| match e {
            GuestEvent::KeyUpdate { update_id, key } => Some((update_id, key)),
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), host::MAX_UNACKED_UPDATES);
    for (id, k) in &updates {
        let Guest::Established(s) = &mut p.guest else {
            panic!()
        };
        let out = s.ack_update(*id, k, true, p.now);
        p.take_guest(out);
    }
    p.run();
    let acked = p
        .host_events
        .iter()
        .filter(|e| matches!(e, HostEvent::UpdateAcked { error: None, .. }))
        .count();
    assert_eq!(acked, host::MAX_UNACKED_UPDATES);
    let Host::Established(h) = &mut p.host else {
        panic!()
    };
    assert!(h.push_key_update(key(100), p.now).is_ok());
}

#[test]
fn derive_confirmation_mismatch_is_opaque_and_permanent() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    let Guest::Established(s) = &mut p.guest else {
        panic!()
    };
    let purpose = Purpose::new("disk-unlock:v1").unwrap();
    let out = s
        .request_derive(purpose, 32, [1; 16], [2; 16], p.now)
        .unwrap();
    p.take_guest(out);
    p.run();
    assert!(
        p.host_events
            .iter()
            .any(|e| matches!(e, HostEvent::DeriveRequest { .. }))
    );
    // The host computed a different tag than the guest expects.
    let Host::Established(h) = &mut p.host else {
        panic!()
    };
    let (open, out) = h.answer_derive(DeriveAnswer::Confirm([3; 16]));
    assert!(open);
    p.take_host(out);
    p.run();
    assert_eq!(
        p.guest_closed,
        Some(CloseReason::Failed(Failure::Permanent))
    );
    assert_eq!(
        p.host_closed,
        Some(CloseReason::Failed(Failure::Code {
            code: ErrorCode::AttestationFailed,
            retry_after: None
        }))
    );
}

/// The guest compares the host's confirmation tag in constant time
/// (`transcript::tags_equal`): the exact tag confirms, a tag wrong in its
/// last bit only (what a timing attack would home in on) does not.
#[test]
fn derive_confirmation_needs_every_bit() {
    let expected = [2u8; 16];
    let mut near = expected;
    near[15] ^= 1;
    for (answer, confirmed) in [(expected, true), (near, false)] {
        let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
        p.run();
        let Guest::Established(s) = &mut p.guest else {
            panic!()
        };
        let purpose = Purpose::new("disk-unlock:v1").unwrap();
        let out = s
            .request_derive(purpose, 32, [1; 16], expected, p.now)
            .unwrap();
        p.take_guest(out);
        p.run();
        let Host::Established(h) = &mut p.host else {
            panic!()
        };
        let (_, out) = h.answer_derive(DeriveAnswer::Confirm(answer));
        p.take_host(out);
        p.run();
        let derived = p
            .guest_events
            .iter()
            .any(|e| matches!(e, GuestEvent::Derived { .. }));
        assert_eq!(derived, confirmed, "{answer:?}");
        assert_eq!(p.guest_closed.is_some(), !confirmed, "{answer:?}");
    }
}

#[test]
fn host_shutdown_tells_the_guest_when_to_return() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    let host = std::mem::replace(&mut p.host, Host::Closed);
    let (h, out) = host.shutdown(Duration::from_secs(30));
    p.host = h;
    p.take_host(out);
    p.run();
    assert_eq!(
        p.guest_closed,
        Some(CloseReason::Orderly {
            retry_after: Some(Duration::from_secs(30))
        })
    );
}

#[test]
fn the_host_sends_an_established_session_to_reattest() {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    let host = std::mem::replace(&mut p.host, Host::Closed);
    let (h, out) = host.reattest(Duration::from_secs(1));
    assert!(matches!(h, Host::Closed));
    let sent: Vec<Message> = out
        .send
        .iter()
        .map(|b| Message::decode(b).unwrap())
        .collect();
    assert!(
        matches!(
            sent.as_slice(),
            [Message::Goodbye(g)] if g.reason == GoodbyeReason::Reattest && g.retry_after_ms == Some(1000)
        ),
        "{sent:?}"
    );
    p.host = h;
    p.take_host(out);
    p.run();
    assert_eq!(
        p.guest_closed,
        Some(CloseReason::Orderly {
            retry_after: Some(Duration::from_secs(1))
        })
    );
    // Not yet Established: left as it is (its evidence meets the policy
    // of its verification).
    let p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    let (h, out) = p.host.reattest(Duration::from_secs(1));
    assert!(out.send.is_empty() && out.close.is_none());
    assert!(!matches!(h, Host::Closed | Host::Established(_)));
}

#[test]
fn a_generation_change_ends_the_session_in_order_to_attest_again() {
    // Established: goodbye(reattest), an orderly close, no failure (§11.4).
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    assert!(p.established());
    let guest = std::mem::replace(&mut p.guest, Guest::Closed);
    let (g, out) = guest.on_generation_changed();
    assert!(matches!(g, Guest::Closed));
    let sent: Vec<Message> = out
        .send
        .iter()
        .map(|b| Message::decode(b).unwrap())
        .collect();
    assert!(
        matches!(
            sent.as_slice(),
            [Message::Goodbye(g)] if g.reason == GoodbyeReason::Reattest && g.retry_after_ms.is_none()
        ),
        "{sent:?}"
    );
    assert_eq!(out.close, Some(CloseReason::Orderly { retry_after: None }));
    // The host takes the goodbye as the end of the session.
    p.guest = g;
    p.take_guest(out);
    p.run();
    assert!(matches!(p.host, Host::Closed), "{:?}", p.host);
    // During the handshake: the attempt is dropped without a word.
    let p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    assert!(matches!(p.guest, Guest::AwaitChallenge(_)));
    let (g, out) = p.guest.on_generation_changed();
    assert!(matches!(g, Guest::Closed));
    assert!(out.send.is_empty());
    assert_eq!(out.close, Some(CloseReason::Orderly { retry_after: None }));
    // Closed: nothing.
    let (_, out) = Guest::Closed.on_generation_changed();
    assert!(out.send.is_empty() && out.close.is_none());
}

#[test]
fn a_malformed_error_is_never_answered() {
    // A busy error that also carries a supported-version range: it fails to
    // decode, but it is an error, so neither side answers it (§8.3).
    let bad_error = hex::decode("820da2000a03820101").unwrap();
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.run();
    p.to_guest.push_back(bad_error.clone());
    p.run();
    assert_eq!(
        p.guest_closed,
        Some(CloseReason::Failed(Failure::Permanent))
    );
    assert!(
        p.host_closed.is_none(),
        "the host got an answer: {:?}",
        p.host_closed
    );

    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.to_host.clear();
    p.to_host.push_back(bad_error);
    p.run();
    assert_eq!(p.host_closed, Some(CloseReason::Failed(Failure::Permanent)));
    assert!(
        p.guest_closed.is_none(),
        "the guest got an answer: {:?}",
        p.guest_closed
    );

    // Any other malformed message is answered with malformed.
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    p.to_host.clear();
    p.to_host
        .push_back(hex::decode("820ba20001 0002".replace(' ', "")).unwrap());
    p.run();
    assert_eq!(
        guest_failure(&p),
        Failure::Code {
            code: ErrorCode::Malformed,
            retry_after: None
        }
    );
}

// Re-enabling a feature (§12.3): the guest waits U[0, 10 s] after the
// `feature-update`, and for any hold still running, before it uses the
// feature again, and says so once with `FeatureUsable`.

fn feature_map(
    release: FeatureState,
    derivation: FeatureState,
    rotation: FeatureState,
) -> Features {
    [
        (feature::KEY_RELEASE, release),
        (feature::KEY_DERIVATION, derivation),
        (feature::KEY_ROTATION, rotation),
    ]
    .into()
}

/// A pair attested with key release off (`off`), the rest enabled.
fn pair_with_release(off: FeatureState, nonce: [u8; 32]) -> Pair {
    let on = FeatureState::Enabled;
    let mut p = Pair::with_nonce((1, 1), Some("vm-1"), feature_map(off, on, on), nonce);
    p.run();
    assert!(p.established());
    p
}

fn all_enabled() -> Features {
    let on = FeatureState::Enabled;
    feature_map(on, on, on)
}

fn disk() -> Vec<KeyName> {
    vec![KeyName::new("disk").unwrap()]
}

#[test]
fn a_reenabled_feature_is_usable_only_after_its_drawn_delay() {
    let mut p = pair_with_release(FeatureState::Disabled, [3; 32]);
    let t0 = p.now;
    // Nothing is pending: the deadline is the keepalive.
    assert_eq!(p.guest.deadline(), Some(t0 + guest::KEEPALIVE_INTERVAL));
    p.host_updates(all_enabled());
    assert!(matches!(
        p.guest_events.last(),
        Some(GuestEvent::Features(_))
    ));
    // The guest wakes at the drawn instant, within the jitter.
    let at = p.guest.deadline().unwrap();
    assert!(at - t0 <= guest::FEATURE_REENABLE_JITTER, "{:?}", at - t0);
    assert!(at > t0, "this seed draws a delay above zero");
    // Before it: enabled, but held back until that instant.
    let now = p.now;
    assert_eq!(
        p.guest_established().request_keys(disk(), now).unwrap_err(),
        RequestRefused::FeatureHeld {
            feature: feature::KEY_RELEASE,
            until: at
        }
    );
    p.advance_to(at - Duration::from_millis(1));
    assert!(p.usable_events().is_empty());
    // At it: announced once (key rotation is never delayed or announced).
    p.advance_to(at);
    assert_eq!(p.usable_events(), [feature::KEY_RELEASE]);
    assert_eq!(p.guest.deadline(), Some(t0 + guest::KEEPALIVE_INTERVAL));
    for _ in 0..3 {
        p.advance(Duration::from_secs(30));
    }
    assert_eq!(p.usable_events(), [feature::KEY_RELEASE]);
    let now = p.now;
    let out = p.guest_established().request_keys(disk(), now).unwrap();
    p.take_guest(out);
    p.run();
    assert!(
        p.guest_events
            .iter()
            .any(|e| matches!(e, GuestEvent::Keys(k) if k.released.len() == 1))
    );
}

#[test]
fn reenable_delays_spread_over_the_jitter() {
    let mut delays = Vec::new();
    for seed in 0u8..=200 {
        let mut p = pair_with_release(FeatureState::NotYet, [seed; 32]);
        let t0 = p.now;
        p.host_updates(all_enabled());
        let d = p.guest.deadline().unwrap() - t0;
        assert!(d <= guest::FEATURE_REENABLE_JITTER, "seed {seed}: {d:?}");
        delays.push(d);
    }
    delays.sort();
    let (lo, hi) = (delays[0], delays[delays.len() - 1]);
    assert!(lo < Duration::from_secs(1), "lowest {lo:?}");
    assert!(hi > Duration::from_secs(9), "highest {hi:?}");
    delays.dedup();
    assert!(delays.len() > 190, "only {} distinct delays", delays.len());
    // Same seed, same draw: tests and replays are deterministic.
    let draw = |seed| {
        let mut p = pair_with_release(FeatureState::Disabled, [seed; 32]);
        let t0 = p.now;
        p.host_updates(all_enabled());
        p.guest.deadline().unwrap() - t0
    };
    assert_eq!(draw(9), draw(9));
}

#[test]
fn a_reenable_waits_for_a_running_hold() {
    let mut p = pair_with_release(FeatureState::Enabled, [3; 32]);
    let t0 = p.now;
    // The guest asks just as the host kills key release: the update and
    // the refusal (retry-after 300 s) cross the request.
    let out = p.guest_established().request_keys(disk(), t0).unwrap();
    p.take_guest(out);
    let off = feature_map(
        FeatureState::Disabled,
        FeatureState::Enabled,
        FeatureState::Enabled,
    );
    let Host::Established(h) = &mut p.host else {
        panic!()
    };
    let update = h.update_features(off);
    p.take_host(update);
    p.run();
    let until = t0 + Duration::from_secs(300);
    assert!(p.guest_events.iter().any(|e| matches!(
        e,
        GuestEvent::FeatureHeld { feature: feature::KEY_RELEASE, until: u, code: ErrorCode::FeatureDisabled }
            if *u == until
    )));
    // The unkill comes 5 s later: the hold outlasts any draw.
    p.advance(Duration::from_secs(5));
    p.host_updates(all_enabled());
    // The next wake-up is the keepalive (the request went out at t0), not
    // the drawn instant: that one waits for the hold.
    assert_eq!(p.guest.deadline(), Some(t0 + guest::KEEPALIVE_INTERVAL));
    p.advance_to(until - Duration::from_millis(1));
    assert!(p.usable_events().is_empty());
    let now = p.now;
    assert!(matches!(
        p.guest_established().request_keys(disk(), now),
        Err(RequestRefused::FeatureHeld { until: u, .. }) if u == until
    ));
    p.advance_to(until);
    assert_eq!(p.usable_events(), [feature::KEY_RELEASE]);
    assert!(p.established());
}

#[test]
fn a_disabling_update_cancels_a_pending_reenable() {
    let mut p = pair_with_release(FeatureState::Disabled, [3; 32]);
    let t0 = p.now;
    p.host_updates(all_enabled());
    let at = p.guest.deadline().unwrap();
    assert!(at < t0 + guest::FEATURE_REENABLE_JITTER + Duration::from_millis(1));
    // Killed again before the delay ran out.
    p.host_updates(feature_map(
        FeatureState::Disabled,
        FeatureState::Enabled,
        FeatureState::Enabled,
    ));
    assert_eq!(p.guest.deadline(), Some(t0 + guest::KEEPALIVE_INTERVAL));
    p.advance(guest::FEATURE_REENABLE_JITTER + Duration::from_secs(1));
    assert!(p.usable_events().is_empty());
    let now = p.now;
    assert_eq!(
        p.guest_established().request_keys(disk(), now).unwrap_err(),
        RequestRefused::FeatureOff {
            feature: feature::KEY_RELEASE,
            state: FeatureState::Disabled
        }
    );
    // A later unkill draws afresh and is announced once.
    let t1 = p.now;
    p.host_updates(all_enabled());
    let at = p.guest.deadline().unwrap();
    assert!(at >= t1 && at - t1 <= guest::FEATURE_REENABLE_JITTER);
    p.advance(guest::FEATURE_REENABLE_JITTER);
    assert_eq!(p.usable_events(), [feature::KEY_RELEASE]);
}

#[test]
fn an_update_that_keeps_a_feature_enabled_does_not_delay_it() {
    let mut p = pair_with_release(FeatureState::Enabled, [3; 32]);
    // Key rotation goes off: key release stays enabled and usable at once.
    p.host_updates(feature_map(
        FeatureState::Enabled,
        FeatureState::Enabled,
        FeatureState::Disabled,
    ));
    let now = p.now;
    assert!(p.guest_established().request_keys(disk(), now).is_ok());
    assert!(p.usable_events().is_empty());
}

#[test]
fn feature_usable_waits_for_an_outstanding_request() {
    let on = FeatureState::Enabled;
    let off = FeatureState::Disabled;
    let mut p = Pair::with_nonce((1, 1), Some("vm-1"), feature_map(on, off, on), [3; 32]);
    p.run();
    let t0 = p.now;
    p.host_updates(all_enabled());
    let at = p.guest.deadline().unwrap();
    // A key request is outstanding when the delay runs out.
    let out = p.guest_established().request_keys(disk(), t0).unwrap();
    assert_eq!(p.guest.deadline(), Some(t0 + guest::REQUEST_TIMEOUT));
    let guest = std::mem::replace(&mut p.guest, Guest::Closed);
    let (g, o) = guest.on_timeout(at.max(t0 + Duration::from_millis(1)));
    p.guest = g;
    p.take_guest(o);
    assert!(p.usable_events().is_empty());
    // The answer frees the session: key derivation is announced with it.
    p.now = at;
    p.take_guest(out);
    p.run();
    assert_eq!(p.usable_events(), [feature::KEY_DERIVATION]);
    let i = |pred: fn(&GuestEvent) -> bool| p.guest_events.iter().position(pred).unwrap();
    assert!(
        i(|e| matches!(e, GuestEvent::Keys(_)))
            < i(|e| matches!(e, GuestEvent::FeatureUsable { .. }))
    );
}

#[test]
fn refusals_and_feature_maps_name_the_feature_and_its_state() {
    let off = |state| RequestRefused::FeatureOff {
        feature: feature::KEY_RELEASE,
        state,
    };
    assert_eq!(
        off(FeatureState::Disabled).code(),
        Some(ErrorCode::FeatureDisabled)
    );
    assert_eq!(
        off(FeatureState::NotYet).code(),
        Some(ErrorCode::FeatureNotEnabled)
    );
    assert_eq!(
        off(FeatureState::Disabled).to_string(),
        "key-release is disabled by the host's kill switch; nothing to fix on this VM"
    );
    assert!(off(FeatureState::NotYet).is_feature_wait());
    assert!(!RequestRefused::Busy.is_feature_wait());
    for code in [ErrorCode::FeatureDisabled, ErrorCode::FeatureNotEnabled] {
        let state = guest::feature_off_state(code).unwrap();
        assert_eq!(guest::feature_off_code(state), Some(code));
    }
    let map: Features = [
        (feature::KEY_RELEASE, FeatureState::Disabled),
        (feature::KEY_DERIVATION, FeatureState::Enabled),
        (7, FeatureState::NotYet),
    ]
    .into();
    assert_eq!(
        guest::describe_features(&map),
        "key-release=disabled, key-derivation=enabled, feature-7=not-yet"
    );
}
