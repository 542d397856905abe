//! Fault-injection case g (issue #6, item 5), beside `tests/chaos_ab.rs`,
//! `tests/chaos_ef.rs` and `tests/chaos_cd.rs`, writing its row in the same format to
//! `target/chaos/g.json` (`examples/chaos_report.rs` prints it); and the
//! ring-advance test of the staged rollout at a node's scale. Only with
//! `--features insecure-soft-tpm`: the guests have soft vTPMs
//! ([`vkx_e2e::herd::SoftSite`]), a thousand swtpm processes being more
//! than this machine can run.
//!
//! - g, the kill switch flipped while a node's guests hold sessions
//!   ([`g_kill_switch_flip_under_a_full_node`]): 1,024 guests (reduced:
//!   128) attest against a real `vkx-host serve`, ask for their key as the
//!   daemon does, and hold their sessions ([`vkx_e2e::holders`]). The
//!   operator runs `vkx-host rollout kill key-release`; every guest must
//!   be told (`feature-update`) within 1 s of the command's return; the
//!   host must see no request for the killed feature afterwards (each
//!   guest even tries once, and its own session must refuse), release no
//!   key, write at most one log line (the accepted document, no line per
//!   guest) and send exactly one update per guest. Then a signed unkill:
//!   every guest is told, and uses the feature again after its own
//!   U[0, 10 s] delay, so the node is not synchronised. Run twice: the
//!   file source, and a real etcd on loopback.
//! - ring advance ([`ring_advance_enables_exactly_the_next_rings`]): 64
//!   guests; a signed document with rings canary (two vm-ids), 10pct,
//!   50pct and all stages key-rotation at canary, then at 50pct; each
//!   guest's map must follow the rings computed here from the bucket
//!   function, only guests whose map changes are sent an update, and
//!   `vkx-host rollout explain` agrees.
//!
//! `VKX_CHAOS_FULL=1` runs g at full size; the bounds are the same.

#![cfg(feature = "insecure-soft-tpm")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)] // The case prints its figure.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vkx_common::wire::{FeatureState, VmId, feature};
use vkx_e2e::agents::{scrape, value};
use vkx_e2e::chaos::{Row, size};
use vkx_e2e::etcd::Etcd;
use vkx_e2e::herd::{Host, IMAGE, SoftSite, ensure_fd_limit};
use vkx_e2e::holders::{Holders, State, quantile};
use vkx_e2e::rollout::{KEY_ID, host_extra, keygen, rollout, text};
use vkx_e2e::run;

/// Bound: the last guest told, from the kill command's return.
const FLIP_BOUND: Duration = Duration::from_secs(1);
/// Bound on each guest's re-enable delay: the session's U[0, 10 s] draw
/// (`FEATURE_REENABLE_JITTER`) plus this slack for the wake-up itself:
/// a tokio timer (1 ms granularity) on the guests' single runtime thread,
/// which may be busy with other guests' work when the instant comes (a
/// few hundred microseconds per event, about 100 events a second at
/// 1,024 guests spread over 10 s).
const REENABLE_SLACK: Duration = Duration::from_millis(250);
/// Longest wait for a node's guests to attest and get their key, from a
/// cold start (a debug-built host verifies every quote and fsyncs its
/// registry).
const ATTACH_LIMIT: Duration = Duration::from_secs(300);
/// Longest wait for anything that should follow within a second or two.
const LIMIT: Duration = Duration::from_secs(30);
/// Between the guests' first attempts: the herd arrives over a few
/// seconds, not at one instant (case c measures that).
const STAGGER: Duration = Duration::from_millis(4);
/// Open files beyond two per guest.
const FD_HEADROOM: u64 = 256;
const POLL: Duration = Duration::from_millis(20);
const NODE: &str = "node-g";
const UPDATES: &str = "vkx_feature_updates_sent_total";
const REFUSED_DISABLED: &str = "vkx_errors_sent_total{code=\"feature-disabled\"}";
const RELEASED: &str = "vkx_keys_released_total";

