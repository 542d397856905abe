//! Fleet-scale propagation of the kill switch (`make bench`, issue #12):
//!
//!     cargo run --release -p vkx-e2e --example rollout_propagation \
//!         [-- --hosts N] [--flips F] [--runtimes K] [--source etcd|file|both]
//!         [--node-dirs DIR] [--no-tmpfs-row]
//!
//! N simulated hosts (default 1,000) in this process, each running the
//! host's real rollout code: its own `[rollout]` settings (a node name,
//! the bench's trusted key) through `rollout_service::Settings::new`, its
//! own node directory, `Rollout::restore` and `Rollout::run`, which runs
//! its own source task (`source::run`: with etcd, its own client
//! connection and watch) and its own override-file watcher. A small task
//! per host follows the host's `View` channel as a session would and
//! reports the instant the view shows a new revision.
//!
//! The writer (on the main thread, its own runtime) flips the kill switch
//! of `key-release` F times (default 50) through `vkx_host::source::write`,
//! as `vkx-host rollout push` does: odd flips are signed unkills (the
//! bench's key, trusted by every host), even flips unsigned kills. Each
//! flip is timed from just before `write` (which connects to etcd, then
//! puts) to each host's applied instant; the next flip waits for every
//! host, at most [`FLIP_LIMIT`]; a host that did not apply in time is
//! counted and reported, not hidden.
//!
//! 1. etcd: one single-member etcd on loopback, N client connections and
//!    watches on it.
//! 2. file: the N hosts watch one shared file (as the hosts of one node
//!    would), polled every `FILE_POLL_INTERVAL` (250 ms): the figures are
//!    the poll interval's, by design.
//!
//! Each source runs twice: with the hosts' node directories on disk
//! (`--node-dirs`, default the temporary directory), where each host's
//! accepted document is fsynced before it is applied, as in production,
//! so the N fsyncs per flip queue on one disk; and on tmpfs (`/dev/shm`,
//! rows `etcd/shm`, `file/shm`; `--no-tmpfs-row` to skip), which takes
//! the shared disk out and leaves the sources, admission and the
//! shared CPU.
//!
//! The hosts run on K threads (default 1), each a current-thread tokio
//! runtime as `vkx-host serve` uses; hosts are dealt round-robin. On the
//! 2-core build machine the N hosts share the cores with etcd and the
//! writer, so the per-flip "all applied" time is N hosts' admission and
//! persistence done one after another: an upper bound for a fleet whose
//! hosts each have their own machine.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)] // A measuring tool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::signature::Ed25519KeyPair;
use tokio::sync::{mpsc, watch};
use vkx_e2e::ensure_fd_limit;
use vkx_e2e::etcd::Etcd;
use vkx_host::metrics::Metrics;
use vkx_host::rollout::View;
use vkx_host::rollout::{Document, Feature, TrustedKey, keygen, kill, sign, unkill, unsigned};
use vkx_host::rollout_service::{Rollout, RolloutConfig, Settings};
use vkx_host::source::{
    self, CounterSnapshot, EtcdConfig, FILE_POLL_INTERVAL, SourceConfig, SourceKind,
};

const DEFAULT_HOSTS: usize = 1000;
const DEFAULT_FLIPS: usize = 50;
/// The trusted key's id in every host's settings.
const KEY_ID: &str = "bench";
/// Longest wait for every host to apply the first document.
const STARTUP_LIMIT: Duration = Duration::from_secs(180);
/// Longest wait for every host to apply one flip.
const FLIP_LIMIT: Duration = Duration::from_secs(15);
/// Pause after start-up, so that every watch is established before the
/// first flip (the next flip goes out once every host applied the last).
const SETTLE: Duration = Duration::from_secs(2);
/// Where the extra rows keep their node directories: no disk under the
/// hosts' fsyncs.
const TMPFS: &str = "/dev/shm";
/// Longest wait for the hosts' tasks to end after the stop signal.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Longest a whole phase may flip; past it, the remaining flips are
/// skipped and reported.
const PHASE_LIMIT: Duration = Duration::from_secs(600);
/// Open files per host (its etcd connection, transient reads) and spare.
const FDS_PER_HOST: u64 = 4;
const FD_SPARE: u64 = 1024;

#[derive(Debug, Clone)]
struct Args {
    hosts: usize,
    flips: usize,
    runtimes: usize,
    etcd: bool,
    file: bool,
    node_dirs: Option<PathBuf>,
    tmpfs_row: bool,
}

