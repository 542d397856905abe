//! The rollout document's sources against real files and a real etcd
//! (loopback, its own data directory): what the host sees when the
//! document changes, when the source breaks, and when etcd is full.
//!
//! Every test runs the source on a current-thread runtime, as
//! `vkx-host serve` does, and every wait has a limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vkx_e2e::etcd::{CutProxy, Etcd, EtcdOptions, is_private_dir};
use vkx_host::source::{
    self, EtcdConfig, FILE_POLL_INTERVAL, Health, MAX_SOURCE_BYTES, SourceConfig, SourceCounters,
    SourceError, SourceKind, SourceStatus, Version,
};

/// The promise: a change is seen within this.
const SEEN_WITHIN: Duration = Duration::from_secs(1);
/// Limit of waits for health changes (a reconnect is backoff-spaced).
const HEALTH_WITHIN: Duration = Duration::from_secs(10);

/// A running source and the handles a test needs.
struct Running {
    rx: watch::Receiver<SourceStatus>,
    counters: Arc<SourceCounters>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(config: SourceConfig) -> Self {
        let (tx, rx) = watch::channel(SourceStatus::connecting());
        let (stop, stop_rx) = watch::channel(false);
        let counters = Arc::new(SourceCounters::default());
        let task = tokio::spawn(source::run(config, tx, counters.clone(), stop_rx));
        Self {
            rx,
            counters,
            stop,
            task,
        }
    }

    /// Waits until `pred` holds, at most `limit`; returns the status and
    /// how long it took.
    async fn wait(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&SourceStatus) -> bool,
    ) -> (SourceStatus, Duration) {
        let t0 = Instant::now();
        let rx = &mut self.rx;
        let found = tokio::time::timeout(limit, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return s.clone();
                    }
                }
                rx.changed().await.expect("source task ended");
            }
        })
        .await;
        match found {
            Ok(s) => (s, t0.elapsed()),
            Err(_) => panic!(
                "{what}: not within {limit:?}; last status {}",
                describe(&self.rx.borrow())
            ),
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("source stops within 5 s")
            .unwrap();
    }
}

fn describe(s: &SourceStatus) -> String {
    format!(
        "value {:?}, version {:?}, health {:?}",
        s.value
            .as_ref()
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        s.version,
        s.health
    )
}

fn has(s: &SourceStatus, value: &[u8]) -> bool {
    s.value.as_deref() == Some(value)
}

fn is_down(s: &SourceStatus) -> bool {
    matches!(s.health, Health::Down { .. })
}

fn file_config(path: &Path) -> SourceConfig {
    SourceConfig::new(SourceKind::File, path.to_path_buf(), EtcdConfig::default())
}

/// Quick reconnects for tests; the production defaults are slower.
fn etcd_config(endpoint: String, key: &str) -> SourceConfig {
    let etcd = EtcdConfig {
        endpoints: vec![endpoint],
        key: key.to_owned(),
        timeout_ms: 1000,
        backoff_cap_ms: 2000,
        reconnect_spread_ms: 500,
    };
    let c = SourceConfig::new(SourceKind::Etcd, "/unused".into(), etcd);
    c.validate().unwrap();
    c
}

const DOC_KEY: &str = "/vkx/rollout/document";

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "n={} p50={:?} max={:?}",
        v.len(),
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// Replaces `path` by a rename the way any tool would (not through
/// `source::write`, which refuses an over-size document).
fn rename_over(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------- files

#[tokio::test]
async fn file_source_sees_each_atomic_replace_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollout.json");
    let config = file_config(&path);
    source::write(&config, b"v0").await.unwrap();
    let mut src = Running::start(config.clone());
    let (s, _) = src
        .wait(SEEN_WITHIN, "initial value", |s| has(s, b"v0"))
        .await;
    assert!(s.is_healthy());
    assert!(matches!(s.version, Version::File(_)));
    let mut seen = Vec::new();
    let mut last = s.version;
    for i in 1..=8 {
        let doc = format!("v{i}");
        let t0 = Instant::now();
        // Half through `write`, half by a plain rename of the same length.
        if i % 2 == 0 {
            source::write(&config, doc.as_bytes()).await.unwrap();
        } else {
            rename_over(&path, doc.as_bytes());
        }
        let (s, _) = src
            .wait(SEEN_WITHIN, &format!("replace {i}"), |s| {
                has(s, doc.as_bytes())
            })
            .await;
        seen.push(t0.elapsed());
        assert_ne!(s.version, last, "every replace is a new version");
        last = s.version;
    }
    println!(
        "file replace -> observed (poll {FILE_POLL_INTERVAL:?}): {}",
        stats(seen.clone())
    );
    assert!(seen.iter().all(|d| *d < SEEN_WITHIN));
    let (bytes, v) = source::read(&config).await.unwrap().unwrap();
    assert_eq!((bytes.as_slice(), v), (&b"v8"[..], last));
    assert_eq!(src.counters.snapshot().errors, 0);
    src.stop().await;
}

