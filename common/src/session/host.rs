//! The host side of a session (PROTOCOL.md §11.5, §11.6, §11.7).
//!
//! Starts right after the TLS handshake with what the host knows before the
//! guest says anything: the peer's identity as the transport reported it
//! (never as the guest claims it), the PCR selection and the feature state
//! for that VM, and fresh random values. Verification, policy and key
//! lookups are the driver's: the session emits [`HostEvent`]s and takes the
//! answers back, so it stays pure and fuzzable.
//!
//! Every guest byte is hostile: each payload is strictly decoded and
//! checked against the state; every wait has a deadline, the handshake as a
//! whole has [`HANDSHAKE_DEADLINE`], and pushes are bounded by
//! [`MAX_UNACKED_UPDATES`].
//!
//! Admission control and rate limits are the driver's decisions; what goes
//! on the wire when it decides is here: [`Host::refuse`] for a connection
//! turned away right after TLS (§11.6, Accepted), [`Host::rate_limited`]
//! for a session over its message rate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CloseReason, Output, after, decode_or_close, negotiate};
use crate::errors::ErrorCode;
use crate::retry::Failure;
use crate::transcript::{TRANSCRIPT_EXPORTER_LEN, TRANSCRIPT_HASH_LEN, transcript_hash};
use crate::wire::{
    AttestationResult, CONFIRM_TAG_LEN, Challenge, DeriveConfirm, ErrorMessage, Evidence,
    FeatureState, FeatureUpdate, Features, GoodbyeReason, KeyName, KeyRelease, KeyUpdate,
    MAX_RETRY_AFTER_MS, MIN_REATTEST_AFTER_S, Message, NONCE_LEN, PcrBankSelection, Pong, Purpose,
    ReleasedKey, SESSION_ID_LEN, VersionRange, VmId, feature,
};

/// §11.1 host timers. The handshake's three are the unauthenticated
/// window: a peer holds a handshake slot (§15.5) for at most
/// `TLS_HANDSHAKE_TIMEOUT` + `HANDSHAKE_DEADLINE` before it has sent
/// evidence, so they are as short as a guest's hello (sent at once) and a
/// vTPM quote (well under a second, §11.1's margin for a loaded node) allow.
pub const AWAIT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
pub const AWAIT_EVIDENCE_TIMEOUT: Duration = Duration::from_secs(20);
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const KEY_UPDATE_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Outstanding key-update pushes per session.
pub const MAX_UNACKED_UPDATES: usize = 8;

/// Host-wide settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub versions: VersionRange,
    /// Seconds until a guest must attest again.
    pub reattest_after_s: u32,
    /// `retry-after` sent with feature-disabled / feature-not-enabled.
    pub feature_retry_after: Duration,
}

/// What the host knows about one connection before the guest speaks.
#[derive(Debug, Clone)]
pub struct PeerContext {
    /// The VM the transport says this is; `None` if the host cannot map the
    /// peer (it is then refused after `hello`, opaquely).
    pub vm_id: Option<VmId>,
    pub cid: Option<u32>,
    pub selection: Vec<PcrBankSelection>,
    pub features: Features,
    /// When the transport accepted the connection.
    pub accepted_at: Instant,
}

/// Share of `reattest-after` a session's value may fall short of the
/// configured one: 10 % (PROTOCOL.md §6.6).
pub const REATTEST_SPREAD_DIVISOR: u32 = 10;

/// This session's `reattest-after`: the configured `r` minus up to
/// 1/[`REATTEST_SPREAD_DIVISOR`] of it, never below the wire minimum.
/// Guests that attested together (a node's boot, the return after a
/// crash) then re-attest spread over minutes, not together. The draw is
/// the session id's first 8 bytes: random, host-chosen, and already sent
/// to the guest, so nothing else needs drawing.
pub fn spread_reattest(r: u32, session_id: &[u8; SESSION_ID_LEN]) -> u32 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&session_id[..8]);
    let draw = u128::from(u64::from_le_bytes(first));
    let span = u128::from(r / REATTEST_SPREAD_DIVISOR);
    // span * draw / 2^64 < span <= u32::MAX / 10: fits.
    let cut = u32::try_from((span * draw) >> 64).unwrap_or(0);
    r.saturating_sub(cut).max(MIN_REATTEST_AFTER_S.min(r))
}

