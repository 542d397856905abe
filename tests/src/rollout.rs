//! The operator's side of the rollout tests: `vkx-host rollout ...` as a
//! process, signing keys, and host.toml's `[rollout]` table. Shared by
//! `tests/rollout_e2e.rs` and the kill-switch chaos case
//! (`tests/chaos_g.rs`).

use std::path::Path;
use std::process::Output;

use crate::run;

/// The key id every rollout test trusts.
pub const KEY_ID: &str = "release";

/// A process's stdout and stderr, for assertions and failure reports.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `vkx-host rollout ARGS --config CONFIG`, whatever its outcome.
pub fn rollout_output(config: &Path, args: &[&str]) -> Output {
    let cfg = config.display().to_string();
    let mut all = vec!["rollout"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", &cfg]);
    run("vkx-host", &all, b"")
}

/// `vkx-host rollout ARGS --config CONFIG`, which must succeed; what it said.
pub fn rollout(config: &Path, args: &[&str]) -> String {
    let o = rollout_output(config, args);
    assert!(o.status.success(), "rollout {args:?}: {}", text(&o));
    text(&o)
}

/// The same, which must fail; what it said.
pub fn rollout_fails(config: &Path, args: &[&str]) -> String {
    let o = rollout_output(config, args);
    assert!(
        !o.status.success(),
        "rollout {args:?} succeeded: {}",
        text(&o)
    );
    text(&o)
}

/// A signing key at `path` (`rollout keygen`); returns its public key.
pub fn keygen(path: &Path) -> String {
    let o = run(
        "vkx-host",
        &["rollout", "keygen", "--out", &path.display().to_string()],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
        .lines()
        .find_map(|l| l.strip_prefix("public_key = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_owned()
}

/// host.toml's `[metrics]` and `[rollout]` tables for node `node`:
/// `source` lines go inside `[rollout]`, then the trusted key ([`KEY_ID`],
/// `public`), then `tables` (e.g. `[rollout.etcd]`).
pub fn host_extra(metrics: &Path, node: &str, source: &str, tables: &str, public: &str) -> String {
    format!(
        "[metrics]\nsocket = \"{}\"\n\n[rollout]\n{source}\nnode_name = \"{node}\"\n\n\
         [[rollout.trusted_key]]\nid = \"{KEY_ID}\"\npublic_key = \"{public}\"\n\n{tables}\n",
        metrics.display()
    )
}
