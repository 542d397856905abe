//! Helpers for the end-to-end tests, which run the real `vkx-host` and
//! `vkx-guest` binaries as separate processes.

#![forbid(unsafe_code)]
// Test support: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod node;
pub mod swtpm;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Path of a workspace binary, built by `make test` (or `cargo build
/// --workspace --bins`) before the tests run. Fails loudly if it is not
/// there: a test that silently skips is worse than none.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let path = target.join(profile).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `make test`, or `cargo build --workspace --bins` first",
        path.display()
    );
    path
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
