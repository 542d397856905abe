//! The connect storm (`make bench`): N simulated VMs (default 1,024, the
//! per-node VM count vkx is designed for) hit one `vkx-host serve` at
//! once, each doing the full handshake, evidence and key release:
//!
//!     cargo run --release -p vkx-e2e --features insecure-soft-tpm --example storm [-- N]
//!
//! Set-up: a node (`vkx-host init`), N VMs each with its own soft vTPM
//! (`vkx_e2e::softtpm`: a software ECDSA P-256 AK whose quotes are
//! byte-compatible with a real vTPM's) enrolled in the registry
//! (`vkx_host::enroll`), a policy granting `storm-key` to their image (PCRs
//! 0 and 7 at the soft TPM's fixed values), the key in the key store
//! (`vkx-host keys generate`), one Unix socket per VM in host.toml, and the
//! release `vkx-host serve` as its own process.
//!
//! A storm: N guests in this process (`vkx_guest::agent`, the guest
//! agent's own driver, all on one tokio thread) start at once; each
//! connects, runs TLS 1.3, hello/challenge, quotes and, once attested, asks
//! for `storm-key` on the session; then it holds the session idle. A guest
//! the host turns away (`busy`, `rate-limited`) waits the `retry-after`
//! it was given and tries again, as `vkx-guest` does; after a transport
//! failure it waits 0.1 to 1 s. Figures: wall time until every guest has
//! its answer, each guest's latency from its first connect to the key (p50,
//! p99), the host's CPU time (user+system, /proc/PID/stat) over the storm
//! divided by N, its peak RSS (VmHWM) and its RSS with the N sessions held
//! idle (VmRSS); in run 1, also the host's CPU while the N sessions stay
//! idle for a minute (keepalives only), and the guests' side of it. Then
//! every session says goodbye and the host stops.
//!
//! The runs:
//! 1. soft vTPMs, every handshake admitted at once (`[admission]
//!    max_handshakes = N`): what one attested key release costs the host;
//!    then the same with the host on one worker thread (`worker_threads
//!    = 1`; run 1 used the default, one per core): key releases per
//!    second at 1 and at all cores;
//! 2. soft vTPMs, the host's default admission control: how long a node's
//!    worth of VMs takes to be keyed when they all start at once;
//! 3. the floor, in this process with ring: what one handshake cannot cost
//!    the host less than: the key exchange of the TLS group the agents
//!    negotiate (keygen + agreement), the host's TLS signature (ECDSA
//!    P-256, the node's key), the quote verification (`verify_quote`;
//!    ring's ECDSA verify alone beside it) and one AES-GCM record seal of a
//!    key-release carrying a 32-byte key;
//! 4. real vTPMs: [`REAL_VMS`] VMs, each with its own swtpm provisioned by
//!    `vkx-host vtpm provision`, [`REAL_ROUNDS`] storms one after another
//!    (`[admission] peer_connection_burst` raised to let each VM reconnect
//!    that often).
//!
//! It prints one block of figures, then exits non-zero if any guest of any
//! run did not get the key (released, not refused).
//!
//! Options (after `--`): `--only-a` runs storm (a) and the floor only (the
//! figure a change to the host's per-attestation cost moves, in a third of
//! the time); `--no-idle` skips (a)'s idle window; `--smaps DIR` copies the host's
//! /proc/PID/smaps before storm (a) and with its sessions held into DIR;
//! `--perf FILE` also records the host during storm (a) with
//! `perf record --call-graph dwarf` into FILE (`scripts/profile-storm.sh`
//! runs it and sorts the samples into the README's breakdown).
//!
//! The guests share the machine's CPUs with the host: wall time and
//! latencies include the load generator's own TLS and quote work (its CPU
//! time is printed too); the host CPU figure does not.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)] // A measuring tool.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{mpsc, watch};
use vkx_common::retry::Failure;
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_common::tpm::{AkParent, Public, QuoteExpectations, verify_quote};
use vkx_common::wire::{
    HashAlg, KeyMaterial, KeyName, KeyRelease, Message, PcrBankSelection, ReleasedKey,
};
use vkx_e2e::agents::status_kib;
use vkx_e2e::herd::{
    Host, KEY, MAX_VMS, POLICY_PCRS, Site, SoftSite, ensure_fd_limit, failure_cause,
};
use vkx_e2e::node::Node;
use vkx_e2e::softtpm::SoftTpm;
use vkx_e2e::swtpm::Swtpm;
use vkx_guest::agent::{Agent, Handler, Reaction};
use vkx_host::admission::{
    DEFAULT_BUSY_RETRY_AFTER_MS, DEFAULT_MAX_HANDSHAKES, DEFAULT_RETRY_JITTER_PERCENT,
};

