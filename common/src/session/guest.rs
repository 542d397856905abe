//! The guest side of a session (PROTOCOL.md §11.3, §11.4, §11.7).
//!
//! Starts right after the TLS handshake: [`Guest::start`] sends `hello`.
//! The driver feeds it payloads ([`Guest::on_payload`]), timer expiries
//! ([`Guest::on_timeout`] at [`Guest::deadline`]), the TPM quote
//! ([`Guest::on_quote`]) and end of stream; in [`Established`] it may also
//! make requests. Connection attempts, backoff and dormancy belong to the
//! driver and [`crate::retry::RetryPolicy`], fed with [`CloseReason`].
//!
//! Feature rollout (§12.3): a request for a feature that is not `enabled`
//! in the current map is refused locally ([`RequestRefused::FeatureOff`],
//! naming the state), and so is one the host asked to hold off
//! ([`RequestRefused::FeatureHeld`]). When a `feature-update` turns a
//! requested feature (key release, key derivation) on again, the session
//! keeps it back for U[0, [`FEATURE_REENABLE_JITTER`]] after receipt, and
//! at least until a running hold ends, so that a node's guests do not all
//! act at the instant of an unkill; [`Guest::deadline`] includes that
//! instant, and [`GuestEvent::FeatureUsable`] says when it has come (once
//! per re-enable). The draw comes from a generator seeded with the guest
//! nonce the driver passed in: jitter needs spread, not secrecy.
//!
//! Trusts nothing the host sends beyond what the pinned TLS channel
//! guarantees: every message is strictly decoded and checked against the
//! state; every wait has a deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CloseReason, Output, after, decode_or_close};
use crate::errors::{ErrorCode, RetryClass};
use crate::retry::{Failure, Jitter};
use crate::transcript::{TRANSCRIPT_EXPORTER_LEN, transcript_hash};
use crate::wire::{
    AgentName, AgentVersion, CONFIRM_TAG_LEN, DeriveRequest, ErrorMessage, Evidence, FeatureState,
    Features, GoodbyeReason, Hello, KeyName, KeyRelease, KeyRequest, KeyUpdateAck, Message,
    NONCE_LEN, PcrBankSelection, Ping, Pong, Purpose, ReleasedKey, SESSION_ID_LEN, VersionRange,
    feature,
};

/// §11.1 guest timers.
pub const AWAIT_CHALLENGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Below the host's `AWAIT_EVIDENCE_TIMEOUT` (20 s), so that a guest whose
/// TPM is slow gives up, with its own `internal`, before the host times
/// it out.
pub const QUOTE_TIMEOUT: Duration = Duration::from_secs(15);
pub const AWAIT_RESULT_TIMEOUT: Duration = Duration::from_secs(20);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(120);
/// §12.3: most delay before using a feature a `feature-update` enabled
/// again, drawn uniformly so a node's guests do not act at one instant.
pub const FEATURE_REENABLE_JITTER: Duration = Duration::from_secs(10);

/// The features the guest uses by its own requests (§12.3), the only ones
/// a re-enable delays: key rotation is pushed by the host and answered at
/// once.
const REQUESTED_FEATURES: [u16; 2] = [feature::KEY_RELEASE, feature::KEY_DERIVATION];

/// What the guest says about itself.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub versions: VersionRange,
    pub agent_name: AgentName,
    pub agent_version: AgentVersion,
}

/// Things the driver must act on.
#[derive(Debug)]
pub enum GuestEvent {
    /// Produce a quote over `qualifying_data` of `selection`, then call
    /// [`Guest::on_quote`].
    QuoteNeeded {
        qualifying_data: [u8; 32],
        selection: Vec<PcrBankSelection>,
    },
    /// The host accepted the evidence.
    Attested {
        session_id: [u8; SESSION_ID_LEN],
        reattest_after: Duration,
        features: Features,
    },
    /// The answer to a key request.
    Keys(KeyRelease),
    /// The host derived the same key for `purpose` (tags verified).
    Derived { purpose: Purpose },
    /// The host refused a request for a while (kill switch or rollout):
    /// `code` is its `feature-disabled` or `feature-not-enabled`.
    FeatureHeld {
        feature: u16,
        until: Instant,
        code: ErrorCode,
    },
    /// A requested feature a `feature-update` enabled again is usable now
    /// (§12.3: its re-enable delay and any hold have elapsed, and no
    /// request is outstanding). Once per re-enable; a disabling update
    /// before then cancels it.
    FeatureUsable { feature: u16 },
    /// The host refused a derivation purpose.
    PurposeRefused { purpose: Purpose },
    /// Install a rotated key, then call [`Established::ack_update`].
    KeyUpdate { update_id: u64, key: ReleasedKey },
    /// The rollout state changed.
    Features(Features),
}

