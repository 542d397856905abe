//! `vkx-host drill --live --feature F --ring R --config host.toml`: the
//! on-fleet drill. It narrows one feature for one ring of the accepted
//! document through the real store (the live-drill overlay, spec/
//! ROLLOUT.md §14), measures from the nodes' health summaries how long
//! until every live session of the ring was told and went quiet, takes
//! the overlay away again, and reports a timeline, SLOs and a picture.
//!
//! Why it is safe on a fleet: the overlay only narrows (enabled becomes
//! disabled, for one ring's VMs) and it expires by itself: in etcd it is
//! put under a lease of `--ttl-s` that this process keeps alive, so a
//! drill that crashes or is cut off reverts within the TTL; in a file it
//! carries an `expires_unix` of now + TTL that this process renews every
//! third of it. Every overlay also carries a hard end (`--max-duration-s`)
//! every host enforces on its own clock. Only one live drill runs at a
//! time: the overlay is created only if absent.
//!
//! The figures come from the hosts' own clocks (the summary's drill
//! record: when the node applied the overlay, when it told its last
//! session, requests after), compared with this process's clock at the
//! write; a fleet's clocks are NTP-close, and the report says so. What is
//! measured from here (whether every node reported) is bounded by the
//! health summaries' interval.
//!
//! What it trusts: host.toml, and the store to be the fleet's. The
//! document and the summaries are parsed strictly. What it bounds: every
//! wait (the limits below and the options), the samples kept
//! ([`super::timeline::MAX_SAMPLES`]), the store calls (the source's
//! timeout).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::picture;
use super::timeline::{Sample, Samples, Timeline};
use crate::health::{self, DrillSummary, HealthSummary};
use crate::rollout::{DrillOverlay, Feature};
use crate::rollout_node::Node;
use crate::source::lease::{Lease, timed};
use crate::source::{self, SourceConfig, SourceKind};

/// The overlay's lease (etcd) or renewal period × 3 (file), default.
pub const DEFAULT_TTL_S: u64 = 10;
/// Bounds of `--ttl-s`: etcd grants nothing shorter than 2 s; a drill
/// that dies should not hold a ring narrowed for more than minutes.
pub const MIN_TTL_S: u64 = 3;
pub const MAX_TTL_S: u64 = 300;
/// The overlay's hard end, default (`--max-duration-s`).
pub const DEFAULT_MAX_DURATION_S: u64 = 300;
/// The SLO "overlay written → every live session told", default.
pub const DEFAULT_TOLD_BOUND_MS: u64 = 1000;
/// The SLO "overlay removed → every node took it away", default.
pub const DEFAULT_RESTORE_BOUND_MS: u64 = 1000;
/// How often the summaries are read.
pub const POLL: Duration = Duration::from_millis(250);
/// Beyond the bounds: how long to wait for the summaries that show the
/// result, in health intervals (a node publishes once per interval).
pub const REPORT_INTERVALS: u32 = 3;

/// What `--live` needs (from `vkx-host drill`'s arguments).
#[derive(Debug, Clone)]
pub struct LiveArgs {
    pub feature: Feature,
    pub ring: String,
    pub config: PathBuf,
    pub ttl: Duration,
    pub max_duration: Duration,
    pub told_bound: Duration,
    pub restore_bound: Duration,
    pub out: PathBuf,
}

