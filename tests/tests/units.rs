//! The systemd units the agents ship (`host/dist`, `guest/dist`):
//! `systemd-analyze verify` accepts them without a single complaint;
//! `systemd-analyze security` scores each at most [`MAX_EXPOSURE`]; the
//! users they run as are the ones their sysusers.d files make; and the
//! command line each one runs (its `ExecStart`, with the built binary and
//! this test's configuration in place of `/usr/bin` and `/etc/vkx`) does
//! its job against a real host and swtpm: the host serves, the boot
//! one-shot attests, the daemon holds its session, the host's
//! `ExecReload` reloads its policy, and both stop on SIGTERM.
//!
//! systemd is not running where these tests run, so the sandbox itself
//! cannot be applied. What can break an agent inside it is checked
//! instead: each command runs under `strace -f`, and every system call it
//! makes must pass its unit's `SystemCallFilter=` (expanded by
//! `systemd-analyze syscall-filter`, exactly as systemd expands it); with
//! `ProcSubset=pid` it must open no /proc file outside a process's own
//! directory; and it must open no device but the pseudo devices
//! `DevicePolicy=closed` allows and the unit's `DeviceAllow=`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use vkx_e2e::agents::Deployment;
use vkx_e2e::bin;

const LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// The units, by path from the workspace root.
const UNITS: [&str; 3] = [
    "host/dist/vkx-host.service",
    "guest/dist/vkx-guest.service",
    "guest/dist/vkx-guest-once.service",
];

/// The sysusers.d files that make the units' users.
const SYSUSERS: [&str; 2] = [
    "host/dist/vkx-host.sysusers",
    "guest/dist/vkx-guest.sysusers",
];

/// Highest overall exposure `systemd-analyze security` may give a unit
/// (0 locked down .. 10 unprotected; an unhardened service scores 9.6).
const MAX_EXPOSURE: f64 = 2.5;

/// Devices `DevicePolicy=closed` leaves open to every service.
const PSEUDO_DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn unit_text(unit: &str) -> String {
    std::fs::read_to_string(workspace().join(unit)).unwrap()
}

/// `text` with the installed binary paths replaced by the built ones.
fn with_built_binaries(text: &str) -> String {
    text.replace("/usr/bin/vkx-host", &bin("vkx-host").display().to_string())
        .replace(
            "/usr/bin/vkx-guest",
            &bin("vkx-guest").display().to_string(),
        )
}

/// Every value of `key=` in `text`, in order (the units use no
/// continuation lines).
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .collect()
}

/// The `ExecStart=` of `text`, split into words (the units use no quoting).
fn exec_start(text: &str) -> Vec<String> {
    let line = values(text, "ExecStart");
    let line = line.first().expect("an ExecStart= line");
    line.split_whitespace().map(str::to_owned).collect()
}

/// Passive targets (systemd.special(7)): nothing pulls them in unless a
/// unit that must run before them wants them, so a unit installed only
/// `WantedBy=` one of them is never started.
const PASSIVE_TARGETS: &[&str] = &[
    "cryptsetup-pre.target",
    "local-fs-pre.target",
    "remote-fs-pre.target",
    "network-pre.target",
    "nss-lookup.target",
    "nss-user-lookup.target",
    "getty-pre.target",
    "veritysetup-pre.target",
];

/// Regression (seen booting a real VM in `make vm-test`): the one-shot was
/// `WantedBy=cryptsetup-pre.target` and never ran, so the volume it unlocks
/// stayed locked. Each unit is wanted by a target a boot reaches, and the
/// one-shot by one that is reached before any volume is opened.
#[test]
fn every_unit_is_wanted_by_a_target_the_boot_pulls_in() {
    for unit in UNITS {
        let wanted = values(&unit_text(unit), "WantedBy");
        assert!(!wanted.is_empty(), "{unit}: no WantedBy=");
        for w in &wanted {
            assert!(
                !PASSIVE_TARGETS.contains(&w.as_str()),
                "{unit}: WantedBy={w} is a passive target: the unit would never start"
            );
        }
    }
    let once = unit_text("guest/dist/vkx-guest-once.service");
    assert_eq!(values(&once, "WantedBy"), ["sysinit.target"]);
    assert!(
        values(&once, "Before")
            .iter()
            .any(|b| b.split_whitespace().any(|t| t == "cryptsetup-pre.target"))
    );
    assert!(
        values(&once, "Wants")
            .iter()
            .any(|b| b.split_whitespace().any(|t| t == "cryptsetup-pre.target"))
    );
}