/// Guests in the storm unless given: the VMs one node is designed for.
const DEFAULT_GUESTS: usize = 1024;
/// VMs of the real-vTPM run (one swtpm process each).
const REAL_VMS: usize = 8;
/// Storms of the real-vTPM run, one after another on the same host: eight
/// sessions are too few for a CPU figure measured in 10 ms clock ticks.
const REAL_ROUNDS: usize = 16;
/// Connection attempts one guest makes before it gives up.
const MAX_ATTEMPTS: u32 = 16;
/// Wait after a transport failure: uniform in this range (ms), like the
/// guest daemon's jittered floor.
const TRANSPORT_RETRY_MS: std::ops::Range<u16> = 100..1000;
/// Longest wait for every guest's answer.
const STORM_LIMIT: Duration = Duration::from_secs(300);
/// Longest wait for the sessions to end after the stop signal.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Pause after the last answer before the idle RSS is read: in-flight
/// buffers are released, only held sessions remain.
const SETTLE: Duration = Duration::from_secs(1);
/// Storm (a) then holds its sessions this long, keepalives only, and reads
/// the host's CPU over it (issue 14's idle cost: at most 1 % of one core).
/// Longer than the guests' keepalive interval, so every session pings once
/// in it: the steady state of an idle node, not a quiet minute between
/// pings.
const IDLE_WINDOW: Duration =
    Duration::from_secs(vkx_common::session::guest::KEEPALIVE_INTERVAL.as_secs() + 10);
/// File descriptors beyond two per guest (host: listener and connection;
/// this process: the guest's socket).
const FD_HEADROOM: u64 = 256;
/// Each floor primitive runs [`FLOOR_BATCHES`] batches of
/// [`FLOOR_BATCH`] iterations (after [`FLOOR_WARMUP`]); the fastest
/// batch's mean counts: a floor is a lower bound, and the other batches
/// are what the rest of the machine took from it.
const FLOOR_BATCHES: u32 = 10;
const FLOOR_BATCH: u32 = 200;
const FLOOR_WARMUP: u32 = 100;

/// What a guest reports to the storm.
#[derive(Debug)]
enum Outcome {
    /// The host answered the key request (final).
    Answered {
        latency: Duration,
        released: bool,
        refusal: Option<String>,
    },
    /// An attempt ended before an answer; the guest tries again.
    TurnedAway(String),
    /// The guest gave up (final).
    Failed(String),
}

/// One guest's session handler: asks for the key once attested, reports
/// the answer, holds the session.
struct StormGuest {
    start: Instant,
    key: KeyName,
    tx: mpsc::UnboundedSender<Outcome>,
    /// The final outcome was sent.
    done: bool,
    /// Sessions attested and not yet ended, across all guests.
    live: Arc<AtomicUsize>,
}

impl StormGuest {
    fn finish(&mut self, o: Outcome) {
        if !self.done {
            self.done = true;
            let _ = self.tx.send(o);
        }
    }
}

impl Handler for StormGuest {
    fn on_event(&mut self, ev: GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        match ev {
            GuestEvent::Attested { .. } => {
                self.live.fetch_add(1, Ordering::SeqCst);
                if let Guest::Established(s) = guest {
                    match s.request_keys(vec![self.key.clone()], now) {
                        Ok(out) => {
                            return Reaction {
                                out,
                                ..Reaction::default()
                            };
                        }
                        Err(e) => self.finish(Outcome::Failed(format!("key request: {e}"))),
                    }
                }
            }
            GuestEvent::Keys(release) => {
                let latency = self.start.elapsed();
                let released = release
                    .released
                    .iter()
                    .any(|k| k.name == self.key && !k.material.expose().is_empty());
                let refusal = release
                    .refused
                    .iter()
                    .map(|r| r.code.to_string())
                    .next()
                    .or_else(|| (!released).then(|| "not in the answer".to_owned()));
                self.finish(Outcome::Answered {
                    latency,
                    released,
                    refusal,
                });
            }
            _ => {}
        }
        Reaction::default()
    }
}

/// One guest: attempts until the host answers the key request, honouring
/// `retry-after`; then holds the session until `stop`. Returns whether
/// its last session ended with goodbye.
async fn run_guest(
    agent: Arc<Agent>,
    key: KeyName,
    tx: mpsc::UnboundedSender<Outcome>,
    live: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let rng = SystemRandom::new();
    let mut g = StormGuest {
        start: Instant::now(),
        key,
        tx,
        done: false,
        live,
    };
    for attempt in 1..=MAX_ATTEMPTS {
        let a = agent.attempt(&mut g, &mut stop).await;
        if a.established {
            g.live.fetch_sub(1, Ordering::SeqCst);
        }
        if g.done || *stop.borrow() {
            return a.established && a.failure().is_none();
        }
        let wait = match a.close {
            CloseReason::Failed(Failure::Code {
                retry_after: Some(r),
                ..
            }) => Some(r),
            CloseReason::Failed(Failure::Transport) => {
                let mut b = [0u8; 2];
                rng.fill(&mut b).unwrap();
                let span = TRANSPORT_RETRY_MS.end - TRANSPORT_RETRY_MS.start;
                Some(Duration::from_millis(
                    (TRANSPORT_RETRY_MS.start + u16::from_be_bytes(b) % span).into(),
                ))
            }
            _ => None,
        };
        match wait {
            Some(w) if attempt < MAX_ATTEMPTS => {
                let _ = g.tx.send(Outcome::TurnedAway(failure_cause(&a.detail)));
                tokio::select! {
                    () = tokio::time::sleep(w) => {}
                    _ = stop.changed() => return false,
                }
            }
            _ => {
                g.finish(Outcome::Failed(failure_cause(&a.detail)));
                return false;
            }
        }
    }
    false
}

