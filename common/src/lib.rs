//! vkx-common: the protocol core shared by the host and guest agents.
//!
//! - [`wire`]: frames and the strictly encoded messages of PROTOCOL.md;
//!   the code that faces hostile bytes.
//! - [`errors`]: the error registry and the mapping of local errors to
//!   wire codes.
//! - [`transcript`]: the transcript hash that binds evidence to a channel,
//!   and key-confirmation tags.
//! - [`pcrs`]: PCR selections and values in tpm2-tools' text and file forms.
//! - [`ratelimit`]: rate-limited logging macros that report what they
//!   suppressed.
//! - [`retry`]: the guest's bounded, jittered retry policy (§13).
//! - [`session`]: the guest and host session state machines (sans-I/O).
//! - [`tls`]: the TLS 1.3 configurations of §4 (rustls, ring) and the
//!   exporter values.
//! - [`tpm`]: TPM 2.0 structure parsers and quote verification (pure Rust).
//! - `testing` (feature `testing`): the in-memory session pair and the
//!   session invariants the fuzz targets check; tests and fuzzing only.
//! - `tss` (feature `tss`): tss-esapi error classification and bounded
//!   retry, for the agents that talk to a TPM.
//!
//! Nothing here does I/O; only the logging macros read the clock (the
//! limiter underneath takes time as an argument).

#![forbid(unsafe_code)]

pub mod errors;
pub mod hybrid;
pub mod pcrs;
pub mod ratelimit;
pub mod retry;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod tpm;
pub mod transcript;
#[cfg(feature = "tss")]
pub mod tss;
pub mod wire;

/// Compile-time check that `T` wipes its memory when dropped (implements
/// [`zeroize::ZeroizeOnDrop`]): `const _: () =
/// vkx_common::assert_zeroize_on_drop::<T>();` beside a type that carries
/// key material. The deprecated `#[zeroize(drop)]` attribute wipes too but
/// does not implement the trait, so it cannot be checked this way.
pub const fn assert_zeroize_on_drop<T: zeroize::ZeroizeOnDrop + ?Sized>() {}
