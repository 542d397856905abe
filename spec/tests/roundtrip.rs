//! Property tests of the codec over generated messages:
//! - decode(encode(m)) == m for every valid message m;
//! - every encoding validates against spec/vkx.cddl;
//! - for every input the scan and typed decoder accept on their own (gates
//!   1 and 2), encode(decode(b)) == b: the strict decoder alone already
//!   admits only canonical encodings, so gate 3 never fires;
//! - whatever we accept, ciborium (an independent decoder) reads as one
//!   complete item.
//!
//! Inputs for the last two come from mutating valid encodings, which
//! reaches far more interesting bytes than uniform noise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::collections::BTreeMap;

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use vkx_common::errors::ErrorCode;
use vkx_common::wire::scan::scan;
use vkx_common::wire::*;

mod support;

fn name(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._:+-]{{1,{max}}}")).unwrap()
}

fn nonce() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (1u16..=40).prop_map(|v| ErrorCode::from_value(v).unwrap())
}

fn retry_after() -> impl Strategy<Value = Option<u32>> {
    proptest::option::of(1..=MAX_RETRY_AFTER_MS)
}

fn hash_alg() -> impl Strategy<Value = HashAlg> {
    prop_oneof![
        Just(HashAlg::Sha1),
        Just(HashAlg::Sha256),
        Just(HashAlg::Sha384),
        Just(HashAlg::Sha512)
    ]
}

fn algs() -> impl Strategy<Value = Vec<HashAlg>> {
    btree_set(hash_alg(), 1..=MAX_PCR_BANKS).prop_map(|s| s.into_iter().collect())
}

fn pcr_set() -> impl Strategy<Value = Vec<u8>> {
    btree_set(0u8..24, 1..=MAX_PCRS_PER_BANK).prop_map(|s| s.into_iter().collect())
}

fn features() -> impl Strategy<Value = Features> {
    btree_map(
        1u16..=u16::MAX,
        prop_oneof![
            Just(FeatureState::Enabled),
            Just(FeatureState::Disabled),
            Just(FeatureState::NotYet)
        ],
        0..8,
    )
}

fn key_names(min: usize, max: usize) -> impl Strategy<Value = Vec<KeyName>> {
    btree_set(name(MAX_KEY_NAME), min..=max)
        .prop_map(|s| s.into_iter().map(|n| KeyName::new(n).unwrap()).collect())
}

fn released_key() -> impl Strategy<Value = ReleasedKey> {
    (name(MAX_KEY_NAME), 1u32.., vec(any::<u8>(), 1..=64)).prop_map(|(n, version, m)| ReleasedKey {
        name: KeyName::new(n).unwrap(),
        version,
        material: KeyMaterial::new(m),
    })
}

fn hello() -> impl Strategy<Value = Message> {
    (1u16.., 0u16..4, name(32), name(32), nonce()).prop_map(|(min, span, n, v, guest_nonce)| {
        Message::Hello(Hello {
            min_version: min,
            max_version: min.saturating_add(span),
            agent_name: AgentName::new(n).unwrap(),
            agent_version: AgentVersion::new(v).unwrap(),
            guest_nonce,
        })
    })
}

fn challenge() -> impl Strategy<Value = Message> {
    (
        1u16..,
        nonce(),
        name(MAX_VM_ID),
        proptest::option::of(MIN_GUEST_CID..=MAX_GUEST_CID),
        algs().prop_flat_map(|a| {
            let n = a.len();
            (Just(a), vec(pcr_set(), n))
        }),
        features(),
    )
        .prop_map(|(version, host_nonce, vm, cid, (algs, sets), features)| {
            Message::Challenge(Challenge {
                version,
                host_nonce,
                vm_id: VmId::new(vm).unwrap(),
                cid,
                pcr_selection: algs
                    .into_iter()
                    .zip(sets)
                    .map(|(hash_alg, pcrs)| PcrBankSelection { hash_alg, pcrs })
                    .collect(),
                features,
            })
        })
}

