//! One frame payload, decoded as a message: the host's first contact with
//! guest bytes. Asserts the codec invariants (see
//! `vkx_common::wire::selfcheck::check_message`) and, differentially,
//! agreement with an independent CBOR decoder (ciborium) on what is
//! accepted, its value and encoding, and why the rest is refused (see
//! `vkx_common::testing::cbor::check_against_ciborium`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::testing::cbor::check_against_ciborium;

fuzz_target!(|data: &[u8]| {
    check_against_ciborium(data);
});
