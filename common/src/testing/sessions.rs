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

// ---------------------------------------------------------------------------
// The host session alone.

#[derive(Debug, Arbitrary)]
enum HostOp {
    Payload(Vec<u8>),
    /// A valid-looking hello, so the fuzzer gets past the first state.
    Hello {
        min: u16,
        max: u16,
    },
    /// A guest message from the templates (evidence, requests, acks, ...),
    /// optionally with one byte changed: without them the fuzzer never
    /// builds a decodable `evidence` and the host stays in its first two
    /// states.
    Guest {
        index: u8,
        flip: Option<(u16, u8)>,
    },
    Advance(u16),
    Verdict(u8),
    AnswerKeys,
    AnswerDerive(u8),
    Push,
    Features(u8),
    TransportClosed,
}

fn hello(min: u16, max: u16) -> Vec<u8> {
    Message::Hello(Hello {
        min_version: min.max(1),
        max_version: max.max(min.max(1)),
        agent_name: AgentName::new("fuzz").expect("valid"),
        agent_version: AgentVersion::new("1").expect("valid"),
        guest_nonce: [0; 32],
    })
    .encode()
    .expect("valid hello")
    .to_vec()
}

fn three(v: u8) -> FeatureState {
    [
        FeatureState::Enabled,
        FeatureState::Disabled,
        FeatureState::NotYet,
    ][usize::from(v % 3)]
}

/// The host session driven by arbitrary guest payloads, timer expiries and
/// driver answers: the host's whole guest-facing state machine.
pub fn check_host_session(data: &[u8]) {
    let mut now = Instant::now();
    let mut host = Host::start(
        Arc::new(HostConfig {
            versions: VersionRange { min: 1, max: 1 },
            reattest_after_s: 3600,
            feature_retry_after: Duration::from_secs(60),
        }),
        PeerContext {
            vm_id: Some(VmId::new("vm-fuzz").expect("valid")),
            cid: Some(3),
            selection: vec![PcrBankSelection {
                hash_alg: crate::wire::HashAlg::Sha256,
                pcrs: vec![0, 7],
            }],
            features: features(FeatureState::Enabled),
            accepted_at: now,
        },
        [0; 32],
        SessionRandom {
            host_nonce: [1; 32],
            session_id: [2; 16],
        },
        now,
    );
    for op in ops::<HostOp>(data) {
        let closed = matches!(host, Host::Closed);
        let state = HostState::of(&host);
        let (next, sent, close, payload) = match op {
            HostOp::Payload(p) => {
                let (h, out) = host.on_payload(&p, now);
                (h, out.send, out.close.is_some(), Some(p))
            }
            HostOp::Hello { min, max } => {
                let p = hello(min, max);
                let (h, out) = host.on_payload(&p, now);
                (h, out.send, out.close.is_some(), Some(p))
            }
            HostOp::Guest { index, flip } => {
                let p = template(&templates().to_host, index, flip);
                let (h, out) = host.on_payload(&p, now);
                (h, out.send, out.close.is_some(), Some(p))
            }
            HostOp::Advance(s) => {
                now += Duration::from_secs(s.into());
                let (h, out) = host.on_timeout(now);
                (h, out.send, out.close.is_some(), None)
            }
            HostOp::Verdict(v) => {
                let verdict = [Verdict::Accepted, Verdict::Rejected, Verdict::LocalFailure]
                    [usize::from(v % 3)];
                let (h, out) = host.on_verdict(verdict, now);
                (h, out.send, out.close.is_some(), None)
            }
            HostOp::AnswerKeys => {
                let mut sent = Vec::new();
                if let Host::Established(s) = &mut host {
                    sent = s
                        .answer_keys(KeyRelease {
                            released: vec![],
                            refused: vec![],
                        })
                        .send;
                }
                (host, sent, false, None)
            }
            HostOp::AnswerDerive(v) => {
                let mut sent = Vec::new();
                let mut close = false;
                if let Host::Established(s) = &mut host {
                    let answer = match v % 3 {
                        0 => DeriveAnswer::Confirm([0; 16]),
                        1 => DeriveAnswer::NotPermitted,
                        _ => DeriveAnswer::TagMismatch,
                    };
                    let (open, out) = s.answer_derive(answer);
                    sent = out.send;
                    close = !open;
                }
                (if close { Host::Closed } else { host }, sent, close, None)
            }
            HostOp::Push => {
                let mut sent = Vec::new();
                if let Host::Established(s) = &mut host
                    && let Ok(out) = s.push_key_update(key("k"), now)
                {
                    sent = out.send;
                }
                (host, sent, false, None)
            }
            HostOp::Features(v) => {
                let mut sent = Vec::new();
                if let Host::Established(s) = &mut host {
                    sent = s
                        .update_features([(feature::KEY_RELEASE, three(v))].into())
                        .send;
                }
                (host, sent, false, None)
            }
            HostOp::TransportClosed => {
                let (h, out) = host.on_transport_closed();
                (h, out.send, out.close.is_some(), None)
            }
        };
        let sent: Vec<Vec<u8>> = sent.iter().map(|s| s.to_vec()).collect();
        match payload {
            Some(p) => {
                check_answer(Receiver::Host, &p, &sent, close, closed);
                check_out_of_state(state, &p, &sent, close);
            }
            None => {
                assert!(sent.len() <= MAX_SENDS_PER_INPUT, "{} sends", sent.len());
                assert!(
                    !closed || sent.is_empty(),
                    "a closed session sent something"
                );
            }
        }
        host = next;
        assert_eq!(
            host.deadline().is_none(),
            matches!(host, Host::Closed),
            "open session without a deadline"
        );
    }
}

