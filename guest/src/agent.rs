//! One connection attempt of the guest agent, from connect to close: the
//! thin async driver around [`vkx_common::session::guest::Guest`] that
//! both `vkx-guest once` and the daemon (`vkx-guest run`) use.
//!
//! The driver connects (bounded by `CONNECT_TIMEOUT`), runs TLS with the
//! pinned host key (bounded by `TLS_HANDSHAKE_TIMEOUT`), then feeds the
//! connection pump ([`vkx_common::session::pump::Pump`]) the bytes read,
//! timer expiries and the TPM quote (taken on a blocking thread), and
//! writes the frames it hands out, until the session closes. What to do once attested (stay, ask
//! for keys, finish) is the [`Handler`]'s business; the session's own
//! deadlines bound every wait, and a stop signal ends the session with a
//! `goodbye` at any point.
//!
//! An attempt ends in an [`Attempt`]: whether the session reached
//! Established, and the [`CloseReason`] the retry policy classifies.
//! Nothing here retries: that is the caller's job (the daemon's, with
//! [`vkx_common::retry::RetryPolicy`]); this module knows none of its
//! callers.

use std::sync::Arc;
use std::time::Instant;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use vkx_common::retry::Failure;
use vkx_common::session::guest::{
    Guest, GuestConfig, GuestEvent, RequestRefused, feature_off_state,
};
use vkx_common::session::pump::Pump;
use vkx_common::session::transport::TLS_HANDSHAKE_TIMEOUT;
use vkx_common::session::{CloseReason, Output};
use vkx_common::transcript::{ConfirmRole, confirm_tag};
use vkx_common::wire::{
    AgentName, AgentVersion, Evidence, GoodbyeReason, Message, MessageType, PROTOCOL_VERSION_1,
    PcrBankSelection, Purpose, VersionRange,
};
use vkx_common::{rl_info, rl_warn};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::config::Config;
use crate::transport::Target;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// The buffer TLS plaintext is read into: it holds key-release and
/// key-update frames as they arrive, so it is wiped as soon as a read's
/// bytes are consumed (into the frame decoder, itself zeroizing), and on
/// drop. Fixed size: it never reallocates, so no copy is left behind.
#[derive(Zeroize, ZeroizeOnDrop)]
struct ReadBuf(Vec<u8>);

const _: () = vkx_common::assert_zeroize_on_drop::<ReadBuf>();

impl ReadBuf {
    fn new() -> Self {
        Self(vec![0u8; READ_CHUNK])
    }

    fn space(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// The first `n` bytes, which a read just filled.
    fn filled(&self, n: usize) -> &[u8] {
        &self.0[..n.min(self.0.len())]
    }

    /// Wipes the first `n` bytes once they are consumed.
    fn consumed(&mut self, n: usize) {
        let n = n.min(self.0.len());
        self.0[..n].zeroize();
    }
}

/// A derived key K (§9) while it waits for the host's confirmation.
type DerivedKey = Zeroizing<Vec<u8>>;

const _: () = vkx_common::assert_zeroize_on_drop::<DerivedKey>();

/// What the agent does with an attested session.
pub trait Handler {
    /// One session event (never `QuoteNeeded`: the driver quotes). The
    /// handler may act on `guest` (requests, acks) and returns what that
    /// produced, and whether to end the session now with `goodbye`.
    fn on_event(&mut self, ev: GuestEvent, guest: &mut Guest, now: Instant) -> Reaction;

    /// A derivation the handler asked for ([`Reaction::derive`]) is
    /// confirmed by the host: `key` is K of PROTOCOL.md §9.
    fn on_derived(&mut self, _purpose: &Purpose, _key: &[u8]) {}

    /// A derivation did not happen (refused, failed locally).
    fn on_derive_failed(&mut self, _purpose: &Purpose, _why: &str) {}

    /// A derivation was not sent because the session refused it: key
    /// derivation is off or held back ([`RequestRefused::is_feature_wait`];
    /// a host refusal arrives as [`RequestRefused::FeatureOff`] with the
    /// state its code stands for), or another local reason. By default a
    /// failure; a handler that waits for [`GuestEvent::FeatureUsable`] asks
    /// again then.
    fn on_derive_not_sent(&mut self, purpose: &Purpose, _length: u8, why: RequestRefused) {
        self.on_derive_failed(purpose, &why.to_string());
    }