/// The figures of one storm (or of several rounds of one).
struct StormFigures {
    /// Sessions, over all rounds.
    guests: usize,
    released: usize,
    refused: BTreeMap<String, usize>,
    failed: BTreeMap<String, usize>,
    /// Attempts the host turned away (retried), by cause.
    turned_away: BTreeMap<String, usize>,
    /// Per round: from the start until every guest had its answer.
    walls: Vec<Duration>,
    /// Sorted latencies (ms) of the answered guests.
    latencies_ms: Vec<f64>,
    host_cpu: Duration,
    self_cpu: Duration,
    rss_before_kib: u64,
    rss_held_kib: u64,
    hwm_kib: u64,
    held: usize,
    orderly: usize,
    /// With the sessions held idle for [`IDLE_WINDOW`]: the host's CPU and
    /// this process's (the in-process guest agents').
    idle: Option<IdleFigures>,
}

#[derive(Debug, Clone, Copy)]
struct IdleFigures {
    window: Duration,
    host_cpu: Duration,
    self_cpu: Duration,
}

impl StormFigures {
    /// Key releases per second of wall time, over all rounds.
    fn rate(&self) -> f64 {
        let wall: Duration = self.walls.iter().sum();
        self.released as f64 / wall.as_secs_f64().max(1e-9)
    }

    fn all_keyed(&self) -> bool {
        self.released == self.guests
    }

    /// Adds a later round of the same guests on the same host.
    fn merge(&mut self, later: Self) {
        self.guests += later.guests;
        self.released += later.released;
        for (mine, theirs) in [
            (&mut self.refused, later.refused),
            (&mut self.failed, later.failed),
            (&mut self.turned_away, later.turned_away),
        ] {
            for (k, v) in theirs {
                *mine.entry(k).or_default() += v;
            }
        }
        self.walls.extend(later.walls);
        self.latencies_ms.extend(later.latencies_ms);
        self.latencies_ms.sort_by(f64::total_cmp);
        self.host_cpu += later.host_cpu;
        self.self_cpu += later.self_cpu;
        self.rss_held_kib = later.rss_held_kib;
        self.hwm_kib = self.hwm_kib.max(later.hwm_kib);
        self.held = later.held;
        self.orderly += later.orderly;
        self.idle = later.idle.or(self.idle);
    }

    fn print(&self, out: &mut String) {
        let n = self.guests;
        let refused: usize = self.refused.values().sum();
        let failed: usize = self.failed.values().sum();
        line(
            out,
            "keyed",
            format!(
                "{} of {n} sessions got {KEY:?} released ({refused} refused{}, {failed} failed{})",
                self.released,
                describe_counts(&self.refused),
                describe_counts(&self.failed),
            ),
        );
        let turned: usize = self.turned_away.values().sum();
        if turned > 0 {
            line(
                out,
                "attempts turned away, retried",
                format!("{turned}{}", describe_counts(&self.turned_away)),
            );
        }
        let mut walls = self.walls.clone();
        walls.sort();
        let label = if self.all_keyed() {
            "wall time to all keyed"
        } else {
            "wall time to all answered"
        };
        let total: Duration = walls.iter().sum();
        let busy = format!(
            "host on CPU {:.0} % of it",
            100.0 * self.host_cpu.as_secs_f64() / total.as_secs_f64().max(1e-9)
        );
        match walls[..] {
            [] => {}
            [only] => line(out, label, format!("{:.2} s ({busy})", only.as_secs_f64())),
            _ => line(
                out,
                label,
                format!(
                    "median {:.3} s, max {:.3} s over {} rounds ({busy})",
                    walls[walls.len() / 2].as_secs_f64(),
                    walls[walls.len() - 1].as_secs_f64(),
                    walls.len()
                ),
            ),
        }
        if let [first, .., last] | [first @ last] = &self.latencies_ms[..] {
            let l = &self.latencies_ms;
            line(
                out,
                "latency, first connect to key",
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms (min {first:.1}, max {last:.1})",
                    percentile(l, 0.50),
                    percentile(l, 0.99),
                ),
            );
        }
        line(
            out,
            "host CPU per attested key release",
            format!(
                "{:.0} us ({:.2} s user+system over {n} sessions{})",
                self.host_cpu.as_secs_f64() * 1e6 / n as f64,
                self.host_cpu.as_secs_f64(),
                if turned > 0 {
                    " and the attempts turned away"
                } else {
                    ""
                }
            ),
        );
        line(
            out,
            "host RSS",
            format!(
                "{:.1} MiB before, peak {:.1} MiB (VmHWM), {:.1} MiB with {} idle sessions held ({:.1} KiB each)",
                mib(self.rss_before_kib),
                mib(self.hwm_kib),
                mib(self.rss_held_kib),
                self.held,
                self.rss_held_kib.saturating_sub(self.rss_before_kib) as f64
                    / self.held.max(1) as f64
            ),
        );
        if let Some(i) = &self.idle {
            let w = i.window.as_secs_f64();
            line(
                out,
                "idle cost, sessions held",
                format!(
                    "host {:.0} ms CPU over {w:.0} s with {} sessions (keepalives only) = {:.2} % of one core (target <= 1 %); \
                     the in-process guest agents {:.0} ms = {:.1} us per guest per second",
                    i.host_cpu.as_secs_f64() * 1e3,
                    self.held,
                    i.host_cpu.as_secs_f64() / w * 100.0,
                    i.self_cpu.as_secs_f64() * 1e3,
                    i.self_cpu.as_secs_f64() * 1e6 / w / self.held.max(1) as f64,
                ),
            );
        }
        line(
            out,
            "load generator CPU",
            format!(
                "{:.2} s (the guests' TLS and quotes, same CPUs); {} of {n} sessions ended with goodbye",
                self.self_cpu.as_secs_f64(),
                self.orderly,
            ),
        );
    }
}

