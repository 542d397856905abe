//! The metrics endpoint of `vkx-host serve` and its client.
//!
//! The endpoint listens on a Unix socket (`[metrics] socket`, default
//! [`DEFAULT_METRICS_SOCKET`], mode 0660) or on loopback TCP (`[metrics]
//! listen = "127.0.0.1:9461"`; any other address only with
//! `allow_non_loopback = true`). Without a `[metrics]` table there is no
//! endpoint. It answers `GET /metrics` and nothing else (404); a request
//! head is at most [`MAX_REQUEST_HEAD`] bytes and the whole exchange
//! [`EXCHANGE_TIMEOUT`]; at most [`MAX_METRICS_CONNECTIONS`] scrapes run
//! at once ([`MAX_SCRAPES_PER_PEER`] per local user), more are closed at
//! once. Nothing a guest sends reaches it.
//!
//! `vkx-host metrics --socket S` ([`fetch`]) or
//! `curl --unix-socket S http://localhost/metrics` is the client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use vkx_common::rl_warn;

use super::{Metrics, render, wide};
use crate::admission::AdmissionControl;
use crate::limit::{PerKey, Slots};

/// The Unix socket of a `[metrics]` table that names neither.
pub const DEFAULT_METRICS_SOCKET: &str = "/run/vkx/metrics.sock";
/// Longest request head (request line and headers) read.
pub const MAX_REQUEST_HEAD: usize = 4096;
/// Longest a scrape may take, request and response.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once.
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// Longest a client may take to send its request head: a scraper sends
/// it at once, and a client that trickles it holds a slot for no one.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Scrapes one local user (uid; over TCP, one address) may hold at once:
/// a local user who half-sends requests cannot take every slot.
pub const MAX_SCRAPES_PER_PEER: usize = 4;
/// Largest response the client ([`fetch`]) reads.
pub const MAX_RESPONSE: u64 = 1024 * 1024;

/// The `[metrics]` table of host.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Unix socket to serve on; the default when `listen` is not given.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// TCP address instead, e.g. "127.0.0.1:9461".
    #[serde(default)]
    pub listen: Option<String>,
    /// Allow a `listen` address that is not loopback.
    #[serde(default)]
    pub allow_non_loopback: bool,
}

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A `[metrics]` table that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsConfigError {
    #[error("give either socket or listen, not both")]
    Both,
    #[error("listen {0:?} is not an IP address and port, e.g. 127.0.0.1:9461")]
    BadAddress(String),
    #[error("listen {0} is not a loopback address; set allow_non_loopback = true to serve it")]
    NotLoopback(SocketAddr),
}

impl MetricsConfig {
    pub fn endpoint(&self) -> Result<Endpoint, MetricsConfigError> {
        match (&self.socket, &self.listen) {
            (Some(_), Some(_)) => Err(MetricsConfigError::Both),
            (Some(p), None) => Ok(Endpoint::Unix(p.clone())),
            (None, None) => Ok(Endpoint::Unix(PathBuf::from(DEFAULT_METRICS_SOCKET))),
            (None, Some(l)) => {
                let addr: SocketAddr = l
                    .parse()
                    .map_err(|_| MetricsConfigError::BadAddress(l.clone()))?;
                if !addr.ip().is_loopback() && !self.allow_non_loopback {
                    return Err(MetricsConfigError::NotLoopback(addr));
                }
                Ok(Endpoint::Tcp(addr))
            }
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    /// Anything else, malformed requests included.
    NotFound,
}

/// Routes a request head: `GET /metrics` (a query string is ignored) over
/// HTTP/1.0 or 1.1 is [`Route::Metrics`]; everything else is not found.
pub fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::NotFound;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::NotFound;
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if method == "GET" && path == "/metrics" && matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Whether `head` holds a whole request head (ends with an empty line).
pub(super) fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// Reads a request head: until the empty line, end of stream or
/// [`MAX_REQUEST_HEAD`] bytes, whichever comes first.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while head.len() < MAX_REQUEST_HEAD && !head_complete(&head) {
        let room = (MAX_REQUEST_HEAD - head.len()).min(buf.len());
        let n = s.read(&mut buf[..room]).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

pub(super) fn response(status: &str, body: &str, content_type: &str) -> String {
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Content type of the text exposition format.
pub(super) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn exchange<S>(
    mut s: S,
    metrics: &Metrics,
    admission: &AdmissionControl,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read_head(&mut s))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no whole request head in time",
            )
        })??;
    let reply = match route(&head) {
        Route::Metrics => response(
            "200 OK",
            &render(
                metrics,
                &admission.usage(),
                vkx_common::ratelimit::suppressed_total(),
            ),
            CONTENT_TYPE,
        ),
        Route::NotFound => response("404 Not Found", "not found\n", "text/plain"),
    };
    s.write_all(reply.as_bytes()).await?;
    s.shutdown().await
}

