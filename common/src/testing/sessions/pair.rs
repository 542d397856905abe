//! Both sessions through the in-memory pair, with network faults
//! ([`check_pair`]).

#![allow(clippy::expect_used)] // Test support: a panic is the failure report.

use super::*;

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
