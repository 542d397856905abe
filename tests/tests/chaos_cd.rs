//! Fault-injection cases c and d (issue #6, item 5), beside
//! `tests/chaos_ab.rs` (cases a, b) and `tests/chaos_ef.rs` (e, f), writing their rows in the same
//! format to `target/chaos/<case>.json` (`examples/chaos_report.rs` prints
//! them):
//! `{"case":"d","title":"...","figure":"...","bound":"...","pass":true,"run":"full"}`.
//! `VKX_CHAOS_FULL=1` runs the full size; without it a reduced one. The
//! bounds are the same.
//!
//! - c, reconnect herd (module [`c`], only with `--features
//!   insecure-soft-tpm`): 1,024 guests with soft vTPMs hold sessions with a
//!   real `vkx-host serve`; the host crashes (SIGKILL, 10 s outage), then
//!   restarts in order (SIGTERM). Every guest must come back, no 1-s
//!   window may hold more than 3 % of the herd's attempts or guests, and
//!   the host stays within its limits. Full: real time, about 8 minutes;
//!   reduced: the guests' clock 8 times faster, about 1.5 minutes.
//! - d, hostile peer: a real `vkx-host serve` with its own listener for the
//!   hostile VM identity (`vm-evil`). From that one peer, at once: a flood
//!   of TLS connections, half of them writing malformed frames (10,000 a
//!   second in all, reconnecting whenever the host closes), a sender
//!   trickling a `hello` at 1 byte/s, idle transports that never
//!   start TLS, and, before the flood, an oversize length prefix and a
//!   maximally nested payload. Meanwhile the well-behaved `vm-1` runs
//!   `vkx-guest once` again and again and must attest each time. Asserted:
//!   the host's peak RSS (VmHWM) stays under baseline + (the peer's
//!   `max_open_per_peer` + the good guest's one connection) × a
//!   per-connection bound, since every transport beyond the peer's
//!   allowance is closed before TLS; the host wrote at most `PEER_BURST` lines per
//!   call site naming the hostile peer; the metrics count the refusals.
//! - d2, many hostile VMs (issue #13, item 4): 30 VMs, each with its own
//!   listener, each keep 9 handshakes stalled in AwaitEvidence (a valid
//!   `hello`, never `evidence`): 270, more than the node's default
//!   `max_handshakes`. The per-peer cap holds them to 2 each, so the
//!   good guest attests every time and the node's limit never refuses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)] // Each case prints its figure.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vkx_common::errors::ErrorCode;
use vkx_common::wire::{MAX_FRAME_PAYLOAD, Message, encode_frame};
use vkx_e2e::agents::{Agent as Process, Deployment, status_kib, value, wait_value};
use vkx_e2e::chaos::{Row, size};
use vkx_e2e::raw::{Tls, long_hello_frame, read_all};
use vkx_e2e::run;

/// Bound on waiting for the host to notice something.
const LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Raw clients and the host's figures.

/// [`vkx_e2e::raw::connect`] with this file's time limit.
fn connect(socket: &Path, pin: &str) -> std::io::Result<Tls> {
    vkx_e2e::raw::connect(socket, pin, LIMIT)
}

fn only_error(msgs: &[Message]) -> ErrorCode {
    match msgs {
        [Message::Error(e)] => e.code,
        other => panic!("expected one error, got {other:?}"),
    }
}

fn start_host(d: &Deployment, metrics: &Path) -> Process {
    let host = d.start_host("host.log");
    host.wait_for_path(metrics);
    host
}

// ---------------------------------------------------------------------------
// d: hostile peer.

const EVIL: &str = "vm-evil";
/// The host's limits in this case: `max_open` bounds every connection it
/// holds, and so its memory; one peer holds at most `max_open_per_peer`
/// (the default, 16) of them.
const D_MAX_CONNECTIONS: usize = 128;
const D_MAX_OPEN: usize = 256;
const D_MAX_OPEN_PER_PEER: usize = vkx_host::admission::DEFAULT_MAX_OPEN_PER_PEER;
/// Connections the good guest holds at once (`vkx-guest once`).
const D_GOOD_CONNECTIONS: usize = 1;
/// Per held connection: one frame buffer (64 KiB + header), rustls'
/// buffers (a 16 KiB record in, one out, plus state), the task and its
/// socket: 128 KiB with room.
const D_PER_CONNECTION_KIB: u64 = 128;
/// Threads opening TLS connections: half write malformed frames, half
/// only connect.
const D_FLOODERS: usize = 16;
/// Transports opened and never taken to TLS (held by the host until its
/// TLS handshake timeout, or until they go away): a quarter of the
/// peer's allowance, so the flood keeps the rest busy.
const D_IDLE: usize = 4;
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