#[test]
fn systemd_analyze_verify_accepts_every_unit_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in UNITS {
        let name = Path::new(unit).file_name().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, with_built_binaries(&unit_text(unit))).unwrap();
        paths.push(path);
    }
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("systemd-analyze (Debian package systemd; make test installs it)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify failed:\n{err}");
    // Unknown keys and misplaced settings are only warnings: none allowed.
    assert!(
        err.trim().is_empty(),
        "systemd-analyze verify warned:\n{err}"
    );
}

/// `systemd-analyze security`'s overall exposure of the unit file at
/// `path`, and its whole report (for a failure message).
fn exposure(path: &Path) -> (f64, String) {
    // --threshold is in tenths: the exit status says "above" too.
    let threshold = format!("--threshold={}", (MAX_EXPOSURE * 10.0).round());
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true", &threshold, "--no-pager"])
        .arg(path)
        .output()
        .expect("systemd-analyze (Debian package systemd; make test installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // "→ Overall exposure level for vkx-host.service: 1.4 OK 🙂"
    let level = report
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    assert_eq!(
        o.status.success(),
        level <= MAX_EXPOSURE,
        "exit status {} disagrees with level {level}:\n{report}",
        o.status
    );
    (level, report)
}

#[test]
fn systemd_analyze_security_scores_every_unit_at_most_2_5() {
    for unit in UNITS {
        let (level, report) = exposure(&workspace().join(unit));
        assert!(
            level <= MAX_EXPOSURE,
            "{unit}: exposure {level} > {MAX_EXPOSURE}:\n{report}"
        );
    }
    // The measure can fail: a service without any hardening is far above.
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare.service");
    std::fs::write(&bare, "[Service]\nExecStart=/usr/bin/true\n").unwrap();
    let (level, report) = exposure(&bare);
    assert!(level > MAX_EXPOSURE, "{report}");
}

/// Names in the `:`-separated file `text` (passwd, group): name → fields.
fn entries(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':').map(str::to_owned);
            Some((f.next()?, f.collect()))
        })
        .collect()
}

#[test]
fn every_unit_runs_as_a_user_its_sysusers_file_makes() {
    // systemd-sysusers into an empty root: this machine's users are
    // neither read nor changed.
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("usr/lib/sysusers.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    for file in SYSUSERS {
        let name = Path::new(file).file_stem().unwrap().to_string_lossy();
        std::fs::copy(workspace().join(file), conf.join(format!("{name}.conf"))).unwrap();
    }
    let o = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .output()
        .expect("systemd-sysusers (Debian package systemd; make test installs it)");
    assert!(o.status.success(), "systemd-sysusers: {o:?}");
    let read = |f: &str| entries(&std::fs::read_to_string(root.path().join(f)).unwrap());
    let (users, groups) = (read("etc/passwd"), read("etc/group"));

    for unit in UNITS {
        let text = unit_text(unit);
        let user = values(&text, "User");
        let [user] = user.as_slice() else {
            panic!("{unit}: one User= line, not {user:?}")
        };
        assert_ne!(user, "root", "{unit}");
        let pw = users
            .get(user)
            .unwrap_or_else(|| panic!("{unit}: no sysusers file makes user {user}"));
        // passwd fields after the name: x, uid, gid, gecos, home, shell.
        assert_eq!(pw[5], "/usr/sbin/nologin", "{unit}: {user} can log in");
        for group in values(&text, "Group") {
            let gr = groups
                .get(&group)
                .unwrap_or_else(|| panic!("{unit}: no sysusers file makes group {group}"));
            assert_eq!(
                gr[1], pw[2],
                "{unit}: Group={group} is not {user}'s own group"
            );
        }
        for group in values(&text, "SupplementaryGroups")
            .iter()
            .flat_map(|v| v.split_whitespace())
        {
            let gr = groups
                .get(group)
                .unwrap_or_else(|| panic!("{unit}: no sysusers file makes group {group}"));
            assert!(
                gr[2].split(',').any(|m| m == user),
                "{unit}: sysusers does not put {user} in {group}"
            );
        }
    }
}

