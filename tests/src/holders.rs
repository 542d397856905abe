//! Guests that attest and hold their sessions, reporting what their
//! sessions tell them: the harness of chaos case g (`tests/chaos_g.rs`,
//! the kill switch flipped under a node's worth of live sessions) and of
//! the ring-advance test there.
//!
//! Each guest is the real attempt driver (`vkx_guest::agent::Agent` with
//! a soft vTPM, [`crate::herd::SoftSite::agents`]) paced by the daemon's
//! own [`Supervisor`], with the daemon's key delivery
//! ([`Deliver::resuming`]): it asks for [`crate::herd::KEY`] as soon as it
//! is attested, and again once key release becomes usable if it could not
//! ask before. Its handler reports every session event that matters here
//! with the instant it saw it ([`Ev`]), on a channel the test thread
//! drains into a [`State`].
//!
//! One deliberate addition to the daemon's behaviour, the probe: when a
//! `feature-update` turns key release off, the guest asks for its key
//! again at once (as a re-attestation or `vkx-guest get` would). Its own
//! session must refuse that locally; a guest whose session ignored the
//! kill would send the request, and the host would count it
//! (`vkx_errors_sent_total{code="feature-disabled"}`).
//!
//! All guests run on one tokio thread of their own (their quotes on its
//! blocking pool). Every wait is bounded by the caller's limit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vkx_common::retry::RetryConfig;
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_common::wire::{FeatureState, Features, KeyName, feature};
use vkx_guest::agent::{Agent, Handler, Reaction};
use vkx_guest::deliver::Deliver;
use vkx_guest::supervisor::{Start, Supervisor};

use crate::herd::{KEY, failure_cause};

/// How long the guests get to end their sessions when stopped.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Longest one read of the event channel blocks.
const RECV_SLICE: Duration = Duration::from_millis(100);

/// What one guest reports, with the instant its handler saw it.
#[derive(Debug)]
pub enum Ev {
    Attested {
        id: usize,
        at: Instant,
        features: Features,
    },
    /// The host's answer to a key request: keys released, keys refused.
    Keys {
        id: usize,
        released: usize,
        refused: usize,
    },
    /// A `feature-update`: the new map.
    Features {
        id: usize,
        at: Instant,
        features: Features,
    },
    /// A re-enabled feature became usable (after its U[0, 10 s] delay).
    Usable {
        id: usize,
        at: Instant,
        feature: u16,
    },
    /// The probe after a kill of key release: whether the session sent
    /// the request (it must not).
    Probe { id: usize, sent: bool },
    /// An attempt ended: whether it had been established, whether the
    /// herd was being stopped, and how.
    Ended {
        id: usize,
        established: bool,
        stopped: bool,
        detail: String,
    },
    /// The guest's retry budget is spent.
    Dormant { id: usize },
}

/// Everything the guests reported so far.
#[derive(Debug)]
pub struct State {
    /// Per guest: its latest attestation.
    pub attested: Vec<Option<Instant>>,
    /// Per guest: a session is established now.
    pub live: Vec<bool>,
    /// Per guest: its session's current feature map.
    pub features: Vec<Features>,
    /// Per guest: every `feature-update`, in order.
    pub updates: Vec<Vec<(Instant, Features)>>,
    /// Per guest: every `FeatureUsable`, in order.
    pub usable: Vec<Vec<(Instant, u16)>>,
    pub keys_released: usize,
    pub keys_refused: usize,
    pub probes_sent: usize,
    pub probes_refused_locally: usize,
    /// Established sessions that ended before the herd was stopped (none
    /// should while a case runs).
    pub sessions_lost: usize,
    /// Attempts that did not attest, by cause.
    pub failed: BTreeMap<String, usize>,
    pub dormant: BTreeSet<usize>,
}

