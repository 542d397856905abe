//! The fault-injection suite, its virtual-time half (issue #6, item 5):
//! cases a and b drive the guest daemon's real decisions without
//! sleeping. Each case injects one fault, asserts the bound vkx promises
//! for it, prints its measured figure, and writes one row (case, title,
//! figure, bound, pass, run) as a JSON line to `target/chaos/<case>.json`.
//! `make chaos` runs the suite full size and prints the table
//! (`examples/chaos_report.rs`); `make test` runs it at reduced size.
//!
//! | case | fault | what runs |
//! |---|---|---|
//! | a | the host is unreachable for 1 h | the daemon's real decisions ([`Supervisor`]) in virtual time; the failure each attempt ends in comes from the real [`Agent`] connecting to a socket nobody serves; every line the daemon would write goes through the real limiter ([`CallSite`], one per call site) |
//! | b | the host answers `unknown-message` or `unsupported-version` | the same, with each attempt's outcome produced by the real guest and host sessions exchanging real frames; the host's lines go through its call site's limiter keyed by the peer |
//!
//! The rest of the suite: e and f (real processes) in `tests/chaos_ef.rs`,
//! c and d in `tests/chaos_cd.rs` (c with `--features insecure-soft-tpm`),
//! g in `tests/chaos_g.rs`.
//!
//! Sizes: `VKX_CHAOS_FULL=1` runs the full size (many seeds, long virtual
//! horizons); without it each case runs a smaller version so `make test`
//! stays fast. The bounds are the same.
//!
//! A row file holds one JSON object on one line:
//! `{"case":"a","title":"...","figure":"...","bound":"...","pass":true,"run":"full"}`.
//! A test that panics before it measured writes its row with `pass:
//! false`, so a failed run never leaves a stale passing row behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)] // Each case prints its figure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vkx_common::errors::ErrorCode;
use vkx_common::ratelimit::{Admit, CallSite};
use vkx_common::retry::{Failure, RetryConfig};
use vkx_common::session::CloseReason;
use vkx_common::session::guest::Guest;
use vkx_common::testing::pair::Pair;
use vkx_common::wire::{FeatureState, PROTOCOL_VERSION_1, VersionRange};
use vkx_e2e::chaos::{Row, size};
use vkx_guest::agent::{Agent, Attempt, Handler, Reaction};
use vkx_guest::supervisor::{LogLine, LogSite, Start, Supervisor};

const HOUR: Duration = Duration::from_secs(3600);
/// Guard against a simulation that stops advancing: far above the steps
/// any horizon here needs (one per attempt or wake).
const MAX_SIM_STEPS: usize = 1_000_000;

// ---------------------------------------------------------------------------
// Virtual time: the daemon's decisions, driven without sleeping.

/// What a simulated run did, as offsets from its start.
#[derive(Debug, Default)]
struct Trace {
    /// Start of every attempt.
    attempts: Vec<Duration>,
    /// Every line the limiters let through, with its call site.
    written: Vec<(Duration, LogSite)>,
    /// Lines the limiters refused.
    suppressed: u64,
}

/// Drives a [`Supervisor`] over `horizon` of virtual time as
/// `vkx_guest::daemon::run` drives it: wait until it allows the next
/// attempt, start it, let it last `attempt_time`, report `outcome`, log
/// the line it returns through that call site's limiter (one
/// [`CallSite`] per [`LogSite`], as the daemon has one macro invocation per
/// site; no peer: the guest's lines name none).
fn simulate(
    config: RetryConfig,
    seed: u64,
    horizon: Duration,
    attempt_time: Duration,
    outcome: &Attempt,
) -> Trace {
    let t0 = Instant::now();
    let end = t0 + horizon;
    let mut supervisor = Supervisor::new(config, seed);
    let sites: BTreeMap<LogSite, CallSite> =
        LogSite::ALL.iter().map(|&s| (s, CallSite::new())).collect();
    let mut trace = Trace::default();
    let log = |line: &LogLine, now: Instant, trace: &mut Trace| match sites[&line.site].admit(now) {
        Admit::Write { .. } => trace.written.push((now - t0, line.site)),
        Admit::Drop => trace.suppressed += 1,
    };
    let mut now = t0;
    for _ in 0..MAX_SIM_STEPS {
        if let Some(wait) = supervisor.next_wake(now) {
            now = wait.until;
        }
        if now >= end {
            return trace;
        }
        match supervisor.start_attempt(now) {
            Start::Go => {}
            Start::NotYet(at) => {
                now = at;
                continue;
            }
            Start::BudgetSpent(line) => {
                log(&line, now, &mut trace);
                continue;
            }
        }
        trace.attempts.push(now - t0);
        now += attempt_time;
        let ended = supervisor.attempt_ended(&copy(outcome), now);
        log(&ended.log, now, &mut trace);
    }
    panic!("the simulation did not reach its horizon in {MAX_SIM_STEPS} steps");
}

fn copy(a: &Attempt) -> Attempt {
    Attempt {
        established: a.established,
        close: a.close.clone(),
        detail: a.detail.clone(),
    }
}

