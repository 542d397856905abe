//! `vkx-guest` as a library: the pieces of the guest agent that the binary
//! and the end-to-end tests share.
//!
//! - [`once`]: one attestation over the protocol (`vkx-guest once`).
//! - [`tpm`]: evidence collection (TPM2_Quote with the provisioned AK, PCR
//!   values, AK certificate). TPM calls block: call them from a blocking
//!   thread.

#![forbid(unsafe_code)]

pub mod once;
pub mod tpm;
