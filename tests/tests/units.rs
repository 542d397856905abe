//! The systemd units the agents ship (`host/dist`, `guest/dist`):
//! `systemd-analyze verify` accepts them without a single complaint, and
//! the command line each one runs (its `ExecStart`, with the built binary
//! and this test's configuration in place of `/usr/bin` and `/etc/vkx`)
//! does its job against a real host and swtpm: the host serves, the boot
//! one-shot attests, the daemon holds its session and stops on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vkx_e2e::agents::{Agent, Deployment};
use vkx_e2e::bin;

const LIMIT: Duration = Duration::from_secs(30);

/// The units, by path from the workspace root.
const UNITS: [&str; 3] = [
    "host/dist/vkx-host.service",
    "guest/dist/vkx-guest.service",
    "guest/dist/vkx-guest-once.service",
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

/// The `ExecStart=` of `text`, split into words (the units use no quoting).
fn exec_start(text: &str) -> Vec<String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart= line");
    line.split_whitespace().map(str::to_owned).collect()
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
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let host = d.start_host_with(&args, "host.log");

    // The boot one-shot attests (with its --retry-for) and exits 0.
    let (name, args) = command(UNITS[2]);
    assert_eq!(name, "vkx-guest");
    assert!(args.iter().any(|a| a == "--retry-for"), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = vkx_e2e::run(&name, &args, b"");
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
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Agent::spawn(&name, &args, d.path("daemon.log"));
    daemon.wait_log(LIMIT, "the daemon's session", |l| l.contains("attested"));
    assert!(daemon.stop().success());
    assert!(host.stop().success());
}
