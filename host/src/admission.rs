//! Admission control for `vkx-host serve` (PROTOCOL.md §11.6 "Accepted",
//! §15.5): which connections the host serves, which it turns away with a
//! jittered `retry-after`, and which it cannot even afford to tell.
//!
//! Every accepted transport connection meets [`AdmissionControl::admit`]
//! once, in this order:
//!
//! 1. **The peer's open transports** (`max_open_per_peer`, default 16):
//!    every connection one peer holds, served or being refused. Over it the
//!    transport is closed at once, before it can take one of the shared
//!    slots below: one VM holding idle transports cannot crowd out the
//!    node (a well-behaved guest holds one session, plus a one-shot `get`
//!    or a re-attestation now and then).
//! 2. **Hard ceiling** (`max_open`, default 2 × `max_connections`): every
//!    connection the host holds, served or being refused. Over it the host
//!    cannot afford even a TLS handshake and closes the transport at once
//!    (the guest sees a transport failure and backs off, §13.2).
//! 3. **The peer's connection rate**: one token bucket per peer identity
//!    (vm-id, or `cid:N` for an unmapped vsock peer). Empty: `rate-limited`.
//! 4. **`max_connections`**: connections being served. Full: `busy`.
//! 5. **`max_handshakes`**: served connections not yet Established. Full:
//!    `busy`.
//! 6. **The peer's handshakes** (`max_handshakes_per_peer`, default 2):
//!    its served connections not yet Established. Full: `busy`. A
//!    well-behaved guest has one handshake in progress (two while it
//!    re-attests beside its session's end); without this cap a few dozen
//!    cooperating VMs stalling handshakes would fill the node's
//!    `max_handshakes` and every other guest, at boot too, would get
//!    `busy`. Both handshake slots are released when the session reaches
//!    Established ([`Ticket::established`]) or the connection ends.
//!
//! A refused connection still completes TLS (bounded by the TLS handshake
//! timeout), because errors travel inside TLS; the driver then sends the
//! error with the `retry-after` of [`Refused`] and closes. The
//! `retry-after` is `max(base, time until the peer's next token)` times
//! U\[1, 1 + jitter\] (§8.3 rule 4), so guests refused together do not
//! return together; except when `max_handshakes` is full: then it is sized
//! from the queue ([`HandshakeQueue`], PROTOCOL.md §11.6): each refused
//! guest is given the next free place in line, `hold / max_handshakes`
//! after the one before (`hold` the measured time a handshake holds its
//! slot, an EWMA), at least [`MIN_QUEUE_RETRY_AFTER`] and at most the base
//! from now, then jittered the same way. A node booting together is told
//! to come back at the rate the host completes handshakes, not all after
//! a fixed 5-10 s.
//!
//! Sessions also get a message budget ([`AdmissionControl::message_bucket`]):
//! a session whose guest sends faster is answered `rate-limited` and closed.
//!
//! Bounds: the peer table holds at most `max_peers` entries; when full, the
//! idlest peer whose bucket has refilled and who holds no transport (it
//! carries no state) makes room, and if there is none the newcomer shares
//! one overflow entry (one bucket, one `max_open_per_peer`). Slots are
//! atomics with RAII guards, so a slot is released on every path a
//! connection task can take, panics included.
//!
//! Time comes from the caller and jitter draws are passed in, so all of it
//! is testable with virtual time and fixed draws.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use vkx_common::session::host::Refusal;
use vkx_common::wire::MAX_RETRY_AFTER_MS;

use crate::limit::{Slot, Slots, TokenBucket};