/// Why a local request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestRefused {
    /// The feature is not `enabled` in the current map (absent counts as
    /// `disabled`, §12.1).
    #[error("{}", feature_off_text(*feature, *state))]
    FeatureOff { feature: u16, state: FeatureState },
    /// The feature is enabled but must not be used before `until`: the
    /// host's `retry-after` or the re-enable delay (§12.3).
    #[error(
        "{} is held back until the host's retry-after or the re-enable delay has passed",
        feature_name(*feature)
    )]
    FeatureHeld { feature: u16, until: Instant },
    #[error("a request is already outstanding")]
    Busy,
    #[error("the request is not valid: {0}")]
    Invalid(&'static str),
}

impl RequestRefused {
    /// The code the host would have refused the request with (§12.2), for
    /// a feature that is off: `feature-disabled` or `feature-not-enabled`.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::FeatureOff { state, .. } => feature_off_code(*state),
            _ => None,
        }
    }

    /// The feature is off or held back: the request makes sense again only
    /// after [`GuestEvent::FeatureUsable`].
    pub fn is_feature_wait(&self) -> bool {
        matches!(self, Self::FeatureOff { .. } | Self::FeatureHeld { .. })
    }
}

/// The name of a feature id (§12.1), for people.
pub fn feature_name(feature: u16) -> &'static str {
    known_feature_name(feature).unwrap_or("an unknown feature")
}

fn known_feature_name(id: u16) -> Option<&'static str> {
    match id {
        feature::KEY_RELEASE => Some("key-release"),
        feature::KEY_DERIVATION => Some("key-derivation"),
        feature::KEY_ROTATION => Some("key-rotation"),
        _ => None,
    }
}

/// The name of a feature state (§12.1), for people.
pub fn state_name(state: FeatureState) -> &'static str {
    match state {
        FeatureState::Enabled => "enabled",
        FeatureState::Disabled => "disabled",
        FeatureState::NotYet => "not-yet",
    }
}

/// A feature map for people: `key-release=disabled, key-derivation=enabled`
/// (unknown ids as `feature-7=...`; at most `MAX_FEATURES` entries).
pub fn describe_features(features: &Features) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    for (id, state) in features {
        let sep = if text.is_empty() { "" } else { ", " };
        let state = state_name(*state);
        // Writing to a String cannot fail.
        let _ = match known_feature_name(*id) {
            Some(name) => write!(text, "{sep}{name}={state}"),
            None => write!(text, "{sep}feature-{id}={state}"),
        };
    }
    text
}

/// The refusal code that stands for a state (§12.2); `None` for enabled.
pub fn feature_off_code(state: FeatureState) -> Option<ErrorCode> {
    match state {
        FeatureState::Enabled => None,
        FeatureState::Disabled => Some(ErrorCode::FeatureDisabled),
        FeatureState::NotYet => Some(ErrorCode::FeatureNotEnabled),
    }
}

/// The state a host's refusal code stands for (§12.2): `disabled` for
/// `feature-disabled`, `not-yet` for `feature-not-enabled`.
pub fn feature_off_state(code: ErrorCode) -> Option<FeatureState> {
    match code {
        ErrorCode::FeatureDisabled => Some(FeatureState::Disabled),
        ErrorCode::FeatureNotEnabled => Some(FeatureState::NotYet),
        _ => None,
    }
}

/// What a person reading a refusal needs: which feature, which state,
/// whose decision, and that the VM is not at fault.
pub fn feature_off_text(feature: u16, state: FeatureState) -> String {
    let name = feature_name(feature);
    match state {
        FeatureState::Enabled => format!("{name} is enabled"),
        FeatureState::Disabled => {
            format!("{name} is disabled by the host's kill switch; nothing to fix on this VM")
        }
        FeatureState::NotYet => format!(
            "{name} is not-yet enabled: the host's staged rollout has not reached this VM; \
             nothing to fix on this VM"
        ),
    }
}

