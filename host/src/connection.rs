//! One guest connection's driver: TLS, then the sans-I/O host session
//! ([`vkx_common::session::host::Host`]) in the connection pump
//! ([`vkx_common::session::pump::Pump`]), fed with the bytes read, timer
//! expiries, key rotations, rollout changes and the stop signal; the
//! session's events answered by [`crate::service`]; the frames the pump
//! hands out written under a deadline, and the errors among them counted.
//! Also the short life of a connection admission control refused after
//! TLS.
//!
//! Bounds: the TLS handshake has its timeout, the whole handshake holds
//! its admission slot for at most [`MAX_HANDSHAKE_HOLD`], every batch of
//! sends has [`WRITE_TIMEOUT`] (a guest that stops reading cannot hold the
//! connection by back-pressure), the pump buffers at most one frame and
//! bounds the rounds of events, and the session's message budget answers
//! a flood with `rate-limited` before the session sees the frame.

use std::sync::Arc;
use std::time::Duration;

use ring::rand::SecureRandom;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant as TokioInstant, timeout_at};
use vkx_common::errors::ErrorCode;
use vkx_common::retry::Failure;
use vkx_common::rl_info;
use vkx_common::rl_warn;
use vkx_common::session::host::{
    HANDSHAKE_DEADLINE, Host, HostEvent, PeerContext, SessionRandom, Verdict,
};
use vkx_common::session::pump::{Pump, Session};
use vkx_common::session::transport::TLS_HANDSHAKE_TIMEOUT;
use vkx_common::session::{CloseReason, Output};
use vkx_common::wire::{FeatureState, Features, Message, MessageType, VmId};

use crate::admission::{Refused, Ticket};
use crate::health::RingCounters;
use crate::metrics::{EstablishedGuard, FeatureGauge, HandshakeOutcome, Metrics};
use crate::rollout::Feature;
use crate::rollout::View;
use crate::service::{
    ConnState, Reattest, Shared, handle_event, push_rotations, verify_and_record,
};

/// Most bytes the future of one session ([`connection`]) may take, as the
/// test build lays it out (the release build's is close): every idle
/// session holds one. The TLS handshake's state and the sends are boxed
/// while they run, so they do not count here (6.6 KiB when they did).
#[cfg(test)]
const MAX_SESSION_FUTURE: usize = 5 * 1024;
/// Longest one batch of sends (and the close after it) may take: a guest
/// that stops reading cannot hold its connection by back-pressure.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a served connection holds its handshake slot: the TLS handshake
/// and the session's handshake both start at accept, and a send during the
/// handshake is cut at this bound too.
pub const MAX_HANDSHAKE_HOLD: Duration = TLS_HANDSHAKE_TIMEOUT.saturating_add(HANDSHAKE_DEADLINE);
/// After a refusal, how long the host keeps reading (and discarding) what
/// the guest still sends, until it closes: closing on its unread `hello`
/// could otherwise reset the connection before the error is read.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering after a refusal.
pub const MAX_LINGER_BYTES: usize = 64 * 1024;

/// Who is on the other end, as the transport says (§2.5).
#[derive(Debug, Clone)]
pub(crate) struct TransportPeer {
    /// `None`: the host cannot admit this peer by identity (§2.6).
    pub(crate) vm_id: Option<VmId>,
    pub(crate) cid: Option<u32>,
    /// How log lines name the peer: the vm-id, or e.g. `cid:17`.
    pub(crate) label: String,
}

impl TransportPeer {
    pub(crate) fn vm(vm_id: VmId) -> Self {
        Self {
            label: vm_id.as_str().to_owned(),
            vm_id: Some(vm_id),
            cid: None,
        }
    }
}

impl AsRef<str> for TransportPeer {
    fn as_ref(&self) -> &str {
        &self.label
    }
}

