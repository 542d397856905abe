//! The host session driven by arbitrary sequences of guest payloads, timer
//! expiries and driver answers: the host's whole guest-facing state
//! machine, not just its parser. The operations and invariants are in
//! `vkx_common::testing::sessions::check_host_session`, which
//! `common/tests/fuzz_regressions.rs` replays saved inputs through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::testing::sessions::check_host_session;

fuzz_target!(|data: &[u8]| {
    check_host_session(data);
});
