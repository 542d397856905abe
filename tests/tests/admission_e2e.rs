//! Admission control end to end, as processes: `vkx-host serve` with tiny
//! limits, raw TLS clients (the pinned host key) that hold handshake
//! slots, `vkx-guest once` against swtpm, and the metrics endpoint read
//! with `vkx-host metrics`. Everything asserted is a count or a range,
//! never a speed.
//!
//! - `max_handshakes = 1`: while one client sits in the handshake, every
//!   other connection completes TLS and is told `busy` with a jittered
//!   `retry-after`; `vkx-guest once` exits 3 (retryable) saying so; once
//!   the slow client goes away a guest attests; the metrics agree.
//! - The handshake slot goes back at Established: a daemon holding its
//!   session does not keep the next guest out.
//! - A client that trickles its `hello` at 1 byte/s is cut off at its
//!   deadline, long before it finishes, and its slot is free again.
//! - Rate limits: a session sending faster than its message budget, and a
//!   peer over its connection budget, are told `rate-limited`.
//! - The hard ceiling: over `admission.max_open` the transport is closed
//!   without TLS.
//! - Key releases, rotation pushes and their acknowledgements are counted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use vkx_common::errors::ErrorCode;
use vkx_common::wire::{AgentName, AgentVersion, ErrorMessage, FrameDecoder, Hello, Message};
use vkx_e2e::agents::{Agent, Deployment, scrape, value, wait_value};
use vkx_e2e::raw::{Tls, read_all, read_messages, send};
use vkx_e2e::run;

/// Bound on waiting for the host to notice something (a closed client).
const LIMIT: Duration = Duration::from_secs(20);

fn hello() -> Vec<u8> {
    Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_name: AgentName::new("raw").unwrap(),
        agent_version: AgentVersion::new("0").unwrap(),
        guest_nonce: [7; 32],
    })
    .encode()
    .unwrap()
    .to_vec()
}

/// TLS, the given frames, then everything the host says until it closes.
fn exchange(socket: &Path, pin: &str, frames: &[Vec<u8>]) -> Vec<Message> {
    let mut tls = connect(socket, pin).unwrap();
    for f in frames {
        send(&mut tls, f);
    }
    read_all(&mut tls)
}

/// [`vkx_e2e::raw::connect`] with this file's time limit.
fn connect(socket: &Path, pin: &str) -> std::io::Result<Tls> {
    vkx_e2e::raw::connect(socket, pin, LIMIT)
}

/// A client that completes TLS, says `hello`, reads the `challenge`, and
/// then says nothing: it holds a handshake slot until it goes away (or
/// the host's AwaitEvidence deadline, 30 s).
fn slow_client(socket: &Path, pin: &str) -> Tls {
    let mut tls = connect(socket, pin).unwrap();
    send(&mut tls, &hello());
    let got = read_messages(&mut tls, 1);
    assert!(
        matches!(&got[..], [Message::Challenge(_)]),
        "the slow client was not admitted: {got:?}"
    );
    tls
}