type Out = Output<GuestEvent>;

/// The guest session, one variant per state.
#[derive(Debug)]
pub enum Guest {
    AwaitChallenge(AwaitChallenge),
    Quoting(Quoting),
    AwaitResult(AwaitResult),
    Established(Established),
    Closed,
}

#[derive(Debug)]
pub struct AwaitChallenge {
    config: Arc<GuestConfig>,
    jitter: Jitter,
    exporter: [u8; TRANSCRIPT_EXPORTER_LEN],
    hello: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug)]
pub struct Quoting {
    features: Features,
    jitter: Jitter,
    deadline: Instant,
}

#[derive(Debug)]
pub struct AwaitResult {
    features: Features,
    jitter: Jitter,
    deadline: Instant,
}

#[derive(Debug)]
enum Request {
    Keys {
        names: Vec<KeyName>,
        deadline: Instant,
    },
    Derive {
        purpose: Purpose,
        host_tag: [u8; CONFIRM_TAG_LEN],
        deadline: Instant,
    },
}

impl Request {
    fn deadline(&self) -> Instant {
        match self {
            Self::Keys { deadline, .. } | Self::Derive { deadline, .. } => *deadline,
        }
    }
}

#[derive(Debug)]
pub struct Established {
    session_id: [u8; SESSION_ID_LEN],
    features: Features,
    /// Holds the host asked for (feature-disabled / feature-not-enabled
    /// with retry-after), by feature; at most one per requested feature.
    held: BTreeMap<u16, Instant>,
    /// Requested features a `feature-update` enabled again, and when they
    /// become usable (§12.3); at most one per requested feature.
    reenable: BTreeMap<u16, Instant>,
    jitter: Jitter,
    request: Option<Request>,
    ping: Option<(u64, Instant)>,
    next_ping_seq: u64,
    last_update_id: Option<u64>,
    last_sent: Instant,
    reattest_at: Instant,
}

impl Guest {
    /// Sends `hello` on a fresh TLS connection. `guest_nonce` must be
    /// fresh random bytes; it also seeds the session's jitter (§12.3).
    pub fn start(
        config: Arc<GuestConfig>,
        exporter: [u8; TRANSCRIPT_EXPORTER_LEN],
        guest_nonce: [u8; NONCE_LEN],
        now: Instant,
    ) -> (Self, Out) {
        let mut out = Out::default();
        let hello = Message::Hello(Hello {
            min_version: config.versions.min,
            max_version: config.versions.max,
            agent_name: config.agent_name.clone(),
            agent_version: config.agent_version.clone(),
            guest_nonce,
        });
        match hello.encode() {
            Ok(bytes) => {
                let kept = bytes.to_vec();
                out.send.push(bytes);
                let seed = guest_nonce
                    .first_chunk::<8>()
                    .map_or(0, |b| u64::from_le_bytes(*b));
                let state = AwaitChallenge {
                    config,
                    jitter: Jitter::new(seed),
                    exporter,
                    hello: kept,
                    deadline: after(now, AWAIT_CHALLENGE_TIMEOUT),
                };
                (Self::AwaitChallenge(state), out)
            }
            Err(_) => {
                out.close(CloseReason::Failed(Failure::Permanent));
                (Self::Closed, out)
            }
        }
    }