    /// The handler's own timer (a workload that asks periodically): the
    /// session loop calls [`Handler::on_wake`] at this instant, read again
    /// before each wait. `None` (the default): never. An instant already
    /// past fires at once, so `on_wake` must move it on.
    fn wake_at(&self) -> Option<Instant> {
        None
    }

    /// [`Handler::wake_at`] came; acts on `guest` as `on_event` does.
    fn on_wake(&mut self, _guest: &mut Guest, _now: Instant) -> Reaction {
        Reaction::default()
    }
}

/// Derivations asked for and not yet answered; one runs at a time (the
/// session allows one outstanding request). K stays here, zeroized on drop,
/// until the host's tag confirms it.
#[derive(Default)]
struct Derivations {
    queue: std::collections::VecDeque<(Purpose, u8)>,
    running: Option<(Purpose, DerivedKey)>,
}

impl Derivations {
    fn on_event<H: Handler>(&mut self, ev: &GuestEvent, handler: &mut H) {
        match ev {
            GuestEvent::Derived { purpose } => {
                if let Some((p, key)) = self.running.take()
                    && &p == purpose
                {
                    handler.on_derived(&p, &key);
                }
            }
            GuestEvent::PurposeRefused { purpose } => {
                if self.running.as_ref().is_some_and(|(p, _)| p == purpose) {
                    self.running = None;
                }
                handler.on_derive_failed(purpose, "the host refused the purpose");
            }
            GuestEvent::FeatureHeld {
                feature,
                until,
                code,
            } if *feature == vkx_common::wire::feature::KEY_DERIVATION => {
                let why = match feature_off_state(*code) {
                    Some(state) => RequestRefused::FeatureOff {
                        feature: *feature,
                        state,
                    },
                    None => RequestRefused::FeatureHeld {
                        feature: *feature,
                        until: *until,
                    },
                };
                let running = self
                    .running
                    .take()
                    .map(|(p, key)| (p, u8::try_from(key.len()).unwrap_or(u8::MAX)));
                for (p, length) in running.into_iter().chain(std::mem::take(&mut self.queue)) {
                    handler.on_derive_not_sent(&p, length, why);
                }
            }
            _ => {}
        }
    }

    /// Starts the next derivation if none runs and the session is free.
    fn next<H: Handler>(
        &mut self,
        guest: &mut Guest,
        tls: &rustls::ClientConnection,
        handler: &mut H,
    ) -> Output<GuestEvent> {
        let Guest::Established(s) = guest else {
            return Output::default();
        };
        if self.running.is_some() {
            return Output::default();
        }
        // Bounded by the queue, which only the handler fills.
        while let Some((purpose, length)) = self.queue.pop_front() {
            let Ok(key) =
                vkx_common::tls::derive_exporter(tls, purpose.as_str(), usize::from(length))
            else {
                handler.on_derive_failed(&purpose, "TLS exporter failed");
                continue;
            };
            let guest_tag = confirm_tag(&key, ConfirmRole::Guest, purpose.as_str());
            let host_tag = confirm_tag(&key, ConfirmRole::Host, purpose.as_str());
            match s.request_derive(purpose.clone(), length, guest_tag, host_tag, Instant::now()) {
                Ok(out) => {
                    self.running = Some((purpose, key));
                    return out;
                }
                Err(RequestRefused::Busy) => {
                    // Another request is outstanding: try again later.
                    self.queue.push_front((purpose, length));
                    return Output::default();
                }
                Err(e) => handler.on_derive_not_sent(&purpose, length, e),
            }
        }
        Output::default()
    }
}

/// A handler's answer to one event.
#[derive(Debug, Default)]
pub struct Reaction {
    pub out: Output<GuestEvent>,
    /// Derivations to run (purpose, length 16..64), one after another.
    pub derive: Vec<(Purpose, u8)>,
    /// End the session with `goodbye(normal)` after sending `out`.
    pub finish: bool,
}

/// How one attempt ended.
#[derive(Debug)]
pub struct Attempt {
    /// The session reached Established (the host accepted the evidence).
    pub established: bool,
    /// Why it closed, in the retry policy's terms.
    pub close: CloseReason,
    /// A short, human description of how it ended (no peer bytes).
    pub detail: String,
}

impl Attempt {
    fn failed(failure: Failure, detail: impl Into<String>) -> Self {
        Self {
            established: false,
            close: CloseReason::Failed(failure),
            detail: detail.into(),
        }
    }