fn args() -> Args {
    let mut a = Args {
        hosts: DEFAULT_HOSTS,
        flips: DEFAULT_FLIPS,
        runtimes: 1,
        etcd: true,
        file: true,
        node_dirs: None,
        tmpfs_row: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--hosts" => a.hosts = value().parse().expect("--hosts N"),
            "--flips" => a.flips = value().parse().expect("--flips F"),
            "--runtimes" => a.runtimes = value().parse().expect("--runtimes K"),
            "--node-dirs" => a.node_dirs = Some(PathBuf::from(value())),
            "--no-tmpfs-row" => a.tmpfs_row = false,
            "--source" => match value().as_str() {
                "etcd" => a.file = false,
                "file" => a.etcd = false,
                "both" => {}
                s => panic!("--source etcd|file|both, not {s:?}"),
            },
            f => panic!(
                "unknown argument {f:?} (--hosts, --flips, --runtimes, --source, --node-dirs, \
                 --no-tmpfs-row)"
            ),
        }
    }
    assert!(a.hosts > 0 && a.runtimes > 0 && a.flips > 0);
    a
}

/// The writer's documents: the current one and the signing key.
struct Writer {
    pair: Ed25519KeyPair,
    current: Option<Document>,
}

impl Writer {
    /// The next envelope: a signed unkill if `key-release` is killed, an
    /// unsigned kill otherwise; and its revision.
    fn next(&mut self) -> (Vec<u8>, u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let killed = self
            .current
            .as_ref()
            .and_then(|d| d.feature(Feature::KeyRelease))
            .is_some_and(|e| e.killed());
        let (doc, bytes) = if killed {
            let d = unkill(self.current.as_ref(), Feature::KeyRelease, now).unwrap();
            let b = sign(&d, &self.pair, KEY_ID).unwrap();
            (d, b)
        } else {
            let d = kill(self.current.as_ref(), Feature::KeyRelease, now).unwrap();
            let b = unsigned(&d);
            (d, b)
        };
        let revision = doc.revision();
        self.current = Some(doc);
        (bytes, revision)
    }
}

/// A host's applied instant of a revision.
type Applied = (usize, u64, Instant);

/// What the host threads hand back at the end.
struct HostsOutcome {
    counters: CounterSnapshot,
    unfinished: usize,
}

/// Starts the N hosts on K threads; returns the stop switch, the applied
/// reports and the threads.
fn start_hosts(
    a: &Args,
    config: &RolloutConfig,
    base: &Path,
) -> (
    watch::Sender<bool>,
    mpsc::UnboundedReceiver<Applied>,
    Vec<std::thread::JoinHandle<HostsOutcome>>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut threads = Vec::new();
    for k in 0..a.runtimes {
        let ids: Vec<usize> = (k..a.hosts).step_by(a.runtimes).collect();
        let (config, base, tx, stop) = (
            config.clone(),
            base.to_path_buf(),
            tx.clone(),
            stop_rx.clone(),
        );
        let t = std::thread::Builder::new()
            .name(format!("hosts-{k}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(run_hosts(ids, config, base, tx, stop))
            })
            .unwrap();
        threads.push(t);
    }
    (stop_tx, rx, threads)
}

/// One runtime's hosts, until `stop`.
async fn run_hosts(
    ids: Vec<usize>,
    config: RolloutConfig,
    base: PathBuf,
    tx: mpsc::UnboundedSender<Applied>,
    mut stop: watch::Receiver<bool>,
) -> HostsOutcome {
    let mut tasks = tokio::task::JoinSet::new();
    let mut counters = Vec::new();
    for i in ids {
        let node = format!("node-{i:04}");
        let c = RolloutConfig {
            node_name: Some(node.clone()),
            ..config.clone()
        };
        let settings = Settings::new(Some(&c), &base.join(&node)).unwrap();
        let (rollout, view) = Rollout::restore(settings, Arc::new(Metrics::default())).unwrap();
        counters.push(rollout.counters());
        tasks.spawn(rollout.run(stop.clone()));
        tasks.spawn(observe(i, view, tx.clone(), stop.clone()));
    }
    drop(tx);
    let _ = stop.wait_for(|s| *s).await;
    let deadline = tokio::time::Instant::now() + STOP_LIMIT;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {}
    let unfinished = tasks.len();
    tasks.abort_all();
    let mut sum = CounterSnapshot::default();
    for c in counters {
        let s = c.snapshot();
        sum.errors += s.errors;
        sum.reconnects += s.reconnects;
        sum.watch_restarts += s.watch_restarts;
        sum.compaction_rereads += s.compaction_rereads;
        sum.changes += s.changes;
    }
    HostsOutcome {
        counters: sum,
        unfinished,
    }
}

