//! `vkx-host rollout run` against a real etcd (loopback, its own data
//! directory), as a process: a clean walk through four rings, a halt on a
//! bad ring, the controller lock, and a resume after `kill -9`.
//!
//! The fleet's health is faked: a thread of the test publishes one node's
//! cumulative summary (the JSON `vkx-host serve` publishes) under
//! `/vkx/health/node-a` every 200 ms. Bakes are 1 s.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vkx_e2e::etcd::Etcd;
use vkx_e2e::rollout::{KEY_ID, host_extra, keygen, text};
use vkx_e2e::{bin, run};

const DOC_KEY: &str = "/vkx/rollout/document";
const LOCK_KEY: &str = "/vkx/rollout/controller/key-release";
const PROGRESS_KEY: &str = "/vkx/rollout/controller/key-release/progress";
const RINGS: [&str; 4] = ["canary", "1pct", "10pct", "all"];

const DOCUMENT: &str = r#"{"format":1,"revision":1,"issued_at":1,"rings":[
  {"name":"canary","vm_ids":["vm-1"]},{"name":"1pct","buckets_below":100},
  {"name":"10pct","buckets_below":1000},{"name":"all","buckets_below":10000}],
  "features":{"key-release":{"stage":null,"killed":false}}}"#;

fn plan(bake_s: u64) -> String {
    format!(
        "format = 1\nfeature = \"key-release\"\nrings = [\"canary\", \"1pct\", \"10pct\", \"all\"]\n\
         bake_s = {bake_s}\npoll_ms = 500\n\
         [sample]\nmin_requests = 10\nmin_sessions = 2\n\
         [[gate]]\nmetric = \"errors\"\nmax = 5\n\
         [[gate]]\nmetric = \"error_rate\"\nratio = 2.0\nslack = 0.01\n"
    )
}

