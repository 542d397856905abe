//! A drill's synthetic guests: one real guest agent per sandbox VM
//! (`vkx_guest::agent::Agent`, its sessions and TLS, paced by the
//! daemon's own [`Supervisor`] and the real retry policy), quoting with
//! the sandbox's soft vTPMs ([`super::softtpm`]) over the VM's Unix
//! socket. Nothing of the guest is re-implemented; the drill adds a
//! handler ([`DrillGuest`]) that does what a workload would and reports
//! what it saw, with the instant it saw it:
//! - once attested it asks for the sandbox's key (key-release);
//! - each time the rolled-out feature becomes usable it runs one
//!   derivation (key-derivation), so a ring's traffic follows its stage;
//!   with [`Workload::Every`], it asks again at that pace while the feature
//!   stays usable (one derivation outstanding at most), so a bake that
//!   starts again later still sees traffic;
//! - when an update turns the feature off it tries once more, as a
//!   workload would: its own session must refuse (the probe); a session
//!   that ignored the kill would send the request, and the drill counts it;
//! - a guest of the "bad build" ([`Build::Bad`]), once its feature map
//!   says the feature is enabled, sends one frame of a message type the
//!   host does not know ([`UNKNOWN_MESSAGE_TYPE`]): the seed incident's
//!   call to an endpoint the other side did not know.
//!
//! What it trusts: the sandbox's host (pinned key). What it bounds: every
//! wait is the session's or the supervisor's; reports go through an
//! unbounded channel drained by the drill, one per event (a guest makes a
//! handful of events per stage).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use vkx_common::retry::RetryConfig;
use vkx_common::session::guest::{Guest, GuestEvent, RequestRefused};
use vkx_common::wire::{CONFIRM_TAG_LEN, FeatureState, Features, KeyName, Purpose};
use vkx_guest::agent::{Agent, Handler, Reaction};
use vkx_guest::config::Config;
use vkx_guest::supervisor::{Start, Supervisor};
use zeroize::Zeroizing;

use super::sandbox::{KEY, PURPOSE, Sandbox};

/// The message type a bad-build guest sends: none of PROTOCOL.md's (the
/// v1 types are small integers), so the host's typed decoder answers
/// `unknown-message`.
pub const UNKNOWN_MESSAGE_TYPE: u8 = 99;
/// Bytes of a derived key the guests ask for.
const DERIVE_LENGTH: u8 = 32;

/// Which guest agent build a synthetic guest plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Good,
    /// Calls an endpoint the host does not know once the feature is on.
    Bad,
}

/// What one guest reports, with the instant it saw it.
#[derive(Debug, Clone)]
pub enum Report {
    /// An attempt starts (the supervisor allowed it).
    Attempt { id: usize, at: Instant },
    Attested {
        id: usize,
        at: Instant,
        enabled: bool,
    },
    /// A `feature-update`: whether the rolled-out feature is on, off
    /// (disabled) or not yet.
    Update {
        id: usize,
        at: Instant,
        state: Option<FeatureState>,
    },
    /// The host answered a derivation of the rolled-out feature.
    Derived { id: usize, at: Instant, ok: bool },
    /// The probe after a disabling update: whether the session sent it.
    Probe { id: usize, at: Instant, sent: bool },
    /// A bad-build guest sent its unknown message.
    Unknown { id: usize, at: Instant },
    /// An attempt ended.
    Ended {
        id: usize,
        at: Instant,
        established: bool,
        stopped: bool,
        detail: String,
    },
    /// The supervisor went dormant (a permanent error, or the budget).
    Dormant { id: usize, at: Instant },
}

/// The guests, running on the drill's runtime until [`Fleet::stop`].
#[derive(Debug)]
pub struct Fleet {
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

/// How often a good guest derives while the rolled-out feature is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Once each time the feature becomes usable.
    OncePerEnable,
    /// Then again every so often while it stays usable.
    Every(std::time::Duration),
}

/// One guest's plan.
#[derive(Debug, Clone)]
pub struct GuestPlan {
    pub build: Build,
    /// Delay of its first attempt from the fleet's start.
    pub delay: std::time::Duration,
    pub workload: Workload,
}