fn only_error(msgs: &[Message]) -> &ErrorMessage {
    match msgs {
        [Message::Error(e)] => e,
        other => panic!("expected one error, got {other:?}"),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A deployment whose host.toml carries `extra` and a metrics socket.
fn deploy(extra: &str) -> (Deployment, PathBuf) {
    let d = Deployment::new("vm-1", "");
    let metrics = d.path("metrics.sock");
    d.write_host_config(&format!(
        "{extra}\n[metrics]\nsocket = \"{}\"\n",
        metrics.display()
    ));
    (d, metrics)
}

fn start(d: &Deployment, metrics: &Path) -> Agent {
    let host = d.start_host("host.log");
    host.wait_for_path(metrics);
    host
}

fn guest_once(d: &Deployment) -> Output {
    let config = d.guest_config("guest.toml", &d.socket(), d.node.pin(), "");
    run(
        "vkx-guest",
        &["once", "--config", &config.display().to_string()],
        b"",
    )
}

#[test]
fn over_max_handshakes_guests_are_told_busy_then_served() {
    let (d, metrics) = deploy(
        "[admission]\nmax_handshakes = 1\nbusy_retry_after_ms = 2000\nretry_jitter_percent = 100\n\
         peer_connection_burst = 100\n",
    );
    let host = start(&d, &metrics);
    let pin = d.node.pin().to_owned();
    let socket = d.socket();

    // One client sits in the handshake: it holds the only slot.
    let slow = slow_client(&socket, &pin);
    let text = scrape(&metrics);
    assert_eq!(value(&text, "vkx_handshakes_in_progress"), 1, "{text}");

    // Every other connection completes TLS and gets one `busy` with a
    // retry-after sized from the line (PROTOCOL.md §11.6): its place in
    // [100 ms, base], times U[1, 2] jitter, so in [100 ms, 2 base).
    let mut retry = Vec::new();
    for _ in 0..5 {
        let got = exchange(&socket, &pin, &[hello()]);
        let e = only_error(&got);
        assert_eq!(e.code, ErrorCode::Busy);
        let ms = e.retry_after_ms.expect("busy carries retry-after");
        assert!((100..4000).contains(&ms), "retry-after {ms} ms");
        retry.push(ms);
    }
    retry.sort_unstable();
    retry.dedup();
    assert!(retry.len() > 1, "retry-after not jittered: {retry:?}");

    // The guest agent: retryable (exit 3), and it says why.
    let o = guest_once(&d);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("busy"), "{}", stderr(&o));

    // The slow client goes away; its slot comes back; a guest attests.
    drop(slow);
    wait_value(&metrics, "vkx_handshakes_in_progress", 0);
    let o = guest_once(&d);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stderr(&o), host.log());

    // A daemon attests and holds its session: Established gives the
    // handshake slot back, so the next guest still gets it.
    let config = d.guest_config("daemon.toml", &socket, &pin, "");
    let daemon = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &config.display().to_string()],
        d.path("daemon.log"),
    );
    let text = wait_value(&metrics, "vkx_sessions_established", 1);
    assert_eq!(value(&text, "vkx_handshakes_in_progress"), 0, "{text}");
    assert_eq!(value(&text, "vkx_connections"), 1, "{text}");
    let o = guest_once(&d);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stderr(&o), host.log());
    assert!(daemon.stop().success());

    // Every guest said goodbye: nothing established remains.
    let text = wait_value(&metrics, "vkx_connections", 0);
    for (series, want) in [
        ("vkx_admissions_refused_total{reason=\"max_handshakes\"}", 6),
        (
            "vkx_admissions_refused_total{reason=\"max_connections\"}",
            0,
        ),
        ("vkx_admissions_refused_total{reason=\"max_open\"}", 0),
        ("vkx_errors_sent_total{code=\"busy\"}", 6),
        ("vkx_handshakes_total{outcome=\"refused\"}", 6),
        ("vkx_handshakes_total{outcome=\"attested\"}", 3),
        // The slow client: end of stream in the handshake.
        ("vkx_handshakes_total{outcome=\"failed\"}", 1),
        ("vkx_handshakes_total{outcome=\"timeout\"}", 0),
        ("vkx_handshake_duration_seconds_count", 3),
        ("vkx_sessions_established", 0),
        ("vkx_handshakes_in_progress", 0),
        ("vkx_connections_open", 0),
        ("vkx_admission_limit{limit=\"max_handshakes\"}", 1),
    ] {
        assert_eq!(value(&text, series), want, "{series}\n{text}");
    }
    // Refusals are logged through the limiter, one site and one peer: at
    // most its burst is written, the rest is counted as suppressed, and
    // the refusal counters above stay exact.
    let lines = host
        .log()
        .matches("connection refused by admission control")
        .count();
    assert!(
        (1..=usize::try_from(vkx_common::ratelimit::PEER_BURST).unwrap()).contains(&lines),
        "{lines} lines"
    );
    assert!(
        value(&text, "vkx_log_lines_suppressed_total") >= u64::try_from(6 - lines).unwrap(),
        "{text}"
    );
}

#[test]
fn sessions_and_peers_over_their_rates_are_told_rate_limited() {
    let (d, metrics) = deploy(
        "[admission]\nsession_message_burst = 1\npeer_connection_burst = 3\n\
         peer_connection_refill_ms = 600000\nbusy_retry_after_ms = 1000\n",
    );
    let _host = start(&d, &metrics);
    let pin = d.node.pin().to_owned();
    let socket = d.socket();

    // A session whose guest sends two messages at once with a budget of
    // one: the first is answered, the second is `rate-limited`, then close.
    for _ in 0..3 {
        let got = exchange(&socket, &pin, &[hello(), hello()]);
        match &got[..] {
            [Message::Challenge(_), Message::Error(e)] => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                let ms = e.retry_after_ms.unwrap();
                assert!((1000..2000).contains(&ms), "retry-after {ms} ms");
            }
            other => panic!("{other:?}"),
        }
    }
    // Three connections spent the peer's budget (one per 10 min after
    // that): the fourth is refused after TLS, told to wait for its token.
    let got = exchange(&socket, &pin, &[hello()]);
    let e = only_error(&got);
    assert_eq!(e.code, ErrorCode::RateLimited);
    let ms = e.retry_after_ms.unwrap();
    assert!((500_000..1_200_000).contains(&ms), "retry-after {ms} ms");
    let o = guest_once(&d);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("rate-limited"), "{}", stderr(&o));

    let text = wait_value(&metrics, "vkx_connections_open", 0);
    for (series, want) in [
        ("vkx_sessions_rate_limited_total", 3),
        (
            "vkx_admissions_refused_total{reason=\"peer_connection_rate\"}",
            2,
        ),
        ("vkx_errors_sent_total{code=\"rate-limited\"}", 5),
        ("vkx_errors_sent_total{code=\"busy\"}", 0),
        ("vkx_handshakes_total{outcome=\"refused\"}", 5),
        ("vkx_handshakes_total{outcome=\"attested\"}", 0),
        ("vkx_peer_buckets", 1),
    ] {
        assert_eq!(value(&text, series), want, "{series}\n{text}");
    }
}

