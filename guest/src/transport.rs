//! The guest's transport connection to the host (PROTOCOL.md §2.2, §2.4):
//! AF_VSOCK to CID 2 (`VMADDR_CID_HOST`) on the host agent's port, or a
//! plain Unix socket for development and tests. [`connect`] opens one,
//! bounded by [`CONNECT_TIMEOUT`], and returns a [`Stream`] that TLS runs
//! over; [`ConnectError`] says whether another attempt can help.
//!
//! Reserved source port (§2.2 SHOULD). tokio-vsock 0.7.3 cannot bind a
//! stream socket before connecting: `VsockStream::connect` creates and
//! connects its socket in one call, and the `vsock` crate's `VsockSocket`
//! is a datagram socket. So the socket is made with `nix` (the crate
//! `vsock` itself is built on; no new crate in the tree, no `unsafe`):
//! `socket`, `bind` to `VMADDR_CID_ANY` and a port from 1023 downwards
//! (at most [`RESERVED_PORT_TRIES`] ports, skipping ports in use), then a
//! blocking `connect` on a blocking-pool thread (the kernel bounds it with
//! the vsock connect timeout, 2 s by default; [`CONNECT_TIMEOUT`] bounds
//! the wait for it), and the connected socket is handed to tokio-vsock.
//! Binding a port below 1024 needs `CAP_NET_BIND_SERVICE`: without it
//! (`EACCES`/`EPERM`), or when every port tried is in use, the socket
//! connects from an ephemeral port instead and a rate-limited warning
//! says so: a host that sets `require_privileged_port` will then refuse
//! this guest, opaquely (§2.6).
//!
//! A connection the kernel resets under the agent. When the vsock device
//! goes away or its transport is reset (a live migration or snapshot
//! restore: QEMU and Firecracker send `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`;
//! a hot-unplug), the guest kernel resets every connected vsock socket by
//! setting `sk_err` and nothing else. `vsock_poll` then reports `EPOLLERR`
//! (and `EPOLLOUT`) but neither `EPOLLIN` nor `EPOLLHUP`, so a reader
//! waiting for readability (tokio-vsock's `poll_read`, tokio's readiness
//! model) is never woken: a daemon with nothing to send would sit on a
//! dead session until its next timer, up to its re-attestation interval.
//! [`FaultWatch`] waits for error readiness on the same socket (a second
//! descriptor registered with `Interest::ERROR`), and the session loop
//! ends the session when it fires. Found by `make vm-test`'s live snapshot
//! case (Linux 6.1).
//!
//! Retries. §13.4 lists every cause of dormancy, and no transport failure
//! is among them: every I/O failure to connect is retryable (the retry
//! budget bounds them). Only a target that can never work (a port the
//! host cannot listen on, an empty path) is permanent, and it is refused
//! before any socket is made.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, VsockAddr, bind, connect as nix_connect, getsockopt, sockopt,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;
use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VsockStream};
use vkx_common::rl_warn;
use vkx_common::session::transport::CONNECT_TIMEOUT;

/// Lowest port the host agent may listen on (§2.2).
pub const MIN_HOST_PORT: u32 = 1024;
/// `VMADDR_PORT_ANY`: "any port" to `bind`, never a port to connect to.
pub const VMADDR_PORT_ANY: u32 = u32::MAX;
/// The first reserved source port tried; later tries go downwards.
pub const RESERVED_PORT_FIRST: u32 = 1023;
/// Reserved source ports tried before falling back to an ephemeral one.
/// The agent holds one connection at a time, but a closed vsock port may
/// stay bound for a few seconds while the close completes.
pub const RESERVED_PORT_TRIES: u32 = 16;

/// Where the host is.
///
/// In TOML: `target = { vsock = { port = 7861 } }` or
/// `target = { unix = "/run/vkx/host.sock" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// A plain Unix socket (§2.4: development and tests only).
    Unix(PathBuf),
    /// AF_VSOCK, CID 2 (the host), this port (§2.2).
    Vsock { port: u32 },
}

impl Target {
    /// Refuses a target no attempt can reach (permanent).
    pub fn validate(&self) -> Result<(), ConnectError> {
        let reason = match self {
            Self::Unix(p) if p.as_os_str().is_empty() => "empty Unix socket path",
            Self::Unix(_) => return Ok(()),
            Self::Vsock { port } if *port < MIN_HOST_PORT => {
                "vsock port below 1024: the host cannot listen there (PROTOCOL.md §2.2)"
            }
            Self::Vsock { port } if *port == VMADDR_PORT_ANY => {
                "vsock port 4294967295 is VMADDR_PORT_ANY"
            }
            Self::Vsock { .. } => return Ok(()),
        };
        Err(ConnectError::InvalidTarget {
            target: self.clone(),
            reason,
        })
    }

