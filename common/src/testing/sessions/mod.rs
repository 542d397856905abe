//! Invariants of the session state machines over fuzzer-chosen operation
//! sequences. Each `check_*` function takes the fuzzer's raw bytes, reads
//! them as a sequence of [`Arbitrary`] operations (as libfuzzer-sys does
//! for a typed target) and panics when an invariant breaks. Bounded:
//! [`MAX_OPS`] operations per input, and every queue of the pair is capped
//! at [`MAX_QUEUED`] payloads.
//!
//! Checked after every operation, on whichever side it touched:
//! - no panic, and one input never makes a session send more than
//!   [`MAX_SENDS_PER_INPUT`] payloads (no amplification);
//! - a closed session stays closed and silent; an open one has a deadline;
//! - a payload that does not decode is answered by nothing but its typed
//!   error (the code [`code_for_decode_error`] gives, e.g.
//!   `unknown-message` for an unknown type), then a close; an `error`
//!   payload is never answered;
//! - a message of a type only the other side sends (§6.1) is answered by
//!   one `unexpected-message` and a close, whatever the state (§5.5 step 5);
//!   so is a guest message outside the one host state it is valid in;
//! - (guest) a host `error` that ends the session reaches the retry policy
//!   as that error, with its code and hint, so a permanent one goes
//!   dormant and a hint is honoured;
//! - (pair) the host releases a key only after a verdict accepted evidence
//!   bound to its own transcript, which is the one the guest quoted;
//! - (pair, guest) when the guest's session ends, the retry policy fed its
//!   close reason schedules the next attempt within the policy's bound,
//!   and a permanent failure makes it dormant.

#![allow(clippy::expect_used)] // Test support: a panic is the failure report.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};

use super::pair::{EXPORTER, Pair, Step, evidence_for, features, guest_config};
use crate::errors::{ErrorCode, RetryClass, code_for_decode_error};
use crate::retry::{
    Failure, MAX_RETRY_AFTER, Next, REPROBE_INTERVAL, REPROBE_JITTER, RETRY_AFTER_JITTER_DIVISOR,
    RetryConfig, RetryPolicy,
};
use crate::session::CloseReason;
use crate::session::guest::{Guest, GuestEvent};
use crate::session::host::{
    DeriveAnswer, Host, HostConfig, HostEvent, PeerContext, SessionRandom, Verdict,
};
use crate::wire::{
    AgentName, AgentVersion, DecodeError, ErrorMessage, FeatureState, Goodbye, GoodbyeReason,
    Hello, KeyMaterial, KeyName, KeyRelease, MAX_FRAME_PAYLOAD, Message, MessageType,
    PcrBankSelection, Ping, Purpose, ReleasedKey, VersionRange, VmId, feature,
};

/// Most operations read from one input.
pub const MAX_OPS: usize = 64;
/// Most messages one input may make a session send.
pub const MAX_SENDS_PER_INPUT: usize = 2;
/// Most payloads a direction of the pair may hold (the fuzzer can
/// duplicate frames; a real transport holds a bounded window too).
pub const MAX_QUEUED: usize = 64;
/// The `error` message type, never answered.
const ERROR_TYPE: u8 = 13;

fn ops<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Vec<T> {
    let mut u = Unstructured::new(data);
    let mut out = Vec::new();
    // The same reading as `Vec::<T>::arbitrary_take_rest`, capped.
    while out.len() < MAX_OPS && !u.is_empty() {
        match T::arbitrary(&mut u) {
            Ok(op) => out.push(op),
            Err(_) => break,
        }
    }
    out
}

/// The answer a session owes `payload` if it does not decode: None if it
/// decodes (or is an `error`, never answered), else the error code.
fn owed_error(payload: &[u8]) -> Option<ErrorCode> {
    match Message::decode(payload) {
        Ok(_) => None,
        Err(e) => {
            // §5.5, §8.3: an `error` whose envelope is intact (steps 1-3:
            // an array of two, type 13, a map body: 0x82 0x0d 0xa0-0xbf)
            // but whose body is not (step 4) is not answered. An envelope
            // broken earlier is answered like any other payload.
            let envelope = payload.get(..2) == Some(&[0x82, ERROR_TYPE][..])
                && payload.get(2).is_some_and(|b| b >> 5 == 5);
            if envelope && is_body_error(&e) {
                None
            } else {
                Some(code_for_decode_error(&e))
            }
        }
    }
}

