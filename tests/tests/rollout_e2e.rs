//! The staged rollout and kill switch end to end, as processes: a real
//! `vkx-host serve` with swtpm as the guest's vTPM, `vkx-guest run`
//! holding a session, `vkx-guest once` as a second guest, and the
//! operator CLI (`vkx-host rollout ...`) writing the document to its
//! source: a file here, a real etcd on loopback in the second test.
//!
//! What is asserted: a kill reaches the live guest (feature-update) and
//! the guest then sends no request for the feature and logs nothing for
//! it; `once` is refused with feature-disabled; an unsigned enable, a
//! forged signature, a replayed older revision and a malformed document
//! are refused with the state kept (metrics say why); a signed unkill is
//! accepted and the daemon asks for its key again; the local override
//! kills when the store is down or full; a restarted host serves the
//! persisted state to its first guest.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use vkx_e2e::agents::{Agent, Deployment, scrape, value};
use vkx_e2e::etcd::{Etcd, EtcdOptions};
use vkx_e2e::rollout::{host_extra, text};
use vkx_e2e::run;

/// Bound for anything that should follow a flip within a second or two.
const LIMIT: Duration = Duration::from_secs(20);
const FAST_RETRY: &str = "[retry]\nbase_ms = 100\ncap_ms = 1000\nfloor_ms = 50\n";
const RELEASE_DISABLED: &str = "key-release=disabled";
const RELEASE_ENABLED: &str = "key-release=enabled";

fn cli(args: &[&str]) -> Output {
    run("vkx-host", args, b"")
}

/// `vkx-host rollout ARGS --config host.toml`, which must succeed.
fn rollout(d: &Deployment, args: &[&str]) -> String {
    vkx_e2e::rollout::rollout(&d.host_config(), args)
}

/// The same, expected to fail; returns what it said.
fn rollout_fails(d: &Deployment, args: &[&str]) -> String {
    vkx_e2e::rollout::rollout_fails(&d.host_config(), args)
}

/// A signing key in the deployment; returns its path and public key.
fn keygen(d: &Deployment, name: &str) -> (PathBuf, String) {
    let path = d.path(name);
    let public = vkx_e2e::rollout::keygen(&path);
    (path, public)
}

const UPDATE: &str = "the host changed the feature states";

/// Waits until the guest has logged its `n`-th feature update; returns
/// that line.
fn wait_update(guest: &Agent, n: usize) -> String {
    let log = guest.wait_log(LIMIT, &format!("feature update {n}"), |l| {
        count(l, UPDATE) >= n
    });
    log.lines()
        .filter(|l| l.contains(UPDATE))
        .nth(n - 1)
        .unwrap()
        .to_owned()
}

/// Waits until the guest's latest feature update satisfies `pred`.
fn wait_last_update(guest: &Agent, what: &str, pred: impl Fn(&str) -> bool) {
    guest.wait_log(LIMIT, what, |l| {
        l.lines().rfind(|x| x.contains(UPDATE)).is_some_and(&pred)
    });
}

/// `etcdctl put` with the value on stdin; false when etcd refused it.
fn try_put(etcd: &Etcd, key: &str, value: &[u8]) -> bool {
    use std::io::Write as _;
    let mut child = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .args(["put", key])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(value);
    child.wait().unwrap().success()
}