/// Shortest queue-sized `retry-after` (before jitter): the guests' own
/// retry floor (§13.2); a place in line sooner than that is rounded up.
pub const MIN_QUEUE_RETRY_AFTER: Duration = Duration::from_millis(100);
/// The handshake hold assumed until one is measured: a TLS handshake,
/// hello, a TPM quote and its verification, with room.
pub const PRIOR_HANDSHAKE_HOLD: Duration = Duration::from_millis(200);
/// Weight of the newest handshake in the hold's moving average (1/8).
pub const HOLD_EWMA_SHIFT: u32 = 3;
/// Default `max_handshakes`: connections not yet Established. A handshake
/// costs a TLS handshake and a quote verification; 256 at once keeps a
/// fleet restart moving without letting it starve established sessions.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// The default hard ceiling is this many times `max_connections`.
pub const DEFAULT_OPEN_CEILING_FACTOR: usize = 2;
/// Largest `max_handshakes` and `max_open` accepted in host.toml.
pub const MAX_CONFIGURED_SLOTS: usize = 131_072;
/// Default base `retry-after` of `busy` and `rate-limited`.
pub const DEFAULT_BUSY_RETRY_AFTER_MS: u32 = 5_000;
/// Default jitter: `retry-after` is base × U\[1, 1 + percent / 100\].
pub const DEFAULT_RETRY_JITTER_PERCENT: u32 = 100;
/// Largest jitter accepted.
pub const MAX_RETRY_JITTER_PERCENT: u32 = 100;
/// Default connections a peer may open in a burst.
pub const DEFAULT_PEER_CONNECTION_BURST: u32 = 10;
/// Default time for a peer to earn one more connection.
pub const DEFAULT_PEER_CONNECTION_REFILL_MS: u32 = 6_000;
/// Default messages a session may send in a burst (a whole handshake,
/// key and derive requests, with room to spare).
pub const DEFAULT_SESSION_MESSAGE_BURST: u32 = 32;
/// Default time for a session to earn one more message (2 per second).
pub const DEFAULT_SESSION_MESSAGE_REFILL_MS: u32 = 500;
/// Largest burst accepted for either bucket.
pub const MAX_BURST: u32 = 10_000;
/// Longest refill interval accepted for either bucket: a day.
pub const MAX_REFILL_MS: u32 = 86_400_000;
/// Default transports one peer may hold open at once.
pub const DEFAULT_MAX_OPEN_PER_PEER: usize = 16;
/// Default number of peer buckets kept (1,000 VMs per node with room).
pub const DEFAULT_MAX_PEERS: usize = 8_192;
/// Largest `max_peers` accepted.
pub const MAX_CONFIGURED_PEERS: usize = 1_048_576;

/// The `[admission]` table of host.toml. Every field is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Served connections not yet Established; over it: `busy`.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Hard ceiling on every connection held (served or being refused);
    /// over it the transport is closed at once. Default 2 × max_connections.
    #[serde(default)]
    pub max_open: Option<usize>,
    /// Connections one peer may hold (served or being refused); over it
    /// the transport is closed at once. Default 16, or `max_open` if lower.
    #[serde(default)]
    pub max_open_per_peer: Option<usize>,
    /// Served connections of one peer not yet Established; over it:
    /// `busy`. Default 2, or `max_handshakes` if lower.
    #[serde(default)]
    pub max_handshakes_per_peer: Option<usize>,
    /// Base `retry-after` of `busy` and `rate-limited`, in ms.
    #[serde(default = "default_busy_retry_after_ms")]
    pub busy_retry_after_ms: u32,
    /// `retry-after` is base × U[1, 1 + retry_jitter_percent / 100].
    #[serde(default = "default_retry_jitter_percent")]
    pub retry_jitter_percent: u32,
    /// Connections one peer may open at once ...
    #[serde(default = "default_peer_connection_burst")]
    pub peer_connection_burst: u32,
    /// ... and then one more per this many ms.
    #[serde(default = "default_peer_connection_refill_ms")]
    pub peer_connection_refill_ms: u32,
    /// Messages one session may send at once ...
    #[serde(default = "default_session_message_burst")]
    pub session_message_burst: u32,
    /// ... and then one more per this many ms.
    #[serde(default = "default_session_message_refill_ms")]
    pub session_message_refill_ms: u32,
    /// Peer buckets kept; beyond, the idlest refilled one is evicted or
    /// newcomers share one bucket.
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
}

