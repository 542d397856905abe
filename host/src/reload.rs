//! Reloading the policy and the CID map on SIGHUP (`systemctl reload
//! vkx-host`): what `serve` takes in without a restart, and what it does
//! to the sessions already established.
//!
//! What reloads. policy.toml (the file host.toml's `policy` names at
//! start) and the AF_VSOCK CID map (`[vsock] vm` in host.toml): the two
//! inputs that say which VM a peer is and what it may have. Everything
//! else in host.toml (listeners, `[vsock]` port and options, limits,
//! `[metrics]`, `[local]`, `[rollout]`, paths, `on_rewind`, ...) binds
//! sockets or sizes structures at start and keeps needing a restart; a
//! reload that sees such a setting changed says so in one line and leaves
//! it as it runs.
//!
//! Validated whole, applied whole. A reload reads and checks host.toml
//! completely (as at start) and policy.toml completely, off the runtime
//! thread; if either is refused, one line says why and nothing changes:
//! the running policy and CID map stay in force. Otherwise both are
//! published together as one [`Trust`] on a `tokio::sync::watch` (the
//! shape of [`crate::publish`]): every connection reads the current value
//! when it needs one, so a kept session's next request is decided by the
//! new policy.
//!
//! Live sessions. Each Established session is registered with what it
//! proved ([`Proof`]: its accepted PCR values, its CID, the grants it
//! got). After a reload, every session the new [`Trust`] no longer allows
//! ([`allows`]: its VM left the policy, one of its PCR values was revoked,
//! a grant it had was taken away, or its CID now names another VM or
//! none) is sent `goodbye(reattest)` (PROTOCOL.md §11.7): the guest
//! attests again under the new policy and is accepted or refused. Its
//! derived keys go with it (§9.4). The others are left alone.
//!
//! Bounded. Requests coalesce: at most one reload runs at a time, at most
//! one per [`MIN_RELOAD_INTERVAL`], and any number of SIGHUPs during one
//! make one more. The files are read with size caps ([`crate::config::MAX_HOST_TOML`],
//! [`crate::policy::MAX_POLICY_FILE`]). A reload logs one line (and
//! one more if restart-only settings changed), with the number of
//! sessions it ended and at most [`crate::trust::MAX_NAMED`] of them by name.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::policy::{Policy, PolicyError};
use tokio::sync::watch;
use vkx_common::{rl_info, rl_warn};

use crate::config::ServeConfig;
use crate::service::Shared;
use crate::trust::Trust;
use crate::vsock::{CidMap, VsockConfigError};

/// Shortest time between the starts of two reloads: a storm of SIGHUPs
/// costs one file read per second at most.
pub const MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why a reload was refused; nothing of it was applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    #[error("{0}")]
    HostConfig(String),
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("[vsock]: {0}")]
    CidMap(#[from] VsockConfigError),
}

/// Why [`Source::new`] could not make a source: the host.toml `serve`
/// started from does not parse as TOML (`serve` checked it already, so
/// only a caller handing in other text sees this).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("{}: {reason}", path.display())]
    HostToml {
        path: PathBuf,
        reason: toml::de::Error,
    },
}

/// A reload that passed every check.
#[derive(Debug)]
pub struct Loaded {
    pub policy: Policy,
    /// `None`: keep the running map (no AF_VSOCK listener runs, or the
    /// new host.toml has none: removing it needs a restart).
    pub cid_map: Option<CidMap>,
    /// host.toml's restart-only settings that differ from the running
    /// ones (top-level keys), not applied.
    pub not_applied: Vec<String>,
}

/// Where a reload reads from: host.toml, and the policy file and CID map
/// presence of the running configuration.
#[derive(Debug, Clone)]
pub struct Source {
    host_toml: PathBuf,
    policy: PathBuf,
    vsock: bool,
    /// The running host.toml without its reloadable part.
    running: Arc<toml::Table>,
}

