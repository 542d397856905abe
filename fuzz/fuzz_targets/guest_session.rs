//! The guest session driven by arbitrary host payloads (raw bytes, or a
//! real host's messages with one byte changed), quote answers, timer
//! expiries and driver calls. The operations and invariants are in
//! `vkx_common::testing::sessions::check_guest_session`, which
//! `common/tests/fuzz_regressions.rs` replays saved inputs through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::testing::sessions::check_guest_session;

fuzz_target!(|data: &[u8]| {
    check_guest_session(data);
});
