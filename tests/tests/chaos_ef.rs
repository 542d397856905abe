//! The fault-injection suite, its real-process half (issue #6, item 5):
//! cases e and f run real `vkx-guest` and `vkx-host serve` processes,
//! each with its own swtpm. Each case injects one fault, asserts the
//! bound vkx promises for it, prints its measured figure, and writes one
//! row as a JSON line to `target/chaos/<case>.json` (the format of
//! `tests/chaos_ab.rs`, which holds the virtual-time cases a and b).
//!
//! | case | fault | what runs |
//! |---|---|---|
//! | e | TPM faults | real `vkx-guest` processes against `vkx-host serve`, with the vTPM missing, refusing, hanging up, or answering transient codes through a fault-injecting proxy in front of swtpm |
//! | f | host and guest killed mid-handshake | real processes, killed with SIGKILL at points held open with SIGSTOP, restarted; then every piece of persistent state is checked |
//!
//! Sizes: `VKX_CHAOS_FULL=1` runs the full size (several kill rounds);
//! without it each case runs a smaller version so `make test` stays fast.
//! The bounds are the same. A test that panics before it measured writes
//! its row with `pass: false`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)] // Each case prints its figure.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use vkx_e2e::agents::{Agent as Process, Deployment, pending_connections};
use vkx_e2e::chaos::{Row, size};
use vkx_e2e::run;

// ---------------------------------------------------------------------------
// e. TPM faults.

/// A loopback proxy in front of swtpm's two TCP ports (commands on P,
/// control on P+1, as the `swtpm:` TCTI expects), which can answer chosen
/// TPM commands with a response code instead of passing them on, or hang
/// up on every connection. It counts connections and commands.
///
/// The injected responses are the one mock in this suite, and only for a
/// fault the real component cannot produce on demand: swtpm never answers
/// TPM_RC_RETRY, TPM_RC_YIELDED or TPM_RC_TESTING when asked to. Every
/// other command goes to the real swtpm, through the real tss-esapi and
/// libtss2 stack of the real `vkx-guest`.
mod proxy {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    /// Largest TPM command or response relayed (TPM2 buffers are 4 KiB).
    const MAX_TPM_MESSAGE: usize = 64 * 1024;
    /// tag (2), size (4), command or response code (4).
    const HEADER: usize = 10;
    /// [`HEADER`] as the size field of a response without parameters.
    const HEADER_SIZE: u32 = 10;
    /// TPM_ST_NO_SESSIONS: the tag of an error response.
    const TAG_NO_SESSIONS: [u8; 2] = [0x80, 0x01];

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Mode {
        /// Relay to swtpm, injecting the configured fault.
        Forward,
        /// Accept and close at once: a TPM that is there and is not.
        HangUp,
    }