// ---------------------------------------------------------------------------
// The operator's side: the CLI, host.toml, the host's figures.

/// Scrapes until `series` reads `want`, at most `limit`; the last text
/// and whether it got there.
fn wait_metric(metrics: &Path, series: &str, want: u64, limit: Duration) -> (String, bool) {
    let t = Instant::now();
    loop {
        let m = scrape(metrics);
        if value(&m, series) == want {
            return (m, true);
        }
        if t.elapsed() >= limit {
            return (m, false);
        }
        std::thread::sleep(POLL);
    }
}

/// The host's log from byte `offset` on.
fn log_from(path: &Path, offset: usize) -> Vec<String> {
    let log = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(log.get(offset..).unwrap_or_default())
        .lines()
        .map(str::to_owned)
        .collect()
}

fn log_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| usize::try_from(m.len()).unwrap())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The most instants of sorted `at` in any 1-s window (sliding).
fn busiest_second(at: &[Instant]) -> usize {
    let mut lo = 0;
    let mut most = 0;
    for hi in 0..at.len() {
        while at[hi].duration_since(at[lo]) >= Duration::from_secs(1) {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    most
}

// ---------------------------------------------------------------------------
// g: the kill switch flipped under a full node.

#[derive(Debug, Clone, Copy)]
enum Source {
    File,
    Etcd,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Etcd => "etcd",
        }
    }
}

/// One run's figures.
#[derive(Debug)]
struct Flip {
    source: Source,
    guests: usize,
    attach: Duration,
    /// How long `rollout kill` ran (t0 is just before it).
    command: Duration,
    /// Per guest told: receipt of the disabling update, from t0.
    from_t0: Vec<Duration>,
    told: usize,
    refused_after: u64,
    released_after: u64,
    probes_refused: usize,
    probes_sent: usize,
    disabled_sessions: u64,
    log_lines: Vec<String>,
    updates_sent: u64,
    /// The unkill: guests told, each guest's delay from its update to
    /// `FeatureUsable`, and the busiest second of those instants.
    unkill_told: usize,
    reenable: Vec<Duration>,
    reenable_busiest: usize,
    sessions_lost: usize,
}

impl Flip {
    /// Per guest told: receipt from the command's return (negative when
    /// a guest was told before the command had exited).
    fn after_return(&self, q: f64) -> f64 {
        secs(quantile(&self.from_t0, q)) - secs(self.command)
    }

    fn flip_within(&self) -> bool {
        self.told == self.guests && self.after_return(1.0) <= secs(FLIP_BOUND)
    }

    fn quiet_within(&self) -> bool {
        self.refused_after == 0
            && self.released_after == 0
            && self.probes_sent == 0
            && self.probes_refused == self.guests
            && self.log_lines.len() <= 1
            && self
                .log_lines
                .iter()
                .all(|l| l.contains("rollout document accepted"))
            && self.updates_sent == self.guests as u64
            && self.disabled_sessions == self.guests as u64
    }

    fn unkill_within(&self) -> bool {
        self.unkill_told == self.guests
            && self.reenable.len() == self.guests
            && quantile(&self.reenable, 1.0)
                <= vkx_common::session::guest::FEATURE_REENABLE_JITTER + REENABLE_SLACK
    }

    fn within(&self) -> bool {
        self.flip_within() && self.quiet_within() && self.unkill_within() && self.sessions_lost == 0
    }