#[tokio::test]
async fn file_source_absent_is_none_and_unreadable_is_down_with_the_value_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollout.json");
    let mut src = Running::start(file_config(&path));
    // No file: a healthy "no document", not an error.
    let (s, _) = src.wait(SEEN_WITHIN, "absent", |s| s.is_healthy()).await;
    assert_eq!((s.value, s.version), (None, Version::None));
    rename_over(&path, b"doc");
    src.wait(SEEN_WITHIN, "created", |s| has(s, b"doc")).await;
    std::fs::remove_file(&path).unwrap();
    src.wait(SEEN_WITHIN, "deleted", |s| {
        s.is_healthy() && s.value.is_none()
    })
    .await;
    rename_over(&path, b"doc2");
    src.wait(SEEN_WITHIN, "recreated", |s| has(s, b"doc2"))
        .await;
    // Unreadable (a directory where the file should be; the tests run as
    // root, so a mode change would not do): down, the value kept.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let (s, _) = src.wait(SEEN_WITHIN, "down", is_down).await;
    assert!(has(&s, b"doc2"), "{}", describe(&s));
    assert!(s.last_good.is_some());
    let Health::Down { error, .. } = &s.health else {
        unreachable!()
    };
    assert!(error.contains("not a regular file"), "{error}");
    std::fs::remove_dir(&path).unwrap();
    rename_over(&path, b"doc3");
    src.wait(SEEN_WITHIN, "readable again", |s| {
        s.is_healthy() && has(s, b"doc3")
    })
    .await;
    assert!(src.counters.snapshot().errors >= 1);
    src.stop().await;
}

#[tokio::test]
async fn file_source_refuses_an_oversize_document_and_keeps_the_last_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollout.json");
    let config = file_config(&path);
    source::write(&config, b"small").await.unwrap();
    let mut src = Running::start(config.clone());
    src.wait(SEEN_WITHIN, "initial", |s| has(s, b"small")).await;
    // The writer refuses it before any I/O ...
    let big = vec![b'x'; MAX_SOURCE_BYTES + 1];
    assert!(matches!(
        source::write(&config, &big).await,
        Err(SourceError::TooLarge { .. })
    ));
    // ... and a file put there by other means is refused by the reader.
    rename_over(&path, &big);
    let (s, _) = src.wait(SEEN_WITHIN, "over-size refused", is_down).await;
    assert!(has(&s, b"small"), "{}", describe(&s));
    let Health::Down { error, .. } = &s.health else {
        unreachable!()
    };
    assert!(error.contains("over the limit"), "{error}");
    assert!(matches!(
        source::read(&config).await,
        Err(SourceError::TooLarge { .. })
    ));
    // Exactly at the limit is fine.
    let max = vec![b'y'; MAX_SOURCE_BYTES];
    source::write(&config, &max).await.unwrap();
    let (s, _) = src
        .wait(SEEN_WITHIN, "limit-size accepted", |s| s.is_healthy())
        .await;
    assert_eq!(s.value.as_deref().map(<[u8]>::len), Some(MAX_SOURCE_BYTES));
    src.stop().await;
}

// ----------------------------------------------------------------- etcd