impl Source {
    /// The source for a `serve` started from `text`, read at `host_toml`.
    pub fn new(host_toml: PathBuf, text: &str, config: &ServeConfig) -> Result<Self, SourceError> {
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(reason) => {
                return Err(SourceError::HostToml {
                    path: host_toml,
                    reason,
                });
            }
        };
        Ok(Self {
            host_toml,
            policy: config.policy.clone(),
            vsock: config.vsock.is_some(),
            running: Arc::new(restart_only(table)),
        })
    }

    /// Reads and checks host.toml and the policy, whole. Blocking.
    pub fn load(&self) -> Result<Loaded, ReloadError> {
        let text = ServeConfig::read(&self.host_toml)
            .map_err(|e| ReloadError::HostConfig(format!("{e:#}")))?;
        let config = ServeConfig::from_text(&self.host_toml, &text)
            .map_err(|e| ReloadError::HostConfig(format!("{e:#}")))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| ReloadError::HostConfig(e.to_string()))?;
        let policy = Policy::load(&self.policy)?;
        let not_applied = changed_keys(&self.running, &restart_only(table));
        // The CID map belongs to the listener bound at start: without one
        // (or with the listener removed, which needs a restart) there is
        // none to replace.
        let cid_map = match (&config.vsock, self.vsock) {
            (Some(v), true) => Some(v.cid_map()?),
            _ => None,
        };
        Ok(Loaded {
            policy,
            cid_map,
            not_applied,
        })
    }
}

/// `text` on one line: a TOML error quotes the offending line under its
/// message; the refusal stays one log line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// host.toml without what a reload applies (`[vsock] vm`).
fn restart_only(mut table: toml::Table) -> toml::Table {
    if let Some(toml::Value::Table(v)) = table.get_mut("vsock") {
        v.remove("vm");
    }
    table
}

/// The top-level keys whose values differ between `a` and `b`, sorted.
fn changed_keys(a: &toml::Table, b: &toml::Table) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Reload requests: a counter bumped by each SIGHUP. A `watch` keeps only
/// the latest value, so requests coalesce by construction.
pub fn sighup() -> std::io::Result<watch::Receiver<u64>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        // Ends when `serve` has stopped and dropped the receiver.
        while hup.recv().await.is_some() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(rx)
}

/// A reload source and its requests, for `serve::serve`.
#[derive(Debug)]
pub struct Reload {
    pub source: Source,
    pub requests: watch::Receiver<u64>,
}

/// Reloads on each request until `stop`.
pub(crate) async fn run(reload: Reload, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let Reload { source, requests } = reload;
    paced(requests, stop, || {
        let source = source.clone();
        let shared = shared.clone();
        async move {
            let loaded = tokio::task::spawn_blocking(move || source.load()).await;
            match loaded {
                Ok(Ok(loaded)) => apply(&shared, loaded),
                Ok(Err(e)) => {
                    shared.metrics.reload(false, 0);
                    rl_warn!(
                        error = %one_line(&e.to_string()),
                        "reload refused: nothing applied, the running policy and CID map stay in force"
                    );
                }
                Err(_) => {
                    shared.metrics.reload(false, 0);
                    rl_warn!("reload failed (its task ended early): nothing applied");
                }
            }
        }
    })
    .await;
}

/// Runs `once` for the requests on `requests` until `stop`: one at a time
/// (the next starts after the previous ended), starts at least
/// [`MIN_RELOAD_INTERVAL`] apart, and every request made before a start
/// served by that start.
async fn paced<F, Fut>(
    mut requests: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    mut once: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = requests.changed() => if r.is_err() { return },
        }
        if let Some(t) = last {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep_until(t + MIN_RELOAD_INTERVAL) => {}
            }
        }
        requests.borrow_and_update();
        last = Some(tokio::time::Instant::now());
        once().await;
    }
}