    /// Answer the first `times` commands with code `command` with `rc`.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Fault {
        pub(crate) command: u32,
        pub(crate) rc: u32,
        pub(crate) times: usize,
    }

    #[derive(Debug, Default, Clone)]
    pub(crate) struct Stats {
        /// Connections to the command port.
        pub(crate) connections: usize,
        /// Commands seen, by command code.
        pub(crate) commands: BTreeMap<u32, usize>,
        pub(crate) injected: usize,
    }

    #[derive(Debug, Default)]
    struct Shared {
        stats: Stats,
        fault: Option<Fault>,
    }

    #[derive(Debug)]
    pub(crate) struct TpmProxy {
        port: u16,
        shared: Arc<Mutex<Shared>>,
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    fn listener_pair() -> (TcpListener, TcpListener) {
        for _ in 0..100 {
            let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = a.local_addr().unwrap().port();
            if port == u16::MAX {
                continue;
            }
            if let Ok(b) = TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)) {
                return (a, b);
            }
        }
        panic!("no free pair of loopback ports");
    }

    impl TpmProxy {
        /// `upstream`: swtpm's command port (its control port is the next).
        pub(crate) fn start(upstream: u16, mode: Mode) -> Self {
            let (data, ctrl) = listener_pair();
            let port = data.local_addr().unwrap().port();
            let shared = Arc::new(Mutex::new(Shared::default()));
            let stop = Arc::new(AtomicBool::new(false));
            let mut threads = Vec::new();
            for (listener, is_data) in [(data, true), (ctrl, false)] {
                let shared = shared.clone();
                let stop = stop.clone();
                threads.push(std::thread::spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        if is_data {
                            shared.lock().unwrap().stats.connections += 1;
                        }
                        if mode == Mode::HangUp {
                            let _ = conn.shutdown(Shutdown::Both);
                            continue;
                        }
                        let target = if is_data { upstream } else { upstream + 1 };
                        let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target)) else {
                            continue;
                        };
                        let shared = shared.clone();
                        std::thread::spawn(move || {
                            if is_data {
                                relay_commands(conn, server, &shared);
                            } else {
                                pipe(conn, server);
                            }
                        });
                    }
                }));
            }
            Self {
                port,
                shared,
                stop,
                threads,
            }
        }

        pub(crate) fn tcti(&self) -> String {
            format!("swtpm:host=127.0.0.1,port={}", self.port)
        }

        /// Sets the fault and resets the counters.
        pub(crate) fn set_fault(&self, fault: Option<Fault>) {
            let mut s = self.shared.lock().unwrap();
            s.fault = fault;
            s.stats = Stats::default();
        }

        pub(crate) fn stats(&self) -> Stats {
            self.shared.lock().unwrap().stats.clone()
        }
    }

    impl Drop for TpmProxy {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loops so they see the flag.
            for p in [self.port, self.port + 1] {
                let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, p));
            }
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn pipe(a: TcpStream, b: TcpStream) {
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(Shutdown::Write);
        });
        let (mut a, mut b) = (a, b);
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(Shutdown::Write);
        let _ = back.join();
    }

    fn read_message(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut msg = vec![0u8; HEADER];
        s.read_exact(&mut msg).ok()?;
        let size = u32::from_be_bytes(msg[2..6].try_into().unwrap()) as usize;
        if !(HEADER..=MAX_TPM_MESSAGE).contains(&size) {
            return None;
        }
        msg.resize(size, 0);
        s.read_exact(&mut msg[HEADER..]).ok()?;
        Some(msg)
    }

    fn relay_commands(mut client: TcpStream, mut server: TcpStream, shared: &Mutex<Shared>) {
        while let Some(cmd) = read_message(&mut client) {
            let code = u32::from_be_bytes(cmd[6..10].try_into().unwrap());
            let inject = {
                let mut s = shared.lock().unwrap();
                *s.stats.commands.entry(code).or_default() += 1;
                match s.fault {
                    Some(f) if f.command == code && s.stats.injected < f.times => {
                        s.stats.injected += 1;
                        Some(f.rc)
                    }
                    _ => None,
                }
            };
            let response = match inject {
                Some(rc) => {
                    let mut r = TAG_NO_SESSIONS.to_vec();
                    r.extend_from_slice(&HEADER_SIZE.to_be_bytes());
                    r.extend_from_slice(&rc.to_be_bytes());
                    r
                }
                None => {
                    if server.write_all(&cmd).is_err() {
                        return;
                    }
                    let Some(r) = read_message(&mut server) else {
                        return;
                    };
                    r
                }
            };
            if client.write_all(&response).is_err() {
                return;
            }
        }
    }
}

use proxy::{Fault, Mode, TpmProxy};

/// TPM2_CC_Quote.
const CC_QUOTE: u32 = 0x158;
/// The transient response codes vkx retries (TPM 2.0 Part 2, 6.6.3).
const TRANSIENT: [(u32, &str); 3] = [
    (0x922, "TPM_RC_RETRY"),
    (0x908, "TPM_RC_YIELDED"),
    (0x90a, "TPM_RC_TESTING"),
];
/// tpm2-tss's ESAPI resubmits a command the TPM answered with one of
/// those codes, up to this many submissions in all (`_ESYS_MAX_SUBMISSIONS`
/// in tss2-esys), before it returns the code to the caller.
const ESYS_MAX_SUBMISSIONS: usize = 5;
/// TPM connections one quote may open when the TPM is missing or hangs
/// up: the TCTI is opened once, never retried.
const MAX_TPM_CONNECTIONS_PER_QUOTE: usize = 1;
/// `vkx-guest once`'s exit code for a failure worth retrying later.
const EXIT_RETRYABLE: i32 = 3;
/// Budget of the daemon in the TPM-missing run: small, so dormancy comes
/// within seconds.
const E_DAEMON_BUDGET: usize = 4;
/// Generous bound for anything the agents do after a change (retries
/// here are at most 1 s apart, plus a quote on swtpm).
const LIMIT: Duration = Duration::from_secs(30);
/// Fast retries for process tests: the policy's shape, seconds instead of
/// minutes.
const FAST_RETRY: &str = "[retry]\nbase_ms = 100\ncap_ms = 1000\nfloor_ms = 50\n";

