//! `vkx-host drill --live` with the file store, as processes: a real
//! `vkx-host serve` following a signed document file, swtpm as the
//! guest's vTPM and `vkx-guest run` holding a session with key-release
//! on (spec/ROLLOUT.md §13.5). The etcd store is exercised by the `live`
//! drill scenario (tests/tests/drill.rs), against several hosts.
//!
//! What is asserted: the drill refuses what it cannot measure (a ring the
//! document lacks; a ring with no live session) before writing anything;
//! a run passes, tells the session, and leaves no overlay behind; a run
//! killed with SIGKILL leaves its overlay, which the host takes away by
//! itself when it expires, and the next drill is not blocked by it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)] // The drill's report is the test's report.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vkx_e2e::agents::{Agent, Deployment, scrape, value};
use vkx_e2e::rollout::{KEY_ID, host_extra, keygen, text};
use vkx_e2e::{bin, run};

const LIMIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
/// `--told-bound-ms` and `--restore-bound-ms` of the test drills.
const SLO_BOUND_MS: &str = "10000";
/// The overlay's TTL in these tests (the least allowed).
const TTL_S: &str = "3";

const DOCUMENT: &str = "{\"format\":1,\"revision\":1,\"issued_at\":0,\
     \"rings\":[{\"name\":\"canary\",\"vm_ids\":[\"vm-1\"]},{\"name\":\"empty\",\"vm_ids\":[\"vm-9\"]},\
     {\"name\":\"rest\",\"buckets_below\":10000}],\
     \"features\":{\"key-release\":{\"stage\":\"rest\",\"killed\":false}}}";

const ACTIVE: &str =
    "vkx_live_drill_active{drill=\"{id}\",feature=\"key-release\",ring=\"canary\"}";

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A host on a signed document file, a guest holding its session.
struct Setup {
    d: Deployment,
    host: Agent,
    guest: Agent,
    metrics: std::path::PathBuf,
    overlay: std::path::PathBuf,
}

impl Setup {
    fn new() -> Self {
        let d = Deployment::new("vm-1", "");
        let o = run(
            "vkx-host",
            &[
                "keys",
                "generate",
                "disk",
                "--node-dir",
                &d.node.node_dir(),
                "--allow-image",
                "img",
            ],
            b"",
        );
        assert!(o.status.success(), "{}", text(&o));
        let signer = d.path("release.key");
        let public = keygen(&signer);
        let doc = d.path("rollout.json");
        let metrics = d.path("metrics.sock");
        d.write_host_config(&host_extra(
            &metrics,
            "node-a",
            &format!(
                "source = \"file\"\nfile = \"{}\"\nhealth_interval_ms = 500",
                doc.display()
            ),
            "",
            &public,
        ));
        let unsigned = d.path("doc.json");
        std::fs::write(&unsigned, DOCUMENT).unwrap();
        let o = run(
            "vkx-host",
            &[
                "rollout",
                "sign",
                "--key",
                &s(&signer),
                "--key-id",
                KEY_ID,
                "--file",
                &s(&unsigned),
                "--out",
                &s(&doc),
            ],
            b"",
        );
        assert!(o.status.success(), "{}", text(&o));
        let host = d.start_host("host.log");
        vkx_e2e::agents::wait_value(&metrics, "vkx_rollout_revision", 1);
        let pin = d.node.pin().to_owned();
        let cfg = d.guest_config(
            "guest.toml",
            &d.socket(),
            &pin,
            &format!(
                "keys = [\"disk\"]\nkey_dir = \"{}\"\n",
                d.path("keys").display()
            ),
        );
        let guest = Agent::spawn(
            "vkx-guest",
            &["run", "--config", &s(&cfg)],
            d.path("guest.log"),
        );
        guest.wait_log(LIMIT, "the daemon's key", |l| l.contains("key delivered"));
        let mut overlay = doc.into_os_string();
        overlay.push(".drill");
        let this = Self {
            d,
            host,
            guest,
            metrics,
            overlay: overlay.into(),
        };
        // The summary shows the session with key-release on.
        this.wait_metric(
            "vkx_health_enabled_sessions{ring=\"canary\",feature=\"key-release\"}",
            1,
        );
        std::thread::sleep(Duration::from_millis(1200));
        this
    }

