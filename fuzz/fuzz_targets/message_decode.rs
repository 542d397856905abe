//! One frame payload, decoded as a message: the host's first contact with
//! guest bytes. Asserts the codec invariants (see
//! `vkx_common::wire::selfcheck::check_message`) and, differentially, that
//! whatever we accept an independent CBOR decoder (ciborium) reads as one
//! complete item.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::wire::selfcheck::check_message;

fuzz_target!(|data: &[u8]| {
    if check_message(data).is_some() {
        let mut reader = data;
        let value: Result<ciborium::Value, _> = ciborium::from_reader(&mut reader);
        assert!(value.is_ok(), "ciborium rejects an accepted message");
        assert!(
            reader.is_empty(),
            "ciborium sees trailing bytes in an accepted message"
        );
    }
});
