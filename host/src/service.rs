//! The host agent's shared service context and its answers to session
//! events: what every connection of `serve` reads (TLS acceptor, registry,
//! policy, key store, derived-key table, admission control, metrics) and
//! the local work a session asks for (verify evidence, release keys,
//! confirm a derivation, push rotations, record update acks).
//!
//! Nothing here does socket I/O: the connection driver
//! (`connection`) feeds the session and sends what these answers
//! return. Verification and the registry write block (file reads, an
//! fsync): the driver runs them on the blocking pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;
use vkx_common::errors::ErrorCode;
use vkx_common::session::Output;
use vkx_common::session::host::{DeriveAnswer, Host, HostConfig, HostEvent, Verdict};
use vkx_common::wire::{FeatureState, Features, KeyName, Purpose, ReleasedKey, VmId, feature};
use vkx_common::{rl_info, rl_warn};

use crate::admission::AdmissionControl;
use crate::attestation::{record_quote, verify_evidence};
use crate::derive::{self, DerivedKeys};
use crate::health::{DrillCounters, RingCounters};
use crate::keystore::{CachedKeys, KeyStore};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::release;
use crate::rollout::{Feature, View};
use crate::trust::{Proof, Trust};

/// Guests per second an orderly shutdown asks back: the `retry-after` of
/// each session's `goodbye` is drawn from `[R, R + sessions / this]`
/// (PROTOCOL.md §13.2), so a restarted host is not met by its whole node
/// at once.
pub const SHUTDOWN_RECONNECT_RATE: u64 = 8;
/// Longest spread of those `retry-after`s.
pub const MAX_SHUTDOWN_SPREAD: Duration = Duration::from_secs(300);
/// `retry-after` told to guests on feature refusals.
pub const FEATURE_RETRY_AFTER: Duration = Duration::from_secs(30);

pub(crate) struct Shared {
    /// The TLS configuration (`connection::tls_accept`).
    pub(crate) tls: Arc<rustls::ServerConfig>,
    /// The key store, each key's current version decrypted once
    /// ([`CachedKeys`]).
    pub(crate) keys: Arc<CachedKeys>,
    pub(crate) key_versions: watch::Sender<Arc<BTreeMap<KeyName, u32>>>,
    pub(crate) derived: Arc<DerivedKeys>,
    pub(crate) registry: Registry,
    /// The policy and CID map in force, replaced whole by a reload
    /// (`reload`); read it with [`Shared::trust`].
    pub(crate) trust: watch::Sender<Arc<Trust>>,
    pub(crate) config: Arc<HostConfig>,
    pub(crate) rng: SystemRandom,
    pub(crate) shutdown_retry_after: Duration,
    /// Set once when the shutdown starts: the spread of the sessions'
    /// `retry-after`s, from the number of sessions then.
    pub(crate) shutdown_spread_ms: AtomicU64,
    pub(crate) admission: Arc<AdmissionControl>,
    pub(crate) metrics: Arc<Metrics>,
    /// The rollout state every session resolves its feature map from.
    pub(crate) rollout: watch::Receiver<Arc<View>>,
    /// host.toml `on_rewind` (§15.8).
    pub(crate) on_rewind: crate::config::OnRewind,
    /// The live sessions of each VM, to tell them to re-attest.
    pub(crate) vm_sessions: VmSessions,
    /// One lock per VM around the quote record's read-modify-write.
    pub(crate) quote_locks: QuoteLocks,
}

/// `retry-after` of the `goodbye(reattest)` that sends a session to
/// re-attest (another session of its VM showed a rewound TPM, or a reload
/// no longer allows it); a reload that ends many sessions spreads their
/// returns over [`shutdown_spread`] above it.
pub const REATTEST_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a live session is sent to re-attest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reattest {
    /// Another session of its VM showed a rewound TPM (§15.8).
    Rewind,
    /// A reload no longer allows it ([`crate::trust::allows`]); the
    /// guests it sends back return spread over `spread`.
    Reload { spread: Duration },
}

