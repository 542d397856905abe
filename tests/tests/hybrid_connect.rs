#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
//! `vkx_host::vsock::hybrid_connect` against a fake VMM over a real Unix
//! socket (PROTOCOL.md §2.3.2): the request bytes exactly, a stream that
//! starts at the first byte after the reply's LF even when the VMM sends
//! reply and payload in one write, and every failure closing the socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use vkx_common::hybrid::HYBRID_CONNECT_REPLY_MAX;
use vkx_common::hybrid::HybridError;
use vkx_host::vsock::{HybridConnectError, connect_check, hybrid_connect, hybrid_connect_with};

/// Longest request line the fake VMM reads before giving up.
const MAX_REQUEST: usize = 64;
/// Bound on anything the fake VMM waits for, so a bug cannot hang a test.
const VMM_WAIT: Duration = Duration::from_secs(10);
/// The reply bound the failure tests inject.
const SHORT: Duration = Duration::from_millis(200);

/// The example of §2.3.2.
const EXAMPLE_REQUEST: &[u8] = b"CONNECT 7861\n";
const EXAMPLE_REPLY: &[u8] = b"OK 1073741824\n";

/// What the fake VMM does after reading the request.
enum Then {
    /// Writes `reply` in one write, then echoes until end of stream.
    ReplyAndEcho(Vec<u8>),
    /// Writes `reply` in one write, then holds the connection until the
    /// host closes it.
    ReplyAndHold(Vec<u8>),
    /// Writes `reply` one byte per write, with a pause between, then
    /// echoes.
    Trickle(Vec<u8>),
    /// Writes `reply`, then closes.
    ReplyAndClose(Vec<u8>),
}

/// What the fake VMM saw.
#[derive(Debug)]
struct Saw {
    request: Vec<u8>,
    /// The host closed its end (the VMM read end of stream or a reset).
    host_closed: bool,
}

struct Vmm {
    _dir: tempfile::TempDir,
    path: PathBuf,
    task: JoinHandle<Saw>,
}

impl Vmm {
    /// A fake VMM on a fresh socket, serving one connection.
    fn start(then: Then) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm-17.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = tokio::time::timeout(VMM_WAIT, listener.accept())
                .await
                .unwrap()
                .unwrap();
            let request = read_request(&mut s).await;
            let host_closed = match then {
                Then::ReplyAndEcho(reply) => {
                    s.write_all(&reply).await.unwrap();
                    echo(&mut s).await
                }
                Then::ReplyAndHold(reply) => {
                    s.write_all(&reply).await.unwrap();
                    until_closed(&mut s).await
                }
                Then::Trickle(reply) => {
                    for b in reply {
                        s.write_all(&[b]).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    echo(&mut s).await
                }
                Then::ReplyAndClose(reply) => {
                    s.write_all(&reply).await.unwrap();
                    false
                }
            };
            Saw {
                request,
                host_closed,
            }
        });
        Self {
            _dir: dir,
            path,
            task,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    async fn saw(self) -> Saw {
        tokio::time::timeout(VMM_WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
    }
}

/// Reads the request line byte by byte, exactly, up to its LF.
async fn read_request(s: &mut UnixStream) -> Vec<u8> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert!(line.len() < MAX_REQUEST, "request without LF: {line:?}");
        let n = tokio::time::timeout(VMM_WAIT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "end of stream inside the request: {line:?}");
        line.push(b[0]);
    }
    line
}

/// Echoes until end of stream; true if the host closed.
async fn echo(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(VMM_WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => s.write_all(&buf[..n]).await.unwrap(),
            Err(_) => return false,
        }
    }
}

/// Waits for the host to close; true if it did within `VMM_WAIT`. Bytes
/// the host sends are an error: after a failure it must send nothing.
async fn until_closed(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(VMM_WAIT, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("the host sent {:?} after the request", &buf[..n]),
        Err(_) => false,
    }
}

fn reply_then(payload: &[u8]) -> Vec<u8> {
    let mut v = EXAMPLE_REPLY.to_vec();
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn request_is_exact_and_the_stream_starts_after_the_lf() {
    // Reply and the first payload bytes in ONE write: a reader that
    // buffered would swallow them.
    let payload = b"\x16\x03\x01\x00\x05hello";
    let vmm = Vmm::start(Then::ReplyAndEcho(reply_then(payload)));
    let mut s = hybrid_connect(vmm.path(), 7861).await.unwrap();
    let mut got = [0u8; 10];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, payload);
    // The stream is guest port P's, both ways.
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    drop(s);
    let saw = vmm.saw().await;
    assert_eq!(saw.request, EXAMPLE_REQUEST);
    assert!(saw.host_closed);
}

#[tokio::test]
async fn assigned_port_and_request_bounds() {
    for (port, request, reply, assigned) in [
        (
            7861,
            &b"CONNECT 7861\n"[..],
            &b"OK 1073741824\n"[..],
            1_073_741_824,
        ),
        (0, b"CONNECT 0\n", b"OK 0\n", 0),
        (
            u32::MAX,
            b"CONNECT 4294967295\n",
            b"OK 4294967295\n",
            u32::MAX,
        ),
        // Leading zeros are allowed in the reply's port.
        (1024, b"CONNECT 1024\n", b"OK 0000001024\n", 1024),
    ] {
        let vmm = Vmm::start(Then::ReplyAndEcho(reply.to_vec()));
        let c = hybrid_connect_with(vmm.path(), port, SHORT).await.unwrap();
        assert_eq!(c.assigned_port, assigned);
        drop(c);
        assert_eq!(vmm.saw().await.request, request);
    }
}