fn evidence() -> impl Strategy<Value = Message> {
    let banks = algs().prop_flat_map(|algs| {
        let per_bank: Vec<_> = algs
            .into_iter()
            .map(|alg| {
                btree_map(0u8..24, vec(any::<u8>(), alg.digest_len()), 1..6).prop_map(
                    move |values| PcrBankValues {
                        hash_alg: alg,
                        values,
                    },
                )
            })
            .collect();
        per_bank
    });
    (
        vec(any::<u8>(), 1..200),
        vec(any::<u8>(), 1..300),
        vec(any::<u8>(), MIN_AK_NAME..=MAX_AK_NAME),
        proptest::option::of(vec(any::<u8>(), 1..600)),
        banks,
    )
        .prop_map(
            |(tpm_attest, tpm_signature, ak_name, ak_cert, pcr_values)| {
                Message::Evidence(Evidence {
                    tpm_attest,
                    tpm_signature,
                    ak_name,
                    ak_cert,
                    pcr_values,
                })
            },
        )
}

fn key_release() -> impl Strategy<Value = Message> {
    (
        vec(released_key(), 0..4),
        vec((name(MAX_KEY_NAME), error_code()), 0..4),
    )
        .prop_filter_map(
            "names must be distinct and non-empty",
            |(released, refused)| {
                let mut rel: BTreeMap<KeyName, ReleasedKey> = BTreeMap::new();
                for k in released {
                    rel.insert(k.name.clone(), k);
                }
                let mut refs: BTreeMap<KeyName, ErrorCode> = BTreeMap::new();
                for (n, c) in refused {
                    let n = KeyName::new(n).unwrap();
                    if !rel.contains_key(&n) {
                        refs.insert(n, c);
                    }
                }
                if rel.is_empty() && refs.is_empty() {
                    return None;
                }
                Some(Message::KeyRelease(KeyRelease {
                    released: rel.into_values().collect(),
                    refused: refs
                        .into_iter()
                        .map(|(name, code)| KeyRefusal { name, code })
                        .collect(),
                }))
            },
        )
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello(),
        challenge(),
        evidence(),
        (
            any::<[u8; 16]>(),
            MIN_REATTEST_AFTER_S..=MAX_REATTEST_AFTER_S
        )
            .prop_map(|(session_id, r)| {
                Message::AttestationResult(AttestationResult {
                    session_id,
                    reattest_after_s: r,
                })
            }),
        key_names(1, MAX_KEYS_PER_REQUEST)
            .prop_map(|names| Message::KeyRequest(KeyRequest { names })),
        key_release(),
        (
            name(MAX_PURPOSE),
            MIN_DERIVE_LEN..=MAX_DERIVE_LEN,
            any::<[u8; 16]>()
        )
            .prop_map(
                |(p, length, confirm_tag)| Message::DeriveRequest(DeriveRequest {
                    purpose: Purpose::new(p).unwrap(),
                    length,
                    confirm_tag,
                })
            ),
        (name(MAX_PURPOSE), any::<[u8; 16]>()).prop_map(|(p, confirm_tag)| {
            Message::DeriveConfirm(DeriveConfirm {
                purpose: Purpose::new(p).unwrap(),
                confirm_tag,
            })
        }),
        (any::<u64>(), released_key())
            .prop_map(|(update_id, key)| Message::KeyUpdate(KeyUpdate { update_id, key })),
        (
            any::<u64>(),
            name(MAX_KEY_NAME),
            1u32..,
            proptest::option::of(error_code())
        )
            .prop_map(|(update_id, n, version, error)| Message::KeyUpdateAck(
                KeyUpdateAck {
                    update_id,
                    name: KeyName::new(n).unwrap(),
                    version,
                    error,
                }
            )),
        any::<u64>().prop_map(|sequence| Message::Ping(Ping { sequence })),
        any::<u64>().prop_map(|sequence| Message::Pong(Pong { sequence })),
        (
            error_code(),
            retry_after(),
            proptest::option::of(
                proptest::string::string_regex("[A-Za-z0-9._:+ -]{1,128}").unwrap()
            ),
            (1u16.., 0u16..3)
        )
            .prop_map(|(code, retry_after_ms, detail, (min, span))| {
                let supported = (code == ErrorCode::UnsupportedVersion).then(|| VersionRange {
                    min,
                    max: min.saturating_add(span),
                });
                Message::Error(ErrorMessage {
                    code,
                    retry_after_ms,
                    detail: detail.map(|d| ErrorDetail::new(d).unwrap()),
                    supported,
                })
            }),
        (0u8..4, retry_after()).prop_map(|(r, retry_after_ms)| {
            let reason = [
                GoodbyeReason::Normal,
                GoodbyeReason::Shutdown,
                GoodbyeReason::Reattest,
                GoodbyeReason::Idle,
            ][usize::from(r)];
            Message::Goodbye(Goodbye {
                reason,
                retry_after_ms,
            })
        }),
        features().prop_map(|features| Message::FeatureUpdate(FeatureUpdate { features })),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, value: u8 },
    Insert { at: usize, value: u8 },
    Remove { at: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Insert { at, value }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Flip { at, bit } if n > 0 => bytes[at % n] ^= 1 << bit,
        Mutation::Set { at, value } if n > 0 => bytes[at % n] = value,
        Mutation::Insert { at, value } => bytes.insert(at % (n + 1), value),
        Mutation::Remove { at } if n > 0 => {
            bytes.remove(at % n);
        }
        Mutation::Truncate { at } => bytes.truncate(at % (n + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_inverts_encode(m in any_message()) {
        let bytes = m.encode().unwrap();
        prop_assert!(bytes.len() <= MAX_FRAME_PAYLOAD);
        prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn accepted_mutants_are_canonical(m in any_message(), muts in vec(mutation(), 1..4)) {
        let mut bytes = m.encode().unwrap().to_vec();
        for mu in &muts {
            apply(&mut bytes, mu);
        }
        let full = Message::decode(&bytes);
        prop_assert_ne!(full.as_ref().err(), Some(&DecodeError::NonCanonical));
        if scan(&bytes).is_ok()
            && let Ok(decoded) = Message::decode_scanned(&bytes)
        {
            let again = decoded.encode().unwrap();
            prop_assert_eq!(again.as_slice(), bytes.as_slice());
            prop_assert_eq!(full.as_ref().ok(), Some(&decoded));
        }
        if full.is_ok() {
            let value: Result<ciborium::Value, _> = ciborium::from_reader(bytes.as_slice());
            prop_assert!(value.is_ok(), "ciborium rejects what we accept");
        }
    }
}

proptest! {
    // The CDDL validator re-parses the schema on every call: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_encoding_matches_the_cddl(m in any_message()) {
        let bytes = m.encode().unwrap();
        let r = support::validate(&bytes);
        prop_assert!(r.is_ok(), "{:?} does not match vkx.cddl: {}", m.message_type(), r.unwrap_err());
    }
}

#[test]
fn frames_survive_any_split() {
    // A stream of every positive vector's message, framed, then cut at
    // every possible chunk size: the decoder yields the same messages.
    let msgs: Vec<Message> = [
        Message::Ping(Ping { sequence: 1 }),
        Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Normal,
            retry_after_ms: None,
        }),
        Message::Pong(Pong { sequence: u64::MAX }),
    ]
    .into();
    let mut stream = Vec::new();
    for m in &msgs {
        encode_frame(&m.encode().unwrap(), &mut stream).unwrap();
    }
    for chunk in 1..=stream.len() {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            let mut rest = piece;
            while let Some(payload) = d.decode(&mut rest).unwrap() {
                got.push(Message::decode(payload).unwrap());
            }
            assert!(rest.is_empty());
        }
        d.finish().unwrap();
        assert_eq!(got, msgs, "chunk size {chunk}");
    }
}
