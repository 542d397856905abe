//! The rollout machinery of `vkx-host serve`: the `[rollout]` table of
//! host.toml, the node's rollout state restored before the first guest is
//! served, and the task that follows the document source and the local
//! override file and publishes the resulting [`View`] on a
//! `tokio::sync::watch`. Every live session reads the view: it resolves
//! its VM's feature map from it and sends `feature-update` when the map
//! changes (`connection`).
//!
//! Rules (spec/ROLLOUT.md): a candidate document from the source is
//! admitted or refused by [`crate::rollout::admit()`] against the accepted one;
//! an admitted one is persisted in the node directory and published at
//! once; a refused one, or a source that is down, changes nothing
//! (fail-static: the last accepted document stays in force, and is
//! restored from the node directory after a restart). The local override
//! file always wins for killing; an override file that cannot be read or
//! parsed kills every feature on this node (it exists only to kill, so a
//! garbled one errs towards off), with a warning.
//!
//! Logs: one line per accepted document, one per refusal and per source
//! state change, all rate-limited; never document bytes (lengths,
//! revisions and digest prefixes only).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::watch;
use vkx_common::{rl_info, rl_warn};

use crate::metrics::Metrics;
use crate::rollout::{
    Accepted, Admitted, DrillOverlay, Feature, Override, TrustedKey, TrustedKeys, View, admit,
};
use crate::source::{
    EtcdConfig, FILE_POLL_INTERVAL, Health, SourceConfig, SourceCounters, SourceKind, SourceStatus,
};

/// The node directory's subdirectory for the rollout state.
pub const STATE_DIR: &str = "rollout";
/// Longest the persisting of an accepted document may take before it is
/// treated as failed (spec/ROLLOUT.md §9): the task that follows the
/// source and the override file must not wait on a hung disk.
pub const PERSIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The local override file, under [`STATE_DIR`], unless host.toml names
/// another.
pub const DEFAULT_OVERRIDE_FILE: &str = "override.toml";

/// The `[rollout]` table of host.toml. Without it: no source, every v1
/// feature generally available, the override file at its default place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Where the rollout document comes from: "file" (default) or "etcd".
    #[serde(default)]
    pub source: SourceKind,
    /// The document file of the file source.
    #[serde(default = "crate::source::default_file")]
    pub file: PathBuf,
    /// The etcd source (`[rollout.etcd]`).
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Features served where no accepted document names them, and on a
    /// node with no document at all. Default: every v1 feature.
    #[serde(default = "all_features")]
    pub generally_available: Vec<String>,
    /// This node's name, for rings that select nodes. Default: the
    /// kernel's hostname.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The local override file (`killed = [...]`), which always wins for
    /// killing. Default: `<node_dir>/rollout/override.toml`.
    #[serde(default)]
    pub override_file: Option<PathBuf>,
    /// Keys whose signature may widen a feature's reach
    /// (`[[rollout.trusted_key]]`, `id` and hex `public_key`).
    #[serde(default)]
    pub trusted_key: Vec<TrustedKey>,
    /// How often the node publishes its health summary
    /// (`crate::health`): 500 to 60000 ms.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// With the etcd source: the key below which every node publishes its
    /// summary, as `<health_prefix>/<node_name>`.
    #[serde(default = "default_health_prefix")]
    pub health_prefix: String,
    /// With the file source: a directory of other nodes' summaries
    /// (`*.json`, collected by the operator's tooling) that `rollout run`
    /// and `drill --live` read besides this node's own.
    #[serde(default)]
    pub health_dir: Option<PathBuf>,
}

fn default_health_interval_ms() -> u64 {
    crate::health::DEFAULT_INTERVAL_MS
}

fn default_health_prefix() -> String {
    crate::health::DEFAULT_PREFIX.to_owned()
}

fn all_features() -> Vec<String> {
    Feature::ALL.iter().map(|f| f.name().to_owned()).collect()
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            source: SourceKind::default(),
            file: crate::source::default_file(),
            etcd: EtcdConfig::default(),
            generally_available: all_features(),
            node_name: None,
            override_file: None,
            trusted_key: Vec::new(),
            health_interval_ms: default_health_interval_ms(),
            health_prefix: default_health_prefix(),
            health_dir: None,
        }
    }
}