/// Fresh random values for one session, drawn by the driver.
#[derive(Debug, Clone, Copy)]
pub struct SessionRandom {
    pub host_nonce: [u8; NONCE_LEN],
    pub session_id: [u8; SESSION_ID_LEN],
}

/// Things the driver must act on.
#[derive(Debug)]
pub enum HostEvent {
    /// Verify `evidence` against the transcript, the registry and policy;
    /// then call [`Host::on_verdict`].
    Verify {
        vm_id: VmId,
        transcript_hash: [u8; TRANSCRIPT_HASH_LEN],
        selection: Vec<PcrBankSelection>,
        evidence: Evidence,
    },
    Attested {
        vm_id: VmId,
        session_id: [u8; SESSION_ID_LEN],
    },
    /// Decide each key by policy; then call [`Established::answer_keys`].
    KeyRequest { vm_id: VmId, names: Vec<KeyName> },
    /// Check the purpose and the guest's tag; then call
    /// [`Established::answer_derive`].
    DeriveRequest {
        vm_id: VmId,
        purpose: Purpose,
        length: u8,
        guest_tag: [u8; CONFIRM_TAG_LEN],
    },
    /// A pushed key was acknowledged (installed unless `error` is set).
    UpdateAcked {
        vm_id: VmId,
        update_id: u64,
        name: KeyName,
        version: u32,
        error: Option<ErrorCode>,
    },
}

/// The driver's verdict on evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Any verification or policy failure: the guest learns only
    /// "attestation-failed"; the driver logs the reason.
    Rejected,
    /// The host could not decide (registry unavailable, ...).
    LocalFailure,
}

/// The driver's answer to a [`HostEvent::DeriveRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeriveAnswer {
    Confirm([u8; CONFIRM_TAG_LEN]),
    NotPermitted,
    /// The guest's tag did not verify.
    TagMismatch,
}

/// Why a push was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushRefused {
    #[error("key rotation is not enabled for this VM")]
    FeatureNotEnabled,
    #[error("{MAX_UNACKED_UPDATES} updates are already outstanding")]
    TooManyOutstanding,
    #[error("the key is not valid on the wire")]
    Invalid,
}

/// Why the driver turns a connection away before serving it (§11.6,
/// Accepted; §8.2 codes 10 and 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Admission control: too many handshakes or sessions.
    Busy,
    /// The peer exceeded its connection rate.
    RateLimited,
}

impl Refusal {
    /// The wire code sent for this refusal.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Busy => ErrorCode::Busy,
            Self::RateLimited => ErrorCode::RateLimited,
        }
    }
}

type Out = Output<HostEvent>;

/// The host session, one variant per state.
#[derive(Debug)]
pub enum Host {
    AwaitHello(AwaitHello),
    AwaitEvidence(AwaitEvidence),
    Verifying(Verifying),
    Established(Established),
    Closed,
}

#[derive(Debug)]
pub struct AwaitHello {
    config: Arc<HostConfig>,
    peer: PeerContext,
    exporter: [u8; TRANSCRIPT_EXPORTER_LEN],
    random: SessionRandom,
    deadline: Instant,
}

#[derive(Debug)]
pub struct AwaitEvidence {
    config: Arc<HostConfig>,
    vm_id: VmId,
    features: Features,
    selection: Vec<PcrBankSelection>,
    transcript_hash: [u8; TRANSCRIPT_HASH_LEN],
    session_id: [u8; SESSION_ID_LEN],
    handshake_deadline: Instant,
    deadline: Instant,
}

#[derive(Debug)]
pub struct Verifying {
    config: Arc<HostConfig>,
    vm_id: VmId,
    features: Features,
    session_id: [u8; SESSION_ID_LEN],
    handshake_deadline: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Keys,
    Derive(Purpose),
}