    /// The host's vsock address for a vsock target: CID 2 and the port.
    pub fn vsock_addr(&self) -> Option<VsockAddr> {
        match self {
            Self::Vsock { port } => Some(host_addr(*port)),
            Self::Unix(_) => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Vsock { port } => write!(f, "vsock:{VMADDR_CID_HOST}:{port}"),
        }
    }
}

/// The host's address: `VMADDR_CID_HOST` (2) and `port`.
pub fn host_addr(port: u32) -> VsockAddr {
    VsockAddr::new(VMADDR_CID_HOST, port)
}

/// The local address a reserved source port is bound to.
pub fn source_addr(port: u32) -> VsockAddr {
    VsockAddr::new(VMADDR_CID_ANY, port)
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The target can never work: permanent.
    #[error("invalid target {target}: {reason}")]
    InvalidTarget {
        target: Target,
        reason: &'static str,
    },
    /// The connect failed (refused, reset, no such device, ...).
    #[error("connect to {target}: {source}")]
    Io { target: Target, source: io::Error },
    #[error("connect to {target} timed out after {timeout:?}")]
    TimedOut { target: Target, timeout: Duration },
}

impl ConnectError {
    /// Whether a later attempt can succeed. Every transport failure can
    /// (§13.4 makes none of them a cause of dormancy); an invalid target
    /// cannot.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::InvalidTarget { .. })
    }

    /// A stable snake_case name of the cause, for logs and status.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidTarget { .. } => "invalid_target",
            Self::TimedOut { .. } => "timed_out",
            Self::Io { source, .. } => io_cause(source),
        }
    }
}

/// Names the common causes of a failed connect.
fn io_cause(e: &io::Error) -> &'static str {
    use nix::errno::Errno;
    if let Some(raw) = e.raw_os_error() {
        match Errno::from_raw(raw) {
            Errno::ECONNREFUSED => return "refused",
            Errno::ETIMEDOUT => return "timed_out",
            Errno::ECONNRESET | Errno::ECONNABORTED => return "reset",
            // No vsock transport (yet): the driver may still be loading.
            Errno::ENODEV => return "no_device",
            Errno::ENETUNREACH | Errno::EHOSTUNREACH => return "unreachable",
            Errno::EAFNOSUPPORT => return "no_vsock_support",
            Errno::ENOENT => return "not_found",
            Errno::EACCES | Errno::EPERM => return "permission_denied",
            _ => {}
        }
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timed_out",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
        io::ErrorKind::NotFound => "not_found",
        io::ErrorKind::PermissionDenied => "permission_denied",
        _ => "other",
    }
}

/// A connected transport stream.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Vsock(VsockStream),
}

impl Stream {
    /// The local vsock port (the source port the host sees), if vsock.
    pub fn local_vsock_port(&self) -> Option<u32> {
        match self {
            Self::Vsock(s) => s.local_addr().ok().map(|a| a.port()),
            Self::Unix(_) => None,
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Self::Unix(s) => s.as_fd(),
            Self::Vsock(s) => s.as_fd(),
        }
    }
}

/// Error wake-ups without a pending error one [`FaultWatch`] takes before
/// it stops watching.
pub const MAX_CLEAN_WAKEUPS: u32 = 16;

/// Error readiness of a connected socket, which its reader does not see
/// (module docs: a vsock connection reset under the agent).
#[derive(Debug)]
pub struct FaultWatch(Option<AsyncFd<OwnedFd>>);

