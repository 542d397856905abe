//! The value constraints vkx.cddl states, shown enforced by a CDDL
//! validator (the cddl crate, through `support::validate`), and the strict
//! decoder rejecting the same inputs:
//! - a PCR digest is exactly its bank's digest size (sha1 20, sha256 32,
//!   sha384 48, sha512 64), and a bank's hash-alg is one of those four;
//! - PCR indices, as keys of a bank's digests, are 0..23;
//! - feature ids, the keys of `features`, are 1..65535.
//!
//! Each input is a whole message written in diagnostic notation, otherwise
//! valid, so the constraint under test is the only thing wrong with it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

mod support;

use vkx_common::wire::Message;

fn cbor(diag: &str) -> Vec<u8> {
    cbor_diag::parse_diag(diag)
        .unwrap_or_else(|e| panic!("{diag}: {e}"))
        .to_bytes()
}

fn hex_bytes(n: usize) -> String {
    format!("h'{}'", "a5".repeat(n))
}

/// An evidence message whose banks are `banks`, each `(hash-alg, [(index,
/// digest length)])`.
fn evidence(banks: &[(u64, &[(u64, usize)])]) -> Vec<u8> {
    let banks: Vec<String> = banks
        .iter()
        .map(|(alg, digests)| {
            let digests: Vec<String> = digests
                .iter()
                .map(|(i, n)| format!("{i}:{}", hex_bytes(*n)))
                .collect();
            format!("{{0:{alg},1:{{{}}}}}", digests.join(","))
        })
        .collect();
    cbor(&format!(
        "[3,{{0:h'ff544347',1:h'0014000b',2:{},4:[{}]}}]",
        format_args!("h'000b{}'", "44".repeat(32)),
        banks.join(",")
    ))
}

fn feature_update(ids: &[u64]) -> Vec<u8> {
    let entries: Vec<String> = ids.iter().map(|id| format!("{id}:0")).collect();
    cbor(&format!("[15,{{0:{{{}}}}}]", entries.join(",")))
}

fn challenge(ids: &[u64]) -> Vec<u8> {
    let entries: Vec<String> = ids.iter().map(|id| format!("{id}:1")).collect();
    cbor(&format!(
        "[2,{{0:1,1:{},2:\"vm\",4:[{{0:11,1:[0]}}],5:{{{}}}}}]",
        hex_bytes(32),
        entries.join(",")
    ))
}

#[track_caller]
fn accepted(what: &str, bytes: &[u8]) {
    support::validate(bytes).unwrap_or_else(|e| panic!("{what}: CDDL rejects it: {e}"));
    Message::decode(bytes).unwrap_or_else(|e| panic!("{what}: decoder rejects it: {e}"));
}

/// Rejected by the CDDL, and by the decoder with error `kind` in `field`.
#[track_caller]
fn rejected(what: &str, bytes: &[u8], kind: &str, field: &str) {
    assert!(support::validate(bytes).is_err(), "{what}: CDDL accepts it");
    match Message::decode(bytes) {
        Ok(m) => panic!("{what}: decoder accepts it as {m:?}"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{what}: decoder: {e}");
            assert!(
                e.to_string().starts_with(&format!("{field}:")),
                "{what}: decoder: {e}"
            );
        }
    }
}

#[test]
fn each_bank_takes_only_its_digest_size() {
    let sizes = [(4, 20), (11, 32), (12, 48), (13, 64)];
    for (alg, size) in sizes {
        accepted(
            &format!("alg {alg}, {size} bytes"),
            &evidence(&[(alg, &[(0, size), (23, size)])]),
        );
        for (_, other) in sizes.iter().filter(|(_, s)| *s != size) {
            rejected(
                &format!("alg {alg}, {other} bytes"),
                &evidence(&[(alg, &[(0, *other)])]),
                "bad_length",
                "pcr-digest",
            );
        }
        for off_by_one in [size - 1, size + 1] {
            rejected(
                &format!("alg {alg}, {off_by_one} bytes"),
                &evidence(&[(alg, &[(0, size), (7, off_by_one)])]),
                "bad_length",
                "pcr-digest",
            );
        }
    }
    accepted(
        "all four banks",
        &evidence(&[
            (4, &[(0, 20)]),
            (11, &[(0, 32)]),
            (12, &[(0, 48)]),
            (13, &[(0, 64)]),
        ]),
    );
    // A 31-byte digest in the sha256 bank, after a good sha1 bank.
    rejected(
        "sha256 digest of 31 bytes",
        &evidence(&[(4, &[(0, 20)]), (11, &[(0, 31)])]),
        "bad_length",
        "pcr-digest",
    );
}

#[test]
fn a_bank_hash_is_one_of_the_four() {
    for alg in [0, 5, 10, 14, 0x12] {
        rejected(
            &format!("alg {alg}"),
            &evidence(&[(alg, &[(0, 32)])]),
            "invalid_value",
            "hash-alg",
        );
    }
}

#[test]
fn pcr_digest_keys_are_pcr_indices() {
    accepted("PCR 23", &evidence(&[(11, &[(23, 32)])]));
    rejected(
        "PCR 24",
        &evidence(&[(11, &[(0, 32), (24, 32)])]),
        "invalid_value",
        "pcr-index",
    );
}

#[test]
fn feature_ids_are_1_to_65535() {
    accepted("no features", &feature_update(&[]));
    accepted("ids 1 and 65535", &feature_update(&[1, 65535]));
    accepted("challenge, ids 1 and 65535", &challenge(&[1, 65535]));
    for id in [0, 65536, 4_294_967_296] {
        rejected(
            &format!("feature-update, id {id}"),
            &feature_update(&[id]),
            "invalid_value",
            "feature-id",
        );
        rejected(
            &format!("challenge, id {id}"),
            &challenge(&[id]),
            "invalid_value",
            "feature-id",
        );
    }
    // Next to valid ids, on either side.
    for ids in [[0, 1], [3, 65536]] {
        rejected(
            &format!("ids {ids:?}"),
            &feature_update(&ids),
            "invalid_value",
            "feature-id",
        );
    }
}

#[test]
fn the_validator_schema_differs_from_vkx_cddl_only_in_table_keys() {
    let schema = support::validator_schema();
    let normative = vkx_spec::CDDL;
    let changed: Vec<(&str, &str)> = normative
        .lines()
        .zip(schema.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 5, "{changed:#?}");
    for (a, b) in changed {
        assert!(
            (a.contains("* feature-id =>") && b == a.replace("feature-id =>", "uint =>"))
                || (a.contains("1*24 pcr-index =>") && b == a.replace("pcr-index =>", "uint =>")),
            "unexpected change: {a} -> {b}"
        );
    }
    // Step 1 alone accepts a feature id 0: step 2 is what rejects it.
    let zero = feature_update(&[0]);
    assert!(cddl::validate_cbor_from_slice(&schema, &zero, None).is_ok());
    assert!(support::validate(&zero).is_err());
}

#[test]
#[should_panic(expected = "is neither a prelude type nor in TABLE_KEYS")]
fn a_table_keyed_by_a_rule_is_not_passed_to_the_validator_as_it_is() {
    support::assert_table_keys_are_prelude(vkx_spec::CDDL);
}
