//! The metrics' tests: counting, the exposition, the endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::http::{CONTENT_TYPE, head_complete, parse_response, response};
use super::*;
use crate::admission::{AdmissionConfig, Limits};
use crate::admission::{AdmissionControl, Usage};
use crate::limit::PerKey;
use std::path::PathBuf;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn usage() -> Usage {
    Usage {
        open: 5,
        connections: 4,
        handshakes: 3,
        peers: 2,
        limits: Limits::new(2048, &AdmissionConfig::default()).unwrap(),
    }
}

/// The value of one sample line, e.g. `name{label="x"}`.
fn value(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[test]
fn renders_every_family_with_help_and_type() {
    let m = Arc::new(Metrics::default());
    m.handshake(HandshakeOutcome::Attested);
    m.handshake(HandshakeOutcome::Refused);
    m.handshake(HandshakeOutcome::Refused);
    m.error_sent(ErrorCode::Busy);
    m.error_sent(ErrorCode::Busy);
    m.error_sent(ErrorCode::RateLimited);
    m.error_sent(ErrorCode::Unknown(999));
    m.refused(RefuseReason::MaxHandshakes);
    m.keys_released(3);
    m.update_pushed();
    m.update_acked(true);
    m.update_acked(false);
    m.session_rate_limited();
    m.rewind(true);
    m.reload(true, 1_700_000_000);
    m.reload(false, 0);
    m.reload(false, 0);
    let guard = m.established();
    let [gauge, _other] = two_sessions_one_killed(&m);
    m.rollout.update_sent();
    m.rollout.refused("replay");
    m.rollout.refused("no-such-label");
    m.rollout.accepted(7, 100, 200);
    m.rollout.feature(feature::KEY_RELEASE, true, Some(2));
    let none = m.health.no_ring();
    none.established();
    none.lost();
    none.request(crate::rollout::Feature::KeyRelease);
    none.refusal(
        crate::rollout::Feature::KeyRelease,
        ErrorCode::FeatureNotEnabled,
    );
    none.error_sent(ErrorCode::UnknownMessage);
    none.error_received(ErrorCode::Timeout);
    let t = render(&m, &usage(), 42);
    for (series, v) in [
        ("vkx_connections_open", "5"),
        ("vkx_connections", "4"),
        ("vkx_handshakes_in_progress", "3"),
        ("vkx_peer_buckets", "2"),
        ("vkx_sessions_established", "1"),
        ("vkx_admission_limit{limit=\"max_open\"}", "4096"),
        ("vkx_admission_limit{limit=\"max_handshakes\"}", "256"),
        ("vkx_handshakes_total{outcome=\"attested\"}", "1"),
        ("vkx_handshakes_total{outcome=\"refused\"}", "2"),
        ("vkx_handshakes_total{outcome=\"timeout\"}", "0"),
        ("vkx_errors_sent_total{code=\"busy\"}", "2"),
        ("vkx_errors_sent_total{code=\"rate-limited\"}", "1"),
        ("vkx_errors_sent_total{code=\"malformed\"}", "0"),
        ("vkx_errors_sent_total{code=\"unknown\"}", "1"),
        (
            "vkx_admissions_refused_total{reason=\"max_handshakes\"}",
            "1",
        ),
        ("vkx_admissions_refused_total{reason=\"max_open\"}", "0"),
        ("vkx_sessions_rate_limited_total", "1"),
        ("vkx_attestation_rewinds_total{action=\"refused\"}", "1"),
        ("vkx_attestation_rewinds_total{action=\"flagged\"}", "0"),
        ("vkx_log_lines_suppressed_total", "42"),
        ("vkx_reloads_total{outcome=\"ok\"}", "1"),
        ("vkx_reloads_total{outcome=\"invalid\"}", "2"),
        ("vkx_reload_last_success_timestamp_seconds", "1700000000"),
        ("vkx_keys_released_total", "3"),
        ("vkx_key_updates_pushed_total", "1"),
        ("vkx_key_updates_acked_total{result=\"installed\"}", "1"),
        ("vkx_key_updates_acked_total{result=\"failed\"}", "1"),
        (
            "vkx_feature_sessions{feature=\"key-release\",state=\"enabled\"}",
            "1",
        ),
        (
            "vkx_feature_sessions{feature=\"key-release\",state=\"disabled\"}",
            "1",
        ),
        (
            "vkx_feature_sessions{feature=\"key-rotation\",state=\"enabled\"}",
            "2",
        ),
        ("vkx_feature_updates_sent_total", "1"),
        (
            "vkx_rollout_documents_refused_total{reason=\"replay\"}",
            "1",
        ),
        ("vkx_rollout_documents_refused_total{reason=\"other\"}", "1"),
        ("vkx_rollout_revision", "7"),
        ("vkx_rollout_feature_killed{feature=\"key-release\"}", "1"),
        ("vkx_rollout_feature_stage{feature=\"key-release\"}", "3"),
        ("vkx_health_sessions_total{ring=\"(none)\"}", "1"),
        ("vkx_health_sessions_lost_total{ring=\"(none)\"}", "1"),
        (
            "vkx_health_attestation_failures_total{ring=\"(none)\"}",
            "0",
        ),
        (
            "vkx_health_requests_total{ring=\"(none)\",feature=\"key-release\"}",
            "1",
        ),
        (
            "vkx_health_grants_total{ring=\"(none)\",feature=\"key-release\"}",
            "0",
        ),
        // Two sessions with everything on, one of them then killed.
        (
            "vkx_health_enabled_sessions{ring=\"(none)\",feature=\"key-release\"}",
            "1",
        ),
        (
            "vkx_health_enabled_sessions{ring=\"(none)\",feature=\"key-rotation\"}",
            "2",
        ),
        (
            "vkx_health_refusals_total{ring=\"(none)\",feature=\"key-release\",code=\"feature-not-enabled\"}",
            "1",
        ),
        (
            "vkx_health_errors_sent_total{ring=\"(none)\",code=\"unknown-message\"}",
            "1",
        ),
        (
            "vkx_health_errors_received_total{ring=\"(none)\",code=\"timeout\"}",
            "1",
        ),
        ("vkx_health_publishes_total{result=\"failed\"}", "0"),
    ] {
        assert_eq!(value(&t, series).as_deref(), Some(v), "{series}\n{t}");
    }
    drop(guard);
    drop(gauge);
    let t = render(&m, &usage(), 42);
    assert_eq!(
        value(
            &t,
            "vkx_feature_sessions{feature=\"key-release\",state=\"disabled\"}"
        )
        .as_deref(),
        Some("0"),
        "a session's gauge goes with it"
    );
    assert_eq!(value(&t, "vkx_sessions_established").as_deref(), Some("0"));
    // Every registry code has its series.
    for r in REGISTRY {
        assert!(t.contains(&format!("code=\"{}\"", r.name)), "{}", r.name);
    }
    // Format: every sample's family is declared once, before it.
    let mut declared = Vec::new();
    for line in t.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!declared.contains(&name.to_owned()), "{name} twice");
            declared.push(name.to_owned());
        } else if !line.starts_with("# HELP ") {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                declared.iter().any(|d| name == d
                    || name
                        .strip_prefix(d.as_str())
                        .is_some_and(|s| { ["_bucket", "_sum", "_count"].contains(&s) })),
                "{line}"
            );
        }
    }
    assert!(t.ends_with('\n'));
}