#[test]
fn d_hostile_peer_memory_logs_and_service_stay_bounded() {
    let mut row = Row::start(
        "d",
        "hostile peer",
        "peak RSS <= baseline + (max_open_per_peer + 1) x 128 KiB; <= PEER_BURST lines per call site for the peer; every good guest attests",
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
    let held = (D_MAX_OPEN_PER_PEER + D_GOOD_CONNECTIONS) as u64;
    let bound_kib = baseline_kib + held * D_PER_CONNECTION_KIB;
    row.set_bound(format!(
        "peak RSS <= {} KiB (baseline {baseline_kib} KiB + (max_open_per_peer {D_MAX_OPEN_PER_PEER} + the good guest's \
         {D_GOOD_CONNECTIONS}) x {D_PER_CONNECTION_KIB} KiB); \
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
        // The 1-byte/s sender, connected before the others take the
        // peer's allowance.
        let mut tls = connect(&evil, &pin).unwrap();
        let stop_slow = &stop;
        let slow = s.spawn(move || {
            let stop = stop_slow;
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
        let (good, failure) = good_guest_during(attack, D_GOOD_INTERVAL, &good_once);
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
    let capped = value(&text, "vkx_admissions_refused_total{reason=\"peer_open\"}");
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
        && capped > 0
        && too_large >= 1
        && malformed >= 1;
    let figure = format!(
        "{:.1} s attack from one peer: {sent} malformed frames written into its sockets ({:.0}/s) and {} TLS connections \
         ({} transports closed before TLS), {D_IDLE} idle transports, 1 byte/s sender ({slow_sent} bytes), \
         oversize prefix -> frame-too-large, nesting {} -> malformed; host closed {capped} transports at once (the peer held \
         max_open_per_peer), refused {refused_rate} connections after TLS (peer rate) and \
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

// ---------------------------------------------------------------------------
// d2: many hostile VMs at once, each stalling handshakes.

/// Hostile VMs, each with its own listener (so its own peer identity).
/// With the review's 9 stalls each, 30 of them ask for 270 handshake
/// slots, more than the node's default `max_handshakes` (256): without
/// a per-peer cap every other guest gets `busy`.
const D2_VMS: usize = 30;
/// Stalled handshakes each hostile VM tries to hold at once.
const D2_STALLS: usize = 9;
/// The good guest's pace: within a well-behaved peer's own connection
/// allowance (burst 10, then 1 per 6 s), so only the attack can fail it.
const D2_GOOD_INTERVAL: Duration = Duration::from_secs(4);
/// How often the sampler scrapes the host's metrics.
const D2_SAMPLE: Duration = Duration::from_millis(100);

/// One staller: TLS, a valid `hello`, read the `challenge`, then never
/// send `evidence`, holding the handshake until the host times it out
/// or the attack ends; then again. A refused attempt (busy,
/// rate-limited, closed) waits a little and tries again, as an attacker
/// would.
fn d2_stall(socket: &Path, pin: &str, stop: &AtomicBool, held: &AtomicU64, refused: &AtomicU64) {
    let hello = long_hello_frame();
    while !stop.load(Ordering::Relaxed) {
        let attempt = connect(socket, pin).and_then(|mut tls| {
            tls.write_all(&hello)?;
            tls.flush()?;
            Ok(tls)
        });
        let Ok(mut tls) = attempt else {
            refused.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        if !matches!(
            vkx_e2e::raw::read_messages(&mut tls, 1).as_slice(),
            [Message::Challenge(_)]
        ) {
            refused.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        held.fetch_add(1, Ordering::Relaxed);
        // Hold it: read (the host's eventual `timeout`) until the host
        // closes or the attack ends.
        tls.sock.set_read_timeout(Some(POLL)).unwrap();
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            match std::io::Read::read(&mut tls, &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    }
}

#[test]
fn d2_many_hostile_vms_stalling_handshakes_cannot_lock_out_a_good_guest() {
    let per_peer = vkx_host::admission::DEFAULT_MAX_HANDSHAKES_PER_PEER;
    let bound = D2_VMS * per_peer + D_GOOD_CONNECTIONS;
    let row = Row::start(
        "d2",
        "many hostile VMs stall handshakes",
        format!(
            "handshakes in progress <= {D2_VMS} VMs x max_handshakes_per_peer {per_peer} + the good guest's 1 = {bound} \
             (of max_handshakes 256); every good guest attests"
        ),
    );
    // Longer than AWAIT_EVIDENCE_TIMEOUT at full size, so stalls expire and
    // are renewed (within the VMs' connection rate).
    let attack = size(Duration::from_secs(45), Duration::from_secs(8));

    let d = Deployment::new("vm-1", "");
    let metrics = d.path("metrics.sock");
    let socks: Vec<std::path::PathBuf> = (0..D2_VMS)
        .map(|i| d.path(&format!("evil-{i:02}.sock")))
        .collect();
    let mut extra = format!("[metrics]\nsocket = \"{}\"\n", metrics.display());
    for (i, s) in socks.iter().enumerate() {
        extra += &format!(
            "\n[[unix_listener]]\npath = \"{}\"\nvm_id = \"vm-evil-{i:02}\"\n",
            s.display()
        );
    }
    d.write_host_config(&extra);
    // Enrolled VMs, as real tenants would be: vm-1's registry entry and
    // policy under each hostile name (the policy admits them past
    // `hello`; they never get as far as a quote).
    let mut entry = d.node.entry("vm-1");
    let policy_path = d.path("policy.toml");
    let mut policy = std::fs::read_to_string(&policy_path).unwrap();
    let vm_block = policy[policy.find("[[vm]]").unwrap()..].to_owned();
    for i in 0..D2_VMS {
        let vm = format!("vm-evil-{i:02}");
        entry["vm_id"] = serde_json::Value::String(vm.clone());
        let path = Path::new(&d.node.registry()).join(format!("{vm}.json"));
        std::fs::write(path, serde_json::to_vec(&entry).unwrap()).unwrap();
        policy += "\n";
        policy += &vm_block.replace("id = \"vm-1\"", &format!("id = \"{vm}\""));
    }
    std::fs::write(&policy_path, policy).unwrap();
    let host = start_host(&d, &metrics);
    for s in &socks {
        host.wait_for_path(s);
    }
    let pin = d.node.pin().to_owned();
    let good_config = d.guest_config("guest.toml", &d.socket(), &pin, "");
    let good_config = good_config.display().to_string();
    let good_once = || run("vkx-guest", &["once", "--config", &good_config], b"");
    let o = good_once();
    assert_eq!(o.status.code(), Some(0), "{o:?}\n{}", host.log());

    let stop = AtomicBool::new(false);
    let held = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let peak = AtomicU64::new(0);
    let (good, failure) = std::thread::scope(|s| {
        for sock in &socks {
            for _ in 0..D2_STALLS {
                let (stop, held, refused, pin) = (&stop, &held, &refused, &pin);
                s.spawn(move || d2_stall(sock, pin, stop, held, refused));
            }
        }
        let (stop_s, peak_s, metrics_s) = (&stop, &peak, &metrics);
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            while !stop_s.load(Ordering::Relaxed) {
                if let Ok(text) = rt.block_on(vkx_host::metrics::fetch(metrics_s)) {
                    peak_s.fetch_max(
                        value(&text, "vkx_handshakes_in_progress"),
                        Ordering::Relaxed,
                    );
                }
                std::thread::sleep(D2_SAMPLE);
            }
        });
        // Let the stalls take what they can, then the good guest, again
        // and again.
        let t_full = Instant::now();
        while held.load(Ordering::Relaxed) < (D2_VMS * per_peer) as u64 && t_full.elapsed() < LIMIT
        {
            std::thread::sleep(POLL);
        }
        let (good, failure) = good_guest_during(attack, D2_GOOD_INTERVAL, &good_once);
        stop.store(true, Ordering::Relaxed);
        (good, failure)
    });

    let text = wait_value(&metrics, "vkx_connections_open", 0);
    let capped = value(
        &text,
        "vkx_admissions_refused_total{reason=\"peer_handshakes\"}",
    );
    let node_full = value(
        &text,
        "vkx_admissions_refused_total{reason=\"max_handshakes\"}",
    );
    let peak = peak.load(Ordering::Relaxed);
    let held = held.load(Ordering::Relaxed);
    let good_ok = good.iter().filter(|(c, _)| *c == Some(0)).count();
    let slowest = good.iter().map(|(_, t)| *t).max().unwrap_or_default();
    let pass = failure.is_empty()
        && !good.is_empty()
        && good_ok == good.len()
        && peak <= bound as u64
        && held >= (D2_VMS * per_peer) as u64
        && capped > 0
        && node_full == 0;
    let figure = format!(
        "{D2_VMS} VMs x {D2_STALLS} stallers for {:.0} s: {held} handshakes stalled in AwaitEvidence, \
         {capped} refused busy by the per-peer cap, {} attempts refused in all (busy, rate-limited), \
         {node_full} by the node's max_handshakes; peak {peak} handshakes in progress; \
         good guest attested {good_ok}/{} (slowest {:.2} s)",
        attack.as_secs_f64(),
        refused.load(Ordering::Relaxed),
        good.len(),
        slowest.as_secs_f64(),
    );
    row.finish(&figure, pass);
    assert!(
        failure.is_empty(),
        "a good guest failed while {D2_VMS} VMs stalled handshakes: {failure}\n{figure}"
    );
    assert!(pass, "{figure}\n{text}");
}

/// The well-behaved guest during an attack: `once` every `interval` (well
/// within its own connection budget: burst 10, then 1 per 6 s) for
/// `attack`, until the first failure. Each attempt's exit code and time,
/// and the failure's stderr (empty if none), reported by the caller after
/// the attackers stopped.
fn good_guest_during(
    attack: Duration,
    interval: Duration,
    once: &dyn Fn() -> std::process::Output,
) -> (Vec<(Option<i32>, Duration)>, String) {
    let t0 = Instant::now();
    let mut good = Vec::new();
    while t0.elapsed() < attack {
        let t = Instant::now();
        let o = once();
        good.push((o.status.code(), t.elapsed()));
        if o.status.code() != Some(0) {
            return (good, String::from_utf8_lossy(&o.stderr).into_owned());
        }
        std::thread::sleep(interval.saturating_sub(t.elapsed()));
    }
    (good, String::new())
}

/// A log line's call site: its message, without the level, target and
/// fields (tracing's format: `... LEVEL target: message key=value ...`).
fn site_of(line: &str) -> String {
    let rest = line.split_once(": ").map_or(line, |(_, r)| r);
    let end = rest.find(" peer=").unwrap_or(rest.len());
    rest[..end].to_owned()
}

// ---------------------------------------------------------------------------
// c: the reconnect herd.

/// Case c, in its own module: it needs the soft vTPM (`--features
/// insecure-soft-tpm`), a thousand TPMs being more than swtpm processes
/// this machine can run at once.
///
/// A real `vkx-host serve` and [`GUESTS`] guests in this process, each
/// the guest agent's own attempt driver (`vkx_guest::agent::Agent` with a
/// soft vTPM) paced by the daemon's own decisions
/// (`vkx_guest::supervisor::Supervisor`, the default retry policy, its own
/// seed). Every guest attests and holds its session. Then:
///
/// 1. crash: the host is SIGKILLed, so every guest loses its session at
///    the same instant; a new host is started after [`OUTAGE`];
/// 2. orderly restart: the host is stopped (SIGTERM: `goodbye` with its
///    spread `retry-after` to every session) and started again at once.
///
/// After each, every guest must attest again. Measured per event: every
/// attempt's start time (the guest time its supervisor chose to wake at:
/// the guests share one harness thread, whose timers fire late under
/// load, where real guests each have their own CPU), the most attempts in any 1-s window (sliding),
/// as a share of all the herd's attempts and of its guests (both must be
/// at most 3 %); the host's handshakes in progress and connections
/// (sampled every [`SAMPLE`] from its metrics endpoint) against its
/// limits, and its `busy` refusals.
///
/// The guests' clock: the full run (`make chaos`) is real time, about 8
/// minutes. The reduced run (`make test`) runs the guests' clock
/// [`REDUCED_SPEED`] times faster than real time (their decisions see
/// guest time; the host and the sockets are real), about a minute: the
/// host then sees the herd 8 times denser than it would, which makes its
/// limits harder to keep, not easier.
#[cfg(feature = "insecure-soft-tpm")]
mod c {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use tokio::sync::watch;
    use vkx_common::retry::{BACKOFF_CAP, RECONNECT_SPREAD, RetryConfig};
    use vkx_common::session::guest::{Guest, GuestEvent};
    use vkx_e2e::agents::{status_kib, value};
    use vkx_e2e::chaos::{Row, size};
    use vkx_e2e::herd::{Host, SoftSite, ensure_fd_limit, failure_cause};
    use vkx_guest::agent::{Agent, Handler, Reaction};
    use vkx_guest::supervisor::{Start, Supervisor};

    /// The herd: the VMs one node is designed for.
    const GUESTS: usize = 1024;
    /// The bound: at most this share (percent) of the herd's attempts,
    /// and of its guests, in any 1-s window.
    const MAX_PERCENT_PER_SECOND: usize = 3;
    /// How long the crashed host stays down (guest time).
    const OUTAGE: Duration = Duration::from_secs(10);
    /// Guest clock speed of the reduced run.
    const REDUCED_SPEED: u32 = 8;
    /// The host's `shutdown_retry_after_s` (its default): R of the
    /// orderly restart's `retry-after`s.
    const SHUTDOWN_RETRY_AFTER: Duration = Duration::from_secs(30);
    /// Longest the first attestation of every guest may take (guest time):
    /// they start at once, and the host's admission control sends most of
    /// them away with 5-10 s `retry-after`s.
    const ATTACH_LIMIT: Duration = Duration::from_secs(180);
    /// Longest a herd may take to be back (guest time): a first
    /// reconnection within the spread, a failed one and a second within
    /// twice that, a third within the cap, and a minute for the rest.
    const RETURN_LIMIT: Duration =
        Duration::from_secs(RECONNECT_SPREAD.as_secs() * 3 + BACKOFF_CAP.as_secs() + 60);
    /// The orderly restart: R, the host's spread for 1,024 sessions
    /// (128 s), the guest's 10 % jitter on top, and a minute.
    const ORDERLY_LIMIT: Duration = Duration::from_secs(30 + 128 + 16 + 60);
    /// Metrics sampling period (real time).
    const SAMPLE: Duration = Duration::from_millis(50);
    /// Open files beyond two per guest.
    const FD_HEADROOM: u64 = 256;
    /// Longest the guests take to end their sessions at the end.
    const STOP_LIMIT: Duration = Duration::from_secs(30);

    /// Guest time: `speed` times real time since `real0`.
    #[derive(Debug, Clone, Copy)]
    struct Clock {
        real0: Instant,
        speed: u32,
    }

    impl Clock {
        fn now(&self) -> Instant {
            self.real0 + self.real0.elapsed() * self.speed
        }

        /// The real instant at which guest time reaches `t`.
        fn real(&self, t: Instant) -> Instant {
            self.real0 + t.saturating_duration_since(self.real0) / self.speed
        }

        /// A guest-time span in real time.
        fn real_span(&self, d: Duration) -> Duration {
            d / self.speed
        }
    }

    #[derive(Debug)]
    enum Ev {
        /// A guest started an attempt at this guest time.
        Attempt(Instant),
        /// Guest `id` attested at this guest time.
        Attested(usize, Instant),
        /// An attempt that did not attest ended: how (no peer bytes).
        Failed(String),
        /// Guest `id` went dormant: a bound failed.
        Dormant(usize),
    }

    struct HerdGuest {
        id: usize,
        clock: Clock,
        tx: mpsc::Sender<Ev>,
    }

    impl Handler for HerdGuest {
        fn on_event(&mut self, ev: GuestEvent, _: &mut Guest, _: Instant) -> Reaction {
            if let GuestEvent::Attested { .. } = ev {
                let _ = self.tx.send(Ev::Attested(self.id, self.clock.now()));
            }
            Reaction::default()
        }
    }

    /// One guest, as `vkx-guest run` drives it: wait for the supervisor,
    /// attempt, report, until `stop`.
    async fn run_guest(
        agent: Arc<Agent>,
        id: usize,
        clock: Clock,
        tx: mpsc::Sender<Ev>,
        mut stop: watch::Receiver<bool>,
    ) {
        let seed = 0x6865_7264_0000_0000 ^ u64::try_from(id).unwrap();
        let mut sup = Supervisor::new(RetryConfig::default(), seed);
        let mut h = HerdGuest {
            id,
            clock,
            tx: tx.clone(),
        };
        // The guest time the supervisor last chose to wake at.
        let mut chosen: Option<Instant> = None;
        while !*stop.borrow() {
            let now = clock.now();
            if let Some(w) = sup.next_wake(now) {
                chosen = Some(w.until);
                let until = tokio::time::Instant::from_std(clock.real(w.until));
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            match sup.start_attempt(now) {
                Start::Go => {
                    // The attempt counts at the time the policy chose, not
                    // when this harness's one thread got round to it: under
                    // load its timers fire late, and at 8x a 125 ms stall
                    // would pack a guest-second of wakes into one window.
                    let at = chosen.take().map_or(now, |c| c.min(now));
                    let _ = tx.send(Ev::Attempt(at));
                    let a = agent.attempt(&mut h, &mut stop).await;
                    if !a.established {
                        let _ = tx.send(Ev::Failed(a.detail.clone()));
                    }
                    // The line the daemon would log is not this case's
                    // figure (case a counts lines).
                    let _line = sup.attempt_ended(&a, clock.now()).log;
                    if sup.policy().is_dormant() && !*stop.borrow() {
                        let _ = tx.send(Ev::Dormant(id));
                    }
                }
                Start::NotYet(_) => {}
                Start::BudgetSpent(_) => {
                    let _ = tx.send(Ev::Dormant(id));
                }
            }
        }
    }

    /// What the guests reported, by guest time.
    #[derive(Default)]
    struct Log {
        attempts: Vec<Instant>,
        /// Per guest: its last attestation.
        attested: Vec<Option<Instant>>,
        failed: BTreeMap<String, usize>,
        /// Guests that went dormant (none may).
        dormant: std::collections::BTreeSet<usize>,
    }

    impl Log {
        fn take(&mut self, ev: Ev) {
            match ev {
                Ev::Attempt(t) => self.attempts.push(t),
                Ev::Attested(id, t) => self.attested[id] = Some(t),
                Ev::Failed(why) => {
                    *self.failed.entry(failure_cause(&why)).or_default() += 1;
                }
                Ev::Dormant(id) => {
                    self.dormant.insert(id);
                }
            }
        }

        /// Guests attested at or after `since`.
        fn back(&self, since: Instant) -> usize {
            self.attested
                .iter()
                .filter(|t| t.is_some_and(|t| t >= since))
                .count()
        }

        /// Reads events until every guest attested at or after `since`,
        /// or `limit` (real time) passes. Returns the guests back.
        fn wait_back(&mut self, rx: &mpsc::Receiver<Ev>, since: Instant, limit: Duration) -> usize {
            let deadline = Instant::now() + limit;
            while self.back(since) < self.attested.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                    Ok(ev) => self.take(ev),
                    Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            self.back(since)
        }
    }

    /// The host's figures over one event, from its metrics endpoint.
    #[derive(Debug, Default, Clone, Copy)]
    struct HostPeaks {
        handshakes: u64,
        connections: u64,
        max_handshakes: u64,
        max_connections: u64,
        refused: u64,
        samples: u64,
    }

    /// Samples `socket` every [`SAMPLE`] until `done`.
    fn sample_host(socket: PathBuf, done: Arc<AtomicBool>) -> std::thread::JoinHandle<HostPeaks> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut p = HostPeaks::default();
            while !done.load(Ordering::SeqCst) {
                if let Ok(text) = rt.block_on(vkx_host::metrics::fetch(&socket)) {
                    p.samples += 1;
                    p.handshakes = p.handshakes.max(value(&text, "vkx_handshakes_in_progress"));
                    p.connections = p.connections.max(value(&text, "vkx_connections"));
                    p.max_handshakes =
                        value(&text, "vkx_admission_limit{limit=\"max_handshakes\"}");
                    p.max_connections =
                        value(&text, "vkx_admission_limit{limit=\"max_connections\"}");
                    // Every refusal, whatever its reason (busy for a
                    // limit, rate-limited for a peer).
                    p.refused = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("vkx_admissions_refused_total{"))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                        .sum();
                }
                std::thread::sleep(SAMPLE);
            }
            p
        })
    }

    /// The most attempts in any 1-s window (sliding, half-open) of the
    /// sorted `starts`.
    fn busiest_second(starts: &[Instant]) -> usize {
        let mut lo = 0;
        let mut most = 0;
        for hi in 0..starts.len() {
            while starts[hi].duration_since(starts[lo]) >= Duration::from_secs(1) {
                lo += 1;
            }
            most = most.max(hi - lo + 1);
        }
        most
    }

    /// One event's figures.
    struct Herd {
        attempts: usize,
        busiest: usize,
        back: usize,
        /// Guest time from the event to the last guest back, and the median.
        last: Duration,
        median: Duration,
        host: HostPeaks,
    }

    impl Herd {
        fn measure(log: &Log, since: Instant, back: usize, host: HostPeaks) -> Self {
            let mut starts: Vec<Instant> = log
                .attempts
                .iter()
                .copied()
                .filter(|t| *t >= since)
                .collect();
            starts.sort();
            let mut returns: Vec<Duration> = log
                .attested
                .iter()
                .filter_map(|t| t.filter(|t| *t >= since).map(|t| t - since))
                .collect();
            returns.sort();
            Self {
                attempts: starts.len(),
                busiest: busiest_second(&starts),
                back,
                last: returns.last().copied().unwrap_or_default(),
                median: returns.get(returns.len() / 2).copied().unwrap_or_default(),
                host,
            }
        }

        fn within(&self) -> bool {
            self.back == GUESTS
                && self.busiest * 100 <= self.attempts * MAX_PERCENT_PER_SECOND
                && self.busiest * 100 <= GUESTS * MAX_PERCENT_PER_SECOND
                && self.host.samples > 0
                && self.host.handshakes <= self.host.max_handshakes
                && self.host.connections <= self.host.max_connections
        }

        fn describe(&self, what: &str) -> String {
            let pct = |n: usize, of: usize| 100.0 * n as f64 / of.max(1) as f64;
            format!(
                "{what}: {}/{GUESTS} back (median {:.0} s, last {:.0} s); {} attempts, busiest second {} \
                 ({:.2} % of attempts, {:.2} % of guests); host peaks {} handshakes in progress \
                 (limit {}), {} connections (limit {}), {} admissions refused",
                self.back,
                self.median.as_secs_f64(),
                self.last.as_secs_f64(),
                self.attempts,
                self.busiest,
                pct(self.busiest, self.attempts),
                pct(self.busiest, GUESTS),
                self.host.handshakes,
                self.host.max_handshakes,
                self.host.connections,
                self.host.max_connections,
                self.host.refused,
            )
        }
    }

    /// Starts the host with its metrics socket and a sampler on it.
    fn start(
        soft: &SoftSite,
        name: &str,
    ) -> (Host, Arc<AtomicBool>, std::thread::JoinHandle<HostPeaks>) {
        let metrics = soft.site.work.path().join(format!("metrics-{name}.sock"));
        let host = soft.site.start_host(
            name,
            &format!("[metrics]\nsocket = \"{}\"\n", metrics.display()),
        );
        host.process.wait_for_path(&metrics);
        let done = Arc::new(AtomicBool::new(false));
        let sampler = sample_host(metrics, done.clone());
        (host, done, sampler)
    }

    fn end_sampling(done: &AtomicBool, sampler: std::thread::JoinHandle<HostPeaks>) -> HostPeaks {
        done.store(true, Ordering::SeqCst);
        sampler.join().unwrap()
    }

    #[test]
    fn c_reconnect_herd() {
        #![allow(clippy::cast_precision_loss)] // Percentages for a report.
        let speed = size(1, REDUCED_SPEED);
        let mut row = Row::start(
            "c",
            "1,024 guests lose the host at once and reconnect (crash, then orderly restart)",
            format!(
                "every guest back; <= {MAX_PERCENT_PER_SECOND} % of attempts and of guests in any 1-s window; \
                 host within max_handshakes and max_connections"
            ),
        );
        ensure_fd_limit(2 * GUESTS as u64 + FD_HEADROOM);
        let soft = SoftSite::new(GUESTS, "herd");
        let agents = soft.agents();
        let clock = Clock {
            real0: Instant::now(),
            speed,
        };
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut log = Log {
            attested: vec![None; GUESTS],
            ..Log::default()
        };

        // Every guest attests and holds its session.
        let (host, done, sampler) = start(&soft, "attach");
        let t_start = clock.now();
        // The guests run on one tokio thread of their own (their quotes on
        // its blocking pool); this thread kills and restarts the host.
        let guests = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut set = tokio::task::JoinSet::new();
                for (id, agent) in agents.into_iter().enumerate() {
                    set.spawn(run_guest(agent, id, clock, tx.clone(), stop_rx.clone()));
                }
                drop(tx);
                let mut stop = stop_rx;
                while !*stop.borrow() {
                    if stop.changed().await.is_err() {
                        break;
                    }
                }
                let deadline = tokio::time::Instant::now() + STOP_LIMIT;
                while let Ok(Some(_)) = tokio::time::timeout_at(deadline, set.join_next()).await {}
                set.abort_all();
            });
        });
        let attached = log.wait_back(&rx, t_start, clock.real_span(ATTACH_LIMIT));
        let attach = Herd::measure(&log, t_start, attached, end_sampling(&done, sampler));
        println!(
            "chaos c: {} ({})",
            attach.describe("attach, all at once"),
            soft.note
        );
        assert_eq!(
            attached, GUESTS,
            "not every guest attested: {:?}",
            log.failed
        );

        // 1. Crash: every session lost at the same instant.
        let t_crash = clock.now();
        host.process.kill();
        std::thread::sleep(clock.real_span(OUTAGE));
        let (host, done, sampler) = start(&soft, "after-crash");
        let back = log.wait_back(&rx, t_crash, clock.real_span(RETURN_LIMIT));
        let crash = Herd::measure(&log, t_crash, back, end_sampling(&done, sampler));
        println!("chaos c: {}", crash.describe("crash"));

        // 2. Orderly restart: goodbye with a spread retry-after, and the
        //    host back at once.
        let t_stop = clock.now();
        let hwm = status_kib(host.pid, "VmHWM");
        host.stop(false);
        let stopped_log =
            std::fs::read_to_string(soft.site.work.path().join("host-after-crash.log")).unwrap();
        let (host, done, sampler) = start(&soft, "after-stop");
        let back = log.wait_back(&rx, t_stop, clock.real_span(ORDERLY_LIMIT));
        let orderly = Herd::measure(&log, t_stop, back, end_sampling(&done, sampler));
        println!("chaos c: {}", orderly.describe("orderly restart"));
        let spread_said = format!(
            "goodbye to {GUESTS} live session(s), reconnections spread over {} s from {} s",
            vkx_host::service::shutdown_spread(GUESTS as u64).as_secs(),
            SHUTDOWN_RETRY_AFTER.as_secs()
        );

        let _ = stop_tx.send(true);
        guests.join().unwrap();
        while let Ok(ev) = rx.try_recv() {
            log.take(ev);
        }
        host.stop(false);

        let pass = crash.within()
            && orderly.within()
            && log.dormant.is_empty()
            && stopped_log.contains(&spread_said);
        row.set_bound(format!(
            "every guest back; <= {MAX_PERCENT_PER_SECOND} % of attempts and <= {} attempts \
             ({MAX_PERCENT_PER_SECOND} % of guests) in any 1-s window; host <= max_handshakes, \
             <= max_connections",
            GUESTS * MAX_PERCENT_PER_SECOND / 100
        ));
        let figure = format!(
            "{}. {}. Not bounded here, the cold start of all {GUESTS} at once: {} attempts, {} turned \
             away by admission control, all attested within {:.0} s. Guest clock {speed}x real \
             time; peak host RSS with {GUESTS} sessions {:.1} MiB; failed attempts over the whole \
             run: {:?}; dormant guests: {}",
            crash.describe(&format!("crash (SIGKILL, {} s outage)", OUTAGE.as_secs())),
            orderly.describe("orderly restart (SIGTERM)"),
            attach.attempts,
            attach.host.refused,
            attach.last.as_secs_f64(),
            hwm as f64 / 1024.0,
            log.failed,
            log.dormant.len()
        );
        row.finish(&figure, pass);
        assert!(
            stopped_log.contains(&spread_said),
            "the stopping host did not say {spread_said:?}"
        );
        assert!(
            log.dormant.is_empty(),
            "guests went dormant: {:?}",
            log.dormant
        );
        for (what, h) in [("crash", &crash), ("orderly restart", &orderly)] {
            assert_eq!(h.back, GUESTS, "{what}: not every guest came back");
            assert!(
                h.busiest * 100 <= h.attempts * MAX_PERCENT_PER_SECOND
                    && h.busiest * 100 <= GUESTS * MAX_PERCENT_PER_SECOND,
                "{what}: {} of {} attempts in one second",
                h.busiest,
                h.attempts
            );
            assert!(
                h.host.samples > 0,
                "{what}: the host's metrics were never read"
            );
            assert!(
                h.host.handshakes <= h.host.max_handshakes,
                "{what}: {:?}",
                h.host
            );
            assert!(
                h.host.connections <= h.host.max_connections,
                "{what}: {:?}",
                h.host
            );
        }
    }
}