/// The drill's id: `live-<unix seconds>-<pid>`.
fn drill_id(now: u64) -> String {
    format!("live-{now}-{}", std::process::id())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs the drill; prints to `out`. `Ok(true)` when every SLO is met; an
/// error when it could not start (nothing to narrow, another drill live,
/// the store unreachable).
pub fn run(args: &LiveArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    if !(Duration::from_secs(MIN_TTL_S)..=Duration::from_secs(MAX_TTL_S)).contains(&args.ttl) {
        bail!("--ttl-s: {MIN_TTL_S} to {MAX_TTL_S}");
    }
    if args.max_duration <= args.ttl
        || args.max_duration.as_secs() > crate::rollout::drill_overlay::MAX_DRILL_DURATION_S
    {
        bail!(
            "--max-duration-s: more than --ttl-s and at most {}",
            crate::rollout::drill_overlay::MAX_DRILL_DURATION_S
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(drill(args, out))
}

/// Per node: its summary now, with the drill's record if it has ours.
fn ours<'a>(s: &'a HealthSummary, id: &str) -> Option<&'a DrillSummary> {
    s.drill.as_ref().filter(|d| d.drill == id)
}

fn enabled(s: &HealthSummary, ring: &str, f: Feature) -> u64 {
    s.rings
        .get(ring)
        .and_then(|r| r.features.get(f.name()))
        .map_or(0, |x| x.enabled_sessions)
}

fn sample(t: f64, fleet: &[HealthSummary], f: Feature) -> Sample {
    let mut s = Sample {
        t,
        hosts: fleet.len(),
        ..Sample::default()
    };
    for (ring, r) in health::aggregate(fleet) {
        let all: u64 = r.features.values().map(|x| x.requests).sum();
        s.requests.insert(ring.clone(), all);
        s.feature_requests.insert(
            ring.clone(),
            r.features.get(f.name()).map_or(0, |x| x.requests),
        );
        s.errors
            .insert(ring.clone(), r.errors_sent.values().copied().sum());
    }
    s
}

async fn drill(args: &LiveArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    let node = Node::load(&args.config)?;
    let config = node.source()?.clone();
    let store = node.settings.health.store.clone();
    let interval = node.settings.health.interval;
    let f = args.feature;
    let ring = args.ring.as_str();

    // 1. Something to narrow: the ring is in the document, the feature
    //    reaches it and is not killed, and live sessions use it.
    let (accepted, _) = node.current(&config).await?;
    let Some(accepted) = accepted else {
        bail!("the store has no rollout document: nothing to narrow");
    };
    let doc = accepted.document();
    let Some(ring_index) = doc.ring_index(ring) else {
        bail!(
            "ring {ring:?} is not in the document (revision {}): rings are {}",
            doc.revision(),
            doc.rings()
                .iter()
                .map(crate::rollout::Ring::name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if doc
        .feature(f)
        .is_some_and(crate::rollout::FeatureRollout::killed)
        || doc.stage_index(f).is_none_or(|s| s < ring_index)
    {
        bail!(
            "{} is not enabled for ring {ring} (revision {}): nothing to narrow",
            f.name(),
            doc.revision()
        );
    }
    let before = health::read_all(&store)
        .await
        .map_err(|e| anyhow::anyhow!("read the health summaries: {e}"))?;
    let live: u64 = before.summaries.iter().map(|s| enabled(s, ring, f)).sum();
    if live == 0 {
        bail!(
            "no live session of ring {ring} has {} enabled on the {} node(s) that publish health: \
             the drill would measure nothing",
            f.name(),
            before.summaries.len()
        );
    }
    let nodes: Vec<String> = before.summaries.iter().map(|s| s.node.clone()).collect();

    // 2. The overlay, under its lease.
    let started = SystemTime::now();
    let now_s = started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let id = drill_id(now_s);
    let t0 = Instant::now();
    let mut timeline = Timeline::new(t0);
    let mut samples = Samples::default();
    samples.push(sample(0.0, &before.summaries, f));
    let (holder, put_ms) =
        Holder::put(&config, &id, f, ring, now_s, args.ttl, args.max_duration).await?;
    // The write's time on the timeline (t = 0 is `started`): node times
    // are placed relative to it.
    #[allow(clippy::cast_precision_loss)]
    let t_put = put_ms.saturating_sub(unix_ms(started)) as f64 / 1000.0;
    timeline.event(
        t_put,
        "overlay written",
        format!(
            "drill {id}: {} disabled for ring {ring} (revision {}), {} lease {} s, hard end {} s; \
             {live} live session(s) with it on {} node(s)",
            f.name(),
            doc.revision(),
            describe(&config),
            args.ttl.as_secs(),
            args.max_duration.as_secs(),
            nodes.len()
        ),
    );
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let i = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                i.store(true, Ordering::Relaxed);
            }
        });
    }

    // 3. Until every node shows the overlay applied and none of the
    //    ring's sessions with the feature left; then a quiet window.
    let report_wait = interval * REPORT_INTERVALS;
    let told_deadline = Instant::now() + args.told_bound + report_wait;
    let mut last: Vec<HealthSummary> = before.summaries.clone();
    let mut all_told_at: Option<f64> = None;
    let stop_reason = loop {
        if interrupted.load(Ordering::Relaxed) {
            break Some("interrupted");
        }
        if holder.is_lost() {
            break Some("the overlay's lease was lost");
        }
        if Instant::now() >= told_deadline {
            break None;
        }
        tokio::time::sleep(POLL).await;
        if let Ok(fleet) = health::read_all(&store).await {
            samples.push(sample(timeline.now(), &fleet.summaries, f));
            last = fleet.summaries;
        }
        let done = nodes.iter().all(|n| {
            last.iter().find(|s| &s.node == n).is_some_and(|s| {
                ours(s, &id).is_some_and(|d| d.ended_unix_ms.is_none()) && enabled(s, ring, f) == 0
            })
        });
        if done {
            all_told_at = Some(timeline.now());
            break None;
        }
    };
    // The quiet window: two summaries of every node after the last told.
    if stop_reason.is_none() && all_told_at.is_some() {
        let until = Instant::now() + 2 * interval + POLL;
        while Instant::now() < until && !interrupted.load(Ordering::Relaxed) {
            tokio::time::sleep(POLL).await;
            if let Ok(fleet) = health::read_all(&store).await {
                samples.push(sample(timeline.now(), &fleet.summaries, f));
                last = fleet.summaries;
            }
        }
    }
    let during = last.clone();

    // 4. Take it away, and wait for every node to say so.
    let removed_ms = unix_ms(SystemTime::now());
    let t_removed = timeline.now();
    let removed = holder.remove().await;
    timeline.event(
        t_removed,
        "overlay removed",
        match &removed {
            Ok(()) => format!("drill {id}: {}", stop_reason.unwrap_or("measured")),
            Err(e) => format!("drill {id}: removal failed ({e}); it ends at the lease's TTL"),
        },
    );
    let restore_deadline = Instant::now() + args.restore_bound + report_wait;
    while Instant::now() < restore_deadline {
        tokio::time::sleep(POLL).await;
        if let Ok(fleet) = health::read_all(&store).await {
            samples.push(sample(timeline.now(), &fleet.summaries, f));
            last = fleet.summaries;
        }
        let back = nodes.iter().all(|n| {
            last.iter()
                .find(|s| &s.node == n)
                .is_some_and(|s| ours(s, &id).is_some_and(|d| d.ended_unix_ms.is_some()))
        });
        if back {
            break;
        }
    }

    // 5. The figures, by node (host clocks).
    let put_ms_f = |ms: u64| -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let d = (ms as f64 - put_ms as f64) / 1000.0;
        d
    };
    let mut applied: Vec<(String, f64)> = Vec::new();
    let mut told_at: Vec<(String, f64)> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut told_total = 0u64;
    let mut requests_after = 0u64;
    let mut per_node: BTreeMap<String, String> = BTreeMap::new();
    for n in &nodes {
        let d = during
            .iter()
            .find(|s| &s.node == n)
            .and_then(|s| ours(s, &id));
        let still = during
            .iter()
            .find(|s| &s.node == n)
            .map_or(0, |s| enabled(s, ring, f));
        let Some(d) = d.filter(|_| still == 0) else {
            missing.push(n.clone());
            continue;
        };
        applied.push((n.clone(), put_ms_f(d.applied_unix_ms)));
        let done = if d.told > 0 {
            d.last_told_unix_ms
        } else {
            d.applied_unix_ms
        };
        told_at.push((n.clone(), put_ms_f(done)));
        told_total += d.told;
        requests_after += d.requests_after;
        per_node.insert(
            n.clone(),
            format!(
                "applied t+{:.3}s, {} told by t+{:.3}s, {} request(s) after",
                put_ms_f(d.applied_unix_ms),
                d.told,
                put_ms_f(done),
                d.requests_after
            ),
        );
    }
    let mut restored: Vec<f64> = Vec::new();
    let mut not_restored: Vec<String> = Vec::new();
    for n in &nodes {
        match last
            .iter()
            .find(|s| &s.node == n)
            .and_then(|s| ours(s, &id))
            .and_then(|d| d.ended_unix_ms)
        {
            #[allow(clippy::cast_precision_loss)]
            Some(ended) => restored.push((ended as f64 - removed_ms as f64) / 1000.0),
            None => not_restored.push(n.clone()),
        }
    }
    let max = |v: &[(String, f64)]| v.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    if let Some(t) = (!applied.is_empty()).then(|| max(&applied)) {
        timeline.event(
            t_put + t,
            "applied",
            format!(
                "{} of {} node(s) applied the overlay",
                applied.len(),
                nodes.len()
            ),
        );
    }
    let last_told = (missing.is_empty() && !told_at.is_empty()).then(|| max(&told_at));
    if let Some(t) = last_told {
        timeline.event(
            t_put + t,
            "last session told",
            format!("{told_total} session(s) told of {live} live at the start"),
        );
    }
    if let Some(t) = all_told_at {
        timeline.event(
            t,
            "quiet",
            format!(
                "every node reports no session of {ring} with {} (summaries every {} ms)",
                f.name(),
                interval.as_millis()
            ),
        );
    }
    let restore = (not_restored.is_empty() && removed.is_ok())
        .then(|| restored.iter().copied().fold(0.0, f64::max));
    if let Some(r) = restore {
        timeline.event(
            t_removed + r.max(0.0),
            "restored",
            format!("every node took the overlay away ({} s after)", fmt_s(r)),
        );
    }
    timeline.slo_duration(
        "overlay written -> every live session told",
        last_told.map(|t| Duration::from_secs_f64(t.max(0.0))),
        args.told_bound,
    );
    #[allow(clippy::cast_precision_loss)]
    timeline.slo(
        "requests for the feature after the update",
        missing.is_empty().then_some(requests_after as f64),
        0.0,
        "requests",
    );
    timeline.slo_duration(
        "overlay removed -> every node restored",
        restore.map(|r| Duration::from_secs_f64(r.max(0.0))),
        args.restore_bound,
    );
    if let Some(r) = stop_reason {
        timeline.notes.push(format!("stopped early: {r}"));
    }
    if !missing.is_empty() {
        timeline.notes.push(format!(
            "node(s) that never showed every session told: {}",
            missing.join(", ")
        ));
    }
    if !not_restored.is_empty() {
        timeline.notes.push(format!(
            "node(s) that never showed the overlay taken away: {}",
            not_restored.join(", ")
        ));
    }
    for (n, line) in &per_node {
        timeline.notes.push(format!("{n}: {line}"));
    }
    timeline.notes.push(
        "times of nodes are their own clocks against this one's at the write (NTP-close)".into(),
    );
    std::fs::create_dir_all(&args.out)?;
    let svg = args.out.join(format!("drill-{id}.svg"));
    let rings = samples.rings(&[ring]);
    picture::draw(
        &svg,
        &format!("vkx live drill {id}: {} narrowed for ring {ring}", f.name()),
        &samples,
        &rings,
        &timeline.events,
    )?;
    write!(
        out,
        "{}",
        timeline.render(&format!("live {} {ring}", f.name()), Some(&svg))
    )?;
    Ok(timeline.pass())
}