impl Fleet {
    /// Starts one guest per sandbox VM with `plans[i]`; reports go to `tx`.
    pub fn start(
        sandbox: &Sandbox,
        plans: &[GuestPlan],
        tx: mpsc::UnboundedSender<Report>,
    ) -> anyhow::Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let feature = sandbox.feature.id();
        let t0 = tokio::time::Instant::now();
        for (id, (vm, plan)) in sandbox.vms.iter().zip(plans).enumerate() {
            let pin = &sandbox.nodes[vm.node].pin;
            let config = Config::from_toml(&format!(
                "host_socket = \"{}\"\nhost_key_sha256 = \"{pin}\"\n",
                vm.socket.display()
            ))?;
            let agent = Agent::new(&config)?.with_quoter(vm.tpm.clone());
            let jitter_seed = u64::from_be_bytes(
                ring::digest::digest(&ring::digest::SHA256, vm.id.as_bytes()).as_ref()[..8]
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            tasks.spawn(run_guest(
                Arc::new(agent),
                GuestCtx {
                    id,
                    build: plan.build,
                    workload: plan.workload,
                    feature,
                    tx: tx.clone(),
                },
                t0 + plan.delay,
                jitter_seed,
                stop_rx.clone(),
            ));
        }
        Ok(Self { stop, tasks })
    }

    /// Ends every session with `goodbye` and waits for the guests, at
    /// most `limit`.
    pub async fn stop(mut self, limit: std::time::Duration) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + limit;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await {}
        self.tasks.abort_all();
    }
}

#[derive(Debug, Clone)]
struct GuestCtx {
    id: usize,
    build: Build,
    workload: Workload,
    feature: u16,
    tx: mpsc::UnboundedSender<Report>,
}

/// One guest, as `vkx-guest run` drives it, until `stop`.
async fn run_guest(
    agent: Arc<Agent>,
    ctx: GuestCtx,
    first: tokio::time::Instant,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        () = tokio::time::sleep_until(first) => {}
        _ = stop.changed() => return,
    }
    let id = ctx.id;
    let mut sup = Supervisor::new(RetryConfig::default(), seed);
    let mut dormant_told = false;
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
                let _ = ctx.tx.send(Report::Attempt { id, at: now });
                let mut h = DrillGuest {
                    ctx: ctx.clone(),
                    unknown_sent: false,
                    next_derive: None,
                    outstanding: false,
                };
                let a = agent.attempt(&mut h, &mut stop).await;
                let at = Instant::now();
                let _ = ctx.tx.send(Report::Ended {
                    id,
                    at,
                    established: a.established,
                    stopped: *stop.borrow(),
                    detail: a.detail.clone(),
                });
                let ended = sup.attempt_ended(&a, at);
                if matches!(ended.next, vkx_common::retry::Next::Dormant(_)) && !dormant_told {
                    dormant_told = true;
                    let _ = ctx.tx.send(Report::Dormant { id, at });
                }
            }
            Start::NotYet(_) => {}
            Start::BudgetSpent(_) => {
                if !dormant_told {
                    dormant_told = true;
                    let _ = ctx.tx.send(Report::Dormant {
                        id,
                        at: Instant::now(),
                    });
                }
            }
        }
    }
}

/// The drill's session handler (see the module primer).
struct DrillGuest {
    ctx: GuestCtx,
    unknown_sent: bool,
    /// [`Workload::Every`]: when it asks again (the feature usable).
    next_derive: Option<Instant>,
    /// A derivation of its own is queued or running.
    outstanding: bool,
}

impl DrillGuest {
    fn state(&self, map: &Features) -> Option<FeatureState> {
        map.get(&self.ctx.feature).copied()
    }

    /// A good guest's derivation, unless one of its own is outstanding.
    fn derive(&mut self, r: &mut Reaction, now: Instant) {
        if self.ctx.build != Build::Good || self.outstanding {
            return;
        }
        if let Ok(p) = Purpose::new(PURPOSE) {
            r.derive.push((p, DERIVE_LENGTH));
            self.outstanding = true;
        }
        if let Workload::Every(every) = self.ctx.workload {
            self.next_derive = Some(now + every);
        }
    }