impl FaultWatch {
    /// Watches `socket` through a duplicate of its descriptor (the
    /// socket stays open until both are dropped: drop the watch with the
    /// stream). Needs a tokio runtime with I/O.
    pub fn of(socket: &impl AsFd) -> io::Result<Self> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        // tokio 1.54 deprecates its safe constructors because an arbitrary
        // `T: AsRawFd` may close or swap its descriptor while registered;
        // an `OwnedFd` owns its descriptor for its whole life, which is the
        // invariant the unsafe `register_with_interest` asks for.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(fd, Interest::ERROR)?;
        Ok(Self(Some(fd)))
    }

    /// A watch that never fires (a stream that is not a socket of ours).
    pub fn none() -> Self {
        Self(None)
    }

    /// Resolves when the socket has a pending error, with that error
    /// (`SO_ERROR`, which reading it clears: the connection is over
    /// either way). Each turn waits for a new readiness event, so it does
    /// not spin; readiness without an error (none is expected: the
    /// reader took the error first) is cleared and waited for again, at
    /// most [`MAX_CLEAN_WAKEUPS`] times, after which the watch stays
    /// silent and the session relies on its reader and deadlines alone.
    pub async fn fault(&self) -> io::Error {
        let Some(fd) = &self.0 else {
            return std::future::pending().await;
        };
        for _ in 0..MAX_CLEAN_WAKEUPS {
            let mut guard = match fd.ready(Interest::ERROR).await {
                Ok(g) => g,
                Err(e) => return e,
            };
            match getsockopt(fd.get_ref(), sockopt::SocketError) {
                Ok(0) => guard.clear_ready(),
                Ok(errno) => return io::Error::from_raw_os_error(errno),
                Err(e) => return io::Error::from(e),
            }
        }
        std::future::pending().await
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Vsock(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Unix(s) => s.is_write_vectored(),
            Self::Vsock(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens a connection to `target`, bounded by [`CONNECT_TIMEOUT`].
pub async fn connect(target: &Target) -> Result<Stream, ConnectError> {
    connect_with(target, CONNECT_TIMEOUT).await
}

/// [`connect`] with the bound as a parameter.
pub async fn connect_with(target: &Target, timeout: Duration) -> Result<Stream, ConnectError> {
    target.validate()?;
    let attempt = async {
        match target {
            Target::Unix(path) => UnixStream::connect(path).await.map(Stream::Unix),
            Target::Vsock { port } => connect_vsock(*port).await.map(Stream::Vsock),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ConnectError::Io {
            target: target.clone(),
            source,
        }),
        Err(_) => Err(ConnectError::TimedOut {
            target: target.clone(),
            timeout,
        }),
    }
}

/// The source port a vsock connection got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePort {
    /// Bound to this reserved port.
    Reserved(u32),
    /// Left to the kernel (an ephemeral port >= 1024), for this reason.
    Ephemeral(Fallback),
}

/// Why no reserved source port was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// `EACCES`/`EPERM`: no `CAP_NET_BIND_SERVICE`.
    NotPermitted,
    /// Every port tried was in use.
    AllInUse,
    /// `bind` failed otherwise; the connect reports any real problem.
    BindFailed(io::ErrorKind),
}

/// Tries reserved ports from [`RESERVED_PORT_FIRST`] downwards, at most
/// [`RESERVED_PORT_TRIES`] of them, with `bind_port`. Stops at the first
/// port bound, at a permission error (no other reserved port will do
/// better) or at any error other than "in use".
pub fn bind_reserved(mut bind_port: impl FnMut(u32) -> io::Result<()>) -> SourcePort {
    let last = RESERVED_PORT_FIRST + 1 - RESERVED_PORT_TRIES;
    for port in (last..=RESERVED_PORT_FIRST).rev() {
        match bind_port(port) {
            Ok(()) => return SourcePort::Reserved(port),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return SourcePort::Ephemeral(Fallback::NotPermitted);
            }
            Err(e) => return SourcePort::Ephemeral(Fallback::BindFailed(e.kind())),
        }
    }
    SourcePort::Ephemeral(Fallback::AllInUse)
}

/// AF_VSOCK to the host from a reserved source port when permitted.
async fn connect_vsock(port: u32) -> io::Result<VsockStream> {
    let (connected, source) = tokio::task::spawn_blocking(move || connect_vsock_blocking(port))
        .await
        .map_err(io::Error::other)??;
    // Said once per process: it does not change between attempts, and an
    // outage must not turn it into a line per attempt.
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let SourcePort::Ephemeral(why) = source
        && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        rl_warn!(
            reason = ?why,
            "vsock: no reserved source port; a host requiring one will refuse this guest \
             (said once)"
        );
    }
    VsockStream::new(connected)
}

