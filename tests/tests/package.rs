//! What the .deb packages ship besides the binaries (`make package`,
//! `[package.metadata.deb]` of host/ and guest/): the default configs
//! under /etc/vkx (conffiles), the documented examples, the man pages and
//! shell completions the binaries generate. The configs are parsed with the
//! agents' own loaders, so a shipped file the agent would refuse fails
//! here, not on an operator's node. The package build itself (release
//! binaries, cargo-deb, lintian) is `make package`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::Command;

use vkx_e2e::bin;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_shipped_host_configs_are_what_vkx_host_accepts() {
    use vkx_host::config::ServeConfig;
    let example = repo("host/dist/examples/host.toml");
    ServeConfig::load(&example).unwrap_or_else(|e| panic!("the example: {e:#}"));
    // The default names no guest yet: refused for that alone, accepted
    // once the operator adds a listener.
    let default = repo("host/dist/host.toml");
    let e = ServeConfig::load(&default).unwrap_err();
    assert!(format!("{e:#}").contains("no listener"), "{e:#}");
    let text = std::fs::read_to_string(&default).unwrap()
        + "\n[[hybrid_vsock]]\npath = \"/run/vkx/vm-18.vsock\"\nvm_id = \"vm-18\"\n";
    ServeConfig::from_text(&default, &text).unwrap_or_else(|e| panic!("the default: {e:#}"));
    for file in ["host/dist/policy.toml", "host/dist/examples/policy.toml"] {
        vkx_host::policy::Policy::load(&repo(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn the_shipped_guest_configs_are_what_vkx_guest_accepts() {
    for file in ["guest/dist/guest.toml", "guest/dist/examples/guest.toml"] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        vkx_guest::config::Config::from_toml(&text).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}

#[test]
fn each_binary_writes_a_man_page_per_command_and_completion_scripts() {
    for (name, pages) in [
        (
            "vkx-host",
            &[
                "vkx-host.1",
                "vkx-host-keys-rotate.1",
                "vkx-host-rollout-kill.1",
                "vkx-host-vtpm-provision.1",
            ][..],
        ),
        (
            "vkx-guest",
            &["vkx-guest.1", "vkx-guest-once.1", "vkx-guest-run.1"][..],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(bin(name))
            .args(["manpages", "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{name} manpages: {o:?}");
        for page in pages {
            let text = std::fs::read_to_string(dir.path().join(page))
                .unwrap_or_else(|e| panic!("{name}: {page}: {e}"));
            assert!(text.starts_with(".ie \\n(.g .ds Aq"), "{page} is not roff");
            assert!(text.contains(".SH NAME"), "{page}");
        }
        // No page for clap's own `help` pseudo-command.
        let help = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("-help")
            })
            .count();
        assert_eq!(help, 0, "{name}: a man page of `help`");
        for (shell, marker) in [
            ("bash", "complete -F"),
            ("zsh", "#compdef"),
            ("fish", "complete -c"),
        ] {
            let o = Command::new(bin(name))
                .args(["completions", shell])
                .output()
                .unwrap();
            assert!(o.status.success(), "{name} completions {shell}: {o:?}");
            let script = String::from_utf8(o.stdout).unwrap();
            assert!(
                script.contains(marker) && script.contains(name),
                "{name} {shell}"
            );
        }
    }
}

#[test]
fn the_shipped_examples_are_the_readmes_tables() {
    // The README documents host.toml and guest.toml in one block each; the
    // packages ship the same text as their examples.
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    for file in [
        "host/dist/examples/host.toml",
        "guest/dist/examples/guest.toml",
    ] {
        let example = std::fs::read_to_string(repo(file)).unwrap();
        assert!(
            readme.contains(&format!("```toml\n{example}```\n")),
            "{file} differs from its README block: copy the block again"
        );
    }
}