/// What one served connection counts, on every path out of it: the
/// handshake's outcome and latency, the established gauge, the errors
/// sent. Owns the connection's admission slots; dropping it releases them.
#[derive(Debug)]
pub(crate) struct Tracker {
    ticket: Ticket,
    accepted_at: std::time::Instant,
    metrics: Arc<Metrics>,
    /// How the handshake ends unless it reaches Established.
    outcome: HandshakeOutcome,
    established: Option<EstablishedGuard>,
}

impl Tracker {
    pub(crate) fn new(
        ticket: Ticket,
        accepted_at: std::time::Instant,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ticket,
            accepted_at,
            metrics,
            outcome: HandshakeOutcome::Failed,
            established: None,
        }
    }

    fn sent_error(&mut self, code: ErrorCode) {
        self.metrics.error_sent(code);
        if self.ticket.in_handshake() {
            self.outcome = HandshakeOutcome::for_code(code);
        }
    }

    /// Gives the handshake slot back once the session is Established.
    fn check_established(&mut self, host: &Host) {
        if self.ticket.in_handshake() && matches!(host, Host::Established(_)) {
            self.ticket.established(std::time::Instant::now());
            self.metrics.handshake(HandshakeOutcome::Attested);
            self.metrics.handshake_latency(self.accepted_at.elapsed());
            self.established = Some(self.metrics.established());
        }
    }

    /// The deadline of a batch of sends starting now: [`WRITE_TIMEOUT`],
    /// and during the handshake no later than [`MAX_HANDSHAKE_HOLD`] after
    /// accept.
    fn write_deadline(&self) -> TokioInstant {
        let now = TokioInstant::now();
        let d = now + WRITE_TIMEOUT;
        if self.ticket.in_handshake() {
            d.min(TokioInstant::from_std(self.accepted_at) + MAX_HANDSHAKE_HOLD)
        } else {
            d
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.ticket.in_handshake() {
            self.metrics.handshake(self.outcome);
        }
    }
}

/// Writes the frames the pump hands out and flushes, by `deadline`;
/// `on_error` sees the code of every `error` written. False: the
/// connection is gone.
async fn send_all<W, S>(
    w: &mut W,
    pump: &mut Pump<S>,
    deadline: TokioInstant,
    peer: &TransportPeer,
    mut on_error: impl FnMut(ErrorCode),
) -> bool
where
    W: tokio::io::AsyncWrite + Unpin,
    S: Session,
{
    let work = async {
        while let Some(t) = pump.poll_transmit() {
            vkx_common::rl_log!(
                trace,
                peer: peer,
                bytes = t.payload().len(),
                msg_type = ?Message::envelope_type(t.payload()),
                "frame sent"
            );
            if w.write_all(t.frame()).await.is_err() {
                return false;
            }
            if let Some(code) = t.error {
                on_error(code);
            }
        }
        let _ = w.flush().await;
        true
    };
    match timeout_at(deadline, work).await {
        Ok(sent) => sent,
        Err(_) => {
            rl_warn!(peer: peer, "send timed out: the guest is not reading; closing");
            false
        }
    }
}

/// The server side of the TLS handshake (§4), with what rustls does not
/// enforce by itself: a ClientHello that does not offer ALPN `vkx` (or
/// offers no ALPN at all) is answered with a fatal
/// `no_application_protocol` alert and the connection closed, before any
/// key is exchanged (§4.2). The caller bounds the time.
pub(crate) async fn tls_accept<S>(
    config: &Arc<rustls::ServerConfig>,
    stream: S,
) -> std::io::Result<tokio_rustls::server::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    if !vkx_common::tls::offers_vkx(start.client_hello().alpn()) {
        let mut io = start.io;
        // Best effort: the peer is refused either way.
        let _ = io
            .write_all(&vkx_common::tls::NO_APPLICATION_PROTOCOL_ALERT)
            .await;
        let _ = io.shutdown().await;
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::NoApplicationProtocol,
        ));
    }
    start.into_stream(config.clone()).await
}