/// The most of `times` (sorted) in any half-open window of `window`.
fn max_in_window(times: &[Duration], window: Duration) -> usize {
    let mut lo = 0;
    let mut best = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// A handler for attempts that never get as far as a session.
struct NoSession;

impl Handler for NoSession {
    fn on_event(
        &mut self,
        _: vkx_common::session::guest::GuestEvent,
        _: &mut Guest,
        _: Instant,
    ) -> Reaction {
        Reaction::default()
    }
}

// ---------------------------------------------------------------------------
// a. The host unreachable for an hour.

/// Issue #6: at most this many attempts while the host is unreachable
/// for 1 h (PROTOCOL.md §13.9 promises 32).
const A_MAX_ATTEMPTS: usize = 45;
/// Issue #6: at most this many log lines in that hour.
const A_MAX_LINES: usize = 60;
/// How long a refused connect to a local socket takes, in virtual time:
/// short, so the policy alone paces the attempts.
const REFUSED_CONNECT: Duration = Duration::from_millis(1);

/// The outcome of one real attempt against a host nobody serves: the
/// real agent connects to a Unix socket path with no listener.
fn unreachable_attempt() -> Attempt {
    let dir = tempfile::tempdir().unwrap();
    let config = vkx_guest::config::Config::from_toml(&format!(
        "host_socket = \"{}\"\nhost_key_sha256 = \"{}\"\ntcti = \"device:/nonexistent\"\nrun_dir = \"{}\"\n",
        dir.path().join("no-host.sock").display(),
        "00".repeat(32),
        dir.path().display(),
    ))
    .unwrap();
    let agent = Agent::new(&config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_keep, mut stop) = tokio::sync::watch::channel(false);
    rt.block_on(agent.attempt(&mut NoSession, &mut stop))
}

/// a. The host is unreachable for 1 hour (virtual time): the guest daemon
/// makes at most 45 attempts and writes at most 60 log lines.
///
/// Every attempt fails as the real agent's does against a socket with no
/// listener (a transport failure, retried with backoff); the
/// [`Supervisor`] (the daemon's decision code) paces the attempts and
/// says what to log; each line goes through its call site's real limiter.
/// The figure is the worst over many jitter seeds. Counted: the lines of
/// the retry loop (the one "running" line at start is outside it).
#[test]
fn a_host_unreachable_for_an_hour() {
    let row = Row::start(
        "a",
        "host unreachable for 1 h (virtual time)",
        format!("<= {A_MAX_ATTEMPTS} attempts, <= {A_MAX_LINES} log lines in 1 h"),
    );
    let outcome = unreachable_attempt();
    assert_eq!(
        outcome.failure(),
        Some(Failure::Transport),
        "{}",
        outcome.detail
    );
    let config = RetryConfig::default();
    let seeds: u64 = size(100_000, 200);
    let (mut worst_attempts, mut worst_lines, mut suppressed) = (0, 0, 0);
    let mut total_attempts = 0;
    for seed in 0..seeds {
        let t = simulate(config, seed, HOUR, REFUSED_CONNECT, &outcome);
        worst_attempts = worst_attempts.max(t.attempts.len());
        worst_lines = worst_lines.max(t.written.len());
        suppressed += t.suppressed;
        total_attempts += t.attempts.len();
    }
    let mean = total_attempts as f64 / seeds as f64;
    let figure = format!(
        "worst of {seeds} seeds: {worst_attempts} attempts, {worst_lines} lines written \
         ({suppressed} suppressed); mean {mean:.1} attempts"
    );
    let pass = worst_attempts <= A_MAX_ATTEMPTS
        && worst_lines <= A_MAX_LINES
        && worst_attempts as u64 <= config.max_attempts_per_window();
    row.finish(&figure, pass);
    assert!(worst_attempts <= A_MAX_ATTEMPTS, "{figure}");
    assert!(worst_lines <= A_MAX_LINES, "{figure}");
    // The protocol's own, tighter bound (§13.9: 30 + 2 re-probes).
    assert!(
        worst_attempts as u64 <= config.max_attempts_per_window(),
        "{figure}"
    );
    // It really retried: the backoff, not a stall, is what bounds it.
    assert!(mean >= 10.0, "{figure}");
}

// ---------------------------------------------------------------------------
// b. The host answers unknown-message or unsupported-version.

/// Issue #6: log lines per hour on each side while every attempt is
/// refused permanently.
const B_MAX_LINES_PER_HOUR: usize = 2;
/// How long an attempt refused at `hello` takes, in virtual time.
const REFUSED_HELLO: Duration = Duration::from_millis(20);
const B_VM: &str = "vm-b";

/// One connection between the real guest and host sessions, through the
/// in-memory [`Pair`]: the guest's first payload (its `hello`, or
/// `replace_hello`) goes to the host, and frames flow until both have
/// closed. Returns how each side's session closed.
fn refused_exchange(
    guest_versions: VersionRange,
    replace_hello: Option<Vec<u8>>,
) -> (CloseReason, CloseReason) {
    let mut p = Pair::new(
        (guest_versions.min, guest_versions.max),
        Some(B_VM),
        FeatureState::Enabled,
    );
    if let Some(hello) = replace_hello {
        p.to_host.clear();
        p.to_host.push_back(hello);
    }
    p.run();
    (
        p.guest_closed.expect("the guest closed"),
        p.host_closed.expect("the host closed"),
    )
}

/// b. The host answers `unknown-message` or `unsupported-version`: no
/// automatic retry before the re-probe interval, and at most 2 log lines
/// per hour on each side.
///
/// The outcome of every attempt is what the real sessions produce: a
/// guest whose first message has a type the host does not know (type 99:
/// the incident's "endpoint the other did not know") and a guest that
/// speaks only a version the host does not. The guest side is the
/// [`Supervisor`] in virtual time with its limiters; the host side is the
/// host's log call site for a session that closed failed (`vkx-host
/// serve` logs "session closed" with the reason, rate-limited per peer),
/// one line per refused attempt, through a limiter keyed by the VM.
#[test]
fn b_host_answers_unknown_message_or_unsupported_version() {
    let row = Row::start(
        "b",
        "host answers unknown-message / unsupported-version",
        format!(
            "0 retries before the re-probe interval; <= {B_MAX_LINES_PER_HOUR} log lines per hour per side"
        ),
    );
    let v1 = VersionRange {
        min: PROTOCOL_VERSION_1,
        max: PROTOCOL_VERSION_1,
    };
    // [99, {}]: a message type version 1 does not define.
    let unknown_type = vec![0x82, 0x18, 0x63, 0xa0];
    let variants = [
        (
            "unknown-message",
            refused_exchange(v1, Some(unknown_type)),
            ErrorCode::UnknownMessage,
        ),
        (
            "unsupported-version",
            refused_exchange(VersionRange { min: 2, max: 2 }, None),
            ErrorCode::UnsupportedVersion,
        ),
    ];
    let config = RetryConfig::default();
    let seeds: u64 = size(2_000, 20);
    let horizon = HOUR * size(48, 6);
    let mut early_retries = 0;
    let mut min_gap = Duration::MAX;
    let (mut guest_max, mut host_max) = (0, 0);
    let (mut attempts, mut suppressed) = (0, 0);
    for (name, (guest_close, host_close), code) in &variants {
        assert_eq!(
            *guest_close,
            CloseReason::Failed(Failure::Code {
                code: *code,
                retry_after: None
            }),
            "{name}"
        );
        // The host logs a session that closed failed.
        assert!(
            matches!(host_close, CloseReason::Failed(_)),
            "{name}: {host_close:?}"
        );
        let outcome = Attempt {
            established: false,
            close: guest_close.clone(),
            detail: format!("the host answered {code}"),
        };
        for seed in 0..seeds {
            let t = simulate(config, seed, horizon, REFUSED_HELLO, &outcome);
            attempts += t.attempts.len();
            suppressed += t.suppressed;
            for w in t.attempts.windows(2) {
                let gap = w[1] - w[0];
                min_gap = min_gap.min(gap);
                if gap < config.reprobe_interval {
                    early_retries += 1;
                }
            }
            let guest_lines: Vec<Duration> = t.written.iter().map(|(at, _)| *at).collect();
            guest_max = guest_max.max(max_in_window(&guest_lines, HOUR));
            // The host: one line per refused attempt at one call site,
            // limited per peer, at the time it refused.
            let site = CallSite::new();
            let t0 = Instant::now();
            let host_lines: Vec<Duration> = t
                .attempts
                .iter()
                .map(|&at| at + REFUSED_HELLO / 2)
                .filter(|&at| matches!(site.admit_peer(B_VM, t0 + at), Admit::Write { .. }))
                .collect();
            suppressed += (t.attempts.len() - host_lines.len()) as u64;
            host_max = host_max.max(max_in_window(&host_lines, HOUR));
        }
    }
    let figure = format!(
        "{} variants x {seeds} seeds x {} h: {attempts} attempts, {early_retries} retries \
         before {} s (shortest gap {} s); max lines in any hour: guest {guest_max}, host \
         {host_max} ({suppressed} suppressed)",
        variants.len(),
        horizon.as_secs() / 3600,
        config.reprobe_interval.as_secs(),
        min_gap.as_secs(),
    );
    let pass =
        early_retries == 0 && guest_max <= B_MAX_LINES_PER_HOUR && host_max <= B_MAX_LINES_PER_HOUR;
    row.finish(&figure, pass);
    assert_eq!(early_retries, 0, "{figure}");
    assert!(min_gap >= config.reprobe_interval, "{figure}");
    assert!(guest_max <= B_MAX_LINES_PER_HOUR, "{figure}");
    assert!(host_max <= B_MAX_LINES_PER_HOUR, "{figure}");
    // The re-probes did happen: dormant is not dead.
    assert!(attempts as u64 >= 2 * seeds, "{figure}");
}