/// One registered session: its id, its re-attest flag, what it proved.
#[derive(Debug)]
struct Registered {
    id: u64,
    tx: watch::Sender<Option<Reattest>>,
    proof: Proof,
}

type SessionsByVm = BTreeMap<VmId, Vec<Registered>>;

/// The live (Established) sessions of each VM: each registers a channel
/// that, when set, makes it say `goodbye(reattest)` and close, so the
/// guest re-attests. Bounded by the connections admitted.
#[derive(Debug, Default)]
pub(crate) struct VmSessions {
    /// The last id given, and each VM's sessions.
    inner: std::sync::Mutex<(u64, SessionsByVm)>,
}

/// A session's place in [`VmSessions`]; leaves it when dropped.
#[derive(Debug)]
pub(crate) struct VmSession<'a> {
    table: &'a VmSessions,
    vm: VmId,
    id: u64,
    /// Set when the session must re-attest, and why.
    pub(crate) reattest: watch::Receiver<Option<Reattest>>,
}

impl VmSessions {
    /// Registers a session of `vm` that proved `proof`, its grants taken
    /// from the trust in force, which also decides whether it may stay:
    /// under the table's lock, so a reload published meanwhile is seen
    /// either here or by its own pass over the table.
    pub(crate) fn register(
        &self,
        vm: &VmId,
        mut proof: Proof,
        trust: &watch::Sender<Arc<Trust>>,
    ) -> VmSession<'_> {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = trust.borrow().clone();
        if let Some(p) = now.policy.vm(vm) {
            proof.keys.clone_from(&p.keys);
            proof.derive.clone_from(&p.derive);
        }
        let flag = crate::trust::allows(&now, vm, &proof)
            .err()
            .map(|_| Reattest::Reload {
                spread: Duration::ZERO,
            });
        let (tx, rx) = watch::channel(flag);
        g.0 += 1;
        let id = g.0;
        // A VM mostly holds one session: room for one, not the four a
        // first push would make.
        g.1.entry(vm.clone())
            .or_insert_with(|| Vec::with_capacity(1))
            .push(Registered { id, tx, proof });
        VmSession {
            table: self,
            vm: vm.clone(),
            id,
            reattest: rx,
        }
    }

    /// Tells every live session of `vm` to re-attest; how many.
    pub(crate) fn reattest_all(&self, vm: &VmId) -> usize {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.1.get(vm).map_or(0, |list| {
            for r in list {
                r.tx.send_replace(Some(Reattest::Rewind));
            }
            list.len()
        })
    }

    /// Tells every live session `trust` no longer allows to re-attest,
    /// their returns spread by their number ([`shutdown_spread`]).
    pub(crate) fn reattest_disallowed(&self, trust: &Trust) -> crate::trust::Ended {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ended = crate::trust::Ended::default();
        let mut told = Vec::new();
        for (vm, list) in &g.1 {
            for r in list {
                if let Err(why) = crate::trust::allows(trust, vm, &r.proof) {
                    ended.note(vm, why);
                    told.push(&r.tx);
                }
            }
        }
        let spread = shutdown_spread(told.len() as u64);
        for tx in told {
            tx.send_replace(Some(Reattest::Reload { spread }));
        }
        ended
    }

    #[cfg(test)]
    fn live(&self, vm: &VmId) -> usize {
        let g = self.inner.lock().unwrap();
        g.1.get(vm).map_or(0, Vec::len)
    }
}

impl Drop for VmSession<'_> {
    fn drop(&mut self) {
        let mut g = self
            .table
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = g.1.get_mut(&self.vm) {
            list.retain(|r| r.id != self.id);
            if list.is_empty() {
                g.1.remove(&self.vm);
            }
        }
    }
}