fn default_max_handshakes() -> usize {
    DEFAULT_MAX_HANDSHAKES
}

/// Default `max_handshakes_per_peer` (see the module primer).
pub const DEFAULT_MAX_HANDSHAKES_PER_PEER: usize = 2;
fn default_busy_retry_after_ms() -> u32 {
    DEFAULT_BUSY_RETRY_AFTER_MS
}
fn default_retry_jitter_percent() -> u32 {
    DEFAULT_RETRY_JITTER_PERCENT
}
fn default_peer_connection_burst() -> u32 {
    DEFAULT_PEER_CONNECTION_BURST
}
fn default_peer_connection_refill_ms() -> u32 {
    DEFAULT_PEER_CONNECTION_REFILL_MS
}
fn default_session_message_burst() -> u32 {
    DEFAULT_SESSION_MESSAGE_BURST
}
fn default_session_message_refill_ms() -> u32 {
    DEFAULT_SESSION_MESSAGE_REFILL_MS
}
fn default_max_peers() -> usize {
    DEFAULT_MAX_PEERS
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_open: None,
            max_open_per_peer: None,
            max_handshakes_per_peer: None,
            busy_retry_after_ms: DEFAULT_BUSY_RETRY_AFTER_MS,
            retry_jitter_percent: DEFAULT_RETRY_JITTER_PERCENT,
            peer_connection_burst: DEFAULT_PEER_CONNECTION_BURST,
            peer_connection_refill_ms: DEFAULT_PEER_CONNECTION_REFILL_MS,
            session_message_burst: DEFAULT_SESSION_MESSAGE_BURST,
            session_message_refill_ms: DEFAULT_SESSION_MESSAGE_REFILL_MS,
            max_peers: DEFAULT_MAX_PEERS,
        }
    }
}

/// A value of `[admission]` outside its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionConfigError {
    #[error("admission.{key} = {value}: must be {min}..={max}")]
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

fn check(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), AdmissionConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(AdmissionConfigError::OutOfRange {
            key,
            value,
            min,
            max,
        })
    }
}

fn wide(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The checked limits admission control runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_open: usize,
    pub max_open_per_peer: usize,
    pub max_handshakes_per_peer: usize,
    pub busy_retry_after: Duration,
    pub retry_jitter_percent: u32,
    pub peer_connection_burst: u32,
    pub peer_connection_refill: Duration,
    pub session_message_burst: u32,
    pub session_message_refill: Duration,
    pub max_peers: usize,
}