    /// The failure to report to the retry policy, if it was one.
    pub fn failure(&self) -> Option<Failure> {
        match self.close {
            CloseReason::Failed(f) => Some(f),
            CloseReason::Orderly { .. } => None,
        }
    }
}

/// Produces the evidence for a challenge. The agent's own is [`Tpm`];
/// the trait lets load generators stand in a software signer for a
/// thousand vTPMs (a host accepts such a quote only if its registry holds
/// that signer's key as the VM's AK).
pub trait Quote: Send + Sync {
    /// Called on a blocking thread: TPM calls block.
    fn quote(
        &self,
        selection: &[PcrBankSelection],
        qualifying_data: &[u8; 32],
    ) -> Result<Evidence, String>;
}

/// The VM's TPM through tss-esapi.
#[derive(Debug, Clone)]
pub struct Tpm {
    pub tcti: String,
    pub ak_auth: crate::tpm::AkAuth,
}

impl Quote for Tpm {
    fn quote(
        &self,
        selection: &[PcrBankSelection],
        qualifying_data: &[u8; 32],
    ) -> Result<Evidence, String> {
        crate::tpm::collect_evidence(&self.tcti, &self.ak_auth, selection, qualifying_data)
            .map_err(|e| e.to_string())
    }
}

/// Everything an attempt needs that does not change between attempts.
pub struct Agent {
    tls: tokio_rustls::TlsConnector,
    session: Arc<GuestConfig>,
    quoter: Arc<dyn Quote>,
    host: Target,
    rng: SystemRandom,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Fails only on local misconfiguration (permanent).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let tls = vkx_common::tls::client_config(config.host_key_sha256)
            .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
        let agent_name = AgentName::new("vkx-guest")
            .map_err(|e| anyhow::anyhow!("agent name is not a wire name: {e}"))?;
        let agent_version = AgentVersion::new(env!("CARGO_PKG_VERSION"))
            .map_err(|e| anyhow::anyhow!("agent version is not a wire name: {e}"))?;
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(tls),
            session: Arc::new(GuestConfig {
                versions: VersionRange {
                    min: PROTOCOL_VERSION_1,
                    max: PROTOCOL_VERSION_1,
                },
                agent_name,
                agent_version,
            }),
            quoter: Arc::new(Tpm {
                tcti: config
                    .tcti
                    .clone()
                    .unwrap_or_else(crate::tpm::tcti_from_env),
                ak_auth: match &config.ak_auth_file {
                    Some(path) => crate::tpm::AkAuth::load(path)?,
                    None => crate::tpm::AkAuth::empty(),
                },
            }),
            host: config.host.clone(),
            rng: SystemRandom::new(),
        })
    }

    /// The same agent with another source of evidence.
    pub fn with_quoter(mut self, quoter: Arc<dyn Quote>) -> Self {
        self.quoter = quoter;
        self
    }

    /// Where this agent connects.
    pub fn host(&self) -> &Target {
        &self.host
    }

    /// One attempt: connect, TLS, session until it closes or `stop` turns
    /// true (then `goodbye(shutdown)`).
    pub async fn attempt<H: Handler>(
        &self,
        handler: &mut H,
        stop: &mut watch::Receiver<bool>,
    ) -> Attempt {
        self.attempt_watching(handler, stop, None).await
    }

    /// [`Agent::attempt`], also ended in order when `generation` changes
    /// (a new VM generation, [`crate::vmgenid`]): the session is left
    /// (`goodbye(reattest)` if Established, PROTOCOL.md §11.4) so that the
    /// next attempt attests the new generation. A change that happened
    /// before the session starts is already covered by its quote: the
    /// receiver is marked seen when the attempt starts.
    pub async fn attempt_watching<H: Handler>(
        &self,
        handler: &mut H,
        stop: &mut watch::Receiver<bool>,
        mut generation: Option<&mut watch::Receiver<u64>>,
    ) -> Attempt {
        if let Some(g) = generation.as_mut() {
            g.borrow_and_update();
        }
        let stream = match crate::transport::connect(&self.host).await {
            Ok(s) => s,
            Err(e) => {
                let failure = if e.is_retryable() {
                    Failure::Transport
                } else {
                    Failure::Permanent
                };
                return Attempt::failed(failure, format!("connect {}: {e}", self.host));
            }
        };
        // A reset the reader cannot see ends the session too
        // (`transport::FaultWatch`). Without the watch (no descriptor to
        // spare) the session still ends at its next write or deadline.
        let fault = crate::transport::FaultWatch::of(&stream).unwrap_or_else(|e| {
            rl_warn!(error = %e, "the connection is not watched for resets");
            crate::transport::FaultWatch::none()
        });
        self.over_with_fault(stream, &fault, handler, stop, generation)
            .await
    }

    /// The attempt on an already connected stream.
    pub async fn over<S, H>(
        &self,
        stream: S,
        handler: &mut H,
        stop: &mut watch::Receiver<bool>,
    ) -> Attempt
    where
        S: AsyncRead + AsyncWrite + Unpin,
        H: Handler,
    {
        let fault = crate::transport::FaultWatch::none();
        self.over_with_fault(stream, &fault, handler, stop, None)
            .await
    }

    /// The attempt on an already connected stream, watching the VM
    /// generation as [`Agent::attempt_watching`] does, and also ended when
    /// `fault` fires: the connection reset under the session in a way its
    /// reader cannot see ([`crate::transport::FaultWatch`];
    /// [`Agent::attempt_watching`] watches the stream it connects).
    pub async fn over_with_fault<S, H>(
        &self,
        stream: S,
        fault: &crate::transport::FaultWatch,
        handler: &mut H,
        stop: &mut watch::Receiver<bool>,
        generation: Option<&mut watch::Receiver<u64>>,
    ) -> Attempt
    where
        S: AsyncRead + AsyncWrite + Unpin,
        H: Handler,
    {
        let tls = match tokio::time::timeout(
            TLS_HANDSHAKE_TIMEOUT,
            self.tls
                .connect(vkx_common::tls::host_server_name(), stream),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                // A wrong host key, or a peer that does not speak vkx, will
                // not get better by retrying (§4.6, §13.4): detected here,
                // or told by the host's alert.
                let permanent = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(vkx_common::tls::handshake_failure_is_permanent);
                let failure = if permanent {
                    Failure::Permanent
                } else {
                    Failure::Transport
                };
                return Attempt::failed(failure, format!("TLS handshake: {e}"));
            }
            Err(_) => return Attempt::failed(Failure::Transport, "TLS handshake timed out"),
        };
        // rustls accepts a server that selects no protocol: a peer that
        // does not speak vkx, permanently (§4.2).
        if !vkx_common::tls::negotiated_vkx(tls.get_ref().1) {
            return Attempt::failed(
                Failure::Permanent,
                "TLS handshake: the host selected no ALPN vkx",
            );
        }
        let exporter = match vkx_common::tls::transcript_exporter(tls.get_ref().1) {
            Ok(x) => x,
            Err(e) => return Attempt::failed(Failure::Transport, format!("TLS exporter: {e}")),
        };
        let mut nonce = [0u8; 32];
        if self.rng.fill(&mut nonce).is_err() {
            return Attempt::failed(Failure::Transport, "no randomness");
        }
        let (guest, first) = Guest::start(self.session.clone(), exporter, nonce, Instant::now());
        self.session_loop(
            Pump::new(guest, first),
            tls,
            fault,
            handler,
            stop,
            generation,
        )
        .await
    }

    async fn session_loop<S, H>(
        &self,
        mut pump: Pump<Guest>,
        mut tls: tokio_rustls::client::TlsStream<S>,
        fault: &crate::transport::FaultWatch,
        handler: &mut H,
        stop: &mut watch::Receiver<bool>,
        mut generation: Option<&mut watch::Receiver<u64>>,
    ) -> Attempt
    where
        S: AsyncRead + AsyncWrite + Unpin,
        H: Handler,
    {
        let mut derive = Derivations::default();
        let mut buf = ReadBuf::new();
        let mut established = false;
        let mut detail = String::from("session closed");
        // A failure of this side (the TPM) that the session reports as the
        // code it sent: the cause is ours, not the host's answer.
        let mut local_cause: Option<String> = None;
        // Each iteration handles the session's events, sends what it asked,
        // then waits for input, a deadline or the stop signal; the
        // session's deadlines bound every wait, the pump the rounds of
        // events.
        loop {
            while let Some(ev) = pump.poll_event() {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        rl_warn!(error = %e, "closing the session");
                        break;
                    }
                };
                let now = Instant::now();
                match ev {
                    GuestEvent::QuoteNeeded {
                        qualifying_data,
                        selection,
                    } => {
                        let quoter = self.quoter.clone();
                        let quote = tokio::task::spawn_blocking(move || {
                            quoter.quote(&selection, &qualifying_data)
                        });
                        // A hung TPM must not hang the agent: the wait ends
                        // at the session's quote deadline or on stop (the
                        // blocked thread finishes on its own).
                        let until = pump
                            .deadline()
                            .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
                        let quote = tokio::select! {
                            q = quote => Some(q),
                            _ = tokio::time::sleep_until(until) => None,
                            _ = stop.changed() => None,
                        };
                        let evidence = match quote {
                            Some(Ok(Ok(e))) => Some(e),
                            Some(Ok(Err(e))) => {
                                rl_warn!(error = %e, "TPM quote failed");
                                local_cause = Some(format!("TPM quote failed: {e}"));
                                None
                            }
                            Some(Err(_)) => None,
                            None => {
                                rl_warn!("the TPM did not answer in time");
                                local_cause = Some(
                                    "TPM quote failed: the TPM did not answer within the \
                                     quote deadline"
                                        .into(),
                                );
                                None
                            }
                        };
                        pump.step(|g| g.on_quote(evidence, Instant::now()));
                    }
                    ev => {
                        if let GuestEvent::Attested { .. } = ev {
                            established = true;
                        }
                        derive.on_event(&ev, handler);
                        let r = handler.on_event(ev, pump.session_mut(), now);
                        apply(r, &mut pump, &mut derive, &mut detail);
                    }
                }
            }
            // One derivation at a time, when no request is outstanding.
            if !pump.is_closing() {
                let out = derive.next(pump.session_mut(), tls.get_ref().1, handler);
                pump.absorb(out);
            }
            while let Some(t) = pump.poll_transmit() {
                vkx_common::rl_log!(
                    trace,
                    bytes = t.payload().len(),
                    msg_type = ?Message::envelope_type(t.payload()),
                    "frame sent"
                );
                if tls.write_all(t.frame()).await.is_err() {
                    return Attempt {
                        established,
                        close: CloseReason::Failed(Failure::Transport),
                        detail: "write to the host failed".into(),
                    };
                }
            }
            let _ = tls.flush().await;
            if let Some(close) = pump.take_close() {
                let _ = tls.shutdown().await;
                if let CloseReason::Failed(f) = &close {
                    detail = local_cause.take().unwrap_or_else(|| describe(f, &detail));
                }
                return Attempt {
                    established,
                    close,
                    detail,
                };
            }
            if pump.has_events() {
                continue;
            }
            let Some(deadline) = pump.deadline() else {
                return Attempt {
                    established,
                    close: CloseReason::Failed(Failure::Transport),
                    detail: "session ended".into(),
                };
            };
            let wake = handler.wake_at();
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(
                    wake.unwrap_or(deadline),
                )), if wake.is_some() => {
                    let r = handler.on_wake(pump.session_mut(), Instant::now());
                    apply(r, &mut pump, &mut derive, &mut detail);
                }
                _ = stop.changed() => {
                    pump.step(|g| g.finish(GoodbyeReason::Shutdown));
                    if !pump.is_closing() {
                        let mut orderly = Output::default();
                        orderly.close = Some(CloseReason::Orderly { retry_after: None });
                        pump.absorb(orderly);
                    }
                    detail = "stopped".into();
                    rl_info!("stopping: goodbye to the host");
                }
                changed = generation_changed(&mut generation), if generation.is_some() => {
                    if changed {
                        pump.step(|g| g.on_generation_changed());
                        detail = "the VM generation changed: attesting again".into();
                    } else {
                        // The watch ended (its sender is gone): nothing
                        // more to wait for.
                        generation = None;
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                    pump.handle_timeout(Instant::now());
                }
                e = fault.fault() => {
                    // The kernel reset the connection (the vsock device
                    // went away or its transport was reset): the reader
                    // would never hear of it.
                    let _ = pump.handle_eof();
                    detail = format!("the connection was reset under the session: {e}");
                }
                n = tls.read(buf.space()) => {
                    let now = Instant::now();
                    match n {
                        Ok(0) | Err(_) => {
                            // The session closes either way; an end inside
                            // a frame says nothing more about the host.
                            let _ = pump.handle_eof();
                            detail = "the host closed the connection".into();
                        }
                        Ok(n) => {
                            let fed = pump.handle_input(buf.filled(n), now, |guest, payload, now| {
                                vkx_common::rl_log!(
                                    trace,
                                    bytes = payload.len(),
                                    msg_type = ?Message::envelope_type(payload),
                                    "frame received"
                                );
                                let (g, o) = guest.on_payload(payload, now);
                                if let (Some(CloseReason::Orderly { .. }), Some(why)) =
                                    (&o.close, goodbye_reason(payload))
                                {
                                    detail = format!("goodbye from the host: {why}");
                                }
                                (g, o)
                            });
                            if let Err(e) = fed {
                                rl_warn!(error = %e, "framing error from the host");
                            }
                            buf.consumed(n);
                        }
                    }
                }
            }
        }
    }
}

