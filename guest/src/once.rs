//! `vkx-guest once`: one attestation, for scripts and systemd units (e.g.
//! before an encrypted disk is opened). A thin async driver around
//! [`vkx_common::session::guest::Guest`]: connect, TLS with the pinned host
//! key, hello, quote on a blocking thread, evidence, result, goodbye.
//!
//! Every wait is bounded: the connect and TLS timeouts of §2/§4, then the
//! session's own deadlines. It makes exactly one attempt: retrying with
//! backoff is the daemon's job (`run`, with the retry policy), or systemd's.
//!
//! In this release the transport is the plain Unix socket of
//! PROTOCOL.md §2.4.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vkx_common::errors::RetryClass;
use vkx_common::retry::Failure;
use vkx_common::session::guest::{Guest, GuestConfig, GuestEvent};
use vkx_common::session::transport::{CONNECT_TIMEOUT, TLS_HANDSHAKE_TIMEOUT};
use vkx_common::session::{CloseReason, Output};
use vkx_common::wire::{
    AgentName, AgentVersion, FrameDecoder, GoodbyeReason, PROTOCOL_VERSION_1, VersionRange,
    encode_frame,
};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// `guest.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnceConfig {
    /// The host's socket (development transport, §2.4).
    pub host_socket: PathBuf,
    /// The host key pin printed by `vkx-host init`: SPKI SHA-256, hex.
    pub host_key_sha256: String,
    /// TPM; default: $VKX_TPM_TCTI, else device:/dev/tpmrm0.
    #[serde(default)]
    pub tcti: Option<String>,
}

impl OnceConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// How one attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Attested {
        session_id: [u8; 16],
        reattest_after: Duration,
    },
    /// Not worth retrying automatically (class P, unknown code, TLS pin
    /// or ALPN refusal, local misconfiguration).
    Permanent(String),
    /// Worth retrying later (transport, timeouts, busy, ...).
    Retryable(String),
}

impl Outcome {
    /// The process exit code: 0 attested, 2 permanent, 3 retryable.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Attested { .. } => 0,
            Self::Permanent(_) => 2,
            Self::Retryable(_) => 3,
        }
    }
}

fn classify(reason: &CloseReason) -> Outcome {
    match reason {
        CloseReason::Orderly { .. } => Outcome::Retryable("the host closed the session".into()),
        CloseReason::Failed(Failure::Permanent) => {
            Outcome::Permanent("protocol violation (see the log)".into())
        }
        CloseReason::Failed(Failure::Code { code, .. }) => {
            let text = format!("the host answered {code}");
            match code.class() {
                RetryClass::Permanent => Outcome::Permanent(text),
                _ => Outcome::Retryable(text),
            }
        }
        CloseReason::Failed(Failure::Transport) => {
            Outcome::Retryable("the connection to the host failed".into())
        }
    }
}