impl Limits {
    /// Checks `[admission]` against `max_connections` (already checked by
    /// the caller).
    pub fn new(max_connections: usize, c: &AdmissionConfig) -> Result<Self, AdmissionConfigError> {
        let slots = wide(MAX_CONFIGURED_SLOTS);
        check("max_handshakes", wide(c.max_handshakes), 1, slots)?;
        let max_open = c
            .max_open
            .unwrap_or(max_connections.saturating_mul(DEFAULT_OPEN_CEILING_FACTOR));
        // At least max_connections: otherwise the ceiling, not the
        // connection limit, would decide, and nobody would be told `busy`.
        check("max_open", wide(max_open), wide(max_connections), slots)?;
        let max_open_per_peer = c
            .max_open_per_peer
            .unwrap_or(DEFAULT_MAX_OPEN_PER_PEER.min(max_open));
        check(
            "max_open_per_peer",
            wide(max_open_per_peer),
            1,
            wide(max_open),
        )?;
        let max_handshakes_per_peer = c
            .max_handshakes_per_peer
            .unwrap_or(DEFAULT_MAX_HANDSHAKES_PER_PEER.min(c.max_handshakes));
        check(
            "max_handshakes_per_peer",
            wide(max_handshakes_per_peer),
            1,
            wide(c.max_handshakes),
        )?;
        check(
            "busy_retry_after_ms",
            c.busy_retry_after_ms.into(),
            1,
            MAX_RETRY_AFTER_MS.into(),
        )?;
        check(
            "retry_jitter_percent",
            c.retry_jitter_percent.into(),
            0,
            MAX_RETRY_JITTER_PERCENT.into(),
        )?;
        let burst = u64::from(MAX_BURST);
        let refill = u64::from(MAX_REFILL_MS);
        check(
            "peer_connection_burst",
            c.peer_connection_burst.into(),
            1,
            burst,
        )?;
        check(
            "peer_connection_refill_ms",
            c.peer_connection_refill_ms.into(),
            1,
            refill,
        )?;
        check(
            "session_message_burst",
            c.session_message_burst.into(),
            1,
            burst,
        )?;
        check(
            "session_message_refill_ms",
            c.session_message_refill_ms.into(),
            1,
            refill,
        )?;
        check(
            "max_peers",
            wide(c.max_peers),
            1,
            wide(MAX_CONFIGURED_PEERS),
        )?;
        Ok(Self {
            max_connections,
            max_handshakes: c.max_handshakes,
            max_open,
            max_open_per_peer,
            max_handshakes_per_peer,
            busy_retry_after: Duration::from_millis(c.busy_retry_after_ms.into()),
            retry_jitter_percent: c.retry_jitter_percent,
            peer_connection_burst: c.peer_connection_burst,
            peer_connection_refill: Duration::from_millis(c.peer_connection_refill_ms.into()),
            session_message_burst: c.session_message_burst,
            session_message_refill: Duration::from_millis(c.session_message_refill_ms.into()),
            max_peers: c.max_peers,
        })
    }
}

/// `base` × U\[1, 1 + percent / 100\], from a uniform 64-bit `draw`
/// (0 gives `base`, `u64::MAX` just under the top). Saturates.
pub fn jittered(base: Duration, percent: u32, draw: u64) -> Duration {
    let span = base.as_nanos().saturating_mul(u128::from(percent)) / 100;
    // span < 2^128 / 2^64 for any base a Duration of u64 seconds can hold
    // times percent <= 100, so the product below cannot overflow.
    let extra = span.saturating_mul(u128::from(draw)) >> 64;
    let extra = Duration::from_nanos(u64::try_from(extra).unwrap_or(u64::MAX));
    base.saturating_add(extra)
}

#[derive(Debug)]
struct PeerEntry {
    bucket: TokenBucket,
    /// The transports the peer holds.
    open: Arc<Slots>,
    handshakes: Arc<Slots>,
    last_seen: Instant,
}

/// Per-peer connection buckets and open-transport counts, at most `max`
/// peers.
#[derive(Debug)]
struct PeerTable {
    peers: HashMap<Box<str>, PeerEntry>,
    /// Shared by peers that found the table full of active peers.
    overflow: TokenBucket,
    overflow_open: Arc<Slots>,
    overflow_handshakes: Arc<Slots>,
    max: usize,
    burst: u32,
    refill: Duration,
    max_open_per_peer: usize,
    max_handshakes_per_peer: usize,
}

impl PeerTable {
    fn new(limits: &Limits, now: Instant) -> Self {
        Self {
            peers: HashMap::new(),
            overflow: TokenBucket::full(
                limits.peer_connection_burst,
                limits.peer_connection_refill,
                now,
            ),
            overflow_open: Slots::new(limits.max_open_per_peer),
            overflow_handshakes: Slots::new(limits.max_handshakes_per_peer),
            max: limits.max_peers,
            burst: limits.peer_connection_burst,
            refill: limits.peer_connection_refill,
            max_open_per_peer: limits.max_open_per_peer,
            max_handshakes_per_peer: limits.max_handshakes_per_peer,
        }
    }

