//! `vkx-host serve` reloading its policy on SIGHUP (`systemctl reload`),
//! end to end, as processes, with swtpm as the guest's vTPM and a
//! `vkx-guest run` daemon holding a session:
//! - an operator revokes the PCR 7 value the guest booted with: the
//!   session gets `goodbye(reattest)` and the guest's re-attestation is
//!   refused (it goes dormant);
//! - an invalid policy.toml, then a valid one that revokes the guest's
//!   value but with an invalid host.toml: both reloads are refused whole,
//!   the session is untouched and a new attestation still meets the old
//!   policy;
//! - a reload that still allows the guest (a value added, a restart-only
//!   setting changed, a storm of SIGHUPs) leaves its session alone;
//! - a key the image no longer grants: the session holding it re-attests
//!   (its boot is still allowed) and the key is withheld from then on.
//!
//! Before SIGHUP was handled, its default action killed the host: each
//! test fails there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::PathBuf;
use std::time::Duration;

use vkx_e2e::agents::{Agent, Deployment, scrape, value, wait_value};

/// Generous bound for anything after a change (a reload, a reconnection
/// after `retry-after`, a quote on swtpm).
const LIMIT: Duration = Duration::from_secs(30);
/// Fast retries for tests: the policy's shape, seconds instead of minutes.
const FAST_RETRY: &str = "[retry]\nbase_ms = 100\ncap_ms = 1000\nfloor_ms = 50\n";
/// A digest no boot produces.
const OTHER: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

/// policy.toml's rule for PCR 7 with `allowed`, as Deployment writes it
/// (PCR 0 may have the same value).
fn rule7(allowed: &str) -> String {
    format!("index = 7\nallowed = [\"{allowed}\"]")
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// A deployment of vm-1 with a metrics socket; `extra` goes in host.toml.
struct Node {
    d: Deployment,
    metrics: PathBuf,
}

impl Node {
    fn new() -> Self {
        let d = Deployment::new("vm-1", "");
        let metrics = d.path("metrics.sock");
        let n = Self { d, metrics };
        n.host_config("");
        n
    }

    fn host_config(&self, extra: &str) {
        self.d.write_host_config(&format!(
            "{extra}\n[metrics]\nsocket = \"{}\"\n",
            self.metrics.display()
        ));
    }

    fn start_host(&self) -> Agent {
        let host = self.d.start_host("host.log");
        host.wait_for_path(&self.metrics);
        host
    }

    /// A guest daemon that holds its session; returns once attested.
    fn start_guest(&self, log: &str) -> Agent {
        let config = self.d.guest_config(
            "guest.toml",
            &self.d.socket(),
            self.d.node.pin(),
            FAST_RETRY,
        );
        let guest = Agent::spawn(
            "vkx-guest",
            &["run", "--config", &config.display().to_string()],
            self.d.path(log),
        );
        guest.wait_log(LIMIT, "attestation", |l| count(l, "attested") == 1);
        guest
    }

    fn policy(&self) -> String {
        std::fs::read_to_string(self.d.path("policy.toml")).unwrap()
    }

    fn write_policy(&self, text: &str) {
        std::fs::write(self.d.path("policy.toml"), text).unwrap();
    }

    /// The PCR sha256:7 value the guest booted with, as policy.toml has it.
    fn pcr7(&self) -> String {
        let pcrs: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.d.path("ref/pcrs.json")).unwrap()).unwrap();
        let v = pcrs["sha256"]["7"].as_str().unwrap().to_owned();
        assert!(self.policy().contains(&rule7(&v)), "{}", self.policy());
        v
    }

    /// The policy with the guest's PCR 7 value replaced by `by`.
    fn policy_with_pcr7(&self, by: &str) -> String {
        let v = self.pcr7();
        self.policy().replace(&rule7(&v), &rule7(by))
    }

    fn reloads(&self, outcome: &str) -> u64 {
        value(
            &scrape(&self.metrics),
            &format!("vkx_reloads_total{{outcome=\"{outcome}\"}}"),
        )
    }
}