    /// The bad build's call: one frame `[99, {}]`, a well-formed message
    /// of a type the host does not know.
    fn bad_call(&mut self, r: &mut Reaction) {
        if self.ctx.build == Build::Bad && !self.unknown_sent {
            self.unknown_sent = true;
            r.out
                .send
                .push(Zeroizing::new(vec![0x82, 0x18, UNKNOWN_MESSAGE_TYPE, 0xa0]));
            let _ = self.ctx.tx.send(Report::Unknown {
                id: self.ctx.id,
                at: Instant::now(),
            });
        }
    }
}

impl Handler for DrillGuest {
    fn on_event(&mut self, ev: GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        let at = Instant::now();
        let id = self.ctx.id;
        let mut r = Reaction::default();
        match ev {
            GuestEvent::Attested { features, .. } => {
                let enabled = self.state(&features) == Some(FeatureState::Enabled);
                let _ = self.ctx.tx.send(Report::Attested { id, at, enabled });
                if let Guest::Established(s) = guest
                    && let Ok(k) = KeyName::new(KEY)
                    && let Ok(out) = s.request_keys(vec![k], now)
                {
                    r.out.absorb(out);
                }
                if enabled {
                    self.bad_call(&mut r);
                }
            }
            GuestEvent::Features(features) => {
                let state = self.state(&features);
                let _ = self.ctx.tx.send(Report::Update { id, at, state });
                if state != Some(FeatureState::Enabled) {
                    self.next_derive = None;
                }
                match state {
                    Some(FeatureState::Enabled) => self.bad_call(&mut r),
                    Some(FeatureState::Disabled) => {
                        // The probe: a workload asks once more; the
                        // session must refuse it locally.
                        if let Guest::Established(s) = guest
                            && let Ok(p) = Purpose::new(PURPOSE)
                        {
                            let sent = match s.request_derive(
                                p,
                                DERIVE_LENGTH,
                                [0; CONFIRM_TAG_LEN],
                                [0; CONFIRM_TAG_LEN],
                                now,
                            ) {
                                Ok(out) => {
                                    r.out.absorb(out);
                                    true
                                }
                                Err(_) => false,
                            };
                            let _ = self.ctx.tx.send(Report::Probe { id, at, sent });
                        }
                    }
                    _ => {}
                }
            }
            GuestEvent::FeatureUsable { feature } if feature == self.ctx.feature => {
                self.derive(&mut r, now);
            }
            _ => {}
        }
        r
    }

    fn on_derived(&mut self, _purpose: &Purpose, _key: &[u8]) {
        self.outstanding = false;
        let _ = self.ctx.tx.send(Report::Derived {
            id: self.ctx.id,
            at: Instant::now(),
            ok: true,
        });
    }

    fn on_derive_failed(&mut self, _purpose: &Purpose, _why: &str) {
        self.outstanding = false;
        let _ = self.ctx.tx.send(Report::Derived {
            id: self.ctx.id,
            at: Instant::now(),
            ok: false,
        });
    }

    /// Off or held back: not a failure; the next `FeatureUsable` asks.
    fn on_derive_not_sent(&mut self, _purpose: &Purpose, _length: u8, _why: RequestRefused) {
        self.outstanding = false;
        self.next_derive = None;
    }

    fn wake_at(&self) -> Option<Instant> {
        self.next_derive
    }

    fn on_wake(&mut self, _guest: &mut Guest, now: Instant) -> Reaction {
        let mut r = Reaction::default();
        // Not yet due (an early wake): the same instant is read again.
        if self.next_derive.is_some_and(|t| t <= now) {
            self.next_derive = None;
            self.derive(&mut r, now);
            if self.next_derive.is_none()
                && let Workload::Every(every) = self.ctx.workload
            {
                // One still outstanding: look again a period later.
                self.next_derive = Some(now + every);
            }
        }
        r
    }
}