#[tokio::test]
async fn etcd_source_reads_then_sees_each_put_within_a_second() {
    let etcd = Etcd::start();
    assert!(
        is_private_dir(&etcd.data_dir()),
        "etcd data dir must be 0700"
    );
    let config = etcd_config(etcd.endpoint(), DOC_KEY);
    let v1 = source::write(&config, b"doc-1").await.unwrap();
    let mut src = Running::start(config.clone());
    let (s, took) = src
        .wait(Duration::from_secs(5), "initial get", |s| has(s, b"doc-1"))
        .await;
    println!("etcd source: first value after {took:?}");
    assert!(s.is_healthy());
    assert_eq!(s.version, v1);
    let mut seen = Vec::new();
    let mut last = v1;
    for i in 2..=21 {
        let doc = format!("doc-{i}");
        let t0 = Instant::now();
        let v = source::write(&config, doc.as_bytes()).await.unwrap();
        let (s, _) = src
            .wait(SEEN_WITHIN, &format!("put {i}"), |s| has(s, doc.as_bytes()))
            .await;
        seen.push(t0.elapsed());
        assert_eq!(s.version, v);
        assert!(matches!((last, v), (Version::Etcd(a), Version::Etcd(b)) if b > a));
        last = v;
    }
    println!("etcd put -> observed (incl. the put): {}", stats(seen));
    // Compare-and-swap: a stale version is refused, the current one works.
    let err = source::write_if(&config, b"stale", Some(v1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SourceError::Conflict { found: Some(f), .. } if f == last),
        "{err}"
    );
    let v = source::write_if(&config, b"cas", Some(last)).await.unwrap();
    src.wait(SEEN_WITHIN, "cas put", |s| has(s, b"cas")).await;
    let (bytes, rv) = source::read(&config).await.unwrap().unwrap();
    assert_eq!((bytes.as_slice(), rv), (&b"cas"[..], v));
    // An over-size value put by another writer: refused, the last value
    // kept, down until a good value arrives.
    etcd.put(DOC_KEY, &vec![b'z'; MAX_SOURCE_BYTES + 1]);
    let (s, _) = src.wait(SEEN_WITHIN, "over-size refused", is_down).await;
    assert!(has(&s, b"cas"), "{}", describe(&s));
    assert!(matches!(
        source::read(&config).await,
        Err(SourceError::TooLarge { .. })
    ));
    etcd.put(DOC_KEY, b"good-again");
    src.wait(SEEN_WITHIN, "good value after refusal", |s| {
        s.is_healthy() && has(s, b"good-again")
    })
    .await;
    // A delete is a value too: none.
    etcd.etcdctl_ok(&["del", DOC_KEY]);
    let (s, _) = src.wait(SEEN_WITHIN, "delete", |s| s.value.is_none()).await;
    assert!(s.is_healthy());
    assert!(source::read(&config).await.unwrap().is_none());
    assert!(source::write_if(&config, b"new", None).await.is_ok());
    let c = src.counters.snapshot();
    assert_eq!(
        (c.errors, c.reconnects),
        (1, 0),
        "one refusal, no reconnect: {c:?}"
    );
    src.stop().await;
}

/// Records every distinct version the source publishes, to check that
/// revisions only go up across disconnects.
fn record_versions(mut rx: watch::Receiver<SourceStatus>) -> Arc<Mutex<Vec<i64>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            if let Version::Etcd(r) = rx.borrow_and_update().version {
                let mut s = s.lock().unwrap();
                if s.last() != Some(&r) {
                    s.push(r);
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    seen
}

#[tokio::test]
async fn etcd_source_is_fail_static_across_restarts_and_loses_no_event() {
    let mut etcd = Etcd::start();
    let config = etcd_config(etcd.endpoint(), DOC_KEY);
    source::write(&config, b"before").await.unwrap();
    let mut src = Running::start(config.clone());
    let versions = record_versions(src.rx.clone());
    src.wait(Duration::from_secs(5), "initial", |s| has(s, b"before"))
        .await;
    for (round, crash) in [(1, false), (2, true)] {
        // etcd goes away (SIGTERM, then a SIGKILL crash): down, value kept.
        if crash {
            etcd.kill();
        } else {
            etcd.stop();
        }
        let prev = format!("after-{}", round - 1);
        let expect_prev: &[u8] = if round == 1 {
            b"before"
        } else {
            prev.as_bytes()
        };
        let (s, took) = src.wait(HEALTH_WITHIN, "down", is_down).await;
        println!("round {round}: down noticed {took:?} after etcd exited");
        assert!(has(&s, expect_prev), "{}", describe(&s));
        assert!(source::read(&config).await.is_err(), "etcd is down");
        // Back on the same data; puts made at once, likely before the
        // source reconnects, are replayed from last revision + 1.
        etcd.restart();
        let restarted = Instant::now();
        for i in 0..5 {
            source::write(&config, format!("burst-{round}-{i}").as_bytes())
                .await
                .unwrap();
        }
        let doc = format!("after-{round}");
        source::write(&config, doc.as_bytes()).await.unwrap();
        let (s, _) = src
            .wait(HEALTH_WITHIN, "healthy again", |s| {
                s.is_healthy() && has(s, doc.as_bytes())
            })
            .await;
        println!(
            "round {round}: healthy with the last of 6 puts {:?} after etcd answered again",
            restarted.elapsed()
        );
        assert!(s.last_good.is_some());
        // And a put made now is seen within the promise.
        let fresh = format!("fresh-{round}");
        let t0 = Instant::now();
        source::write(&config, fresh.as_bytes()).await.unwrap();
        src.wait(SEEN_WITHIN, "put after reconnect", |s| {
            has(s, fresh.as_bytes())
        })
        .await;
        println!("round {round}: put -> observed {:?}", t0.elapsed());
        // Keep the name the next round expects as its previous value.
        source::write(&config, doc.as_bytes()).await.unwrap();
        src.wait(SEEN_WITHIN, "settle", |s| has(s, doc.as_bytes()))
            .await;
    }
    let c = src.counters.snapshot();
    println!("counters: {c:?}");
    assert!(c.watch_restarts >= 2, "{c:?}");
    assert!(c.reconnects >= 2, "{c:?}");
    let versions = versions.lock().unwrap().clone();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "revisions went back: {versions:?}"
    );
    src.stop().await;
}