/// One mutex per VM (created on first use; a VM reaches this only once
/// its evidence verified against its registry entry, so the map is
/// bounded by the registry).
#[derive(Debug, Default)]
pub(crate) struct QuoteLocks {
    inner: std::sync::Mutex<BTreeMap<VmId, Arc<std::sync::Mutex<()>>>>,
}

impl QuoteLocks {
    pub(crate) fn of(&self, vm: &VmId) -> Arc<std::sync::Mutex<()>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(vm.clone())
            .or_default()
            .clone()
    }
}

impl Shared {
    /// The policy and CID map in force now.
    pub(crate) fn trust(&self) -> Arc<Trust> {
        self.trust.borrow().clone()
    }

    /// The feature map `vm` gets under `view`: what the session announces
    /// (challenge, `feature-update`) and enforces. A peer the policy does
    /// not know gets none (it is refused after hello anyway).
    pub(crate) fn feature_map(&self, view: &View, vm: Option<&VmId>) -> Features {
        match vm {
            Some(vm) => view.features_for(vm, self.trust().policy.vm(vm).map(|p| p.image.as_str())),
            None => Features::new(),
        }
    }

    /// The health counters of `vm`'s ring under `view`.
    pub(crate) fn ring(&self, view: &View, vm: Option<&VmId>) -> Arc<RingCounters> {
        let trust = self.trust();
        let image = vm
            .and_then(|v| trust.policy.vm(v))
            .map(|p| p.image.as_str());
        self.metrics.health.ring(view, vm, image)
    }

    pub(crate) fn store(&self) -> &dyn KeyStore {
        self.keys.as_ref()
    }

    /// The `retry-after` one session is told at shutdown.
    pub(crate) fn shutdown_retry_after(&self) -> Duration {
        let spread = Duration::from_millis(self.shutdown_spread_ms.load(Ordering::Relaxed));
        shutdown_retry_after(self.shutdown_retry_after, spread, self.draw())
    }