#[derive(Debug)]
pub struct Established {
    config: Arc<HostConfig>,
    vm_id: VmId,
    session_id: [u8; SESSION_ID_LEN],
    features: Features,
    pending: Option<Pending>,
    updates: BTreeMap<u64, Instant>,
    next_update_id: u64,
    last_received: Instant,
    reattest_at: Instant,
}

impl Host {
    /// A session on a fresh TLS connection; waits for `hello`.
    pub fn start(
        config: Arc<HostConfig>,
        peer: PeerContext,
        exporter: [u8; TRANSCRIPT_EXPORTER_LEN],
        random: SessionRandom,
        now: Instant,
    ) -> Self {
        let deadline =
            after(now, AWAIT_HELLO_TIMEOUT).min(after(peer.accepted_at, HANDSHAKE_DEADLINE));
        Self::AwaitHello(AwaitHello {
            config,
            peer,
            exporter,
            random,
            deadline,
        })
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Self::AwaitHello(s) => Some(s.deadline),
            Self::AwaitEvidence(s) => Some(s.deadline),
            Self::Verifying(s) => Some(s.handshake_deadline),
            Self::Established(s) => Some(s.deadline()),
            Self::Closed => None,
        }
    }

    pub fn vm_id(&self) -> Option<&VmId> {
        match self {
            Self::AwaitHello(s) => s.peer.vm_id.as_ref(),
            Self::AwaitEvidence(s) => Some(&s.vm_id),
            Self::Verifying(s) => Some(&s.vm_id),
            Self::Established(s) => Some(&s.vm_id),
            Self::Closed => None,
        }
    }

    /// One frame payload from the guest.
    pub fn on_payload(self, payload: &[u8], now: Instant) -> (Self, Out) {
        let mut out = Out::default();
        if matches!(self, Self::Closed) {
            return (self, out);
        }
        let Some(msg) = decode_or_close(payload, &mut out) else {
            return (Self::Closed, out);
        };
        match &msg {
            // Never answer an error or a goodbye (§8.3): close.
            Message::Error(e) => {
                out.close(CloseReason::Failed(Failure::Code {
                    code: e.code,
                    retry_after: None,
                }));
                return (Self::Closed, out);
            }
            Message::Goodbye(_) => {
                out.close(CloseReason::Orderly { retry_after: None });
                return (Self::Closed, out);
            }
            _ => {}
        }
        let next = match self {
            Self::AwaitHello(s) => s.on_message(msg, payload, &mut out, now),
            Self::AwaitEvidence(s) => s.on_message(msg, &mut out),
            Self::Established(mut s) => {
                s.last_received = now;
                if s.on_message(msg, &mut out, now) {
                    Self::Established(s)
                } else {
                    Self::Closed
                }
            }
            Self::Verifying(_) | Self::Closed => {
                unexpected(&mut out);
                Self::Closed
            }
        };
        (next, out)
    }

    /// The driver's verdict on the evidence of [`HostEvent::Verify`].
    pub fn on_verdict(self, verdict: Verdict, now: Instant) -> (Self, Out) {
        let mut out = Out::default();
        let Self::Verifying(s) = self else {
            return (self, out);
        };
        match verdict {
            Verdict::Accepted => {
                let reattest_after_s = spread_reattest(s.config.reattest_after_s, &s.session_id);
                out.send(AttestationResult {
                    session_id: s.session_id,
                    reattest_after_s,
                });
                out.event(HostEvent::Attested {
                    vm_id: s.vm_id.clone(),
                    session_id: s.session_id,
                });
                let reattest = Duration::from_secs(reattest_after_s.into());
                let next = Established {
                    config: s.config,
                    vm_id: s.vm_id,
                    session_id: s.session_id,
                    features: s.features,
                    pending: None,
                    updates: BTreeMap::new(),
                    next_update_id: 1,
                    last_received: now,
                    reattest_at: after(now, reattest),
                };
                (Self::Established(next), out)
            }
            Verdict::Rejected => {
                out.fail(
                    ErrorCode::AttestationFailed,
                    CloseReason::Failed(Failure::Permanent),
                );
                (Self::Closed, out)
            }
            Verdict::LocalFailure => {
                out.fail_code(ErrorCode::Internal);
                (Self::Closed, out)
            }
        }
    }

    /// Call at [`Host::deadline`] (earlier calls do nothing).
    pub fn on_timeout(self, now: Instant) -> (Self, Out) {
        let mut out = Out::default();
        if self.deadline().is_none_or(|d| now < d) {
            return (self, out);
        }
        match self {
            Self::AwaitHello(_) | Self::AwaitEvidence(_) | Self::Verifying(_) => {
                out.fail_code(ErrorCode::Timeout);
                (Self::Closed, out)
            }
            Self::Established(s) => {
                if s.updates.values().any(|d| now >= *d) {
                    out.fail_code(ErrorCode::Timeout);
                } else if now >= s.reattest_at {
                    out.goodbye(GoodbyeReason::Reattest, None);
                    out.close(CloseReason::Orderly { retry_after: None });
                } else {
                    out.goodbye(GoodbyeReason::Idle, None);
                    out.close(CloseReason::Orderly { retry_after: None });
                }
                (Self::Closed, out)
            }
            Self::Closed => (Self::Closed, out),
        }
    }

    /// End of stream or a transport/TLS failure.
    pub fn on_transport_closed(self) -> (Self, Out) {
        let mut out = Out::default();
        if !matches!(self, Self::Closed) {
            out.close(CloseReason::Failed(Failure::Transport));
        }
        (Self::Closed, out)
    }

    /// A connection admission control turned away (§11.6, Accepted: over
    /// the admission limit, or the peer's connection rate exceeded): right
    /// after the TLS handshake, without reading `hello`, send E(busy) or
    /// E(rate-limited) with `retry-after` (class A: always present; clamped
    /// to the wire range), then close. No session exists for such a peer:
    /// the result is always [`Host::Closed`].
    pub fn refuse(refusal: Refusal, retry_after: Duration) -> (Self, Out) {
        let mut out = Out::default();
        let code = refusal.code();
        let ms = retry_after_ms(retry_after);
        out.send(ErrorMessage {
            retry_after_ms: Some(ms),
            ..ErrorMessage::new(code)
        });
        out.close(CloseReason::Failed(Failure::Code {
            code,
            retry_after: Some(Duration::from_millis(ms.into())),
        }));
        (Self::Closed, out)
    }

    /// The peer's message rate was exceeded (§11.6, events common to every
    /// state after TLS): send E(rate-limited) with `retry-after`; close. In
    /// Closed, nothing.
    pub fn rate_limited(self, retry_after: Duration) -> (Self, Out) {
        if matches!(self, Self::Closed) {
            return (Self::Closed, Out::default());
        }
        Self::refuse(Refusal::RateLimited, retry_after)
    }

    /// The host sends this session to attest again (PROTOCOL.md §11.7:
    /// another session of its VM showed a rewound TPM, §15.8, or the
    /// host's policy changed so that it no longer allows what the session
    /// proved): in Established, `goodbye(reattest)` with `retry-after`,
    /// then close. A session not yet Established is left as it is: its
    /// evidence is judged by the policy of the moment it is verified.
    pub fn reattest(self, retry_after: Duration) -> (Self, Out) {
        let mut out = Out::default();
        match self {
            Self::Established(_) => {
                out.goodbye(GoodbyeReason::Reattest, Some(retry_after_ms(retry_after)));
                out.close(CloseReason::Orderly { retry_after: None });
                (Self::Closed, out)
            }
            other => (other, out),
        }
    }

    /// The host agent is stopping: tell the guest when to come back.
    pub fn shutdown(self, retry_after: Duration) -> (Self, Out) {
        let mut out = Out::default();
        let ms = u32::try_from(retry_after.as_millis())
            .unwrap_or(MAX_RETRY_AFTER_MS)
            .clamp(1, MAX_RETRY_AFTER_MS);
        match self {
            Self::Closed => return (Self::Closed, out),
            Self::Established(_) => out.goodbye(GoodbyeReason::Shutdown, Some(ms)),
            _ => out.send(ErrorMessage {
                retry_after_ms: Some(ms),
                ..ErrorMessage::new(ErrorCode::ShuttingDown)
            }),
        }
        out.close(CloseReason::Orderly { retry_after: None });
        (Self::Closed, out)
    }
}

