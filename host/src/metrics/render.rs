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
use crate::prom::{by_label, family, sample};

/// The Prometheus text exposition of `m`, the admission `usage` and the
/// log limiter's `suppressed` count.
pub fn render(m: &Metrics, usage: &Usage, suppressed: u64) -> String {
    let mut o = String::with_capacity(4096);
    unlabelled(
        &mut o,
        "gauge",
        [
            (
                "vkx_connections_open",
                "Transport connections held, served or being refused.",
                wide(usage.open),
            ),
            (
                "vkx_connections",
                "Connections being served (any session state).",
                wide(usage.connections),
            ),
            (
                "vkx_handshakes_in_progress",
                "Served connections not yet Established.",
                wide(usage.handshakes),
            ),
            (
                "vkx_peer_buckets",
                "Peers with a connection-rate bucket.",
                wide(usage.peers),
            ),
            (
                "vkx_sessions_established",
                "Sessions in Established.",
                get(&m.established),
            ),
        ],
    );
    let l = &usage.limits;
    by_label(
        &mut o,
        (
            "vkx_admission_limit",
            "gauge",
            "Configured admission limits.",
        ),
        "limit",
        [
            ("max_open", wide(l.max_open)),
            ("max_connections", wide(l.max_connections)),
            ("max_handshakes", wide(l.max_handshakes)),
            ("max_peers", wide(l.max_peers)),
        ],
    );
    by_label(
        &mut o,
        (
            "vkx_handshakes_total",
            "counter",
            "Handshakes by outcome (attested, refused, failed, timeout).",
        ),
        "outcome",
        HandshakeOutcome::ALL.map(|h| (h.label(), get(&m.handshakes[h.index()]))),
    );
    render_latency(&mut o, m);
    by_label(
        &mut o,
        (
            "vkx_errors_sent_total",
            "counter",
            "Error messages sent to guests, by registry code name.",
        ),
        "code",
        REGISTRY
            .iter()
            .map(|r| r.name)
            .chain(["unknown"])
            .zip(m.errors_sent.iter().map(get)),
    );
    by_label(
        &mut o,
        (
            "vkx_admissions_refused_total",
            "counter",
            "Connections not served, by the limit that refused them.",
        ),
        "reason",
        RefuseReason::ALL.map(|r| (r.label(), get(&m.refused[refuse_index(r)]))),
    );
    by_label(
        &mut o,
        (
            "vkx_attestation_rewinds_total",
            "counter",
            "Quotes whose TPM clock state went back (snapshot restore or clone), by action.",
        ),
        "action",
        ["refused", "flagged"]
            .into_iter()
            .zip(m.rewinds.iter().map(get)),
    );
    unlabelled(
        &mut o,
        "counter",
        [
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
        ],
    );
    by_label(
        &mut o,
        (
            "vkx_key_updates_acked_total",
            "counter",
            "Key-update acknowledgements, by result.",
        ),
        "result",
        [
            ("installed", get(&m.updates_installed)),
            ("failed", get(&m.updates_failed)),
        ],
    );
    by_label(
        &mut o,
        (
            "vkx_reloads_total",
            "counter",
            "Reloads of the policy and CID map (SIGHUP), by outcome: ok (applied) or invalid (refused, nothing applied).",
        ),
        "outcome",
        ["ok", "invalid"].into_iter().zip(m.reloads.iter().map(get)),
    );
    unlabelled(
        &mut o,
        "gauge",
        [(
            "vkx_reload_last_success_timestamp_seconds",
            "When the last reload was applied (Unix time; 0 if none since the start).",
            get(&m.reload_last_ok_unix),
        )],
    );
    render_rollout(&mut o, &m.rollout);
    m.health.render(&mut o);
    o
}

/// Families of one sample each, without labels: `(name, help, value)`.
fn unlabelled<'a>(
    o: &mut String,
    kind: &str,
    families: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
) {
    for (name, help, v) in families {
        family(o, name, kind, help);
        sample(o, name, "", v);
    }
}

/// The handshake latency histogram: cumulative buckets, `+Inf`, sum (in
/// seconds, to the microsecond) and count.
fn render_latency(o: &mut String, m: &Metrics) {
    family(
        o,
        "vkx_handshake_duration_seconds",
        "histogram",
        "Accept to Established.",
    );
    let mut cumulative = 0u64;
    for (i, (_, le)) in HANDSHAKE_BUCKETS.iter().enumerate() {
        cumulative += get(&m.latency_buckets[i]);
        sample(
            o,
            "vkx_handshake_duration_seconds_bucket",
            &format!("le=\"{le}\""),
            cumulative,
        );
    }
    cumulative += get(&m.latency_buckets[HANDSHAKE_BUCKETS.len()]);
    sample(
        o,
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
    sample(o, "vkx_handshake_duration_seconds_count", "", cumulative);
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
    let feature_names = || FEATURES.iter().map(|(_, name)| *name);
    by_label(
        o,
        (
            "vkx_rollout_feature_killed",
            "gauge",
            "1 if the feature is killed on this node (rollout document or local override).",
        ),
        "feature",
        feature_names().zip(r.killed.iter().map(get)),
    );
    by_label(
        o,
        (
            "vkx_rollout_feature_stage",
            "gauge",
            "The feature's stage: index of the last enabled ring plus one (0: no ring).",
        ),
        "feature",
        feature_names().zip(r.stage.iter().map(get)),
    );
    unlabelled(
        o,
        "gauge",
        [
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
        ],
    );
    unlabelled(
        o,
        "counter",
        [(
            "vkx_feature_updates_sent_total",
            "feature-update messages sent to live sessions.",
            get(&r.updates_sent),
        )],
    );
    by_label(
        o,
        (
            "vkx_rollout_documents_refused_total",
            "counter",
            "Rollout documents not accepted, by reason (the previous state is kept).",
        ),
        "reason",
        ROLLOUT_REFUSALS
            .iter()
            .copied()
            .zip(r.refused.iter().map(get)),
    );
}