    fn args(&self, ring: &str) -> Vec<String> {
        [
            "drill",
            "--live",
            "--feature",
            "key-release",
            "--ring",
            ring,
            "--config",
            &s(&self.d.host_config()),
            "--ttl-s",
            TTL_S,
            // The SLO bounds are the drill's figures to report, not what this
            // test checks (tests assert behaviour, `make drill` the timing):
            // wide enough that a loaded test machine still sees each step.
            "--told-bound-ms",
            SLO_BOUND_MS,
            "--restore-bound-ms",
            SLO_BOUND_MS,
            "--out",
            &s(&self.d.path("out")),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn drill(&self, ring: &str) -> std::process::Output {
        let args = self.args(ring);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("vkx-host", &args, b"")
    }

    fn wait_metric(&self, series: &str, want: u64) {
        let t = Instant::now();
        loop {
            let m = scrape(&self.metrics);
            if value(&m, series) == want {
                return;
            }
            assert!(t.elapsed() < LIMIT, "{series} never reached {want}:\n{m}");
            std::thread::sleep(POLL);
        }
    }
}

#[test]
fn a_file_store_live_drill_measures_restores_and_a_killed_one_expires() {
    let setup = Setup::new();

    // Refused before anything is written: a ring the document lacks, a
    // ring without a live session.
    for (ring, why) in [
        ("nosuch", "is not in the document"),
        ("empty", "no live session"),
    ] {
        let o = setup.drill(ring);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(why), "{}", text(&o));
        assert!(!setup.overlay.exists());
    }

    // A run: PASS, the session told, no overlay left.
    let o = setup.drill("canary");
    let report = text(&o);
    println!("{report}");
    assert!(o.status.success(), "{report}");
    assert!(report.contains("verdict: PASS"), "{report}");
    for want in [
        "overlay written",
        "applied",
        "last session told",
        "quiet",
        "restored",
    ] {
        assert!(report.contains(want), "no {want:?}:\n{report}");
    }
    assert!(!setup.overlay.exists(), "the overlay was left behind");
    let id = report
        .split_whitespace()
        .find(|w| w.starts_with("live-"))
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    let m = scrape(&setup.metrics);
    let told = format!(
        "vkx_live_drill_sessions_told_total{{drill=\"{id}\",feature=\"key-release\",ring=\"canary\"}}"
    );
    assert_eq!(value(&m, &told), 1, "{m}");
    assert_eq!(value(&m, &ACTIVE.replace("{id}", &id)), 0, "{m}");
    setup.wait_metric(
        "vkx_health_enabled_sessions{ring=\"canary\",feature=\"key-release\"}",
        1,
    );

    // A run killed once the session was told: its overlay stays, and the
    // host takes it away when it expires.
    let mut child = Command::new(bin("vkx-host"))
        .args(setup.args("canary"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    setup.wait_metric(
        "vkx_health_enabled_sessions{ring=\"canary\",feature=\"key-release\"}",
        0,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    assert!(setup.overlay.exists(), "a killed drill cannot remove it");
    setup.wait_metric(
        "vkx_health_enabled_sessions{ring=\"canary\",feature=\"key-release\"}",
        1,
    );
    let after = killed.elapsed();
    println!("a killed live drill's overlay expired on the host after {after:?}");
    // The TTL from the last renewal (at most a third of it before the
    // kill), and room for a loaded machine.
    assert!(
        after <= Duration::from_secs(6),
        "expired after {after:?} (TTL {TTL_S} s)"
    );
    // The expired overlay does not block the next drill (once the
    // summary, every 500 ms, shows the session again).
    std::thread::sleep(Duration::from_millis(1200));
    let o = setup.drill("canary");
    assert!(o.status.success(), "{}", text(&o));
    assert!(!setup.overlay.exists());
    // The host logged each overlay once applied and once taken away.
    let log = std::fs::read_to_string(setup.d.path("host.log")).unwrap();
    assert_eq!(
        log.matches("live drill overlay applied").count(),
        3,
        "{log}"
    );
    assert_eq!(
        log.matches("live drill overlay taken away").count(),
        3,
        "{log}"
    );
    drop(setup.guest);
    assert_eq!(setup.host.stop().code(), Some(0));
}