/// An etcd, a host.toml pointing at it, a signing key, a document.
struct Setup {
    etcd: Etcd,
    dir: tempfile::TempDir,
    config: PathBuf,
    key: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = d.join("release.key");
        let public = keygen(&key);
        let config = d.join("host.toml");
        let extra = host_extra(
            &d.join("metrics.sock"),
            "node-a",
            "source = \"etcd\"",
            &format!(
                "[rollout.etcd]\nendpoints = [\"{}\"]\nkey = \"{DOC_KEY}\"\n",
                etcd.endpoint()
            ),
            &public,
        );
        std::fs::write(
            &config,
            format!(
                "node_dir = \"{0}/node\"\nregistry = \"{0}/registry\"\npolicy = \"{0}/policy.toml\"\n\
                 [[unix_listener]]\npath = \"{0}/vkx.sock\"\nvm_id = \"vm-1\"\n\n{extra}",
                d.display()
            ),
        )
        .unwrap();
        let doc = d.join("doc.json");
        std::fs::write(&doc, DOCUMENT).unwrap();
        let o = run(
            "vkx-host",
            &[
                "rollout",
                "sign",
                "--key",
                &s(&key),
                "--key-id",
                KEY_ID,
                "--file",
                &s(&doc),
            ],
            b"",
        );
        assert!(o.status.success(), "{}", text(&o));
        etcd.put(DOC_KEY, &o.stdout);
        Self {
            etcd,
            dir,
            config,
            key,
        }
    }

    fn plan_file(&self, bake_s: u64) -> PathBuf {
        let p = self.dir.path().join(format!("plan-{bake_s}.toml"));
        std::fs::write(&p, plan(bake_s)).unwrap();
        p
    }

    fn args(&self, plan: &Path, report: &Path) -> Vec<String> {
        [
            "rollout",
            "run",
            "--plan",
            &s(plan),
            "--config",
            &s(&self.config),
            "--key",
            &s(&self.key),
            "--key-id",
            KEY_ID,
            "--report",
            &s(report),
            "--lock-ttl-s",
            "2",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn run(&self, plan: &Path, report: &Path) -> Output {
        let args = self.args(plan, report);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("vkx-host", &args, b"")
    }

    fn spawn(&self, plan: &Path, report: &Path) -> Child {
        Command::new(bin("vkx-host"))
            .args(self.args(plan, report))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn get(&self, key: &str) -> String {
        self.etcd.etcdctl_ok(&["get", key, "--print-value-only"])
    }

    fn document(&self) -> serde_json::Value {
        serde_json::from_str(&self.get(DOC_KEY)).unwrap()
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Publishes node-a's cumulative health summary every 200 ms until
/// dropped: per tick and ring 5 sessions and 50 key-release requests,
/// and in `bad` (if any) 10 `unknown-message` errors sent.
struct Fleet {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fleet {
    fn start(etcd: &Etcd, bad: Option<&'static str>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let endpoint = etcd.endpoint();
        let flag = stop.clone();
        let started = unix();
        let publish = move |tick: u64| {
            let mut rings = serde_json::Map::new();
            for ring in RINGS.iter().copied().chain(["(none)"]) {
                let errors = if Some(ring) == bad {
                    serde_json::json!({ "unknown-message": 10 * tick })
                } else {
                    serde_json::json!({})
                };
                rings.insert(
                    ring.to_owned(),
                    serde_json::json!({
                        "sessions": 5 * tick, "lost": 0, "attest_failed": 0,
                        "errors_sent": errors, "errors_received": {},
                        "features": {"key-release": {
                            "requests": 50 * tick, "grants": 50 * tick, "refusals": {},
                            "enabled_sessions": 5
                        }}
                    }),
                );
            }
            let summary = serde_json::json!({
                "format": 1, "node": "node-a", "at_unix": unix(), "started_unix": started,
                "revision": 0, "rings": rings, "suppressed": 0
            });
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(["put", "/vkx/health/node-a", &summary.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            assert!(out.unwrap().success(), "etcdctl put of the health summary");
        };
        publish(0);
        let thread = std::thread::spawn(move || {
            let mut tick = 1;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                publish(tick);
                tick += 1;
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_healthy_rollout_walks_every_ring_and_completes() {
    let s = Setup::new();
    let _fleet = Fleet::start(&s.etcd, None);
    let report_file = s.dir.path().join("report.json");
    let t0 = Instant::now();
    let o = s.run(&s.plan_file(1), &report_file);
    let took = t0.elapsed();
    println!("{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let doc = s.document();
    assert_eq!(doc["document"]["features"]["key-release"]["stage"], "all");
    assert_eq!(doc["document"]["revision"], 5, "one signed write per ring");
    assert!(doc["signature"].is_object());
    let r = report(&report_file);
    assert_eq!(r["report"]["outcome"], "completed");
    assert_eq!(r["report"]["history"].as_array().unwrap().len(), 4);
    let events = r["events"].as_array().unwrap();
    assert_eq!(
        events.iter().filter(|e| e["event"] == "stage_set").count(),
        4
    );
    assert!(text(&o).contains("completed"));
    // Four bakes of 1 s and their polls.
    assert!(took < Duration::from_secs(20), "{took:?}");
    // The lock is gone, the record says done.
    assert_eq!(s.get(LOCK_KEY), "");
    assert!(s.get(PROGRESS_KEY).contains("\"done\""));
}

#[test]
fn a_bad_ring_halts_the_rollout_with_an_unsigned_kill() {
    let s = Setup::new();
    let _fleet = Fleet::start(&s.etcd, Some("1pct"));
    let report_file = s.dir.path().join("report.json");
    let o = s.run(&s.plan_file(1), &report_file);
    println!("{}", text(&o));
    assert_eq!(o.status.code(), Some(3), "halted: {}", text(&o));
    let doc = s.document();
    let entry = &doc["document"]["features"]["key-release"];
    assert_eq!(entry["killed"], true);
    assert_eq!(entry["stage"], "1pct", "the kill keeps the stage");
    assert_eq!(
        doc["document"]["revision"], 4,
        "canary, 1pct, then the kill"
    );
    assert!(doc.get("signature").is_none(), "the kill is unsigned");
    let r = report(&report_file);
    assert_eq!(r["report"]["outcome"], "halted");
    assert_eq!(r["report"]["ring"], "1pct");
    assert!(text(&o).contains("HALTED at 1pct"), "{}", text(&o));
    assert!(
        r["report"]["reason"].as_str().unwrap().contains("errors ="),
        "{r}"
    );
    // Running it again: the record says halted, nothing is written.
    let again = s.run(&s.plan_file(1), &report_file);
    assert_eq!(again.status.code(), Some(3), "{}", text(&again));
    assert_eq!(s.document()["document"]["revision"], 4);
}

#[test]
fn one_controller_per_rollout_and_a_killed_one_resumes_where_it_stopped() {
    let s = Setup::new();
    let _fleet = Fleet::start(&s.etcd, None);
    let plan = s.plan_file(3);
    let mut first = s.spawn(&plan, &s.dir.path().join("first.json"));
    // Wait for the first stage and the record of its bake.
    let t0 = Instant::now();
    while !s.get(PROGRESS_KEY).contains("\"baking\"") {
        assert!(t0.elapsed() < Duration::from_secs(15), "no bake began");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.document()["document"]["revision"], 2);
    assert!(s.get(LOCK_KEY).contains("pid"));

    // (c) A second controller on the same feature is refused.
    let second = s.run(&plan, &s.dir.path().join("second.json"));
    assert_eq!(second.status.code(), Some(6), "{}", text(&second));
    assert!(
        text(&second).contains("another controller runs the rollout of key-release"),
        "{}",
        text(&second)
    );

    // (d) kill -9 mid-bake; the lock expires with its lease (2 s).
    first.kill().unwrap();
    first.wait().unwrap();
    let killed_at = Instant::now();
    while !s.get(LOCK_KEY).is_empty() {
        assert!(killed_at.elapsed() < Duration::from_secs(10), "lock kept");
        std::thread::sleep(Duration::from_millis(100));
    }
    let report_file = s.dir.path().join("third.json");
    let third = s.run(&plan, &report_file);
    println!("{}", text(&third));
    assert_eq!(third.status.code(), Some(0), "{}", text(&third));
    let r = report(&report_file);
    let events = r["events"].as_array().unwrap();
    assert_eq!(events[0]["event"], "started");
    assert_eq!(events[0]["resumed"], true);
    assert_eq!(events[0]["step"], 0, "resumed at the canary's bake");
    let stages: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "stage_set")
        .map(|e| e["ring"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["1pct", "10pct", "all"], "no second canary write");
    assert_eq!(s.document()["document"]["revision"], 5);
    // The record keeps the first controller's write too.
    let writes: Vec<u64> = r["report"]["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(writes, [2, 3, 4, 5]);
}