    fn describe(&self) -> String {
        let n = self.guests;
        format!(
            "{} source: {n} guests attested and held sessions ({:.1} s to attach); kill -> each guest's \
             feature-update, from the command's return: p50 {:.3} s, p99 {:.3} s, max {:.3} s \
             (from t0, just before the command: p50 {:.3} s, max {:.3} s; the command ran {:.3} s); \
             guests told {}/{n}; after the flip the host refused {} requests with feature-disabled \
             and released {} keys ({}/{n} guests asked once more and their own sessions refused; \
             {} sent); {} host log line(s) after t0{}; {} feature-updates sent, {} sessions \
             counted key-release disabled; signed unkill: {}/{n} told, key-release usable again \
             after each guest's own delay p50 {:.2} s, max {:.2} s (at most {} guests in any 1-s \
             window); sessions lost {}",
            self.source.name(),
            secs(self.attach),
            self.after_return(0.5),
            self.after_return(0.99),
            self.after_return(1.0),
            secs(quantile(&self.from_t0, 0.5)),
            secs(quantile(&self.from_t0, 1.0)),
            secs(self.command),
            self.told,
            self.refused_after,
            self.released_after,
            self.probes_refused,
            self.probes_sent,
            self.log_lines.len(),
            if self.log_lines.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    self.log_lines
                        .iter()
                        .map(|l| site_of(l))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            },
            self.updates_sent,
            self.disabled_sessions,
            self.unkill_told,
            secs(quantile(&self.reenable, 0.5)),
            secs(quantile(&self.reenable, 1.0)),
            self.reenable_busiest,
            self.sessions_lost,
        )
    }
}