/// Waits for a new VM generation; false if the sender is gone.
async fn generation_changed(generation: &mut Option<&mut watch::Receiver<u64>>) -> bool {
    match generation {
        Some(g) => g.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Takes in what a handler's reaction asked for: its derivations, its
/// output, and the session's end if it asked to finish.
fn apply(r: Reaction, pump: &mut Pump<Guest>, derive: &mut Derivations, detail: &mut String) {
    derive.queue.extend(r.derive);
    pump.absorb(r.out);
    if r.finish && !pump.is_closing() {
        pump.step(|g| g.finish(GoodbyeReason::Normal));
        *detail = "done".into();
    }
}

/// The reason of a `goodbye` payload, as the session-ended line names it
/// (the host's `reattest` after a policy change or a rewind, `shutdown`,
/// `idle`); `None` for any other message.
fn goodbye_reason(payload: &[u8]) -> Option<&'static str> {
    if Message::envelope_type(payload)? != u64::from(MessageType::Goodbye.code()) {
        return None;
    }
    match Message::decode(payload) {
        Ok(Message::Goodbye(g)) => Some(match g.reason {
            GoodbyeReason::Normal => "normal",
            GoodbyeReason::Shutdown => "shutdown",
            GoodbyeReason::Reattest => "reattest",
            GoodbyeReason::Idle => "idle",
        }),
        _ => None,
    }
}

fn describe(f: &Failure, fallback: &str) -> String {
    match f {
        Failure::Code { code, retry_after } => match retry_after {
            Some(r) => format!(
                "the host answered {code} (retry after {} ms)",
                r.as_millis()
            ),
            None => format!("the host answered {code}"),
        },
        Failure::Permanent => "protocol violation by the host".into(),
        Failure::Transport => fallback.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vkx_common::wire::{Goodbye, Ping};

    #[test]
    fn the_session_ended_line_names_the_hosts_goodbye_reason() {
        let goodbye = |reason| {
            Message::Goodbye(Goodbye {
                reason,
                retry_after_ms: Some(1000),
            })
            .encode()
            .unwrap()
        };
        assert_eq!(
            goodbye_reason(&goodbye(GoodbyeReason::Reattest)),
            Some("reattest")
        );
        assert_eq!(
            goodbye_reason(&goodbye(GoodbyeReason::Shutdown)),
            Some("shutdown")
        );
        let ping = Message::Ping(Ping { sequence: 1 }).encode().unwrap();
        assert_eq!(goodbye_reason(&ping), None);
        assert_eq!(goodbye_reason(&[0x82, 0x0e]), None);
    }

    #[test]
    fn the_read_buffer_is_wiped_once_consumed() {
        let mut buf = ReadBuf::new();
        let frame = [0x5a_u8; 700];
        buf.space()[..frame.len()].copy_from_slice(&frame);
        assert_eq!(buf.filled(frame.len()), frame);
        buf.consumed(frame.len());
        assert!(buf.0.iter().all(|b| *b == 0));
        assert_eq!(buf.0.len(), READ_CHUNK, "fixed size: it never reallocates");
        // A count beyond the buffer (never returned by a read) is clamped.
        buf.consumed(READ_CHUNK + 1);
        assert!(buf.filled(READ_CHUNK + 1).len() == READ_CHUNK);
    }
}