    /// When [`Guest::on_timeout`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Self::AwaitChallenge(s) => Some(s.deadline),
            Self::Quoting(s) => Some(s.deadline),
            Self::AwaitResult(s) => Some(s.deadline),
            Self::Established(s) => Some(s.deadline()),
            Self::Closed => None,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(self, Self::Established(_))
    }

    /// One frame payload from the host.
    pub fn on_payload(self, payload: &[u8], now: Instant) -> (Self, Out) {
        let mut out = Out::default();
        if matches!(self, Self::Closed) {
            return (self, out);
        }
        let Some(msg) = decode_or_close(payload, &mut out) else {
            return (Self::Closed, out);
        };
        // Events common to every state (§11.4).
        match &msg {
            Message::Error(e) => {
                if let Self::Established(mut s) = self
                    && s.request_scoped(e)
                {
                    s.on_request_error(e, now, &mut out);
                    s.poll_usable(now, &mut out);
                    return (Self::Established(s), out);
                }
                out.close(CloseReason::Failed(Failure::Code {
                    code: e.code,
                    retry_after: e.retry_after_ms.map(|ms| Duration::from_millis(ms.into())),
                }));
                return (Self::Closed, out);
            }
            Message::Goodbye(g) => {
                out.close(CloseReason::Orderly {
                    retry_after: g.retry_after_ms.map(|ms| Duration::from_millis(ms.into())),
                });
                return (Self::Closed, out);
            }
            _ => {}
        }
        match self {
            Self::AwaitChallenge(s) => {
                let next = s.on_message(msg, &mut out, now);
                (next, out)
            }
            Self::AwaitResult(s) => {
                let next = s.on_message(msg, &mut out, now);
                (next, out)
            }
            Self::Established(mut s) => {
                if s.on_message(msg, &mut out, now) {
                    s.poll_usable(now, &mut out);
                    (Self::Established(s), out)
                } else {
                    (Self::Closed, out)
                }
            }
            Self::Quoting(_) | Self::Closed => {
                unexpected(&mut out);
                (Self::Closed, out)
            }
        }
    }

    /// The quote the driver produced for [`GuestEvent::QuoteNeeded`], or
    /// `None` if the TPM failed (the driver logs why).
    pub fn on_quote(self, evidence: Option<Evidence>, now: Instant) -> (Self, Out) {
        let mut out = Out::default();
        let Self::Quoting(s) = self else {
            return (self, out);
        };
        match evidence {
            Some(ev) => {
                out.send(Message::Evidence(ev));
                let next = AwaitResult {
                    features: s.features,
                    jitter: s.jitter,
                    deadline: after(now, AWAIT_RESULT_TIMEOUT),
                };
                (Self::AwaitResult(next), out)
            }
            None => {
                out.fail_code(ErrorCode::Internal);
                (Self::Closed, out)
            }
        }
    }

    /// Call at [`Guest::deadline`] (earlier calls do nothing).
    pub fn on_timeout(self, now: Instant) -> (Self, Out) {
        let mut out = Out::default();
        let due = self.deadline().is_some_and(|d| now >= d);
        if !due {
            return (self, out);
        }
        match self {
            Self::AwaitChallenge(_) | Self::AwaitResult(_) => {
                out.fail_code(ErrorCode::Timeout);
                (Self::Closed, out)
            }
            Self::Quoting(_) => {
                out.fail_code(ErrorCode::Internal);
                (Self::Closed, out)
            }
            Self::Established(mut s) => {
                if s.on_timeout(now, &mut out) {
                    (Self::Established(s), out)
                } else {
                    (Self::Closed, out)
                }
            }
            Self::Closed => (Self::Closed, out),
        }
    }

    /// End of stream between frames, or a transport/TLS failure.
    pub fn on_transport_closed(self) -> (Self, Out) {
        let mut out = Out::default();
        if !matches!(self, Self::Closed) {
            out.close(CloseReason::Failed(Failure::Transport));
        }
        (Self::Closed, out)
    }

    /// The VM generation ID changed (§11.4, §15.8): the VM was restored
    /// from a snapshot or cloned, so whatever this session proved was the
    /// state of another generation. Established: `goodbye(reattest)` and
    /// close; during the handshake: close without a word (the attempt is
    /// abandoned, its quote may predate the change). Either way an orderly
    /// close, no failure: the driver attests again on a new connection as
    /// its retry policy allows.
    pub fn on_generation_changed(self) -> (Self, Out) {
        let mut out = Out::default();
        match self {
            Self::Established(_) => {
                out.goodbye(GoodbyeReason::Reattest, None);
                out.close(CloseReason::Orderly { retry_after: None });
            }
            Self::AwaitChallenge(_) | Self::Quoting(_) | Self::AwaitResult(_) => {
                out.close(CloseReason::Orderly { retry_after: None });
            }
            Self::Closed => {}
        }
        (Self::Closed, out)
    }

    /// The agent stops or has finished its work: say goodbye.
    pub fn finish(self, reason: GoodbyeReason) -> (Self, Out) {
        let mut out = Out::default();
        if !matches!(self, Self::Closed) {
            out.goodbye(reason, None);
            out.close(CloseReason::Orderly { retry_after: None });
        }
        (Self::Closed, out)
    }
}