    /// A uniform 64-bit draw for jitter; without randomness, no jitter
    /// (the base `retry-after` still holds).
    pub(crate) fn draw(&self) -> u64 {
        let mut b = [0u8; 8];
        match self.rng.fill(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }
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

/// What one connection remembers beyond its session state.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    /// Keys this guest holds, and their versions: rotation pushes go to
    /// these.
    pub(crate) released: BTreeMap<KeyName, u32>,
    /// Derived keys this session made available locally.
    pub(crate) derived: Vec<(VmId, Purpose)>,
    /// This session's id (`attestation-result`): derived keys are held
    /// per session (§9.4).
    pub(crate) session_id: [u8; 16],
    /// The health counters of the VM's ring under the document the
    /// session last saw (`crate::health`).
    pub(crate) ring: Arc<RingCounters>,
    /// The live drill that took a feature away from this session, while
    /// it stays away: its later requests for it are counted there.
    pub(crate) drill: Option<Arc<DrillCounters>>,
}

impl ConnState {
    /// A derived key is specific to its connection (§9.4): it goes with it.
    pub(crate) fn forget(&mut self, shared: &Shared) {
        for (vm, purpose) in self.derived.drain(..) {
            shared.derived.remove(&vm, &purpose, self.session_id);
        }
    }
}

/// Pushes the new current version of every key this guest holds that
/// changed (§6.11), if the guest is still entitled to it and key rotation
/// is enabled in the session's map (`features`; §12.2). While rotation is
/// off nothing is decrypted, pushed or logged, and the versions stay
/// unmarked, so the guest gets them when rotation comes back on. Bounded
/// by the keys the guest holds and by the session's outstanding-update
/// limit.
pub(crate) fn push_rotations(
    host: &mut Host,
    conn: &mut ConnState,
    current: &BTreeMap<KeyName, u32>,
    features: &Features,
    shared: &Shared,
) -> Output<HostEvent> {
    let mut out = Output::default();
    let Host::Established(s) = host else {
        return out;
    };
    if features.get(&feature::KEY_ROTATION) != Some(&FeatureState::Enabled) {
        return out;
    }
    let trust = shared.trust();
    let store = shared.store();
    let Some(vm) = trust.policy.vm(s.vm_id()) else {
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
                conn.ring.request(Feature::KeyRotation);
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
pub(crate) fn verify_and_record(
    shared: &Shared,
    vm: &VmId,
    transcript_hash: &[u8; vkx_common::transcript::TRANSCRIPT_HASH_LEN],
    selection: &[vkx_common::wire::PcrBankSelection],
    evidence: &vkx_common::wire::Evidence,
) -> Verdict {
    match verify_evidence(
        &shared.registry,
        &shared.trust().policy,
        vm,
        transcript_hash,
        selection,
        evidence,
    ) {
        Ok(accepted) => {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let refuse = shared.on_rewind == crate::config::OnRewind::Refuse;
            // Two sessions of one VM attesting at once: their records in
            // order, each compared with the other's.
            let lock = shared.quote_locks.of(vm);
            let recorded = {
                let _held = lock
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                record_quote(&shared.registry, vm, &accepted.quote, unix, refuse)
            };
            match recorded {
                Ok(Some(rewind)) => {
                    shared.metrics.rewind(refuse);
                    let others = shared.vm_sessions.reattest_all(vm);
                    if refuse {
                        rl_warn!(
                            peer: vm,
                            rewind = %rewind,
                            others_reattest = others,
                            "TPM state rewound (snapshot restore or clone): refused; `vkx-host vtpm accept-rewind` accepts the restored state"
                        );
                        return Verdict::Rejected;
                    }
                    rl_warn!(
                        peer: vm,
                        rewind = %rewind,
                        others_reattest = others,
                        "TPM state rewound (snapshot restore or clone): flagged, served (on_rewind = flag)"
                    );
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

pub(crate) fn handle_event(
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
            let trust = shared.trust();
            if let (Host::Established(s), Some(vm)) = (&mut host, trust.policy.vm(&vm_id)) {
                let (answer, versions) = release::decide(shared.store(), vm, names);
                shared.metrics.keys_released(answer.released.len());
                match answer.refused.first() {
                    None => conn.ring.grant(Feature::KeyRelease),
                    Some(r) => conn.ring.refusal(Feature::KeyRelease, r.code),
                }
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
                let trust = shared.trust();
                let answer =
                    derive::answer(tls, trust.policy.vm(&vm_id), &purpose, length, &guest_tag);
                let reply = match answer {
                    derive::Answer::Confirm { key, host_tag } => {
                        shared
                            .derived
                            .insert(&vm_id, &purpose, conn.session_id, key);
                        conn.derived.push((vm_id.clone(), purpose.clone()));
                        rl_info!(peer: vm_id, purpose = %purpose, "derived key confirmed");
                        conn.ring.grant(Feature::KeyDerivation);
                        DeriveAnswer::Confirm(host_tag)
                    }
                    derive::Answer::NotPermitted => {
                        rl_warn!(peer: vm_id, purpose = %purpose, "derivation purpose not granted");
                        conn.ring
                            .refusal(Feature::KeyDerivation, ErrorCode::NotPermitted);
                        DeriveAnswer::NotPermitted
                    }
                    derive::Answer::TagMismatch => {
                        rl_warn!(peer: vm_id, purpose = %purpose, "derivation tags differ: not the same channel");
                        conn.ring
                            .refusal(Feature::KeyDerivation, ErrorCode::AttestationFailed);
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
                None => conn.ring.grant(Feature::KeyRotation),
                Some(code) => conn.ring.refusal(Feature::KeyRotation, code),
            }
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
pub(crate) async fn watch_key_versions(
    store: Arc<CachedKeys>,
    tx: watch::Sender<Arc<BTreeMap<KeyName, u32>>>,
    stop: watch::Receiver<bool>,
) {
    let poll = move || {
        let store = store.clone();
        async move {
            // The cache is brought to the new versions before they are
            // published: the sessions they wake find them decrypted.
            let listed = tokio::task::spawn_blocking(move || {
                store.list().map(|keys| {
                    let versions = keys
                        .into_iter()
                        .map(|k| (k.name, k.current_version))
                        .collect::<BTreeMap<KeyName, u32>>();
                    store.refresh(&versions);
                    versions
                })
            });
            match listed.await {
                Ok(Ok(versions)) => Some(Arc::new(versions)),
                Ok(Err(e)) => {
                    rl_warn!(error = %e, "key store listing failed");
                    None
                }
                Err(_) => None,
            }
        }
    };
    // The receivers are the live sessions, which come and go: with none at
    // a poll (a host started before its guests boot, or restarted while
    // they back off), poll_and_publish would take the closed channel for
    // "nobody listens any more" and stop for good, and no later rotation
    // would ever reach a guest. Seen in a real VM (make vm-test). This
    // receiver keeps the watch alive until `stop`.
    let _alive = tx.subscribe();
    crate::publish::poll_and_publish(KEY_POLL_INTERVAL, poll, tx, stop).await;
}

#[cfg(test)]
mod key_watch_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keystore::{AllowList, DirKeyStore, MASTER_KEY_LEN, MasterKey, validate_key_name};
    use vkx_common::wire::KeyMaterial;
    use zeroize::Zeroizing;

    /// Regression: `serve` keeps no receiver of the key versions; with no
    /// session at the watcher's first look (the host starts before its
    /// VMs boot), the watcher stopped, and a rotation made later never
    /// reached the guest that connected afterwards.
    #[tokio::test]
    async fn a_rotation_reaches_a_session_that_connected_after_a_poll_without_any() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(
            DirKeyStore::open(
                &dir.path().join("keys"),
                MasterKey::new(Zeroizing::new([7; MASTER_KEY_LEN])),
            )
            .unwrap(),
        );
        let disk = validate_key_name("disk").unwrap();
        inner
            .add(
                &disk,
                &KeyMaterial::new(vec![1; 32]),
                &AllowList::new(&["vm-1"], &[] as &[&str]).unwrap(),
            )
            .unwrap();
        let store = Arc::new(CachedKeys::new(inner.clone()));
        let initial: BTreeMap<KeyName, u32> = [(disk.clone(), 1)].into();
        // As serve makes it: the initial receiver is dropped at once.
        let (tx, _) = watch::channel(Arc::new(initial));
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher = tokio::spawn(watch_key_versions(store, tx.clone(), stop_rx));
        // At least one look with no session at all.
        tokio::time::sleep(KEY_POLL_INTERVAL * 2).await;
        let mut session = tx.subscribe();
        inner.rotate(&disk, None).unwrap();
        tokio::time::timeout(KEY_POLL_INTERVAL * 3, session.changed())
            .await
            .expect("the rotation was not published within three polls")
            .unwrap();
        assert_eq!(session.borrow().get(&disk), Some(&2));
        stop_tx.send(true).unwrap();
        watcher.await.unwrap();
    }
}

#[cfg(test)]
mod vm_session_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// vm-1 and vm-2 with PCR sha256:7 in `vm1` and `vm2`.
    fn trust_of(vm1: &str, vm2: &str) -> watch::Sender<Arc<Trust>> {
        let policy = crate::policy::Policy::from_toml(&format!(
            "[[image]]\nname = \"img\"\nkeys = [\"disk\"]\n\
             [[vm]]\nid = \"vm-1\"\nimage = \"img\"\n\
             [[vm.pcr]]\nbank = \"sha256\"\nindex = 7\nallowed = [\"{vm1}\"]\n\
             [[vm]]\nid = \"vm-2\"\nimage = \"img\"\n\
             [[vm.pcr]]\nbank = \"sha256\"\nindex = 7\nallowed = [\"{vm2}\"]\n"
        ))
        .unwrap();
        watch::channel(Arc::new(Trust {
            policy,
            cid_map: crate::vsock::CidMap::default(),
        }))
        .0
    }

    fn proof(pcr7: &str) -> Proof {
        Proof {
            pcrs: vec![vkx_common::wire::PcrBankValues {
                hash_alg: vkx_common::wire::HashAlg::Sha256,
                values: BTreeMap::from([(7, hex::decode(pcr7).unwrap())]),
            }],
            ..Proof::default()
        }
    }

    #[test]
    fn every_live_session_of_the_vm_is_told_and_leaves_when_dropped() {
        let t = VmSessions::default();
        let trust = trust_of(A, A);
        let vm = VmId::new("vm-1").unwrap();
        let other = VmId::new("vm-2").unwrap();
        let a = t.register(&vm, proof(A), &trust);
        let b = t.register(&vm, proof(A), &trust);
        let c = t.register(&other, proof(A), &trust);
        assert_eq!(t.live(&vm), 2);
        assert_eq!(t.reattest_all(&vm), 2);
        assert_eq!(*a.reattest.borrow(), Some(Reattest::Rewind));
        assert_eq!(*b.reattest.borrow(), Some(Reattest::Rewind));
        assert_eq!(
            *c.reattest.borrow(),
            None,
            "another VM's session is left alone"
        );
        drop(a);
        assert_eq!(t.live(&vm), 1);
        drop(b);
        assert_eq!(t.live(&vm), 0);
        assert_eq!(t.reattest_all(&vm), 0);
        drop(c);
        assert!(t.inner.lock().unwrap().1.is_empty());
    }

    #[test]
    fn a_reload_sends_back_exactly_the_sessions_it_no_longer_allows() {
        let t = VmSessions::default();
        let trust = trust_of(A, A);
        let vm1 = VmId::new("vm-1").unwrap();
        let vm2 = VmId::new("vm-2").unwrap();
        let a = t.register(&vm1, proof(A), &trust);
        let b = t.register(&vm1, proof(A), &trust);
        let c = t.register(&vm2, proof(A), &trust);
        // Registered with the grants in force.
        let disk = KeyName::new("disk").unwrap();
        assert!(
            t.inner.lock().unwrap().1[&vm1][0]
                .proof
                .keys
                .contains(&disk)
        );
        // vm-1's PCR 7 value revoked; vm-2's kept.
        let revoked = trust_of(B, A);
        let ended = t.reattest_disallowed(&revoked.borrow());
        assert_eq!(ended.count, 2);
        assert!(ended.named.iter().all(|(vm, _)| vm == &vm1));
        let spread = shutdown_spread(2);
        assert_eq!(*a.reattest.borrow(), Some(Reattest::Reload { spread }));
        assert_eq!(*b.reattest.borrow(), Some(Reattest::Reload { spread }));
        assert_eq!(*c.reattest.borrow(), None);
        // The same trust again ends nothing more than it did.
        drop((a, b));
        assert_eq!(t.reattest_disallowed(&revoked.borrow()).count, 0);
        // A session that registers after the reload was published (its
        // evidence verified under the old policy) is flagged at once.
        let late = t.register(&vm1, proof(A), &revoked);
        assert!(matches!(
            *late.reattest.borrow(),
            Some(Reattest::Reload { .. })
        ));
        drop((c, late));
    }

    #[test]
    fn one_quote_lock_per_vm() {
        let l = QuoteLocks::default();
        let vm = VmId::new("vm-1").unwrap();
        assert!(Arc::ptr_eq(&l.of(&vm), &l.of(&vm)));
        assert!(!Arc::ptr_eq(&l.of(&vm), &l.of(&VmId::new("vm-2").unwrap())));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