/// One attestation attempt.
pub async fn once(config: OnceConfig) -> Outcome {
    let pin: [u8; 32] = match hex::decode(config.host_key_sha256.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
    {
        Some(p) => p,
        None => return Outcome::Permanent("host_key_sha256 is not 64 hex digits".into()),
    };
    let tls = match vkx_common::tls::client_config(pin) {
        Ok(c) => tokio_rustls::TlsConnector::from(c),
        Err(e) => return Outcome::Permanent(format!("TLS configuration: {e}")),
    };
    let tcti = config
        .tcti
        .clone()
        .unwrap_or_else(crate::tpm::tcti_from_env);
    let stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&config.host_socket)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Outcome::Retryable(format!(
                    "connect {}: {e}",
                    config.host_socket.display()
                ));
            }
            Err(_) => return Outcome::Retryable("connect timed out".into()),
        };
    let tls = match tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        tls.connect(vkx_common::tls::host_server_name(), stream),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            // A wrong host key or a peer that does not speak vkx will not
            // get better by retrying (§4.6).
            let text = format!("TLS handshake: {e}");
            return match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(
                    rustls::Error::InvalidCertificate(_) | rustls::Error::NoApplicationProtocol,
                ) => Outcome::Permanent(text),
                _ => Outcome::Retryable(text),
            };
        }
        Err(_) => return Outcome::Retryable("TLS handshake timed out".into()),
    };
    let exporter = match vkx_common::tls::transcript_exporter(tls.get_ref().1) {
        Ok(x) => x,
        Err(e) => return Outcome::Retryable(format!("TLS exporter: {e}")),
    };
    let mut nonce = [0u8; 32];
    if SystemRandom::new().fill(&mut nonce).is_err() {
        return Outcome::Retryable("no randomness".into());
    }
    let config = Arc::new(GuestConfig {
        versions: VersionRange {
            min: PROTOCOL_VERSION_1,
            max: PROTOCOL_VERSION_1,
        },
        agent_name: AgentName::new("vkx-guest").unwrap_or_else(|_| unreachable!("valid literal")),
        agent_version: match AgentVersion::new(env!("CARGO_PKG_VERSION")) {
            Ok(v) => v,
            Err(_) => return Outcome::Permanent("agent version is not a wire name".into()),
        },
    });
    let (mut guest, first) = Guest::start(config, exporter, nonce, std::time::Instant::now());
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut frames = FrameDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pending: Output<GuestEvent> = first;
    // Each iteration sends what the session asked, then waits for input or
    // a deadline; the session's deadlines bound the whole exchange.
    loop {
        for payload in std::mem::take(&mut pending.send) {
            let mut frame = Vec::with_capacity(payload.len() + 4);
            if encode_frame(&payload, &mut frame).is_err() || wr.write_all(&frame).await.is_err() {
                return Outcome::Retryable("write to the host failed".into());
            }
        }
        let _ = wr.flush().await;
        if let Some(reason) = pending.close.take() {
            let _ = wr.shutdown().await;
            return classify(&reason);
        }
        for ev in std::mem::take(&mut pending.events) {
            match ev {
                GuestEvent::QuoteNeeded {
                    qualifying_data,
                    selection,
                } => {
                    let tcti = tcti.clone();
                    let quote = tokio::task::spawn_blocking(move || {
                        crate::tpm::collect_evidence(&tcti, &selection, &qualifying_data)
                    })
                    .await;
                    let evidence = match quote {
                        Ok(Ok(e)) => Some(e),
                        Ok(Err(e)) => {
                            eprintln!("vkx-guest: quote failed: {e}");
                            None
                        }
                        Err(_) => None,
                    };
                    let (g, o) = guest.on_quote(evidence, std::time::Instant::now());
                    guest = g;
                    pending.absorb(o);
                }
                GuestEvent::Attested {
                    session_id,
                    reattest_after,
                    ..
                } => {
                    let (_, o) = guest.finish(GoodbyeReason::Normal);
                    for payload in &o.send {
                        let mut frame = Vec::new();
                        if encode_frame(payload, &mut frame).is_ok() {
                            let _ = wr.write_all(&frame).await;
                        }
                    }
                    let _ = wr.shutdown().await;
                    return Outcome::Attested {
                        session_id,
                        reattest_after,
                    };
                }
                _ => {}
            }
        }
        if !pending.send.is_empty() || pending.close.is_some() {
            continue;
        }
        let Some(deadline) = guest.deadline() else {
            return Outcome::Retryable("session ended".into());
        };
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                let (g, o) = guest.on_timeout(std::time::Instant::now());
                guest = g;
                pending = o;
            }
            n = rd.read(&mut buf) => {
                let now = std::time::Instant::now();
                match n {
                    Ok(0) | Err(_) => {
                        let (g, o) = guest.on_transport_closed();
                        guest = g;
                        pending = o;
                    }
                    Ok(n) => {
                        let mut input = &buf[..n];
                        // Every frame consumes at least one byte.
                        loop {
                            match frames.decode(&mut input) {
                                Ok(Some(payload)) => {
                                    let (g, o) = guest.on_payload(payload, now);
                                    guest = g;
                                    pending.absorb(o);
                                    if pending.close.is_some() { break; }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    eprintln!("vkx-guest: framing: {e}");
                                    let mut o = Output::default();
                                    o.frame_error(&e);
                                    guest = Guest::Closed;
                                    pending.absorb(o);
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