/// Scrapes until `series` reads `want`.
fn wait_metric(metrics: &Path, series: &str, want: u64) -> String {
    let t = Instant::now();
    loop {
        let m = scrape(metrics);
        if value(&m, series) == want {
            return m;
        }
        assert!(t.elapsed() < LIMIT, "{series} never reached {want}:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn once(cfg: &str) -> Output {
    run("vkx-guest", &["once", "--config", cfg], b"")
}

fn guest_config(d: &Deployment, pin: &str, name: &str, key_dir: &Path) -> String {
    d.guest_config(
        name,
        &d.socket(),
        pin,
        &format!(
            "keys = [\"disk\"]\nkey_dir = \"{}\"\n{FAST_RETRY}",
            key_dir.display()
        ),
    )
    .display()
    .to_string()
}

/// The daemon's log lines after the `n`-th feature update that matched.
fn lines_after(log: &str, marker: &str) -> Vec<String> {
    let start = log.rfind(marker).unwrap_or(0);
    log[start..].lines().skip(1).map(str::to_owned).collect()
}

fn keys(d: &Deployment) {
    let node = d.node.node_dir();
    let o = cli(&[
        "keys",
        "generate",
        "disk",
        "--node-dir",
        &node,
        "--allow-image",
        "img",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn the_kill_switch_through_the_file_source() {
    let d = Deployment::new("vm-1", "");
    let pin = d.node.pin().to_owned();
    keys(&d);
    let (key, public) = keygen(&d, "release.key");
    let (other_key, _) = keygen(&d, "other.key");
    let doc = d.path("rollout.json");
    let metrics = d.path("metrics.sock");
    d.write_host_config(&host_extra(
        &metrics,
        "node-a",
        &format!("source = \"file\"\nfile = \"{}\"", doc.display()),
        "",
        &public,
    ));
    let key_dir = d.path("keys");
    let daemon_cfg = guest_config(&d, &pin, "guest.toml", &key_dir);
    let once_dir = d.path("once-keys");
    let once_cfg = guest_config(&d, &pin, "once.toml", &once_dir);
    let host = d.start_host("host.log");
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &daemon_cfg],
        d.path("guest.log"),
    );
    guest.wait_log(LIMIT, "the daemon's key", |l| l.contains("key delivered"));
    let m = scrape(&metrics);
    assert_eq!(value(&m, "vkx_rollout_revision"), 0, "no document yet");
    assert_eq!(
        value(
            &m,
            "vkx_feature_sessions{feature=\"key-release\",state=\"enabled\"}"
        ),
        1
    );

    // 1. Kill key-release: one command, no key. The live guest is told.
    let t = Instant::now();
    let said = rollout(&d, &["kill", "key-release"]);
    assert!(said.contains("killed at revision 1"), "{said}");
    let update = wait_update(&guest, 1);
    let kill_to_guest = t.elapsed();
    assert!(update.contains(RELEASE_DISABLED), "{update}");
    let log = guest.log();
    let m = wait_metric(&metrics, "vkx_feature_updates_sent_total", 1);
    assert_eq!(value(&m, "vkx_rollout_revision"), 1);
    assert_eq!(
        value(&m, "vkx_rollout_feature_killed{feature=\"key-release\"}"),
        1
    );
    assert_eq!(
        value(
            &m,
            "vkx_feature_sessions{feature=\"key-release\",state=\"disabled\"}"
        ),
        1
    );
    assert_eq!(count(&log, UPDATE), 1);
    eprintln!("kill -> live guest told: {kill_to_guest:?}");

    // 2. A second guest's `once` is refused with feature-disabled (exit 4).
    let o = once(&once_cfg);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("feature-disabled"), "{}", text(&o));
    assert!(!once_dir.join("disk").exists());

    // 2b. A daemon that attests while key-release is off sends no key
    //     request and logs nothing about it.
    assert_eq!(guest.stop().code(), Some(0));
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &daemon_cfg],
        d.path("guest-2.log"),
    );
    let log = guest.wait_log(LIMIT, "the second daemon's session", |l| {
        l.contains("attested")
    });
    assert!(log.contains(RELEASE_DISABLED), "{log}");

    // 3. Widening without a key: the CLI refuses before writing; written
    //    by hand, an unsigned enable, a forged signature and garbage are
    //    refused by the host, which keeps revision 1.
    let said = rollout_fails(&d, &["unkill", "key-release"]);
    assert!(said.contains("must be signed"), "{said}");
    let killed = std::fs::read(&doc).unwrap();
    let unsigned_enable = String::from_utf8(killed.clone())
        .unwrap()
        .replace("\"revision\":1", "\"revision\":2")
        .replace("{\"key-release\":{\"stage\":null,\"killed\":true}}", "{}");
    assert_ne!(unsigned_enable.as_bytes(), &killed[..], "the edit applied");
    write_doc(&doc, unsigned_enable.as_bytes());
    wait_metric(
        &metrics,
        "vkx_rollout_documents_refused_total{reason=\"unsigned-widening\"}",
        1,
    );
    let forged = sign_file(&other_key, &d.path("enable.json"), &unsigned_enable);
    write_doc(&doc, &forged);
    wait_metric(
        &metrics,
        "vkx_rollout_documents_refused_total{reason=\"bad-signature\"}",
        1,
    );
    write_doc(&doc, b"{\"document\": 17}");
    let m = wait_metric(
        &metrics,
        "vkx_rollout_documents_refused_total{reason=\"malformed\"}",
        1,
    );
    assert_eq!(value(&m, "vkx_rollout_revision"), 1, "state kept");
    assert_eq!(
        value(&m, "vkx_feature_updates_sent_total"),
        1,
        "nothing sent"
    );
    // Put the accepted document back so the CLI reads a good one.
    write_doc(&doc, &killed);

    // 4. A signed unkill: accepted; the daemon asks for the key it could
    //    not ask for (after its U[0, 10 s] delay), once.
    let k = key.display().to_string();
    let said = rollout(
        &d,
        &["unkill", "key-release", "--key", &k, "--key-id", "release"],
    );
    assert!(said.contains("revision 2"), "{said}");
    let signed_enable = std::fs::read(&doc).unwrap();
    let update = wait_update(&guest, 1);
    assert!(update.contains(RELEASE_ENABLED), "{update}");
    let log = guest.wait_log(Duration::from_secs(30), "the key after the unkill", |l| {
        count(l, "key delivered") == 1
    });
    let after_attested = lines_after(&log, "attested");
    let until_unkill: Vec<&String> = after_attested
        .iter()
        .take_while(|l| !l.contains(UPDATE))
        .collect();
    assert!(
        until_unkill.is_empty(),
        "the guest logged while key-release was off: {until_unkill:?}"
    );
    let m = scrape(&metrics);
    assert_eq!(value(&m, "vkx_rollout_revision"), 2);
    assert_eq!(value(&m, "vkx_feature_updates_sent_total"), 2);
    assert_eq!(
        value(&m, "vkx_errors_sent_total{code=\"feature-disabled\"}"),
        0,
        "no request reached the host while the feature was off"
    );
    // Between the kill and the unkill, the host released nothing and
    // refused nothing to the daemon: it sent no request.
    assert_eq!(value(&m, "vkx_keys_released_total"), 2, "{m}");

    // 5. Kill again (revision 3), then replay the signed enable of
    //    revision 2: refused, the kill stays.
    rollout(&d, &["kill", "key-release"]);
    assert!(wait_update(&guest, 2).contains(RELEASE_DISABLED));
    write_doc(&doc, &signed_enable);
    let m = wait_metric(
        &metrics,
        "vkx_rollout_documents_refused_total{reason=\"replay\"}",
        1,
    );
    assert_eq!(value(&m, "vkx_rollout_revision"), 3);
    assert_eq!(
        value(
            &m,
            "vkx_feature_sessions{feature=\"key-release\",state=\"disabled\"}"
        ),
        1
    );
    let shown = rollout(&d, &["show"]);
    assert!(shown.contains("accepted        revision 3"), "{shown}");
    let explained = rollout(&d, &["explain", "--vm", "vm-1"]);
    assert!(
        explained.contains("key-release     disabled"),
        "{explained}"
    );

    // 6. A restarted host serves the persisted kill to its first guest,
    //    whatever the source says now (garbage).
    write_doc(&doc, b"not json");
    drop(guest);
    host.stop();
    let host = d.start_host("host-2.log");
    let o = once(&once_cfg);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("feature-disabled"), "{}", text(&o));
    let m = scrape(&metrics);
    assert_eq!(value(&m, "vkx_rollout_revision"), 3);
    assert!(
        host.log().contains("rollout document restored"),
        "{}",
        host.log()
    );

    // 7. The local override always wins for killing, and only kills.
    let accepted = PathBuf::from(d.node.node_dir()).join("rollout/accepted.json");
    write_doc(&doc, &std::fs::read(accepted).unwrap());
    rollout(
        &d,
        &["unkill", "key-release", "--key", &k, "--key-id", "release"],
    );
    wait_metric(&metrics, "vkx_rollout_revision", 4);
    let o = once(&once_cfg);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    rollout(&d, &["kill", "key-release", "--local"]);
    wait_metric(
        &metrics,
        "vkx_rollout_feature_killed{feature=\"key-release\"}",
        1,
    );
    let o = once(&once_cfg);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    rollout(&d, &["unkill", "key-release", "--local"]);
    wait_metric(
        &metrics,
        "vkx_rollout_feature_killed{feature=\"key-release\"}",
        0,
    );
    let o = once(&once_cfg);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(host.stop().code(), Some(0));
}