    /// Makes room by evicting the idlest peer if its bucket is full again
    /// and it holds no transport. O(peers), and only when the table is
    /// full.
    fn evict_one(&mut self, now: Instant) -> bool {
        let idlest = self
            .peers
            .iter()
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| k.clone());
        let Some(key) = idlest else {
            return false;
        };
        let refilled = self
            .peers
            .get_mut(&key)
            .is_some_and(|e| e.open.in_use() == 0 && e.bucket.is_full(now));
        if refilled {
            self.peers.remove(&key);
        }
        refilled
    }

    /// The peer's entry, made if there is room.
    fn enter(&mut self, peer: &str, now: Instant) {
        if !self.peers.contains_key(peer) && (self.peers.len() < self.max || self.evict_one(now)) {
            self.peers.insert(
                peer.into(),
                PeerEntry {
                    bucket: TokenBucket::full(self.burst, self.refill, now),
                    open: Slots::new(self.max_open_per_peer),
                    handshakes: Slots::new(self.max_handshakes_per_peer),
                    last_seen: now,
                },
            );
        }
    }

    /// One of the peer's handshake slots, if it has one free.
    fn handshake(&mut self, peer: &str, now: Instant) -> Option<Slot> {
        self.enter(peer, now);
        match self.peers.get_mut(peer) {
            Some(e) => e.handshakes.try_acquire(),
            None => self.overflow_handshakes.try_acquire(),
        }
    }

    /// One of the peer's open-transport slots, if it has one free.
    fn open(&mut self, peer: &str, now: Instant) -> Option<Slot> {
        self.enter(peer, now);
        match self.peers.get_mut(peer) {
            Some(e) => {
                e.last_seen = now;
                e.open.try_acquire()
            }
            None => self.overflow_open.try_acquire(),
        }
    }

    fn take(&mut self, peer: &str, now: Instant) -> Result<(), Duration> {
        self.enter(peer, now);
        match self.peers.get_mut(peer) {
            Some(e) => {
                e.last_seen = now;
                e.bucket.try_take(now)
            }
            None => self.overflow.try_take(now),
        }
    }
}

/// Why a connection was not served (metrics label, log text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The peer holds `max_open_per_peer` transports: closed at once, no
    /// TLS.
    PeerOpen,
    /// Over the hard ceiling: closed at once, no TLS.
    MaxOpen,
    /// `max_connections` in use: `busy`.
    MaxConnections,
    /// `max_handshakes` in use: `busy`.
    MaxHandshakes,
    /// The peer has `max_handshakes_per_peer` in progress: `busy`.
    PeerHandshakes,
    /// The peer's connection bucket is empty: `rate-limited`.
    PeerConnectionRate,
}

impl RefuseReason {
    pub const ALL: [Self; 6] = [
        Self::PeerOpen,
        Self::MaxOpen,
        Self::MaxConnections,
        Self::MaxHandshakes,
        Self::PeerHandshakes,
        Self::PeerConnectionRate,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::PeerOpen => "peer_open",
            Self::MaxOpen => "max_open",
            Self::MaxConnections => "max_connections",
            Self::MaxHandshakes => "max_handshakes",
            Self::PeerHandshakes => "peer_handshakes",
            Self::PeerConnectionRate => "peer_connection_rate",
        }
    }
}

/// What to do with an accepted connection.
#[derive(Debug)]
pub enum Decision {
    /// Serve it; the ticket holds its slots.
    Admit(Ticket),
    /// Complete TLS, send the refusal, close.
    Refuse(Refused),
    /// Over the peer's open transports or the hard ceiling (which one
    /// is said): close the transport now.
    Close(RefuseReason),
}

/// The slots of a served connection. Dropping it releases them.
#[derive(Debug)]
pub struct Ticket {
    _peer_open: Slot,
    _open: Slot,
    _connection: Slot,
    /// The node's handshake slot and the peer's.
    handshake: Option<(Slot, Slot)>,
    admitted_at: Instant,
    queue: Arc<Mutex<HandshakeQueue>>,
}

