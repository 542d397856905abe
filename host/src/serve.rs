//! `vkx-host serve`: the host agent's async driver. It loads host.toml's
//! pieces (node identity, key store, registry, policy), binds every
//! listener, and runs one accept loop ([`crate::listen`]) per listener:
//! each accepted guest connection meets [`crate::admission`] first, and an
//! admitted one is driven by [`crate::connection`] against the shared
//! service context ([`crate::service`]). Beside them run the key-version
//! watcher, the metrics endpoint, the derived-key socket, the health
//! summary's publisher ([`crate::health::publish`]) and the reload of the
//! policy and CID map on SIGHUP ([`crate::reload`]).
//!
//! Bounded by construction. Over its peer's open transports
//! (`[admission] max_open_per_peer`) or the hard ceiling (`max_open`) a
//! connection is closed at once; over `max_connections`, `max_handshakes`
//! or its peer's connection rate it completes TLS (bounded by the TLS
//! handshake timeout), is told `busy` or `rate-limited` with a jittered
//! `retry-after` and closed (PROTOCOL.md §11.6, Accepted). Shutdown is a
//! future: on it, listeners stop accepting and every live session says
//! goodbye within [`SHUTDOWN_GRACE`].
//!
//! Transports: hybrid vsock (the VMM's `<path>_<port>` socket, PROTOCOL.md
//! §2.3.1) and the plain Unix socket of §2.4, where the socket a
//! connection arrives on is the VM's identity; AF_VSOCK (§2.2), where the
//! hypervisor-set CID is.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ring::rand::SystemRandom;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::time::{Instant as TokioInstant, timeout_at};
use vkx_common::session::host::HostConfig;
use vkx_common::wire::{KeyName, PROTOCOL_VERSION_1, VersionRange, VmId};
use vkx_common::{rl_info, rl_warn};

use crate::admission::{AdmissionControl, Decision, RefuseReason};
use crate::config::ServeConfig;
use crate::connection::{Tracker, TransportPeer, connection, refuse};
use crate::derive::DerivedKeys;
use crate::keystore::{DirKeyStore, KeyStore};
use crate::listen::{Accept, accept_loop};
use crate::metrics::{Metrics, MetricsConfig};
use crate::registry::Registry;
use crate::reload::Reload;
use crate::rollout_service::Rollout;
use crate::service::{FEATURE_RETRY_AFTER, Shared, shutdown_spread, watch_key_versions};
use crate::trust::Trust;
use crate::vsock::{Admission, admit};

/// How long live sessions get to say goodbye at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The runtime `serve` runs on: `threads.workers` worker threads (one per
/// core by default) sharing every connection, and a blocking pool of at
/// most `threads.max_blocking` threads for quote verification and the
/// registry's record; blocking work beyond it waits its turn in order.
/// Admission control is shared state ([`AdmissionControl`]: atomics and
/// one mutex), so its bounds hold whichever worker accepts.
pub fn runtime(threads: crate::config::Threads) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.workers)
        .max_blocking_threads(threads.max_blocking)
        .thread_name("vkx-host")
        .enable_all()
        .build()
}