/// Publishes a checked reload and sends the sessions it no longer allows
/// to re-attest.
fn apply(shared: &Shared, loaded: Loaded) {
    let Loaded {
        policy,
        cid_map,
        not_applied,
    } = loaded;
    let cid_map = cid_map.unwrap_or_else(|| shared.trust.borrow().cid_map.clone());
    let trust = Trust { policy, cid_map };
    let vms = trust.policy.vm_count();
    let cids = trust.cid_map.len();
    let trust = Arc::new(trust);
    // Published before the sessions are looked at: a session registering
    // meanwhile is checked against this value by its registration.
    crate::publish::publish_if_changed(&shared.trust, trust.clone());
    let ended = shared.vm_sessions.reattest_disallowed(&trust);
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    shared.metrics.reload(true, unix);
    let named = ended
        .named
        .iter()
        .map(|(vm, why)| format!("{vm}: {why}"))
        .collect::<Vec<_>>()
        .join("; ");
    rl_info!(
        vms,
        cids,
        sessions_reattest = ended.count,
        named = %named,
        "reload applied: policy and CID map; sessions they no longer allow sent to re-attest"
    );
    if !not_applied.is_empty() {
        rl_warn!(
            settings = %not_applied.join(", "),
            "reload: host.toml settings that need a restart changed; not applied"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_refusal_is_one_line() {
        let e = toml::from_str::<toml::Table>("a = 1\nb = \n").unwrap_err();
        assert!(e.to_string().lines().count() > 1);
        let line = one_line(&e.to_string());
        assert_eq!(line.lines().count(), 1);
        assert!(line.contains("line 2"), "{line}");
    }

    #[test]
    fn only_the_cid_map_of_host_toml_reloads() {
        let t = |s: &str| restart_only(toml::from_str::<toml::Table>(s).unwrap());
        let base =
            t("policy = \"/p\"\n[vsock]\nport = 7861\nvm = [ { cid = 17, vm_id = \"a\" } ]\n");
        let remapped =
            t("policy = \"/p\"\n[vsock]\nport = 7861\nvm = [ { cid = 18, vm_id = \"a\" } ]\n");
        assert!(changed_keys(&base, &remapped).is_empty());
        let moved = t(
            "policy = \"/q\"\nmax_connections = 5\n[vsock]\nport = 7862\n\
             vm = [ { cid = 17, vm_id = \"a\" } ]\n",
        );
        assert_eq!(
            changed_keys(&base, &moved),
            ["max_connections", "policy", "vsock"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_requests_coalesces_into_spaced_reloads() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let (tx, rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let busy = Arc::new(AtomicU32::new(0));
        let (r, b) = (runs.clone(), busy.clone());
        let task = tokio::spawn(paced(rx, stop_rx, move || {
            let (r, b) = (r.clone(), b.clone());
            async move {
                assert_eq!(b.fetch_add(1, Ordering::SeqCst), 0, "one at a time");
                r.lock().unwrap().push(tokio::time::Instant::now());
                // A slow reload: requests keep coming meanwhile.
                tokio::time::sleep(Duration::from_millis(300)).await;
                b.fetch_sub(1, Ordering::SeqCst);
            }
        }));
        let t0 = tokio::time::Instant::now();
        // 1,000 requests over 2.5 s.
        for _ in 0..1000 {
            tx.send_modify(|n| *n += 1);
            tokio::time::sleep(Duration::from_micros(2500)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let runs = runs.lock().unwrap().clone();
        // Starts at 0, 1, 2 s, and one after the last request (3 s).
        assert_eq!(runs.len(), 4, "{runs:?}");
        for w in runs.windows(2) {
            assert!(w[1] - w[0] >= MIN_RELOAD_INTERVAL, "{runs:?}");
        }
        assert!(runs[0] - t0 < Duration::from_millis(10));
        // A quiet source: no reload at all.
        let (_tx, rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let n = Arc::new(AtomicU32::new(0));
        let c = n.clone();
        let task = tokio::spawn(paced(rx, stop_rx, move || {
            c.fetch_add(1, Ordering::SeqCst);
            async {}
        }));
        tokio::time::sleep(Duration::from_secs(10)).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }
}