fn fmt_s(s: f64) -> String {
    format!("{s:.3}")
}

fn describe(c: &SourceConfig) -> &'static str {
    match c.source {
        SourceKind::Etcd => "etcd",
        SourceKind::File => "file",
    }
}

/// The overlay held in its store.
enum Holder {
    Etcd {
        client: Box<Client>,
        key: String,
        lease: Lease,
        timeout: Duration,
    },
    File {
        path: PathBuf,
        lost: Arc<AtomicBool>,
        renewer: tokio::task::JoinHandle<()>,
    },
}

impl Holder {
    /// Writes the overlay if there is none; returns it held and the write's
    /// time (Unix ms, this clock).
    async fn put(
        config: &SourceConfig,
        id: &str,
        f: Feature,
        ring: &str,
        now_s: u64,
        ttl: Duration,
        max_duration: Duration,
    ) -> anyhow::Result<(Self, u64)> {
        let overlay_config = config.overlay();
        match config.source {
            SourceKind::Etcd => {
                let e = &overlay_config.etcd;
                let t = e.timeout();
                let client = timed(t, Client::connect(&e.endpoints, None))
                    .await
                    .map_err(|x| anyhow::anyhow!("{x}"))?;
                let overlay =
                    DrillOverlay::new(id, f, ring, now_s, now_s + max_duration.as_secs())?;
                let lease = Lease::grant(&client, ttl, t)
                    .await
                    .map_err(|x| anyhow::anyhow!("{x}"))?;
                let key = e.key.clone();
                let txn = Txn::new()
                    .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        overlay.to_bytes(),
                        Some(PutOptions::new().with_lease(lease.id())),
                    )])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let mut c = client.clone();
                // The write's time is when it is sent: a host can apply
                // it before the answer is back.
                let put_ms = unix_ms(SystemTime::now());
                let resp = match timed(t, c.txn(txn)).await {
                    Ok(r) => r,
                    Err(x) => {
                        let _ = lease.revoke().await;
                        bail!("{x}");
                    }
                };
                if !resp.succeeded() {
                    let held = resp.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                            DrillOverlay::parse(kv.value()).map(|o| o.drill().to_owned())
                        }),
                        _ => None,
                    });
                    let _ = lease.revoke().await;
                    bail!(
                        "another live drill holds etcd key {key} ({}): one at a time",
                        match held {
                            Some(Ok(d)) => format!("drill {d}"),
                            _ => "not a valid overlay; delete it by hand".into(),
                        }
                    );
                }
                Ok((
                    Self::Etcd {
                        client: Box::new(client),
                        key,
                        lease,
                        timeout: t,
                    },
                    put_ms,
                ))
            }
            SourceKind::File => {
                let path = overlay_config.file.clone();
                if let Ok(Some((bytes, _))) = source::read(&overlay_config).await
                    && let Ok(o) = DrillOverlay::parse(&bytes)
                    && o.in_force(now_s)
                {
                    bail!(
                        "another live drill ({}) holds {} until {}: one at a time",
                        o.drill(),
                        path.display(),
                        o.expires_unix()
                    );
                }
                let hard_end = now_s + max_duration.as_secs();
                let first = DrillOverlay::new(id, f, ring, now_s, now_s + ttl.as_secs())?;
                let put_ms = unix_ms(SystemTime::now());
                source::write(&overlay_config, &first.to_bytes())
                    .await
                    .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
                let lost = Arc::new(AtomicBool::new(false));
                let renewer =
                    tokio::spawn(renew(overlay_config, first, ttl, hard_end, lost.clone()));
                Ok((
                    Self::File {
                        path,
                        lost,
                        renewer,
                    },
                    put_ms,
                ))
            }
        }
    }

    fn is_lost(&self) -> bool {
        match self {
            Self::Etcd { lease, .. } => lease.is_lost(),
            Self::File { lost, .. } => lost.load(Ordering::Relaxed),
        }
    }

    /// Removes the overlay (etcd: revoking the lease deletes the key).
    async fn remove(self) -> Result<(), String> {
        match self {
            Self::Etcd {
                mut client,
                key,
                lease,
                timeout,
            } => {
                if lease.revoke().await.is_ok() {
                    return Ok(());
                }
                timed(timeout, client.delete(key.as_str(), None))
                    .await
                    .map(|_| ())
            }
            Self::File { path, renewer, .. } => {
                renewer.abort();
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(format!("remove {}: {e}", path.display())),
                }
            }
        }
    }
}

/// The file store's lease: the overlay rewritten with `expires_unix` =
/// now + TTL every third of the TTL, never past `hard_end`; `lost` once a
/// renewal has failed for a whole TTL.
async fn renew(
    config: SourceConfig,
    overlay: DrillOverlay,
    ttl: Duration,
    hard_end: u64,
    lost: Arc<AtomicBool>,
) {
    let mut last_ok = Instant::now();
    // Until aborted by `remove`, or lost.
    loop {
        tokio::time::sleep(ttl / 3).await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ok = match overlay.renewed((now + ttl.as_secs()).min(hard_end)) {
            Ok(o) => source::write(&config, &o.to_bytes()).await.is_ok(),
            Err(_) => false,
        };
        if ok {
            last_ok = Instant::now();
        } else if last_ok.elapsed() >= ttl {
            lost.store(true, Ordering::Relaxed);
            return;
        }
    }
}