/// A host log line's message, without timestamp, level, target and
/// fields (tracing's format: `TIME LEVEL target: message key=value ...`).
fn site_of(line: &str) -> String {
    let rest = line.split_once(": ").map_or(line, |(_, r)| r);
    rest.split_whitespace()
        .take_while(|w| !w.contains('='))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One run of case g against `soft`'s VMs with `source`.
fn flip_run(soft: &SoftSite, source: Source, key: &Path, public: &str) -> Flip {
    let work = soft.site.work.path();
    let name = format!("g-{}", source.name());
    // A fresh rollout state per run: no accepted document on the node.
    let _ = std::fs::remove_dir_all(
        Path::new(&soft.site.node.node_dir()).join(vkx_host::rollout_service::STATE_DIR),
    );
    let metrics = work.join(format!("metrics-{name}.sock"));
    let etcd = matches!(source, Source::Etcd).then(Etcd::start);
    let extra = match &etcd {
        None => host_extra(
            &metrics,
            NODE,
            &format!(
                "source = \"file\"\nfile = \"{}\"",
                work.join(format!("rollout-{name}.json")).display()
            ),
            "",
            public,
        ),
        Some(e) => host_extra(
            &metrics,
            NODE,
            "source = \"etcd\"",
            &format!(
                "[rollout.etcd]\nendpoints = [\"{}\"]\nkey = \"/vkx/rollout\"\n\
                 timeout_ms = 1000\nbackoff_cap_ms = 1000\nreconnect_spread_ms = 200\n",
                e.endpoint()
            ),
            public,
        ),
    };
    let host: Host = soft.site.start_host(&name, &extra);
    host.process.wait_for_path(&metrics);
    let config = work.join(format!("host-{name}.toml"));
    let host_log = work.join(format!("host-{name}.log"));
    if etcd.is_some() {
        let (m, up) = wait_metric(&metrics, "vkx_rollout_source_up", 1, LIMIT);
        assert!(up, "etcd source never up:\n{m}");
    }

    // Every guest attests, gets its key and holds its session.
    let n = soft.tpms.len();
    let t_attach = Instant::now();
    let mut herd = Holders::start(soft.agents(), STAGGER);
    let attached = herd.wait(ATTACH_LIMIT, |s| {
        s.holding() == s.len() && s.keys_released == s.len()
    });
    let attach = t_attach.elapsed();
    assert!(
        attached,
        "{}: {} of {n} guests holding, {} keys released after {attach:?}; failed attempts {:?}",
        source.name(),
        herd.state.holding(),
        herd.state.keys_released,
        herd.state.failed
    );
    let m0 = scrape(&metrics);
    assert_eq!(
        value(
            &m0,
            "vkx_feature_sessions{feature=\"key-release\",state=\"enabled\"}"
        ),
        n as u64,
        "{m0}"
    );

    // The flip.
    let log_offset = log_len(&host_log);
    let t0 = Instant::now();
    let said = rollout(&config, &["kill", "key-release"]);
    let command = t0.elapsed();
    assert!(said.contains("killed at revision 1"), "{said}");
    let told_all = herd.wait(LIMIT, |s| {
        (0..s.len()).all(|i| {
            s.update_since(i, t0, feature::KEY_RELEASE, FeatureState::Disabled)
                .is_some()
        }) && s.probes_refused_locally + s.probes_sent == s.len()
    });
    let (m1, _) = wait_metric(&metrics, UPDATES, value(&m0, UPDATES) + n as u64, LIMIT);
    let log_lines = log_from(&host_log, log_offset);
    let from_t0 = {
        let mut v: Vec<Duration> = (0..n)
            .filter_map(|i| {
                herd.state
                    .update_since(i, t0, feature::KEY_RELEASE, FeatureState::Disabled)
            })
            .map(|t| t - t0)
            .collect();
        v.sort();
        v
    };
    let told = from_t0.len();
    if !told_all {
        eprintln!("{}: only {told}/{n} guests told", source.name());
    }
    let probes = (herd.state.probes_refused_locally, herd.state.probes_sent);

    // The signed unkill: every guest told, each usable after its delay.
    let t_unkill = Instant::now();
    let said = rollout(
        &config,
        &[
            "unkill",
            "key-release",
            "--key",
            &key.display().to_string(),
            "--key-id",
            KEY_ID,
        ],
    );
    assert!(said.contains("revision 2"), "{said}");
    herd.wait(
        vkx_common::session::guest::FEATURE_REENABLE_JITTER + LIMIT,
        |s| (0..s.len()).all(|i| s.usable_since(i, t_unkill, feature::KEY_RELEASE).is_some()),
    );
    let state: State = herd.stop();
    let mut unkill_told = 0;
    let mut reenable = Vec::new();
    let mut usable_at = Vec::new();
    for i in 0..n {
        let Some(u) = state.update_since(i, t_unkill, feature::KEY_RELEASE, FeatureState::Enabled)
        else {
            continue;
        };
        unkill_told += 1;
        if let Some(at) = state.usable_since(i, u, feature::KEY_RELEASE) {
            reenable.push(at - u);
            usable_at.push(at);
        }
    }
    reenable.sort();
    usable_at.sort();
    host.stop(false);
    drop(etcd);

    Flip {
        source,
        guests: n,
        attach,
        command,
        from_t0,
        told,
        refused_after: value(&m1, REFUSED_DISABLED) - value(&m0, REFUSED_DISABLED),
        released_after: value(&m1, RELEASED) - value(&m0, RELEASED),
        probes_refused: probes.0,
        probes_sent: probes.1,
        disabled_sessions: value(
            &m1,
            "vkx_feature_sessions{feature=\"key-release\",state=\"disabled\"}",
        ),
        log_lines,
        updates_sent: value(&m1, UPDATES) - value(&m0, UPDATES),
        unkill_told,
        reenable,
        reenable_busiest: busiest_second(&usable_at),
        sessions_lost: state.sessions_lost,
    }
}

/// Case g, both sources; see the module primer.
#[test]
fn g_kill_switch_flip_under_a_full_node() {
    let guests = size(1024, 128);
    let row = Row::start(
        "g",
        "kill switch flipped while 1,024 guests hold sessions (file and etcd sources)",
        format!(
            "per source: every guest told, the last within {} s of the kill command's return; \
             after the flip 0 feature-disabled refusals and 0 keys released; <= 1 host log line \
             (no line per guest); 1 feature-update per guest; after the signed unkill every guest \
             told and each re-enables within 10 s + {} ms of its update",
            FLIP_BOUND.as_secs(),
            REENABLE_SLACK.as_millis()
        ),
    );
    ensure_fd_limit(2 * guests as u64 + FD_HEADROOM);
    let soft = SoftSite::new(guests, "g");
    let key = soft.site.work.path().join("release.key");
    let public = keygen(&key);

    let runs: Vec<Flip> = [Source::File, Source::Etcd]
        .into_iter()
        .map(|source| {
            let f = flip_run(&soft, source, &key, &public);
            println!("chaos g: {}", f.describe());
            f
        })
        .collect();

    let pass = runs.iter().all(Flip::within);
    let figure = format!(
        "{}. {} ({})",
        runs.iter()
            .map(Flip::describe)
            .collect::<Vec<_>>()
            .join(". "),
        if guests == 1024 {
            "full size"
        } else {
            "reduced size"
        },
        soft.note
    );
    row.finish(&figure, pass);
    for f in &runs {
        let what = f.source.name();
        assert_eq!(f.told, f.guests, "{what}: not every guest was told");
        assert!(
            f.flip_within(),
            "{what}: the last guest was told {:.3} s after the command returned (bound {} s)",
            f.after_return(1.0),
            FLIP_BOUND.as_secs()
        );
        assert_eq!(f.refused_after, 0, "{what}: requests reached the host");
        assert_eq!(f.released_after, 0, "{what}: keys released after the kill");
        assert_eq!(f.probes_sent, 0, "{what}: a session sent a killed request");
        assert_eq!(f.probes_refused, f.guests, "{what}: probes");
        assert!(
            f.log_lines.len() <= 1,
            "{what}: host log lines after the flip: {:#?}",
            f.log_lines
        );
        assert!(f.quiet_within(), "{what}: {}", f.describe());
        assert!(f.unkill_within(), "{what}: {}", f.describe());
        assert_eq!(f.sessions_lost, 0, "{what}: sessions lost");
    }
    assert!(pass, "{figure}");
}

// ---------------------------------------------------------------------------
// Ring advance.

const RING_GUESTS: usize = 64;
const RING_NODE_NAME: &str = "node-r";

/// The ring index of a VM in the test's document, computed here from the
/// bucket function: canary (index 0) by id, then the first ring whose
/// `buckets_below` its bucket is under.
fn expected_ring(vm: &str, canary: &[String]) -> usize {
    if canary.iter().any(|c| c == vm) {
        return 0;
    }
    match vkx_host::rollout::bucket(&VmId::new(vm).unwrap()) {
        b if b < 1000 => 1,
        b if b < 5000 => 2,
        _ => 3,
    }
}

/// `explain`'s line for one feature: its name and state columns.
fn explained(feature: &str, state: &str) -> String {
    format!("{feature:<15} {state:<8} ")
}

#[test]
fn ring_advance_enables_exactly_the_next_rings() {
    ensure_fd_limit(2 * RING_GUESTS as u64 + FD_HEADROOM);
    let soft = SoftSite::new(RING_GUESTS, "ring");
    let work = soft.site.work.path();
    let key = work.join("release.key");
    let public = keygen(&key);
    let k = key.display().to_string();
    let metrics = work.join("metrics-rings.sock");
    let extra = host_extra(
        &metrics,
        RING_NODE_NAME,
        &format!(
            "source = \"file\"\nfile = \"{}\"",
            work.join("rollout.json").display()
        ),
        "",
        &public,
    );
    let host = soft.site.start_host("rings", &extra);
    host.process.wait_for_path(&metrics);
    let config = work.join("host-rings.toml");

    // The rings: canary is two VMs that the buckets alone would put in
    // `all`, so only their ids make them canaries.
    let vms = soft.site.vm_ids.clone();
    let canary: Vec<String> = vms
        .iter()
        .filter(|v| expected_ring(v, &[]) == 3)
        .take(2)
        .cloned()
        .collect();
    assert_eq!(canary.len(), 2);
    let ring: Vec<usize> = vms.iter().map(|v| expected_ring(v, &canary)).collect();
    for r in 1..=3 {
        assert!(ring.contains(&r), "no VM in ring {r}: pick other names");
    }
    let document = serde_json::json!({
        "format": 1,
        "revision": 1,
        "issued_at": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(),
        "rings": [
            {"name": "canary", "vm_ids": canary},
            {"name": "10pct", "buckets_below": 1000},
            {"name": "50pct", "buckets_below": 5000},
            {"name": "all", "buckets_below": 10000},
        ],
        "features": {"key-rotation": {"stage": "canary", "killed": false}},
    })
    .to_string();
    // The host's own ring function agrees with the expectation.
    let doc = vkx_host::rollout::Document::parse(document.as_bytes()).unwrap();
    for (vm, want) in vms.iter().zip(&ring) {
        let facts = vkx_host::rollout::VmFacts {
            vm_id: VmId::new(vm).unwrap(),
            image: Some(IMAGE.to_owned()),
            node: RING_NODE_NAME.to_owned(),
        };
        let placed = vkx_host::rollout::ring_of(&doc, &facts).map(|p| p.index);
        assert_eq!(placed, Some(*want), "{vm}");
    }

    // The guests attest (no document yet: every feature generally
    // available) and hold their sessions.
    let n = vms.len();
    let mut herd = Holders::start(soft.agents(), STAGGER);
    assert!(
        herd.wait(ATTACH_LIMIT, |s| s.holding() == n && s.keys_released == n),
        "guests did not attach: {:?}",
        herd.state.failed
    );
    let rotation = |s: &State, i: usize| s.features[i].get(&feature::KEY_ROTATION).copied();
    assert!((0..n).all(|i| rotation(&herd.state, i) == Some(FeatureState::Enabled)));

    // 1. The document, signed and pushed with the CLI: key rotation at
    //    canary. The canaries keep it (no update: their map is
    //    unchanged); every other guest is told not-yet.
    let bare = work.join("rings.json");
    let envelope = work.join("rings.envelope.json");
    std::fs::write(&bare, &document).unwrap();
    let o = run(
        "vkx-host",
        &[
            "rollout",
            "sign",
            "--key",
            &k,
            "--key-id",
            KEY_ID,
            "--file",
            &bare.display().to_string(),
            "--out",
            &envelope.display().to_string(),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o));
    let t_push = Instant::now();
    let said = rollout(
        &config,
        &["push", "--file", &envelope.display().to_string()],
    );
    assert!(said.contains("pushed revision 1"), "{said}");
    let others = n - canary.len();
    let (m, ok) = wait_metric(&metrics, UPDATES, others as u64, LIMIT);
    assert!(ok, "updates after the push:\n{m}");
    assert!(herd.wait(LIMIT, |s| {
        (0..n).all(|i| {
            ring[i] == 0
                || s.update_since(i, t_push, feature::KEY_ROTATION, FeatureState::NotYet)
                    .is_some()
        })
    }));
    for i in 0..n {
        let want = if ring[i] == 0 {
            FeatureState::Enabled
        } else {
            FeatureState::NotYet
        };
        assert_eq!(rotation(&herd.state, i), Some(want), "{}", vms[i]);
        assert_eq!(
            herd.state.updates[i].len(),
            usize::from(ring[i] != 0),
            "{}: updates {:?}",
            vms[i],
            herd.state.updates[i]
        );
        for f in [feature::KEY_RELEASE, feature::KEY_DERIVATION] {
            assert_eq!(
                herd.state.features[i].get(&f),
                Some(&FeatureState::Enabled),
                "{}",
                vms[i]
            );
        }
    }
    assert_eq!(value(&m, "vkx_rollout_revision"), 1);
    // `explain` agrees, for one VM of each ring.
    let sample: Vec<usize> = (0..=3)
        .map(|r| ring.iter().position(|x| *x == r).unwrap())
        .collect();
    let explain = |i: usize| rollout(&config, &["explain", "--vm", &vms[i]]);
    for &i in &sample {
        let state = if ring[i] == 0 { "enabled" } else { "not-yet" };
        let e = explain(i);
        assert!(e.contains(&explained("key-rotation", state)), "{e}");
        assert!(e.contains(&explained("key-release", "enabled")), "{e}");
    }

    // 2. Advance to 50pct (signed: it widens): exactly the VMs of rings
    //    1 and 2 are told enabled; nobody else gets an update.
    let t_stage = Instant::now();
    let said = rollout(
        &config,
        &[
            "set-stage",
            "key-rotation",
            "50pct",
            "--key",
            &k,
            "--key-id",
            KEY_ID,
        ],
    );
    assert!(said.contains("revision 2"), "{said}");
    let advanced = ring.iter().filter(|r| matches!(r, 1 | 2)).count();
    let (m, ok) = wait_metric(&metrics, UPDATES, (others + advanced) as u64, LIMIT);
    assert!(ok, "updates after set-stage:\n{m}");
    assert!(herd.wait(LIMIT, |s| {
        (0..n).all(|i| {
            !matches!(ring[i], 1 | 2)
                || s.update_since(i, t_stage, feature::KEY_ROTATION, FeatureState::Enabled)
                    .is_some()
        })
    }));
    let enabled = ring.iter().filter(|r| **r <= 2).count() as u64;
    assert_eq!(
        value(
            &m,
            "vkx_feature_sessions{feature=\"key-rotation\",state=\"enabled\"}"
        ),
        enabled,
        "{m}"
    );
    for i in 0..n {
        let want = if ring[i] <= 2 {
            FeatureState::Enabled
        } else {
            FeatureState::NotYet
        };
        assert_eq!(rotation(&herd.state, i), Some(want), "{}", vms[i]);
    }
    for &i in &sample {
        let state = if ring[i] <= 2 { "enabled" } else { "not-yet" };
        let e = explain(i);
        assert!(e.contains(&explained("key-rotation", state)), "{e}");
    }

    // 3. Proof that nobody else was sent anything: a kill reaches every
    //    guest, and in each session's ordered stream the kill's update
    //    must come right after what step 2 expected (for rings 1 and 2
    //    one update, for the rest none).
    let t_kill = Instant::now();
    rollout(&config, &["kill", "key-rotation"]);
    assert!(herd.wait(LIMIT, |s| {
        (0..n).all(|i| {
            s.update_since(i, t_kill, feature::KEY_ROTATION, FeatureState::Disabled)
                .is_some()
        })
    }));
    let state = herd.stop();
    for i in 0..n {
        let since_stage: Vec<Option<FeatureState>> = state.updates[i]
            .iter()
            .filter(|(t, _)| *t >= t_stage)
            .map(|(_, m)| m.get(&feature::KEY_ROTATION).copied())
            .collect();
        let want = if matches!(ring[i], 1 | 2) {
            vec![Some(FeatureState::Enabled), Some(FeatureState::Disabled)]
        } else {
            vec![Some(FeatureState::Disabled)]
        };
        assert_eq!(since_stage, want, "{} (ring {})", vms[i], ring[i]);
    }
    assert_eq!(state.sessions_lost, 0);
    let (m, ok) = wait_metric(&metrics, UPDATES, (others + advanced + n) as u64, LIMIT);
    assert!(ok, "{m}");
    println!(
        "ring advance: {n} guests, rings canary {} / 10pct {} / 50pct {} / all {}; \
         push told {others}, set-stage 50pct told {advanced}",
        ring.iter().filter(|r| **r == 0).count(),
        ring.iter().filter(|r| **r == 1).count(),
        ring.iter().filter(|r| **r == 2).count(),
        ring.iter().filter(|r| **r == 3).count(),
    );
    host.stop(false);
}
