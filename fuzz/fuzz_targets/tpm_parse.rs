//! Guest-supplied TPM structures (TPMS_ATTEST, TPMT_SIGNATURE,
//! TPM2B_PUBLIC / TPMT_PUBLIC) through every TPM parser. Asserts the
//! parser invariants (see `vkx_common::tpm::selfcheck::check_parsers`):
//! no panic, and every accepted input re-marshals to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::tpm::selfcheck::check_parsers;

fuzz_target!(|data: &[u8]| {
    check_parsers(data);
});
