//! `vkx-guest` as a library: the pieces of the guest agent that the binary
//! and the end-to-end tests share.
//!
//! - [`agent`]: one connection attempt: connect, TLS, session, driven to
//!   its close; shared by `once` and `run`.
//! - [`config`]: the `guest.toml` file.
//! - [`daemon`]: `vkx-guest run`: hold a session, re-attest, reconnect
//!   with the retry policy.
//! - [`get`]: `vkx-guest get NAME`: one key for scripts, fetched over one
//!   attested session.
//! - [`keys`]: key delivery: released keys as files in a tmpfs directory,
//!   replaced atomically, versions recorded.
//! - [`deliver`]: asks for the configured keys once attested, installs
//!   them and every pushed rotation (with its acknowledgement); in the
//!   daemon, asks again once a feature that was off becomes usable.
//! - [`once`]: one attestation over the protocol (`vkx-guest once`).
//! - [`status`]: the daemon's status file (`vkx-guest status`).
//! - [`supervisor`]: the daemon's decisions without I/O (when to wake,
//!   whether to attempt, what to log after an attempt), in virtual time
//!   for tests.
//! - [`tpm`]: evidence collection (TPM2_Quote with the provisioned AK, PCR
//!   values, AK certificate). TPM calls block: call them from a blocking
//!   thread.
//! - [`transport`]: the connection to the host: AF_VSOCK (from a reserved
//!   source port when permitted) or a Unix socket.
//! - [`vmgenid`]: VM generation changes (snapshot restore, clone) from the
//!   kernel log (its VM-fork record), for the daemon's re-attestation.

#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod get;
pub mod keys;
pub mod once;
pub mod status;
pub mod supervisor;
#[cfg(test)]
mod testutil;
pub mod tpm;
pub mod transport;
pub mod vmgenid;
