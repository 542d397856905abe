//! Invariants of the TPM parsers, asserted by the `tpm_parse` fuzz target
//! and by the tests. Each function panics when an invariant breaks; that
//! is its purpose, so it is not for the agents' own code paths.

#![allow(clippy::expect_used)] // Panicking on a broken invariant is the point here.

use super::attest::Attest;
use super::public::{MAX_TPMT_PUBLIC, Public};
use super::signature::Signature;

/// Runs every TPM parser on `data` and checks that each accepted input is
/// the exact encoding of what was parsed (re-marshalling gives `data`
/// back), so no parser skips, ignores or normalises a byte. Returns how
/// many parsers accepted `data`.
pub fn check_parsers(data: &[u8]) -> usize {
    let mut accepted = 0;
    if let Ok(a) = Attest::parse(data) {
        assert_eq!(a.to_bytes(), data, "TPMS_ATTEST does not round-trip");
        assert!(a.pcr_select().len() <= super::attest::MAX_PCR_BANKS);
        accepted += 1;
    }
    if let Ok(s) = Signature::parse(data) {
        assert_eq!(s.to_bytes(), data, "TPMT_SIGNATURE does not round-trip");
        accepted += 1;
    }
    if let Ok(p) = Public::parse(data) {
        assert_eq!(p.to_bytes(), data, "TPM2B_PUBLIC does not round-trip");
        assert_eq!(
            Public::parse_tpmt(&data[2..]).as_ref(),
            Ok(&p),
            "TPM2B_PUBLIC and its TPMT_PUBLIC disagree"
        );
        accepted += 1;
    }
    if let Ok(p) = Public::parse_tpmt(data) {
        assert!(data.len() <= MAX_TPMT_PUBLIC);
        assert_eq!(p.to_tpmt_bytes(), data, "TPMT_PUBLIC does not round-trip");
        let name = p.name();
        assert_eq!(name.len(), 2 + p.name_alg().digest_len());
        accepted += 1;
    }
    accepted
}