fn is_body_error(e: &DecodeError) -> bool {
    matches!(
        e,
        DecodeError::WrongType { .. }
            | DecodeError::MissingField { .. }
            | DecodeError::UnknownKey { .. }
            | DecodeError::BadLength { .. }
            | DecodeError::InvalidValue { .. }
    )
}

/// The side that received a payload.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Receiver {
    Host,
    Guest,
}

/// Whether a message of type `t` travels only from the other side to
/// `receiver`'s peer, i.e. never towards `receiver` (§6.1's direction
/// column).
fn wrong_direction(t: MessageType, receiver: Receiver) -> bool {
    use MessageType as T;
    let host_only = matches!(
        t,
        T::Challenge
            | T::AttestationResult
            | T::KeyRelease
            | T::DeriveConfirm
            | T::KeyUpdate
            | T::FeatureUpdate
    );
    let guest_only = matches!(
        t,
        T::Hello | T::Evidence | T::KeyRequest | T::DeriveRequest | T::KeyUpdateAck
    );
    match receiver {
        Receiver::Host => host_only,
        Receiver::Guest => guest_only,
    }
}

/// Checks one session's answer to `payload`: `sent` is what it sent,
/// `closed_before` whether it was closed already.
fn check_answer(
    receiver: Receiver,
    payload: &[u8],
    sent: &[Vec<u8>],
    close: bool,
    closed_before: bool,
) {
    assert!(sent.len() <= MAX_SENDS_PER_INPUT, "{} sends", sent.len());
    for s in sent {
        assert!(!s.is_empty() && s.len() <= MAX_FRAME_PAYLOAD);
    }
    if closed_before {
        assert!(sent.is_empty(), "a closed session answered");
        return;
    }
    if let Ok(m) = Message::decode(payload)
        && wrong_direction(m.message_type(), receiver)
    {
        let answers: Vec<_> = sent.iter().map(|s| Message::decode(s)).collect();
        assert!(
            close,
            "a {:?} left the {} open",
            m.message_type(),
            name(receiver)
        );
        assert!(
            matches!(&answers[..], [Ok(Message::Error(e))] if e.code == ErrorCode::UnexpectedMessage),
            "a {:?} from the wrong direction was answered with {answers:?}",
            m.message_type()
        );
        return;
    }
    let Some(code) = owed_error(payload) else {
        if Message::decode(payload).is_err() {
            assert!(
                sent.is_empty(),
                "a malformed error {payload:02x?} was answered with {:?}",
                sent.iter().map(|s| Message::decode(s)).collect::<Vec<_>>()
            );
        }
        return;
    };
    assert!(close, "an undecodable payload left the session open");
    let answers: Vec<_> = sent.iter().map(|s| Message::decode(s)).collect();
    match &answers[..] {
        [] => {}
        [Ok(Message::Error(e))] => assert_eq!(e.code, code, "wrong code for a refused payload"),
        other => panic!("a refused payload ({code:?}) was answered with {other:?}"),
    }
}

/// The host's state, as far as §6.1's last column needs it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostState {
    AwaitHello,
    AwaitEvidence,
    Verifying,
    Established,
    Closed,
}

impl HostState {
    fn of(host: &Host) -> Self {
        match host {
            Host::AwaitHello(_) => Self::AwaitHello,
            Host::AwaitEvidence(_) => Self::AwaitEvidence,
            Host::Verifying(_) => Self::Verifying,
            Host::Established(_) => Self::Established,
            Host::Closed => Self::Closed,
        }
    }
}

