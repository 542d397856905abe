//! Fault-injection case d (issue #6, item 5; case c, the reconnect herd,
//! is to come here too), beside `tests/chaos.rs` (cases a, b, e, f),
//! writing its row in the same format to `target/chaos/<case>.json`
//! (`examples/chaos_report.rs` prints them):
//! `{"case":"d","title":"...","figure":"...","bound":"...","pass":true,"run":"full"}`.
//! `VKX_CHAOS_FULL=1` runs the full size (a 10 s attack); without it a
//! reduced one (3 s). The bounds are the same.
//!
//! - d, hostile peer: a real `vkx-host serve` with its own listener for the
//!   hostile VM identity (`vm-evil`). From that one peer, at once: a flood
//!   of TLS connections, half of them writing malformed frames (10,000 a
//!   second in all, reconnecting whenever the host closes), a sender trickling a `hello` at 1 byte/s, idle transports that never
//!   start TLS, and, before the flood, an oversize length prefix and a
//!   maximally nested payload. Meanwhile the well-behaved `vm-1` runs
//!   `vkx-guest once` again and again and must attest each time. Asserted:
//!   the host's peak RSS (VmHWM) stays under baseline + `max_open` × a
//!   per-connection bound; the host wrote at most `PEER_BURST` lines per
//!   call site naming the hostile peer; the metrics count the refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)] // Each case prints its figure.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vkx_common::errors::ErrorCode;
use vkx_common::wire::{
    AgentName, AgentVersion, FrameDecoder, Hello, MAX_FRAME_PAYLOAD, Message, encode_frame,
};
use vkx_e2e::agents::{Agent as Process, Deployment, status_kib, value, wait_value};
use vkx_e2e::chaos::{Row, size};
use vkx_e2e::run;

/// Bound on waiting for the host to notice something.
const LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Raw clients and the host's figures.

type Tls = rustls::StreamOwned<rustls::ClientConnection, UnixStream>;

