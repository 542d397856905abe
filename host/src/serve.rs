//! `vkx-host serve`: the host agent's async driver. A thin shell around
//! [`vkx_common::session::host::Host`]: it accepts connections, runs TLS,
//! feeds the session frames and timer expiries, and answers its events
//! with the registry, the quote verifier and the policy.
//!
//! Bounded by construction. Every accepted connection meets
//! [`crate::admission`] first: over its peer's open transports
//! (`[admission] max_open_per_peer`) or the hard ceiling (`max_open`) it
//! is closed at once; over `max_connections`,
//! `max_handshakes` or its peer's connection rate it completes TLS (bounded
//! by the TLS handshake timeout), is told `busy` or `rate-limited` with a
//! jittered `retry-after` and closed (PROTOCOL.md §11.6, Accepted). A
//! served connection has the TLS handshake deadline and then the session's
//! own deadlines (the whole handshake within `HANDSHAKE_DEADLINE` of
//! accept), so it holds its handshake slot for at most
//! [`MAX_HANDSHAKE_HOLD`]; every batch of sends has [`WRITE_TIMEOUT`], so a
//! guest that stops reading cannot hold a connection by back-pressure; each
//! session has a message budget (over it: `rate-limited`, close); each
//! connection buffers at most one frame. Shutdown is a future: on it,
//! listeners stop accepting and every live session says goodbye within
//! [`SHUTDOWN_GRACE`].
//!
//! Everything is counted in [`crate::metrics`] where it happens (exact
//! whatever the log limiter drops) and served on the `[metrics]` endpoint.
//!
//! Transports in this release: hybrid vsock (the VMM's `<path>_<port>`
//! socket, PROTOCOL.md §2.3.1) and the plain Unix socket of §2.4; in both,
//! which socket a connection arrives on is the VM's identity. The
//! key store arrives with key release, so until then every key request is
//! refused with `not-permitted`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::time::{Instant as TokioInstant, timeout_at};
use vkx_common::errors::ErrorCode;
use vkx_common::policy::Policy;
use vkx_common::session::host::{
    DeriveAnswer, HANDSHAKE_DEADLINE, Host, HostConfig, HostEvent, PeerContext, SessionRandom,
    Verdict,
};
use vkx_common::session::transport::TLS_HANDSHAKE_TIMEOUT;
use vkx_common::session::{CloseReason, Output};
use vkx_common::wire::{
    FeatureState, Features, FrameDecoder, KeyName, Message, MessageType, PROTOCOL_VERSION_1,
    Purpose, ReleasedKey, VersionRange, VmId, encode_frame, feature,
};
use vkx_common::{rl_info, rl_warn};
use zeroize::Zeroizing;

use crate::admission::{
    AdmissionConfig, AdmissionControl, Decision, Limits, RefuseReason, Refused, Ticket,
};
use crate::attestation::{record_quote, verify_evidence};
use crate::derive::{self, DerivedKeys};
use crate::keystore::{DirKeyStore, KeyStore};
use crate::metrics::{EstablishedGuard, HandshakeOutcome, Metrics, MetricsConfig};
use crate::registry::Registry;
use crate::release;
use crate::vsock::{Admission, CidMap, VsockListenerConfig, admit};

/// Default connection limit: one per VM of a large node, with headroom.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// How long live sessions get to say goodbye at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Guests per second an orderly shutdown asks back: the `retry-after` of
/// each session's `goodbye` is drawn from `[R, R + sessions / this]`
/// (PROTOCOL.md §13.2), so a restarted host is not met by its whole node
/// at once.
pub const SHUTDOWN_RECONNECT_RATE: u64 = 8;
/// Longest spread of those `retry-after`s.
pub const MAX_SHUTDOWN_SPREAD: Duration = Duration::from_secs(300);
/// `retry-after` told to guests on feature refusals.
pub const FEATURE_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Most Unix listeners one host serves (one per VM in development).
pub const MAX_LISTENERS: usize = 4096;
/// Longest one batch of sends (and the close after it) may take: a guest
/// that stops reading cannot hold its connection by back-pressure.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a served connection holds its handshake slot: the TLS handshake
/// and the session's handshake both start at accept, and a send during the
/// handshake is cut at this bound too.
pub const MAX_HANDSHAKE_HOLD: Duration = TLS_HANDSHAKE_TIMEOUT.saturating_add(HANDSHAKE_DEADLINE);
/// After a refusal, how long the host keeps reading (and discarding) what
/// the guest still sends, until it closes: closing on its unread `hello`
/// could otherwise reset the connection before the error is read.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering after a refusal.
pub const MAX_LINGER_BYTES: usize = 64 * 1024;