#[tokio::test]
async fn a_reply_in_single_bytes_is_assembled() {
    let vmm = Vmm::start(Then::Trickle(reply_then(b"X")));
    let c = hybrid_connect_with(vmm.path(), 7861, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(c.assigned_port, 1_073_741_824);
    let mut s = c.stream;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"X");
}

#[tokio::test]
async fn connect_check_reports_the_assigned_port_and_closes() {
    let vmm = Vmm::start(Then::ReplyAndHold(b"OK 2049\n".to_vec()));
    assert_eq!(connect_check(vmm.path(), 5000).await.unwrap(), 2049);
    let saw = vmm.saw().await;
    assert_eq!(saw.request, b"CONNECT 5000\n");
    assert!(saw.host_closed);
}

/// Runs one failing exchange: the VMM replies `reply` and holds the
/// connection; the host must fail with `want` and close the socket.
async fn fails_and_closes(reply: &[u8], want: HybridError) {
    let vmm = Vmm::start(Then::ReplyAndHold(reply.to_vec()));
    let e = hybrid_connect_with(vmm.path(), 7861, SHORT)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, HybridConnectError::Reply(got) if *got == want),
        "{:?}: {e}",
        String::from_utf8_lossy(reply)
    );
    let saw = vmm.saw().await;
    assert_eq!(saw.request, EXAMPLE_REQUEST);
    assert!(
        saw.host_closed,
        "socket left open after {:?}",
        String::from_utf8_lossy(reply)
    );
}

#[tokio::test]
async fn garbage_reply_fails() {
    fails_and_closes(
        b"ERR no listener on port 7861\n",
        HybridError::UnexpectedByte {
            offset: 0,
            byte: b'E',
        },
    )
    .await;
    fails_and_closes(b"OK  1073741824\n", HybridError::ExtraSpace { offset: 3 }).await;
    fails_and_closes(b"OK -1\n", HybridError::Sign { offset: 3 }).await;
    fails_and_closes(
        b"OK 4294967296\n",
        HybridError::PortOutOfRange {
            value: 4_294_967_296,
        },
    )
    .await;
}

#[tokio::test]
async fn cr_in_reply_fails() {
    fails_and_closes(
        b"OK 1073741824\r\n",
        HybridError::CarriageReturn { offset: 13 },
    )
    .await;
}

#[tokio::test]
async fn over_32_bytes_without_lf_fail() {
    let mut digits = b"OK ".to_vec();
    digits.extend(std::iter::repeat_n(b'1', HYBRID_CONNECT_REPLY_MAX + 8));
    fails_and_closes(&digits, HybridError::TooManyDigits).await;
    fails_and_closes(
        &[b'A'; HYBRID_CONNECT_REPLY_MAX + 8],
        HybridError::UnexpectedByte {
            offset: 0,
            byte: b'A',
        },
    )
    .await;
}

#[tokio::test]
async fn end_of_stream_before_lf_fails() {
    for (reply, received) in [(&b""[..], 0), (b"OK", 2), (b"OK 1073741824", 13)] {
        let vmm = Vmm::start(Then::ReplyAndClose(reply.to_vec()));
        let e = hybrid_connect_with(vmm.path(), 7861, SHORT)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                HybridConnectError::Reply(HybridError::Truncated { received: r }) if r == received
            ),
            "{e}"
        );
        assert_eq!(vmm.saw().await.request, EXAMPLE_REQUEST);
    }
}

#[tokio::test]
async fn no_reply_within_the_timeout_fails_and_closes() {
    for (reply, received) in [(&b""[..], 0), (b"OK 1", 4)] {
        let vmm = Vmm::start(Then::ReplyAndHold(reply.to_vec()));
        let started = tokio::time::Instant::now();
        let e = hybrid_connect_with(vmm.path(), 7861, SHORT)
            .await
            .unwrap_err();
        assert!(started.elapsed() >= SHORT);
        assert!(
            matches!(
                e,
                HybridConnectError::ReplyTimeout { timeout, received: r }
                    if timeout == SHORT && r == received
            ),
            "{e}"
        );
        let saw = vmm.saw().await;
        assert_eq!(saw.request, EXAMPLE_REQUEST);
        assert!(saw.host_closed);
    }
}

#[tokio::test]
async fn a_missing_socket_fails_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.vsock");
    let e = hybrid_connect(&path, 7861).await.unwrap_err();
    assert!(
        matches!(&e, HybridConnectError::Connect { path: p, source }
            if p == &path && source.kind() == std::io::ErrorKind::NotFound),
        "{e}"
    );
}

/// The operator command, as a process: exit 0 and the assigned port when
/// the VMM connects, exit 1 and "refused" when it answers anything else.
#[tokio::test]
async fn the_operator_command_reports_the_assigned_port_or_the_refusal() {
    // Built before any fake VMM waits for it.
    let _ = vkx_e2e::bin("vkx-host");
    for (reply, code, says) in [
        (EXAMPLE_REPLY, 0, "VMM-assigned port 1073741824"),
        (&b"ERR no listener\n"[..], 1, "refused"),
    ] {
        let vmm = Vmm::start(Then::ReplyAndHold(reply.to_vec()));
        let path = vmm.path.display().to_string();
        let o = tokio::task::spawn_blocking(move || {
            vkx_e2e::run(
                "vkx-host",
                &[
                    "vsock",
                    "connect-check",
                    "--socket",
                    &path,
                    "--port",
                    "7861",
                ],
                b"",
            )
        })
        .await
        .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(code), "{o:?}");
        assert!(out.contains(says), "{out}");
        let saw = vmm.saw().await;
        assert_eq!(saw.request, EXAMPLE_REQUEST);
        assert!(saw.host_closed);
    }
}