/// A TLS connection to the host with the pinned key, handshake done.
fn connect(socket: &Path, pin: &str) -> std::io::Result<Tls> {
    let pin: [u8; 32] = hex::decode(pin).unwrap().try_into().unwrap();
    let config = vkx_common::tls::client_config(pin).unwrap();
    let conn = rustls::ClientConnection::new(config, vkx_common::tls::host_server_name()).unwrap();
    let sock = UnixStream::connect(socket)?;
    sock.set_read_timeout(Some(LIMIT))?;
    sock.set_write_timeout(Some(LIMIT))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Everything the host says until it closes.
fn read_all(tls: &mut Tls) -> Vec<Message> {
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

fn only_error(msgs: &[Message]) -> ErrorCode {
    match msgs {
        [Message::Error(e)] => e.code,
        other => panic!("expected one error, got {other:?}"),
    }
}

fn start_host(d: &Deployment, metrics: &Path) -> Process {
    let host = d.start_host("host.log");
    let t = Instant::now();
    while !metrics.exists() {
        assert!(t.elapsed() < LIMIT, "no metrics socket: {}", host.log());
        std::thread::sleep(POLL);
    }
    host
}

// ---------------------------------------------------------------------------
// d: hostile peer.

const EVIL: &str = "vm-evil";
/// The host's limits in this case: `max_open` bounds every connection it
/// holds, and so its memory.
const D_MAX_CONNECTIONS: usize = 128;
const D_MAX_OPEN: usize = 256;
/// Per held connection: one frame buffer (64 KiB + header), rustls'
/// buffers (a 16 KiB record in, one out, plus state), the task and its
/// socket: 128 KiB with room.
const D_PER_CONNECTION_KIB: u64 = 128;
/// Threads opening TLS connections: half write malformed frames, half
/// only connect.
const D_FLOODERS: usize = 16;
/// Transports opened and never taken to TLS (held by the host until its
/// TLS handshake timeout, or until they go away).
const D_IDLE: usize = 64;
/// How often the well-behaved guest attests during the attack.
const D_GOOD_INTERVAL: Duration = Duration::from_millis(1500);
/// Malformed frames per write: the payload `0xff` (a stray CBOR break).
const D_FRAMES_PER_WRITE: usize = 100;
/// Malformed frames per second written by the whole flood (issue #6).
const D_FRAME_RATE: usize = 10_000;

/// Sends `bytes` on a fresh TLS connection from the hostile peer and
/// returns the host's answer.
fn one_shot(socket: &Path, pin: &str, bytes: &[u8]) -> Vec<Message> {
    let mut tls = connect(socket, pin).unwrap();
    tls.write_all(bytes).unwrap();
    tls.flush().unwrap();
    read_all(&mut tls)
}

fn long_hello_frame() -> Vec<u8> {
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

#[test]
fn d_hostile_peer_memory_logs_and_service_stay_bounded() {
    let mut row = Row::start(
        "d",
        "hostile peer",
        "peak RSS <= baseline + max_open x 128 KiB; <= PEER_BURST lines per call site for the peer; every good guest attests",
    );
    let attack = size(Duration::from_secs(10), Duration::from_secs(3));

    let d = Deployment::new("vm-1", "");
    let metrics = d.path("metrics.sock");
    let evil = d.path("evil.sock");
    d.write_host_config(&format!(
        "max_connections = {D_MAX_CONNECTIONS}\n[admission]\nmax_open = {D_MAX_OPEN}\n\
         [metrics]\nsocket = \"{}\"\n\n[[unix_listener]]\npath = \"{}\"\nvm_id = \"{EVIL}\"\n",
        metrics.display(),
        evil.display()
    ));
    let host = start_host(&d, &metrics);
    let pid = host.pid();
    let pin = d.node.pin().to_owned();
    let good_config = d.guest_config("guest.toml", &d.socket(), &pin, "");
    let good_config = good_config.display().to_string();
    let good_once = || run("vkx-guest", &["once", "--config", &good_config], b"");

    // Warm up: one attestation, then the baseline.
    let o = good_once();
    assert_eq!(o.status.code(), Some(0), "{o:?}\n{}", host.log());
    let baseline_kib = status_kib(pid, "VmHWM");
    let bound_kib = baseline_kib + D_MAX_OPEN as u64 * D_PER_CONNECTION_KIB;
    row.set_bound(format!(
        "peak RSS <= {} KiB (baseline {baseline_kib} KiB + max_open {D_MAX_OPEN} x {D_PER_CONNECTION_KIB} KiB); \
         <= {} lines per call site naming the peer (PEER_BURST; summaries ride on the next admitted line); \
         every good guest attests",
        bound_kib,
        vkx_common::ratelimit::PEER_BURST
    ));

    // Before the flood, while the peer still has connection tokens: an
    // oversize length prefix, and the deepest nesting a frame can carry.
    let got = one_shot(&evil, &pin, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(only_error(&got), ErrorCode::FrameTooLarge);
    let mut nested = vec![0x81u8; MAX_FRAME_PAYLOAD - 1];
    nested.push(0x00);
    let mut frame = Vec::new();
    encode_frame(&nested, &mut frame).unwrap();
    let got = one_shot(&evil, &pin, &frame);
    assert_eq!(only_error(&got), ErrorCode::Malformed);

    let stop = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicU64::new(0));
    let refused_transports = Arc::new(AtomicU64::new(0));
    let mut batch = Vec::new();
    for _ in 0..D_FRAMES_PER_WRITE {
        encode_frame(&[0xff], &mut batch).unwrap();
    }
    let (good, elapsed, slow_sent, failure) = std::thread::scope(|s| {
        // The 1-byte/s sender.
        let slow = s.spawn(|| {
            let mut tls = connect(&evil, &pin).unwrap();
            let mut sent = 0usize;
            for b in long_hello_frame() {
                if stop.load(Ordering::Relaxed)
                    || tls.write_all(&[b]).and_then(|()| tls.flush()).is_err()
                {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            sent
        });
        // Transports that never start TLS.
        let idle: Vec<UnixStream> = (0..D_IDLE)
            .map(|_| UnixStream::connect(&evil).unwrap())
            .collect();
        // The flood, from the same peer: half the threads write malformed
        // frames at D_FRAME_RATE in all (reconnecting whenever the host
        // closes), half open TLS connections as fast as they can and drop
        // them.
        for i in 0..D_FLOODERS {
            let (stop, frames, conns, refused) = (&stop, &frames, &conns, &refused_transports);
            let (evil, pin, batch) = (&evil, &pin, &batch);
            let writer = i % 2 == 0;
            s.spawn(move || {
                let interval = Duration::from_secs_f64(
                    D_FRAMES_PER_WRITE as f64 / (D_FRAME_RATE as f64 / (D_FLOODERS / 2) as f64),
                );
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut tls) = connect(evil, pin) else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    conns.fetch_add(1, Ordering::Relaxed);
                    if !writer {
                        continue;
                    }
                    // Never stuck past the attack on a host that stopped reading.
                    tls.sock.set_write_timeout(Some(POLL)).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        if tls.write_all(batch).and_then(|()| tls.flush()).is_err() {
                            break;
                        }
                        next += interval;
                        frames.fetch_add(D_FRAMES_PER_WRITE as u64, Ordering::Relaxed);
                    }
                }
            });
        }
        // Meanwhile the well-behaved guest, again and again.
        let t0 = Instant::now();
        let mut good = Vec::new();
        let mut failure = String::new();
        while t0.elapsed() < attack {
            let t = Instant::now();
            let o = good_once();
            good.push((o.status.code(), t.elapsed()));
            if o.status.code() != Some(0) {
                // Reported below, after the attackers stopped.
                failure = String::from_utf8_lossy(&o.stderr).into_owned();
                break;
            }
            // A guest reconnecting now and then, well within its own
            // connection budget (burst 10, then 1 per 6 s).
            std::thread::sleep(D_GOOD_INTERVAL.saturating_sub(t.elapsed()));
        }
        stop.store(true, Ordering::Relaxed);
        let elapsed = t0.elapsed();
        drop(idle);
        let slow_sent = slow.join().unwrap();
        (good, elapsed, slow_sent, failure)
    });

    // Everything the peer opened is gone; the host holds nothing for it.
    let text = wait_value(&metrics, "vkx_connections_open", 0);
    let peak_kib = status_kib(pid, "VmHWM");
    let good_ok = good.iter().filter(|(c, _)| *c == Some(0)).count();
    let slowest = good.iter().map(|(_, t)| *t).max().unwrap_or_default();

    // The host's lines naming the hostile peer, by call site (the message).
    let log = host.log();
    let needle = format!("peer={EVIL}");
    let mut sites: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(&needle)) {
        *sites.entry(site_of(line)).or_default() += 1;
    }
    let peer_lines: usize = sites.values().sum();
    let burst = usize::try_from(vkx_common::ratelimit::PEER_BURST).unwrap();
    let worst_site = sites.values().copied().max().unwrap_or(0);

    let refused_rate = value(
        &text,
        "vkx_admissions_refused_total{reason=\"peer_connection_rate\"}",
    );
    let malformed = value(&text, "vkx_errors_sent_total{code=\"malformed\"}");
    let too_large = value(&text, "vkx_errors_sent_total{code=\"frame-too-large\"}");
    let suppressed = value(&text, "vkx_log_lines_suppressed_total");
    let sent = frames.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();

    let pass = peak_kib <= bound_kib
        && worst_site <= burst
        && good_ok == good.len()
        && !good.is_empty()
        && refused_rate > 0
        && too_large >= 1
        && malformed >= 1;
    let figure = format!(
        "{:.1} s attack from one peer: {sent} malformed frames written into its sockets ({:.0}/s) and {} TLS connections \
         ({} transports closed before TLS), {D_IDLE} idle transports, 1 byte/s sender ({slow_sent} bytes), \
         oversize prefix -> frame-too-large, nesting {} -> malformed; host refused {refused_rate} connections after TLS (peer rate) and \
         decoded frames only on the few it admitted (answered malformed {malformed}x); peak RSS {peak_kib} KiB (baseline {baseline_kib} KiB); \
         {peer_lines} lines naming the peer over {} call sites, at most {worst_site} per site, \
         {suppressed} suppressed; good guest attested {good_ok}/{} (slowest {:.2} s)",
        secs,
        sent as f64 / secs,
        conns.load(Ordering::Relaxed),
        refused_transports.load(Ordering::Relaxed),
        MAX_FRAME_PAYLOAD - 1,
        sites.len(),
        good.len(),
        slowest.as_secs_f64(),
    );
    row.finish(&figure, pass);
    assert!(
        peak_kib <= bound_kib,
        "peak RSS {peak_kib} KiB over {bound_kib} KiB"
    );
    assert!(
        worst_site <= burst,
        "a call site wrote more than {burst} lines for the peer: {sites:?}"
    );
    assert!(suppressed > 0, "nothing was suppressed:\n{text}");
    assert!(
        failure.is_empty(),
        "a good guest failed under attack: {failure}"
    );
    assert!(pass, "{figure}\n{text}");
}

/// A log line's call site: its message, without the level, target and
/// fields (tracing's format: `... LEVEL target: message key=value ...`).
fn site_of(line: &str) -> String {
    let rest = line.split_once(": ").map_or(line, |(_, r)| r);
    let end = rest.find(" peer=").unwrap_or(rest.len());
    rest[..end].to_owned()
}