fn unexpected(out: &mut Out) {
    out.fail(
        ErrorCode::UnexpectedMessage,
        CloseReason::Failed(Failure::Permanent),
    );
}

impl AwaitChallenge {
    fn on_message(self, msg: Message, out: &mut Out, now: Instant) -> Guest {
        let Message::Challenge(c) = msg else {
            unexpected(out);
            return Guest::Closed;
        };
        let range = self.config.versions;
        if c.version < range.min || c.version > range.max {
            out.send(ErrorMessage {
                supported: Some(range),
                ..ErrorMessage::new(ErrorCode::UnsupportedVersion)
            });
            out.close(CloseReason::Failed(Failure::Code {
                code: ErrorCode::UnsupportedVersion,
                retry_after: None,
            }));
            return Guest::Closed;
        }
        // The challenge bytes are what we received: re-encoding is exact
        // because the decoder only accepts canonical input.
        let challenge = match Message::Challenge(c.clone()).encode() {
            Ok(b) => b,
            Err(_) => {
                unexpected(out);
                return Guest::Closed;
            }
        };
        let th = transcript_hash(&self.exporter, &self.hello, &challenge);
        out.event(GuestEvent::QuoteNeeded {
            qualifying_data: th,
            selection: c.pcr_selection,
        });
        let next = Quoting {
            features: c.features,
            jitter: self.jitter,
            deadline: after(now, QUOTE_TIMEOUT),
        };
        Guest::Quoting(next)
    }
}

impl AwaitResult {
    fn on_message(self, msg: Message, out: &mut Out, now: Instant) -> Guest {
        let Message::AttestationResult(r) = msg else {
            unexpected(out);
            return Guest::Closed;
        };
        let reattest_after = Duration::from_secs(r.reattest_after_s.into());
        out.event(GuestEvent::Attested {
            session_id: r.session_id,
            reattest_after,
            features: self.features.clone(),
        });
        let next = Established {
            session_id: r.session_id,
            features: self.features,
            held: BTreeMap::new(),
            reenable: BTreeMap::new(),
            jitter: self.jitter,
            request: None,
            ping: None,
            next_ping_seq: 1,
            last_update_id: None,
            last_sent: now,
            reattest_at: after(now, reattest_after),
        };
        Guest::Established(next)
    }
}

impl Established {
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        self.session_id
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    fn deadline(&self) -> Instant {
        let mut d = self
            .reattest_at
            .min(after(self.last_sent, KEEPALIVE_INTERVAL));
        if let Some(r) = &self.request {
            d = d.min(r.deadline());
        }
        if let Some((_, pd)) = self.ping {
            d = d.min(pd);
        }
        // A re-enabled feature is announced only while no request is
        // outstanding (the request's deadline covers that time).
        if self.request.is_none()
            && let Some(at) = self.reenable.values().min()
        {
            d = d.min(*at);
        }
        d
    }

    /// The state of `feature` in the current map (absent is disabled).
    pub fn feature_state(&self, feature: u16) -> FeatureState {
        self.features
            .get(&feature)
            .copied()
            .unwrap_or(FeatureState::Disabled)
    }

    fn usable(&self, feature: u16, now: Instant) -> Result<(), RequestRefused> {
        let state = self.feature_state(feature);
        if state != FeatureState::Enabled {
            return Err(RequestRefused::FeatureOff { feature, state });
        }
        let until = self
            .held
            .get(&feature)
            .into_iter()
            .chain(self.reenable.get(&feature))
            .max();
        if let Some(until) = until
            && now < *until
        {
            return Err(RequestRefused::FeatureHeld {
                feature,
                until: *until,
            });
        }
        if self.request.is_some() {
            return Err(RequestRefused::Busy);
        }
        Ok(())
    }