impl Ticket {
    /// The session reached Established at `now`: its handshake slot goes
    /// back, and how long it held it is measured ([`HandshakeQueue`]).
    pub fn established(&mut self, now: Instant) {
        if self.handshake.take().is_some() {
            lock(&self.queue).completed(now.saturating_duration_since(self.admitted_at), now);
        }
    }

    /// Whether the connection still holds a handshake slot.
    pub fn in_handshake(&self) -> bool {
        self.handshake.is_some()
    }
}

/// A connection to turn away after TLS.
#[derive(Debug)]
pub struct Refused {
    pub refusal: Refusal,
    pub reason: RefuseReason,
    /// Jittered, at least the configured base.
    pub retry_after: Duration,
    _peer_open: Slot,
    _open: Slot,
}

/// Slots in use and the limits, for the metrics endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub open: usize,
    pub connections: usize,
    pub handshakes: usize,
    pub peers: usize,
    pub limits: Limits,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The line in front of a full `max_handshakes`: how long a handshake
/// holds its slot (an EWMA of admission to Established), when the last
/// progress was made, and up to when places in line are given out.
///
/// A refused guest's place is `hold / max_handshakes` after the previous
/// place (or after now): the time between two completions when every slot
/// is busy, so the guests told to wait come back at the rate the host
/// serves them. With no completion for longer than the average hold (a
/// host stalled, or a stalled set of handshakes) the time since the last
/// progress counts as the hold, so the places move out towards the cap
/// instead of bringing guests back to a host that serves nobody.
#[derive(Debug)]
pub struct HandshakeQueue {
    hold: Option<Duration>,
    last_progress: Instant,
    /// The last place given out.
    line_end: Instant,
}

impl HandshakeQueue {
    pub fn new(now: Instant) -> Self {
        Self {
            hold: None,
            last_progress: now,
            line_end: now,
        }
    }

    /// A handshake reached Established after holding its slot `held`.
    pub fn completed(&mut self, held: Duration, now: Instant) {
        self.hold = Some(match self.hold {
            None => held,
            Some(avg) => {
                let avg = avg.as_nanos();
                let w = 1u128 << HOLD_EWMA_SHIFT;
                let next = (avg * (w - 1) + held.as_nanos()) / w;
                Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX))
            }
        });
        self.last_progress = self.last_progress.max(now);
    }

    /// The handshakes in progress went from none to one at `now`: time
    /// without progress counts from here.
    pub fn busy_from(&mut self, now: Instant) {
        self.last_progress = self.last_progress.max(now);
    }

    /// The hold the line is computed with: the average, or the time since
    /// the last progress if longer.
    pub fn hold(&self, now: Instant) -> Duration {
        self.hold
            .unwrap_or(PRIOR_HANDSHAKE_HOLD)
            .max(now.saturating_duration_since(self.last_progress))
    }

    /// The next place in line for a guest refused at `now` with `slots`
    /// handshake slots: how long it waits (before jitter), in
    /// [`MIN_QUEUE_RETRY_AFTER`, `cap`].
    pub fn place(&mut self, now: Instant, slots: usize, cap: Duration) -> Duration {
        let gap = self.hold(now) / u32::try_from(slots.max(1)).unwrap_or(u32::MAX);
        let place = (self.line_end.max(now) + gap).min(now + cap);
        self.line_end = place;
        place
            .saturating_duration_since(now)
            .clamp(MIN_QUEUE_RETRY_AFTER.min(cap), cap)
    }
}

/// Admission control shared by every listener of one `serve`.
#[derive(Debug)]
pub struct AdmissionControl {
    limits: Limits,
    open: Arc<Slots>,
    connections: Arc<Slots>,
    handshakes: Arc<Slots>,
    peers: Mutex<PeerTable>,
    queue: Arc<Mutex<HandshakeQueue>>,
}

