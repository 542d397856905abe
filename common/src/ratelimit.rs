//! Rate-limited logging: no fault, and no peer, can shrink the log horizon.
//!
//! Every log line on a path a peer can trigger goes through [`rl_error!`],
//! [`rl_warn!`] or [`rl_info!`] (crate root). Each macro invocation is a
//! call site with its own token bucket, and optionally one bucket per peer
//! (a VM identity) so one noisy VM cannot use up the site's budget for the
//! others. A line that a bucket refuses is counted, not written; the next
//! line the bucket admits carries `suppressed=N` and `suppressed_for_s=S`
//! so the log says how much it dropped and over how long.
//!
//! A burst that ends is reported even if its call site never fires
//! again: a site that drops a line registers itself (at most
//! [`MAX_PENDING_SITES`] at once), and the daemons call
//! [`log_summaries`] every [`SUMMARY_INTERVAL`]: for each registered site
//! whose window has closed (its buckets would admit a line again) one
//! line says how many lines it suppressed, over how long, and where; at
//! most [`MAX_SUMMARY_LINES`] such lines per call, the rest in one line.
//!
//! Bounds: per site, at most [`MAX_PEERS_PER_SITE`] peer buckets (later
//! peers share one overflow bucket); each bucket is a few words. The
//! process-wide count of suppressed lines ([`suppressed_total`]) stays
//! exact for metrics even when the lines do not.
//!
//! Time comes from the caller (`now`), so the limiter itself is testable
//! with virtual time; the macros pass `Instant::now()`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines a call site may write in a burst.
pub const SITE_BURST: u32 = 20;
/// Sustained lines per minute per call site: 20/min is ~29k lines a day
/// from one site at worst, a few MB.
pub const SITE_PER_MINUTE: u32 = 20;
/// Lines one peer may cause at one call site in a burst.
pub const PEER_BURST: u32 = 5;
/// Sustained lines per hour per peer per call site.
pub const PEER_PER_HOUR: u32 = 6;
/// Peer buckets kept per call site; more peers share one bucket.
pub const MAX_PEERS_PER_SITE: usize = 2048;

/// Sites with suppressed lines not yet reported, at once. Past it a site
/// reports only on its next admitted line, as before.
pub const MAX_PENDING_SITES: usize = 1024;
/// How often the daemons report closed suppression windows.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Summary lines per [`log_summaries`] call; more sites share one line.
pub const MAX_SUMMARY_LINES: usize = 16;

static SUPPRESSED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Call sites with suppressed lines not yet reported.
static PENDING: Mutex<Vec<&'static CallSite>> = Mutex::new(Vec::new());

/// Lines suppressed by every limiter of this process since it started.
pub fn suppressed_total() -> u64 {
    SUPPRESSED_TOTAL.load(Ordering::Relaxed)
}

/// A token bucket that counts what it refuses.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    capacity: u32,
    /// Time to earn one token.
    period: Duration,
    tokens: u32,
    last_refill: Option<Instant>,
    suppressed: u64,
    suppressed_since: Option<Instant>,
}

/// A bucket's verdict on one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write the line; `suppressed` lines were dropped in the
    /// `suppressed_for` before it.
    Write {
        suppressed: u64,
        suppressed_for: Duration,
    },
    Drop,
}

impl Bucket {
    /// `capacity` lines at once, then one per `period`.
    pub const fn new(capacity: u32, period: Duration) -> Self {
        Self {
            capacity,
            period,
            tokens: capacity,
            last_refill: None,
            suppressed: 0,
            suppressed_since: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let Some(last) = self.last_refill else {
            self.last_refill = Some(now);
            return;
        };
        if self.tokens >= self.capacity || self.period.is_zero() {
            self.tokens = self.capacity;
            self.last_refill = Some(now);
            return;
        }
        let earned = now.saturating_duration_since(last).as_nanos() / self.period.as_nanos();
        let missing = self.capacity - self.tokens;
        if earned >= u128::from(missing) {
            self.tokens = self.capacity;
            self.last_refill = Some(now);
        } else if earned > 0 {
            // earned < missing, so it fits. Keep the remainder so a slow
            // drip still earns tokens.
            let earned = u32::try_from(earned).unwrap_or(missing);
            self.tokens += earned;
            self.last_refill = Some(last + self.period * earned);
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    fn note_drop(&mut self, now: Instant) {
        self.suppressed += 1;
        self.suppressed_since.get_or_insert(now);
        SUPPRESSED_TOTAL.fetch_add(1, Ordering::Relaxed);
    }

    /// The window closed: a line would be admitted now, and lines were
    /// dropped. Takes the count (and the time since the first drop).
    fn take_closed(&mut self, now: Instant) -> Option<(u64, Duration)> {
        if self.suppressed == 0 {
            return None;
        }
        self.refill(now);
        if self.tokens == 0 {
            return None;
        }
        match self.report(now) {
            Admit::Write {
                suppressed,
                suppressed_for,
            } => Some((suppressed, suppressed_for)),
            Admit::Drop => None,
        }
    }

    fn report(&mut self, now: Instant) -> Admit {
        let suppressed = std::mem::take(&mut self.suppressed);
        let since = self.suppressed_since.take();
        Admit::Write {
            suppressed,
            suppressed_for: since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
        }
    }

    /// Decides on one line at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        if self.take(now) {
            self.report(now)
        } else {
            self.note_drop(now);
            Admit::Drop
        }
    }
}

#[derive(Debug)]
struct SiteState {
    site: Bucket,
    peers: BTreeMap<String, Bucket>,
    overflow: Bucket,
}

/// One call site of a rate-limited log macro.
#[derive(Debug)]
pub struct CallSite {
    state: Mutex<SiteState>,
    /// `file:line` of the macro, for summaries.
    location: &'static str,
    /// In [`PENDING`] (or refused a place there).
    pending: std::sync::atomic::AtomicBool,
}

/// What one call site suppressed in a window that has closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppression {
    pub location: &'static str,
    pub suppressed: u64,
    pub over: Duration,
}