/// One figure: label, value.
fn line(out: &mut String, label: &str, value: String) {
    let _ = writeln!(out, "    {:<36}{value}", format!("{label}:"));
}

fn describe_counts(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!(": {}", parts.join(", "))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Clock ticks per second of /proc/PID/stat times.
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// User+system CPU time of `pid` ("self" for this process).
fn cpu_time(pid: &str, ticks: u64) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let used: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_micros(used * 1_000_000 / ticks)
}

/// The host's memory map with each mapping's RSS (`--smaps`).
fn copy_smaps(pid: u32, out: &Path) {
    std::fs::copy(format!("/proc/{pid}/smaps"), out).unwrap();
}

/// Stops the host; on a shortfall, shows the end of its log.
fn finish_host(host: Host, f: &StormFigures) {
    host.stop(!f.all_keyed());
}

/// Drives one guest per agent, all at once, against the host `pid`; holds
/// the sessions (for [`SETTLE`] if `settle`, to read the idle RSS, then
/// `idle` more to read the idle CPU), then ends them.
fn storm(
    rt: &tokio::runtime::Runtime,
    agents: &[Arc<Agent>],
    pid: u32,
    ticks: u64,
    settle: bool,
    idle: Option<Duration>,
    smaps: Option<&(u32, std::path::PathBuf)>,
) -> StormFigures {
    let n = agents.len();
    let key = KeyName::new(KEY).unwrap();
    let rss_before_kib = status_kib(pid, "VmRSS");
    rt.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let live = Arc::new(AtomicUsize::new(0));
        let host_cpu0 = cpu_time(&pid.to_string(), ticks);
        let self_cpu0 = cpu_time("self", ticks);
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for agent in agents {
            tasks.spawn(run_guest(
                agent.clone(),
                key.clone(),
                tx.clone(),
                live.clone(),
                stop_rx.clone(),
            ));
        }
        drop(tx);
        let mut f = StormFigures {
            guests: n,
            released: 0,
            refused: BTreeMap::new(),
            failed: BTreeMap::new(),
            turned_away: BTreeMap::new(),
            walls: Vec::new(),
            latencies_ms: Vec::with_capacity(n),
            host_cpu: Duration::ZERO,
            self_cpu: Duration::ZERO,
            rss_before_kib,
            rss_held_kib: 0,
            hwm_kib: 0,
            held: 0,
            orderly: 0,
            idle: None,
        };
        let deadline = tokio::time::Instant::now() + STORM_LIMIT;
        let mut finished = 0;
        while finished < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Outcome::Answered {
                    latency,
                    released,
                    refusal,
                })) => {
                    finished += 1;
                    f.latencies_ms.push(latency.as_secs_f64() * 1e3);
                    if released {
                        f.released += 1;
                    } else {
                        *f.refused.entry(refusal.unwrap_or_default()).or_default() += 1;
                    }
                }
                Ok(Some(Outcome::TurnedAway(why))) => *f.turned_away.entry(why).or_default() += 1,
                Ok(Some(Outcome::Failed(why))) => {
                    finished += 1;
                    *f.failed.entry(why).or_default() += 1;
                }
                Ok(None) => break,
                Err(_) => {
                    *f.failed
                        .entry(format!("no answer within {} s", STORM_LIMIT.as_secs()))
                        .or_default() += n - finished;
                    break;
                }
            }
        }
        f.walls.push(t0.elapsed());
        f.host_cpu = cpu_time(&pid.to_string(), ticks) - host_cpu0;
        f.self_cpu = cpu_time("self", ticks) - self_cpu0;
        f.latencies_ms.sort_by(f64::total_cmp);
        if settle {
            tokio::time::sleep(SETTLE).await;
        }
        f.held = live.load(Ordering::SeqCst);
        f.rss_held_kib = status_kib(pid, "VmRSS");
        f.hwm_kib = status_kib(pid, "VmHWM");
        if let Some((pid, out)) = smaps {
            copy_smaps(*pid, out);
        }
        if let Some(window) = idle {
            let (host0, self0) = (cpu_time(&pid.to_string(), ticks), cpu_time("self", ticks));
            tokio::time::sleep(window).await;
            f.idle = Some(IdleFigures {
                window,
                host_cpu: cpu_time(&pid.to_string(), ticks) - host0,
                self_cpu: cpu_time("self", ticks) - self0,
            });
            f.held = f.held.min(live.load(Ordering::SeqCst));
        }
        let _ = stop_tx.send(true);
        let stop_deadline = tokio::time::Instant::now() + STOP_LIMIT;
        while let Ok(Some(r)) = tokio::time::timeout_at(stop_deadline, tasks.join_next()).await {
            if matches!(r, Ok(true)) {
                f.orderly += 1;
            }
        }
        tasks.abort_all();
        f
    })
}