/// Follows one host's view as a session would; reports each revision.
async fn observe(
    i: usize,
    mut view: watch::Receiver<Arc<View>>,
    tx: mpsc::UnboundedSender<Applied>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = view.borrow_and_update().revision();
    loop {
        tokio::select! {
            r = view.changed() => {
                if r.is_err() {
                    return;
                }
                let revision = view.borrow_and_update().revision();
                if revision != last {
                    last = revision;
                    let _ = tx.send((i, revision, Instant::now()));
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One phase's figures.
#[derive(Debug, Default)]
struct Figures {
    name: String,
    node_dirs: PathBuf,
    /// This process's CPU over [`SETTLE`] with the hosts idle.
    idle_cpu: Duration,
    /// All-applied times of the signed unkills and the unsigned kills.
    all_signed: Vec<Duration>,
    all_unsigned: Vec<Duration>,
    startup: Duration,
    per_host: Vec<Duration>,
    all_applied: Vec<Duration>,
    first_applied: Vec<Duration>,
    write: Vec<Duration>,
    flips: usize,
    /// (flip, hosts that did not apply within FLIP_LIMIT).
    missed: Vec<(usize, usize)>,
    /// The hosts that missed at least one flip.
    missed_by: std::collections::BTreeSet<usize>,
    skipped: usize,
    counters: CounterSnapshot,
    unfinished: usize,
    process_cpu: Duration,
    etcd_cpu: Option<Duration>,
    rss_hosts_kib: u64,
    /// VmRSS before the hosts of this row started.
    rss_before_kib: u64,
}

/// Waits until every host shows `revision` (or later), at most `limit`
/// after `t0`; returns each host's delay (`None`: not applied).
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Applied>,
    n: usize,
    revision: u64,
    t0: Instant,
    limit: Duration,
) -> Vec<Option<Duration>> {
    let mut applied = vec![None; n];
    let mut left = n;
    let deadline = tokio::time::Instant::from_std(t0 + limit);
    while left > 0 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((i, r, at))) => {
                if r >= revision && applied[i].is_none() {
                    applied[i] = Some(at.saturating_duration_since(t0));
                    left -= 1;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    applied
}

fn run_phase(
    name: &str,
    node_dirs: &Path,
    a: &Args,
    writer: &mut Writer,
    source: SourceConfig,
    trusted: &TrustedKey,
    etcd_pid: Option<u32>,
) -> Figures {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = tempfile::tempdir_in(node_dirs).unwrap();
    // The first document is there before any host starts: a host's first
    // read (etcd get, or file look) applies it.
    let (first, rev) = writer.next();
    rt.block_on(source::write(&source, &first)).unwrap();
    let config = RolloutConfig {
        source: source.source,
        file: source.file.clone(),
        etcd: source.etcd.clone(),
        trusted_key: vec![trusted.clone()],
        ..RolloutConfig::default()
    };
    let mut f = Figures {
        name: name.to_owned(),
        node_dirs: node_dirs.to_path_buf(),
        ..Figures::default()
    };
    f.rss_before_kib = status_kib("VmRSS");
    let t_start = Instant::now();
    let (stop, mut rx, threads) = start_hosts(a, &config, base.path());
    let applied = rt.block_on(collect(&mut rx, a.hosts, rev, t_start, STARTUP_LIMIT));
    f.startup = t_start.elapsed();
    let missing = applied.iter().filter(|x| x.is_none()).count();
    assert_eq!(
        missing, 0,
        "{name}: {missing} of {} hosts did not apply the first document within {STARTUP_LIMIT:?}",
        a.hosts
    );
    let idle0 = cpu_time("self");
    std::thread::sleep(SETTLE);
    f.idle_cpu = cpu_time("self") - idle0;
    f.rss_hosts_kib = status_kib("VmRSS");
    let cpu0 = cpu_time("self");
    let etcd0 = etcd_pid.map(|p| cpu_time(&p.to_string()));
    let phase_end = Instant::now() + PHASE_LIMIT;
    rt.block_on(async {
        for flip in 1..=a.flips {
            if Instant::now() > phase_end {
                f.skipped = a.flips - flip + 1;
                break;
            }
            // A random instant within one poll interval: the put is not in
            // step with the file source's polls (nor etcd's batching).
            tokio::time::sleep(jitter(FILE_POLL_INTERVAL)).await;
            let (bytes, rev) = writer.next();
            let t0 = Instant::now();
            source::write(&source, &bytes).await.unwrap();
            f.write.push(t0.elapsed());
            let applied = collect(&mut rx, a.hosts, rev, t0, FLIP_LIMIT).await;
            let got: Vec<Duration> = applied.iter().flatten().copied().collect();
            if got.len() < a.hosts {
                f.missed.push((flip, a.hosts - got.len()));
                f.missed_by
                    .extend((0..a.hosts).filter(|&i| applied[i].is_none()));
            }
            if let (Some(max), Some(min)) = (got.iter().max(), got.iter().min()) {
                if got.len() == a.hosts {
                    f.all_applied.push(*max);
                    // Odd flips unkill (signed), even flips kill.
                    if flip % 2 == 1 {
                        f.all_signed.push(*max);
                    } else {
                        f.all_unsigned.push(*max);
                    }
                }
                f.first_applied.push(*min);
            }
            f.per_host.extend(got);
            f.flips += 1;
        }
    });
    f.process_cpu = cpu_time("self") - cpu0;
    f.etcd_cpu = etcd_pid
        .zip(etcd0)
        .map(|(p, c0)| cpu_time(&p.to_string()) - c0);
    stop.send_replace(true);
    for t in threads {
        let o = t.join().unwrap();
        f.counters.errors += o.counters.errors;
        f.counters.reconnects += o.counters.reconnects;
        f.counters.watch_restarts += o.counters.watch_restarts;
        f.counters.compaction_rereads += o.counters.compaction_rereads;
        f.counters.changes += o.counters.changes;
        f.unfinished += o.unfinished;
    }
    f
}

/// A uniformly random duration below `max`.
fn jitter(max: Duration) -> Duration {
    let mut r = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r).unwrap();
    let nanos = u64::from_le_bytes(r) % max.as_nanos().max(1) as u64;
    Duration::from_nanos(nanos)
}

/// The soft limit of open files (after [`ensure_fd_limit`]).
fn fd_soft_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// User+system CPU time of `/proc/<pid>/stat` (`pid` may be "self").
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = stat[close + 2..].split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The etcd child of this process serving `data_dir` (read from /proc;
/// the helper does not expose its pid).
fn etcd_pid(data_dir: &Path) -> Option<u32> {
    let want = format!("--data-dir={}", data_dir.display());
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let has = cmd.split(|b| *b == 0).any(|a| a == want.as_bytes());
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid = stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.to_owned();
        (has && ppid == me).then_some(pid)
    })
}

fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .map(|l| l.replace("etcd Version:", "etcd"))
        .unwrap_or_else(|| "etcd ?".into())
}

/// Nearest-rank percentile of a sorted slice, in ms.
fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    ms(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn row(f: &mut Figures) {
    for v in [
        &mut f.per_host,
        &mut f.all_applied,
        &mut f.first_applied,
        &mut f.write,
        &mut f.all_signed,
        &mut f.all_unsigned,
    ] {
        v.sort();
    }
    let missed: usize = f.missed.iter().map(|m| m.1).sum();
    println!(
        "  {:<8} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7} | {:>6} | {:>5}/{:<3} | {:>6} {:>6}",
        f.name,
        pct(&f.per_host, 0.5),
        pct(&f.per_host, 0.99),
        pct(&f.per_host, 1.0),
        pct(&f.all_applied, 0.5),
        pct(&f.all_applied, 0.99),
        pct(&f.all_applied, 1.0),
        pct(&f.first_applied, 0.5),
        pct(&f.write, 0.5),
        f.all_applied.len(),
        f.flips,
        missed,
        f.missed_by.len(),
    );
}

fn details(f: &Figures, a: &Args) {
    let c = &f.counters;
    let flips = f.flips.max(1) as u32;
    let etcd = f.etcd_cpu.map_or(String::new(), |c| {
        format!(
            ", etcd CPU {} ms ({} ms/flip)",
            c.as_millis(),
            (c / flips).as_millis()
        )
    });
    println!(
        "  {}: node dirs in {}; start-up (N hosts restored, connected, first document \
         applied) {:.2} s; all applied p50: signed unkill {} ms, unsigned kill {} ms; \
         this process's CPU idle {:.0} ms/s, over the flips {} ms ({} ms/flip){etcd}; \
         RSS with the hosts {} MiB, +{} MiB over the row's start ({:.0} KiB/host); sources: {} errors, {} reconnects, \
         {} watch restarts; {} host tasks did not stop in time",
        f.name,
        f.node_dirs.display(),
        f.startup.as_secs_f64(),
        pct(&f.all_signed, 0.5),
        pct(&f.all_unsigned, 0.5),
        f.idle_cpu.as_secs_f64() * 1e3 / SETTLE.as_secs_f64(),
        f.process_cpu.as_millis(),
        (f.process_cpu / flips).as_millis(),
        f.rss_hosts_kib / 1024,
        f.rss_hosts_kib.saturating_sub(f.rss_before_kib) / 1024,
        f.rss_hosts_kib.saturating_sub(f.rss_before_kib) as f64 / a.hosts as f64,
        c.errors,
        c.reconnects,
        c.watch_restarts,
        f.unfinished,
    );
    for (flip, n) in &f.missed {
        println!(
            "  {}: flip {flip}: {n} hosts had not applied after {FLIP_LIMIT:?}",
            f.name
        );
    }
    if f.skipped > 0 {
        println!(
            "  {}: {} flips skipped (phase limit {PHASE_LIMIT:?})",
            f.name, f.skipped
        );
    }
}

fn main() {
    let a = args();
    let t_run = Instant::now();
    // etcd, started later, inherits the limit.
    ensure_fd_limit(a.hosts as u64 * FDS_PER_HOST + FD_SPARE);
    let fds = fd_soft_limit();
    let rss0 = status_kib("VmRSS");
    let (pkcs8, public_key) = keygen().unwrap();
    let trusted = TrustedKey {
        id: KEY_ID.into(),
        public_key,
    };
    let disk = a.node_dirs.clone().unwrap_or_else(std::env::temp_dir);
    let mut results = Vec::new();
    if a.etcd {
        let mut dirs = vec![("etcd", disk.clone())];
        if a.tmpfs_row && Path::new(TMPFS).is_dir() {
            dirs.push(("etcd/shm", PathBuf::from(TMPFS)));
        }
        for (name, node_dirs) in dirs {
            // A fresh etcd per row: one row's history does not load the next.
            let mut etcd = Etcd::start();
            let pid = etcd_pid(&etcd.data_dir());
            let mut writer = Writer {
                pair: Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap(),
                current: None,
            };
            let config = SourceConfig::new(
                SourceKind::Etcd,
                source::default_file(),
                EtcdConfig {
                    endpoints: vec![etcd.endpoint()],
                    ..EtcdConfig::default()
                },
            );
            let f = run_phase(name, &node_dirs, &a, &mut writer, config, &trusted, pid);
            results.push(f);
            etcd.stop();
        }
    }
    if a.file {
        let mut dirs = vec![("file", disk.clone())];
        if a.tmpfs_row && Path::new(TMPFS).is_dir() {
            dirs.push(("file/shm", PathBuf::from(TMPFS)));
        }
        for (name, node_dirs) in dirs {
            // A fresh document file per row, on disk either way: only the
            // hosts' node directories move to tmpfs.
            let dir = tempfile::tempdir().unwrap();
            let mut writer = Writer {
                pair: Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap(),
                current: None,
            };
            let config = SourceConfig::new(
                SourceKind::File,
                dir.path().join("rollout.json"),
                EtcdConfig::default(),
            );
            let f = run_phase(name, &node_dirs, &a, &mut writer, config, &trusted, None);
            results.push(f);
        }
    }
    println!(
        "rollout propagation: put -> applied (the host's View shows the new revision) on every simulated host"
    );
    println!(
        "  N = {} hosts, {} flips each (odd: signed unkill, even: unsigned kill of key-release), \
         {} current-thread runtime(s) for the hosts, the writer on its own thread; \
         {} on loopback (single member, a fresh one per row); fd soft limit {fds}; \
         file source polled every {} ms; {} cores",
        a.hosts,
        a.flips,
        a.runtimes,
        etcd_version(),
        FILE_POLL_INTERVAL.as_millis(),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!(
        "  (ms)        per-host latency    |   all hosts applied    |  first  |  write |  flips    |   missed"
    );
    println!(
        "  source      p50     p99     max |     p50     p99     max |     p50 |    p50 | all/run   | h-flips  hosts"
    );
    for f in &mut results {
        row(f);
    }
    println!(
        "  per-host: every host's put -> applied over all flips; all hosts applied: per flip, the \
         last host's; first: per flip, the first host's; write: the writer's `source::write` \
         (etcd: connect and put; file: fsynced replace); missed: host-flips not applied within \
         {FLIP_LIMIT:?}, and the distinct hosts"
    );
    for f in &results {
        details(f, &a);
    }
    println!(
        "  process RSS at the start {} MiB, at the end {} MiB (peak {} MiB); run time {:.0} s",
        rss0 / 1024,
        status_kib("VmRSS") / 1024,
        status_kib("VmHWM") / 1024,
        t_run.elapsed().as_secs_f64()
    );
}