/// `host.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The directory `vkx-host init` made.
    pub node_dir: PathBuf,
    pub registry: PathBuf,
    pub policy: PathBuf,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_reattest")]
    pub reattest_after_s: u32,
    /// `retry-after` in the `goodbye` live sessions get at shutdown: how
    /// long guests wait before reconnecting (plus up to 10 % jitter).
    /// Short for a quick restart; longer for a planned outage.
    #[serde(default = "default_shutdown_retry_after")]
    pub shutdown_retry_after_s: u32,
    /// Development transport: one socket per VM (PROTOCOL.md §2.4).
    #[serde(default)]
    pub unix_listener: Vec<UnixListenerConfig>,
    /// Hybrid vsock (Firecracker, Cloud Hypervisor, vhost-device-vsock):
    /// the guest's connections to host port P arrive on `<path>_<P>`
    /// (PROTOCOL.md §2.3.1); the socket is the VM's identity.
    #[serde(default)]
    pub hybrid_vsock: Vec<HybridVsockConfig>,
    /// AF_VSOCK (§2.2): listen on every CID at `port`; the peer's CID,
    /// set by the hypervisor, is the VM's identity.
    #[serde(default)]
    pub vsock: Option<VsockListenerConfig>,
    /// The key store directory; default `<node_dir>/keys`. Sealed under
    /// the node's master key (`<node_dir>/master.key`).
    #[serde(default)]
    pub key_store: Option<PathBuf>,
    /// Log level: error, warn, info (default), debug or trace. Even at
    /// trace, no key material and no raw peer bytes are logged.
    #[serde(default)]
    pub log_level: Option<String>,
    /// The local socket for derived keys (§9.4); none by default.
    #[serde(default)]
    pub local: Option<crate::derive::LocalConfig>,
    /// Admission control and rate limits (`[admission]`); every key has a
    /// default (see [`crate::admission`]).
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// The metrics endpoint (`[metrics]`); none without the table.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridVsockConfig {
    /// The VM's vsock Unix socket as the VMM names it (without `_<port>`).
    pub path: PathBuf,
    pub vm_id: String,
    #[serde(default = "default_port")]
    pub port: u32,
}

fn default_port() -> u32 {
    vkx_common::session::transport::VKX_PORT
}

impl HybridVsockConfig {
    /// The socket the host listens on: `<path>_<port>`.
    pub fn listen_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{}", self.port));
        PathBuf::from(p)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixListenerConfig {
    pub path: PathBuf,
    pub vm_id: String,
}

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

fn default_reattest() -> u32 {
    3600
}

fn default_shutdown_retry_after() -> u32 {
    30
}

/// Largest `shutdown_retry_after_s`: a day, the guests' own cap.
pub const MAX_SHUTDOWN_RETRY_AFTER_S: u32 = 24 * 3600;

impl ServeConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
        let c: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if let Some(v) = &c.vsock {
            v.validate()
                .map_err(|e| anyhow::anyhow!("{}: [vsock]: {e}", path.display()))?;
        }
        if let Some(l) = &c.log_level {
            l.parse::<tracing::Level>().map_err(|_| {
                anyhow::anyhow!("log_level {l:?}: use error, warn, info, debug or trace")
            })?;
        }
        let listeners =
            c.unix_listener.len() + c.hybrid_vsock.len() + usize::from(c.vsock.is_some());
        anyhow::ensure!(listeners > 0, "{}: no listener configured", path.display());
        anyhow::ensure!(
            listeners <= MAX_LISTENERS,
            "more than {MAX_LISTENERS} listeners"
        );
        anyhow::ensure!(
            (1..=65_536).contains(&c.max_connections),
            "max_connections must be 1..=65536"
        );
        anyhow::ensure!(
            (1..=MAX_SHUTDOWN_RETRY_AFTER_S).contains(&c.shutdown_retry_after_s),
            "shutdown_retry_after_s must be 1..={MAX_SHUTDOWN_RETRY_AFTER_S}"
        );
        c.limits()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if let Some(m) = &c.metrics {
            m.endpoint()
                .map_err(|e| anyhow::anyhow!("{}: [metrics]: {e}", path.display()))?;
        }
        Ok(c)
    }

    /// The checked admission limits.
    pub fn limits(&self) -> Result<Limits, crate::admission::AdmissionConfigError> {
        Limits::new(self.max_connections, &self.admission)
    }
}

struct Shared {
    tls: tokio_rustls::TlsAcceptor,
    keys: Option<Arc<DirKeyStore>>,
    key_versions: watch::Sender<Arc<BTreeMap<KeyName, u32>>>,
    derived: Arc<DerivedKeys>,
    registry: Registry,
    policy: Policy,
    config: Arc<HostConfig>,
    rng: SystemRandom,
    shutdown_retry_after: Duration,
    /// Set once when the shutdown starts: the spread of the sessions'
    /// `retry-after`s, from the number of sessions then.
    shutdown_spread_ms: AtomicU64,
    admission: Arc<AdmissionControl>,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn store(&self) -> Option<&dyn KeyStore> {
        self.keys.as_deref().map(|k| k as &dyn KeyStore)
    }

    /// The `retry-after` one session is told at shutdown.
    fn shutdown_retry_after(&self) -> Duration {
        let spread = Duration::from_millis(self.shutdown_spread_ms.load(Ordering::Relaxed));
        shutdown_retry_after(self.shutdown_retry_after, spread, self.draw())
    }