/// A connection admission control refused (§11.6, Accepted): TLS (bounded
/// by its timeout), then `busy` or `rate-limited` with the jittered
/// `retry-after` without reading `hello`, close, and a short linger so the
/// error is not lost to a reset. `refused` holds the connection's place
/// under the hard ceiling until the end.
pub(crate) async fn refuse<S>(stream: S, peer: TransportPeer, refused: Refused, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    let mut tls =
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls_accept(&shared.tls, stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                rl_warn!(peer: peer, error = %e, "TLS handshake failed (refused connection)");
                metrics.handshake(HandshakeOutcome::Failed);
                return;
            }
            Err(_) => {
                rl_warn!(peer: peer, "TLS handshake timed out (refused connection)");
                metrics.handshake(HandshakeOutcome::Timeout);
                return;
            }
        };
    let (host, out) = Host::refuse(refused.refusal, refused.retry_after);
    let mut pump = Pump::new(host, out);
    let deadline = TokioInstant::now() + WRITE_TIMEOUT;
    let mut outcome = HandshakeOutcome::Failed;
    let sent = send_all(&mut tls, &mut pump, deadline, &peer, |code| {
        metrics.error_sent(code);
        outcome = HandshakeOutcome::for_code(code);
    })
    .await;
    metrics.handshake(outcome);
    if sent && timeout_at(deadline, tls.shutdown()).await.is_ok() {
        let linger = async {
            let mut buf = [0u8; 1024];
            let mut left = MAX_LINGER_BYTES;
            while left > 0 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
    }
    drop(refused);
}

