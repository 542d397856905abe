//! The agents' first figures, end to end on this machine (`make bench`):
//!
//!     cargo run --release -p vkx-e2e --example agent_bench [-- SESSIONS]
//!
//! Starts swtpm as a VM's vTPM, provisions it, starts the real
//! `vkx-host serve` (release build) and drives guests in this process
//! through the guest agent's own driver (`vkx_guest::agent`), over the
//! plain Unix transport:
//!
//! 1. Handshake latency, guest side: sequential attested sessions
//!    (connect, TLS 1.3, hello/challenge, TPM quote on swtpm, host
//!    verification, attestation-result, goodbye); median, p90, min.
//! 2. Host CPU per handshake: the host process's user+system CPU time
//!    (from /proc) over those sessions, divided by their number; it
//!    includes TLS, the session, quote verification and the registry
//!    write that records the quote.
//! 3. Sessions held: SESSIONS (default 1,000) attested sessions opened one
//!    after another (one swtpm serves one quote at a time) and then held
//!    at once; the host's RSS before and with them.
//!
//! All the sessions here are one VM's (one vTPM): a single swtpm cannot
//! stand in for a thousand VMs' vTPMs. The connect storm with a thousand
//! VM identities is a separate figure.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)] // A measuring tool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_e2e::agents::Deployment;
use vkx_guest::agent::{Agent, Handler, Reaction};
use vkx_guest::config::Config;

const LATENCY_RUNS: usize = 100;
const DEFAULT_SESSIONS: usize = 1000;

/// Ends the session once attested (like `vkx-guest once`).
struct Finish;

impl Handler for Finish {
    fn on_event(&mut self, ev: GuestEvent, _: &mut Guest, _: Instant) -> Reaction {
        Reaction {
            finish: matches!(ev, GuestEvent::Attested { .. }),
            ..Reaction::default()
        }
    }
}

/// Holds the session; reports the attestation and frees the opening slot.
struct Hold {
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    attested: mpsc::UnboundedSender<()>,
}

impl Handler for Hold {
    fn on_event(&mut self, ev: GuestEvent, _: &mut Guest, _: Instant) -> Reaction {
        if let GuestEvent::Attested { .. } = ev {
            self.slot = None;
            let _ = self.attested.send(());
        }
        Reaction::default()
    }
}

/// User+system CPU time of `pid` (from /proc/PID/stat, clock ticks of
/// 10 ms on Linux).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let sessions: usize = std::env::args().nth(1).map_or(DEFAULT_SESSIONS, |s| {
        s.parse().expect("SESSIONS is a number")
    });
    // All sessions are one VM's here, so its per-peer connection budget
    // is opened wide: the figures are the host's cost, not its admission
    // control (the storm measures that).
    let d = Deployment::new(
        "vm-bench",
        "max_connections = 4096\n[admission]\npeer_connection_burst = 10000\n\
         peer_connection_refill_ms = 1\nmax_handshakes = 4096\nmax_open_per_peer = 8192",
    );
    let pin = d.node.pin().to_owned();
    let cfg = d.guest_config("guest.toml", &d.socket(), &pin, "");
    let config = Config::load(&cfg).unwrap();
    let host = d.start_host("host.log");
    let pid = host.pid();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let agent = Arc::new(Agent::new(&config).unwrap());

    // 1 and 2: sequential handshakes.
    let (_keep, stop) = watch::channel(false);
    let cpu0 = cpu_time(pid);
    let mut ms: Vec<f64> = Vec::with_capacity(LATENCY_RUNS);
    rt.block_on(async {
        for _ in 0..LATENCY_RUNS {
            let mut stop = stop.clone();
            let t = Instant::now();
            let a = agent.attempt(&mut Finish, &mut stop).await;
            assert!(a.established, "{a:?}\n{}", host.log());
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    });
    let cpu = cpu_time(pid) - cpu0;
    ms.sort_by(f64::total_cmp);
    println!("vkx agent figures (host: vkx-host serve, release; guest vTPM: swtpm, ECC P-256 AK)");
    println!(
        "  handshake latency, guest side ({LATENCY_RUNS} sequential attested sessions): \
         median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        ms[0]
    );
    println!(
        "  host CPU per handshake: {:.0} us (user+system over {LATENCY_RUNS} handshakes; 10 ms clock ticks)",
        cpu.as_secs_f64() * 1e6 / LATENCY_RUNS as f64
    );

    // 3: sessions held.
    let rss_idle = rss_kib(pid);
    let (stop_tx, stop_rx) = watch::channel(false);
    let opening = Arc::new(Semaphore::new(1));
    let (att_tx, mut att_rx) = mpsc::unbounded_channel();
    let t = Instant::now();
    let held = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..sessions {
            let (agent, opening, att_tx) = (agent.clone(), opening.clone(), att_tx.clone());
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let slot = opening.acquire_owned().await.unwrap();
                let mut h = Hold {
                    slot: Some(slot),
                    attested: att_tx,
                };
                agent.attempt(&mut h, &mut stop).await
            });
        }
        let mut held = 0;
        while held < sessions {
            match tokio::time::timeout(Duration::from_secs(30), att_rx.recv()).await {
                Ok(Some(())) => held += 1,
                _ => break,
            }
        }
        let open_for = t.elapsed();
        let rss_held = rss_kib(pid);
        let _ = stop_tx.send(true);
        let mut orderly = 0;
        while let Some(r) = tasks.join_next().await {
            if r.map(|a| a.established).unwrap_or(false) {
                orderly += 1;
            }
        }
        (held, open_for, rss_held, orderly)
    });
    let (held, open_for, rss_held, orderly) = held;
    println!(
        "  sessions held at once: {held} of {sessions} attested in {:.1} s (opened one at a time); \
         {orderly} ended with goodbye",
        open_for.as_secs_f64()
    );
    println!(
        "  host RSS: {:.1} MiB idle, {:.1} MiB with {held} sessions held: {:.1} KiB per session",
        rss_idle as f64 / 1024.0,
        rss_held as f64 / 1024.0,
        (rss_held.saturating_sub(rss_idle)) as f64 / held.max(1) as f64
    );
    assert!(host.stop().success());
}