/// Whether a guest message of type `t` is out of place in an open host's
/// state (§6.1: hello only in AwaitHello, evidence only in AwaitEvidence,
/// requests, acks and pings only in Established).
fn out_of_state(state: HostState, t: MessageType) -> bool {
    use MessageType as T;
    let valid_in = match t {
        T::Hello => HostState::AwaitHello,
        T::Evidence => HostState::AwaitEvidence,
        T::KeyRequest | T::DeriveRequest | T::KeyUpdateAck | T::Ping => HostState::Established,
        _ => return false,
    };
    state != HostState::Closed && state != valid_in
}

/// The host's answer to a guest message out of place: one
/// `unexpected-message`, then a close.
fn check_out_of_state(state: HostState, payload: &[u8], sent: &[Vec<u8>], close: bool) {
    if let Ok(m) = Message::decode(payload)
        && out_of_state(state, m.message_type())
    {
        let answers: Vec<_> = sent.iter().map(|s| Message::decode(s)).collect();
        assert!(
            close,
            "a misplaced {:?} left the host open",
            m.message_type()
        );
        assert!(
            matches!(&answers[..], [Ok(Message::Error(e))] if e.code == ErrorCode::UnexpectedMessage),
            "a misplaced {:?} was answered with {answers:?}",
            m.message_type()
        );
    }
}

fn name(receiver: Receiver) -> &'static str {
    match receiver {
        Receiver::Host => "host",
        Receiver::Guest => "guest",
    }
}

/// A host `error` that ends the guest's session must reach the retry
/// policy as that error, with its code and hint (§13: the code's class
/// picks backoff, the hint or dormancy). Reported as anything else (an
/// orderly close, a transport failure), a permanent refusal would be
/// retried at once and a hint ignored.
fn check_error_close(payload: &[u8], reason: &CloseReason) {
    if let Ok(Message::Error(e)) = Message::decode(payload) {
        let expected = CloseReason::Failed(Failure::Code {
            code: e.code,
            retry_after: e.retry_after_ms.map(|ms| Duration::from_millis(ms.into())),
        });
        assert_eq!(*reason, expected, "the guest's close on a host error");
    }
}

/// The retry decision for a guest session that ended with `reason`, from
/// a fresh default policy: it must fall within the policy's bounds.
fn check_retry(reason: &CloseReason, now: Instant) {
    let config = RetryConfig::default();
    let mut policy = RetryPolicy::new(config, 7);
    assert!(policy.attempt(now));
    let next = match reason {
        CloseReason::Orderly { retry_after } => policy.closed(now, *retry_after),
        CloseReason::Failed(f) => policy.failed(now, *f),
    };
    let hint_bound = MAX_RETRY_AFTER + MAX_RETRY_AFTER / RETRY_AFTER_JITTER_DIVISOR;
    let bound = hint_bound.max(REPROBE_INTERVAL + REPROBE_JITTER);
    let wait = next.instant().saturating_duration_since(now);
    assert!(wait <= bound, "retry after {wait:?} (bound {bound:?})");
    let permanent = match reason {
        CloseReason::Failed(Failure::Permanent) => true,
        CloseReason::Failed(Failure::Code { code, .. }) => code.class() == RetryClass::Permanent,
        _ => false,
    };
    if permanent {
        assert!(
            matches!(next, Next::Dormant(_)),
            "a permanent failure ({reason:?}) is retried: {next:?}"
        );
    }
}

/// A feature state from a fuzzer byte.
fn three(v: u8) -> FeatureState {
    [
        FeatureState::Enabled,
        FeatureState::Disabled,
        FeatureState::NotYet,
    ][usize::from(v % 3)]
}

/// A released key of `name`, version 1.
fn key(name: &str) -> ReleasedKey {
    ReleasedKey {
        name: KeyName::new(name).expect("valid"),
        version: 1,
        material: KeyMaterial::new(vec![1; 32]),
    }
}

mod guest;
mod host;
mod pair;

pub use guest::check_guest_session;
pub use host::check_host_session;
pub use pair::check_pair;