/// A `retry-after` in the wire's range (§8.5): 1 ms .. 24 h.
fn retry_after_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis())
        .unwrap_or(MAX_RETRY_AFTER_MS)
        .clamp(1, MAX_RETRY_AFTER_MS)
}

fn unexpected(out: &mut Out) {
    out.fail(
        ErrorCode::UnexpectedMessage,
        CloseReason::Failed(Failure::Permanent),
    );
}

impl AwaitHello {
    fn on_message(self, msg: Message, payload: &[u8], out: &mut Out, now: Instant) -> Host {
        let Message::Hello(h) = msg else {
            unexpected(out);
            return Host::Closed;
        };
        // Identity before version (§2.6): an unmapped peer learns nothing.
        let Some(vm_id) = self.peer.vm_id else {
            out.fail(
                ErrorCode::AttestationFailed,
                CloseReason::Failed(Failure::Permanent),
            );
            return Host::Closed;
        };
        let theirs = VersionRange {
            min: h.min_version,
            max: h.max_version,
        };
        let Some(version) = negotiate(self.config.versions, theirs) else {
            out.send(ErrorMessage {
                supported: Some(self.config.versions),
                ..ErrorMessage::new(ErrorCode::UnsupportedVersion)
            });
            out.close(CloseReason::Failed(Failure::Permanent));
            return Host::Closed;
        };
        let challenge = Message::Challenge(Challenge {
            version,
            host_nonce: self.random.host_nonce,
            vm_id: vm_id.clone(),
            cid: self.peer.cid,
            pcr_selection: self.peer.selection.clone(),
            features: self.peer.features.clone(),
        });
        let Ok(bytes) = challenge.encode() else {
            // A policy that yields an unencodable challenge is a local bug.
            out.fail(ErrorCode::Internal, CloseReason::Failed(Failure::Permanent));
            return Host::Closed;
        };
        let th = transcript_hash(&self.exporter, payload, &bytes);
        out.send.push(bytes);
        let handshake_deadline = after(self.peer.accepted_at, HANDSHAKE_DEADLINE);
        Host::AwaitEvidence(AwaitEvidence {
            config: self.config,
            vm_id,
            features: self.peer.features,
            selection: self.peer.selection,
            transcript_hash: th,
            session_id: self.random.session_id,
            handshake_deadline,
            deadline: after(now, AWAIT_EVIDENCE_TIMEOUT).min(handshake_deadline),
        })
    }
}