pub(crate) async fn connection<S>(
    stream: S,
    peer_id: TransportPeer,
    mut track: Tracker,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let vm_id = &peer_id;
    let accepted_at = track.accepted_at;
    // Boxed: the handshake's state (a second ServerConnection while it
    // runs) is freed after it instead of sizing every idle session's task.
    let tls = match tokio::time::timeout_at(
        TokioInstant::from_std(accepted_at) + TLS_HANDSHAKE_TIMEOUT,
        Box::pin(tls_accept(&shared.tls, stream)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            rl_warn!(peer: vm_id, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            rl_warn!(peer: vm_id, "TLS handshake timed out");
            track.outcome = HandshakeOutcome::Timeout;
            return;
        }
    };
    let exporter = match vkx_common::tls::transcript_exporter(tls.get_ref().1) {
        Ok(x) => x,
        Err(e) => {
            rl_warn!(peer: vm_id, error = %e, "TLS exporter failed");
            return;
        }
    };
    let mut random = SessionRandom {
        host_nonce: [0; 32],
        session_id: [0; 16],
    };
    if shared.rng.fill(&mut random.host_nonce).is_err()
        || shared.rng.fill(&mut random.session_id).is_err()
    {
        rl_warn!(peer: vm_id, "no randomness: closing");
        return;
    }
    // A VM the policy does not know is served as unmapped: refused after
    // hello, opaquely.
    let selection = peer_id
        .vm_id
        .as_ref()
        .and_then(|vm| shared.trust().policy.selection(vm).map(|s| (vm.clone(), s)));
    // The VM's feature map now; the session is told every change of it
    // once Established (PROTOCOL.md §12.2).
    let vm = selection.as_ref().map(|(vm, _)| vm.clone());
    let mut rollout = shared.rollout.clone();
    let view = rollout.borrow_and_update().clone();
    let mut features = shared.feature_map(&view, vm.as_ref());
    // The VM's ring for the health signals: looked up again with every
    // rollout change the session takes.
    let ring = shared.ring(&view, peer_id.vm_id.as_ref());
    drop(view);
    let mut gauge: Option<FeatureGauge> = None;
    // Registered once Established: another session of this VM that shows
    // a rewound TPM (§15.8), or a reload that no longer allows what this
    // one proved, sends it to re-attest.
    let mut vm_session: Option<crate::service::VmSession<'_>> = None;
    // The PCR values of the accepted evidence, for the registration.
    let mut proven: Vec<vkx_common::wire::PcrBankValues> = Vec::new();
    let session_id = random.session_id;
    let peer = PeerContext {
        vm_id: vm.clone(),
        cid: peer_id.cid,
        selection: selection.map(|(_, s)| s).unwrap_or_default(),
        features: features.clone(),
        accepted_at,
    };
    let host = Host::start(
        shared.config.clone(),
        peer,
        exporter,
        random,
        std::time::Instant::now(),
    );
    let mut pump = Pump::new(host, Output::default());
    let mut tls = tls;
    let mut conn = ConnState {
        ring,
        session_id,
        ..ConnState::default()
    };
    // Reached Established: a failed end from here on is a lost session.
    let mut established = false;
    let mut versions = shared.key_versions.subscribe();
    let mut budget = shared.admission.message_bucket(std::time::Instant::now());
    // Each iteration consumes input, a timer expiry, a key rotation, a
    // rollout change or the stop signal; the session's deadlines bound how
    // long it can wait.
    while let Some(deadline) = pump.deadline() {
        let wake = TokioInstant::from_std(deadline);
        tokio::select! {
            _ = stop.changed() => {
                pump.step(|h| h.shutdown(shared.shutdown_retry_after()));
            }
            _ = tokio::time::sleep_until(wake) => {
                pump.handle_timeout(std::time::Instant::now());
            }
            why = reattest_asked(&mut vm_session) => {
                let base = crate::service::REATTEST_RETRY_AFTER;
                let retry_after = match why {
                    Reattest::Rewind => {
                        rl_info!(peer: vm_id, "another session of this VM showed a rewound TPM: goodbye(reattest)");
                        base
                    }
                    // One line per reload says how many and which; this
                    // one only at debug.
                    Reattest::Reload { spread } => {
                        vkx_common::rl_log!(debug, peer: vm_id, "the reloaded policy or CID map no longer allows this session: goodbye(reattest)");
                        crate::service::shutdown_retry_after(base, spread, shared.draw())
                    }
                };
                pump.step(|h| h.reattest(retry_after));
            }
            Ok(()) = versions.changed() => {
                let current = versions.borrow_and_update().clone();
                let out = push_rotations(pump.session_mut(), &mut conn, &current, &features, &shared);
                pump.absorb(out);
            }
            // A rollout change waits (its flag stays set) until the
            // session is Established: the challenge carried the map of
            // its moment, and only an Established session takes updates.
            Ok(()) = rollout.changed(), if matches!(pump.session(), Host::Established(_)) => {
                let view = rollout.borrow_and_update().clone();
                let map = shared.feature_map(&view, vm.as_ref());
                conn.ring = shared.ring(&view, peer_id.vm_id.as_ref());
                let mut update = match pump.session_mut() {
                    Host::Established(s) => s.update_features(map.clone()),
                    _ => Output::default(),
                };
                if !update.send.is_empty() {
                    shared.metrics.rollout.update_sent();
                    note_drill(&shared, &view, vm.as_ref(), &features, &map, &mut conn);
                }
                if let Some(d) = &conn.drill
                    && map.get(&d.feature().id()) != Some(&FeatureState::Disabled)
                {
                    conn.drill = None;
                }
                if let Some(g) = &mut gauge {
                    g.set(&conn.ring, &map);
                }
                features = map;
                // Rotations held back while key rotation was off go now,
                // after the update that turns it on.
                let current = versions.borrow().clone();
                update.absorb(push_rotations(pump.session_mut(), &mut conn, &current, &features, &shared));
                pump.absorb(update);
            }
            // The plaintext is read where rustls decrypted it (one
            // record's, at most 16 KiB): the session holds no read buffer
            // of its own, so an idle one costs none (README "Where the
            // host's memory goes").
            read = tls.fill_buf() => {
                let now = std::time::Instant::now();
                match read {
                    Ok([]) | Err(_) => {
                        if let Err(e) = pump.handle_eof() {
                            rl_warn!(peer: vm_id, error = %e, "stream ended inside a frame");
                        }
                    }
                    Ok(plaintext) => {
                        let n = plaintext.len();
                        let fed = pump.handle_input(plaintext, now, |host, payload, now| {
                            vkx_common::rl_log!(
                                trace,
                                peer: vm_id,
                                bytes = payload.len(),
                                msg_type = ?Message::envelope_type(payload),
                                "frame received"
                            );
                            // The message budget comes before the session
                            // looks at the frame.
                            let was_established = matches!(host, Host::Established(_));
                            match budget.try_take(now) {
                                Ok(()) => {
                                    let (h, o) = host.on_payload(payload, now);
                                    let asked = note_payload(&conn.ring, payload, was_established, &o);
                                    if let (Some(f), Some(d)) = (asked, &conn.drill)
                                        && d.feature() == f
                                    {
                                        d.request_after();
                                    }
                                    (h, o)
                                }
                                Err(wait) => {
                                    rl_warn!(peer: vm_id, "message rate exceeded: rate-limited");
                                    shared.metrics.session_rate_limited();
                                    let retry = shared.admission.retry_after(wait, shared.draw());
                                    host.rate_limited(retry)
                                }
                            }
                        });
                        std::pin::Pin::new(&mut tls).consume(n);
                        if let Err(e) = fed {
                            rl_warn!(peer: vm_id, error = %e, "frame refused");
                        }
                    }
                }
            }
        }
        // Local work the session asked for, answered at once; the pump
        // bounds the rounds.
        while let Some(ev) = pump.poll_event() {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    rl_warn!(peer: vm_id, error = %e, "closing the session");
                    break;
                }
            };
            match ev {
                // Quote verification and the registry write (an
                // fdatasync) run on the blocking pool: a thousand guests
                // attesting at once must not stall the other sessions of
                // a worker thread. At most `max_blocking_threads` run at
                // once (host.toml), the rest wait in line; at most
                // `max_handshakes` wait.
                HostEvent::Verify {
                    vm_id,
                    transcript_hash,
                    selection,
                    evidence,
                } => {
                    let s = shared.clone();
                    let pcrs = evidence.pcr_values.clone();
                    let verdict = tokio::task::spawn_blocking(move || {
                        verify_and_record(&s, &vm_id, &transcript_hash, &selection, &evidence)
                    })
                    .await
                    .unwrap_or(Verdict::LocalFailure);
                    if verdict == Verdict::Rejected {
                        conn.ring.attestation_failed();
                    }
                    if verdict == Verdict::Accepted {
                        proven = pcrs;
                    }
                    pump.step(|h| h.on_verdict(verdict, std::time::Instant::now()));
                }
                ev => pump.step(|h| handle_event(h, ev, &shared, &mut conn, tls.get_ref().1)),
            }
        }
        let deadline = track.write_deadline();
        let ring = conn.ring.clone();
        // Boxed for the same reason: live only while writing.
        if !Box::pin(send_all(&mut tls, &mut pump, deadline, vm_id, |c| {
            track.sent_error(c);
            ring.error_sent(c);
        }))
        .await
        {
            if established {
                conn.ring.lost();
            }
            conn.forget(&shared);
            return;
        }
        track.check_established(pump.session());
        if gauge.is_none() && matches!(pump.session(), Host::Established(_)) {
            let proof = crate::trust::Proof {
                cid: peer_id.cid,
                pcrs: std::mem::take(&mut proven),
                ..crate::trust::Proof::default()
            };
            vm_session = vm
                .as_ref()
                .map(|v| shared.vm_sessions.register(v, proof, &shared.trust));
            gauge = Some(FeatureGauge::new(
                shared.metrics.clone(),
                features.clone(),
                conn.ring.clone(),
            ));
            conn.ring.established();
            established = true;
        }
        if let Some(reason) = pump.take_close() {
            if let CloseReason::Failed(f) = reason {
                rl_info!(peer: vm_id, reason = ?f, "session closed");
                if established {
                    conn.ring.lost();
                }
            }
            established = false;
            let _ = timeout_at(deadline, tls.shutdown()).await;
            break;
        }
    }
    // The session ended without saying why (no close reason): not in
    // order.
    if established {
        conn.ring.lost();
    }
    conn.forget(&shared);
}