#[test]
fn the_latency_histogram_is_cumulative() {
    let m = Metrics::default();
    for ms in [5, 10, 11, 700, 29_000, 90_000] {
        m.handshake_latency(Duration::from_millis(ms));
    }
    let t = render(&m, &usage(), 0);
    let b = |le: &str| {
        value(
            &t,
            &format!("vkx_handshake_duration_seconds_bucket{{le=\"{le}\"}}"),
        )
    };
    assert_eq!(b("0.01").as_deref(), Some("2"));
    assert_eq!(b("0.025").as_deref(), Some("3"));
    assert_eq!(b("1").as_deref(), Some("4"));
    assert_eq!(b("30").as_deref(), Some("5"));
    assert_eq!(b("+Inf").as_deref(), Some("6"));
    assert_eq!(
        value(&t, "vkx_handshake_duration_seconds_count").as_deref(),
        Some("6")
    );
    assert_eq!(
        value(&t, "vkx_handshake_duration_seconds_sum").as_deref(),
        Some("119.726000")
    );
}

/// The whole exposition, byte for byte, with the counters of every family
/// distinct: how `render` is organised may change, its output may not
/// (`render.expected` was recorded from the rendering as it was before it
/// was folded into helpers).
#[test]
fn the_exposition_is_the_recorded_one_byte_for_byte() {
    let m = Arc::new(Metrics::default());
    for (i, h) in HandshakeOutcome::ALL.into_iter().enumerate() {
        for _ in 0..=i {
            m.handshake(h);
        }
    }
    for ms in [5, 10, 11, 700, 29_000, 90_000] {
        m.handshake_latency(Duration::from_millis(ms));
    }
    for (i, r) in REGISTRY.iter().enumerate() {
        for _ in 0..=i % 3 {
            m.error_sent(r.code);
        }
    }
    m.error_sent(ErrorCode::Unknown(999));
    for (i, r) in RefuseReason::ALL.into_iter().enumerate() {
        for _ in 0..=i {
            m.refused(r);
        }
    }
    m.rewind(true);
    m.rewind(false);
    m.rewind(false);
    m.session_rate_limited();
    m.keys_released(3);
    m.update_pushed();
    m.update_pushed();
    m.update_acked(true);
    m.update_acked(false);
    m.update_acked(false);
    m.reload(true, 1_700_000_000);
    m.reload(false, 0);
    let _guard = m.established();
    let _gauges = two_sessions_one_killed(&m);
    let ring = m.health.no_ring();
    m.rollout.update_sent();
    for (i, label) in ROLLOUT_REFUSALS.iter().enumerate() {
        for _ in 0..=i {
            m.rollout.refused(label);
        }
    }
    m.rollout.accepted(7, 100, 200);
    m.rollout.source(true, Some(300));
    m.rollout.feature(feature::KEY_RELEASE, true, Some(2));
    m.rollout.feature(feature::KEY_ROTATION, false, Some(1));
    ring.established();
    ring.lost();
    ring.request(crate::rollout::Feature::KeyRelease);
    ring.refusal(
        crate::rollout::Feature::KeyRelease,
        ErrorCode::FeatureNotEnabled,
    );
    ring.error_sent(ErrorCode::UnknownMessage);
    ring.error_received(ErrorCode::Timeout);
    let t = render(&m, &usage(), 42);
    assert_eq!(t, include_str!("render.expected"));
}