const fn peer_bucket() -> Bucket {
    Bucket::new(PEER_BURST, Duration::from_secs(3600 / PEER_PER_HOUR as u64))
}

impl CallSite {
    pub const fn new() -> Self {
        Self::at("unknown")
    }

    /// A call site at `location` (`file:line`).
    pub const fn at(location: &'static str) -> Self {
        Self {
            state: Mutex::new(SiteState {
                site: Bucket::new(SITE_BURST, Duration::from_secs(60 / SITE_PER_MINUTE as u64)),
                peers: BTreeMap::new(),
                overflow: peer_bucket(),
            }),
            location,
            pending: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// After a drop: remember this site, so that its suppressed lines are
    /// reported when the window closes ([`flush_closed`]).
    pub fn note_pending(&'static self) {
        if self.pending.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Ok(mut p) = PENDING.lock()
            && p.len() < MAX_PENDING_SITES
        {
            p.push(self);
        }
        // Full: the flag stays set, and the site reports on its next
        // admitted line, as it always does.
    }

    /// Takes the counts of every bucket of this site whose window closed;
    /// whether any is still open.
    fn take_closed(&self, now: Instant) -> (Option<Suppression>, bool) {
        let Ok(mut s) = self.state.lock() else {
            return (None, false);
        };
        let mut total = 0u64;
        let mut over = Duration::ZERO;
        let mut open = false;
        let s = &mut *s;
        for b in std::iter::once(&mut s.site)
            .chain(std::iter::once(&mut s.overflow))
            .chain(s.peers.values_mut())
        {
            if let Some((n, d)) = b.take_closed(now) {
                total = total.saturating_add(n);
                over = over.max(d);
            }
            open |= b.suppressed > 0;
        }
        let found = (total > 0).then_some(Suppression {
            location: self.location,
            suppressed: total,
            over,
        });
        (found, open)
    }

    /// Decides on a line with no peer.
    pub fn admit(&self, now: Instant) -> Admit {
        match self.state.lock() {
            Ok(mut s) => s.site.admit(now),
            // A panic while holding the lock: keep logging, unlimited is
            // better than silent here, and the panic is logged elsewhere.
            Err(_) => Admit::Write {
                suppressed: 0,
                suppressed_for: Duration::ZERO,
            },
        }
    }

    /// Decides on a line caused by `peer`: both the peer's bucket and the
    /// site's must admit it. The suppressed count reported is the peer's.
    pub fn admit_peer(&self, peer: &str, now: Instant) -> Admit {
        let Ok(mut guard) = self.state.lock() else {
            return Admit::Write {
                suppressed: 0,
                suppressed_for: Duration::ZERO,
            };
        };
        let s = &mut *guard;
        let bucket = if let Some(b) = s.peers.get_mut(peer) {
            b
        } else if s.peers.len() < MAX_PEERS_PER_SITE {
            s.peers.entry(peer.to_owned()).or_insert(peer_bucket())
        } else {
            &mut s.overflow
        };
        if !bucket.take(now) {
            bucket.note_drop(now);
            return Admit::Drop;
        }
        if !s.site.take(now) {
            // Give the peer its token back: the site, not the peer, is over.
            bucket.tokens += 1;
            bucket.note_drop(now);
            return Admit::Drop;
        }
        bucket.report(now)
    }
}

impl Default for CallSite {
    fn default() -> Self {
        Self::new()
    }
}

/// For the macros: a dropped line registers its site as pending.
#[doc(hidden)]
pub fn noted(site: &'static CallSite, admit: Admit) -> Admit {
    if admit == Admit::Drop {
        site.note_pending();
    }
    admit
}

/// The registered sites whose suppression window has closed at `now`,
/// with their counts (taken: reported once). A site with a window still
/// open stays registered.
pub fn flush_closed(now: Instant) -> Vec<Suppression> {
    let sites: Vec<&'static CallSite> = match PENDING.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    let mut still = Vec::new();
    for site in sites {
        let (found, open) = site.take_closed(now);
        out.extend(found);
        if open {
            still.push(site);
        } else {
            site.pending.store(false, Ordering::Relaxed);
        }
    }
    if let Ok(mut p) = PENDING.lock() {
        // Sites that registered meanwhile stay too.
        still.append(&mut p);
        *p = still;
    }
    out
}

/// Writes one line per site whose suppression window closed (at most
/// [`MAX_SUMMARY_LINES`], the rest summed in one more line). The daemons
/// call it every [`SUMMARY_INTERVAL`]; bounded, so it logs directly.
pub fn log_summaries(now: Instant) {
    let found = flush_closed(now);
    for s in found.iter().take(MAX_SUMMARY_LINES) {
        ::tracing::warn!(
            site = s.location,
            suppressed = s.suppressed,
            suppressed_for_s = s.over.as_secs(),
            "log lines suppressed by the rate limiter"
        );
    }
    if found.len() > MAX_SUMMARY_LINES {
        let rest = &found[MAX_SUMMARY_LINES..];
        ::tracing::warn!(
            sites = rest.len(),
            suppressed = rest
                .iter()
                .map(|s| s.suppressed)
                .fold(0u64, u64::saturating_add),
            "log lines suppressed by the rate limiter at more sites"
        );
    }
}

/// Logs through a per-call-site limiter: `rl_log!(warn, "text {}", x)` or,
/// for lines a peer causes, `rl_log!(warn, peer: vm_id, "text {}", x)`.
#[macro_export]
macro_rules! rl_log {
    ($level:ident, peer: $peer:expr, $($arg:tt)+) => {{
        static SITE: $crate::ratelimit::CallSite =
            $crate::ratelimit::CallSite::at(concat!(file!(), ":", line!()));
        // A level that is off neither spends tokens nor counts as
        // suppressed.
        if ::tracing::enabled!($crate::rl_level!($level))
            && let $crate::ratelimit::Admit::Write { suppressed, suppressed_for } =
            $crate::ratelimit::noted(&SITE, SITE.admit_peer(
                ::core::convert::AsRef::<str>::as_ref(&$peer),
                ::std::time::Instant::now(),
            ))
        {
            if suppressed > 0 {
                ::tracing::$level!(
                    peer = %::core::convert::AsRef::<str>::as_ref(&$peer),
                    suppressed,
                    suppressed_for_s = suppressed_for.as_secs(),
                    $($arg)+
                );
            } else {
                ::tracing::$level!(peer = %::core::convert::AsRef::<str>::as_ref(&$peer), $($arg)+);
            }
        }
    }};
    ($level:ident, $($arg:tt)+) => {{
        static SITE: $crate::ratelimit::CallSite =
            $crate::ratelimit::CallSite::at(concat!(file!(), ":", line!()));
        if ::tracing::enabled!($crate::rl_level!($level))
            && let $crate::ratelimit::Admit::Write { suppressed, suppressed_for } =
            $crate::ratelimit::noted(&SITE, SITE.admit(::std::time::Instant::now()))
        {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, suppressed_for_s = suppressed_for.as_secs(), $($arg)+);
            } else {
                ::tracing::$level!($($arg)+);
            }
        }
    }};
}