impl AwaitEvidence {
    fn on_message(self, msg: Message, out: &mut Out) -> Host {
        let Message::Evidence(evidence) = msg else {
            unexpected(out);
            return Host::Closed;
        };
        out.event(HostEvent::Verify {
            vm_id: self.vm_id.clone(),
            transcript_hash: self.transcript_hash,
            selection: self.selection,
            evidence,
        });
        Host::Verifying(Verifying {
            config: self.config,
            vm_id: self.vm_id,
            features: self.features,
            session_id: self.session_id,
            handshake_deadline: self.handshake_deadline,
        })
    }
}

impl Established {
    pub fn vm_id(&self) -> &VmId {
        &self.vm_id
    }

    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        self.session_id
    }

    fn deadline(&self) -> Instant {
        let mut d = self
            .reattest_at
            .min(after(self.last_received, IDLE_TIMEOUT));
        if let Some(u) = self.updates.values().min() {
            d = d.min(*u);
        }
        d
    }

    fn refuse_feature(&self, id: u16, out: &mut Out) -> bool {
        let code = match self.features.get(&id) {
            Some(FeatureState::Enabled) => return false,
            Some(FeatureState::NotYet) => ErrorCode::FeatureNotEnabled,
            Some(FeatureState::Disabled) | None => ErrorCode::FeatureDisabled,
        };
        let ms = u32::try_from(self.config.feature_retry_after.as_millis())
            .unwrap_or(MAX_RETRY_AFTER_MS)
            .clamp(1, MAX_RETRY_AFTER_MS);
        out.send(ErrorMessage {
            retry_after_ms: Some(ms),
            ..ErrorMessage::new(code)
        });
        true
    }

    /// Returns false when the session must close.
    fn on_message(&mut self, msg: Message, out: &mut Out, _now: Instant) -> bool {
        match msg {
            Message::KeyRequest(r) => {
                if self.pending.is_some() {
                    unexpected(out);
                    return false;
                }
                if !self.refuse_feature(feature::KEY_RELEASE, out) {
                    self.pending = Some(Pending::Keys);
                    out.event(HostEvent::KeyRequest {
                        vm_id: self.vm_id.clone(),
                        names: r.names,
                    });
                }
                true
            }
            Message::DeriveRequest(r) => {
                if self.pending.is_some() {
                    unexpected(out);
                    return false;
                }
                if !self.refuse_feature(feature::KEY_DERIVATION, out) {
                    self.pending = Some(Pending::Derive(r.purpose.clone()));
                    out.event(HostEvent::DeriveRequest {
                        vm_id: self.vm_id.clone(),
                        purpose: r.purpose,
                        length: r.length,
                        guest_tag: r.confirm_tag,
                    });
                }
                true
            }
            Message::KeyUpdateAck(a) => {
                if self.updates.remove(&a.update_id).is_none() {
                    unexpected(out);
                    return false;
                }
                out.event(HostEvent::UpdateAcked {
                    vm_id: self.vm_id.clone(),
                    update_id: a.update_id,
                    name: a.name,
                    version: a.version,
                    error: a.error,
                });
                true
            }
            Message::Ping(p) => {
                out.send(Pong {
                    sequence: p.sequence,
                });
                true
            }
            _ => {
                unexpected(out);
                false
            }
        }
    }

    /// The driver's answer to [`HostEvent::KeyRequest`].
    pub fn answer_keys(&mut self, release: KeyRelease) -> Out {
        let mut out = Out::default();
        if self.pending == Some(Pending::Keys) {
            self.pending = None;
            out.send(release);
        }
        out
    }

    /// The driver's answer to [`HostEvent::DeriveRequest`]. Returns false
    /// when the session must close.
    pub fn answer_derive(&mut self, answer: DeriveAnswer) -> (bool, Out) {
        let mut out = Out::default();
        let Some(Pending::Derive(purpose)) = self.pending.take() else {
            return (true, out);
        };
        match answer {
            DeriveAnswer::Confirm(tag) => {
                out.send(DeriveConfirm {
                    purpose,
                    confirm_tag: tag,
                });
                (true, out)
            }
            DeriveAnswer::NotPermitted => {
                out.send(ErrorMessage::new(ErrorCode::NotPermitted));
                (true, out)
            }
            DeriveAnswer::TagMismatch => {
                out.fail(
                    ErrorCode::AttestationFailed,
                    CloseReason::Failed(Failure::Permanent),
                );
                (false, out)
            }
        }
    }

    /// Pushes a rotated key (§6.11), bounded by [`MAX_UNACKED_UPDATES`].
    pub fn push_key_update(&mut self, key: ReleasedKey, now: Instant) -> Result<Out, PushRefused> {
        if self.features.get(&feature::KEY_ROTATION) != Some(&FeatureState::Enabled) {
            return Err(PushRefused::FeatureNotEnabled);
        }
        if self.updates.len() >= MAX_UNACKED_UPDATES {
            return Err(PushRefused::TooManyOutstanding);
        }
        let update_id = self.next_update_id;
        let bytes = Message::KeyUpdate(KeyUpdate { update_id, key })
            .encode()
            .map_err(|_| PushRefused::Invalid)?;
        self.next_update_id += 1;
        self.updates
            .insert(update_id, after(now, KEY_UPDATE_ACK_TIMEOUT));
        let mut out = Out::default();
        out.send.push(bytes);
        Ok(out)
    }

    /// The VM's feature map changed (kill switch, rollout step).
    pub fn update_features(&mut self, features: Features) -> Out {
        let mut out = Out::default();
        if features != self.features {
            self.features = features.clone();
            out.send(FeatureUpdate { features });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::wire::PROTOCOL_VERSION_1;

    fn only_error(out: &Out) -> ErrorMessage {
        match &out.send[..] {
            [one] => match Message::decode(one).unwrap() {
                Message::Error(e) => e,
                other => panic!("not an error: {other:?}"),
            },
            other => panic!("expected one payload, got {}", other.len()),
        }
    }

    fn started(now: Instant) -> Host {
        let config = Arc::new(HostConfig {
            versions: VersionRange {
                min: PROTOCOL_VERSION_1,
                max: PROTOCOL_VERSION_1,
            },
            reattest_after_s: 3600,
            feature_retry_after: Duration::from_secs(30),
        });
        let peer = PeerContext {
            vm_id: Some(VmId::new("vm-1").unwrap()),
            cid: None,
            selection: Vec::new(),
            features: Features::new(),
            accepted_at: now,
        };
        let random = SessionRandom {
            host_nonce: [1; NONCE_LEN],
            session_id: [2; SESSION_ID_LEN],
        };
        Host::start(config, peer, [3; TRANSCRIPT_EXPORTER_LEN], random, now)
    }

    #[test]
    fn reattest_after_is_spread_over_the_last_tenth_and_never_below_the_minimum() {
        let mut id = [0u8; SESSION_ID_LEN];
        assert_eq!(spread_reattest(3600, &id), 3600);
        id[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(spread_reattest(3600, &id), 3241);
        // The minimum stays the minimum.
        assert_eq!(
            spread_reattest(MIN_REATTEST_AFTER_S, &id),
            MIN_REATTEST_AFTER_S
        );
        assert_eq!(spread_reattest(320, &id), MIN_REATTEST_AFTER_S);
        // Over many session ids: within [0.9 R, R], and spread across it.
        let mut seen = std::collections::BTreeSet::new();
        let mut x = 0x0123_4567_89ab_cdef_u64;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            id[..8].copy_from_slice(&x.to_le_bytes());
            let r = spread_reattest(3600, &id);
            assert!((3240..=3600).contains(&r), "{r}");
            seen.insert(r / 36);
        }
        assert!(seen.len() >= 9, "{seen:?}");
    }

    #[test]
    fn a_refusal_is_one_class_a_error_with_retry_after_then_close() {
        for (refusal, code) in [
            (Refusal::Busy, ErrorCode::Busy),
            (Refusal::RateLimited, ErrorCode::RateLimited),
        ] {
            let (host, out) = Host::refuse(refusal, Duration::from_millis(7_500));
            assert!(matches!(host, Host::Closed));
            assert!(out.events.is_empty());
            let e = only_error(&out);
            assert_eq!(e.code, code);
            assert_eq!(e.retry_after_ms, Some(7_500));
            assert_eq!(
                out.close,
                Some(CloseReason::Failed(Failure::Code {
                    code,
                    retry_after: Some(Duration::from_millis(7_500)),
                }))
            );
        }
    }

    #[test]
    fn refusal_retry_after_is_clamped_to_the_wire_range() {
        let (_, out) = Host::refuse(Refusal::Busy, Duration::ZERO);
        assert_eq!(only_error(&out).retry_after_ms, Some(1));
        let (_, out) = Host::refuse(Refusal::Busy, Duration::from_secs(10 * 86_400));
        assert_eq!(only_error(&out).retry_after_ms, Some(MAX_RETRY_AFTER_MS));
    }

    #[test]
    fn a_session_over_its_message_rate_is_told_and_closed() {
        let now = Instant::now();
        let host = started(now);
        assert!(matches!(host, Host::AwaitHello(_)));
        let (host, out) = host.rate_limited(Duration::from_secs(6));
        assert!(matches!(host, Host::Closed));
        let e = only_error(&out);
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.retry_after_ms, Some(6_000));
        assert!(out.close.is_some());
        // Closed stays closed and says nothing more.
        let (host, out) = host.rate_limited(Duration::from_secs(6));
        assert!(matches!(host, Host::Closed));
        assert!(out.send.is_empty() && out.close.is_none());
    }
}
