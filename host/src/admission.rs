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
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const S: Duration = Duration::from_secs(1);

    fn limits(edit: impl FnOnce(&mut AdmissionConfig)) -> Limits {
        let mut c = AdmissionConfig::default();
        edit(&mut c);
        Limits::new(16, &c).unwrap()
    }

    /// splitmix64: a fixed, well-spread sequence of draws.
    fn draws(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let l = Limits::new(2048, &AdmissionConfig::default()).unwrap();
        assert_eq!(l.max_handshakes, 256);
        assert_eq!(l.max_open, 4096);
        assert_eq!(l.max_open_per_peer, 16);
        assert_eq!(l.max_handshakes_per_peer, 2);
        assert_eq!(l.busy_retry_after, 5 * S);
        assert_eq!(l.retry_jitter_percent, 100);
        assert_eq!(
            (l.peer_connection_burst, l.peer_connection_refill),
            (10, 6 * S)
        );
        assert_eq!(
            (l.session_message_burst, l.session_message_refill),
            (32, S / 2)
        );
        assert_eq!(l.max_peers, 8192);
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        let bad = |edit: fn(&mut AdmissionConfig), key: &str| {
            let mut c = AdmissionConfig::default();
            edit(&mut c);
            match Limits::new(16, &c) {
                Err(AdmissionConfigError::OutOfRange { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        };
        bad(|c| c.max_handshakes = 0, "max_handshakes");
        bad(|c| c.max_open = Some(15), "max_open");
        bad(|c| c.max_open_per_peer = Some(0), "max_open_per_peer");
        bad(
            |c| {
                c.max_open = Some(20);
                c.max_open_per_peer = Some(21);
            },
            "max_open_per_peer",
        );
        // Unset, it follows a low max_open down.
        let low = AdmissionConfig {
            max_open: Some(16),
            ..AdmissionConfig::default()
        };
        assert_eq!(Limits::new(8, &low).unwrap().max_open_per_peer, 16);
        let lower = AdmissionConfig {
            max_open: Some(10),
            ..AdmissionConfig::default()
        };
        assert_eq!(Limits::new(8, &lower).unwrap().max_open_per_peer, 10);
        bad(|c| c.busy_retry_after_ms = 0, "busy_retry_after_ms");
        bad(|c| c.retry_jitter_percent = 101, "retry_jitter_percent");
        bad(|c| c.peer_connection_burst = 0, "peer_connection_burst");
        bad(
            |c| c.peer_connection_refill_ms = 0,
            "peer_connection_refill_ms",
        );
        bad(
            |c| c.session_message_burst = MAX_BURST + 1,
            "session_message_burst",
        );
        bad(
            |c| c.session_message_refill_ms = 0,
            "session_message_refill_ms",
        );
        bad(|c| c.max_peers = 0, "max_peers");
        bad(
            |c| c.max_handshakes_per_peer = Some(0),
            "max_handshakes_per_peer",
        );
        bad(
            |c| c.max_handshakes_per_peer = Some(c.max_handshakes + 1),
            "max_handshakes_per_peer",
        );
        // Unset, it follows a low max_handshakes down.
        let one = AdmissionConfig {
            max_handshakes: 1,
            ..AdmissionConfig::default()
        };
        assert_eq!(Limits::new(8, &one).unwrap().max_handshakes_per_peer, 1);
    }

    #[test]
    fn stalled_handshakes_of_a_few_vms_cannot_fill_the_node() {
        // 28 cooperating VMs each trying to keep 9 handshakes stalled
        // (the review's figure: 252 of 256) get 2 each; a good guest
        // still gets a slot.
        let ac = AdmissionControl::new(
            Limits::new(2048, &AdmissionConfig::default()).unwrap(),
            Instant::now(),
        );
        let now = Instant::now();
        let mut held = Vec::new();
        let mut busy = 0;
        for vm in 0..28 {
            for _ in 0..9 {
                match ac.admit(&format!("vm-bad-{vm}"), now, || 0) {
                    Decision::Admit(t) => held.push(t),
                    Decision::Refuse(r) => {
                        assert_eq!(r.reason, RefuseReason::PeerHandshakes);
                        assert_eq!(r.refusal, Refusal::Busy);
                        busy += 1;
                    }
                    Decision::Close(r) => panic!("{r:?}"),
                }
            }
        }
        assert_eq!(held.len(), 28 * 2);
        assert_eq!(busy, 28 * 7);
        assert_eq!(ac.usage().handshakes, 56);
        let Decision::Admit(mut good) = ac.admit("vm-good", now, || 0) else {
            panic!("the good guest was refused");
        };
        // Established: both its slots go back; a re-attestation fits.
        good.established(now);
        assert_eq!(ac.usage().handshakes, 56);
        assert!(matches!(ac.admit("vm-good", now, || 0), Decision::Admit(_)));
        // A bad VM's stalled handshake ending frees its own slot only.
        held.pop();
        assert!(matches!(
            ac.admit("vm-bad-27", now, || 0),
            Decision::Admit(_)
        ));
    }

    /// `serve` runs on a multi-thread runtime: connections of many peers
    /// are admitted, established and dropped on both workers at once.
    /// No gate ever holds more than its limit, a refusal always names a
    /// gate that was full, and every slot comes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gates_hold_under_a_multi_thread_runtime() {
        const TASKS: usize = 8;
        const ROUNDS: usize = 2_000;
        let t0 = Instant::now();
        let ac = Arc::new(AdmissionControl::new(
            limits(|c| {
                c.max_handshakes = 5;
                c.max_open = Some(20);
                c.max_open_per_peer = Some(4);
                c.max_handshakes_per_peer = Some(2);
                c.peer_connection_burst = MAX_BURST;
                c.peer_connection_refill_ms = 1;
            }),
            t0,
        ));
        let l = *ac.limits();
        // Tickets alive and those still in their handshake, counted by
        // the holders themselves, and the most seen at once.
        let live = Arc::new(AtomicUsize::new(0));
        let shaking = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(Mutex::new((0usize, 0usize)));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (ac, live, shaking, peak) =
                (ac.clone(), live.clone(), shaking.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let mut draw = draws(task as u64);
                let mut held: Vec<Ticket> = Vec::new();
                let mut reasons = Vec::new();
                for round in 0..ROUNDS {
                    let peer = format!("vm-{}", (task + round) % 5);
                    match ac.admit(&peer, Instant::now(), &mut draw) {
                        Decision::Admit(t) => {
                            let n = live.fetch_add(1, Ordering::SeqCst) + 1;
                            let h = shaking.fetch_add(1, Ordering::SeqCst) + 1;
                            {
                                let mut p = peak.lock().unwrap();
                                *p = (p.0.max(n), p.1.max(h));
                            }
                            held.push(t);
                        }
                        Decision::Refuse(r) => reasons.push(r.reason),
                        Decision::Close(r) => reasons.push(r),
                    }
                    let u = ac.usage();
                    assert!(u.open <= l.max_open && u.connections <= l.max_connections);
                    assert!(u.handshakes <= l.max_handshakes, "{u:?}");
                    // Hand back or establish some, as sessions do.
                    if round % 3 == 0
                        && let Some(mut t) = held.pop()
                    {
                        if t.in_handshake() {
                            shaking.fetch_sub(1, Ordering::SeqCst);
                        }
                        live.fetch_sub(1, Ordering::SeqCst);
                        if round % 2 == 0 {
                            t.established(Instant::now());
                        }
                        drop(t);
                    } else if round % 3 == 1
                        && let Some(t) = held.iter_mut().find(|t| t.in_handshake())
                    {
                        t.established(Instant::now());
                        shaking.fetch_sub(1, Ordering::SeqCst);
                    }
                    tokio::task::yield_now().await;
                }
                for t in held.drain(..) {
                    if t.in_handshake() {
                        shaking.fetch_sub(1, Ordering::SeqCst);
                    }
                    live.fetch_sub(1, Ordering::SeqCst);
                }
                reasons
            }));
        }
        let mut reasons = Vec::new();
        for t in tasks {
            reasons.extend(t.await.unwrap());
        }
        let (most_live, most_shaking) = *peak.lock().unwrap();
        assert!(most_live <= l.max_connections, "{most_live}");
        assert!(most_shaking <= l.max_handshakes, "{most_shaking}");
        // The load was enough to reach the gates, and only the gates that
        // can fill here refused (no rate limit: the bucket refills).
        assert!(most_shaking == l.max_handshakes, "{most_shaking}");
        assert!(!reasons.is_empty());
        assert!(
            reasons
                .iter()
                .all(|r| *r != RefuseReason::PeerConnectionRate),
            "{reasons:?}"
        );
        let u = ac.usage();
        assert_eq!((u.open, u.connections, u.handshakes), (0, 0, 0));
    }

    #[test]
    fn a_message_budget_of_32_then_2_per_second() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(limits(|_| {}), t0);
        let mut b = a.message_bucket(t0);
        assert_eq!((0..100).filter(|_| b.try_take(t0).is_ok()).count(), 32);
        assert_eq!(
            (0..100).filter(|_| b.try_take(t0 + 5 * S).is_ok()).count(),
            10
        );
    }

    #[test]
    fn jitter_stays_in_its_window_and_spreads_over_it() {
        let base = 5 * S;
        assert_eq!(jittered(base, 100, 0), base);
        assert!(jittered(base, 100, u64::MAX) < 2 * base);
        assert!(jittered(base, 100, u64::MAX) > 2 * base - Duration::from_micros(1));
        assert_eq!(jittered(base, 0, u64::MAX), base);
        assert_eq!(jittered(base, 50, 1 << 63), base + base / 4);
        // Saturates instead of overflowing.
        assert_eq!(jittered(Duration::MAX, 100, u64::MAX), Duration::MAX);
        // 1,000 draws: all in [base, 2 base), no tenth of the window holding
        // more than 15 % of them (uniform: 10 % each, sd ~1 %).
        let mut draw = draws(7);
        let mut tenths = [0u32; 10];
        for _ in 0..1000 {
            let r = jittered(base, 100, draw());
            assert!(r >= base && r < 2 * base, "{r:?}");
            let i = usize::try_from((r - base).as_nanos() * 10 / base.as_nanos()).unwrap();
            tenths[i] += 1;
        }
        assert!(tenths.iter().all(|n| (50..=150).contains(n)), "{tenths:?}");
    }

    #[test]
    fn the_handshake_limit_refuses_with_busy_and_a_jittered_retry_after() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(limits(|c| c.max_handshakes = 2), t0);
        let mut draw = draws(1);
        let Decision::Admit(mut first) = a.admit("vm-1", t0, &mut draw) else {
            panic!()
        };
        let Decision::Admit(_second) = a.admit("vm-2", t0, &mut draw) else {
            panic!()
        };
        let mut retry = Vec::new();
        // Nothing measured yet: the prior hold, so places in line every
        // PRIOR_HANDSHAKE_HOLD / 2, each jittered upwards.
        let gap = PRIOR_HANDSHAKE_HOLD / 2;
        for i in 0..5u32 {
            match a.admit(&format!("vm-{}", 3 + i), t0, &mut draw) {
                Decision::Refuse(r) => {
                    assert_eq!(r.refusal, Refusal::Busy);
                    assert_eq!(r.reason, RefuseReason::MaxHandshakes);
                    let place = (gap * (i + 1)).max(MIN_QUEUE_RETRY_AFTER);
                    assert!(
                        r.retry_after >= place && r.retry_after < 2 * place,
                        "{i}: {r:?}"
                    );
                    retry.push(r.retry_after);
                }
                other => panic!("{other:?}"),
            }
        }
        retry.dedup();
        assert!(retry.len() > 1, "not jittered: {retry:?}");
        assert_eq!(a.usage().handshakes, 2);
        // Established: the handshake slot goes back, the connection stays.
        first.established(t0);
        assert!(!first.in_handshake());
        let u = a.usage();
        assert_eq!((u.handshakes, u.connections, u.open), (1, 2, 2));
        assert!(matches!(a.admit("vm-9", t0, &mut draw), Decision::Admit(_)));
        // Every dropped ticket and refusal gave its slots back.
        let u = a.usage();
        assert_eq!((u.handshakes, u.connections, u.open), (1, 2, 2));
    }

    /// Issue #14: 1,024 guests at once against the default 256 handshake
    /// slots. The 768 refused are told to come back at the rate the host
    /// completes handshakes (here one every 100 ms / 256), all within a
    /// second, not after a fixed 5-10 s.
    #[test]
    fn a_booting_node_is_told_to_return_at_the_measured_service_rate() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(Limits::new(2048, &AdmissionConfig::default()).unwrap(), t0);
        let mut draw = draws(11);
        // Earlier handshakes held their slots 100 ms each.
        for i in 0..16 {
            let Decision::Admit(mut t) = a.admit(&format!("vm-warm-{i}"), t0, &mut draw) else {
                panic!()
            };
            t.established(t0 + S / 10);
        }
        let now = t0 + S / 10;
        let mut held = Vec::new();
        let mut waits = Vec::new();
        for i in 0..1024 {
            match a.admit(&format!("vm-{i}"), now, &mut draw) {
                Decision::Admit(t) => held.push(t),
                Decision::Refuse(r) => {
                    assert_eq!(r.reason, RefuseReason::MaxHandshakes);
                    waits.push(r.retry_after);
                }
                Decision::Close(r) => panic!("{r:?}"),
            }
        }
        assert_eq!((held.len(), waits.len()), (256, 768));
        // Places every 100 ms / 256: the last at 300 ms, jittered up to
        // twice that; none before the floor.
        assert!(waits.iter().all(|w| *w >= MIN_QUEUE_RETRY_AFTER));
        let last = *waits.iter().max().unwrap();
        assert!(last < 600 * S / 1000, "{last:?}");
        assert!(last > 250 * S / 1000, "{last:?}");
        // Spread: no tenth of [0, 600 ms) holds more than a third.
        let mut tenths = [0u32; 10];
        for w in &waits {
            tenths[usize::try_from(w.as_millis() / 60).unwrap().min(9)] += 1;
        }
        assert!(tenths.iter().all(|n| *n <= 256), "{tenths:?}");
    }

    #[test]
    fn a_host_that_makes_no_progress_pushes_the_line_out_to_the_cap() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(limits(|c| c.max_handshakes = 4), t0);
        let mut draw = draws(12);
        let held: Vec<_> = (0..4)
            .map(|i| a.admit(&format!("vm-{i}"), t0, &mut draw))
            .collect();
        assert!(held.iter().all(|d| matches!(d, Decision::Admit(_))));
        // 60 s without a handshake completing: each place is 15 s out,
        // so the wait is the cap (the base, 5 s), jittered; never more.
        let later = t0 + 60 * S;
        for i in 0..50 {
            match a.admit(&format!("vm-late-{i}"), later, &mut draw) {
                Decision::Refuse(r) => {
                    assert!(r.retry_after >= 5 * S && r.retry_after < 10 * S, "{r:?}");
                }
                other => panic!("{other:?}"),
            }
        }
        // The queue's own arithmetic: the places never pass the cap and
        // never come sooner than the floor.
        let mut q = HandshakeQueue::new(t0);
        q.completed(Duration::from_millis(40), t0);
        for _ in 0..10_000 {
            let w = q.place(t0, 256, 5 * S);
            assert!(w >= MIN_QUEUE_RETRY_AFTER && w <= 5 * S, "{w:?}");
        }
        // Time passes and handshakes complete again: the line has emptied
        // by itself.
        let later = t0 + 3600 * S;
        q.completed(Duration::from_millis(40), later);
        assert_eq!(q.place(later, 256, 5 * S), MIN_QUEUE_RETRY_AFTER);
    }

    #[test]
    fn the_connection_limit_and_the_hard_ceiling() {
        let t0 = Instant::now();
        let l = Limits::new(
            2,
            &AdmissionConfig {
                max_open: Some(3),
                ..AdmissionConfig::default()
            },
        )
        .unwrap();
        let a = AdmissionControl::new(l, t0);
        let mut draw = draws(2);
        let held: Vec<_> = (0..2).map(|_| a.admit("vm-1", t0, &mut draw)).collect();
        assert!(held.iter().all(|d| matches!(d, Decision::Admit(_))));
        let refused = a.admit("vm-2", t0, &mut draw);
        assert!(matches!(
            &refused,
            Decision::Refuse(Refused {
                refusal: Refusal::Busy,
                reason: RefuseReason::MaxConnections,
                ..
            })
        ));
        // Two served and one being refused: the next one is not even told.
        assert!(matches!(
            a.admit("vm-3", t0, &mut draw),
            Decision::Close(RefuseReason::MaxOpen)
        ));
        drop(refused);
        assert!(matches!(
            a.admit("vm-3", t0, &mut draw),
            Decision::Refuse(_)
        ));
        drop(held);
        assert_eq!(a.usage().open, 0);
    }

    #[test]
    fn a_peer_over_its_connection_rate_is_rate_limited_until_it_refills() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(
            limits(|c| {
                c.peer_connection_burst = 3;
                c.peer_connection_refill_ms = 60_000;
                c.busy_retry_after_ms = 1_000;
            }),
            t0,
        );
        let mut draw = draws(3);
        for _ in 0..3 {
            assert!(matches!(a.admit("vm-1", t0, &mut draw), Decision::Admit(_)));
        }
        match a.admit("vm-1", t0 + 10 * S, &mut draw) {
            Decision::Refuse(r) => {
                assert_eq!(r.refusal, Refusal::RateLimited);
                assert_eq!(r.reason, RefuseReason::PeerConnectionRate);
                // The token comes 60 s after t0: told to wait 50..100 s.
                assert!(r.retry_after >= 50 * S && r.retry_after < 100 * S, "{r:?}");
            }
            other => panic!("{other:?}"),
        }
        // Another peer is not affected; the first gets a token back later.
        assert!(matches!(
            a.admit("vm-2", t0 + 10 * S, &mut draw),
            Decision::Admit(_)
        ));
        assert!(matches!(
            a.admit("vm-1", t0 + 60 * S, &mut draw),
            Decision::Admit(_)
        ));
    }

    #[test]
    fn the_peer_table_is_bounded_and_evicts_only_refilled_peers() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(
            limits(|c| {
                c.max_peers = 100;
                c.peer_connection_burst = 2;
                c.peer_connection_refill_ms = 1_000;
            }),
            t0,
        );
        let mut draw = draws(4);
        // 10,000 peers, one connection each, 1 ms apart: the table never
        // holds more than 100, and peers whose buckets refilled make room.
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(i.into());
            let d = a.admit(&format!("vm-{i}"), now, &mut draw);
            assert!(a.usage().peers <= 100);
            assert!(!matches!(d, Decision::Close(_)));
        }
        assert_eq!(a.usage().peers, 100);
        // A table full of peers that have not refilled: newcomers share the
        // overflow bucket (burst 2), so a flood of new names stays bounded.
        let now = t0 + Duration::from_secs(20);
        let b = AdmissionControl::new(
            limits(|c| {
                c.max_peers = 10;
                c.peer_connection_burst = 2;
                c.peer_connection_refill_ms = 60_000;
            }),
            t0,
        );
        for i in 0..10 {
            assert!(matches!(
                b.admit(&format!("vm-{i}"), now, &mut draw),
                Decision::Admit(_)
            ));
        }
        let admitted = (10..1000)
            .filter(|i| {
                matches!(
                    b.admit(&format!("vm-{i}"), now, &mut draw),
                    Decision::Admit(_)
                )
            })
            .count();
        assert_eq!(admitted, 2);
        assert_eq!(b.usage().peers, 10);
        // A known peer keeps its own bucket.
        assert!(matches!(
            b.admit("vm-0", now, &mut draw),
            Decision::Admit(_)
        ));
    }

    #[test]
    fn one_peer_cannot_hold_more_than_its_open_transports() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(
            limits(|c| {
                c.max_open = Some(64);
                c.max_open_per_peer = Some(4);
                c.peer_connection_burst = 100;
            }),
            t0,
        );
        let mut draw = draws(5);
        // vm-evil holds 4 (served or refused alike); the 5th is closed at
        // once and takes no shared slot.
        let held: Vec<_> = (0..4).map(|_| a.admit("vm-evil", t0, &mut draw)).collect();
        assert!(held.iter().all(|d| !matches!(d, Decision::Close(_))));
        for _ in 0..100 {
            assert!(matches!(
                a.admit("vm-evil", t0, &mut draw),
                Decision::Close(RefuseReason::PeerOpen)
            ));
        }
        assert_eq!(a.usage().open, 4);
        // Everyone else is served.
        assert!(matches!(a.admit("vm-1", t0, &mut draw), Decision::Admit(_)));
        // One closed by vm-evil frees one of its slots.
        let mut held = held;
        held.pop();
        assert!(!matches!(
            a.admit("vm-evil", t0, &mut draw),
            Decision::Close(_)
        ));
    }

    #[test]
    fn a_peer_holding_transports_is_never_evicted() {
        let t0 = Instant::now();
        let a = AdmissionControl::new(
            limits(|c| {
                c.max_peers = 1;
                c.max_open_per_peer = Some(2);
                c.peer_connection_burst = 10;
                c.peer_connection_refill_ms = 1;
            }),
            t0,
        );
        let mut draw = draws(6);
        let held = a.admit("vm-1", t0, &mut draw);
        assert!(matches!(held, Decision::Admit(_)));
        // Long after, its bucket is full again, but it holds a transport:
        // a newcomer shares the overflow entry instead of evicting it.
        let later = t0 + 60 * S;
        let other = a.admit("vm-2", later, &mut draw);
        assert!(matches!(other, Decision::Admit(_)));
        let second = a.admit("vm-1", later, &mut draw);
        assert!(matches!(second, Decision::Admit(_)));
        // vm-1 keeps its count: its third is closed.
        assert!(matches!(
            a.admit("vm-1", later, &mut draw),
            Decision::Close(RefuseReason::PeerOpen)
        ));
        drop((held, second));
        // Holding nothing, it may be evicted now.
        assert!(matches!(
            a.admit("vm-3", later, &mut draw),
            Decision::Admit(_)
        ));
    }
}
