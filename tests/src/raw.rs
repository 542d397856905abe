//! A raw client of `vkx-host serve` for tests that must say what no real
//! guest would: TLS 1.3 with the pinned host key over a Unix socket, then
//! frames the test writes itself, and the host's answers decoded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vkx_common::wire::{AgentName, AgentVersion, FrameDecoder, Hello, Message, encode_frame};

/// A client TLS stream over a Unix socket.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, UnixStream>;

/// A TLS connection to the host on `socket`, pinned to `pin` (SPKI
/// SHA-256, hex), handshake done; reads and writes time out after
/// `timeout`.
pub fn connect(socket: &Path, pin: &str, timeout: Duration) -> std::io::Result<Tls> {
    let pin: [u8; 32] = hex::decode(pin).unwrap().try_into().unwrap();
    let config = vkx_common::tls::client_config(pin).unwrap();
    let conn = rustls::ClientConnection::new(config, vkx_common::tls::host_server_name()).unwrap();
    let sock = UnixStream::connect(socket)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Writes `payload` as one frame.
pub fn send(tls: &mut Tls, payload: &[u8]) {
    let mut frame = Vec::new();
    encode_frame(payload, &mut frame).unwrap();
    tls.write_all(&frame).unwrap();
    tls.flush().unwrap();
}

/// Reads whole frames until `n` messages arrived (or the stream ended).
pub fn read_messages(tls: &mut Tls, n: usize) -> Vec<Message> {
    let mut d = FrameDecoder::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < n {
        let got = match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        let mut input = &buf[..got];
        while let Ok(Some(p)) = d.decode(&mut input) {
            out.push(Message::decode(p).unwrap());
        }
    }
    out
}

/// Everything the host says until it closes (its close_notify, a reset,
/// or the read timeout).
pub fn read_all(tls: &mut Tls) -> Vec<Message> {
    let mut bytes = Vec::new();
    let _ = tls.read_to_end(&mut bytes);
    let mut d = FrameDecoder::new();
    let mut input = &bytes[..];
    let mut out = Vec::new();
    while let Ok(Some(p)) = d.decode(&mut input) {
        out.push(Message::decode(p).unwrap());
    }
    out
}

/// The longest `hello` there is (32-byte agent name and version), framed:
/// what a slow sender trickles.
pub fn long_hello_frame() -> Vec<u8> {
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_name: AgentName::new("a".repeat(32)).unwrap(),
        agent_version: AgentVersion::new("1".repeat(32)).unwrap(),
        guest_nonce: [7; 32],
    })
    .encode()
    .unwrap();
    let mut frame = Vec::new();
    encode_frame(&hello, &mut frame).unwrap();
    frame
}