impl State {
    fn new(n: usize) -> Self {
        Self {
            attested: vec![None; n],
            live: vec![false; n],
            features: vec![Features::new(); n],
            updates: vec![Vec::new(); n],
            usable: vec![Vec::new(); n],
            keys_released: 0,
            keys_refused: 0,
            probes_sent: 0,
            probes_refused_locally: 0,
            sessions_lost: 0,
            failed: BTreeMap::new(),
            dormant: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Guests holding a session now.
    pub fn holding(&self) -> usize {
        self.live.iter().filter(|l| **l).count()
    }

    fn take(&mut self, ev: Ev) {
        match ev {
            Ev::Attested { id, at, features } => {
                self.attested[id] = Some(at);
                self.live[id] = true;
                self.features[id] = features;
            }
            Ev::Keys {
                released, refused, ..
            } => {
                self.keys_released += released;
                self.keys_refused += refused;
            }
            Ev::Features { id, at, features } => {
                self.features[id].clone_from(&features);
                self.updates[id].push((at, features));
            }
            Ev::Usable { id, at, feature } => self.usable[id].push((at, feature)),
            Ev::Probe { sent, .. } => {
                if sent {
                    self.probes_sent += 1;
                } else {
                    self.probes_refused_locally += 1;
                }
            }
            Ev::Ended {
                id,
                established,
                stopped,
                detail,
            } => {
                self.live[id] = false;
                if stopped {
                    // Told to stop: the goodbye is the end of the run.
                } else if established {
                    self.sessions_lost += 1;
                } else {
                    *self.failed.entry(failure_cause(&detail)).or_default() += 1;
                }
            }
            Ev::Dormant { id } => {
                self.dormant.insert(id);
            }
        }
    }

    /// Guest `id`'s first `feature-update` at or after `since` whose map
    /// has `feature` in `state`.
    pub fn update_since(
        &self,
        id: usize,
        since: Instant,
        feature: u16,
        state: FeatureState,
    ) -> Option<Instant> {
        self.updates[id]
            .iter()
            .find(|(t, m)| *t >= since && m.get(&feature) == Some(&state))
            .map(|(t, _)| *t)
    }

    /// Guest `id`'s first `FeatureUsable` of `feature` at or after `since`.
    pub fn usable_since(&self, id: usize, since: Instant, feature: u16) -> Option<Instant> {
        self.usable[id]
            .iter()
            .find(|(t, f)| *t >= since && *f == feature)
            .map(|(t, _)| *t)
    }
}

/// A herd of holding guests on their own thread.
#[derive(Debug)]
pub struct Holders {
    pub state: State,
    rx: mpsc::Receiver<Ev>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Holders {
    /// Starts one guest per agent; guest `i` makes its first attempt
    /// `i × stagger` after the start.
    pub fn start(agents: Vec<Arc<Agent>>, stagger: Duration) -> Self {
        let n = agents.len();
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let t0 = tokio::time::Instant::now();
                let mut set = tokio::task::JoinSet::new();
                for (id, agent) in agents.into_iter().enumerate() {
                    let first = t0 + stagger * u32::try_from(id).unwrap();
                    set.spawn(run_guest(agent, id, first, tx.clone(), stop_rx.clone()));
                }
                drop(tx);
                let mut stop = stop_rx;
                while !*stop.borrow() {
                    if stop.changed().await.is_err() {
                        break;
                    }
                }
                let deadline = tokio::time::Instant::now() + STOP_LIMIT;
                while let Ok(Some(_)) = tokio::time::timeout_at(deadline, set.join_next()).await {}
                set.abort_all();
            });
        });
        Self {
            state: State::new(n),
            rx,
            stop: stop_tx,
            thread: Some(thread),
        }
    }

    /// Takes the guests' reports until `done` holds or `limit` passes;
    /// returns whether `done` held.
    pub fn wait(&mut self, limit: Duration, done: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.state.take(ev);
            }
            if done(&self.state) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left.min(RECV_SLICE)) {
                Ok(ev) => self.state.take(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return done(&self.state),
            }
        }
    }

    /// Ends every session (`goodbye`) and the guests' thread.
    pub fn stop(mut self) -> State {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        while let Ok(ev) = self.rx.try_recv() {
            self.state.take(ev);
        }
        std::mem::replace(&mut self.state, State::new(0))
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One guest's session handler: the daemon's delivery, the reports, the
/// probe.
struct Holder<'a> {
    id: usize,
    tx: mpsc::Sender<Ev>,
    names: &'a [KeyName],
    deliver: Deliver<'a>,
}

impl Handler for Holder<'_> {
    fn on_event(&mut self, ev: GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        let at = Instant::now();
        let mut r = self.deliver.on_event(&ev, guest, now);
        let id = self.id;
        let report = match ev {
            GuestEvent::Attested { features, .. } => Some(Ev::Attested { id, at, features }),
            GuestEvent::Keys(k) => Some(Ev::Keys {
                id,
                released: k.released.len(),
                refused: k.refused.len(),
            }),
            GuestEvent::Features(features) => {
                let killed = features.get(&feature::KEY_RELEASE) == Some(&FeatureState::Disabled);
                let _ = self.tx.send(Ev::Features { id, at, features });
                match guest {
                    Guest::Established(s) if killed => {
                        let sent = match s.request_keys(self.names.to_vec(), now) {
                            Ok(out) => {
                                r.out.absorb(out);
                                true
                            }
                            Err(_) => false,
                        };
                        Some(Ev::Probe { id, sent })
                    }
                    _ => None,
                }
            }
            GuestEvent::FeatureUsable { feature } => Some(Ev::Usable { id, at, feature }),
            _ => None,
        };
        if let Some(ev) = report {
            let _ = self.tx.send(ev);
        }
        r
    }
}

/// One guest, as `vkx-guest run` drives it, until `stop`.
async fn run_guest(
    agent: Arc<Agent>,
    id: usize,
    first: tokio::time::Instant,
    tx: mpsc::Sender<Ev>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        () = tokio::time::sleep_until(first) => {}
        _ = stop.changed() => return,
    }
    let names = vec![KeyName::new(KEY).unwrap()];
    let seed = 0x686f_6c64_0000_0000 ^ u64::try_from(id).unwrap();
    let mut sup = Supervisor::new(RetryConfig::default(), seed);
    while !*stop.borrow() {
        let now = Instant::now();
        if let Some(w) = sup.next_wake(now) {
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(w.until)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        match sup.start_attempt(now) {
            Start::Go => {
                let mut h = Holder {
                    id,
                    tx: tx.clone(),
                    names: &names,
                    deliver: Deliver::new(&names, None, &[], None).resuming(),
                };
                let a = agent.attempt(&mut h, &mut stop).await;
                let _ = tx.send(Ev::Ended {
                    id,
                    established: a.established,
                    stopped: *stop.borrow(),
                    detail: a.detail.clone(),
                });
                let _line = sup.attempt_ended(&a, Instant::now()).log;
            }
            Start::NotYet(_) => {}
            Start::BudgetSpent(_) => {
                let _ = tx.send(Ev::Dormant { id });
            }
        }
    }
}

/// The `q`-quantile (0..=1) of sorted `v` (nearest rank).
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