/// The system calls a filter set stands for: a name is itself, a `@set`
/// is what `systemd-analyze syscall-filter` lists for it, nested sets
/// expanded.
fn expand(item: &str, cache: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if !item.starts_with('@') {
        return BTreeSet::from([item.to_owned()]);
    }
    if let Some(s) = cache.get(item) {
        return s.clone();
    }
    let o = Command::new("systemd-analyze")
        .args(["syscall-filter", item])
        .output()
        .unwrap();
    assert!(o.status.success(), "syscall-filter {item}: {o:?}");
    let mut set = BTreeSet::new();
    // The set's name, then one entry per line; "#" lines are comments.
    for line in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
        let entry = line.trim();
        if !entry.is_empty() && !entry.starts_with('#') {
            set.extend(expand(entry, cache));
        }
    }
    assert!(!set.is_empty(), "{item} is empty");
    cache.insert(item.to_owned(), set.clone());
    set
}

/// What the `SystemCallFilter=` lines of `text` allow: the first is an
/// allow list; later ones add to it, or (with `~`) take away from it.
fn allowed_syscalls(text: &str) -> BTreeSet<String> {
    let mut cache = BTreeMap::new();
    let mut allowed = BTreeSet::new();
    let lines = values(text, "SystemCallFilter");
    assert!(
        lines.first().is_some_and(|l| !l.starts_with('~')),
        "the first SystemCallFilter= must be an allow list: {lines:?}"
    );
    for line in &lines {
        let (deny, list) = match line.strip_prefix('~') {
            Some(l) => (true, l),
            None => (false, line.as_str()),
        };
        for item in list.split_whitespace() {
            let set = expand(item, &mut cache);
            if deny {
                allowed.retain(|s| !set.contains(s));
            } else {
                allowed.extend(set);
            }
        }
    }
    allowed
}

/// One line of an `strace -f` trace: the call's name and its first
/// quoted argument (a path for the open calls). Signals, exits and the
/// second halves of interrupted calls are not calls.
fn call(line: &str) -> Option<(&str, Option<&str>)> {
    let rest = line.split_once(' ')?.1.trim_start();
    let (name, args) = rest.split_once('(')?;
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let path = args
        .strip_prefix('"')
        .or_else(|| args.split_once(", \"").map(|(_, p)| p))
        .and_then(|p| p.split_once('"'))
        .map(|(p, _)| p);
    Some((name, path))
}

/// Checks the trace of `unit`'s command against what its sandbox allows.
fn check_trace(unit: &str, trace: &Path) {
    let text = unit_text(unit);
    let allowed = allowed_syscalls(&text);
    let proc_subset = values(&text, "ProcSubset").iter().any(|v| v == "pid");
    let devices: Vec<String> = values(&text, "DeviceAllow")
        .iter()
        .filter_map(|v| v.split_whitespace().next().map(str::to_owned))
        .collect();
    let trace_text = std::fs::read_to_string(trace).unwrap();
    let mut denied = BTreeSet::new();
    let mut outside = BTreeSet::new();
    let mut calls = 0;
    for (name, path) in trace_text.lines().filter_map(call) {
        calls += 1;
        if !allowed.contains(name) {
            denied.insert(name.to_owned());
        }
        if !name.starts_with("open") {
            continue;
        }
        let Some(p) = path else { continue };
        let proc_other = p.strip_prefix("/proc/").is_some_and(|rest| {
            let first = rest.split('/').next().unwrap_or("");
            first != "self" && first != "thread-self" && !first.chars().all(|c| c.is_ascii_digit())
        });
        let device = p.starts_with("/dev/")
            && !PSEUDO_DEVICES.contains(&p)
            && !devices.iter().any(|d| d == p);
        if (proc_subset && proc_other) || device {
            outside.insert(p.to_owned());
        }
    }
    assert!(
        calls > 100,
        "{unit}: an implausibly short trace ({calls} calls)"
    );
    assert!(
        denied.is_empty(),
        "{unit}: SystemCallFilter= would refuse {denied:?} ({})",
        trace.display()
    );
    assert!(
        outside.is_empty(),
        "{unit}: opens {outside:?}, hidden by ProcSubset=/DevicePolicy= ({})",
        trace.display()
    );
}

/// A command run under `strace -f -o TRACE`, its stderr in a log file.
struct Traced {
    child: Child,
    log: PathBuf,
    trace: PathBuf,
}

/// `strace -f -qq -o TRACE -- BINARY ARGS`: every thread's calls, in one
/// file, each line led by the thread's id.
fn strace(trace: &Path, name: &str, args: &[String]) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-o"])
        .arg(trace)
        .arg("--")
        .arg(bin(name))
        .args(args);
    c
}