fn key(name: &str) -> ReleasedKey {
    ReleasedKey {
        name: KeyName::new(name).expect("valid"),
        version: 1,
        material: KeyMaterial::new(vec![1; 32]),
    }
}

// ---------------------------------------------------------------------------
// The guest session alone.

/// Every payload each side sends in one scripted session between a real
/// guest and host, the sessions' templates.
struct Templates {
    /// The host's: challenge, attestation-result, key-release,
    /// derive-confirm, key-update, feature-update, pong, goodbye, plus
    /// errors and a ping the script does not produce.
    to_guest: Vec<Vec<u8>>,
    /// The guest's: hello, evidence, key-request, derive-request,
    /// key-update-ack, ping, plus errors and a goodbye.
    to_host: Vec<Vec<u8>>,
}

/// Template `index` (modulo their number), with byte `flip.0` (modulo the
/// length) XORed with `flip.1`.
fn template(templates: &[Vec<u8>], index: u8, flip: Option<(u16, u8)>) -> Vec<u8> {
    let mut p = templates[usize::from(index) % templates.len()].clone();
    if let Some((at, x)) = flip {
        let i = usize::from(at) % p.len();
        p[i] ^= x;
    }
    p
}

fn templates() -> &'static Templates {
    static TEMPLATES: OnceLock<Templates> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
        let mut t = Templates {
            to_guest: Vec::new(),
            to_host: Vec::new(),
        };
        let pump = |p: &mut Pair, t: &mut Templates| {
            for _ in 0..super::pair::MAX_STEPS {
                if let Some(m) = p.to_guest.pop_front() {
                    t.to_guest.push(m.clone());
                    p.guest_reads(&m);
                } else if let Some(m) = p.to_host.pop_front() {
                    t.to_host.push(m.clone());
                    p.host_reads(&m);
                } else if !p.do_local_work() {
                    return;
                }
            }
        };
        pump(&mut p, &mut t);
        let names = vec![
            KeyName::new("disk").expect("valid"),
            KeyName::new("secret").expect("valid"),
        ];
        let now = p.now;
        let out = p
            .guest_established()
            .request_keys(names, now)
            .expect("usable");
        p.take_guest(out);
        pump(&mut p, &mut t);
        let purpose = Purpose::new("disk").expect("valid");
        let out = p
            .guest_established()
            .request_derive(purpose, 32, [5; 16], [6; 16], now)
            .expect("usable");
        p.take_guest(out);
        pump(&mut p, &mut t);
        if let Some(i) = p
            .host_events
            .iter()
            .position(|e| matches!(e, HostEvent::DeriveRequest { .. }))
        {
            p.host_events.remove(i);
            if let Host::Established(s) = &mut p.host {
                let (_, out) = s.answer_derive(DeriveAnswer::Confirm([6; 16]));
                p.take_host(out);
            }
        }
        pump(&mut p, &mut t);
        if let Host::Established(s) = &mut p.host {
            let mut out = s.push_key_update(key("disk"), now).expect("rotation on");
            out.absorb(s.update_features(features(FeatureState::Disabled)));
            p.take_host(out);
        }
        pump(&mut p, &mut t);
        // The guest's ack of the pushed key, kept but not delivered: the
        // script's host payloads stay those of a session with no ack (the
        // guest_session corpus indexes them).
        let update = p.guest_events.iter().find_map(|e| match e {
            GuestEvent::KeyUpdate { update_id, key } => Some((*update_id, key.clone())),
            _ => None,
        });
        if let (Some((id, k)), Guest::Established(s)) = (update, &mut p.guest) {
            let out = s.ack_update(id, &k, true, now);
            t.to_host.extend(out.send.iter().map(|b| b.to_vec()));
        }
        p.now += crate::session::guest::KEEPALIVE_INTERVAL;
        p.fire_timers();
        pump(&mut p, &mut t);
        let host = std::mem::replace(&mut p.host, Host::Closed);
        let (_, out) = host.shutdown(Duration::from_secs(30));
        t.to_guest.extend(out.send.iter().map(|b| b.to_vec()));
        let unknown = Message::Error(ErrorMessage::new(ErrorCode::UnknownMessage));
        let busy = Message::Error(ErrorMessage {
            retry_after_ms: Some(5_000),
            ..ErrorMessage::new(ErrorCode::Busy)
        });
        for m in [
            Message::Ping(Ping { sequence: 1 }),
            unknown.clone(),
            busy.clone(),
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Reattest,
                retry_after_ms: Some(crate::wire::MAX_RETRY_AFTER_MS),
            }),
        ] {
            t.to_guest.push(m.encode().expect("valid").to_vec());
        }
        for m in [
            unknown,
            busy,
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Normal,
                retry_after_ms: None,
            }),
        ] {
            t.to_host.push(m.encode().expect("valid").to_vec());
        }
        for wanted in [MessageType::Evidence, MessageType::KeyUpdateAck] {
            assert!(
                t.to_host
                    .iter()
                    .any(|m| Message::envelope_type(m) == Some(wanted.code().into())),
                "the script produced no {wanted:?}"
            );
        }
        t
    })
}

