//! `vkx-guest run` end to end, as processes, against `vkx-host serve`
//! with swtpm as the guest's vTPM: the daemon attests and holds its
//! session; survives a host killed mid-handshake, a host killed while the
//! session is held and a graceful host restart (honouring its
//! `retry-after`); stops with a goodbye on SIGTERM; and goes dormant,
//! without retrying, on a permanent refusal. Also `vkx-guest once
//! --retry-for`, the boot-time one-shot that retries with the same policy.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::Path;
use std::time::{Duration, Instant};

use vkx_e2e::agents::{Agent, Deployment, pending_connections};
use vkx_e2e::run;

/// Generous bound for anything the daemon does after a change (its
/// backoff here is at most 1 s, plus a quote on swtpm).
const LIMIT: Duration = Duration::from_secs(30);

/// Fast retries for tests: the policy's shape, seconds instead of minutes.
const FAST_RETRY: &str = "[retry]\nbase_ms = 100\ncap_ms = 1000\nfloor_ms = 50\n";

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn status(config: &Path) -> String {
    let o = run(
        "vkx-guest",
        &["status", "--config", &config.display().to_string()],
        b"",
    );
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout).unwrap()
}

fn wait_status(config: &Path, what: &str) -> String {
    let start = Instant::now();
    loop {
        let s = status(config);
        if s.contains(what) {
            return s;
        }
        assert!(start.elapsed() < LIMIT, "status never showed {what}:\n{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemon_holds_its_session_and_recovers_from_every_host_failure() {
    let d = Deployment::new("vm-1", "shutdown_retry_after_s = 2");
    let pin = d.node.pin().to_owned();
    let config = d.guest_config("guest.toml", &d.socket(), &pin, FAST_RETRY);
    let cfg = config.display().to_string();

    // 1. The host is up but frozen (SIGSTOP) when the guest starts: the
    //    guest's connection waits in the accept queue, its TLS handshake
    //    started. The host is then killed mid-handshake.
    let host = d.start_host("host-1.log");
    host.signal("STOP");
    let guest = Agent::spawn("vkx-guest", &["run", "--config", &cfg], d.path("guest.log"));
    let start = Instant::now();
    while pending_connections(&d.socket()) == 0 {
        assert!(start.elapsed() < LIMIT, "the guest never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    host.kill();
    // The guest reports it, and backs off.
    let log = guest.wait_log(LIMIT, "the failed handshake", |l| {
        l.contains("TLS handshake") && l.contains("retrying in")
    });
    assert_eq!(count(&log, "attested"), 0, "{log}");

    // 2. The host returns: the guest attests and holds the session.
    let host = d.start_host("host-2.log");
    guest.wait_log(LIMIT, "attestation", |l| count(l, "attested") == 1);
    let s = wait_status(&config, "established");
    assert!(s.contains("last error:"), "{s}");
    // Held: no new attempt while the session lives.
    std::thread::sleep(Duration::from_secs(2));
    let log = guest.log();
    assert_eq!(count(&log, "attested"), 1, "{log}");
    assert_eq!(count(&host.log(), "attested"), 1, "{}", host.log());

    // 3. The host dies while the session is held: the guest reconnects as
    //    soon as a host is back.
    host.kill();
    guest.wait_log(LIMIT, "the lost session", |l| {
        l.contains("the host closed the connection")
    });
    let host = d.start_host("host-3.log");
    guest.wait_log(LIMIT, "re-attestation", |l| count(l, "attested") == 2);

    // 4. A graceful restart: the host's goodbye carries retry-after 2 s,
    //    and the guest waits at least that long.
    let stopped = Instant::now();
    assert!(host.stop().success());
    let log = guest.wait_log(LIMIT, "the goodbye", |l| l.contains("session ended"));
    assert!(log.contains("next attempt in 2"), "{log}");
    let host = d.start_host("host-4.log");
    guest.wait_log(LIMIT, "attestation after retry-after", |l| {
        count(l, "attested") == 3
    });
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "retry-after not honoured"
    );

    // 5. SIGTERM: the guest says goodbye and exits 0; the host sees an
    //    orderly end, and the status file says stopped.
    assert!(guest.stop().success());
    let s = status(&config);
    assert!(s.contains("stopped"), "{s}");
    assert!(s.contains("(3 attested)"), "{s}");
    assert!(host.stop().success());
}

#[test]
fn a_refused_guest_goes_dormant_instead_of_retrying() {
    let d = Deployment::new("vm-2", "");
    let pin = d.node.pin().to_owned();
    let config = d.guest_config("guest.toml", &d.socket(), &pin, FAST_RETRY);
    // A boot the policy does not allow.
    let o = std::process::Command::new("tpm2_pcrextend")
        .args([
            "-T",
            &d.tpm.tcti(),
            &format!("7:sha256={}", "ee".repeat(32)),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let host = d.start_host("host.log");
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &config.display().to_string()],
        d.path("guest.log"),
    );
    let log = guest.wait_log(LIMIT, "dormancy", |l| l.contains("dormant"));
    assert!(log.contains("attestation-failed"), "{log}");
    // With retries of at most 1 s, 3 s would hold several attempts if
    // the guest retried.
    std::thread::sleep(Duration::from_secs(3));
    let s = status(&config);
    assert!(s.contains("dormant"), "{s}");
    assert!(s.contains("attempts:            1 (0 attested)"), "{s}");
    // The re-probe: 30 min + U[0, 5 min] after the refusal, of which a
    // few seconds have passed (a small jitter reads "29 min").
    let minutes: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("next attempt:        in "))
        .and_then(|w| w.strip_suffix(" min"))
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no re-probe in minutes: {s}"));
    assert!((29..=35).contains(&minutes), "{s}");
    let refusals = count(&host.log(), "attestation refused");
    assert_eq!(refusals, 1, "{}", host.log());
    assert!(guest.stop().success());
}

/// `once --retry-for`: started before the host exists, it retries with
/// the daemon's policy and attests once the host is up.
#[test]
fn once_retry_for_waits_for_a_host_that_is_not_up_yet() {
    let d = Deployment::new("vm-1", "");
    let pin = d.node.pin().to_owned();
    let config = d.guest_config("guest.toml", &d.socket(), &pin, FAST_RETRY);
    let cfg = config.display().to_string();
    let once = Agent::spawn(
        "vkx-guest",
        &["once", "--config", &cfg, "--retry-for", "60"],
        d.path("once.log"),
    );
    // A few attempts fail (nothing listens) before the host starts.
    let failed = once.wait_log(LIMIT, "two failed attempts", |l| {
        count(l, "retrying in") >= 2
    });
    assert!(count(&failed, "retrying in") >= 2, "{failed}");
    let _host = d.start_host("host.log");
    let log_path = d.path("once.log");
    let status = once.wait_exit(LIMIT);
    let log = std::fs::read_to_string(log_path).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
}

/// `once --retry-for`: with no host at all it gives up within its time,
/// retryable (exit 3), saying how many attempts it made; a permanent
/// failure (the wrong host key) ends it after one attempt (exit 2).
#[test]
fn once_retry_for_is_bounded_and_stops_at_a_permanent_failure() {
    let d = Deployment::new("vm-1", "");
    let pin = d.node.pin().to_owned();
    let config = d.guest_config("guest.toml", &d.socket(), &pin, FAST_RETRY);
    let cfg = config.display().to_string();
    let t = Instant::now();
    let o = run(
        "vkx-guest",
        &["once", "--config", &cfg, "--retry-for", "3"],
        b"",
    );
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(took < Duration::from_secs(3) + LIMIT / 3, "took {took:?}");
    let attempts: u32 = err
        .split("gave up after ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no attempt count in {err}"));
    // Backoff from 50 ms doubling to 1 s: a handful in 3 s, never the budget.
    assert!((2..=30).contains(&attempts), "{attempts} attempts: {err}");
    assert!(err.contains("--retry-for"), "{err}");

    // The wrong pin: permanent, one attempt, although time remains.
    let _host = d.start_host("host.log");
    let wrong = d.guest_config("wrong.toml", &d.socket(), &"00".repeat(32), FAST_RETRY);
    let t = Instant::now();
    let o = run(
        "vkx-guest",
        &[
            "once",
            "--config",
            &wrong.display().to_string(),
            "--retry-for",
            "60",
        ],
        b"",
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(t.elapsed() < LIMIT, "{err}");
    assert_eq!(count(&err, "retrying in"), 0, "{err}");
}