/// A bound metrics listener.
#[derive(Debug)]
pub enum MetricsListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Binds the endpoint: a Unix socket (replacing a stale one, mode 0660) or
/// a TCP listener.
pub async fn bind(endpoint: &Endpoint) -> std::io::Result<MetricsListener> {
    match endpoint {
        Endpoint::Unix(path) => crate::listen::bind_local(path).map(MetricsListener::Unix),
        Endpoint::Tcp(addr) => TcpListener::bind(addr).await.map(MetricsListener::Tcp),
    }
}

/// Serves scrapes until `stop` turns true: at most
/// [`MAX_METRICS_CONNECTIONS`] at once, each for at most
/// [`EXCHANGE_TIMEOUT`].
pub async fn serve(
    listener: MetricsListener,
    metrics: Arc<Metrics>,
    admission: Arc<AdmissionControl>,
    stop: watch::Receiver<bool>,
) {
    let slots = Slots::new(MAX_METRICS_CONNECTIONS);
    let per_peer = Arc::new(PerKey::new(MAX_SCRAPES_PER_PEER));
    let serve = move |stream: Stream| {
        let key = match &stream {
            Stream::Unix(s) => s.peer_cred().map_or(u64::MAX, |c| u64::from(c.uid())),
            Stream::Tcp(s) => s.peer_addr().map_or(u64::MAX, |a| match a.ip() {
                std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
                std::net::IpAddr::V6(v6) => {
                    let b = v6.octets();
                    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                }
            }),
        };
        let Some(mine) = per_peer.try_acquire(key) else {
            rl_warn!("metrics: too many scrapes from one user at once; closing one");
            return None;
        };
        let Some(slot) = slots.try_acquire() else {
            rl_warn!("metrics: too many scrapes at once; closing one");
            return None;
        };
        let (metrics, admission) = (metrics.clone(), admission.clone());
        Some(async move {
            let done = match stream {
                Stream::Unix(s) => {
                    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(s, &metrics, &admission)).await
                }
                Stream::Tcp(s) => {
                    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(s, &metrics, &admission)).await
                }
            };
            if let Ok(Err(e)) = done {
                rl_warn!(error = %e, "metrics: scrape failed");
            }
            drop(slot);
            drop(mine);
        })
    };
    crate::listen::accept_loop(listener, "metrics", serve, stop).await;
}

/// One accepted scrape connection.
#[derive(Debug)]
pub enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl crate::listen::Accept for MetricsListener {
    type Conn = Stream;

    async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            MetricsListener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            MetricsListener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

/// Why [`fetch`] got no metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error("connect {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("metrics endpoint sent more than {MAX_RESPONSE} bytes")]
    TooLarge,
    #[error("metrics endpoint answered: {0}")]
    Status(String),
    #[error("metrics endpoint sent something that is not an HTTP response")]
    Malformed,
}

/// The client: `GET /metrics` on the Unix socket `socket`; the body.
pub async fn fetch(socket: &Path) -> Result<String, FetchError> {
    let work = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| FetchError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        (&mut s)
            .take(MAX_RESPONSE + 1)
            .read_to_end(&mut reply)
            .await?;
        if wide(reply.len()) > MAX_RESPONSE {
            return Err(FetchError::TooLarge);
        }
        parse_response(&reply)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, work)
        .await
        .map_err(|_| FetchError::Timeout(EXCHANGE_TIMEOUT))?
}

/// The body of a 200 response.
pub(super) fn parse_response(reply: &[u8]) -> Result<String, FetchError> {
    let text = std::str::from_utf8(reply).map_err(|_| FetchError::Malformed)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or(FetchError::Malformed)?;
    let status = head.lines().next().ok_or(FetchError::Malformed)?;
    let code = status
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..))
        .ok_or(FetchError::Malformed)?;
    if !code.starts_with("200") {
        return Err(FetchError::Status(code.to_owned()));
    }
    Ok(body.to_owned())
}