#[test]
fn the_kill_switch_through_etcd_holds_when_etcd_fails() {
    // A 4 MiB quota, so that "database space exceeded" is reachable.
    let mut etcd = Etcd::start_with(EtcdOptions {
        quota_backend_bytes: Some(4 * 1024 * 1024),
    });
    let d = Deployment::new("vm-1", "");
    let pin = d.node.pin().to_owned();
    keys(&d);
    let (key, public) = keygen(&d, "release.key");
    let k = key.display().to_string();
    let metrics = d.path("metrics.sock");
    d.write_host_config(&host_extra(
        &metrics,
        "node-a",
        "source = \"etcd\"",
        &format!(
            "[rollout.etcd]\nendpoints = [\"{}\"]\nkey = \"/vkx/rollout\"\n\
             timeout_ms = 1000\nbackoff_cap_ms = 1000\nreconnect_spread_ms = 200\n",
            etcd.endpoint()
        ),
        &public,
    ));
    let key_dir = d.path("keys");
    let daemon_cfg = guest_config(&d, &pin, "guest.toml", &key_dir);
    let host = d.start_host("host.log");
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &daemon_cfg],
        d.path("guest.log"),
    );
    guest.wait_log(LIMIT, "the daemon's key", |l| l.contains("key delivered"));
    wait_metric(&metrics, "vkx_rollout_source_up", 1);

    // 1. A kill through etcd reaches the live guest.
    let t = Instant::now();
    rollout(&d, &["kill", "key-rotation"]);
    assert!(wait_update(&guest, 1).contains("key-rotation=disabled"));
    eprintln!("etcd kill -> live guest told: {:?}", t.elapsed());
    wait_metric(&metrics, "vkx_rollout_revision", 1);
    // While key-rotation is off, a rotation is not pushed (the host looks
    // at the store every 2 s; give it two looks).
    let node = d.node.node_dir();
    let o = cli(&["keys", "rotate", "disk", "--node-dir", &node]);
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(vkx_host::service::KEY_POLL_INTERVAL * 2);
    assert_eq!(value(&scrape(&metrics), "vkx_key_updates_pushed_total"), 0);

    // 2. etcd stops: the host keeps revision 1 and says the source is
    //    down; a local kill still works.
    etcd.stop();
    let m = wait_metric(&metrics, "vkx_rollout_source_up", 0);
    assert_eq!(value(&m, "vkx_rollout_revision"), 1);
    let said = rollout_fails(&d, &["kill", "key-release"]);
    assert!(
        said.contains("--local"),
        "the failure points at the way out: {said}"
    );
    rollout(&d, &["kill", "key-release", "--local"]);
    assert!(wait_update(&guest, 2).contains(RELEASE_DISABLED));
    rollout(&d, &["unkill", "key-release", "--local"]);
    assert!(wait_update(&guest, 3).contains(RELEASE_ENABLED));

    // 3. etcd back: the source is up again; a signed unkill arrives.
    etcd.restart();
    wait_metric(&metrics, "vkx_rollout_source_up", 1);
    rollout(
        &d,
        &["unkill", "key-rotation", "--key", &k, "--key-id", "release"],
    );
    assert!(wait_update(&guest, 4).contains("key-rotation=enabled"));
    // The rotation held back while it was off goes at once.
    wait_metric(&metrics, "vkx_key_updates_pushed_total", 1);
    guest.wait_log(LIMIT, "the held-back rotation", |l| l.contains("version=2"));
    wait_metric(&metrics, "vkx_rollout_revision", 2);

    // 4. Compaction past what the host watched: it reads again and ends
    //    on the latest revision.
    for _ in 0..3 {
        rollout(&d, &["kill", "key-derivation"]);
        rollout(
            &d,
            &[
                "unkill",
                "key-derivation",
                "--key",
                &k,
                "--key-id",
                "release",
            ],
        );
    }
    etcd.compact(etcd.revision());
    rollout(&d, &["kill", "key-derivation"]);
    wait_metric(&metrics, "vkx_rollout_revision", 9);

    // 5. etcd full ("database space exceeded"): the CLI says so and
    //    points at --local; the host keeps its state; a local kill works.
    let filler = vec![b'x'; 200 * 1024];
    let full = (0..60).any(|i| !try_put(&etcd, &format!("/filler/{i}"), &filler));
    assert!(full, "etcd never filled up");
    let said = rollout_fails(&d, &["kill", "key-release"]);
    assert!(said.contains("space"), "{said}");
    assert!(said.contains("--local"), "{said}");
    let m = scrape(&metrics);
    assert_eq!(value(&m, "vkx_rollout_revision"), 9);
    rollout(&d, &["kill", "key-release", "--local"]);
    wait_last_update(&guest, "the local kill", |l| l.contains(RELEASE_DISABLED));
    assert_eq!(host.stop().code(), Some(0));
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Replaces the document file atomically, as an operator's tool would.
fn write_doc(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `vkx-host rollout sign` of `text` with `key` under the trusted id.
fn sign_file(key: &Path, at: &Path, document: &str) -> Vec<u8> {
    std::fs::write(at, document).unwrap();
    let o = cli(&[
        "rollout",
        "sign",
        "--key",
        &key.display().to_string(),
        "--key-id",
        "release",
        "--file",
        &at.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    o.stdout
}