// ------------------------------------------------------------------ floor

/// Time of one `op`: the mean of the fastest of [`FLOOR_BATCHES`]
/// batches, after a warm-up.
fn mean(mut op: impl FnMut()) -> Duration {
    for _ in 0..FLOOR_WARMUP {
        op();
    }
    (0..FLOOR_BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..FLOOR_BATCH {
                op();
            }
            t.elapsed() / FLOOR_BATCH
        })
        .min()
        .unwrap_or_default()
}

/// What the agents negotiate, found by one in-memory handshake with the
/// agents' own TLS configurations and the node's key.
struct Negotiated {
    group: rustls::NamedGroup,
    suite: rustls::CipherSuite,
}

fn negotiate(node_dir: &Path, pin: [u8; 32]) -> Negotiated {
    let (cert, key) = vkx_host::node::load(node_dir).unwrap();
    let server = vkx_common::tls::server_config(cert, key).unwrap();
    let client = vkx_common::tls::client_config(pin).unwrap();
    let mut s = rustls::ServerConnection::new(server).unwrap();
    let mut c = rustls::ClientConnection::new(client, vkx_common::tls::host_server_name()).unwrap();
    let mut rounds = 0;
    while c.is_handshaking() || s.is_handshaking() {
        rounds += 1;
        assert!(rounds < 16, "in-memory TLS handshake did not finish");
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    Negotiated {
        group: s.negotiated_key_exchange_group().unwrap().name(),
        suite: s.negotiated_cipher_suite().unwrap().suite(),
    }
}

struct Floor {
    negotiated: Negotiated,
    ecdhe: Duration,
    sign: Duration,
    verify_quote: Duration,
    ring_verify: Duration,
    aead: Duration,
    record_len: usize,
}

impl Floor {
    fn per_handshake(&self) -> Duration {
        self.ecdhe + self.sign + self.verify_quote + self.aead
    }
}

fn measure_floor(node_dir: &Path, pin: [u8; 32]) -> Floor {
    use ring::{aead, agreement, signature};
    let rng = SystemRandom::new();
    let negotiated = negotiate(node_dir, pin);

    // ECDHE: the host's share and the agreement with the guest's.
    let group = match negotiated.group {
        rustls::NamedGroup::X25519 => &agreement::X25519,
        rustls::NamedGroup::secp256r1 => &agreement::ECDH_P256,
        rustls::NamedGroup::secp384r1 => &agreement::ECDH_P384,
        g => panic!("no floor measurement for group {g:?}"),
    };
    let peer = agreement::EphemeralPrivateKey::generate(group, &rng)
        .unwrap()
        .compute_public_key()
        .unwrap();
    let peer = agreement::UnparsedPublicKey::new(group, peer.as_ref().to_vec());
    let ecdhe = mean(|| {
        let mine = agreement::EphemeralPrivateKey::generate(group, &rng).unwrap();
        let share = mine.compute_public_key().unwrap();
        std::hint::black_box(share.as_ref());
        agreement::agree_ephemeral(mine, &peer, |k| {
            std::hint::black_box(k.len());
        })
        .unwrap();
    });

    // The host's CertificateVerify signature, with the node's own key.
    let pk8 = std::fs::read(node_dir.join(vkx_host::node::NODE_KEY_FILE)).unwrap();
    let node_key =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pk8, &rng)
            .expect("the node key is ECDSA P-256");
    let mut to_sign = vec![0x20u8; 64];
    to_sign.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    to_sign.extend_from_slice(&[0x5a; 48]);
    let sign = mean(|| {
        std::hint::black_box(node_key.sign(&rng, &to_sign).unwrap());
    });

    // The quote: the host's whole verifier, and ring's verify alone.
    let tpm = SoftTpm::new(&vkx_e2e::softtpm::Seed::generate().unwrap(), 0);
    let selection = vec![PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: POLICY_PCRS.to_vec(),
    }];
    let nonce = [0x33u8; 32];
    let q = tpm.quote_raw(&selection, &nonce).unwrap();
    let ak = Public::parse(tpm.ak_public()).unwrap();
    let expect = QuoteExpectations {
        ak_parent: AkParent::VKX,
        qualifying_data: &nonce,
        pcr_selection: &selection,
        pcr_values: &q.pcr_values,
    };
    let verify_quote = mean(|| {
        verify_quote(&q.attest, &q.signature, &ak, &expect).unwrap();
    });
    let ak_point = {
        let mut p = vec![0x04];
        p.extend_from_slice(&tpm.ak_public()[24..56]);
        p.extend_from_slice(&tpm.ak_public()[58..90]);
        p
    };
    let mut rs = Vec::with_capacity(64);
    rs.extend_from_slice(&q.signature[6..38]);
    rs.extend_from_slice(&q.signature[40..72]);
    let ak_key = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, ak_point);
    let ring_verify = mean(|| ak_key.verify(&q.attest, &rs).unwrap());

    // One TLS record: the key-release frame with a 32-byte key, plus the
    // inner content type byte.
    let payload = Message::KeyRelease(KeyRelease {
        released: vec![ReleasedKey {
            name: KeyName::new(KEY).unwrap(),
            version: 1,
            material: KeyMaterial::new(vec![0x42; 32]),
        }],
        refused: Vec::new(),
    })
    .encode()
    .unwrap();
    let record_len = payload.len() + vkx_common::wire::FRAME_HEADER_LEN + 1;
    let (alg, key_len) = match negotiated.suite {
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => (&aead::AES_256_GCM, 32),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => (&aead::AES_128_GCM, 16),
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => (&aead::CHACHA20_POLY1305, 32),
        s => panic!("no floor measurement for suite {s:?}"),
    };
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &[0x17; 32][..key_len]).unwrap());
    let mut seq = 0u64;
    let mut record = Vec::with_capacity(record_len + 16);
    let aead = mean(|| {
        seq += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        record.clear();
        record.resize(record_len, 0x61);
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from([0x17, 0x03, 0x03, 0x00, 0x00]),
            &mut record,
        )
        .unwrap();
        std::hint::black_box(&record);
    });
    Floor {
        negotiated,
        ecdhe,
        sign,
        verify_quote,
        ring_verify,
        aead,
        record_len,
    }
}

