//! `vkx-host` as a library: the pieces of the host agent that the binary
//! and the end-to-end tests share.
//!
//! - [`admission`]: admission control of `serve`: connection, handshake
//!   and hard ceilings, per-peer connection and per-session message token
//!   buckets, jittered `retry-after`.
//! - [`attestation`]: the decision on a guest's evidence: registry AK,
//!   quote verification, policy.
//! - [`config`]: host.toml, typed and checked at load.
//! - [`connection`]: one guest connection's driver (TLS, session, sends
//!   under deadlines) and the refusal of a connection after TLS.
//! - [`derive`]: derived shared keys (§9): the host's answer, the table
//!   of live sessions' keys, the local socket for host processes.
//! - [`drill`]: `vkx-host drill`: a rollout rehearsed in a sandbox of its
//!   own (hosts, etcd, synthetic guests with a confined soft vTPM), its
//!   timeline, SLO verdict and picture.
//! - `enroll` (public with feature `insecure-enroll`): registry entries
//!   for simulated VMs without a TPM, for load generation and tests.
//! - [`evidence`]: `vkx-host evidence inspect|verify` on tpm2-tools files.
//! - [`fsutil`]: size-capped reads, bounded directory scans, private
//!   files and the crash-safe write (temp, fsync, rename, fsync dir), with
//!   one typed error.
//! - [`health`]: health signals per ring and feature for the rollout
//!   controller: counters; the summary's store, publisher (etcd key per
//!   node under a lease, or a local file) and reader (`health::store`).
//!   The versioned summary itself is [`rollout::summary`].
//! - [`keys_cli`]: `vkx-host keys add|generate|rotate|list|verify|remove`,
//!   the operator CLI of the key store.
//! - [`keystore`]: the host's key store: one directory per key, one
//!   AES-256-GCM sealed file per version under the node's master key,
//!   crash-safe writes; the [`keystore::KeyStore`] trait the agent reads.
//! - [`limit`]: generic limits on caller-supplied time: token bucket,
//!   counted slots, per-key caps, each with an RAII guard.
//! - [`listen`]: the one accept loop of every listener (guests, metrics,
//!   derived keys), which owns and awaits its connection tasks.
//! - [`metrics`]: counters and gauges of `serve`, and its Prometheus
//!   text endpoint (Unix socket or loopback TCP).
//! - [`node`]: the node identity (`vkx-host init`): TLS key guests pin,
//!   vTPM CA.
//! - [`policy`]: the attestation and key policy (policy.toml): loaded
//!   and checked whole, evaluated purely.
//! - [`prom`]: the Prometheus text format's two primitives (family
//!   head, sample), shared by `metrics` and `health`.
//! - [`publish`]: watch a source, publish on a `tokio::sync::watch`
//!   (key versions, rollout sources).
//! - [`registry`]: the directory of provisioned VMs (vm-id → EK, AK, AK
//!   certificate digest).
//! - [`release`]: which keys an attested VM gets (policy grant and the
//!   key's allow-list).
//! - [`reload`]: the policy and CID map reloaded on SIGHUP, and the live
//!   sessions a reload no longer allows sent to re-attest.
//! - [`rollout`]: staged rollout and kill switch: the signed rollout
//!   document, rings, per-VM feature maps, admission (revisions only go
//!   up; widening needs a trusted signature), persistence.
//! - [`rollout_cli`]: `vkx-host rollout show|explain|kill|unkill|set-stage|
//!   push|sign|keygen`, the operator CLI of the rollout and kill switch.
//! - [`rollout_node`]: the node context `rollout_cli` and `rollout_run`
//!   share: host.toml's `[rollout]`, `--config`/`--key`, the signing key,
//!   the pre-write check.
//! - [`rollout_service`]: the rollout runtime of `serve`: host.toml's
//!   `[rollout]`, the node's rollout state restored before the first
//!   guest, the task that follows the source and the override file and
//!   publishes the [`rollout::View`] every session reads.
//! - [`serve`]: the host agent's async driver (`vkx-host serve`).
//! - [`service`]: the shared service context of `serve` and its answers
//!   to session events (verify, release, derive, rotate).
//! - [`source`]: where the rollout document is read from (a watched file
//!   or an etcd key), fail-static, bounded; and written to (`rollout push`).
//! - [`trust`]: what the host trusts now (policy and CID map, one
//!   value a reload replaces whole), what a session proved, and whether
//!   the current trust still allows it.
//! - [`vsock`]: AF_VSOCK listener configuration and admission by CID;
//!   the hybrid-vsock CONNECT preamble (host to guest).
//! - [`vtpm`]: the node's vTPM CA and vTPM provisioning (EK, AK, AK
//!   certificate in NV). TPM calls block: call them from a blocking thread.

#![forbid(unsafe_code)]

pub mod admission;
pub mod attestation;
pub mod config;
pub mod connection;
pub mod derive;
pub mod drill;
// Registry entries for simulated VMs without a TPM (load generation and
// tests): public only with the `insecure-enroll` feature, which no
// production build enables (`make package`, `make test`'s binaries).
// Without it only the drill's sandbox enrols its own soft vTPMs through it.
#[cfg(feature = "insecure-enroll")]
pub mod enroll;
#[cfg(not(feature = "insecure-enroll"))]
#[allow(unreachable_pub)]
mod enroll;
pub mod evidence;
pub mod fsutil;
pub mod health;
pub mod keys_cli;
pub mod keystore;
pub mod limit;
pub mod listen;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod prom;
pub mod publish;
pub mod registry;
pub mod release;
pub mod reload;
pub mod rollout;
pub mod rollout_cli;
pub mod rollout_node;
pub mod rollout_run;
pub mod rollout_service;
pub mod serve;
pub mod service;
pub mod source;
pub mod trust;
pub mod vsock;
pub mod vtpm;
pub mod vtpm_auth;