/// Serves until `shutdown` resolves; with `reload`, takes in a new policy
/// and CID map on each of its requests ([`crate::reload`]).
pub async fn serve(
    config: ServeConfig,
    reload: Option<Reload>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let (cert, key) = crate::node::load(&config.node_dir)?;
    let tls = vkx_common::tls::server_config(cert, key)?;
    let master = crate::node::load_master_key(&config.node_dir)?;
    let store_dir = config
        .key_store
        .clone()
        .unwrap_or_else(|| config.node_dir.join(crate::keystore::DEFAULT_STORE_DIR));
    let store = Arc::new(crate::keystore::CachedKeys::new(Arc::new(
        DirKeyStore::open(&store_dir, master)?,
    )));
    let initial: BTreeMap<KeyName, u32> = store
        .list()?
        .into_iter()
        .map(|k| (k.name, k.current_version))
        .collect();
    let (key_versions, _) = watch::channel(Arc::new(initial));
    let limits = config.limits().map_err(ServeError::Admission)?;
    let admission = Arc::new(AdmissionControl::new(limits, std::time::Instant::now()));
    let metrics = Arc::new(Metrics::default());
    // The rollout state is restored before any listener exists: the
    // first guest already sees the persisted document and the override.
    let rollout_settings = config.rollout()?;
    let health = rollout_settings.health.clone();
    let (rollout, rollout_view) = Rollout::restore(rollout_settings, metrics.clone())?;
    let shared = Arc::new(Shared {
        tls,
        keys: store.clone(),
        key_versions,
        derived: Arc::new(DerivedKeys::default()),
        registry: Registry::open(&config.registry)?,
        trust: watch::channel(Arc::new(Trust::load(&config)?)).0,
        config: Arc::new(HostConfig {
            versions: VersionRange {
                min: PROTOCOL_VERSION_1,
                max: PROTOCOL_VERSION_1,
            },
            reattest_after_s: config.reattest_after_s,
            feature_retry_after: FEATURE_RETRY_AFTER,
        }),
        rng: SystemRandom::new(),
        shutdown_retry_after: Duration::from_secs(config.shutdown_retry_after_s.into()),
        on_rewind: config.on_rewind,
        vm_sessions: crate::service::VmSessions::default(),
        quote_locks: crate::service::QuoteLocks::default(),
        shutdown_spread_ms: AtomicU64::new(0),
        admission: admission.clone(),
        metrics: metrics.clone(),
        rollout: rollout_view,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let sockets: Vec<(PathBuf, &str)> = config
        .unix_listener
        .iter()
        .map(|l| (l.path.clone(), l.vm_id.as_str()))
        .chain(
            config
                .hybrid_vsock
                .iter()
                .map(|h| (h.listen_path(), h.vm_id.as_str())),
        )
        .collect();
    let mut listeners = Vec::with_capacity(sockets.len() + 1);
    for (path, vm) in &sockets {
        let vm_id = VmId::new(*vm).map_err(|source| ServeError::ListenerVmId {
            path: path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| ServeError::Listen {
            path: path.clone(),
            source,
        })?;
        listeners.push(Listener::Unix(listener, vm_id));
    }
    if let Some(v) = &config.vsock {
        let listener = crate::vsock::bind(v).map_err(|source| ServeError::ListenVsock {
            port: v.port,
            source,
        })?;
        listeners.push(Listener::Vsock {
            listener,
            trust: shared.trust.subscribe(),
            require_privileged_port: v.require_privileged_port,
        });
    }
    let count = listeners.len();
    tasks.spawn(rollout.run(stop_rx.clone()));
    tasks.spawn(report_suppressed(stop_rx.clone()));
    if let Some(reload) = reload {
        tasks.spawn(crate::reload::run(reload, shared.clone(), stop_rx.clone()));
    }
    tasks.spawn(crate::health::publish(
        metrics.health.clone(),
        health,
        shared.rollout.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(watch_key_versions(
        store,
        shared.key_versions.clone(),
        stop_rx.clone(),
    ));
    if let Some(local) = &config.local {
        let l =
            crate::listen::bind_local_with(&local.socket, &local.access()?).map_err(|source| {
                ServeError::Listen {
                    path: local.socket.clone(),
                    source,
                }
            })?;
        tasks.spawn(crate::derive::serve_local(
            l,
            local.clone(),
            shared.derived.clone(),
            stop_rx.clone(),
        ));
    }
    let metrics_socket = match config.metrics.as_ref().map(MetricsConfig::endpoint) {
        Some(Ok(endpoint)) => {
            let l = crate::metrics::bind(&endpoint).await.map_err(|source| {
                ServeError::MetricsEndpoint {
                    endpoint: format!("{endpoint:?}"),
                    source,
                }
            })?;
            tasks.spawn(crate::metrics::serve(
                l,
                metrics,
                admission,
                stop_rx.clone(),
            ));
            match endpoint {
                crate::metrics::Endpoint::Unix(p) => Some(p),
                crate::metrics::Endpoint::Tcp(_) => None,
            }
        }
        Some(Err(e)) => return Err(ServeError::Metrics(e)),
        None => None,
    };
    for listener in listeners {
        tasks.spawn(serve_guests(listener, shared.clone(), stop_rx.clone()));
    }
    rl_info!("vkx-host serving {count} listener(s)");
    shutdown.await;
    let sessions = shared.metrics.sessions_established();
    let spread = shutdown_spread(sessions);
    shared.shutdown_spread_ms.store(
        u64::try_from(spread.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    rl_info!(
        "shutting down: no new connections, goodbye to {sessions} live session(s), \
         reconnections spread over {} s from {} s",
        spread.as_secs(),
        shared.shutdown_retry_after.as_secs()
    );
    let _ = stop_tx.send(true);
    let deadline = TokioInstant::now() + SHUTDOWN_GRACE;
    while let Ok(Some(_)) = timeout_at(deadline, tasks.join_next()).await {}
    tasks.abort_all();
    for (path, _) in &sockets {
        let _ = std::fs::remove_file(path);
    }
    if let Some(p) = metrics_socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Why `serve` could not start: each names the file, socket or setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error("TLS: {0}")]
    Tls(#[from] vkx_common::tls::TlsConfigError),
    #[error("key store: {0}")]
    KeyStore(#[from] crate::keystore::KeyStoreError),
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error("[admission]: {0}")]
    Admission(crate::admission::AdmissionConfigError),
    #[error(transparent)]
    Rollout(#[from] crate::rollout_service::SettingsError),
    #[error(transparent)]
    RolloutState(#[from] crate::rollout_service::RestoreError),
    #[error(transparent)]
    LocalSocket(#[from] crate::derive::SocketModeError),
    #[error("listener {}: vm_id: {source}", .path.display())]
    ListenerVmId {
        path: PathBuf,
        source: vkx_common::wire::DecodeError,
    },
    #[error("listen on {}: {source}", .path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listen on vsock port {port}: {source}")]
    ListenVsock { port: u32, source: std::io::Error },
    #[error("metrics endpoint {endpoint}: {source}")]
    MetricsEndpoint {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("[metrics]: {0}")]
    Metrics(crate::metrics::MetricsConfigError),
}

/// A listening socket and how it names its peers.
enum Listener {
    /// Plain Unix or hybrid vsock: the socket is the VM (§2.3.1, §2.4).
    Unix(UnixListener, VmId),
    /// AF_VSOCK: the peer's CID is the VM (§2.2), by the CID map in force
    /// (a reload replaces it).
    Vsock {
        listener: tokio_vsock::VsockListener,
        trust: watch::Receiver<Arc<Trust>>,
        require_privileged_port: bool,
    },
}

/// A connection as accepted, before admission.
enum Accepted {
    Unix(UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

impl Accept for Listener {
    type Conn = (Accepted, TransportPeer);

    async fn accept(&self) -> std::io::Result<(Accepted, TransportPeer)> {
        match self {
            Listener::Unix(l, vm) => {
                let (s, _) = l.accept().await?;
                Ok((Accepted::Unix(s), TransportPeer::vm(vm.clone())))
            }
            Listener::Vsock {
                listener,
                trust,
                require_privileged_port,
            } => {
                let (s, addr) = listener.accept().await?;
                let map = trust.borrow().clone();
                let admission = admit(
                    &map.cid_map,
                    addr.cid(),
                    addr.port(),
                    *require_privileged_port,
                );
                if let Admission::Unmapped { reason } = &admission {
                    rl_warn!(peer: admission.log_peer(), %reason, "peer not admitted by identity");
                }
                let peer = TransportPeer {
                    vm_id: admission.vm_id().cloned(),
                    cid: admission.cid(),
                    label: admission.log_peer(),
                };
                Ok((Accepted::Vsock(s), peer))
            }
        }
    }
}

/// One guest listener's accept loop: admission control decides for each
/// connection whether it is served, refused after TLS, or closed at once.
async fn serve_guests(listener: Listener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let name = match &listener {
        Listener::Unix(_, vm) => vm.as_str().to_owned(),
        Listener::Vsock { .. } => "vsock".to_owned(),
    };
    let conn_stop = stop.clone();
    let admit = move |(stream, peer): (Accepted, TransportPeer)| {
        let accepted_at = std::time::Instant::now();
        let decision = shared
            .admission
            .admit(peer.as_ref(), accepted_at, || shared.draw());
        let shared = shared.clone();
        let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match decision {
            // Cannot afford even a TLS handshake: close the transport (the
            // guest backs off as from any transport failure, §11.6).
            Decision::Close(reason) => {
                shared.metrics.refused(reason);
                match reason {
                    RefuseReason::PeerOpen => rl_warn!(
                        peer: peer,
                        "connection closed at once: the peer holds admission.max_open_per_peer connections"
                    ),
                    _ => rl_warn!(
                        peer: peer,
                        "connection closed at once: hard ceiling (admission.max_open) reached"
                    ),
                }
                return None;
            }
            Decision::Refuse(refused) => {
                shared.metrics.refused(refused.reason);
                rl_warn!(
                    peer: peer,
                    limit = refused.reason.label(),
                    code = %refused.refusal.code(),
                    retry_after_ms = refused.retry_after.as_millis(),
                    "connection refused by admission control"
                );
                match stream {
                    Accepted::Unix(s) => Box::pin(refuse(s, peer, refused, shared)),
                    Accepted::Vsock(s) => Box::pin(refuse(s, peer, refused, shared)),
                }
            }
            Decision::Admit(ticket) => {
                let stop = conn_stop.clone();
                let track = Tracker::new(ticket, accepted_at, shared.metrics.clone());
                match stream {
                    Accepted::Unix(s) => Box::pin(connection(s, peer, track, shared, stop)),
                    Accepted::Vsock(s) => Box::pin(connection(s, peer, track, shared, stop)),
                }
            }
        };
        Some(task)
    };
    accept_loop(listener, &name, admit, stop).await;
}

/// Every [`vkx_common::ratelimit::SUMMARY_INTERVAL`] until `stop`: one
/// line per call site whose burst of suppressed lines has ended (PROTOCOL
/// §13.8), so a burst is accounted for even if its site never fires
/// again.
pub async fn report_suppressed(mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(vkx_common::ratelimit::SUMMARY_INTERVAL) => {}
        }
        vkx_common::ratelimit::log_summaries(std::time::Instant::now());
    }
    vkx_common::ratelimit::log_summaries(std::time::Instant::now());
}
