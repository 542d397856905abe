//! The health signals of the staged rollout end to end, as processes: a
//! real `vkx-host serve` with swtpm as the guest's vTPM and `vkx-guest
//! run` holding a session, publishing its summary (host/src/health.rs)
//! to the local file with the file source and to a real etcd on loopback
//! under a lease with the etcd source.
//!
//! What is asserted: the guest's session and key request are counted,
//! in the metrics and in the published summary, to the ring the rollout
//! document puts the VM in (or to "(none)" without a document); the
//! summary parses strictly; a host killed without a chance to clean up
//! loses its etcd entry when the lease runs out.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::Path;
use std::time::{Duration, Instant};

use vkx_e2e::agents::{Agent, Deployment, scrape, value};
use vkx_e2e::etcd::Etcd;
use vkx_e2e::rollout::{host_extra, keygen, text};
use vkx_e2e::run;
use vkx_host::health::{HealthSummary, NO_RING};

/// Bound for anything that follows within a few publish intervals.
const LIMIT: Duration = Duration::from_secs(20);
/// The publish interval the tests configure (the least allowed).
const INTERVAL: &str = "health_interval_ms = 500";
const POLL: Duration = Duration::from_millis(100);

fn keys(d: &Deployment) {
    let node = d.node.node_dir();
    let o = run(
        "vkx-host",
        &[
            "keys",
            "generate",
            "disk",
            "--node-dir",
            &node,
            "--allow-image",
            "img",
        ],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o));
}

fn guest(d: &Deployment) -> Agent {
    let pin = d.node.pin().to_owned();
    let key_dir = d.path("keys");
    let cfg = d.guest_config(
        "guest.toml",
        &d.socket(),
        &pin,
        &format!("keys = [\"disk\"]\nkey_dir = \"{}\"\n", key_dir.display()),
    );
    let g = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &cfg.display().to_string()],
        d.path("guest.log"),
    );
    g.wait_log(LIMIT, "the daemon's key", |l| l.contains("key delivered"));
    g
}