fn swtpm_port(d: &Deployment) -> u16 {
    d.tpm.tcti().rsplit('=').next().unwrap().parse().unwrap()
}

/// `<stem>.toml`, a guest config for `d`'s host with its own `tcti`, and
/// its run directory `run-<stem>`.
fn guest_toml(d: &Deployment, stem: &str, tcti: &str, extra: &str) -> String {
    let path = d.path(&format!("{stem}.toml"));
    std::fs::write(
        &path,
        format!(
            "host_socket = \"{}\"\nhost_key_sha256 = \"{}\"\ntcti = \"{tcti}\"\nak_auth_file = \"{}\"\nrun_dir = \"{}\"\n{extra}\n",
            d.socket().display(),
            d.node.pin(),
            d.node.ak_auth_file(&d.vm_id),
            d.path(&format!("run-{stem}")).display(),
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn once(config: &str) -> (Option<i32>, String) {
    let o: Output = run("vkx-guest", &["once", "--config", config], b"");
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The summary line `vkx-guest once` ends with.
fn verdict(out: &str) -> &str {
    out.lines()
        .rev()
        .find(|l| l.starts_with("vkx-guest:") || l.starts_with("attested"))
        .unwrap_or("")
}

/// e. TPM faults: the vTPM missing (no device file; nothing listening on
/// the swtpm port; a TPM that hangs up) and answering transient codes
/// (RETRY, YIELDED, TESTING). Bounded TPM retries, and an actionable
/// message.
///
/// Real `vkx-guest once` processes attest to `vkx-host serve`. A missing
/// TPM costs one TPM connection per attempt (counted at a hang-up
/// listener) and ends in exit 3 (retryable: the guest reports
/// `internal`) with a message naming the TCTI and the fix. Transient
/// codes are injected into a real swtpm's answers to TPM2_Quote by
/// [`proxy::TpmProxy`] (the one mock: swtpm cannot be made to send them);
/// the proxy counts the Quote commands the TPM receives. Then the daemon
/// with a TPM that hangs up: its attempts, and so its TPM connections,
/// stop at the retry budget.
#[test]
fn e_tpm_faults() {
    let max_quotes = vkx_common::tss::MAX_TPM_ATTEMPTS as usize * ESYS_MAX_SUBMISSIONS;
    let row = Row::start(
        "e",
        "TPM faults: transient codes, device missing",
        format!(
            "<= {MAX_TPM_CONNECTIONS_PER_QUOTE} TPM connection per attempt when missing; <= {max_quotes} \
             commands per transient fault ({} tries x {ESYS_MAX_SUBMISSIONS} ESAPI submissions); \
             daemon <= budget; actionable message",
            vkx_common::tss::MAX_TPM_ATTEMPTS
        ),
    );
    let d = Deployment::new("vm-e", "");
    let host = d.start_host("host.log");
    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    let mut figures: Vec<String> = Vec::new();

    // 1. Missing: no device file, nothing on the port, a TPM that hangs up.
    let no_device = format!("device:{}", d.path("no-tpm/tpmrm0").display());
    let nothing = {
        let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("swtpm:host=127.0.0.1,port={port}")
    };
    let hang_up = TpmProxy::start(swtpm_port(&d), Mode::HangUp);
    let mut missing_connections = 0;
    for (what, tcti) in [
        ("no device file", no_device),
        ("nothing listening", nothing),
        ("hangs up", hang_up.tcti()),
    ] {
        let config = guest_toml(&d, "missing", &tcti, "");
        let before = hang_up.stats().connections;
        let (code, out) = once(&config);
        let line = verdict(&out);
        check(
            code == Some(EXIT_RETRYABLE),
            format!("{what}: exit {code:?}: {out}"),
        );
        // Actionable: names the TCTI and what to check or set.
        check(
            line.contains("TPM quote failed")
                && line.contains(&format!("no TPM at {tcti:?}"))
                && line.contains("give the VM a vTPM")
                && line.contains("VKX_TPM_TCTI"),
            format!("{what}: not actionable: {line}"),
        );
        check(
            out.matches("TPM quote failed").count() == 2,
            format!("{what}: one quote, one warning and one verdict expected: {out}"),
        );
        if what == "hangs up" {
            missing_connections = hang_up.stats().connections - before;
            check(
                missing_connections <= MAX_TPM_CONNECTIONS_PER_QUOTE,
                format!("{what}: {missing_connections} TPM connections"),
            );
        }
    }
    figures.push(format!(
        "missing (no device / nothing listening / hangs up): exit {EXIT_RETRYABLE}, message names \
         the TCTI and the fix, {missing_connections} TPM connection"
    ));

    // 2. Transient codes on TPM2_Quote, every time: bounded, then a typed
    //    failure naming the code.
    let proxy = TpmProxy::start(swtpm_port(&d), Mode::Forward);
    let config = guest_toml(&d, "proxied", &proxy.tcti(), "");
    let codes = size(&TRANSIENT[..], &TRANSIENT[..1]);
    let mut worst_quotes = 0;
    for &(rc, name) in codes {
        proxy.set_fault(Some(Fault {
            command: CC_QUOTE,
            rc,
            times: usize::MAX,
        }));
        let started = Instant::now();
        let (code, out) = once(&config);
        let took = started.elapsed();
        let quotes = proxy.stats().commands.get(&CC_QUOTE).copied().unwrap_or(0);
        worst_quotes = worst_quotes.max(quotes);
        let line = verdict(&out);
        check(
            code == Some(EXIT_RETRYABLE),
            format!("{name}: exit {code:?}: {out}"),
        );
        check(
            quotes <= max_quotes,
            format!("{name}: {quotes} Quote commands"),
        );
        check(
            line.contains(&format!("[TSS2_RC {rc:#010x}]"))
                && line.contains("Quote")
                && line.contains("try again later"),
            format!(
                "{name}: the message does not name the command, the code and what to do: {line}"
            ),
        );
        check(took < LIMIT, format!("{name}: took {took:?}"));
    }
    figures.push(format!(
        "{} always: {worst_quotes} Quote commands then exit {EXIT_RETRYABLE} naming the code",
        codes.iter().map(|(_, n)| *n).collect::<Vec<_>>().join("/")
    ));

    // 3. A transient spell that ends: retried, and the guest attests.
    proxy.set_fault(Some(Fault {
        command: CC_QUOTE,
        rc: TRANSIENT[0].0,
        times: 2,
    }));
    let (code, out) = once(&config);
    let quotes = proxy.stats().commands.get(&CC_QUOTE).copied().unwrap_or(0);
    check(
        code == Some(0),
        format!("transient spell: exit {code:?}: {out}"),
    );
    check(
        quotes == 3,
        format!("transient spell: {quotes} Quote commands"),
    );
    figures.push(format!(
        "2 RETRYs then success: attested after {quotes} Quote commands"
    ));

    // 4. The daemon with a TPM that hangs up: attempts, and TPM
    //    connections, stop at the budget; then it is dormant.
    let config = guest_toml(
        &d,
        "daemon",
        &hang_up.tcti(),
        &format!("{FAST_RETRY}budget = {E_DAEMON_BUDGET}\n"),
    );
    let before = hang_up.stats().connections;
    let guest = Process::spawn(
        "vkx-guest",
        &["run", "--config", &config],
        d.path("guest-e.log"),
    );
    let log = guest.wait_log(LIMIT, "dormancy", |l| l.contains("dormant"));
    // Were it still retrying, 3 s would hold several attempts.
    std::thread::sleep(Duration::from_secs(3));
    let connections = hang_up.stats().connections - before;
    let status = std::fs::read_to_string(d.path("run-daemon/status.json")).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let attempts = usize::try_from(status["attempts"].as_u64().unwrap()).unwrap();
    // Attempts that got as far as the quote (the host may refuse one
    // earlier), and the lines libtss2 writes itself, outside vkx's limiter.
    let quotes = count(&log, "TPM quote failed error=");
    let tss_lines = log
        .lines()
        .filter(|l| l.starts_with("ERROR:") || l.starts_with("WARNING:"))
        .count();
    check(status["state"] == "dormant", format!("daemon: {status}"));
    check(
        attempts <= E_DAEMON_BUDGET
            && quotes <= attempts
            && connections <= quotes * MAX_TPM_CONNECTIONS_PER_QUOTE,
        format!("daemon: {attempts} attempts, {quotes} quotes, {connections} TPM connections"),
    );
    check(
        log.contains("TPM quote failed")
            && log.contains(&format!("no TPM at {:?}", hang_up.tcti())),
        format!("daemon: the log does not say why: {log}"),
    );
    assert!(guest.stop().success());
    figures.push(format!(
        "daemon, TPM hangs up: {attempts} attempts, {quotes} quotes, {connections} TPM \
         connections, then dormant (libtss2 wrote {tss_lines} lines of its own)"
    ));
    assert!(host.stop().success());

    let figure = figures.join("; ");
    row.finish(&figure, failures.is_empty());
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------
// f. Host and guest killed mid-handshake.

/// The PID of the swtpm this deployment started (its command line names
/// its own state directory).
fn swtpm_pid(d: &Deployment) -> u32 {
    let want = format!("dir={}", d.tpm.state_dir().display());
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"swtpm")) && args.contains(&want.as_bytes()) {
            return pid;
        }
    }
    panic!("no swtpm with {want}");
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Frames of message type `t` the host logged (trace level).
fn host_frames(log: &str, direction: &str, t: u8) -> usize {
    log.lines()
        .filter(|l| l.contains(direction) && l.contains(&format!("msg_type=Some({t})")))
        .count()
}

/// Waits (bounded) for `pred` on the file at `path`.
fn wait_file(path: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            start.elapsed() < LIMIT,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The message type of `challenge` (PROTOCOL.md §6).
const CHALLENGE: u8 = 2;

/// f. The host and the guest, each killed (SIGKILL) mid-handshake and
/// restarted: the daemon recovers and attests, and no state is corrupted.
///
/// Real processes. Each round: (1) the host is frozen (SIGSTOP) with the
/// guest's connection in its accept queue (the guest's TLS handshake
/// started), then killed and restarted; (2) the vTPM is frozen so the
/// guest hangs in its quote, the host is killed after it sent the
/// challenge (awaiting evidence), the vTPM thawed, the host restarted;
/// (3) the guest is killed while it quotes (after the host's challenge,
/// before its evidence) and restarted. After the rounds: the host's
/// registry entry for the VM is valid JSON with its keys unchanged, no
/// host saw a false TPM rewind, the key store verifies, the status file
/// is valid, and a final `vkx-guest once` attests and receives its key.
#[test]
fn f_host_and_guest_killed_mid_handshake() {
    let row = Row::start(
        "f",
        "host and guest killed mid-handshake, restarted",
        "recovery after every kill; no corrupted state",
    );
    let rounds = size(3, 1);
    let d = Deployment::new("vm-f", "log_level = \"trace\"");
    let pin = d.node.pin().to_owned();
    let node = d.node.node_dir();
    let o = run(
        "vkx-host",
        &[
            "keys",
            "generate",
            "disk",
            "--allow-image",
            "img",
            "--node-dir",
            &node,
        ],
        b"",
    );
    assert!(o.status.success(), "{o:?}");
    let key_dir = d.path("keys");
    let config = d.guest_config(
        "guest.toml",
        &d.socket(),
        &pin,
        &format!(
            "keys = [\"disk\"]\nkey_dir = \"{}\"\n{FAST_RETRY}",
            key_dir.display()
        ),
    );
    let cfg = config.display().to_string();
    let status_file = d.path("run/status.json");
    let entry_before = d.node.entry("vm-f");
    let tpm = swtpm_pid(&d);
    let mut host_logs: Vec<PathBuf> = Vec::new();
    let mut start_host = || {
        let name = format!("host-{}.log", host_logs.len() + 1);
        host_logs.push(d.path(&name));
        (d.start_host(&name), d.path(&name))
    };
    let mut guests = 0;
    let mut start_guest = || {
        guests += 1;
        Process::spawn(
            "vkx-guest",
            &["run", "--config", &cfg],
            d.path(&format!("guest-{guests}.log")),
        )
    };
    let mut recoveries: Vec<Duration> = Vec::new();
    let mut kills = 0;

    for _ in 0..rounds {
        // (1) The host frozen with the guest's connection in its accept
        //     queue, then killed; the guest backs off; a new host.
        let (host, _) = start_host();
        host.signal("STOP");
        let guest = start_guest();
        wait_pending(&d);
        host.kill();
        kills += 1;
        guest.wait_log(LIMIT, "the failed handshake", |l| {
            l.contains("TLS handshake") && l.contains("retrying in")
        });
        assert_eq!(count(&guest.log(), "attested"), 0, "{}", guest.log());
        let restarted = Instant::now();
        let (host, _) = start_host();
        guest.wait_log(LIMIT, "attestation after the host restart", |l| {
            count(l, "attested") == 1
        });
        recoveries.push(restarted.elapsed());

        // (2) The host killed awaiting evidence: with the vTPM frozen,
        //     the guest hangs in its quote after the challenge.
        signal(tpm, "STOP");
        host.kill();
        let (host, host_log) = start_host();
        wait_file(&host_log, "the challenge", |l| {
            host_frames(l, "frame sent", CHALLENGE) > 0
        });
        let failed = count(&guest.log(), "retrying in");
        host.kill();
        kills += 1;
        signal(tpm, "CONT");
        guest.wait_log(LIMIT, "the lost handshake", |l| {
            count(l, "retrying in") > failed
        });
        assert_eq!(count(&guest.log(), "attested"), 1, "{}", guest.log());
        let restarted = Instant::now();
        let (host, host_log) = start_host();
        guest.wait_log(LIMIT, "attestation after the host restart", |l| {
            count(l, "attested") == 2
        });
        recoveries.push(restarted.elapsed());

        // (3) The guest killed while it quotes: after the host's
        //     challenge, before its evidence.
        assert!(guest.stop().success());
        signal(tpm, "STOP");
        let challenges = host_frames(&host.log(), "frame sent", CHALLENGE);
        let attested = count(&host.log(), "attested");
        let guest = start_guest();
        wait_file(&host_log, "the challenge to the new guest", |l| {
            host_frames(l, "frame sent", CHALLENGE) > challenges
        });
        guest.kill();
        kills += 1;
        // What the killed guest left: a valid status file.
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&status_file).unwrap())
                .expect("the status file is valid JSON after SIGKILL");
        assert_eq!(s["state"], "connecting", "{s}");
        signal(tpm, "CONT");
        let restarted = Instant::now();
        let guest = start_guest();
        guest.wait_log(LIMIT, "attestation after the guest restart", |l| {
            count(l, "attested") == 1
        });
        recoveries.push(restarted.elapsed());
        assert_eq!(
            count(&host.log(), "attested"),
            attested + 1,
            "{}",
            host.log()
        );
        assert!(guest.stop().success());
        assert!(host.stop().success());
    }

    // No corrupted state: the registry entry, the key store, the status
    // file, and a final one-shot attestation with its key.
    let entry = d.node.entry("vm-f");
    for field in [
        "vm_id",
        "ek_public",
        "ak_public",
        "ak_name",
        "ak_cert_sha256",
    ] {
        assert_eq!(entry[field], entry_before[field], "{field}: {entry}");
    }
    let o = run("vkx-host", &["keys", "verify", "--node-dir", &node], b"");
    assert!(o.status.success(), "keys verify: {o:?}");
    let s = run("vkx-guest", &["status", "--config", &cfg], b"");
    assert!(s.status.success(), "{s:?}");
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(status["state"], "stopped", "{status}");
    let (host, _) = start_host();
    let (code, out) = once(&cfg);
    assert_eq!(code, Some(0), "{out}\n{}", host.log());
    assert!(out.contains("key delivered: disk version 1"), "{out}");
    assert!(host.stop().success());
    // The kills and the frozen vTPM did not look like a snapshot restore.
    for log in &host_logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.contains("rewound"), "{}: {text}", log.display());
    }

    let slowest = recoveries.iter().max().copied().unwrap_or_default();
    let figure = format!(
        "{kills} kills in {rounds} round(s) (host in accept queue, host awaiting evidence, guest \
         quoting): {} recoveries, slowest {:.1} s; registry entry, key store, status file valid; \
         final once attested with its key",
        recoveries.len(),
        slowest.as_secs_f64()
    );
    row.finish(&figure, true);
}

fn wait_pending(d: &Deployment) {
    let start = Instant::now();
    while pending_connections(&d.socket()) == 0 {
        assert!(start.elapsed() < LIMIT, "the guest never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
}