/// The `tracing::Level` of an `rl_log!` level name.
#[doc(hidden)]
#[macro_export]
macro_rules! rl_level {
    (error) => {
        ::tracing::Level::ERROR
    };
    (warn) => {
        ::tracing::Level::WARN
    };
    (info) => {
        ::tracing::Level::INFO
    };
    (debug) => {
        ::tracing::Level::DEBUG
    };
    (trace) => {
        ::tracing::Level::TRACE
    };
}

/// Rate-limited `tracing::error!`. See [`rl_log!`].
#[macro_export]
macro_rules! rl_error {
    ($($arg:tt)+) => { $crate::rl_log!(error, $($arg)+) };
}

/// Rate-limited `tracing::warn!`. See [`rl_log!`].
#[macro_export]
macro_rules! rl_warn {
    ($($arg:tt)+) => { $crate::rl_log!(warn, $($arg)+) };
}

/// Rate-limited `tracing::info!`. See [`rl_log!`].
#[macro_export]
macro_rules! rl_info {
    ($($arg:tt)+) => { $crate::rl_log!(info, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_then_summary() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, Duration::from_secs(10));
        for _ in 0..3 {
            assert!(matches!(b.admit(t0), Admit::Write { suppressed: 0, .. }));
        }
        for _ in 0..100 {
            assert_eq!(b.admit(t0 + Duration::from_secs(1)), Admit::Drop);
        }
        assert_eq!(
            b.admit(t0 + Duration::from_secs(10)),
            Admit::Write {
                suppressed: 100,
                suppressed_for: Duration::from_secs(9)
            }
        );
        assert_eq!(b.admit(t0 + Duration::from_secs(11)), Admit::Drop);
    }

    #[test]
    fn a_storm_for_an_hour_writes_a_bounded_number_of_lines() {
        // 10,000 failures per second for an hour from one peer at one site.
        let site = CallSite::new();
        let t0 = Instant::now();
        let mut written = 0u64;
        let mut reported = 0u64;
        let total = 3600u64 * 10_000;
        for i in 0..total {
            let now = t0 + Duration::from_micros(i * 100);
            if let Admit::Write { suppressed, .. } = site.admit_peer("vm-1", now) {
                written += 1;
                reported += suppressed;
            }
        }
        // Burst plus the hourly rate, plus one for the boundary.
        assert!(
            written <= u64::from(PEER_BURST + PEER_PER_HOUR) + 1,
            "{written}"
        );
        // Every dropped line is accounted for by a summary or still pending.
        assert!(reported <= total - written);
        assert!(reported >= total - written - 10_000 * 600, "{reported}");
    }

    #[test]
    fn a_burst_that_ends_is_reported_once_the_window_closes() {
        static SITE: CallSite = CallSite::at("here.rs:1");
        let t0 = Instant::now();
        // A burst at one site (lines with and without a peer), then
        // nothing from it ever again.
        let mut dropped = 0u64;
        for _ in 0..100 {
            for admit in [SITE.admit(t0), SITE.admit_peer("vm-1", t0)] {
                if noted(&SITE, admit) == Admit::Drop {
                    dropped += 1;
                }
            }
        }
        assert!(dropped > 100, "{dropped}");
        let mine = |v: Vec<Suppression>| v.into_iter().find(|s| s.location == "here.rs:1");
        // Still inside the window: nothing yet, the site stays registered.
        assert_eq!(mine(flush_closed(t0 + Duration::from_secs(1))), None);
        assert!(SITE.pending.load(Ordering::Relaxed));
        // Every bucket would admit a line again (the peer's hourly one
        // after 10 min): one summary accounts for every dropped line.
        let after = t0 + Duration::from_secs(601);
        let s = mine(flush_closed(after)).expect("a summary");
        assert_eq!(s.location, "here.rs:1");
        assert_eq!(s.suppressed, dropped);
        assert_eq!(s.over, Duration::from_secs(601));
        // Reported once.
        assert_eq!(mine(flush_closed(after + Duration::from_secs(60))), None);
        assert!(!SITE.pending.load(Ordering::Relaxed));
        // A new burst registers it again.
        let t1 = after + Duration::from_secs(3600);
        for _ in 0..(SITE_BURST + 3) {
            noted(&SITE, SITE.admit(t1));
        }
        let s = mine(flush_closed(t1 + Duration::from_secs(5))).expect("a second summary");
        assert_eq!(s.suppressed, 3);
    }

    #[test]
    fn one_noisy_peer_does_not_silence_the_others() {
        let site = CallSite::new();
        let t0 = Instant::now();
        for _ in 0..1000 {
            site.admit_peer("noisy", t0);
        }
        assert!(matches!(site.admit_peer("quiet", t0), Admit::Write { .. }));
    }

    #[test]
    fn peer_buckets_are_bounded() {
        let site = CallSite::new();
        let t0 = Instant::now();
        for i in 0..(MAX_PEERS_PER_SITE + 500) {
            site.admit_peer(&format!("vm-{i}"), t0 + Duration::from_secs(i as u64 * 3));
        }
        let s = site.state.lock().unwrap();
        assert_eq!(s.peers.len(), MAX_PEERS_PER_SITE);
    }

    #[test]
    fn macros_compile_and_count() {
        let sub = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let before = suppressed_total();
            for i in 0..(SITE_BURST + 10) {
                crate::rl_warn!("test line {}", i);
            }
            assert!(suppressed_total() >= before + 10);
            crate::rl_info!(peer: "vm-9", "peer line {}", 1);
            crate::rl_error!(peer: String::from("vm-9"), error = "x", "with a field");
            // A level that is off is not logged, so it is not suppressed
            // either: its site never spends a token.
            for i in 0..(SITE_BURST + 10) {
                crate::rl_log!(trace, "off {}", i);
            }
        });
    }
}