    /// A uniform 64-bit draw for jitter; without randomness, no jitter
    /// (the base `retry-after` still holds).
    fn draw(&self) -> u64 {
        let mut b = [0u8; 8];
        match self.rng.fill(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (cert, key) = crate::node::load(&config.node_dir)?;
    let tls = vkx_common::tls::server_config(cert, key)?;
    let master = crate::node::load_master_key(&config.node_dir)?;
    let store_dir = config
        .key_store
        .clone()
        .unwrap_or_else(|| config.node_dir.join(crate::keystore::DEFAULT_STORE_DIR));
    let store = Arc::new(DirKeyStore::open(&store_dir, master)?);
    let initial: BTreeMap<KeyName, u32> = store
        .list()?
        .into_iter()
        .map(|k| (k.name, k.current_version))
        .collect();
    let (key_versions, _) = watch::channel(Arc::new(initial));
    let limits = config
        .limits()
        .map_err(|e| anyhow::anyhow!("[admission]: {e}"))?;
    let admission = Arc::new(AdmissionControl::new(limits, std::time::Instant::now()));
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared {
        tls: tokio_rustls::TlsAcceptor::from(tls),
        keys: Some(store.clone()),
        key_versions,
        derived: Arc::new(DerivedKeys::default()),
        registry: Registry::open(&config.registry)?,
        policy: Policy::load(&config.policy)?,
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
        shutdown_spread_ms: AtomicU64::new(0),
        admission: admission.clone(),
        metrics: metrics.clone(),
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
        let vm_id = VmId::new(*vm)
            .map_err(|e| anyhow::anyhow!("listener {}: vm_id: {e}", path.display()))?;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| anyhow::anyhow!("listen on {}: {e}", path.display()))?;
        listeners.push(Listener::Unix(listener, vm_id));
    }
    if let Some(v) = &config.vsock {
        let map = v.cid_map()?;
        let listener = crate::vsock::bind(v)
            .map_err(|e| anyhow::anyhow!("listen on vsock port {}: {e}", v.port))?;
        listeners.push(Listener::Vsock {
            listener,
            map,
            require_privileged_port: v.require_privileged_port,
        });
    }
    let count = listeners.len();
    tasks.spawn(watch_key_versions(
        store,
        shared.key_versions.clone(),
        stop_rx.clone(),
    ));
    if let Some(local) = &config.local {
        let l = crate::derive::bind_local(&local.socket)
            .map_err(|e| anyhow::anyhow!("local socket {}: {e}", local.socket.display()))?;
        tasks.spawn(crate::derive::serve_local(
            l,
            local.clone(),
            shared.derived.clone(),
            stop_rx.clone(),
        ));
    }
    let metrics_socket = match config.metrics.as_ref().map(MetricsConfig::endpoint) {
        Some(Ok(endpoint)) => {
            let l = crate::metrics::bind(&endpoint)
                .await
                .map_err(|e| anyhow::anyhow!("metrics endpoint {endpoint:?}: {e}"))?;
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
        Some(Err(e)) => anyhow::bail!("[metrics]: {e}"),
        None => None,
    };
    for listener in listeners {
        tasks.spawn(accept_loop(listener, shared.clone(), stop_rx.clone()));
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

/// The spread of the shutdown `retry-after`s for `sessions` live
/// sessions: one guest per 1/[`SHUTDOWN_RECONNECT_RATE`] s, at most
/// [`MAX_SHUTDOWN_SPREAD`].
pub fn shutdown_spread(sessions: u64) -> Duration {
    Duration::from_millis(sessions.saturating_mul(1000) / SHUTDOWN_RECONNECT_RATE)
        .min(MAX_SHUTDOWN_SPREAD)
}

/// One session's shutdown `retry-after`: `base + U[0, spread]` from a
/// uniform 64-bit `draw`.
pub fn shutdown_retry_after(base: Duration, spread: Duration, draw: u64) -> Duration {
    let span = u64::try_from(spread.as_millis()).unwrap_or(u64::MAX);
    base + Duration::from_millis(draw % span.saturating_add(1))
}

/// A listening socket and how it names its peers.
enum Listener {
    /// Plain Unix or hybrid vsock: the socket is the VM (§2.3.1, §2.4).
    Unix(UnixListener, VmId),
    /// AF_VSOCK: the peer's CID is the VM (§2.2).
    Vsock {
        listener: tokio_vsock::VsockListener,
        map: CidMap,
        require_privileged_port: bool,
    },
}

/// Who is on the other end, as the transport says (§2.5).
#[derive(Debug, Clone)]
struct TransportPeer {
    /// `None`: the host cannot admit this peer by identity (§2.6).
    vm_id: Option<VmId>,
    cid: Option<u32>,
    /// How log lines name the peer: the vm-id, or e.g. `cid:17`.
    label: String,
}

impl TransportPeer {
    fn vm(vm_id: VmId) -> Self {
        Self {
            label: vm_id.as_str().to_owned(),
            vm_id: Some(vm_id),
            cid: None,
        }
    }
}

impl AsRef<str> for TransportPeer {
    fn as_ref(&self) -> &str {
        &self.label
    }
}

/// After an accept error (e.g. out of file descriptors), the listener
/// pauses this long instead of spinning.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

async fn accept_loop(listener: Listener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    let name = match &listener {
        Listener::Unix(_, vm) => vm.as_str().to_owned(),
        Listener::Vsock { .. } => "vsock".to_owned(),
    };
    // Runs until shutdown. Each iteration accepts one connection (which
    // admission control serves, refuses after TLS, or closes at once),
    // reaps one, or pauses after an accept error.
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                rl_warn!(peer: name, error = %e, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let accepted_at = std::time::Instant::now();
        let decision = shared
            .admission
            .admit(peer.as_ref(), accepted_at, || shared.draw());
        let shared = shared.clone();
        match decision {
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
                conns.spawn(async move {
                    match stream {
                        Accepted::Unix(s) => refuse(s, peer, refused, shared).await,
                        Accepted::Vsock(s) => refuse(s, peer, refused, shared).await,
                    }
                });
            }
            Decision::Admit(ticket) => {
                let stop = stop.clone();
                conns.spawn(async move {
                    let track = Tracker::new(ticket, accepted_at, shared.metrics.clone());
                    match stream {
                        Accepted::Unix(s) => connection(s, peer, track, shared, stop).await,
                        Accepted::Vsock(s) => connection(s, peer, track, shared, stop).await,
                    }
                });
            }
        }
    }
    while conns.join_next().await.is_some() {}
}

enum Accepted {
    Unix(UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, TransportPeer)> {
    match listener {
        Listener::Unix(l, vm) => {
            let (s, _) = l.accept().await?;
            Ok((Accepted::Unix(s), TransportPeer::vm(vm.clone())))
        }
        Listener::Vsock {
            listener,
            map,
            require_privileged_port,
        } => {
            let (s, addr) = listener.accept().await?;
            let admission = admit(map, addr.cid(), addr.port(), *require_privileged_port);
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

fn features() -> Features {
    [
        (feature::KEY_RELEASE, FeatureState::Enabled),
        (feature::KEY_DERIVATION, FeatureState::Enabled),
        (feature::KEY_ROTATION, FeatureState::Enabled),
    ]
    .into()
}

/// What one served connection counts, on every path out of it: the
/// handshake's outcome and latency, the established gauge, the errors
/// sent. Owns the connection's admission slots; dropping it releases them.
#[derive(Debug)]
struct Tracker {
    ticket: Ticket,
    accepted_at: std::time::Instant,
    metrics: Arc<Metrics>,
    /// How the handshake ends unless it reaches Established.
    outcome: HandshakeOutcome,
    established: Option<EstablishedGuard>,
}

impl Tracker {
    fn new(ticket: Ticket, accepted_at: std::time::Instant, metrics: Arc<Metrics>) -> Self {
        Self {
            ticket,
            accepted_at,
            metrics,
            outcome: HandshakeOutcome::Failed,
            established: None,
        }
    }

    fn sent_error(&mut self, code: ErrorCode) {
        self.metrics.error_sent(code);
        if self.ticket.in_handshake() {
            self.outcome = HandshakeOutcome::for_code(code);
        }
    }

    /// Gives the handshake slot back once the session is Established.
    fn check_established(&mut self, host: &Host) {
        if self.ticket.in_handshake() && matches!(host, Host::Established(_)) {
            self.ticket.established();
            self.metrics.handshake(HandshakeOutcome::Attested);
            self.metrics.handshake_latency(self.accepted_at.elapsed());
            self.established = Some(self.metrics.established());
        }
    }

    /// The deadline of a batch of sends starting now: [`WRITE_TIMEOUT`],
    /// and during the handshake no later than [`MAX_HANDSHAKE_HOLD`] after
    /// accept.
    fn write_deadline(&self) -> TokioInstant {
        let now = TokioInstant::now();
        let d = now + WRITE_TIMEOUT;
        if self.ticket.in_handshake() {
            d.min(TokioInstant::from_std(self.accepted_at) + MAX_HANDSHAKE_HOLD)
        } else {
            d
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.ticket.in_handshake() {
            self.metrics.handshake(self.outcome);
        }
    }
}

/// The code of an `error` payload this host encoded, if it is one: our
/// encoder writes the envelope as `[13, {...}]`, i.e. `0x82 0x0d`.
fn sent_error_code(payload: &[u8]) -> Option<ErrorCode> {
    if payload.get(..2)? != [0x82, MessageType::Error.code()] {
        return None;
    }
    match Message::decode(payload) {
        Ok(Message::Error(e)) => Some(e.code),
        _ => None,
    }
}

/// Sends `payloads` as frames and flushes, by `deadline`; `on_error` sees
/// the code of every `error` written. False: the connection is gone.
async fn send_all<W>(
    w: &mut W,
    payloads: &[Zeroizing<Vec<u8>>],
    deadline: TokioInstant,
    peer: &TransportPeer,
    mut on_error: impl FnMut(ErrorCode),
) -> bool
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let work = async {
        for payload in payloads {
            vkx_common::rl_log!(
                trace,
                peer: peer,
                bytes = payload.len(),
                msg_type = ?Message::envelope_type(payload),
                "frame sent"
            );
            let mut frame = Zeroizing::new(Vec::with_capacity(payload.len() + 4));
            if encode_frame(payload, &mut frame).is_err() || w.write_all(&frame).await.is_err() {
                return false;
            }
            if let Some(code) = sent_error_code(payload) {
                on_error(code);
            }
        }
        let _ = w.flush().await;
        true
    };
    match timeout_at(deadline, work).await {
        Ok(sent) => sent,
        Err(_) => {
            rl_warn!(peer: peer, "send timed out: the guest is not reading; closing");
            false
        }
    }
}

/// A connection admission control refused (§11.6, Accepted): TLS (bounded
/// by its timeout), then `busy` or `rate-limited` with the jittered
/// `retry-after` without reading `hello`, close, and a short linger so the
/// error is not lost to a reset. `refused` holds the connection's place
/// under the hard ceiling until the end.
async fn refuse<S>(stream: S, peer: TransportPeer, refused: Refused, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    let mut tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, shared.tls.accept(stream)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            rl_warn!(peer: peer, error = %e, "TLS handshake failed (refused connection)");
            metrics.handshake(HandshakeOutcome::Failed);
            return;
        }
        Err(_) => {
            rl_warn!(peer: peer, "TLS handshake timed out (refused connection)");
            metrics.handshake(HandshakeOutcome::Timeout);
            return;
        }
    };
    let (_, out) = Host::refuse(refused.refusal, refused.retry_after);
    let deadline = TokioInstant::now() + WRITE_TIMEOUT;
    let mut outcome = HandshakeOutcome::Failed;
    let sent = send_all(&mut tls, &out.send, deadline, &peer, |code| {
        metrics.error_sent(code);
        outcome = HandshakeOutcome::for_code(code);
    })
    .await;
    metrics.handshake(outcome);
    if sent && timeout_at(deadline, tls.shutdown()).await.is_ok() {
        let linger = async {
            let mut buf = [0u8; 1024];
            let mut left = MAX_LINGER_BYTES;
            while left > 0 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
    }
    drop(refused);
}

async fn connection<S>(
    stream: S,
    peer_id: TransportPeer,
    mut track: Tracker,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let vm_id = &peer_id;
    let accepted_at = track.accepted_at;
    let tls = match tokio::time::timeout_at(
        TokioInstant::from_std(accepted_at) + TLS_HANDSHAKE_TIMEOUT,
        shared.tls.accept(stream),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            rl_warn!(peer: vm_id, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            rl_warn!(peer: vm_id, "TLS handshake timed out");
            track.outcome = HandshakeOutcome::Timeout;
            return;
        }
    };
    let exporter = match vkx_common::tls::transcript_exporter(tls.get_ref().1) {
        Ok(x) => x,
        Err(e) => {
            rl_warn!(peer: vm_id, error = %e, "TLS exporter failed");
            return;
        }
    };
    let mut random = SessionRandom {
        host_nonce: [0; 32],
        session_id: [0; 16],
    };
    if shared.rng.fill(&mut random.host_nonce).is_err()
        || shared.rng.fill(&mut random.session_id).is_err()
    {
        rl_warn!(peer: vm_id, "no randomness: closing");
        return;
    }
    // A VM the policy does not know is served as unmapped: refused after
    // hello, opaquely.
    let selection = peer_id
        .vm_id
        .as_ref()
        .and_then(|vm| shared.policy.selection(vm).map(|s| (vm.clone(), s)));
    let peer = PeerContext {
        vm_id: selection.as_ref().map(|(vm, _)| vm.clone()),
        cid: peer_id.cid,
        selection: selection.map(|(_, s)| s).unwrap_or_default(),
        features: features(),
        accepted_at,
    };
    let mut host = Host::start(
        shared.config.clone(),
        peer,
        exporter,
        random,
        std::time::Instant::now(),
    );
    let mut tls = tls;
    let mut conn = ConnState::default();
    let mut versions = shared.key_versions.subscribe();
    let mut frames = FrameDecoder::new();
    let mut budget = shared.admission.message_bucket(std::time::Instant::now());
    let mut buf = vec![0u8; READ_CHUNK];
    // Each iteration consumes input, a timer expiry, a key rotation or the
    // stop signal; the session's deadlines bound how long it can wait.
    while let Some(deadline) = host.deadline() {
        let wake = TokioInstant::from_std(deadline);
        let out;
        tokio::select! {
            _ = stop.changed() => {
                let (h, o) = host.shutdown(shared.shutdown_retry_after());
                host = h;
                out = o;
            }
            _ = tokio::time::sleep_until(wake) => {
                let (h, o) = host.on_timeout(std::time::Instant::now());
                host = h;
                out = o;
            }
            Ok(()) = versions.changed() => {
                let current = versions.borrow_and_update().clone();
                out = push_rotations(&mut host, &mut conn, &current, &shared);
            }
            n = tls.read(&mut buf) => {
                let now = std::time::Instant::now();
                match n {
                    Ok(0) | Err(_) => {
                        if let Err(e) = frames.finish() {
                            rl_warn!(peer: vm_id, error = %e, "stream ended inside a frame");
                        }
                        let (h, o) = host.on_transport_closed();
                        host = h;
                        out = o;
                    }
                    Ok(n) => {
                        let mut input = &buf[..n];
                        let mut acc = Output::default();
                        // Every frame consumes at least one byte.
                        loop {
                            match frames.decode(&mut input) {
                                Ok(Some(payload)) => {
                                    vkx_common::rl_log!(
                                        trace,
                                        peer: vm_id,
                                        bytes = payload.len(),
                                        msg_type = ?Message::envelope_type(payload),
                                        "frame received"
                                    );
                                    // The message budget comes before the
                                    // session looks at the frame.
                                    let (h, o) = match budget.try_take(now) {
                                        Ok(()) => host.on_payload(payload, now),
                                        Err(wait) => {
                                            rl_warn!(peer: vm_id, "message rate exceeded: rate-limited");
                                            shared.metrics.session_rate_limited();
                                            let retry = shared.admission.retry_after(wait, shared.draw());
                                            host.rate_limited(retry)
                                        }
                                    };
                                    host = h;
                                    acc.absorb(o);
                                    if acc.close.is_some() { break; }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    rl_warn!(peer: vm_id, error = %e, "frame refused");
                                    acc.frame_error(&e);
                                    host = Host::Closed;
                                    break;
                                }
                            }
                        }
                        out = acc;
                    }
                }
            }
        }
        let closing = out.close.clone();
        let mut pending = out;
        // Local work the session asked for, answered at once: each event
        // yields at most one follow-up output, so this is bounded.
        for _ in 0..8 {
            let events = std::mem::take(&mut pending.events);
            if events.is_empty() {
                break;
            }
            for ev in events {
                let (h, o) = match ev {
                    // Quote verification and the registry write (an
                    // fsync) run on the blocking pool: a thousand guests
                    // attesting at once must not stall every other
                    // session on the runtime thread. At most
                    // `max_handshakes` run at once.
                    HostEvent::Verify {
                        vm_id,
                        transcript_hash,
                        selection,
                        evidence,
                    } => {
                        let s = shared.clone();
                        let verdict = tokio::task::spawn_blocking(move || {
                            verify_and_record(&s, &vm_id, &transcript_hash, &selection, &evidence)
                        })
                        .await
                        .unwrap_or(Verdict::LocalFailure);
                        host.on_verdict(verdict, std::time::Instant::now())
                    }
                    ev => handle_event(host, ev, &shared, &mut conn, tls.get_ref().1),
                };
                host = h;
                pending.absorb(o);
            }
        }
        let deadline = track.write_deadline();
        if !send_all(&mut tls, &pending.send, deadline, vm_id, |c| {
            track.sent_error(c)
        })
        .await
        {
            conn.forget(&shared);
            return;
        }
        track.check_established(&host);
        if let Some(reason) = closing.or(pending.close) {
            if let CloseReason::Failed(f) = reason {
                rl_info!(peer: vm_id, reason = ?f, "session closed");
            }
            let _ = timeout_at(deadline, tls.shutdown()).await;
            break;
        }
    }
    conn.forget(&shared);
}

/// What one connection remembers beyond its session state.
#[derive(Debug, Default)]
struct ConnState {
    /// Keys this guest holds, and their versions: rotation pushes go to
    /// these.
    released: BTreeMap<KeyName, u32>,
    /// Derived keys this session made available locally.
    derived: Vec<(VmId, Purpose)>,
}

impl ConnState {
    /// A derived key is specific to its connection (§9.4): it goes with it.
    fn forget(&mut self, shared: &Shared) {
        for (vm, purpose) in self.derived.drain(..) {
            shared.derived.remove(&vm, &purpose);
        }
    }
}

/// Pushes the new current version of every key this guest holds that
/// changed (§6.11), if the guest is still entitled to it. Bounded by the
/// keys the guest holds and by the session's outstanding-update limit.
fn push_rotations(
    host: &mut Host,
    conn: &mut ConnState,
    current: &BTreeMap<KeyName, u32>,
    shared: &Shared,
) -> Output<HostEvent> {
    let mut out = Output::default();
    let Host::Established(s) = host else {
        return out;
    };
    let (Some(store), Some(vm)) = (shared.store(), shared.policy.vm(s.vm_id())) else {
        return out;
    };
    let now = std::time::Instant::now();
    for (name, held) in &mut conn.released {
        if current.get(name).is_none_or(|v| v <= held) {
            continue;
        }
        let key = match release::entitled(store, vm, name) {
            Ok(k) => k,
            Err(why) => {
                rl_warn!(peer: vm.vm_id, key = %name, reason = %why, "rotation not pushed");
                continue;
            }
        };
        let version = key.version;
        let pushed = s.push_key_update(
            ReleasedKey {
                name: name.clone(),
                version,
                material: key.material,
            },
            now,
        );
        match pushed {
            Ok(o) => {
                shared.metrics.update_pushed();
                rl_info!(peer: vm.vm_id, key = %name, version, "key update pushed");
                // Not pushed again unless it changes again; the ack says
                // whether the guest installed it.
                *held = version;
                out.absorb(o);
            }
            Err(e) => rl_warn!(peer: vm.vm_id, key = %name, error = %e, "key update not pushed"),
        }
    }
    out
}

/// The verdict on one guest's evidence (registry AK, quote, policy), and
/// the accepted quote's counters recorded for rewind detection. Blocking:
/// file reads and an fsync.
fn verify_and_record(
    shared: &Shared,
    vm: &VmId,
    transcript_hash: &[u8; vkx_common::transcript::TRANSCRIPT_HASH_LEN],
    selection: &[vkx_common::wire::PcrBankSelection],
    evidence: &vkx_common::wire::Evidence,
) -> Verdict {
    match verify_evidence(
        &shared.registry,
        &shared.policy,
        vm,
        transcript_hash,
        selection,
        evidence,
    ) {
        Ok(accepted) => {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            match record_quote(&shared.registry, vm, &accepted.quote, unix) {
                Ok(Some(rewind)) => {
                    rl_warn!(peer: vm, rewind = %rewind, "TPM state rewound: snapshot restore or clone")
                }
                Ok(None) => {}
                Err(e) => rl_warn!(peer: vm, error = %e, "could not record the quote"),
            }
            rl_info!(peer: vm, "attested");
            Verdict::Accepted
        }
        Err(e) if e.is_local() => {
            rl_warn!(peer: vm, error = %e, "verification failed locally");
            Verdict::LocalFailure
        }
        Err(e) => {
            // The reason stays here; the guest learns only
            // attestation-failed.
            rl_warn!(peer: vm, reason = %e, "attestation refused");
            Verdict::Rejected
        }
    }
}

fn handle_event(
    host: Host,
    ev: HostEvent,
    shared: &Shared,
    conn: &mut ConnState,
    tls: &rustls::ServerConnection,
) -> (Host, Output<HostEvent>) {
    match ev {
        HostEvent::Verify { .. } => {
            // Answered by the caller on the blocking pool.
            (host, Output::default())
        }
        HostEvent::KeyRequest { vm_id, names } => {
            let mut host = host;
            let mut out = Output::default();
            if let (Host::Established(s), Some(vm)) = (&mut host, shared.policy.vm(&vm_id)) {
                let (answer, versions) = release::decide(shared.store(), vm, names);
                shared.metrics.keys_released(answer.released.len());
                conn.released.extend(versions);
                out = s.answer_keys(answer);
            }
            (host, out)
        }
        HostEvent::DeriveRequest {
            vm_id,
            purpose,
            length,
            guest_tag,
        } => {
            let mut host = host;
            let mut out = Output::default();
            let mut open = true;
            if let Host::Established(s) = &mut host {
                let answer =
                    derive::answer(tls, shared.policy.vm(&vm_id), &purpose, length, &guest_tag);
                let reply = match answer {
                    derive::Answer::Confirm { key, host_tag } => {
                        shared.derived.insert(&vm_id, &purpose, key);
                        conn.derived.push((vm_id.clone(), purpose.clone()));
                        rl_info!(peer: vm_id, purpose = %purpose, "derived key confirmed");
                        DeriveAnswer::Confirm(host_tag)
                    }
                    derive::Answer::NotPermitted => {
                        rl_warn!(peer: vm_id, purpose = %purpose, "derivation purpose not granted");
                        DeriveAnswer::NotPermitted
                    }
                    derive::Answer::TagMismatch => {
                        rl_warn!(peer: vm_id, purpose = %purpose, "derivation tags differ: not the same channel");
                        DeriveAnswer::TagMismatch
                    }
                };
                let (o, oo) = s.answer_derive(reply);
                open = o;
                out = oo;
            }
            (if open { host } else { Host::Closed }, out)
        }
        HostEvent::UpdateAcked {
            vm_id,
            name,
            version,
            error,
            ..
        } => {
            shared.metrics.update_acked(error.is_none());
            match error {
                None => rl_info!(peer: vm_id, key = %name, version, "key update installed"),
                Some(code) => {
                    rl_warn!(peer: vm_id, key = %name, version, code = %code, "key update not installed")
                }
            }
            (host, Output::default())
        }
        HostEvent::Attested { .. } => (host, Output::default()),
    }
}

/// How often `serve` looks at the key store for rotated keys: a rotation
/// reaches live guests within this (plus the push itself).
pub const KEY_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Publishes the store's current versions whenever they change. One
/// listing per interval (no decryption), whatever the number of sessions;
/// each session then pushes to its own guest.
async fn watch_key_versions(
    store: Arc<DirKeyStore>,
    tx: watch::Sender<Arc<BTreeMap<KeyName, u32>>>,
    stop: watch::Receiver<bool>,
) {
    let poll = move || {
        let store = store.clone();
        async move {
            match tokio::task::spawn_blocking(move || store.list()).await {
                Ok(Ok(keys)) => Some(Arc::new(
                    keys.into_iter()
                        .map(|k| (k.name, k.current_version))
                        .collect::<BTreeMap<KeyName, u32>>(),
                )),
                Ok(Err(e)) => {
                    rl_warn!(error = %e, "key store listing failed");
                    None
                }
                Err(_) => None,
            }
        }
    };
    crate::publish::poll_and_publish(KEY_POLL_INTERVAL, poll, tx, stop).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn load(extra: &str) -> anyhow::Result<ServeConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(
            &path,
            format!("node_dir = \"/n\"\nregistry = \"/r\"\npolicy = \"/p\"\n{extra}"),
        )
        .unwrap();
        ServeConfig::load(&path)
    }

    #[test]
    fn each_transport_alone_is_a_listener() {
        assert!(load("").is_err(), "no listener at all");
        let c = load("[vsock]\nvm = [ { cid = 17, vm_id = \"vm-17\" } ]\n").unwrap();
        let v = c.vsock.unwrap();
        assert_eq!(v.port, vkx_common::session::transport::VKX_PORT);
        assert!(!v.require_privileged_port);
        assert_eq!(v.cid_map().unwrap().get(17).unwrap().as_str(), "vm-17");
        let c = load("[[hybrid_vsock]]\npath = \"/run/vm.vsock\"\nvm_id = \"vm-1\"\n").unwrap();
        assert_eq!(
            c.hybrid_vsock[0].listen_path(),
            PathBuf::from("/run/vm.vsock_7861")
        );
        assert_eq!(c.shutdown_retry_after_s, 30);
    }

    #[test]
    fn shutdown_spreads_the_reconnections_by_the_number_of_sessions() {
        assert_eq!(shutdown_spread(0), Duration::ZERO);
        assert_eq!(shutdown_spread(1), Duration::from_millis(125));
        assert_eq!(shutdown_spread(1024), Duration::from_secs(128));
        assert_eq!(shutdown_spread(1_000_000), MAX_SHUTDOWN_SPREAD);
        let base = Duration::from_secs(30);
        assert_eq!(shutdown_retry_after(base, Duration::ZERO, u64::MAX), base);
        let spread = shutdown_spread(1024);
        let mut draw = 0x1234_5678_9abc_def0_u64;
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for _ in 0..4096 {
            draw = draw
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let r = shutdown_retry_after(base, spread, draw);
            assert!(r >= base && r <= base + spread, "{r:?}");
            lo = lo.min(r);
            hi = hi.max(r);
        }
        assert!(lo < base + Duration::from_secs(1) && hi > base + Duration::from_secs(127));
    }

    #[test]
    fn refuses_what_makes_no_sense() {
        for bad in [
            "[vsock]\nport = 80\nvm = [ { cid = 17, vm_id = \"vm-17\" } ]\n",
            "[vsock]\nvm = [ { cid = 2, vm_id = \"vm-17\" } ]\n",
            "[vsock]\nvm = [ { cid = 17, vm_id = \"a\" }, { cid = 17, vm_id = \"b\" } ]\n",
            "[vsock]\nvm = [ { cid = 17, vm_id = \"vm-17\" } ]\nports = 1\n",
            "shutdown_retry_after_s = 0\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
            "max_connections = 0\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }

    const UNIX: &str = "[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n";

    #[test]
    fn admission_and_metrics_have_safe_defaults() {
        let c = load(UNIX).unwrap();
        let l = c.limits().unwrap();
        assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(l.max_open, 2 * DEFAULT_MAX_CONNECTIONS);
        assert_eq!(l.max_handshakes, crate::admission::DEFAULT_MAX_HANDSHAKES);
        assert!(c.metrics.is_none(), "no endpoint unless configured");
        let c = load(&format!(
            "max_connections = 10\n[admission]\nmax_handshakes = 3\nmax_open = 12\n\
             busy_retry_after_ms = 900\n[metrics]\n{UNIX}"
        ))
        .unwrap();
        let l = c.limits().unwrap();
        assert_eq!((l.max_handshakes, l.max_open), (3, 12));
        assert_eq!(l.busy_retry_after, Duration::from_millis(900));
        assert_eq!(
            c.metrics.unwrap().endpoint().unwrap(),
            crate::metrics::Endpoint::Unix(PathBuf::from(crate::metrics::DEFAULT_METRICS_SOCKET))
        );
        let c = load(&format!(
            "[metrics]\nlisten = \"0.0.0.0:9461\"\nallow_non_loopback = true\n{UNIX}"
        ))
        .unwrap();
        assert!(c.metrics.is_some());
    }

    #[test]
    fn refuses_admission_and_metrics_that_make_no_sense() {
        for bad in [
            "[admission]\nmax_handshakes = 0\n",
            "[admission]\nbogus = 1\n",
            "max_connections = 10\n[admission]\nmax_open = 9\n",
            "[admission]\nretry_jitter_percent = 500\n",
            "[admission]\npeer_connection_refill_ms = 0\n",
            "[metrics]\nlisten = \"0.0.0.0:9461\"\n",
            "[metrics]\nlisten = \"localhost:9461\"\n",
            "[metrics]\nsocket = \"/m\"\nlisten = \"127.0.0.1:9461\"\n",
            "[metrics]\nport = 1\n",
        ] {
            assert!(load(&format!("{bad}{UNIX}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_sent_are_recognised_by_their_envelope() {
        use vkx_common::session::host::Refusal;
        let (_, out) = Host::refuse(Refusal::Busy, Duration::from_secs(5));
        assert_eq!(sent_error_code(&out.send[0]), Some(ErrorCode::Busy));
        let pong = Message::Pong(vkx_common::wire::Pong { sequence: 13 })
            .encode()
            .unwrap();
        assert_eq!(sent_error_code(&pong), None);
        assert_eq!(sent_error_code(&[]), None);
        assert_eq!(sent_error_code(&[0x82, 0x0d]), None);
    }

    #[test]
    fn the_handshake_hold_is_bounded_by_the_tls_and_session_deadlines() {
        assert_eq!(
            MAX_HANDSHAKE_HOLD,
            TLS_HANDSHAKE_TIMEOUT + HANDSHAKE_DEADLINE
        );
        // A session started at accept never waits past HANDSHAKE_DEADLINE
        // in a handshake state, whatever arrives (one byte at a time or
        // nothing at all).
        let t0 = std::time::Instant::now();
        let host = Host::start(
            Arc::new(HostConfig {
                versions: VersionRange {
                    min: PROTOCOL_VERSION_1,
                    max: PROTOCOL_VERSION_1,
                },
                reattest_after_s: 3600,
                feature_retry_after: FEATURE_RETRY_AFTER,
            }),
            PeerContext {
                vm_id: None,
                cid: None,
                selection: Vec::new(),
                features: features(),
                accepted_at: t0,
            },
            [0; 32],
            SessionRandom {
                host_nonce: [0; 32],
                session_id: [0; 16],
            },
            t0 + TLS_HANDSHAKE_TIMEOUT,
        );
        assert!(host.deadline().unwrap() <= t0 + HANDSHAKE_DEADLINE);
    }
}
