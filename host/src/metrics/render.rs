//! The Prometheus text exposition (format 0.0.4) of the host's counters:
//! one `# HELP`/`# TYPE` pair per family, then its samples. What it
//! trusts: label values from fixed tables (registry code names, refusal
//! reasons, feature names, ring names of an accepted document); no byte
//! of a guest's becomes a label. What it bounds: the families and labels
//! are fixed; per-ring series are bounded by `crate::health`'s ring slots.

use std::fmt::Write as _;

use vkx_common::errors::REGISTRY;

use super::{
    FEATURES, HANDSHAKE_BUCKETS, HandshakeOutcome, Metrics, ROLLOUT_REFUSALS, RolloutMetrics,
    STATES, get, refuse_index, wide,
};
use crate::admission::{RefuseReason, Usage};
use crate::prom::{family, sample};

/// The Prometheus text exposition of `m`, the admission `usage` and the
/// log limiter's `suppressed` count.
pub fn render(m: &Metrics, usage: &Usage, suppressed: u64) -> String {
    let mut o = String::with_capacity(4096);
    let gauges: [(&str, &str, usize); 4] = [
        (
            "vkx_connections_open",
            "Transport connections held, served or being refused.",
            usage.open,
        ),
        (
            "vkx_connections",
            "Connections being served (any session state).",
            usage.connections,
        ),
        (
            "vkx_handshakes_in_progress",
            "Served connections not yet Established.",
            usage.handshakes,
        ),
        (
            "vkx_peer_buckets",
            "Peers with a connection-rate bucket.",
            usage.peers,
        ),
    ];
    for (name, help, v) in gauges {
        family(&mut o, name, "gauge", help);
        sample(&mut o, name, "", wide(v));
    }
    family(
        &mut o,
        "vkx_sessions_established",
        "gauge",
        "Sessions in Established.",
    );
    sample(&mut o, "vkx_sessions_established", "", get(&m.established));
    family(
        &mut o,
        "vkx_admission_limit",
        "gauge",
        "Configured admission limits.",
    );
    let l = &usage.limits;
    for (name, v) in [
        ("max_open", l.max_open),
        ("max_connections", l.max_connections),
        ("max_handshakes", l.max_handshakes),
        ("max_peers", l.max_peers),
    ] {
        sample(
            &mut o,
            "vkx_admission_limit",
            &format!("limit=\"{name}\""),
            wide(v),
        );
    }
    family(
        &mut o,
        "vkx_handshakes_total",
        "counter",
        "Handshakes by outcome (attested, refused, failed, timeout).",
    );
    for h in HandshakeOutcome::ALL {
        sample(
            &mut o,
            "vkx_handshakes_total",
            &format!("outcome=\"{}\"", h.label()),
            get(&m.handshakes[h.index()]),
        );
    }
    family(
        &mut o,
        "vkx_handshake_duration_seconds",
        "histogram",
        "Accept to Established.",
    );
    let mut cumulative = 0u64;
    for (i, (_, le)) in HANDSHAKE_BUCKETS.iter().enumerate() {
        cumulative += get(&m.latency_buckets[i]);
        sample(
            &mut o,
            "vkx_handshake_duration_seconds_bucket",
            &format!("le=\"{le}\""),
            cumulative,
        );
    }
    cumulative += get(&m.latency_buckets[HANDSHAKE_BUCKETS.len()]);
    sample(
        &mut o,
        "vkx_handshake_duration_seconds_bucket",
        "le=\"+Inf\"",
        cumulative,
    );
    let us = get(&m.latency_sum_us);
    let _ = writeln!(
        o,
        "vkx_handshake_duration_seconds_sum {}.{:06}",
        us / 1_000_000,
        us % 1_000_000
    );
    sample(
        &mut o,
        "vkx_handshake_duration_seconds_count",
        "",
        cumulative,
    );
    family(
        &mut o,
        "vkx_errors_sent_total",
        "counter",
        "Error messages sent to guests, by registry code name.",
    );
    for (i, r) in REGISTRY.iter().enumerate() {
        sample(
            &mut o,
            "vkx_errors_sent_total",
            &format!("code=\"{}\"", r.name),
            get(&m.errors_sent[i]),
        );
    }
    sample(
        &mut o,
        "vkx_errors_sent_total",
        "code=\"unknown\"",
        get(&m.errors_sent[REGISTRY.len()]),
    );
    family(
        &mut o,
        "vkx_admissions_refused_total",
        "counter",
        "Connections not served, by the limit that refused them.",
    );
    for r in RefuseReason::ALL {
        sample(
            &mut o,
            "vkx_admissions_refused_total",
            &format!("reason=\"{}\"", r.label()),
            get(&m.refused[refuse_index(r)]),
        );
    }
    family(
        &mut o,
        "vkx_attestation_rewinds_total",
        "counter",
        "Quotes whose TPM clock state went back (snapshot restore or clone), by action.",
    );
    for (i, action) in ["refused", "flagged"].iter().enumerate() {
        sample(
            &mut o,
            "vkx_attestation_rewinds_total",
            &format!("action=\"{action}\""),
            get(&m.rewinds[i]),
        );
    }
    let counters: [(&str, &str, u64); 4] = [
        (
            "vkx_sessions_rate_limited_total",
            "Sessions closed with rate-limited for exceeding their message budget.",
            get(&m.sessions_rate_limited),
        ),
        (
            "vkx_log_lines_suppressed_total",
            "Log lines the rate limiter dropped (counted, not written).",
            suppressed,
        ),
        (
            "vkx_keys_released_total",
            "Keys released in key-release messages.",
            get(&m.keys_released),
        ),
        (
            "vkx_key_updates_pushed_total",
            "Rotated keys pushed to live sessions.",
            get(&m.updates_pushed),
        ),
    ];
    for (name, help, v) in counters {
        family(&mut o, name, "counter", help);
        sample(&mut o, name, "", v);
    }
    family(
        &mut o,
        "vkx_key_updates_acked_total",
        "counter",
        "Key-update acknowledgements, by result.",
    );
    sample(
        &mut o,
        "vkx_key_updates_acked_total",
        "result=\"installed\"",
        get(&m.updates_installed),
    );
    sample(
        &mut o,
        "vkx_key_updates_acked_total",
        "result=\"failed\"",
        get(&m.updates_failed),
    );
    family(
        &mut o,
        "vkx_reloads_total",
        "counter",
        "Reloads of the policy and CID map (SIGHUP), by outcome: ok (applied) or invalid (refused, nothing applied).",
    );
    for (i, outcome) in ["ok", "invalid"].iter().enumerate() {
        sample(
            &mut o,
            "vkx_reloads_total",
            &format!("outcome=\"{outcome}\""),
            get(&m.reloads[i]),
        );
    }
    family(
        &mut o,
        "vkx_reload_last_success_timestamp_seconds",
        "gauge",
        "When the last reload was applied (Unix time; 0 if none since the start).",
    );
    sample(
        &mut o,
        "vkx_reload_last_success_timestamp_seconds",
        "",
        get(&m.reload_last_ok_unix),
    );
    render_rollout(&mut o, &m.rollout);
    m.health.render(&mut o);
    o
}

