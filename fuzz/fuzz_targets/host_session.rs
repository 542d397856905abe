//! The host session driven by arbitrary sequences of guest payloads, timer
//! expiries and driver answers: the host's whole guest-facing state
//! machine, not just its parser. Checks that it never panics, that a
//! closed session stays closed and silent, that an open session always has
//! a deadline, and that one input never makes it send more than a few
//! messages (no amplification).
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vkx_common::session::host::{
    DeriveAnswer, Host, HostConfig, PeerContext, SessionRandom, Verdict,
};
use vkx_common::wire::{
    FeatureState, HashAlg, KeyMaterial, KeyName, KeyRelease, PcrBankSelection, ReleasedKey,
    VersionRange, VmId, feature,
};

/// Most messages one input may make the host send.
const MAX_SENDS_PER_INPUT: usize = 2;

#[derive(Debug, Arbitrary)]
enum Op {
    Payload(Vec<u8>),
    /// A valid-looking hello, so the fuzzer gets past the first state.
    Hello {
        min: u16,
        max: u16,
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
    use vkx_common::wire::*;
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

fuzz_target!(|ops: Vec<Op>| {
    let mut now = Instant::now();
    let features = [
        (feature::KEY_RELEASE, FeatureState::Enabled),
        (feature::KEY_DERIVATION, FeatureState::Enabled),
        (feature::KEY_ROTATION, FeatureState::Enabled),
    ]
    .into();
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
                hash_alg: HashAlg::Sha256,
                pcrs: vec![0, 7],
            }],
            features,
            accepted_at: now,
        },
        [0; 32],
        SessionRandom {
            host_nonce: [1; 32],
            session_id: [2; 16],
        },
        now,
    );
    let mut closed = false;
    for op in ops.into_iter().take(64) {
        let (next, sends) = match op {
            Op::Payload(p) => {
                let (h, out) = host.on_payload(&p, now);
                (h, out.send.len())
            }
            Op::Hello { min, max } => {
                let (h, out) = host.on_payload(&hello(min, max), now);
                (h, out.send.len())
            }
            Op::Advance(s) => {
                now += Duration::from_secs(s.into());
                let (h, out) = host.on_timeout(now);
                (h, out.send.len())
            }
            Op::Verdict(v) => {
                let verdict = [Verdict::Accepted, Verdict::Rejected, Verdict::LocalFailure]
                    [usize::from(v % 3)];
                let (h, out) = host.on_verdict(verdict, now);
                (h, out.send.len())
            }
            Op::AnswerKeys => {
                let mut n = 0;
                if let Host::Established(s) = &mut host {
                    n = s
                        .answer_keys(KeyRelease {
                            released: vec![],
                            refused: vec![],
                        })
                        .send
                        .len();
                }
                (host, n)
            }
            Op::AnswerDerive(v) => {
                let mut n = 0;
                let mut close = false;
                if let Host::Established(s) = &mut host {
                    let answer = match v % 3 {
                        0 => DeriveAnswer::Confirm([0; 16]),
                        1 => DeriveAnswer::NotPermitted,
                        _ => DeriveAnswer::TagMismatch,
                    };
                    let (open, out) = s.answer_derive(answer);
                    n = out.send.len();
                    close = !open;
                }
                (if close { Host::Closed } else { host }, n)
            }
            Op::Push => {
                let mut n = 0;
                if let Host::Established(s) = &mut host {
                    let key = ReleasedKey {
                        name: KeyName::new("k").expect("valid"),
                        version: 1,
                        material: KeyMaterial::new(vec![1; 32]),
                    };
                    if let Ok(out) = s.push_key_update(key, now) {
                        n = out.send.len();
                    }
                }
                (host, n)
            }
            Op::Features(v) => {
                let mut n = 0;
                if let Host::Established(s) = &mut host {
                    let state = [
                        FeatureState::Enabled,
                        FeatureState::Disabled,
                        FeatureState::NotYet,
                    ][usize::from(v % 3)];
                    n = s
                        .update_features([(feature::KEY_RELEASE, state)].into())
                        .send
                        .len();
                }
                (host, n)
            }
            Op::TransportClosed => {
                let (h, out) = host.on_transport_closed();
                (h, out.send.len())
            }
        };
        assert!(
            sends <= MAX_SENDS_PER_INPUT,
            "{sends} messages for one input"
        );
        if closed {
            assert_eq!(sends, 0, "a closed session sent something");
        }
        host = next;
        closed = matches!(host, Host::Closed);
        assert_eq!(
            host.deadline().is_none(),
            closed,
            "open session without a deadline"
        );
    }
});
