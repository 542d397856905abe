//! Test support (feature `testing`): never enabled in the agents'
//! production builds, only by tests, the chaos suite and the fuzz targets.
//!
//! - [`pair`]: the deterministic in-memory [`Pair`](pair::Pair) that wires
//!   a guest and a host session together with virtual time, the way the
//!   async drivers wire them to a TLS stream (quinn-proto's `Pair`).
//! - [`sessions`]: the invariants of both session state machines, checked
//!   over fuzzer-chosen operation sequences. The `host_session`,
//!   `guest_session` and `session_pair` fuzz targets are thin shims over
//!   its functions, and `common/tests/fuzz_regressions.rs` replays their
//!   saved inputs through the same functions.
//!
//! - [`cbor`]: the strict decoder against ciborium, for the
//!   `message_decode` target.
//! - [`tpm`] (with feature `tss` too): the TPM parsers against tpm2-tss's
//!   unmarshalling, for the `tpm_parse` target.
//!
//! Everything here panics when an invariant breaks; that is its purpose.

pub mod cbor;
pub mod pair;
pub mod sessions;
#[cfg(feature = "tss")]
pub mod tpm;