#[tokio::test]
async fn etcd_source_resumes_after_a_partition_and_rereads_after_compaction() {
    let etcd = Etcd::start();
    let proxy = CutProxy::start(&etcd);
    let direct = etcd_config(etcd.endpoint(), DOC_KEY);
    let config = etcd_config(proxy.endpoint(), DOC_KEY);
    source::write(&direct, b"p0").await.unwrap();
    let mut src = Running::start(config.clone());
    src.wait(Duration::from_secs(5), "initial", |s| has(s, b"p0"))
        .await;

    // 1. A partition, etcd still up: writes made meanwhile are replayed
    //    from the last revision + 1 (the history is still there).
    proxy.cut();
    src.wait(HEALTH_WITHIN, "down on partition", is_down).await;
    for i in 1..=10 {
        source::write(&direct, format!("p{i}").as_bytes())
            .await
            .unwrap();
    }
    proxy.restore();
    src.wait(HEALTH_WITHIN, "resumed", |s| {
        s.is_healthy() && has(s, b"p10")
    })
    .await;
    let c = src.counters.snapshot();
    assert_eq!(c.compaction_rereads, 0, "{c:?}");
    assert!(c.watch_restarts >= 1, "{c:?}");

    // 2. A partition with a compaction past the watched revision: the
    //    resumed watch is cancelled; the source reads the key again.
    proxy.cut();
    src.wait(HEALTH_WITHIN, "down again", is_down).await;
    for i in 11..=20 {
        source::write(&direct, format!("p{i}").as_bytes())
            .await
            .unwrap();
    }
    etcd.compact(etcd.revision());
    proxy.restore();
    let (s, took) = src
        .wait(HEALTH_WITHIN, "re-read after compaction", |s| {
            s.is_healthy() && has(s, b"p20")
        })
        .await;
    println!("compaction: latest value after {took:?} from restore");
    let Version::Etcd(r) = s.version else {
        panic!("{s:?}")
    };
    assert_eq!(
        Version::Etcd(r),
        source::read(&direct).await.unwrap().unwrap().1
    );
    let c = src.counters.snapshot();
    println!("counters: {c:?}");
    assert_eq!(c.compaction_rereads, 1, "{c:?}");
    assert!(c.reconnects >= 2 && c.watch_restarts >= 2, "{c:?}");
    // Still watching after the re-read.
    source::write(&direct, b"p21").await.unwrap();
    src.wait(SEEN_WITHIN, "put after re-read", |s| has(s, b"p21"))
        .await;
    src.stop().await;
}