#[test]
fn a_revoked_pcr_value_sends_the_session_to_reattest_and_the_guest_is_refused() {
    let n = Node::new();
    let host = n.start_host();
    let guest = n.start_guest("guest.log");
    let text = wait_value(&n.metrics, "vkx_sessions_established", 1);
    assert_eq!(value(&text, "vkx_reload_last_success_timestamp_seconds"), 0);

    // The operator revokes the value the guest booted with.
    n.write_policy(&n.policy_with_pcr7(OTHER));
    host.signal("HUP");

    // The session is told goodbye(reattest), by the host's own account
    // and the guest's.
    let hlog = host.wait_log(LIMIT, "the reload", |l| l.contains("reload applied"));
    assert!(hlog.contains("sessions_reattest=1"), "{hlog}");
    assert!(hlog.contains("vm-1: PCR sha256:7"), "{hlog}");
    let glog = guest.wait_log(LIMIT, "the goodbye", |l| l.contains("session ended"));
    assert!(
        glog.contains("session ended (goodbye from the host: reattest)"),
        "{glog}"
    );
    // It attests again, under the new policy: refused, so it goes dormant
    // instead of retrying.
    let glog = guest.wait_log(LIMIT, "dormancy", |l| l.contains("dormant"));
    assert_eq!(count(&glog, "attested"), 1, "{glog}");
    let hlog = host.wait_log(LIMIT, "the refusal", |l| l.contains("attestation refused"));
    assert!(
        hlog.contains("PCR sha256:7 has digest"),
        "refused for its PCR 7: {hlog}"
    );
    let text = wait_value(&n.metrics, "vkx_sessions_established", 0);
    assert_eq!(value(&text, "vkx_reloads_total{outcome=\"ok\"}"), 1);
    assert_eq!(value(&text, "vkx_reloads_total{outcome=\"invalid\"}"), 0);
    assert!(value(&text, "vkx_reload_last_success_timestamp_seconds") > 1_700_000_000);
    assert_eq!(
        value(&text, "vkx_handshakes_total{outcome=\"refused\"}"),
        1,
        "{text}"
    );
    assert!(host.stop().success());
}

#[test]
fn an_invalid_reload_is_refused_whole_and_the_old_policy_stays_in_force() {
    let n = Node::new();
    let host = n.start_host();
    let guest = n.start_guest("guest-1.log");

    // 1. A policy that would revoke the guest's value, but is invalid
    //    elsewhere: refused, nothing of it applied.
    let revoking = n.policy_with_pcr7(OTHER);
    n.write_policy(&format!(
        "{revoking}\n[[vm]]\nid = \"vm-9\"\nimage = \"no-such-image\"\n"
    ));
    host.signal("HUP");
    let hlog = host.wait_log(LIMIT, "the refusal", |l| l.contains("reload refused"));
    assert!(hlog.contains("no-such-image"), "the line says why: {hlog}");
    assert_eq!(count(&hlog, "reload refused"), 1, "{hlog}");

    // 2. The revoking policy, now valid, with a host.toml that is not:
    //    refused whole too (no policy without its host.toml).
    n.write_policy(&revoking);
    n.host_config("no_such_setting = 1");
    host.signal("HUP");
    let hlog = host.wait_log(LIMIT, "the second refusal", |l| {
        count(l, "reload refused") == 2
    });
    // One line says why.
    let line = hlog
        .lines()
        .find(|l| l.contains("no_such_setting"))
        .unwrap_or_else(|| panic!("{hlog}"));
    assert!(
        line.contains("reload refused") && line.contains("unknown field"),
        "{hlog}"
    );
    assert!(!hlog.contains("reload applied"), "{hlog}");
    assert_eq!(n.reloads("invalid"), 2);
    assert_eq!(n.reloads("ok"), 0);
    assert_eq!(
        value(
            &scrape(&n.metrics),
            "vkx_reload_last_success_timestamp_seconds"
        ),
        0
    );

    // The session was not touched...
    std::thread::sleep(Duration::from_secs(2));
    let glog = guest.log();
    assert!(!glog.contains("session ended"), "{glog}");
    assert_eq!(count(&glog, "attested"), 1, "{glog}");
    // ... and a new attestation still meets the running policy, although
    // the file now revokes the guest's value.
    assert!(guest.stop().success());
    let guest = n.start_guest("guest-2.log");
    assert!(guest.stop().success());
    assert!(host.stop().success());
}