/// Counts one received payload in its ring's health signals: a feature
/// request reaching an Established session (and its refusal by the
/// feature gate: the session answers it at once), or an `error` from the
/// guest (the session closes with its code). Only the envelope's first
/// two bytes are looked at: every message this protocol knows has a type
/// below 24, which CBOR encodes in the byte after the array head, and a
/// payload the session could decode is canonical.
/// Resolves, with why, when this session is asked to re-attest (also
/// when it was at its registration); never without a registration.
async fn reattest_asked(s: &mut Option<crate::service::VmSession<'_>>) -> Reattest {
    if let Some(s) = s {
        loop {
            if let Some(why) = *s.reattest.borrow_and_update() {
                return why;
            }
            if s.reattest.changed().await.is_err() {
                break;
            }
        }
    }
    std::future::pending().await
}

/// Counts one received payload in the ring's health counters; returns
/// the feature it asked for, if it is a request of an Established
/// session.
fn note_payload(
    ring: &RingCounters,
    payload: &[u8],
    established: bool,
    out: &Output<HostEvent>,
) -> Option<Feature> {
    let &[0x82, ty] = payload.get(..2)? else {
        return None;
    };
    if ty == MessageType::Error.code() {
        if let Some(CloseReason::Failed(Failure::Code { code, .. })) = &out.close {
            ring.error_received(*code);
        }
        return None;
    }
    let feature = if ty == MessageType::KeyRequest.code() {
        Feature::KeyRelease
    } else if ty == MessageType::DeriveRequest.code() {
        Feature::KeyDerivation
    } else {
        return None;
    };
    if !established {
        return None;
    }
    ring.request(feature);
    for code in out.error_codes() {
        if matches!(
            code,
            ErrorCode::FeatureDisabled | ErrorCode::FeatureNotEnabled
        ) {
            ring.refusal(feature, code);
        }
    }
    Some(feature)
}