// ------------------------------------------------------------------ runs

fn hex_pin(pin: &str) -> [u8; 32] {
    hex::decode(pin).unwrap().try_into().unwrap()
}

/// The soft storms: N VMs with soft vTPMs, first all admitted at once,
/// then under the host's default admission control.
struct SoftRuns {
    at_once: StormFigures,
    /// Storm (a) again with the host on one worker thread; `None` with
    /// `--perf`.
    one_worker: Option<StormFigures>,
    /// `None` with `--only-a`.
    default_admission: Option<StormFigures>,
    floor: Floor,
    note: String,
}

fn soft_runs(rt: &tokio::runtime::Runtime, n: usize, ticks: u64, opts: &Options) -> SoftRuns {
    let soft = SoftSite::new(n, "storm");
    let floor = measure_floor(
        Path::new(&soft.site.node.node_dir()),
        hex_pin(soft.site.node.pin()),
    );
    let agents = soft.agents();
    let (site, note) = (&soft.site, soft.note.clone());
    let host = site.start_host("at-once", &format!("[admission]\nmax_handshakes = {n}\n"));
    let recorder = opts.perf.as_deref().map(|out| Perf::attach(host.pid, out));
    // Profiled runs skip the idle window (a minute of idle samples).
    let idle = (opts.perf.is_none() && !opts.no_idle).then_some(IDLE_WINDOW);
    let smaps = opts.smaps.as_deref().map(|dir| {
        std::fs::create_dir_all(dir).unwrap();
        copy_smaps(host.pid, &dir.join("before.smaps"));
        (host.pid, dir.join("held.smaps"))
    });
    let at_once = storm(rt, &agents, host.pid, ticks, true, idle, smaps.as_ref());
    if let Some(r) = recorder {
        r.finish();
    }
    finish_host(host, &at_once);
    // The same storm with the host on one worker thread: what the second
    // core buys (profiled runs skip it).
    let one_worker = opts.perf.is_none().then(|| {
        let host = site.start_host(
            "one-worker",
            &format!("worker_threads = 1\n[admission]\nmax_handshakes = {n}\n"),
        );
        let f = storm(rt, &agents, host.pid, ticks, false, None, None);
        finish_host(host, &f);
        f
    });
    let default_admission = (!opts.only_a).then(|| {
        let host = site.start_host("default", "");
        let f = storm(rt, &agents, host.pid, ticks, true, None, None);
        finish_host(host, &f);
        f
    });
    SoftRuns {
        at_once,
        one_worker,
        default_admission,
        floor,
        note,
    }
}

