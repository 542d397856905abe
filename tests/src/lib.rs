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

/// Path of a workspace binary, freshly built. `cargo test` does not
/// rebuild another package's binaries, so the first call runs `cargo build
/// --bins` for the agents (quick when nothing changed); a stale binary
/// would make the tests check old code. Fails loudly if the build fails.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bins", "-p", "vkx-host", "-p", "vkx-guest"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // Cargo gives a test process the variables of its own package
        // (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...). A build script that
        // watches one of them (ring's watches CARGO_MANIFEST_DIR) would
        // see it change between `make`'s builds and this one, and every
        // crate above it would be rebuilt each time.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k == "CARGO_MANIFEST_DIR"
                || k == "CARGO_MANIFEST_PATH"
                || k == "CARGO_CRATE_NAME"
                || k == "CARGO_PRIMARY_PACKAGE"
                || k == "CARGO_TARGET_TMPDIR"
                || k == "CARGO_RUSTC_CURRENT_DIR"
                || k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_EXE_")
            {
                cmd.env_remove(&key);
            }
        }
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the agents");
        assert!(status.success(), "cargo build --bins failed");
    });
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
        "{} is missing after the build",
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

/// Raises this process's soft limit of open files to `need` (children
/// inherit it), up to the hard limit: the drills' own
/// (`vkx_host::drill::sandbox::ensure_fd_limit`), failing the run if it
/// cannot.
pub fn ensure_fd_limit(need: u64) {
    if let Err(e) = vkx_host::drill::sandbox::ensure_fd_limit(need) {
        panic!("{e:#}: raise the hard limit (ulimit -Hn) or pass a smaller N");
    }
}
