//! The tests of health signals: counters, summary, settings, publisher and reader.

#![allow(clippy::unwrap_used)]
use super::store::{read_files, write_file};
use super::*;
use crate::rollout::Override;
use crate::rollout::document::MAX_RINGS;
use crate::source::{EtcdConfig, SourceKind};
use std::collections::BTreeSet;
use std::path::Path;

fn doc(revision: u64, rings: &[(&str, &[&str])]) -> Document {
    let rings: Vec<String> = rings
        .iter()
        .map(|(name, vms)| {
            if vms.is_empty() {
                // A ring needs a selector: one with no VM of the test.
                return format!("{{\"name\":\"{name}\",\"buckets_below\":1}}");
            }
            format!(
                "{{\"name\":\"{name}\",\"vm_ids\":[{}]}}",
                vms.iter()
                    .map(|v| format!("\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    let json = format!(
        "{{\"format\":1,\"revision\":{revision},\"issued_at\":1,\"rings\":[{}],\"features\":{{}}}}",
        rings.join(",")
    );
    Document::parse(json.as_bytes()).unwrap()
}

fn view(doc: Option<Document>) -> View {
    View {
        accepted: doc.map(|d| {
            let trusted = crate::rollout::TrustedKeys::new([]).unwrap();
            Arc::new(
                crate::rollout::Accepted::restore(crate::rollout::unsigned(&d), &trusted).unwrap(),
            )
        }),
        local: Override::default(),
        ga: Arc::new(BTreeSet::new()),
        node: "node-a".into(),
        drill: None,
    }
}

fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}
#[test]
fn events_are_counted_per_ring_and_feature() {
    let h = Health::default();
    let v = view(Some(doc(3, &[("canary", &["vm-1"]), ("rest", &["vm-2"])])));
    let canary = h.ring(&v, Some(&vm("vm-1")), None);
    let rest = h.ring(&v, Some(&vm("vm-2")), None);
    let none = h.ring(&v, Some(&vm("vm-3")), None);
    canary.established();
    canary.request(Feature::KeyRelease);
    canary.grant(Feature::KeyRelease);
    canary.request(Feature::KeyDerivation);
    canary.refusal(Feature::KeyDerivation, ErrorCode::NotPermitted);
    canary.error_sent(ErrorCode::UnknownMessage);
    canary.error_sent(ErrorCode::UnknownMessage);
    canary.error_received(ErrorCode::Unknown(999));
    canary.lost();
    rest.attestation_failed();
    none.established();
    let s = h.summary("node-a", 3, 100, 7);
    assert_eq!(s.revision, 3);
    assert_eq!(s.suppressed, 7);
    let c = &s.rings["canary"];
    assert_eq!((c.sessions, c.lost, c.attest_failed), (1, 1, 0));
    assert_eq!(c.errors_sent["unknown-message"], 2);
    assert_eq!(
        c.errors_received[UNKNOWN_CODE], 1,
        "a guest's code never names itself"
    );
    let kr = &c.features["key-release"];
    assert_eq!((kr.requests, kr.grants), (1, 1));
    assert!(kr.refusals.is_empty());
    assert_eq!(c.features["key-derivation"].refusals["not-permitted"], 1);
    assert_eq!(c.features["key-rotation"], FeatureSummary::default());
    assert_eq!(s.rings["rest"].attest_failed, 1);
    assert_eq!(s.rings[NO_RING].sessions, 1);
    // Without a document (or a vm-id) every VM is in no ring.
    let bare = view(None);
    assert!(Arc::ptr_eq(
        &h.ring(&bare, Some(&vm("vm-1")), None),
        &h.none
    ));
    assert!(Arc::ptr_eq(&h.ring(&v, None, None), &h.none));
}

#[test]
fn an_event_counts_to_the_ring_of_its_time() {
    let h = Health::default();
    let v1 = view(Some(doc(1, &[("canary", &["vm-1"])])));
    let before = h.ring(&v1, Some(&vm("vm-1")), None);
    before.error_sent(ErrorCode::Timeout);
    // Revision 2 moves vm-1 to another ring; the connection looks its
    // ring up again when it sees the change.
    let v2 = view(Some(doc(
        2,
        &[("canary", &["vm-9"]), ("wave-2", &["vm-1"])],
    )));
    let after = h.ring(&v2, Some(&vm("vm-1")), None);
    after.error_sent(ErrorCode::Timeout);
    after.error_sent(ErrorCode::Timeout);
    let s = h.summary("node-a", 2, 0, 0);
    assert_eq!(s.rings["canary"].errors_sent["timeout"], 1);
    assert_eq!(s.rings["wave-2"].errors_sent["timeout"], 2);
    // The same name on another node or another revision is the same
    // ring: the counters go on.
    let again = h.ring(&v2, Some(&vm("vm-9")), None);
    assert!(Arc::ptr_eq(&again, &before));
}

#[test]
fn the_ring_table_is_bounded_and_keeps_the_newest_documents_rings() {
    let h = Health::default();
    let rings = |rev: u64, prefix: &str| {
        let names: Vec<String> = (0..MAX_RINGS).map(|i| format!("{prefix}{i}")).collect();
        let pairs: Vec<(&str, &[&str])> = names.iter().map(|n| (n.as_str(), &[][..])).collect();
        doc(rev, &pairs)
    };
    let d1 = rings(1, "a");
    let d2 = rings(2, "b");
    let d3 = rings(3, "c");
    h.track(&d1);
    h.track(&d2);
    assert_eq!(h.rings().len(), MAX_RING_SLOTS + 1);
    h.rings().iter().for_each(|(n, c)| {
        if &**n != NO_RING {
            c.established();
        }
    });
    // A newer document evicts names the newest does not have.
    h.track(&d3);
    let now: Vec<String> = h.rings().iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(now.len(), MAX_RING_SLOTS + 1);
    assert_eq!(now.iter().filter(|n| n.starts_with('c')).count(), MAX_RINGS);
    // A late connection with an old document evicts nothing and
    // counts apart.
    let late = h.slot("a0", &d1);
    late.established();
    assert_eq!(h.summary("node-a", 3, 0, 0).rings.get("a0"), None);
    // Even the largest table's summary fits the bound.
    for (_, c) in h.rings() {
        for a in c.errors_sent.iter().chain(&c.errors_received) {
            a.store(u64::MAX, Ordering::Relaxed);
        }
        for f in &c.features {
            f.refusals
                .iter()
                .for_each(|a| a.store(u64::MAX, Ordering::Relaxed));
            f.requests.store(u64::MAX, Ordering::Relaxed);
        }
    }
    let bytes = h
        .summary(
            &"n".repeat(crate::rollout::document::MAX_NODE_NAME),
            u64::MAX,
            u64::MAX,
            u64::MAX,
        )
        .to_json()
        .unwrap();
    assert!(bytes.len() <= MAX_SUMMARY_BYTES, "{}", bytes.len());
    HealthSummary::parse(&bytes).unwrap();
}

fn sample_summary() -> HealthSummary {
    let h = Health::default();
    let v = view(Some(doc(5, &[("canary", &["vm-1"])])));
    let r = h.ring(&v, Some(&vm("vm-1")), None);
    r.established();
    r.request(Feature::KeyRelease);
    r.refusal(Feature::KeyRelease, ErrorCode::FeatureNotEnabled);
    r.error_sent(ErrorCode::FeatureNotEnabled);
    h.summary("node-a", 5, 1000, 2)
}

#[test]
fn summaries_round_trip_and_are_parsed_strictly() {
    let s = sample_summary();
    let bytes = s.to_json().unwrap();
    assert_eq!(HealthSummary::parse(&bytes).unwrap(), s);
    let text = String::from_utf8(bytes).unwrap();
    let refused = [
        text.replacen("\"format\":1", "\"format\":2", 1),
        text.replacen("\"suppressed\":2", "\"suppressed\":2,\"extra\":1", 1),
        text.replacen("\"lost\":0", "\"lost\":0,\"lost2\":0", 1),
        text.replacen("\"node\":\"node-a\"", "\"node\":\"node a\\n\"", 1),
        text.replacen("\"canary\"", "\"Canary!\"", 1),
        text.replacen("\"key-release\"", "\"key-exfiltration\"", 1),
        text.replacen("\"feature-not-enabled\"", "\"code-4711\"", 1),
        text.replacen("\"lost\":0", "\"lost\":-1", 1),
        text.replacen("\"lost\":0", "\"lost\":\"0\"", 1),
        text[..text.len() - 1].to_owned(),
    ];
    for bad in &refused {
        assert!(HealthSummary::parse(bad.as_bytes()).is_err(), "{bad}");
    }
    let big = vec![b' '; MAX_SUMMARY_BYTES + 1];
    assert!(matches!(
        HealthSummary::parse(&big),
        Err(SummaryError::TooLarge { .. })
    ));
}

#[test]
fn aggregate_sums_by_ring_name_across_nodes() {
    let a = sample_summary();
    let mut b = sample_summary();
    b.node = "node-b".into();
    let t = aggregate([&a, &b]);
    assert_eq!(t["canary"].sessions, 2);
    assert_eq!(t["canary"].errors_sent["feature-not-enabled"], 2);
    assert_eq!(
        t["canary"].features["key-release"].refusals["feature-not-enabled"],
        2
    );
    assert_eq!(t[NO_RING].sessions, 0);
}

#[test]
fn delta_takes_differences_and_survives_restarts_and_resets() {
    let early = sample_summary();
    let mut late = early.clone();
    late.at_unix += 10;
    late.suppressed = 5;
    {
        let c = late.rings.get_mut("canary").unwrap();
        c.sessions = 4;
        *c.errors_sent.get_mut("feature-not-enabled").unwrap() = 3;
        c.errors_sent.insert("unknown-message".into(), 2);
    }
    let d = delta(&late, &early).unwrap();
    let c = &d.rings["canary"];
    assert_eq!(c.sessions, 3);
    assert_eq!(c.errors_sent["feature-not-enabled"], 2);
    assert_eq!(c.errors_sent["unknown-message"], 2);
    assert_eq!(c.features["key-release"].requests, 0);
    assert_eq!(d.suppressed, 3);
    // A ring whose counters went down was reset: later is the delta.
    let mut reset = late.clone();
    reset.rings.get_mut("canary").unwrap().sessions = 1;
    assert_eq!(delta(&reset, &late).unwrap().rings["canary"].sessions, 1);
    // A restarted node counts from zero.
    let mut restarted = early.clone();
    restarted.started_unix += 1;
    assert_eq!(
        delta(&restarted, &late).unwrap().rings["canary"].sessions,
        1
    );
    // Other nodes are not compared.
    let mut other = late.clone();
    other.node = "node-b".into();
    assert!(delta(&other, &early).is_none());
    // The fleet: node-a's delta; node-b new since the earlier read
    // counts whole; node-c gone counts nothing; node-d old but unseen
    // before is left out.
    let mut b = early.clone();
    b.node = "node-b".into();
    b.started_unix = early.at_unix + 1;
    let mut c = early.clone();
    c.node = "node-c".into();
    let mut d_old = early.clone();
    d_old.node = "node-d".into();
    d_old.started_unix = 0;
    let t = fleet_delta(
        &[late.clone(), b, d_old],
        &[early.clone(), c],
        early.at_unix,
    );
    assert_eq!(t.rings["canary"].sessions, 3 + 1);
    assert_eq!(t.vanished, ["node-c"]);
    assert_eq!(t.left_out, ["node-d"]);
    assert!(t.restarted.is_empty());
    assert!(
        t.gaps()
            .unwrap()
            .contains("1 node(s) vanished in the window (node-c)")
    );
    // A node that restarted in the window is a gap too; one that only
    // left out a newcomer is not.
    let t = fleet_delta(&[restarted], &[late.clone()], early.at_unix);
    assert_eq!(t.restarted, ["node-a"]);
    assert!(t.gaps().unwrap().contains("restarted"));
    let mut d_old = late.clone();
    d_old.node = "node-d".into();
    d_old.started_unix = 0;
    let t = fleet_delta(
        &[late.clone(), d_old],
        std::slice::from_ref(&early),
        early.at_unix,
    );
    assert_eq!(t.gaps(), None);
    assert_eq!(t.suppressed, 3);
}

#[test]
fn settings_are_bounded_and_pick_the_store_by_source() {
    let etcd = EtcdConfig::default();
    let dir = Path::new("/var/lib/vkx/node/rollout");
    let s = HealthSettings::new(
        DEFAULT_INTERVAL_MS,
        DEFAULT_PREFIX,
        Some((SourceKind::Etcd, &etcd)),
        dir,
    )
    .unwrap();
    assert_eq!(s.lease_ttl_s(), 6);
    assert_eq!(
        s.store,
        HealthStore::Etcd {
            config: etcd.clone(),
            prefix: DEFAULT_PREFIX.into()
        }
    );
    let f = HealthSettings::new(500, DEFAULT_PREFIX, None, dir).unwrap();
    assert_eq!(f.lease_ttl_s(), MIN_LEASE_TTL_S);
    assert_eq!(
        f.store,
        HealthStore::File {
            file: dir.join(HEALTH_FILE),
            dir: None
        }
    );
    let collected = Path::new("/var/lib/vkx/collected");
    assert_eq!(
        f.clone()
            .with_collected(Some(collected.into()))
            .unwrap()
            .store,
        HealthStore::File {
            file: dir.join(HEALTH_FILE),
            dir: Some(collected.into())
        }
    );
    assert!(s.clone().with_collected(Some(collected.into())).is_err());
    assert_eq!(s.clone().with_collected(None).unwrap(), s);
    for (ms, prefix) in [
        (499, DEFAULT_PREFIX),
        (60_001, DEFAULT_PREFIX),
        (2000, "vkx"),
        (2000, "/"),
        (2000, "/a\nb"),
    ] {
        assert!(
            HealthSettings::new(ms, prefix, None, dir).is_err(),
            "{ms} {prefix:?}"
        );
    }
    assert_eq!(etcd_key("/vkx/health/", "node-a"), "/vkx/health/node-a");
}

#[test]
fn the_file_reader_keeps_one_summary_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut older = sample_summary();
    older.at_unix = 10;
    let mut newer = older.clone();
    newer.at_unix = 20;
    std::fs::write(dir.path().join("a.json"), older.to_json().unwrap()).unwrap();
    std::fs::write(dir.path().join("b.json"), newer.to_json().unwrap()).unwrap();
    let fleet = read_files(&dir.path().join("none.json"), Some(dir.path())).unwrap();
    assert_eq!(fleet.summaries, vec![newer]);
    assert_eq!(fleet.refused, 1);
}

#[tokio::test]
async fn the_file_store_is_written_atomically_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(HEALTH_FILE);
    let s = sample_summary();
    write_file(&file, &s.to_json().unwrap()).unwrap();
    let collected = dir.path().join("fleet");
    std::fs::create_dir(&collected).unwrap();
    let mut b = s.clone();
    b.node = "node-b".into();
    std::fs::write(collected.join("node-b.json"), b.to_json().unwrap()).unwrap();
    std::fs::write(collected.join("junk.json"), b"{}").unwrap();
    std::fs::write(collected.join("notes.txt"), b"ignored").unwrap();
    let fleet = read_all(&HealthStore::File {
        file: file.clone(),
        dir: Some(collected),
    })
    .await
    .unwrap();
    assert_eq!(fleet.summaries.len(), 2);
    assert_eq!(fleet.refused, 1);
    let none = read_all(&HealthStore::File {
        file: dir.path().join("absent.json"),
        dir: None,
    })
    .await
    .unwrap();
    assert!(none.summaries.is_empty());
}

#[test]
fn render_names_rings_and_codes_only_from_our_tables() {
    let h = Health::default();
    let v = view(Some(doc(1, &[("canary", &["vm-1"])])));
    let r = h.ring(&v, Some(&vm("vm-1")), None);
    r.error_received(ErrorCode::Unknown(4711));
    r.refusal(Feature::KeyRotation, ErrorCode::Internal);
    let mut o = String::new();
    h.render(&mut o);
    assert!(o.contains("vkx_health_errors_received_total{ring=\"canary\",code=\"unknown\"} 1"));
    assert!(o.contains(
        "vkx_health_refusals_total{ring=\"canary\",feature=\"key-rotation\",code=\"internal\"} 1"
    ));
    assert!(o.contains("vkx_health_sessions_total{ring=\"(none)\"} 0"));
    assert!(!o.contains("4711"));
}