    /// Replaces the feature map (§6.16) and starts the re-enable delay of
    /// every requested feature it turns on again (§12.3); one it turns off
    /// loses a pending re-enable.
    fn replace_features(&mut self, features: Features, now: Instant) {
        let enabled = |map: &Features, f| map.get(&f) == Some(&FeatureState::Enabled);
        for f in REQUESTED_FEATURES {
            match (enabled(&self.features, f), enabled(&features, f)) {
                (_, false) => {
                    self.reenable.remove(&f);
                }
                (false, true) => {
                    let jittered = after(now, self.jitter.upto(FEATURE_REENABLE_JITTER));
                    let at = self.held.get(&f).map_or(jittered, |h| jittered.max(*h));
                    self.reenable.insert(f, at);
                }
                (true, true) => {}
            }
        }
        self.features = features;
    }

    /// Announces the re-enabled features whose time has come, once each,
    /// while no request is outstanding.
    fn poll_usable(&mut self, now: Instant, out: &mut Out) {
        if self.request.is_some() {
            return;
        }
        self.reenable.retain(|feature, at| {
            let due = now >= *at;
            if due {
                out.event(GuestEvent::FeatureUsable { feature: *feature });
            }
            !due
        });
    }

    /// Asks for keys (§6.7). Names are sorted and deduplicated here.
    pub fn request_keys(
        &mut self,
        mut names: Vec<KeyName>,
        now: Instant,
    ) -> Result<Out, RequestRefused> {
        self.usable(feature::KEY_RELEASE, now)?;
        names.sort();
        names.dedup();
        let mut out = Out::default();
        let msg = Message::KeyRequest(KeyRequest {
            names: names.clone(),
        });
        let bytes = msg
            .encode()
            .map_err(|_| RequestRefused::Invalid("1 to 16 key names"))?;
        out.send.push(bytes);
        self.request = Some(Request::Keys {
            names,
            deadline: after(now, REQUEST_TIMEOUT),
        });
        self.reenable.remove(&feature::KEY_RELEASE);
        self.last_sent = now;
        Ok(out)
    }

    /// Asks the host to confirm a derived key (§9). The driver computed the
    /// key from the TLS exporter, and both tags from it.
    pub fn request_derive(
        &mut self,
        purpose: Purpose,
        length: u8,
        guest_tag: [u8; CONFIRM_TAG_LEN],
        expected_host_tag: [u8; CONFIRM_TAG_LEN],
        now: Instant,
    ) -> Result<Out, RequestRefused> {
        self.usable(feature::KEY_DERIVATION, now)?;
        let mut out = Out::default();
        let bytes = Message::DeriveRequest(DeriveRequest {
            purpose: purpose.clone(),
            length,
            confirm_tag: guest_tag,
        })
        .encode()
        .map_err(|_| RequestRefused::Invalid("derive length 16..64"))?;
        out.send.push(bytes);
        self.request = Some(Request::Derive {
            purpose,
            host_tag: expected_host_tag,
            deadline: after(now, REQUEST_TIMEOUT),
        });
        self.reenable.remove(&feature::KEY_DERIVATION);
        self.last_sent = now;
        Ok(out)
    }

    /// Acknowledges a [`GuestEvent::KeyUpdate`] once the driver installed
    /// it (or failed to).
    pub fn ack_update(
        &mut self,
        update_id: u64,
        key: &ReleasedKey,
        installed: bool,
        now: Instant,
    ) -> Out {
        let mut out = Out::default();
        out.send(KeyUpdateAck {
            update_id,
            name: key.name.clone(),
            version: key.version,
            error: (!installed).then_some(ErrorCode::Internal),
        });
        self.last_sent = now;
        out
    }

    fn request_scoped(&self, e: &ErrorMessage) -> bool {
        matches!(
            (&self.request, e.code),
            (
                Some(_),
                ErrorCode::FeatureDisabled | ErrorCode::FeatureNotEnabled
            ) | (Some(Request::Derive { .. }), ErrorCode::NotPermitted)
        )
    }

    fn on_request_error(&mut self, e: &ErrorMessage, now: Instant, out: &mut Out) {
        let Some(req) = self.request.take() else {
            return;
        };
        match (req, e.code) {
            (Request::Derive { purpose, .. }, ErrorCode::NotPermitted) => {
                out.event(GuestEvent::PurposeRefused { purpose });
            }
            (req, _) => {
                let feature = match req {
                    Request::Keys { .. } => feature::KEY_RELEASE,
                    Request::Derive { .. } => feature::KEY_DERIVATION,
                };
                debug_assert_eq!(e.code.class(), RetryClass::AfterHint);
                let hint = e
                    .retry_after_ms
                    .map_or(crate::retry::DEFAULT_RETRY_AFTER, |ms| {
                        Duration::from_millis(ms.into())
                    })
                    .min(crate::retry::MAX_RETRY_AFTER);
                let until = after(now, hint);
                self.held.insert(feature, until);
                // A re-enable still pending waits for the hold too.
                if let Some(at) = self.reenable.get_mut(&feature) {
                    *at = (*at).max(until);
                }
                out.event(GuestEvent::FeatureHeld {
                    feature,
                    until,
                    code: e.code,
                });
            }
        }
    }