/// The command line: `[N] [--only-a] [--no-idle] [--perf FILE] [--smaps DIR]`.
struct Options {
    n: usize,
    only_a: bool,
    /// Skip storm (a)'s idle window (iterating on the other figures).
    no_idle: bool,
    perf: Option<std::path::PathBuf>,
    /// Copy the host's /proc/PID/smaps before storm (a) and with its
    /// sessions held into this directory (`before.smaps`, `held.smaps`).
    smaps: Option<std::path::PathBuf>,
}

impl Options {
    fn parse() -> Self {
        let mut o = Self {
            n: DEFAULT_GUESTS,
            only_a: false,
            no_idle: false,
            perf: None,
            smaps: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--only-a" => o.only_a = true,
                "--no-idle" => o.no_idle = true,
                "--perf" => {
                    o.perf = Some(args.next().expect("--perf FILE").into());
                    o.only_a = true;
                }
                "--smaps" => o.smaps = Some(args.next().expect("--smaps DIR").into()),
                n => o.n = n.parse().expect("N (the number of guests) is a number"),
            }
        }
        o
    }
}

/// `perf record` attached to the host for storm (a).
struct Perf {
    child: std::process::Child,
}

/// Sampling frequency of the profile (Hz): about 4,000 samples over
/// storm (a)'s one second of host CPU.
const PERF_FREQUENCY: &str = "4000";
/// Bytes of stack copied per sample for DWARF unwinding (the release
/// build has no frame pointers).
const PERF_STACK: &str = "dwarf,32768";

impl Perf {
    fn attach(pid: u32, out: &Path) -> Self {
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                PERF_FREQUENCY,
                "--call-graph",
                PERF_STACK,
            ])
            .arg("-o")
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run perf (Debian package linux-perf)");
        // perf opens its events asynchronously: give it time to attach.
        std::thread::sleep(Duration::from_millis(500));
        Self { child }
    }

    /// Stops recording (SIGINT, as perf expects) and waits for the file.
    fn finish(mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "could not stop perf");
        let _ = self.child.wait();
    }
}

/// The same storm with real vTPMs: one swtpm per VM, `rounds` storms.
fn real_run(rt: &tokio::runtime::Runtime, m: usize, rounds: usize, ticks: u64) -> StormFigures {
    let node = Node::new();
    let tpms: Vec<Swtpm> = (0..m).map(|_| Swtpm::start()).collect();
    let vm_ids: Vec<String> = (0..m).map(|i| format!("real-{i}")).collect();
    let selection = vec![PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: POLICY_PCRS.to_vec(),
    }];
    let mut vm_pcrs = Vec::with_capacity(m);
    for (tpm, vm) in tpms.iter().zip(&vm_ids) {
        let o = node.provision(tpm, vm, "ecc");
        assert!(
            o.status.success(),
            "provision {vm}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // This vTPM's current PCRs are its reference values.
        let auth =
            vkx_guest::tpm::AkAuth::load(std::path::Path::new(&node.ak_auth_file(vm))).unwrap();
        let ev =
            vkx_guest::tpm::collect_evidence(&tpm.tcti(), &auth, &selection, &[0; 32]).unwrap();
        let mut rules = String::new();
        for (index, digest) in &ev.pcr_values[0].values {
            rules += &format!(
                "[[vm.pcr]]\nbank = \"sha256\"\nindex = {index}\nallowed = [\"{}\"]\n",
                hex::encode(digest)
            );
        }
        vm_pcrs.push(rules);
    }
    let site = Site::new(node, vm_ids, "", &vm_pcrs);
    let agents: Vec<Arc<Agent>> = site
        .sockets
        .iter()
        .zip(&tpms)
        .zip(&site.vm_ids)
        .map(|((socket, tpm), vm)| {
            // Provisioning gave each AK an authValue: the guest needs it
            // to quote (as `vkx-guest` reads it from `ak_auth_file`).
            let config = vkx_guest::config::Config::from_toml(&format!(
                "host_socket = \"{}\"\nhost_key_sha256 = \"{}\"\ntcti = \"{}\"\nak_auth_file = \"{}\"\n",
                socket.display(),
                site.node.pin(),
                tpm.tcti(),
                site.node.ak_auth_file(vm),
            ))
            .unwrap();
            Arc::new(Agent::new(&config).unwrap())
        })
        .collect();
    // Each VM reconnects once per round.
    let host = site.start_host(
        "real",
        &format!("[admission]\npeer_connection_burst = {}\n", rounds + 2),
    );
    let mut figures = storm(rt, &agents, host.pid, ticks, rounds == 1, None, None);
    for round in 1..rounds {
        figures.merge(storm(
            rt,
            &agents,
            host.pid,
            ticks,
            round + 1 == rounds,
            None,
            None,
        ));
    }
    finish_host(host, &figures);
    figures
}