#[test]
fn a_reload_that_still_allows_the_session_leaves_it_alone() {
    let n = Node::new();
    let host = n.start_host();
    let guest = n.start_guest("guest.log");

    // A second allowed value (an OS update rolling out), and a setting
    // that needs a restart: the policy applies, the setting is named as
    // not applied.
    let pcr7 = n.pcr7();
    n.write_policy(&n.policy_with_pcr7(&format!("{pcr7}\", \"{OTHER}")));
    n.host_config("shutdown_retry_after_s = 7");
    host.signal("HUP");
    let hlog = host.wait_log(LIMIT, "the reload", |l| l.contains("reload applied"));
    assert!(hlog.contains("sessions_reattest=0"), "{hlog}");
    let hlog = host.wait_log(LIMIT, "the restart-only warning", |l| {
        l.contains("need a restart")
    });
    assert!(hlog.contains("settings=shutdown_retry_after_s"), "{hlog}");

    // A storm of SIGHUPs: coalesced, at most one reload per second.
    for _ in 0..50 {
        host.signal("HUP");
    }
    std::thread::sleep(Duration::from_secs(3));
    let ok = n.reloads("ok");
    assert!((2..=5).contains(&ok), "{ok} reloads for 1 + 50 SIGHUPs");

    let glog = guest.log();
    assert!(!glog.contains("session ended"), "{glog}");
    assert_eq!(count(&glog, "attested"), 1, "{glog}");
    assert_eq!(value(&scrape(&n.metrics), "vkx_sessions_established"), 1);
    assert!(guest.stop().success());
    assert!(host.stop().success());
}

#[test]
fn a_withdrawn_key_grant_sends_the_session_to_reattest_and_the_key_is_withheld() {
    let n = Node::new();
    let node = n.d.node.node_dir();
    let o = vkx_e2e::run(
        "vkx-host",
        &[
            "keys",
            "add",
            "disk",
            "--from-stdin",
            "--allow-image",
            "img",
            "--node-dir",
            &node,
        ],
        &[0x5a; 32],
    );
    assert!(o.status.success(), "{o:?}");
    let host = n.start_host();
    let key_dir = n.d.path("keys");
    let config = n.d.guest_config(
        "guest.toml",
        &n.d.socket(),
        n.d.node.pin(),
        &format!(
            "keys = [\"disk\"]\nkey_dir = \"{}\"\n{FAST_RETRY}",
            key_dir.display()
        ),
    );
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &config.display().to_string()],
        n.d.path("guest.log"),
    );
    guest.wait_log(LIMIT, "the key", |l| l.contains("key delivered"));

    // The image no longer grants "disk"; the guest's PCRs still match.
    let policy = n.policy();
    assert_eq!(count(&policy, "keys = [\"disk\"]"), 1, "{policy}");
    n.write_policy(&policy.replace("keys = [\"disk\"]", "keys = []"));
    host.signal("HUP");
    let hlog = host.wait_log(LIMIT, "the reload", |l| l.contains("reload applied"));
    assert!(hlog.contains("sessions_reattest=1"), "{hlog}");
    assert!(hlog.contains("vm-1: a key or derivation purpose"), "{hlog}");
    // Sent to re-attest; attested again (its boot is still allowed), and
    // the key is withheld under the new policy.
    let glog = guest.wait_log(LIMIT, "the withheld key", |l| {
        l.contains("the host withheld a key")
    });
    assert!(
        glog.contains("session ended (goodbye from the host: reattest)"),
        "{glog}"
    );
    assert_eq!(count(&glog, "attested"), 2, "{glog}");
    assert_eq!(count(&glog, "key delivered"), 1, "{glog}");
    assert!(guest.stop().success());
    assert!(host.stop().success());
}