#[derive(Debug, Arbitrary)]
enum GuestOp {
    Payload(Vec<u8>),
    /// A host message from the templates, optionally with one byte
    /// changed.
    Host {
        index: u8,
        flip: Option<(u16, u8)>,
    },
    Quote(bool),
    Advance(u16),
    RequestKeys(u8),
    RequestDerive(u8),
    AckUpdate(bool),
    Finish,
    TransportClosed,
}

/// The guest session driven by arbitrary host payloads (raw, or a real
/// host's messages with a byte changed), quotes, timers and driver calls.
pub fn check_guest_session(data: &[u8]) {
    let templates = &templates().to_guest;
    let mut now = Instant::now();
    let (mut guest, _) = Guest::start(guest_config(1, 1), EXPORTER, [3; 32], now);
    let mut pending_quote = None;
    let mut update = None;
    for op in ops::<GuestOp>(data) {
        let closed = matches!(guest, Guest::Closed);
        let mut payload = None;
        let (next, out) = match op {
            GuestOp::Payload(p) => {
                let r = guest.on_payload(&p, now);
                payload = Some(p);
                r
            }
            GuestOp::Host { index, flip } => {
                let p = template(templates, index, flip);
                let r = guest.on_payload(&p, now);
                payload = Some(p);
                r
            }
            GuestOp::Quote(ok) => {
                let evidence = pending_quote.take().filter(|_| ok).map(evidence_for);
                guest.on_quote(evidence, now)
            }
            GuestOp::Advance(s) => {
                now += Duration::from_secs(s.into());
                guest.on_timeout(now)
            }
            GuestOp::RequestKeys(n) => {
                let mut out = Default::default();
                if let Guest::Established(s) = &mut guest {
                    let names = ["disk", "secret", "a", "b"][..usize::from(n % 4) + 1]
                        .iter()
                        .map(|n| KeyName::new(*n).expect("valid"))
                        .collect();
                    out = s.request_keys(names, now).unwrap_or_default();
                }
                (guest, out)
            }
            GuestOp::RequestDerive(len) => {
                let mut out = Default::default();
                if let Guest::Established(s) = &mut guest {
                    let purpose = Purpose::new("disk").expect("valid");
                    out = s
                        .request_derive(purpose, len, [5; 16], [6; 16], now)
                        .unwrap_or_default();
                }
                (guest, out)
            }
            GuestOp::AckUpdate(installed) => {
                let mut out = Default::default();
                if let (Guest::Established(s), Some((id, k))) = (&mut guest, &update) {
                    out = s.ack_update(*id, k, installed, now);
                }
                (guest, out)
            }
            GuestOp::Finish => guest.finish(GoodbyeReason::Normal),
            GuestOp::TransportClosed => guest.on_transport_closed(),
        };
        let sent: Vec<Vec<u8>> = out.send.iter().map(|s| s.to_vec()).collect();
        match &payload {
            Some(p) => check_answer(Receiver::Guest, p, &sent, out.close.is_some(), closed),
            None => {
                assert!(sent.len() <= MAX_SENDS_PER_INPUT, "{} sends", sent.len());
                assert!(
                    !closed || sent.is_empty(),
                    "a closed session sent something"
                );
            }
        }
        if let Some(reason) = &out.close
            && !closed
        {
            if let Some(p) = &payload {
                check_error_close(p, reason);
            }
            check_retry(reason, now);
        }
        for e in out.events {
            match e {
                GuestEvent::QuoteNeeded {
                    qualifying_data, ..
                } => pending_quote = Some(qualifying_data),
                GuestEvent::KeyUpdate { update_id, key } => update = Some((update_id, key)),
                _ => {}
            }
        }
        guest = next;
        assert_eq!(
            guest.deadline().is_none(),
            matches!(guest, Guest::Closed),
            "open session without a deadline"
        );
    }
}