/// A deployment like [`deploy`]'s, plus a second listener for `vm-2` (not
/// provisioned: its connections are admitted or closed, never attested).
/// Returns the deployment, the metrics socket and vm-2's socket.
fn deploy_two_vms(extra: &str) -> (Deployment, PathBuf, PathBuf) {
    let d = Deployment::new("vm-1", "");
    let metrics = d.path("metrics.sock");
    let second = d.path("vm-2.sock");
    d.write_host_config(&format!(
        "{extra}\n[[unix_listener]]\npath = \"{}\"\nvm_id = \"vm-2\"\n\n[metrics]\nsocket = \"{}\"\n",
        second.display(),
        metrics.display()
    ));
    (d, metrics, second)
}

#[test]
fn over_the_hard_ceiling_the_transport_is_closed_without_tls() {
    let (d, metrics, second) = deploy_two_vms("max_connections = 1\n[admission]\nmax_open = 1\n");
    let _host = start(&d, &metrics);
    let pin = d.node.pin().to_owned();
    let socket = d.socket();

    let slow = slow_client(&socket, &pin);
    // No TLS for the next one, from another VM: the host closes the
    // transport.
    assert!(connect(&second, &pin).is_err());
    drop(slow);
    wait_value(&metrics, "vkx_connections_open", 0);
    let o = guest_once(&d);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let text = wait_value(&metrics, "vkx_connections_open", 0);
    for (series, want) in [
        ("vkx_admissions_refused_total{reason=\"max_open\"}", 1),
        ("vkx_admissions_refused_total{reason=\"peer_open\"}", 0),
        ("vkx_errors_sent_total{code=\"busy\"}", 0),
        ("vkx_handshakes_total{outcome=\"attested\"}", 1),
    ] {
        assert_eq!(value(&text, series), want, "{series}\n{text}");
    }
}

#[test]
fn one_vm_holding_idle_transports_is_capped_and_others_are_served() {
    let (d, metrics, second) = deploy_two_vms("[admission]\nmax_open_per_peer = 2\n");
    let host = start(&d, &metrics);
    let pin = d.node.pin().to_owned();
    let socket = d.socket();

    // vm-1 holds two transports that never start TLS.
    let idle: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    wait_value(&metrics, "vkx_connections_open", 2);
    // Its third is closed at once, before TLS; its own agent fails too
    // (a VM that hoards transports only hurts itself).
    assert!(connect(&socket, &pin).is_err());
    let o = guest_once(&d);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // Another VM is served: TLS completes, its hello is answered.
    let mut other = connect(&second, &pin).unwrap();
    vkx_e2e::raw::send(&mut other, &hello());
    let got = read_messages(&mut other, 1);
    assert!(
        !got.is_empty(),
        "vm-2 got no answer while vm-1 was capped:\n{}",
        host.log()
    );
    drop(other);
    // vm-1 lets go: its agent attests again.
    drop(idle);
    wait_value(&metrics, "vkx_connections_open", 0);
    let o = guest_once(&d);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stderr(&o), host.log());

    let text = scrape(&metrics);
    for (series, want) in [
        ("vkx_admissions_refused_total{reason=\"peer_open\"}", 2),
        ("vkx_admissions_refused_total{reason=\"max_open\"}", 0),
        ("vkx_handshakes_total{outcome=\"attested\"}", 1),
    ] {
        assert_eq!(value(&text, series), want, "{series}\n{text}");
    }
    // The host said why, naming the limit, and no more than its burst.
    let lines = host
        .log()
        .lines()
        .filter(|l| l.contains("max_open_per_peer"))
        .count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{}", host.log());
}

