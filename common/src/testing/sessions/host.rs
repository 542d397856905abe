//! The host session alone, driven by fuzzer-chosen operations
//! ([`check_host_session`]).

#![allow(clippy::expect_used)] // Test support: a panic is the failure report.

use super::guest::{template, templates};
use super::*;

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