#[tokio::test]
async fn etcd_full_refuses_writes_with_a_typed_error_and_the_source_keeps_serving() {
    // A tiny backend quota: a handful of 200-KiB values fill it.
    let etcd = Etcd::start_with(EtcdOptions {
        quota_backend_bytes: Some(2 * 1024 * 1024),
    });
    let config = etcd_config(etcd.endpoint(), DOC_KEY);
    source::write(&config, b"kill-switch-off").await.unwrap();
    let mut src = Running::start(config.clone());
    src.wait(Duration::from_secs(5), "initial", |s| {
        has(s, b"kill-switch-off")
    })
    .await;
    // Fill it with other keys until etcd refuses (bounded).
    const MAX_FILL_PUTS: usize = 100;
    let filler = vec![b'f'; 200 * 1024];
    let mut full = false;
    for i in 0..MAX_FILL_PUTS {
        let c = etcd_config(etcd.endpoint(), &format!("/fill/{i}"));
        match source::write(&c, &filler).await {
            Ok(_) => {}
            Err(SourceError::SpaceExceeded) => {
                println!("etcd full after {i} filler puts of 200 KiB");
                full = true;
                break;
            }
            Err(e) => panic!("unexpected error while filling: {e}"),
        }
    }
    assert!(full, "etcd never filled up");
    // The kill-switch flip is refused, typed, with the operator's way out.
    let err = source::write(&config, b"kill-switch-on").await.unwrap_err();
    assert!(matches!(err, SourceError::SpaceExceeded), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("defrag") && text.contains("alarm disarm") && text.contains("quota"),
        "{text}"
    );
    // The source keeps its value and stays healthy; reads still work.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = src.rx.borrow().clone();
    assert!(
        s.is_healthy() && has(&s, b"kill-switch-off"),
        "{}",
        describe(&s)
    );
    let (bytes, _) = source::read(&config).await.unwrap().unwrap();
    assert_eq!(bytes, b"kill-switch-off");
    // The documented way out works: free space, compact, defrag, disarm.
    etcd.etcdctl_ok(&["del", "--prefix", "/fill/"]);
    etcd.compact(etcd.revision());
    etcd.defrag_and_disarm();
    source::write(&config, b"kill-switch-on").await.unwrap();
    src.wait(SEEN_WITHIN, "flip after recovery", |s| {
        has(s, b"kill-switch-on")
    })
    .await;
    src.stop().await;
}

/// `etcdctl lease grant TTL`: the lease id (decimal).
fn grant(etcd: &Etcd, ttl_s: u32) -> i64 {
    let out = etcd.etcdctl_ok(&["lease", "grant", &ttl_s.to_string()]);
    // "lease 694d8b2f2a2f1c0a granted with TTL(60s)"
    let hex = out.split_whitespace().nth(1).unwrap();
    i64::from_str_radix(hex, 16).unwrap()
}

#[tokio::test]
async fn a_fenced_write_lands_only_while_the_fence_key_is_under_the_writers_lease() {
    let etcd = Etcd::start();
    let config = etcd_config(etcd.endpoint(), "/vkx/rollout/document");
    let lock = "/vkx/rollout/controller/key-release";
    let mine = grant(&etcd, 60);
    etcd.etcdctl_ok(&["put", lock, "me", "--lease", &format!("{mine:x}")]);
    let fence = source::Fence {
        key: lock.to_owned(),
        lease: mine,
    };
    let v1 = source::write_fenced(&config, b"one", Some(Version::None), Some(&fence))
        .await
        .unwrap();
    // A stale expectation is still a conflict while the fence holds.
    let err = source::write_fenced(&config, b"stale", Some(Version::None), Some(&fence))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Conflict { .. }), "{err}");
    // The lease gone (the lock key with it): fenced, nothing written.
    etcd.etcdctl_ok(&["lease", "revoke", &format!("{mine:x}")]);
    let err = source::write_fenced(&config, b"two", Some(v1), Some(&fence))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Fenced { .. }), "{err}");
    // Someone else's lock under another lease: fenced too.
    let theirs = grant(&etcd, 60);
    etcd.etcdctl_ok(&["put", lock, "them", "--lease", &format!("{theirs:x}")]);
    let err = source::write_fenced(&config, b"two", Some(v1), Some(&fence))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Fenced { .. }), "{err}");
    let (bytes, v) = source::read(&config).await.unwrap().unwrap();
    assert_eq!((bytes.as_slice(), v), (&b"one"[..], v1), "nothing written");
    // Under the new holder's fence the same write lands.
    let theirs = source::Fence {
        key: lock.to_owned(),
        lease: theirs,
    };
    source::write_fenced(&config, b"two", Some(v1), Some(&theirs))
        .await
        .unwrap();
    let (bytes, _) = source::read(&config).await.unwrap().unwrap();
    assert_eq!(bytes, b"two");
}