// ---------------------------------------------------------------------------
// Both sessions, through the pair, with network faults.

#[derive(Debug, Arbitrary)]
enum PairOp {
    /// Deliver the next payload towards the host (true) or guest.
    Deliver(bool),
    /// Lose the next payload in that direction.
    Drop(bool),
    /// Send the next payload in that direction twice.
    Duplicate(bool),
    /// Swap the first two payloads in that direction.
    Swap(bool),
    /// Deliver the payload at this index out of order.
    DeliverAt(bool, u8),
    /// A hostile payload to the host, or a corrupted one to the guest.
    Inject(bool, Vec<u8>),
    /// Change one byte of the next payload in that direction.
    Corrupt(bool, u16, u8),
    /// Move virtual time (ms) without firing timers: a delay.
    Delay(u32),
    /// Fire both sessions' timers now.
    Timers,
    Quote,
    /// Answer a pending verification with this verdict (when the evidence
    /// is bound to the host's transcript).
    Verify(u8),
    LookUpKeys,
    RequestKeys(u8),
    AnswerDerive(u8),
    RequestDerive(u8),
    Push,
    Features(u8),
    HostShutdown(u16),
    GuestFinish,
    /// The transport breaks under both.
    CloseTransport,
}

/// What the pair's invariant checks remember of the session.
#[derive(Default)]
struct Ledger {
    /// The transcript hash of the evidence the harness's verifier accepted.
    accepted: Option<[u8; 32]>,
    guest_retry_checked: bool,
}

