//! The guest session alone, fed templates of every payload a real host
//! sends, whole or corrupted ([`check_guest_session`]).

#![allow(clippy::expect_used)] // Test support: a panic is the failure report.

use super::*;

/// Every payload each side sends in one scripted session between a real
/// guest and host, the sessions' templates.
pub(super) struct Templates {
    /// The host's: challenge, attestation-result, key-release,
    /// derive-confirm, key-update, feature-update, pong, goodbye, plus
    /// errors and a ping the script does not produce.
    pub(super) to_guest: Vec<Vec<u8>>,
    /// The guest's: hello, evidence, key-request, derive-request,
    /// key-update-ack, ping, plus errors and a goodbye.
    pub(super) to_host: Vec<Vec<u8>>,
}

/// Template `index` (modulo their number), with byte `flip.0` (modulo the
/// length) XORed with `flip.1`.
pub(super) fn template(templates: &[Vec<u8>], index: u8, flip: Option<(u16, u8)>) -> Vec<u8> {
    let mut p = templates[usize::from(index) % templates.len()].clone();
    if let Some((at, x)) = flip {
        let i = usize::from(at) % p.len();
        p[i] ^= x;
    }
    p
}

pub(super) fn templates() -> &'static Templates {
    static TEMPLATES: OnceLock<Templates> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
        let mut t = Templates {
            to_guest: Vec::new(),
            to_host: Vec::new(),
        };
        let pump = |p: &mut Pair, t: &mut Templates| {
            for _ in 0..crate::testing::pair::MAX_STEPS {
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