fn main() {
    let opts = Options::parse();
    let n = opts.n;
    assert!(
        (1..=MAX_VMS).contains(&n),
        "N must be 1..={MAX_VMS} (one Unix listener per guest)"
    );
    ensure_fd_limit(2 * n as u64 + FD_HEADROOM);
    let ticks = clock_ticks();
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    // One thread drives every guest (their quotes run on tokio's blocking
    // threads): the load generator takes about one CPU, the host the rest.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let soft = soft_runs(&rt, n, ticks, &opts);
    let real = (!opts.only_a).then(|| real_run(&rt, REAL_VMS, REAL_ROUNDS, ticks));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "vkx connect storm: one vkx-host serve (release), Unix sockets, {cpus} CPUs shared with the load generator"
    );
    let _ = writeln!(
        out,
        "  {n} guests with soft vTPMs (feature insecure-soft-tpm; {}), all started at once",
        soft.note
    );
    let _ = writeln!(
        out,
        "  a) every handshake admitted at once ([admission] max_handshakes = {n}): the host's cost"
    );
    soft.at_once.print(&mut out);
    if let Some(one) = &soft.one_worker {
        let _ = writeln!(
            out,
            "  a1) the same with the host on one worker thread (worker_threads = 1; (a) ran on {cpus}, the default)"
        );
        one.print(&mut out);
        line(
            &mut out,
            "attestations per second, 1 vs cores",
            format!(
                "{:.0}/s with 1 worker, {:.0}/s with {cpus} (wall time to all keyed; the load generator shares the cores)",
                one.rate(),
                soft.at_once.rate()
            ),
        );
    }
    if let Some(b) = &soft.default_admission {
        let _ = writeln!(
            out,
            "  b) the host's default admission control (max_handshakes {DEFAULT_MAX_HANDSHAKES}; busy, retry-after: the place in line, at most {} s, +{DEFAULT_RETRY_JITTER_PERCENT} % jitter, honoured; target: all keyed <= 2 s)",
            DEFAULT_BUSY_RETRY_AFTER_MS / 1000
        );
        b.print(&mut out);
    }
    let f = &soft.floor;
    let _ = writeln!(
        out,
        "  floor: ring primitives of one handshake, host side (this process; best of {FLOOR_BATCHES} batches of {FLOOR_BATCH})"
    );
    let us = |d: Duration| format!("{:>6.1} us", d.as_secs_f64() * 1e6);
    line(
        &mut out,
        &format!("ECDHE {:?}, keygen + agreement", f.negotiated.group),
        us(f.ecdhe),
    );
    line(
        &mut out,
        "TLS signature, ECDSA P-256 sign",
        format!("{} (the node key, a CertificateVerify)", us(f.sign)),
    );
    line(
        &mut out,
        "quote verification, verify_quote",
        format!(
            "{} (ring ECDSA P-256 verify alone: {})",
            us(f.verify_quote),
            us(f.ring_verify).trim_start()
        ),
    );
    line(
        &mut out,
        &format!("AEAD seal, {} B record", f.record_len),
        format!("{} ({:?})", us(f.aead), f.negotiated.suite),
    );
    let per_release = soft.at_once.host_cpu / u32::try_from(n).unwrap();
    line(
        &mut out,
        "floor per handshake",
        format!(
            "{}; host CPU per key release (a) is {:.1}x the floor",
            us(f.per_handshake()),
            per_release.as_secs_f64() / f.per_handshake().as_secs_f64()
        ),
    );
    if let Some(real) = &real {
        let _ = writeln!(
            out,
            "  {REAL_VMS} guests with real vTPMs (one swtpm each, provisioned by vkx-host vtpm provision), all started at once, {REAL_ROUNDS} rounds"
        );
        real.print(&mut out);
    }
    print!("{out}");

    let mut failed = Vec::new();
    for (what, f) in [
        ("soft, all admitted", Some(&soft.at_once)),
        ("soft, all admitted, one worker", soft.one_worker.as_ref()),
        ("soft, default admission", soft.default_admission.as_ref()),
        ("real vTPMs", real.as_ref()),
    ] {
        let Some(f) = f else { continue };
        if !f.all_keyed() {
            failed.push(format!(
                "{what}: {} of {} sessions got {KEY:?}",
                f.released, f.guests
            ));
        }
    }
    if !failed.is_empty() {
        eprintln!("storm: FAILED: {}", failed.join("; "));
        std::process::exit(1);
    }
}