/// Drives a guest and a host session through the in-memory pair with
/// fuzzer-chosen interleavings, losses, delays, duplicated, reordered and
/// corrupted frames and timer firings.
pub fn check_pair(data: &[u8]) {
    let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
    let mut ledger = Ledger::default();
    for op in ops::<PairOp>(data) {
        match op {
            PairOp::Deliver(to_host) => {
                if let Some(m) = queue(&mut p, to_host).pop_front() {
                    deliver(&mut p, to_host, &m, &ledger);
                }
            }
            PairOp::Drop(to_host) => {
                queue(&mut p, to_host).pop_front();
            }
            PairOp::Duplicate(to_host) => {
                let q = queue(&mut p, to_host);
                if let Some(m) = q.front().cloned()
                    && q.len() < MAX_QUEUED
                {
                    q.push_front(m);
                }
            }
            PairOp::Swap(to_host) => {
                let q = queue(&mut p, to_host);
                if q.len() >= 2 {
                    q.swap(0, 1);
                }
            }
            PairOp::DeliverAt(to_host, i) => {
                let q = queue(&mut p, to_host);
                if !q.is_empty() {
                    let i = usize::from(i) % q.len();
                    if let Some(m) = q.remove(i) {
                        deliver(&mut p, to_host, &m, &ledger);
                    }
                }
            }
            PairOp::Inject(to_host, m) => deliver(&mut p, to_host, &m, &ledger),
            PairOp::Corrupt(to_host, at, x) => {
                if let Some(m) = queue(&mut p, to_host).front_mut() {
                    let i = usize::from(at) % m.len().max(1);
                    if let Some(b) = m.get_mut(i) {
                        *b ^= x;
                    }
                }
            }
            PairOp::Delay(ms) => p.now += Duration::from_millis(ms.into()),
            PairOp::Timers => p.fire_timers(),
            PairOp::Quote => {
                p.quote();
            }
            PairOp::Verify(v) => {
                p.verdict = [Verdict::Accepted, Verdict::Rejected, Verdict::LocalFailure]
                    [usize::from(v % 3)];
                let verify_th_before = p.verify_th;
                if p.verify() == Some(Verdict::Accepted) {
                    // The harness accepts only evidence bound to the
                    // transcript it was asked about.
                    ledger.accepted = p.verify_th;
                } else if p.verify_th != verify_th_before {
                    ledger.accepted = None;
                }
            }
            PairOp::LookUpKeys => {
                if matches!(p.host, Host::Established(_)) {
                    p.look_up_keys();
                }
            }
            PairOp::RequestKeys(n) => {
                if let Guest::Established(s) = &mut p.guest {
                    let names = ["disk", "secret", "a"][..usize::from(n % 3) + 1]
                        .iter()
                        .map(|n| KeyName::new(*n).expect("valid"))
                        .collect();
                    if let Ok(out) = s.request_keys(names, p.now) {
                        p.take_guest(out);
                    }
                }
            }
            PairOp::RequestDerive(len) => {
                if let Guest::Established(s) = &mut p.guest {
                    let purpose = Purpose::new("disk").expect("valid");
                    if let Ok(out) = s.request_derive(purpose, len, [5; 16], [6; 16], p.now) {
                        p.take_guest(out);
                    }
                }
            }
            PairOp::AnswerDerive(v) => {
                let pending = p
                    .host_events
                    .iter()
                    .position(|e| matches!(e, HostEvent::DeriveRequest { .. }));
                if let (Some(i), Host::Established(s)) = (pending, &mut p.host) {
                    p.host_events.remove(i);
                    let answer = match v % 3 {
                        0 => DeriveAnswer::Confirm([6; 16]),
                        1 => DeriveAnswer::NotPermitted,
                        _ => DeriveAnswer::TagMismatch,
                    };
                    let (open, out) = s.answer_derive(answer);
                    p.take_host(out);
                    if !open {
                        p.host = Host::Closed;
                    }
                }
            }
            PairOp::Push => {
                if let Host::Established(s) = &mut p.host
                    && let Ok(out) = s.push_key_update(key("disk"), p.now)
                {
                    p.take_host(out);
                }
            }
            PairOp::Features(v) => {
                if let Host::Established(s) = &mut p.host {
                    let out = s.update_features(features(three(v)));
                    p.take_host(out);
                }
            }
            PairOp::HostShutdown(s) => {
                let host = std::mem::replace(&mut p.host, Host::Closed);
                let (h, out) = host.shutdown(Duration::from_secs(s.into()));
                p.host = h;
                p.take_host(out);
            }
            PairOp::GuestFinish => {
                let guest = std::mem::replace(&mut p.guest, Guest::Closed);
                let (g, out) = guest.finish(GoodbyeReason::Normal);
                p.guest = g;
                p.take_guest(out);
            }
            PairOp::CloseTransport => {
                let guest = std::mem::replace(&mut p.guest, Guest::Closed);
                let (g, out) = guest.on_transport_closed();
                p.guest = g;
                p.take_guest(out);
                let host = std::mem::replace(&mut p.host, Host::Closed);
                let (h, out) = host.on_transport_closed();
                p.host = h;
                p.take_host(out);
            }
        }
        check_pair_state(&mut p, &mut ledger);
    }
}