fn render_rollout(o: &mut String, r: &RolloutMetrics) {
    family(
        o,
        "vkx_feature_sessions",
        "gauge",
        "Established sessions by the state their feature map gives each feature.",
    );
    for (fi, (_, fname)) in FEATURES.iter().enumerate() {
        for (si, (_, sname)) in STATES.iter().enumerate() {
            sample(
                o,
                "vkx_feature_sessions",
                &format!("feature=\"{fname}\",state=\"{sname}\""),
                get(&r.sessions[fi][si]),
            );
        }
    }
    family(
        o,
        "vkx_rollout_feature_killed",
        "gauge",
        "1 if the feature is killed on this node (rollout document or local override).",
    );
    for (fi, (_, fname)) in FEATURES.iter().enumerate() {
        sample(
            o,
            "vkx_rollout_feature_killed",
            &format!("feature=\"{fname}\""),
            get(&r.killed[fi]),
        );
    }
    family(
        o,
        "vkx_rollout_feature_stage",
        "gauge",
        "The feature's stage: index of the last enabled ring plus one (0: no ring).",
    );
    for (fi, (_, fname)) in FEATURES.iter().enumerate() {
        sample(
            o,
            "vkx_rollout_feature_stage",
            &format!("feature=\"{fname}\""),
            get(&r.stage[fi]),
        );
    }
    let gauges: [(&str, &str, u64); 5] = [
        (
            "vkx_rollout_revision",
            "Revision of the accepted rollout document (0: none).",
            get(&r.revision),
        ),
        (
            "vkx_rollout_issued_timestamp_seconds",
            "issued_at of the accepted rollout document (Unix time; its age is now minus this).",
            get(&r.issued_unix),
        ),
        (
            "vkx_rollout_accepted_timestamp_seconds",
            "When this host accepted its rollout document (Unix time).",
            get(&r.accepted_unix),
        ),
        (
            "vkx_rollout_source_up",
            "1 while the rollout source answers; 0 while the last accepted document is served without it.",
            get(&r.source_up),
        ),
        (
            "vkx_rollout_source_last_ok_timestamp_seconds",
            "Last time the rollout source answered (Unix time).",
            get(&r.source_last_ok_unix),
        ),
    ];
    for (name, help, v) in gauges {
        family(o, name, "gauge", help);
        sample(o, name, "", v);
    }
    family(
        o,
        "vkx_feature_updates_sent_total",
        "counter",
        "feature-update messages sent to live sessions.",
    );
    sample(
        o,
        "vkx_feature_updates_sent_total",
        "",
        get(&r.updates_sent),
    );
    family(
        o,
        "vkx_rollout_documents_refused_total",
        "counter",
        "Rollout documents not accepted, by reason (the previous state is kept).",
    );
    for (i, label) in ROLLOUT_REFUSALS.iter().enumerate() {
        sample(
            o,
            "vkx_rollout_documents_refused_total",
            &format!("reason=\"{label}\""),
            get(&r.refused[i]),
        );
    }
}
