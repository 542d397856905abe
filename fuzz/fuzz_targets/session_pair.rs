//! A host and a guest session through the in-memory pair, with
//! fuzzer-chosen interleavings, losses, delays, duplicated, reordered and
//! corrupted frames, hostile payloads and timer firings. The operations
//! and invariants (no key without an accepted quote bound to this
//! transcript, retry decisions within the policy's bound, refused payloads
//! answered only by their typed error, bounded queues) are in
//! `vkx_common::testing::sessions::check_pair`, which
//! `common/tests/fuzz_regressions.rs` replays saved inputs through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::testing::sessions::check_pair;

fuzz_target!(|data: &[u8]| {
    check_pair(data);
});