#[test]
fn a_client_trickling_one_byte_a_second_is_cut_off_at_its_deadline() {
    let (d, metrics) = deploy("[admission]\nmax_handshakes = 1\n");
    let _host = start(&d, &metrics);
    let pin = d.node.pin().to_owned();
    let socket = d.socket();
    // The longest hello there is: 32-byte agent name and version.
    let frame = vkx_e2e::raw::long_hello_frame();

    // TLS done, then the hello one byte (one TLS record) per second, until
    // the host stops taking it.
    let mut tls = connect(&socket, &pin).unwrap();
    let mut sent = 0usize;
    for b in &frame {
        if tls.write_all(&[*b]).and_then(|()| tls.flush()).is_err() {
            break;
        }
        sent += 1;
        if sent == 2 {
            // Meanwhile it holds the only handshake slot.
            let got = exchange(&socket, &pin, &[hello()]);
            assert_eq!(only_error(&got).code, ErrorCode::Busy);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // Cut off long before the hello was complete, and within the bound of
    // TLS handshake timeout + HANDSHAKE_DEADLINE (one byte per second).
    let bound = vkx_common::session::transport::TLS_HANDSHAKE_TIMEOUT
        + vkx_common::session::host::HANDSHAKE_DEADLINE;
    assert!(sent < frame.len(), "the whole hello went through");
    assert!(
        u64::try_from(sent).unwrap() <= bound.as_secs() + 1,
        "{sent} bytes at 1 byte/s"
    );
    // It was told why. (Read below rustls' stream: its `read` would first
    // retry the write that failed.)
    let mut plain = Vec::new();
    while let Ok(n) = tls.conn.read_tls(&mut tls.sock) {
        if n == 0 || tls.conn.process_new_packets().is_err() {
            break;
        }
    }
    let _ = tls.conn.reader().read_to_end(&mut plain);
    let mut d = FrameDecoder::new();
    let mut input = &plain[..];
    let mut got = Vec::new();
    while let Ok(Some(p)) = d.decode(&mut input) {
        got.push(Message::decode(p).unwrap());
    }
    assert_eq!(only_error(&got).code, ErrorCode::Timeout);

    let text = wait_value(&metrics, "vkx_connections_open", 0);
    for (series, want) in [
        ("vkx_handshakes_total{outcome=\"timeout\"}", 1),
        ("vkx_errors_sent_total{code=\"timeout\"}", 1),
        ("vkx_errors_sent_total{code=\"busy\"}", 1),
        ("vkx_handshakes_in_progress", 0),
    ] {
        assert_eq!(value(&text, series), want, "{series}\n{text}");
    }
}

#[test]
fn key_releases_and_rotations_are_counted() {
    let (d, metrics) = deploy("");
    let node = d.node.node_dir();
    let keys = |args: &[&str], stdin: &[u8]| {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--node-dir", &node]);
        let o = run("vkx-host", &all, stdin);
        assert!(o.status.success(), "keys {args:?}: {o:?}");
    };
    keys(
        &["add", "disk", "--from-stdin", "--allow-image", "img"],
        &[0x5a; 32],
    );
    let host = start(&d, &metrics);
    let key_dir = d.path("keys");
    let config = d.guest_config(
        "keys.toml",
        &d.socket(),
        d.node.pin(),
        &format!("keys = [\"disk\"]\nkey_dir = \"{}\"\n", key_dir.display()),
    );
    let cfg = config.display().to_string();
    let o = run("vkx-guest", &["once", "--config", &cfg], b"");
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stderr(&o), host.log());
    wait_value(&metrics, "vkx_keys_released_total", 1);

    // A daemon holds the key; a rotation is pushed to it and acknowledged.
    let daemon = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &cfg],
        d.path("daemon.log"),
    );
    wait_value(&metrics, "vkx_keys_released_total", 2);
    keys(&["rotate", "disk", "--from-stdin"], &[0xa5; 32]);
    wait_value(&metrics, "vkx_key_updates_pushed_total", 1);
    let text = wait_value(
        &metrics,
        "vkx_key_updates_acked_total{result=\"installed\"}",
        1,
    );
    assert_eq!(
        value(&text, "vkx_key_updates_acked_total{result=\"failed\"}"),
        0,
        "{text}"
    );
    assert_eq!(value(&text, "vkx_sessions_established"), 1, "{text}");
    assert!(daemon.stop().success());
    let text = wait_value(&metrics, "vkx_sessions_established", 0);
    assert_eq!(
        value(&text, "vkx_handshakes_total{outcome=\"attested\"}"),
        2,
        "{text}"
    );
}