/// The `[rollout]` table checked and resolved against the node directory.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `None`: host.toml has no `[rollout]` table, so no source.
    pub source: Option<SourceConfig>,
    pub ga: BTreeSet<u16>,
    pub node: String,
    pub override_file: PathBuf,
    pub state_dir: PathBuf,
    pub trusted: TrustedKeys,
    /// Where and how often the health summary is published.
    pub health: crate::health::HealthSettings,
}

/// A `[rollout]` table that cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    #[error(
        "[rollout] generally_available: unknown feature {0:?} \
         (key-release, key-derivation or key-rotation)"
    )]
    UnknownFeature(String),
    #[error("[rollout] node_name {node:?}: {reason}")]
    NodeName { node: String, reason: String },
    #[error("[rollout] trusted_key: {0}")]
    TrustedKey(#[source] crate::rollout::KeyError),
    #[error("[rollout] source: {0}")]
    Source(#[source] crate::source::SourceError),
    #[error("[rollout] {0}")]
    Health(String),
}

/// Why the rollout state of the node directory cannot be restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error("create {}: {source}", .path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "rollout state in {}: {source}; move {} aside to start from the source's document",
        .dir.display(),
        .dir.join(crate::rollout::ACCEPTED_FILE).display()
    )]
    Accepted {
        dir: PathBuf,
        source: Box<crate::rollout::PersistError>,
    },
}

impl Settings {
    /// Checks `config` (`None`: no `[rollout]` table).
    pub fn new(config: Option<&RolloutConfig>, node_dir: &Path) -> Result<Self, SettingsError> {
        let default = RolloutConfig::default();
        let c = config.unwrap_or(&default);
        let mut ga = BTreeSet::new();
        for name in &c.generally_available {
            let f = Feature::from_name(name)
                .ok_or_else(|| SettingsError::UnknownFeature(name.clone()))?;
            ga.insert(f.id());
        }
        let node = match &c.node_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".to_owned()),
        };
        crate::rollout::document::check_node_name(&node).map_err(|reason| {
            SettingsError::NodeName {
                node: node.clone(),
                reason,
            }
        })?;
        let trusted =
            TrustedKeys::new(c.trusted_key.iter().cloned()).map_err(SettingsError::TrustedKey)?;
        let source = match config {
            Some(c) => {
                let s = SourceConfig::new(c.source, c.file.clone(), c.etcd.clone());
                s.validate().map_err(SettingsError::Source)?;
                Some(s)
            }
            None => None,
        };
        let state_dir = node_dir.join(STATE_DIR);
        let health = crate::health::HealthSettings::new(
            c.health_interval_ms,
            &c.health_prefix,
            source.as_ref().map(|s| (s.source, &s.etcd)),
            &state_dir,
        )
        .and_then(|h| h.with_collected(c.health_dir.clone()))
        .map_err(SettingsError::Health)?;
        Ok(Self {
            source,
            ga,
            node,
            override_file: c
                .override_file
                .clone()
                .unwrap_or_else(|| state_dir.join(DEFAULT_OVERRIDE_FILE)),
            state_dir,
            trusted,
            health,
        })
    }
}

/// Reads the override file: absent is no override; unreadable or
/// malformed kills every feature (see the module primer). The error, if
/// any, is returned for the caller to log.
pub fn read_override(path: &Path) -> (Override, Option<String>) {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Override::default(), None),
        _ => {}
    }
    match Override::read(path) {
        Ok(o) => (o, None),
        Err(e) => (Override::kill_all(), Some(e.to_string())),
    }
}