#[test]
fn outcomes_follow_the_error_sent() {
    assert_eq!(
        HandshakeOutcome::for_code(ErrorCode::Timeout),
        HandshakeOutcome::Timeout
    );
    for c in [
        ErrorCode::Busy,
        ErrorCode::RateLimited,
        ErrorCode::AttestationFailed,
        ErrorCode::UnsupportedVersion,
    ] {
        assert_eq!(HandshakeOutcome::for_code(c), HandshakeOutcome::Refused);
    }
    for c in [ErrorCode::Malformed, ErrorCode::Internal] {
        assert_eq!(HandshakeOutcome::for_code(c), HandshakeOutcome::Failed);
    }
}

#[test]
fn only_get_metrics_is_served() {
    for ok in [
        &b"GET /metrics HTTP/1.0\r\n\r\n"[..],
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        b"GET /metrics?x=1 HTTP/1.0\n\n",
    ] {
        assert_eq!(route(ok), Route::Metrics, "{ok:?}");
    }
    for bad in [
        &b""[..],
        b"POST /metrics HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET /metricsx HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/2\r\n\r\n",
        b"GET  /metrics HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.0 extra\r\n\r\n",
        b"get /metrics HTTP/1.0\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"\xff\xfe /metrics HTTP/1.0\r\n\r\n",
    ] {
        assert_eq!(route(bad), Route::NotFound, "{bad:?}");
    }
    assert!(head_complete(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(!head_complete(b"GET / HTTP/1.0\r\n"));
}

#[test]
fn responses_parse_and_statuses_are_checked() {
    let ok = response("200 OK", "a 1\n", CONTENT_TYPE);
    assert_eq!(parse_response(ok.as_bytes()).unwrap(), "a 1\n");
    let nf = response("404 Not Found", "not found\n", "text/plain");
    assert!(matches!(
        parse_response(nf.as_bytes()),
        Err(FetchError::Status(s)) if s.starts_with("404")
    ));
    assert!(matches!(
        parse_response(b"garbage"),
        Err(FetchError::Malformed)
    ));
}

#[test]
fn the_endpoint_is_loopback_unless_allowed() {
    let c = |socket: Option<&str>, listen: Option<&str>, allow| MetricsConfig {
        socket: socket.map(PathBuf::from),
        listen: listen.map(str::to_owned),
        allow_non_loopback: allow,
    };
    assert_eq!(
        c(None, None, false).endpoint(),
        Ok(Endpoint::Unix(PathBuf::from(DEFAULT_METRICS_SOCKET)))
    );
    assert_eq!(
        c(Some("/m.sock"), None, false).endpoint(),
        Ok(Endpoint::Unix(PathBuf::from("/m.sock")))
    );
    assert!(matches!(
        c(None, Some("127.0.0.1:9461"), false).endpoint(),
        Ok(Endpoint::Tcp(_))
    ));
    assert!(matches!(
        c(None, Some("[::1]:9461"), false).endpoint(),
        Ok(Endpoint::Tcp(_))
    ));
    assert!(matches!(
        c(None, Some("0.0.0.0:9461"), false).endpoint(),
        Err(MetricsConfigError::NotLoopback(_))
    ));
    assert!(matches!(
        c(None, Some("0.0.0.0:9461"), true).endpoint(),
        Ok(Endpoint::Tcp(_))
    ));
    assert!(matches!(
        c(None, Some("localhost:9461"), false).endpoint(),
        Err(MetricsConfigError::BadAddress(_))
    ));
    assert_eq!(
        c(Some("/m"), Some("127.0.0.1:1"), false).endpoint(),
        Err(MetricsConfigError::Both)
    );
}

#[tokio::test]
async fn serves_a_scrape_over_a_unix_socket_and_404s_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    let listener = bind(&Endpoint::Unix(path.clone())).await.unwrap();
    let metrics = Arc::new(Metrics::default());
    metrics.error_sent(ErrorCode::Busy);
    let limits = Limits::new(4, &AdmissionConfig::default()).unwrap();
    let admission = Arc::new(AdmissionControl::new(limits, Instant::now()));
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(serve(listener, metrics, admission, stop));
    let body = fetch(&path).await.unwrap();
    assert_eq!(
        value(&body, "vkx_errors_sent_total{code=\"busy\"}").as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&body, "vkx_admission_limit{limit=\"max_connections\"}").as_deref(),
        Some("4")
    );
    // Anything else: 404. An oversized head: answered, not read forever.
    for req in [
        b"GET /other HTTP/1.0\r\n\r\n".to_vec(),
        vec![b'A'; MAX_REQUEST_HEAD * 4],
    ] {
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _ = s.write_all(&req).await;
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply).await;
        let reply = String::from_utf8(reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 404"), "{reply}");
    }
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn half_sent_requests_of_one_user_cannot_blind_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    let listener = bind(&Endpoint::Unix(path.clone())).await.unwrap();
    let limits = Limits::new(4, &AdmissionConfig::default()).unwrap();
    let admission = Arc::new(AdmissionControl::new(limits, Instant::now()));
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        Arc::new(Metrics::default()),
        admission,
        stop,
    ));
    // A local user opens every slot and half-sends a request in each.
    let mut stalled = Vec::new();
    for _ in 0..MAX_METRICS_CONNECTIONS {
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        // Refused ones may be closed before this lands.
        let _ = s.write_all(b"GET /metr").await;
        stalled.push(s);
    }
    // At most MAX_SCRAPES_PER_PEER are held for it; the others are
    // closed at once (this test is one uid, so a scrape of its own is
    // refused too until the head deadline frees them).
    let t = Instant::now();
    let mut closed = 0;
    for s in &mut stalled {
        let mut b = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(40), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, MAX_METRICS_CONNECTIONS - MAX_SCRAPES_PER_PEER);
    // The held ones are dropped at the head deadline: a scrape works
    // again soon after, stalled connections still open.
    let body = loop {
        if let Ok(b) = fetch(&path).await {
            break b;
        }
        assert!(t.elapsed() < REQUEST_HEAD_TIMEOUT * 3, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("vkx_connections"), "{body}");
    drop(stalled);
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn per_key_slots_are_capped_and_given_back() {
    let p = Arc::new(PerKey::new(2));
    let a = p.try_acquire(7).unwrap();
    let _b = p.try_acquire(7).unwrap();
    assert!(p.try_acquire(7).is_none());
    assert!(p.try_acquire(8).is_some(), "another user is not affected");
    drop(a);
    assert!(p.try_acquire(7).is_some());
}

/// Two sessions' feature gauges in no ring, every feature on, then
/// `key-release` killed in the first; they count while they live.
fn two_sessions_one_killed(m: &Arc<Metrics>) -> [FeatureGauge; 2] {
    let all_on: Features = FEATURES
        .iter()
        .map(|(f, _)| (*f, FeatureState::Enabled))
        .collect();
    let ring = m.health.no_ring();
    let mut gauge = FeatureGauge::new(m.clone(), all_on.clone(), ring.clone());
    let other = FeatureGauge::new(m.clone(), all_on.clone(), ring.clone());
    let mut killed = all_on;
    killed.insert(feature::KEY_RELEASE, FeatureState::Disabled);
    gauge.set(&ring, &killed);
    [gauge, other]
}