impl AdmissionControl {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            open: Slots::new(limits.max_open),
            connections: Slots::new(limits.max_connections),
            handshakes: Slots::new(limits.max_handshakes),
            peers: Mutex::new(PeerTable::new(&limits, now)),
            queue: Arc::new(Mutex::new(HandshakeQueue::new(now))),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decides on a connection from `peer` accepted at `now`. `draw` gives
    /// a uniform 64-bit random value; it is called only to jitter a
    /// refusal's `retry-after`.
    pub fn admit(&self, peer: &str, now: Instant, draw: impl FnOnce() -> u64) -> Decision {
        let Some(peer_open) = self.with_peers(|t| t.open(peer, now)) else {
            return Decision::Close(RefuseReason::PeerOpen);
        };
        let Some(open) = self.open.try_acquire() else {
            return Decision::Close(RefuseReason::MaxOpen);
        };
        // The two open slots travel together into whatever is decided.
        let held = (peer_open, open);
        // `wait`: when the condition clears; a place in the handshake
        // queue is jittered as it is, anything else is at least the base.
        let refuse = |refusal, reason, wait: Duration, (peer_open, open): (Slot, Slot)| {
            let retry_after = if reason == RefuseReason::MaxHandshakes {
                jittered(wait, self.limits.retry_jitter_percent, draw())
            } else {
                self.retry_after(wait, draw())
            };
            Decision::Refuse(Refused {
                refusal,
                reason,
                retry_after,
                _peer_open: peer_open,
                _open: open,
            })
        };
        let rate = self.with_peers(|t| t.take(peer, now));
        if let Err(wait) = rate {
            return refuse(
                Refusal::RateLimited,
                RefuseReason::PeerConnectionRate,
                wait,
                held,
            );
        }
        let Some(connection) = self.connections.try_acquire() else {
            return refuse(
                Refusal::Busy,
                RefuseReason::MaxConnections,
                Duration::ZERO,
                held,
            );
        };
        let idle = self.handshakes.in_use() == 0;
        let Some(handshake) = self.handshakes.try_acquire() else {
            let wait = lock(&self.queue).place(
                now,
                self.limits.max_handshakes,
                self.limits.busy_retry_after,
            );
            return refuse(Refusal::Busy, RefuseReason::MaxHandshakes, wait, held);
        };
        if idle {
            lock(&self.queue).busy_from(now);
        }
        let Some(peer_handshake) = self.with_peers(|t| t.handshake(peer, now)) else {
            return refuse(
                Refusal::Busy,
                RefuseReason::PeerHandshakes,
                Duration::ZERO,
                held,
            );
        };
        let (peer_open, open) = held;
        Decision::Admit(Ticket {
            _peer_open: peer_open,
            _open: open,
            _connection: connection,
            handshake: Some((handshake, peer_handshake)),
            admitted_at: now,
            queue: self.queue.clone(),
        })
    }

    /// Runs `f` on the peer table. A panic while holding the lock cannot
    /// leave a bucket half-updated in a way that matters; serve rather
    /// than refuse everyone from then on.
    fn with_peers<T>(&self, f: impl FnOnce(&mut PeerTable) -> T) -> T {
        match self.peers.lock() {
            Ok(mut t) => f(&mut t),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// The `retry-after` for a refusal whose condition clears in `wait`:
    /// never sooner than the base, jittered upwards.
    pub fn retry_after(&self, wait: Duration, draw: u64) -> Duration {
        jittered(
            wait.max(self.limits.busy_retry_after),
            self.limits.retry_jitter_percent,
            draw,
        )
    }

    /// A fresh message budget for one session.
    pub fn message_bucket(&self, now: Instant) -> TokenBucket {
        TokenBucket::full(
            self.limits.session_message_burst,
            self.limits.session_message_refill,
            now,
        )
    }

    pub fn usage(&self) -> Usage {
        let peers = match self.peers.lock() {
            Ok(t) => t.peers.len(),
            Err(poisoned) => poisoned.into_inner().peers.len(),
        };
        Usage {
            open: self.open.in_use(),
            connections: self.connections.in_use(),
            handshakes: self.handshakes.in_use(),
            peers,
            limits: self.limits,
        }
    }
}

#[cfg(test)]
mod tests;