/// Socket, bind, connect: blocking, on a blocking-pool thread. The kernel's
/// vsock connect timeout bounds the connect.
fn connect_vsock_blocking(port: u32) -> io::Result<(vsock::VsockStream, SourcePort)> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let source = bind_reserved(|p| Ok(bind(fd.as_raw_fd(), &source_addr(p))?));
    nix_connect(fd.as_raw_fd(), &host_addr(port))?;
    Ok((vsock::VsockStream::from(fd), source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // No test here may create an AF_VSOCK socket: everything vsock is
    // tested up to the socket (addresses, validation, the bind policy).

    /// The blind spot `FaultWatch` covers, on a real socket: a connected
    /// UDP socket whose datagram met a closed port gets `sk_err`
    /// (ECONNREFUSED) and, as a reset vsock socket does, polls as
    /// `EPOLLERR` without `EPOLLIN`. A reader waiting for readability is
    /// not woken; the watch is, with the error.
    #[tokio::test]
    async fn a_socket_error_wakes_the_fault_watch_and_not_a_reader() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(closed_addr).unwrap();
        sock.set_nonblocking(true).unwrap();
        let watch = FaultWatch::of(&sock).unwrap();
        let reader = tokio::net::UdpSocket::from_std(sock.try_clone().unwrap()).unwrap();
        sock.send(b"x").unwrap();
        let bound = Duration::from_secs(10);
        let e = tokio::select! {
            e = watch.fault() => e,
            r = reader.readable() => panic!("the reader woke first: {r:?}"),
            () = tokio::time::sleep(bound) => panic!("no fault within {bound:?}"),
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), reader.readable())
                .await
                .is_err(),
            "an error alone made the socket readable"
        );
    }

    /// Data both ways and the peer's close (EOF, which the reader sees)
    /// never fire the watch; nor does `FaultWatch::none`.
    #[tokio::test]
    async fn a_healthy_connection_and_an_orderly_close_do_not_fire_the_watch() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let watch = FaultWatch::of(&a).unwrap();
        let quiet = Duration::from_millis(300);
        a.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"pong").await.unwrap();
        a.read_exact(&mut got).await.unwrap();
        assert!(tokio::time::timeout(quiet, watch.fault()).await.is_err());
        drop(b);
        assert_eq!(a.read(&mut got).await.unwrap(), 0, "EOF");
        assert!(tokio::time::timeout(quiet, watch.fault()).await.is_err());
        assert!(
            tokio::time::timeout(quiet, FaultWatch::none().fault())
                .await
                .is_err()
        );
    }

    #[test]
    fn transport_target_serde_and_display() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            target: Target,
        }
        let d: Doc = toml::from_str("target = { vsock = { port = 7861 } }").unwrap();
        assert_eq!(d.target, Target::Vsock { port: 7861 });
        assert_eq!(d.target.to_string(), "vsock:2:7861");
        let d: Doc = toml::from_str("target = { unix = \"/run/vkx/host.sock\" }").unwrap();
        assert_eq!(d.target, Target::Unix("/run/vkx/host.sock".into()));
        assert_eq!(d.target.to_string(), "unix:/run/vkx/host.sock");
        for bad in [
            "target = { tcp = \"x\" }",
            "target = { vsock = { port = 7861, cid = 3 } }",
            "target = { vsock = { } }",
            "target = { vsock = { port = -1 } }",
        ] {
            assert!(toml::from_str::<Doc>(bad).is_err(), "{bad}");
        }
        let json = serde_json::to_string(&Target::Vsock { port: 9000 }).unwrap();
        assert_eq!(json, r#"{"vsock":{"port":9000}}"#);
        assert_eq!(
            serde_json::from_str::<Target>(&json).unwrap(),
            Target::Vsock { port: 9000 }
        );
    }

    #[test]
    fn transport_target_validation() {
        for ok in [
            Target::Vsock { port: 1024 },
            Target::Vsock { port: 7861 },
            Target::Vsock { port: u32::MAX - 1 },
            Target::Unix("/x".into()),
        ] {
            assert!(ok.validate().is_ok(), "{ok}");
        }
        for bad in [
            Target::Vsock { port: 0 },
            Target::Vsock { port: 1023 },
            Target::Vsock { port: u32::MAX },
            Target::Unix(PathBuf::new()),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(matches!(e, ConnectError::InvalidTarget { .. }), "{bad}");
            assert!(!e.is_retryable(), "{bad}");
            assert_eq!(e.kind(), "invalid_target");
        }
    }

    #[test]
    fn transport_addresses() {
        let a = Target::Vsock { port: 7861 }.vsock_addr().unwrap();
        assert_eq!((a.cid(), a.port()), (2, 7861));
        assert_eq!(a, host_addr(7861));
        assert_eq!(Target::Unix("/x".into()).vsock_addr(), None);
        let s = source_addr(1023);
        assert_eq!((s.cid(), s.port()), (u32::MAX, 1023));
        assert_eq!(VMADDR_CID_HOST, 2);
        assert_eq!(VMADDR_CID_ANY, u32::MAX);
    }

    #[test]
    fn transport_reserved_port_policy() {
        // The first port free: 1023.
        let mut tried = Vec::new();
        let got = bind_reserved(|p| {
            tried.push(p);
            Ok(())
        });
        assert_eq!(got, SourcePort::Reserved(1023));
        assert_eq!(tried, [1023]);

        // Ports in use are skipped, downwards.
        let mut tried = Vec::new();
        let got = bind_reserved(|p| {
            tried.push(p);
            if p > 1020 {
                Err(Errno::EADDRINUSE.into())
            } else {
                Ok(())
            }
        });
        assert_eq!(got, SourcePort::Reserved(1020));
        assert_eq!(tried, [1023, 1022, 1021, 1020]);

        // Not permitted: fall back at once, whichever errno.
        for errno in [Errno::EACCES, Errno::EPERM] {
            let mut calls = 0;
            let got = bind_reserved(|_| {
                calls += 1;
                Err(errno.into())
            });
            assert_eq!(got, SourcePort::Ephemeral(Fallback::NotPermitted));
            assert_eq!(calls, 1);
        }

        // All in use: exactly RESERVED_PORT_TRIES ports, all reserved.
        let mut tried = Vec::new();
        let got = bind_reserved(|p| {
            tried.push(p);
            Err(Errno::EADDRINUSE.into())
        });
        assert_eq!(got, SourcePort::Ephemeral(Fallback::AllInUse));
        assert_eq!(tried.len(), usize::try_from(RESERVED_PORT_TRIES).unwrap());
        assert!(tried.iter().all(|p| *p < 1024));
        assert_eq!(tried.first(), Some(&1023));
        assert!(tried.windows(2).all(|w| w[0] == w[1] + 1));

        // Another error: stop, and let the connect report any real problem.
        let got = bind_reserved(|_| Err(Errno::EINVAL.into()));
        assert_eq!(
            got,
            SourcePort::Ephemeral(Fallback::BindFailed(io::ErrorKind::InvalidInput))
        );
    }

    #[test]
    fn transport_error_classification() {
        let target = Target::Vsock { port: 7861 };
        let io_err = |errno: Errno| ConnectError::Io {
            target: target.clone(),
            source: errno.into(),
        };
        for (errno, kind) in [
            (Errno::ECONNREFUSED, "refused"),
            (Errno::ETIMEDOUT, "timed_out"),
            (Errno::ECONNRESET, "reset"),
            (Errno::ENODEV, "no_device"),
            (Errno::EHOSTUNREACH, "unreachable"),
            (Errno::EAFNOSUPPORT, "no_vsock_support"),
            (Errno::ENOENT, "not_found"),
            (Errno::EACCES, "permission_denied"),
            (Errno::EIO, "other"),
        ] {
            let e = io_err(errno);
            assert_eq!(e.kind(), kind, "{errno}");
            assert!(e.is_retryable(), "{errno}");
        }
        let t = ConnectError::TimedOut {
            target: target.clone(),
            timeout: CONNECT_TIMEOUT,
        };
        assert!(t.is_retryable());
        assert_eq!(t.kind(), "timed_out");
        assert!(t.to_string().contains("vsock:2:7861"));
    }

    #[test]
    fn transport_stream_is_send_unpin_static() {
        fn check<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>() {}
        check::<Stream>();
    }

    #[tokio::test]
    async fn transport_unix_connect_and_delegation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            // The client's shutdown arrives as end of stream.
            assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        });
        let mut s = connect(&Target::Unix(path)).await.unwrap();
        assert!(matches!(s, Stream::Unix(_)));
        assert_eq!(s.local_vsock_port(), None);
        s.write_all(b"hello").await.unwrap();
        s.flush().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        s.shutdown().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn transport_unix_failures_are_retryable() {
        let dir = tempfile::tempdir().unwrap();
        // No socket at the path: not found.
        let e = connect(&Target::Unix(dir.path().join("absent")))
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Io { .. }), "{e}");
        assert_eq!(e.kind(), "not_found");
        assert!(e.is_retryable());
        // A socket nobody listens on any more: refused.
        let path = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = connect(&Target::Unix(path)).await.unwrap_err();
        assert_eq!(e.kind(), "refused", "{e}");
        assert!(e.is_retryable());
        // An invalid target is refused before any socket exists.
        let e = connect(&Target::Unix(PathBuf::new())).await.unwrap_err();
        assert!(!e.is_retryable());
    }
}