/// Waits until `read` gives a summary that satisfies `pred`.
fn wait_summary(
    what: &str,
    read: impl Fn() -> Option<Vec<u8>>,
    pred: impl Fn(&HealthSummary) -> bool,
) -> HealthSummary {
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < LIMIT {
        if let Some(bytes) = read() {
            let s = HealthSummary::parse(&bytes).expect("the published summary parses");
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(POLL);
    }
    panic!("{what}: not within {LIMIT:?}; last summary: {last:?}");
}

fn release(s: &HealthSummary, ring: &str) -> (u64, u64, u64) {
    let Some(r) = s.rings.get(ring) else {
        return (0, 0, 0);
    };
    let f = r.features.get("key-release").cloned().unwrap_or_default();
    (r.sessions, f.requests, f.grants)
}

#[test]
fn the_file_store_counts_sessions_and_requests_per_ring() {
    let d = Deployment::new("vm-1", "");
    keys(&d);
    let signer = d.path("release.key");
    let public = keygen(&signer);
    let doc = d.path("rollout.json");
    let metrics = d.path("metrics.sock");
    d.write_host_config(&host_extra(
        &metrics,
        "node-a",
        &format!(
            "source = \"file\"\nfile = \"{}\"\n{INTERVAL}",
            doc.display()
        ),
        "",
        &public,
    ));
    let host = d.start_host("host.log");
    let g = guest(&d);

    // No document: the VM is in no ring.
    let file = Path::new(&d.node.node_dir()).join("rollout/health.json");
    let read = || std::fs::read(&file).ok();
    let s = wait_summary("the first summary", read, |s| {
        release(s, NO_RING) >= (1, 1, 1)
    });
    assert_eq!(s.node, "node-a");
    assert_eq!(s.revision, 0);
    let m = scrape(&metrics);
    assert_eq!(
        value(
            &m,
            "vkx_health_requests_total{ring=\"(none)\",feature=\"key-release\"}"
        ),
        1
    );
    assert_eq!(
        value(
            &m,
            "vkx_health_grants_total{ring=\"(none)\",feature=\"key-release\"}"
        ),
        1
    );
    assert!(value(&m, "vkx_health_publishes_total{result=\"ok\"}") >= 1);

    // A signed document with a canary ring that names the VM: the session
    // takes its ring with the change; a second guest's session and key
    // request count to it.
    let document = "{\"format\":1,\"revision\":1,\"issued_at\":0,\
         \"rings\":[{\"name\":\"canary\",\"vm_ids\":[\"vm-1\"]},{\"name\":\"rest\",\"buckets_below\":10000}],\
         \"features\":{\"key-release\":{\"stage\":\"rest\",\"killed\":false}}}";
    let unsigned = d.path("doc.json");
    std::fs::write(&unsigned, document).unwrap();
    let o = run(
        "vkx-host",
        &[
            "rollout",
            "sign",
            "--key",
            &signer.display().to_string(),
            "--key-id",
            vkx_e2e::rollout::KEY_ID,
            "--file",
            &unsigned.display().to_string(),
            "--out",
            &d.path("signed.json").display().to_string(),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o));
    let said = vkx_e2e::rollout::rollout(
        &d.host_config(),
        &[
            "push",
            "--file",
            &d.path("signed.json").display().to_string(),
        ],
    );
    assert!(said.contains("revision 1"), "{said}");
    vkx_e2e::agents::wait_value(&metrics, "vkx_rollout_revision", 1);
    assert_eq!(g.stop().code(), Some(0));
    let g = guest(&d);
    let s = wait_summary("the canary's counts", read, |s| {
        s.revision == 1 && release(s, "canary") >= (1, 1, 1)
    });
    assert!(
        s.rings.contains_key("rest"),
        "every ring is published: {s:?}"
    );
    assert_eq!(release(&s, "rest"), (0, 0, 0));
    assert_eq!(g.stop().code(), Some(0));
    assert_eq!(host.stop().code(), Some(0));
}

#[test]
fn the_etcd_store_publishes_under_a_lease_that_expires_with_the_host() {
    let etcd = Etcd::start();
    let d = Deployment::new("vm-1", "");
    keys(&d);
    let public = keygen(&d.path("release.key"));
    let metrics = d.path("metrics.sock");
    d.write_host_config(&host_extra(
        &metrics,
        "node-a",
        &format!("source = \"etcd\"\n{INTERVAL}"),
        &format!(
            "[rollout.etcd]\nendpoints = [\"{}\"]\nkey = \"/vkx/rollout\"\n\
             timeout_ms = 1000\nbackoff_cap_ms = 1000\nreconnect_spread_ms = 200\n",
            etcd.endpoint()
        ),
        &public,
    ));
    let host = d.start_host("host.log");
    let g = guest(&d);
    let read = || {
        let out = etcd.etcdctl_ok(&["get", "/vkx/health/node-a", "--print-value-only"]);
        let v = out.trim_end_matches('\n');
        (!v.is_empty()).then(|| v.as_bytes().to_vec())
    };
    let s = wait_summary("the summary in etcd", read, |s| {
        release(s, NO_RING) >= (1, 1, 1)
    });
    assert_eq!(s.node, "node-a");
    // The key is held under a lease.
    let meta = etcd.etcdctl_ok(&["get", "/vkx/health/node-a", "-w", "json"]);
    assert!(
        meta.contains("\"lease\":") && !meta.contains("\"lease\":0"),
        "{meta}"
    );
    // Killed (no orderly close): the lease runs out, the entry goes.
    host.kill();
    let t = Instant::now();
    while read().is_some() {
        assert!(t.elapsed() < LIMIT, "the dead node's entry did not expire");
        std::thread::sleep(POLL);
    }
    eprintln!(
        "a killed host's health entry expired after {:?}",
        t.elapsed()
    );
    drop(g);
}
