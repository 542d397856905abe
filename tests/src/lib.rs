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

use std::path::{Path, PathBuf};
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
    if let Some(newer) = newer_source(&path, name, built) {
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

/// The manifests and lock file both agents are built from (their source
/// files are listed by cargo's dep-info file beside each binary).
const AGENT_MANIFESTS: &[&str] = &["Cargo.lock", "common/Cargo.toml", "guest/Cargo.toml"];

/// What only `vkx-host` is built from (it links the guest agent for the
/// drills; the guest does not link the host).
const HOST_MANIFESTS: &[&str] = &["host/Cargo.toml"];

/// Source directories scanned when a binary has no dep-info file.
const SOURCE_DIRS: &[&str] = &["common/src", "guest/src", "host/src"];

/// Longest dep-info file read (cargo's `<binary>.d`; a few KiB here).
const MAX_DEP_INFO: u64 = 1 << 20;

/// Entries scanned at most per directory while looking for a source newer
/// than a binary (the crates hold about a hundred files each).
const MAX_SOURCE_ENTRIES: usize = 4096;

/// A file binary `name` (at `binary`) is built from, modified after
/// `built`, if any. The source files are the ones cargo's dep-info file
/// `<binary>.d` lists, exactly what was compiled in: a file behind a
/// feature the binary does not enable (`vkx_common::testing`) does not
/// count. Without that file, every file of the crates' `src` counts.
fn newer_source(binary: &Path, name: &str, built: std::time::SystemTime) -> Option<PathBuf> {
    let root = workspace_root();
    let host = if name == "vkx-host" {
        HOST_MANIFESTS
    } else {
        &[]
    };
    let mut stack: Vec<PathBuf> = AGENT_MANIFESTS
        .iter()
        .chain(host)
        .map(|p| root.join(p))
        .collect();
    match dep_info_sources(&binary.with_extension("d")) {
        Some(sources) => stack.extend(sources),
        None => stack.extend(SOURCE_DIRS.iter().map(|d| root.join(d))),
    }
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

/// The files a dep-info file (`target: dep dep ...`, spaces in a path
/// escaped as `\ `) names on its first line; `None` if it is missing,
/// too long or not in that form.
fn dep_info_sources(path: &Path) -> Option<Vec<PathBuf>> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_DEP_INFO + 1)
        .read_to_string(&mut text)
        .ok()?;
    if text.len() as u64 > MAX_DEP_INFO {
        return None;
    }
    let line = text.lines().next()?;
    let (_, deps) = line.split_once(": ")?;
    let deps = deps.replace("\\ ", "\u{0}");
    let files: Vec<PathBuf> = deps
        .split_whitespace()
        .map(|d| PathBuf::from(d.replace('\u{0}', " ")))
        .collect();
    (!files.is_empty()).then_some(files)
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
        let dir = std::env::temp_dir().join(format!("vkx-bin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("vkx-guest");
        let (listed, unlisted) = (dir.join("listed.rs"), dir.join("unlisted.rs"));
        for f in [&binary, &listed, &unlisted] {
            std::fs::write(f, b"").unwrap();
        }
        std::fs::write(
            binary.with_extension("d"),
            format!("{}: {}\n", binary.display(), listed.display()),
        )
        .unwrap();
        // After every manifest's time: only the listed file can make it stale.
        let built = SystemTime::now() + Duration::from_secs(86_400);
        let set = |f: &Path, t: SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        set(&listed, built - Duration::from_secs(10));
        set(&unlisted, built + Duration::from_secs(10));
        assert_eq!(newer_source(&binary, "vkx-guest", built), None);
        set(&listed, built + Duration::from_secs(10));
        assert_eq!(newer_source(&binary, "vkx-guest", built), Some(listed));
        // Without a dep-info file: every source of the crates counts.
        std::fs::remove_file(binary.with_extension("d")).unwrap();
        assert!(newer_source(&binary, "vkx-host", SystemTime::UNIX_EPOCH).is_some());
        assert_eq!(
            newer_source(&binary, "vkx-host", built + Duration::from_secs(86_400)),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dep_info_file_names_its_sources() {
        let dir = std::env::temp_dir().join(format!("vkx-dep-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.join("x.d");
        std::fs::write(&d, "/t/x: /a/b.rs /c/d\\ e.rs\n\n/a/b.rs:\n").unwrap();
        assert_eq!(
            dep_info_sources(&d),
            Some(vec![PathBuf::from("/a/b.rs"), PathBuf::from("/c/d e.rs")])
        );
        std::fs::write(&d, "no colon here\n").unwrap();
        assert_eq!(dep_info_sources(&d), None);
        assert_eq!(dep_info_sources(&dir.join("missing.d")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