/// A `feature-update` was just sent: if the live drill is what took a
/// feature away from this session, count the session as told (spec/
/// ROLLOUT.md §14) and keep the drill's counters for its later requests.
fn note_drill(
    shared: &Shared,
    view: &View,
    vm: Option<&VmId>,
    before: &Features,
    after: &Features,
    conn: &mut ConnState,
) {
    let Some(vm) = vm else { return };
    let trust = shared.trust();
    let image = trust.policy.vm(vm).map(|p| p.image.as_str());
    let Some(o) = view.drill_narrows(vm, image) else {
        return;
    };
    let id = o.feature().id();
    if before.get(&id) == Some(&FeatureState::Enabled)
        && after.get(&id) == Some(&FeatureState::Disabled)
    {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        conn.drill = shared.metrics.health.drill_told(o.drill(), now_ms);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vkx_common::session::host::HostConfig;
    use vkx_common::wire::{PROTOCOL_VERSION_1, VersionRange};

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, E, F>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle session holds its task's future: the rarely live parts
    /// (TLS handshake, sends) must not size it.
    #[test]
    fn a_session_future_stays_small() {
        let size = future_size(connection::<tokio::net::UnixStream>);
        assert!(
            size <= MAX_SESSION_FUTURE,
            "the session future takes {size} bytes, over {MAX_SESSION_FUTURE}"
        );
    }

    /// A host's TLS configuration from a fresh node identity, and its pin.
    fn host_tls() -> (Arc<rustls::ServerConfig>, [u8; 32], tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        crate::node::init(dir.path()).unwrap();
        let (cert, key) = crate::node::load(dir.path()).unwrap();
        let pin = vkx_common::tls::spki_sha256(&cert).unwrap();
        (vkx_common::tls::server_config(cert, key).unwrap(), pin, dir)
    }

    /// The guest's side of a handshake with `alpn`; the client's result.
    async fn client_with(alpn: Vec<Vec<u8>>) -> (Result<(), rustls::Error>, bool) {
        let (config, pin, _dir) = host_tls();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { tls_accept(&config, s).await.is_ok() });
        let mut client = (*vkx_common::tls::client_config(pin).unwrap()).clone();
        client.alpn_protocols = alpn;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let r = connector
            .connect(vkx_common::tls::host_server_name(), c)
            .await
            .map(|_| ())
            .map_err(|e| {
                e.get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .cloned()
                    .unwrap_or(rustls::Error::General(e.to_string()))
            });
        (r, server.await.unwrap())
    }

    #[tokio::test]
    async fn a_client_hello_without_alpn_vkx_gets_no_application_protocol() {
        for alpn in [Vec::new(), vec![b"h2".to_vec()]] {
            let (client, served) = client_with(alpn.clone()).await;
            assert!(!served, "{alpn:?}");
            assert_eq!(
                client,
                Err(rustls::Error::AlertReceived(
                    rustls::AlertDescription::NoApplicationProtocol
                )),
                "{alpn:?}"
            );
            assert!(vkx_common::tls::handshake_failure_is_permanent(
                &client.unwrap_err()
            ));
        }
        let (client, served) = client_with(vec![b"h2".to_vec(), b"vkx".to_vec()]).await;
        assert_eq!(client, Ok(()));
        assert!(served);
    }

    /// The errors a refusal writes are counted from the session's output,
    /// on the metrics and as the handshake's outcome.
    #[tokio::test]
    async fn a_refusal_counts_the_error_it_wrote() {
        use vkx_common::session::host::Refusal;
        let (host, out) = Host::refuse(Refusal::Busy, Duration::from_secs(5));
        let mut pump = Pump::new(host, out);
        let (mut w, mut r) = tokio::io::duplex(4096);
        let mut codes = Vec::new();
        let sent = send_all(
            &mut w,
            &mut pump,
            TokioInstant::now() + WRITE_TIMEOUT,
            &TransportPeer::vm(VmId::new("vm-1").unwrap()),
            |c| codes.push(c),
        )
        .await;
        assert!(sent);
        assert_eq!(codes, [ErrorCode::Busy]);
        drop(w);
        let mut wire = Vec::new();
        r.read_to_end(&mut wire).await.unwrap();
        let mut frames = vkx_common::wire::FrameDecoder::new();
        let mut input = &wire[..];
        let payload = frames.decode(&mut input).unwrap().unwrap();
        assert!(matches!(
            Message::decode(payload),
            Ok(Message::Error(e)) if e.code == ErrorCode::Busy
        ));
        assert!(input.is_empty());
    }

    #[test]
    fn the_handshake_hold_is_bounded_by_the_tls_and_session_deadlines() {
        assert_eq!(
            MAX_HANDSHAKE_HOLD,
            TLS_HANDSHAKE_TIMEOUT + HANDSHAKE_DEADLINE
        );
        // A session started at accept never waits past HANDSHAKE_DEADLINE
        // in a handshake state, whatever arrives (one byte at a time or
        // nothing at all).
        let t0 = std::time::Instant::now();
        let host = Host::start(
            Arc::new(HostConfig {
                versions: VersionRange {
                    min: PROTOCOL_VERSION_1,
                    max: PROTOCOL_VERSION_1,
                },
                reattest_after_s: 3600,
                feature_retry_after: crate::service::FEATURE_RETRY_AFTER,
            }),
            PeerContext {
                vm_id: None,
                cid: None,
                selection: Vec::new(),
                features: vkx_common::wire::Features::new(),
                accepted_at: t0,
            },
            [0; 32],
            SessionRandom {
                host_nonce: [0; 32],
                session_id: [0; 16],
            },
            t0 + TLS_HANDSHAKE_TIMEOUT,
        );
        assert!(host.deadline().unwrap() <= t0 + HANDSHAKE_DEADLINE);
    }
}