const STRACE: &str = "strace (Debian package strace; make test installs it)";

impl Traced {
    fn spawn(dir: &Path, label: &str, name: &str, args: &[String]) -> Self {
        let log = dir.join(format!("{label}.log"));
        let trace = dir.join(format!("{label}.strace"));
        let child = strace(&trace, name, args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect(STRACE);
        Self { child, log, trace }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded by [`LIMIT`]) until `ready` holds.
    fn wait_until(&self, what: &str, ready: impl Fn() -> bool) {
        let start = Instant::now();
        while !ready() {
            assert!(
                start.elapsed() < LIMIT,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The traced agent: the trace's first line is its `execve`.
    fn agent_pid(&self) -> Option<String> {
        let trace = std::fs::read_to_string(&self.trace).ok()?;
        Some(trace.lines().next()?.split_whitespace().next()?.to_owned())
    }

    /// SIGTERM to the agent (not to strace, which would detach), then
    /// its exit status, which strace exits with.
    fn terminate(mut self) -> ExitStatus {
        let pid = self.agent_pid().expect("the agent's execve in the trace");
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < LIMIT, "no exit: {}", self.log());
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            if let Some(pid) = self.agent_pid() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn every_units_command_line_does_its_job() {
    let d = Deployment::new("vm-1", "");
    let pin = d.node.pin().to_owned();
    let guest = d.guest_config("guest.toml", &d.socket(), &pin, "");
    let configs = |argv: Vec<String>| -> Vec<String> {
        argv.into_iter()
            .map(|a| match a.as_str() {
                "/etc/vkx/host.toml" => d.host_config().display().to_string(),
                "/etc/vkx/guest.toml" => guest.display().to_string(),
                _ => a,
            })
            .collect()
    };
    let command = |unit: &str| -> (String, Vec<String>) {
        let argv = configs(exec_start(&unit_text(unit)));
        let name = Path::new(&argv[0])
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        (name, argv[1..].to_vec())
    };

    // The host unit's command serves.
    let (name, args) = command(UNITS[0]);
    assert_eq!(name, "vkx-host");
    assert_eq!(args[0], "serve");
    let _ = std::fs::remove_file(d.socket());
    let host = Traced::spawn(d.work.path(), "host", &name, &args);
    host.wait_until("the host's socket", || d.socket().exists());

    // The boot one-shot attests (with its --retry-for) and exits 0.
    let (name, args) = command(UNITS[2]);
    assert_eq!(name, "vkx-guest");
    assert!(args.iter().any(|a| a == "--retry-for"), "{args:?}");
    let once_trace = d.path("once.strace");
    let o: Output = strace(&once_trace, &name, &args).output().expect(STRACE);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        host.log()
    );

    // The daemon attests, holds its session, and stops on SIGTERM with 0.
    let (name, args) = command(UNITS[1]);
    assert_eq!((name.as_str(), args[0].as_str()), ("vkx-guest", "run"));
    let daemon = Traced::spawn(d.work.path(), "daemon", &name, &args);
    daemon.wait_until("the daemon's session", || daemon.log().contains("attested"));

    // The host unit's reload (its ExecReload=, $MAINPID the traced
    // agent): the policy is read again, off the runtime thread, and the
    // session it still allows is kept.
    let reload = values(&unit_text(UNITS[0]), "ExecReload");
    let reload: Vec<String> = reload
        .first()
        .expect("an ExecReload= line")
        .split_whitespace()
        .map(|w| {
            w.replace(
                "$MAINPID",
                &host.agent_pid().expect("the host's execve in the trace"),
            )
        })
        .collect();
    let o = Command::new(&reload[0])
        .args(&reload[1..])
        .output()
        .unwrap();
    assert!(o.status.success(), "{reload:?}: {o:?}");
    host.wait_until("the reload", || {
        host.log().contains("reload applied") && host.log().contains("sessions_reattest=0")
    });
    assert!(!daemon.log().contains("session ended"), "{}", daemon.log());
    let daemon_trace = daemon.trace.clone();
    assert!(daemon.terminate().success());
    let host_trace = host.trace.clone();
    assert!(host.terminate().success());

    // Nothing any of them did would have been refused inside its unit.
    check_trace(UNITS[0], &host_trace);
    check_trace(UNITS[1], &daemon_trace);
    check_trace(UNITS[2], &once_trace);
}