/// Delivers `m` to one side and checks its answer.
fn deliver(p: &mut Pair, to_host: bool, m: &[u8], ledger: &Ledger) {
    let state = HostState::of(&p.host);
    let (before, closed) = if to_host {
        (p.to_guest.len(), matches!(p.host, Host::Closed))
    } else {
        (p.to_host.len(), matches!(p.guest, Guest::Closed))
    };
    let step: Step = if to_host {
        p.host_reads(m)
    } else {
        p.guest_reads(m)
    };
    let queue = if to_host { &p.to_guest } else { &p.to_host };
    let sent: Vec<Vec<u8>> = queue.iter().skip(before).cloned().collect();
    assert_eq!(sent.len(), step.sends);
    let receiver = if to_host {
        Receiver::Host
    } else {
        Receiver::Guest
    };
    check_answer(receiver, m, &sent, step.closed, closed);
    if to_host {
        check_out_of_state(state, m, &sent, step.closed);
    }
    if !to_host
        && step.closed
        && !closed
        && let Some(reason) = &p.guest_closed
    {
        check_error_close(m, reason);
    }
    if to_host {
        for s in &sent {
            check_release(s, ledger, p);
        }
    }
}

/// A key-release with keys in it needs evidence accepted for the host's
/// transcript, and that transcript must be the one the guest quoted.
fn check_release(sent: &[u8], ledger: &Ledger, p: &Pair) {
    if let Ok(Message::KeyRelease(r)) = Message::decode(sent)
        && !r.released.is_empty()
    {
        let accepted = ledger
            .accepted
            .expect("a key was released without an accepted quote");
        assert_eq!(
            Some(accepted),
            p.verify_th,
            "released under another transcript"
        );
    }
}

fn queue(p: &mut Pair, to_host: bool) -> &mut std::collections::VecDeque<Vec<u8>> {
    if to_host {
        &mut p.to_host
    } else {
        &mut p.to_guest
    }
}

fn check_pair_state(p: &mut Pair, ledger: &mut Ledger) {
    // Every payload the host has queued for the guest, including those
    // from local work, obeys the release rule.
    for s in &p.to_guest {
        check_release(s, ledger, p);
    }
    // Bounded memory: the queues and event lists stay small.
    for q in [&mut p.to_host, &mut p.to_guest] {
        while q.len() > MAX_QUEUED {
            q.pop_back();
        }
    }
    assert!(p.guest_events.len() + p.host_events.len() <= 4 * MAX_OPS * MAX_SENDS_PER_INPUT);
    assert_eq!(p.host.deadline().is_none(), matches!(p.host, Host::Closed));
    assert_eq!(
        p.guest.deadline().is_none(),
        matches!(p.guest, Guest::Closed)
    );
    if let (Some(reason), false) = (&p.guest_closed, ledger.guest_retry_checked) {
        check_retry(reason, p.now);
        ledger.guest_retry_checked = true;
    }
    if matches!(p.host, Host::Established(_)) {
        assert!(
            ledger.accepted.is_some(),
            "host established without an accepted verdict"
        );
    }
}
