//! Guest-supplied TPM structures (TPMS_ATTEST, TPMT_SIGNATURE,
//! TPM2B_PUBLIC / TPMT_PUBLIC) through every TPM parser. Asserts the
//! parser invariants (see `vkx_common::tpm::selfcheck::check_parsers`:
//! no panic, every accepted input re-marshals to itself) and,
//! differentially, agreement with tpm2-tss's own unmarshalling (see
//! `vkx_common::testing::tpm::check_against_tss`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::testing::tpm::check_against_tss;

fuzz_target!(|data: &[u8]| {
    check_against_tss(data);
});