    /// Returns false when the session must close.
    fn on_message(&mut self, msg: Message, out: &mut Out, now: Instant) -> bool {
        match msg {
            Message::KeyRelease(r) => {
                let Some(Request::Keys { names, .. }) = &self.request else {
                    unexpected(out);
                    return false;
                };
                // Every requested name in exactly one list, nothing else.
                let mut answered: Vec<&KeyName> = r
                    .released
                    .iter()
                    .map(|k| &k.name)
                    .chain(r.refused.iter().map(|k| &k.name))
                    .collect();
                answered.sort();
                if answered.len() != names.len() || answered.iter().zip(names).any(|(a, b)| *a != b)
                {
                    out.fail(
                        ErrorCode::Malformed,
                        CloseReason::Failed(Failure::Permanent),
                    );
                    return false;
                }
                self.request = None;
                out.event(GuestEvent::Keys(r));
                true
            }
            Message::DeriveConfirm(c) => {
                let Some(Request::Derive {
                    purpose, host_tag, ..
                }) = &self.request
                else {
                    unexpected(out);
                    return false;
                };
                if c.purpose != *purpose {
                    out.fail(
                        ErrorCode::Malformed,
                        CloseReason::Failed(Failure::Permanent),
                    );
                    return false;
                }
                if !crate::transcript::tags_equal(host_tag, &c.confirm_tag) {
                    out.fail(
                        ErrorCode::AttestationFailed,
                        CloseReason::Failed(Failure::Permanent),
                    );
                    return false;
                }
                self.request = None;
                out.event(GuestEvent::Derived { purpose: c.purpose });
                true
            }
            Message::KeyUpdate(u) => {
                let enabled =
                    self.features.get(&feature::KEY_ROTATION) == Some(&FeatureState::Enabled);
                let increasing = self.last_update_id.is_none_or(|last| u.update_id > last);
                if !enabled || !increasing {
                    unexpected(out);
                    return false;
                }
                self.last_update_id = Some(u.update_id);
                out.event(GuestEvent::KeyUpdate {
                    update_id: u.update_id,
                    key: u.key,
                });
                true
            }
            Message::FeatureUpdate(f) => {
                self.replace_features(f.features.clone(), now);
                out.event(GuestEvent::Features(f.features));
                true
            }
            Message::Ping(p) => {
                out.send(Pong {
                    sequence: p.sequence,
                });
                self.last_sent = now;
                true
            }
            Message::Pong(p) => match self.ping {
                Some((seq, _)) if seq == p.sequence => {
                    self.ping = None;
                    true
                }
                _ => {
                    unexpected(out);
                    false
                }
            },
            _ => {
                unexpected(out);
                false
            }
        }
    }

    /// Returns false when the session must close.
    fn on_timeout(&mut self, now: Instant, out: &mut Out) -> bool {
        let timed_out = self.request.as_ref().is_some_and(|r| now >= r.deadline())
            || self.ping.is_some_and(|(_, d)| now >= d);
        if timed_out {
            out.fail_code(ErrorCode::Timeout);
            return false;
        }
        if now >= self.reattest_at {
            out.goodbye(GoodbyeReason::Reattest, None);
            out.close(CloseReason::Orderly { retry_after: None });
            return false;
        }
        if self.ping.is_none() && now >= after(self.last_sent, KEEPALIVE_INTERVAL) {
            let seq = self.next_ping_seq;
            self.next_ping_seq = self.next_ping_seq.wrapping_add(1);
            out.send(Ping { sequence: seq });
            self.ping = Some((seq, after(now, REQUEST_TIMEOUT)));
            self.last_sent = now;
        }
        self.poll_usable(now, out);
        true
    }
}
