//! Helpers for the end-to-end tests, which run the real `vkx-host` and
//! `vkx-guest` binaries as separate processes.

#![forbid(unsafe_code)]
// Test support: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agents;
pub mod chaos;
pub mod etcd;
#[cfg(feature = "insecure-soft-tpm")]
pub mod herd;
#[cfg(feature = "insecure-soft-tpm")]
pub mod holders;
pub mod node;
pub mod raw;
pub mod rollout;
#[cfg(feature = "insecure-soft-tpm")]
pub mod softtpm;
pub mod swtpm;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Path of a workspace binary (`vkx-host`, `vkx-guest`) of this test
/// build's profile. A test never builds: `make test` (and every make
/// target that runs these tests or examples) builds the binaries first,
/// `cargo build --workspace --bins` (with `--release` for a release test
/// build). Fails with that command if the binary is missing, or older than
/// a source file of the crates it is built from: a stale binary would make
/// the tests check old code.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let (profile, flag) = if cfg!(debug_assertions) {
        ("debug", "")
    } else {
        ("release", " --release")
    };
    let path = target.join(profile).join(name);
    let build = format!("cargo build --workspace --bins --locked{flag}");
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; build the agents first: {build}", path.display()));
    if let Some(newer) = newer_source(name, built) {
        panic!(
            "{} is older than {}; build the agents first: {build}",
            path.display(),
            newer.display()
        );
    }
    path
}

/// The workspace's root directory (this crate's parent).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Source directories and files both agents are built from.
const AGENT_SOURCES: &[&str] = &[
    "Cargo.lock",
    "common/Cargo.toml",
    "common/src",
    "guest/Cargo.toml",
    "guest/src",
];

/// What only `vkx-host` is built from (it links the guest agent for the
/// drills; the guest does not link the host).
const HOST_SOURCES: &[&str] = &["host/Cargo.toml", "host/src"];

/// Entries scanned at most per directory while looking for a source newer
/// than a binary (the crates hold about a hundred files each).
const MAX_SOURCE_ENTRIES: usize = 4096;

/// A source file of binary `name` modified after `built`, if any.
fn newer_source(name: &str, built: std::time::SystemTime) -> Option<PathBuf> {
    let root = workspace_root();
    let host = if name == "vkx-host" {
        HOST_SOURCES
    } else {
        &[]
    };
    let mut stack: Vec<PathBuf> = AGENT_SOURCES
        .iter()
        .chain(host)
        .map(|p| root.join(p))
        .collect();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(&path) else {
                continue;
            };
            stack.extend(
                entries
                    .take(MAX_SOURCE_ENTRIES)
                    .filter_map(|e| e.ok().map(|e| e.path())),
            );
        } else if meta.modified().is_ok_and(|m| m > built) {
            return Some(path);
        }
    }
    None
}

/// Runs a binary with `args`, feeding `stdin`, and returns its output.
pub fn run(name: &str, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin(name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut input = child.stdin.take().expect("stdin is piped");
    // The child may stop reading early (that is what some tests check).
    match input.write_all(stdin) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
        _ => {}
    }
    drop(input);
    child.wait_with_output().expect("wait for child")
}

/// Raises this process's soft limit of open files to `need` (children
/// inherit it), up to the hard limit: the drills' own
/// (`vkx_host::drill::sandbox::ensure_fd_limit`), failing the run if it
/// cannot.
pub fn ensure_fd_limit(need: u64) {
    if let Err(e) = vkx_host::drill::sandbox::ensure_fd_limit(need) {
        panic!("{e:#}: raise the hard limit (ulimit -Hn) or pass a smaller N");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_binary_older_than_a_source_is_stale() {
        for name in ["vkx-host", "vkx-guest"] {
            assert!(newer_source(name, SystemTime::UNIX_EPOCH).is_some());
            let future = SystemTime::now() + Duration::from_secs(86_400);
            assert_eq!(newer_source(name, future), None);
        }
    }
}
