//! vkx's pure-Rust TPM parsers against tpm2-tss's own unmarshalling
//! (libtss2-mu, through tss-esapi's `Marshall`/`UnMarshall` traits), for
//! the `tpm_parse` fuzz target and the regression replay. Needs the `tss`
//! feature too.
//!
//! For each of TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC and TPMT_PUBLIC:
//! - whatever vkx accepts, tpm2-tss unmarshals, and tpm2-tss marshals the
//!   result back to the input byte for byte (the same structure);
//! - whatever tpm2-tss reads as exactly the input (it unmarshals and
//!   marshals back to the same bytes) and vkx refuses, vkx refuses by one
//!   of its own named restrictions (an algorithm it does not support, a
//!   size limit of its own, an attestation that is not a quote, a value
//!   rule), never as truncated, trailing or badly formed.
//!
//! tpm2-tss ignores bytes after a structure, hence the round trip.

#![allow(clippy::expect_used)] // Test support: a panic is the failure report.

use tss_esapi::structures::{Attest, Public, PublicBuffer, Signature};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::tpm::attest::Attest as VkxAttest;
use crate::tpm::marshal::TpmParseError;
use crate::tpm::public::Public as VkxPublic;
use crate::tpm::selfcheck::check_parsers;
use crate::tpm::signature::Signature as VkxSignature;

/// tpm2-tss reads `data` as exactly one `T`.
fn tss_reads_exactly<T: Marshall + UnMarshall>(data: &[u8]) -> bool {
    T::unmarshall(data)
        .ok()
        .and_then(|t| t.marshall().ok())
        .is_some_and(|b| b == data)
}

fn compare<T: Marshall + UnMarshall>(name: &str, data: &[u8], ours: Result<(), TpmParseError>) {
    let theirs = tss_reads_exactly::<T>(data);
    match ours {
        Ok(()) => assert!(
            theirs,
            "{name}: vkx accepts what tpm2-tss does not read as it"
        ),
        Err(e) if theirs => assert!(
            is_restriction(&e),
            "{name}: tpm2-tss reads it, vkx refuses as malformed: {e:?}"
        ),
        Err(_) => {}
    }
}

/// vkx's own, deliberate restrictions beyond the TPM 2.0 marshalling.
fn is_restriction(e: &TpmParseError) -> bool {
    !matches!(
        e,
        TpmParseError::Truncated { .. } | TpmParseError::TrailingBytes { .. }
    )
}

/// Runs [`check_parsers`] on `data`, then compares each vkx parser's
/// verdict with tpm2-tss's.
pub fn check_against_tss(data: &[u8]) {
    check_parsers(data);
    compare::<Attest>("TPMS_ATTEST", data, VkxAttest::parse(data).map(drop));
    compare::<Signature>("TPMT_SIGNATURE", data, VkxSignature::parse(data).map(drop));
    compare::<PublicBuffer>("TPM2B_PUBLIC", data, VkxPublic::parse(data).map(drop));
    compare::<Public>("TPMT_PUBLIC", data, VkxPublic::parse_tpmt(data).map(drop));
}