fn override_from(bytes: Option<&[u8]>) -> (Override, Option<String>) {
    let Some(bytes) = bytes else {
        return (Override::default(), None);
    };
    match std::str::from_utf8(bytes)
        .map_err(|_| "not UTF-8".to_owned())
        .and_then(|t| Override::parse(t).map_err(|e| e.to_string()))
    {
        Ok(o) => (o, None),
        Err(e) => (Override::kill_all(), Some(e)),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sleeps until `at`, or forever if there is none.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The node's rollout state before serving: the persisted document and
/// the override file, published on the returned channel; and the task
/// that keeps it current ([`Rollout::run`]).
#[derive(Debug)]
pub struct Rollout {
    settings: Settings,
    tx: watch::Sender<Arc<View>>,
    metrics: Arc<Metrics>,
    counters: Arc<SourceCounters>,
}

impl Rollout {
    /// Restores the persisted document (an unreadable one is an error:
    /// the operator moves it aside, nothing resets silently) and reads
    /// the override file.
    pub fn restore(
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, watch::Receiver<Arc<View>>), RestoreError> {
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&settings.state_dir)
                .map_err(|source| RestoreError::StateDir {
                    path: settings.state_dir.clone(),
                    source,
                })?;
        }
        let accepted =
            crate::rollout::load(&settings.state_dir, &settings.trusted).map_err(|source| {
                RestoreError::Accepted {
                    dir: settings.state_dir.clone(),
                    source: Box::new(source),
                }
            })?;
        let (local, error) = read_override(&settings.override_file);
        if let Some(e) = error {
            rl_warn!(
                file = %settings.override_file.display(),
                error = %e,
                "rollout override file unreadable: every feature is killed on this node until it is fixed"
            );
        }
        if let Some(a) = &accepted {
            rl_info!(
                revision = a.document().revision(),
                signed_by = a.signed_by().unwrap_or("-"),
                "rollout document restored from the node directory"
            );
        }
        let view = View {
            accepted: accepted.map(Arc::new),
            local,
            ga: Arc::new(settings.ga.clone()),
            node: settings.node.as_str().into(),
            drill: None,
        };
        let (tx, rx) = watch::channel(Arc::new(view));
        let this = Self {
            settings,
            tx,
            metrics,
            counters: Arc::new(SourceCounters::default()),
        };
        this.count_view(&this.tx.borrow());
        if let Some(d) = this.tx.borrow().document() {
            this.metrics
                .rollout
                .accepted(d.revision(), d.issued_at(), unix(SystemTime::now()));
        }
        Ok((this, rx))
    }

    /// The counters of the document source.
    pub fn counters(&self) -> Arc<SourceCounters> {
        self.counters.clone()
    }

    /// Follows the source and the override file until `stop`.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        let (src_tx, mut src_rx) = watch::channel(SourceStatus::connecting());
        let (drill_tx, mut drill_rx) = watch::channel(SourceStatus::connecting());
        match &self.settings.source {
            Some(config) => {
                tasks.spawn(crate::source::run(
                    config.clone(),
                    src_tx,
                    self.counters.clone(),
                    stop.clone(),
                ));
                // The live-drill overlay beside the document (§14).
                tasks.spawn(crate::source::run(
                    config.overlay(),
                    drill_tx,
                    Arc::new(SourceCounters::default()),
                    stop.clone(),
                ));
            }
            None => {
                drop(src_tx);
                drop(drill_tx);
            }
        }
        let (ovr_tx, mut ovr_rx) = watch::channel(SourceStatus::connecting());
        tasks.spawn(crate::source::file::watch_file(
            self.settings.override_file.clone(),
            FILE_POLL_INTERVAL,
            ovr_tx,
            Arc::new(SourceCounters::default()),
            stop.clone(),
        ));
        let mut stop = stop;
        let mut last_value: Option<Arc<[u8]>> = None;
        let mut last_override: Option<Option<Arc<[u8]>>> = None;
        let mut last_drill: Option<Option<Arc<[u8]>>> = None;
        // When the overlay in force expires (its `expires_unix`), whether
        // or not its store says anything: a store that is down keeps the
        // last value published, and a drill must end all the same.
        let mut drill_expiry: Option<tokio::time::Instant> = None;
        // Event-driven until shutdown: each iteration handles one change
        // of the source's, the overlay's or the override file's status,
        // or the overlay's expiry.
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Ok(()) = drill_rx.changed() => {
                    let status = drill_rx.borrow_and_update().clone();
                    if matches!(status.health, Health::Connecting) {
                        continue;
                    }
                    if last_drill.as_ref() != Some(&status.value) {
                        drill_expiry = self.on_drill(status.value.as_deref());
                        last_drill = Some(status.value);
                    }
                }
                () = sleep_until_some(drill_expiry), if drill_expiry.is_some() => {
                    drill_expiry = None;
                    self.end_drill("expired");
                }
                Ok(()) = src_rx.changed() => {
                    let status = src_rx.borrow_and_update().clone();
                    self.on_source_health(&status);
                    if status.value.is_some() && status.value != last_value {
                        last_value.clone_from(&status.value);
                        if let Some(bytes) = &status.value {
                            self.on_candidate(bytes).await;
                        }
                    }
                }
                Ok(()) = ovr_rx.changed() => {
                    let status = ovr_rx.borrow_and_update().clone();
                    if matches!(status.health, Health::Connecting) {
                        continue;
                    }
                    if last_override.as_ref() != Some(&status.value) {
                        self.on_override(status.value.as_deref());
                        last_override = Some(status.value);
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// The source's health, for the metrics (the source logs its own
    /// state changes, once each).
    fn on_source_health(&self, status: &SourceStatus) {
        self.metrics
            .rollout
            .source(status.is_healthy(), status.last_good.map(unix));
    }

    async fn on_candidate(&self, bytes: &[u8]) {
        let current = self.tx.borrow().accepted.clone();
        let admitted = admit(
            bytes,
            current.as_deref(),
            &self.settings.ga,
            &self.settings.trusted,
        );
        match admitted {
            Ok(Admitted::Unchanged) => {}
            Ok(Admitted::New(accepted)) => {
                let revision = accepted.document().revision();
                let dir = self.settings.state_dir.clone();
                let a = accepted.clone();
                // Bounded: a hung disk must not hold up the next document
                // or the override file (the local kill).
                let store = tokio::task::spawn_blocking(move || {
                    crate::rollout::store(&dir, &a).map_err(|e| e.to_string())
                });
                let stored = match tokio::time::timeout(PERSIST_TIMEOUT, store).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "no answer from the disk within {PERSIST_TIMEOUT:?}"
                    )),
                };
                if let Err(e) = stored {
                    self.metrics.rollout.refused("persist-failed");
                    // A document that only narrows is acted on all the
                    // same: a kill must not wait for a disk. One that can
                    // widen is not: after a restart the host would not
                    // know it had accepted it (spec/ROLLOUT.md §9).
                    let old = current.as_deref().map(Accepted::document);
                    if crate::rollout::admit::first_widening(
                        old,
                        accepted.document(),
                        &self.settings.ga,
                    )
                    .is_some()
                    {
                        rl_warn!(
                            revision,
                            error = %e,
                            "rollout document not persisted, so not acted on (it can widen); push it again once the node directory is writable"
                        );
                        return;
                    }
                    rl_warn!(
                        revision,
                        error = %e,
                        "rollout document not persisted; acted on all the same (it only narrows)"
                    );
                }
                rl_info!(
                    revision,
                    signed_by = accepted.signed_by().unwrap_or("-"),
                    bytes = bytes.len(),
                    digest = %crate::source::digest_prefix(bytes),
                    "rollout document accepted"
                );
                let d = accepted.document();
                self.metrics
                    .rollout
                    .accepted(revision, d.issued_at(), unix(SystemTime::now()));
                self.publish(|v| v.accepted = Some(Arc::new(accepted)));
            }
            Err(refusal) => {
                self.metrics.rollout.refused(refusal.label());
                rl_warn!(
                    reason = %refusal,
                    kept = self.tx.borrow().revision(),
                    bytes = bytes.len(),
                    digest = %crate::source::digest_prefix(bytes),
                    "rollout document refused: the accepted revision stays in force"
                );
            }
        }
    }

    /// A new value of the overlay (`None`: absent). Returns when the
    /// overlay now in force expires.
    fn on_drill(&self, bytes: Option<&[u8]>) -> Option<tokio::time::Instant> {
        let now = SystemTime::now();
        let Some(bytes) = bytes else {
            self.end_drill("removed");
            return None;
        };
        let overlay = match DrillOverlay::parse(bytes) {
            Ok(o) => o,
            Err(e) => {
                self.metrics.rollout.refused("drill-overlay");
                rl_warn!(
                    error = %e,
                    bytes = bytes.len(),
                    digest = %crate::source::digest_prefix(bytes),
                    "live drill overlay refused: none is applied"
                );
                self.end_drill("refused");
                return None;
            }
        };
        let now_unix = unix(now);
        if !overlay.in_force(now_unix) {
            self.end_drill("expired");
            return None;
        }
        let left = Duration::from_millis(
            overlay
                .expires_unix()
                .saturating_mul(1000)
                .saturating_sub(unix_ms(now)),
        );
        let same = self.tx.borrow().drill.as_deref().is_some_and(|d| {
            d.drill() == overlay.drill()
                && d.feature() == overlay.feature()
                && d.ring() == overlay.ring()
        });
        // A renewal (a later `expires_unix`) only moves the expiry: the
        // sessions' maps do not change.
        if !same {
            let ring_known = self
                .tx
                .borrow()
                .document()
                .is_some_and(|d| d.ring_index(overlay.ring()).is_some());
            self.metrics.health.drill_applied(&overlay, unix_ms(now));
            rl_info!(
                drill = overlay.drill(),
                feature = overlay.feature().name(),
                ring = overlay.ring(),
                ring_known,
                expires_in_s = left.as_secs(),
                "live drill overlay applied: the feature is disabled for the ring's VMs until it ends"
            );
            self.publish(|v| v.drill = Some(Arc::new(overlay)));
        }
        Some(tokio::time::Instant::now() + left)
    }

    /// Takes the overlay in force away, if there is one.
    fn end_drill(&self, why: &'static str) {
        let Some(drill) = self.tx.borrow().drill.clone() else {
            return;
        };
        self.metrics.health.drill_ended(unix_ms(SystemTime::now()));
        rl_info!(drill = drill.drill(), why, "live drill overlay taken away");
        self.publish(|v| v.drill = None);
    }

    fn on_override(&self, bytes: Option<&[u8]>) {
        let (local, error) = override_from(bytes);
        match error {
            Some(e) => rl_warn!(
                file = %self.settings.override_file.display(),
                error = %e,
                "rollout override file unreadable: every feature is killed on this node until it is fixed"
            ),
            None => rl_info!(
                killed = %local.killed().map(Feature::name).collect::<Vec<_>>().join(","),
                "rollout override file read"
            ),
        }
        self.publish(|v| v.local = local);
    }

    /// Applies `change` to the view and publishes it if it differs.
    fn publish(&self, change: impl FnOnce(&mut View)) {
        let mut view = View::clone(&self.tx.borrow());
        change(&mut view);
        self.count_view(&view);
        self.tx.send_replace(Arc::new(view));
    }

    fn count_view(&self, view: &View) {
        let r = &self.metrics.rollout;
        let doc = view.document();
        for f in Feature::ALL {
            let killed =
                view.local.kills(f) || doc.and_then(|d| d.feature(f)).is_some_and(|e| e.killed());
            r.feature(f.id(), killed, doc.and_then(|d| d.stage_index(f)));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rollout::{Document, TrustedKey, kill, sign, unkill, unsigned};
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    use vkx_common::wire::{FeatureState, VmId, feature};

    fn vm() -> VmId {
        VmId::new("vm-1").unwrap()
    }

    fn release(view: &View) -> FeatureState {
        view.features_for(&vm(), None)[&feature::KEY_RELEASE]
    }

    /// A runtime over a fresh node directory trusting `public`.
    fn runtime(node: &Path, public: &[u8]) -> (Rollout, watch::Receiver<Arc<View>>) {
        let config = RolloutConfig {
            node_name: Some("node-a".into()),
            trusted_key: vec![TrustedKey {
                id: "release".into(),
                public_key: hex::encode(public),
            }],
            ..RolloutConfig::default()
        };
        let settings = Settings::new(Some(&config), node).unwrap();
        Rollout::restore(settings, Arc::new(Metrics::default())).unwrap()
    }

    #[tokio::test]
    async fn an_unpersisted_document_is_acted_on_only_if_it_narrows() {
        let node = tempfile::tempdir().unwrap();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let (rollout, view) = runtime(node.path(), pair.public_key().as_ref());
        assert_eq!(release(&view.borrow()), FeatureState::Enabled, "GA");
        // The node directory cannot take the file: its temporary name is
        // a directory.
        std::fs::create_dir(rollout.settings.state_dir.join(".accepted.json.tmp")).unwrap();
        let killed = kill(None, Feature::KeyRelease, 1).unwrap();
        rollout.on_candidate(&unsigned(&killed)).await;
        assert_eq!(
            release(&view.borrow()),
            FeatureState::Disabled,
            "a kill does not wait for a disk"
        );
        assert_eq!(rollout.metrics.rollout.refusals("persist-failed"), 1);
        let enabled = unkill(Some(&killed), Feature::KeyRelease, 2).unwrap();
        rollout
            .on_candidate(&sign(&enabled, &pair, "release").unwrap())
            .await;
        assert_eq!(
            release(&view.borrow()),
            FeatureState::Disabled,
            "a widening is not acted on unpersisted"
        );
        assert_eq!(rollout.metrics.rollout.refusals("persist-failed"), 2);
        // Once the directory is writable again, the same push is accepted
        // and survives a restart.
        std::fs::remove_dir(rollout.settings.state_dir.join(".accepted.json.tmp")).unwrap();
        rollout
            .on_candidate(&sign(&enabled, &pair, "release").unwrap())
            .await;
        assert_eq!(release(&view.borrow()), FeatureState::Enabled);
        let (_, restored) = runtime(node.path(), pair.public_key().as_ref());
        assert_eq!(restored.borrow().revision(), 2);
    }

    #[tokio::test]
    async fn refused_documents_change_nothing_and_are_counted() {
        let node = tempfile::tempdir().unwrap();
        let (rollout, view) = runtime(node.path(), &[7; 32]);
        let killed = kill(None, Feature::KeyRelease, 1).unwrap();
        rollout.on_candidate(&unsigned(&killed)).await;
        assert_eq!(view.borrow().revision(), 1);
        rollout.on_candidate(b"{").await;
        rollout.on_candidate(&unsigned(&killed)).await; // the same again: silent
        let enabled = unkill(Some(&killed), Feature::KeyRelease, 2).unwrap();
        rollout.on_candidate(&unsigned(&enabled)).await;
        let m = &rollout.metrics.rollout;
        assert_eq!(m.refusals("malformed"), 1);
        assert_eq!(m.refusals("unsigned-widening"), 1);
        assert_eq!(m.refusals("replay"), 0);
        assert_eq!(view.borrow().revision(), 1);
        assert_eq!(release(&view.borrow()), FeatureState::Disabled);
    }

    #[tokio::test]
    async fn a_live_drill_narrows_its_ring_until_removed_refused_or_expired() {
        let node = tempfile::tempdir().unwrap();
        let (rollout, mut view) = runtime(node.path(), &[7; 32]);
        let doc = Document::parse(crate::rollout::document::EXAMPLE.as_bytes()).unwrap();
        rollout.on_candidate(&unsigned(&doc)).await;
        assert_eq!(view.borrow().revision(), 7);
        // vm-1 is in canary; vm-x, on node-a, in the "debian" ring.
        let other = VmId::new("vm-x").unwrap();
        let state = |v: &View, vm: &VmId| v.features_for(vm, None)[&feature::KEY_RELEASE];
        assert_eq!(release(&view.borrow()), FeatureState::Enabled);
        let now = unix(SystemTime::now());
        let o = DrillOverlay::new("d-1", Feature::KeyRelease, "canary", now, now + 60).unwrap();
        assert!(rollout.on_drill(Some(&o.to_bytes())).is_some());
        {
            let v = view.borrow_and_update();
            assert_eq!(release(&v), FeatureState::Disabled, "canary narrowed");
            assert_eq!(state(&v, &other), FeatureState::Enabled, "debian untouched");
            assert_eq!(
                v.features_for(&vm(), None)[&feature::KEY_ROTATION],
                FeatureState::Enabled,
                "other features untouched"
            );
            assert!(v.drill_narrows(&vm(), None).is_some());
            assert!(v.drill_narrows(&other, None).is_none());
        }
        let record = || {
            rollout
                .metrics
                .health
                .summary("node-a", 7, 0, 0)
                .drill
                .unwrap()
        };
        assert_eq!(record().ended_unix_ms, None);
        // A renewal moves the expiry only: the sessions are not woken.
        let renewed = o.renewed(now + 120).unwrap();
        assert!(rollout.on_drill(Some(&renewed.to_bytes())).is_some());
        assert!(!view.has_changed().unwrap());
        // Removed: back to the document.
        assert!(rollout.on_drill(None).is_none());
        assert_eq!(release(&view.borrow_and_update()), FeatureState::Enabled);
        assert!(record().ended_unix_ms.is_some());
        // Garbage: counted, none applied.
        rollout.on_drill(Some(&o.to_bytes()));
        assert_eq!(release(&view.borrow()), FeatureState::Disabled);
        assert!(rollout.on_drill(Some(b"{\"format\":1}")).is_none());
        assert_eq!(release(&view.borrow()), FeatureState::Enabled);
        assert_eq!(rollout.metrics.rollout.refusals("drill-overlay"), 1);
        // Already expired on this clock: not applied.
        let old =
            DrillOverlay::new("d-2", Feature::KeyRelease, "canary", now - 100, now - 1).unwrap();
        assert!(rollout.on_drill(Some(&old.to_bytes())).is_none());
        assert_eq!(release(&view.borrow()), FeatureState::Enabled);
        // A drill never widens: a killed feature stays killed.
        let killed = kill(Some(&doc), Feature::KeyRelease, 8).unwrap();
        rollout.on_candidate(&unsigned(&killed)).await;
        rollout.on_drill(Some(&o.to_bytes()));
        assert!(view.borrow().drill_narrows(&vm(), None).is_none());
        assert_eq!(release(&view.borrow()), FeatureState::Disabled);
        rollout.on_drill(None);
        assert_eq!(release(&view.borrow()), FeatureState::Disabled);
    }

    #[tokio::test(start_paused = true)]
    async fn the_overlay_expires_on_the_hosts_clock_with_the_store_silent() {
        let node = tempfile::tempdir().unwrap();
        let (rollout, view) = runtime(node.path(), &[7; 32]);
        let doc = Document::parse(crate::rollout::document::EXAMPLE.as_bytes()).unwrap();
        rollout.on_candidate(&unsigned(&doc)).await;
        let now = unix(SystemTime::now());
        let o = DrillOverlay::new("d-1", Feature::KeyRelease, "canary", now, now + 3).unwrap();
        let at = rollout.on_drill(Some(&o.to_bytes())).unwrap();
        let left = at - tokio::time::Instant::now();
        assert!(
            left <= Duration::from_secs(3) && left >= Duration::from_secs(2),
            "{left:?}"
        );
        assert_eq!(release(&view.borrow()), FeatureState::Disabled);
        // What `run` does when the expiry fires.
        sleep_until_some(Some(at)).await;
        rollout.end_drill("expired");
        assert_eq!(release(&view.borrow()), FeatureState::Enabled);
    }

    #[test]
    fn a_garbled_override_kills_everything_and_a_missing_one_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("override.toml");
        assert_eq!(read_override(&path), (Override::default(), None));
        std::fs::write(&path, "killed = [\"key-release\"").unwrap();
        let (o, e) = read_override(&path);
        assert_eq!(o, Override::kill_all());
        assert!(e.is_some());
        assert_eq!(
            override_from(Some(b"killed = [\"key-rotation\"]\n"))
                .0
                .killed()
                .count(),
            1
        );
        assert_eq!(override_from(Some(b"\xff")).0, Override::kill_all());
    }
}
