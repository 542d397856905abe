//! The guest's retry policy (PROTOCOL.md §13) as one small, sans-I/O type.
//!
//! The driver asks [`RetryPolicy::next_attempt`] when it may try again,
//! records each attempt with [`RetryPolicy::attempt`], and reports how it
//! ended with [`RetryPolicy::succeeded`], [`RetryPolicy::closed`],
//! [`RetryPolicy::failed`] or, for an established session that broke,
//! [`RetryPolicy::lost`]. The policy never sleeps and never reads a clock:
//! time is passed in.
//!
//! What it guarantees, whatever the sequence of failures:
//! - backoff with full jitter: `uniform(0, min(cap, base * 2^n))`, at least
//!   the floor;
//! - a lost session (the host vanished under an established session) is
//!   reconnected at `uniform(0, reconnect_spread)`, and the backoff goes on
//!   from there: a node's guests, which all lose their host at the same
//!   instant when it crashes, come back spread over two minutes, not in one
//!   burst (§13.2, the worked bound of §13.10);
//! - at most `budget` attempts in any rolling `window`; when the budget is
//!   spent the policy is dormant and allows one re-probe per
//!   `reprobe_interval` (plus jitter);
//! - permanent errors (class P of the registry, unknown codes, and local
//!   permanent failures such as a TLS pin mismatch) are never retried
//!   automatically: they go straight to dormant;
//! - a peer's `retry-after` is honoured (capped), plus up to 10 % jitter.
//!
//! Its memory is bounded by `budget` timestamps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::errors::{ErrorCode, RetryClass};

/// §13 defaults.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
pub const BACKOFF_FLOOR: Duration = Duration::from_millis(100);
pub const RETRY_BUDGET: u32 = 30;
pub const RETRY_WINDOW: Duration = Duration::from_secs(3600);
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(30 * 60);
pub const REPROBE_JITTER: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Jitter added to an honoured `retry-after`: up to hint / this (10 %).
pub const RETRY_AFTER_JITTER_DIVISOR: u32 = 10;
/// Largest budget a configuration may set: it bounds the policy's memory.
pub const MAX_RETRY_BUDGET: u32 = 1000;
/// §13.2 `RECONNECT_N`: the backoff exponent after a lost session, so the
/// first reconnection waits `U[0, BACKOFF_BASE * 2^7]` = `U[0, 128 s]`.
pub const RECONNECT_N: u32 = 7;
/// The default spread of the first reconnection after a lost session:
/// `BACKOFF_BASE * 2^RECONNECT_N`.
pub const RECONNECT_SPREAD: Duration = Duration::from_secs(1 << RECONNECT_N);

/// Tunables, validated by [`RetryConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    pub base: Duration,
    pub cap: Duration,
    pub floor: Duration,
    pub budget: u32,
    pub window: Duration,
    pub reprobe_interval: Duration,
    pub reprobe_jitter: Duration,
    pub default_retry_after: Duration,
    pub max_retry_after: Duration,
    /// The first reconnection after a lost session waits up to this long
    /// (rounded up to `base` times a power of two, at most `cap`).
    pub reconnect_spread: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base: BACKOFF_BASE,
            cap: BACKOFF_CAP,
            floor: BACKOFF_FLOOR,
            budget: RETRY_BUDGET,
            window: RETRY_WINDOW,
            reprobe_interval: REPROBE_INTERVAL,
            reprobe_jitter: REPROBE_JITTER,
            default_retry_after: DEFAULT_RETRY_AFTER,
            max_retry_after: MAX_RETRY_AFTER,
            reconnect_spread: RECONNECT_SPREAD,
        }
    }
}

impl RetryConfig {
    /// Refuses settings that would break the guarantees above.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.floor.is_zero() {
            return Err("floor must be above zero");
        }
        if self.base < self.floor || self.cap < self.base {
            return Err("need floor <= base <= cap");
        }
        if self.budget == 0 || self.budget > MAX_RETRY_BUDGET {
            return Err("budget must be 1..=1000");
        }
        if self.window.is_zero() || self.reprobe_interval.is_zero() {
            return Err("window and reprobe interval must be above zero");
        }
        if self.reconnect_spread > self.cap {
            return Err("need reconnect spread <= cap");
        }
        Ok(())
    }

    /// The backoff exponent a lost session starts from: the smallest n with
    /// `base * 2^n >= reconnect_spread` ([`RECONNECT_N`] by default).
    pub fn reconnect_exponent(&self) -> u32 {
        let mut n = 0;
        while n < 63 && exp_ceiling(self.base, self.cap, n) < self.reconnect_spread {
            n += 1;
        }
        n
    }

    /// The most attempts any rolling window can hold: the budget plus the
    /// re-probes that fit in one window.
    pub fn max_attempts_per_window(&self) -> u64 {
        // Re-probes are at least one interval apart, and a window is
        // half-open, so it holds ceil(window / interval) of them.
        let reprobes = self
            .window
            .as_nanos()
            .div_ceil(self.reprobe_interval.as_nanos());
        u64::from(self.budget).saturating_add(u64::try_from(reprobes).unwrap_or(u64::MAX))
    }
}

/// How an attempt failed, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer: refused, reset, timed out, truncated stream.
    Transport,
    /// The peer answered with an error code (or a goodbye carrying a hint).
    Code {
        code: ErrorCode,
        retry_after: Option<Duration>,
    },
    /// A failure no retry can fix (TLS pin mismatch, ALPN refusal, local
    /// misconfiguration).
    Permanent,
}

/// When the driver may try next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Not before this instant.
    At(Instant),
    /// Dormant: only the re-probe at this instant.
    Dormant(Instant),
}

impl Next {
    pub fn instant(self) -> Instant {
        match self {
            Self::At(t) | Self::Dormant(t) => t,
        }
    }
}

/// A small deterministic generator (SplitMix64): jitter needs spread, not
/// secrecy. Seed it from the OS in the agents and from a constant in tests.
/// The guest session draws its re-enable delay (§12.3) with it too.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max]`.
    pub(crate) fn upto(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos();
        if nanos == 0 {
            return Duration::ZERO;
        }
        let r = u128::from(self.next_u64()) % (nanos + 1);
        Duration::from_nanos(u64::try_from(r).unwrap_or(u64::MAX))
    }
}

/// `min(cap, base * 2^n)`, saturating.
fn exp_ceiling(base: Duration, cap: Duration, n: u32) -> Duration {
    base.checked_mul(1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(cap)
        .min(cap)
}

/// The retry state of one guest towards its host.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    config: RetryConfig,
    jitter: Jitter,
    /// Failures since the last success.
    consecutive: u32,
    /// The backoff exponent n of §13.2: `consecutive`, except that a lost
    /// session raises it to the reconnect exponent.
    exponent: u32,
    /// Start times of the attempts in the current window, oldest first; at
    /// most `budget` entries.
    recent: VecDeque<Instant>,
    next: Option<Next>,
}

impl RetryPolicy {
    /// `config` must pass [`RetryConfig::validate`]; an invalid one is
    /// replaced by the defaults (the caller validated it at load).
    pub fn new(config: RetryConfig, seed: u64) -> Self {
        let config = if config.validate().is_ok() {
            config
        } else {
            RetryConfig::default()
        };
        Self {
            config,
            jitter: Jitter(seed),
            consecutive: 0,
            exponent: 0,
            recent: VecDeque::with_capacity(config.budget as usize),
            next: None,
        }
    }

    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    /// When the next attempt may start (`now` if nothing holds it back).
    pub fn next_attempt(&self, now: Instant) -> Next {
        self.next.unwrap_or(Next::At(now))
    }

    pub fn is_dormant(&self) -> bool {
        matches!(self.next, Some(Next::Dormant(_)))
    }

    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Records that an attempt starts at `now`. Returns false (and records
    /// nothing) if the policy does not allow an attempt yet.
    pub fn attempt(&mut self, now: Instant) -> bool {
        if now < self.next_attempt(now).instant() {
            return false;
        }
        self.expire(now);
        if self.recent.len() >= self.config.budget as usize && !self.is_dormant() {
            // Budget spent: only a dormant re-probe may go ahead.
            self.next = Some(self.dormant_until(now));
            return false;
        }
        if self.recent.len() >= self.config.budget as usize {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        true
    }

    /// The attempt that started last succeeded: leave backoff and dormancy.
    pub fn succeeded(&mut self) {
        self.consecutive = 0;
        self.exponent = 0;
        self.next = None;
    }

    /// The session ended without a failure at `now` (a `goodbye`, a
    /// re-attestation, one-shot work done): §13.2 keeps the failure count
    /// as it is and asks for no backoff, but a `retry-after` the peer gave
    /// is honoured (§13.5) and the budget still applies (§13.3).
    pub fn closed(&mut self, now: Instant, retry_after: Option<Duration>) -> Next {
        self.expire(now);
        let earliest = match retry_after {
            Some(hint) => {
                let hint = hint.min(self.config.max_retry_after);
                let spread = self.jitter.upto(hint / RETRY_AFTER_JITTER_DIVISOR);
                now + hint + spread
            }
            None => now,
        };
        let next = self.limit(now, Next::At(earliest));
        self.next = Some(next);
        next
    }

    /// The attempt failed at `now`; returns when the next may start.
    pub fn failed(&mut self, now: Instant, failure: Failure) -> Next {
        self.consecutive = self.consecutive.saturating_add(1);
        self.exponent = self.exponent.saturating_add(1);
        self.failure(now, failure)
    }

    /// An established session (reported with [`RetryPolicy::succeeded`])
    /// ended at `now` by `failure` instead of a `goodbye`: the host
    /// crashed, the connection broke, a keepalive went unanswered. §13.2:
    /// n is raised to the reconnect exponent, so the first reconnection
    /// waits `U[0, reconnect_spread]` (128 s by default) and later ones go
    /// on doubling from there. Every guest of a node loses its session at
    /// the same instant when the host dies; this is what spreads their
    /// return. A `retry-after` the failure carries still applies (§13.6),
    /// and a permanent failure still goes dormant.
    pub fn lost(&mut self, now: Instant, failure: Failure) -> Next {
        self.consecutive = self.consecutive.saturating_add(1);
        self.exponent = self
            .exponent
            .saturating_add(1)
            .max(self.config.reconnect_exponent());
        self.failure(now, failure)
    }

    fn failure(&mut self, now: Instant, failure: Failure) -> Next {
        self.expire(now);
        let next = match failure {
            Failure::Permanent => self.dormant_until(now),
            Failure::Code { code, retry_after } => match code.class() {
                RetryClass::Permanent => self.dormant_until(now),
                RetryClass::AfterHint => {
                    let hint = retry_after
                        .unwrap_or(self.config.default_retry_after)
                        .min(self.config.max_retry_after)
                        .max(self.config.floor);
                    let spread = self.jitter.upto(hint / RETRY_AFTER_JITTER_DIVISOR);
                    self.limit(now, Next::At(now + hint + spread))
                }
                RetryClass::Backoff => {
                    let d = self.backoff_delay();
                    self.limit(now, Next::At(now + d))
                }
            },
            Failure::Transport => {
                let d = self.backoff_delay();
                self.limit(now, Next::At(now + d))
            }
        };
        self.next = Some(next);
        next
    }

    fn backoff_delay(&mut self) -> Duration {
        // §13.2: n is the number of consecutive failures so far (already
        // counted for this one), so the first wait is U[0, 2 s]; after a
        // lost session it starts at the reconnect exponent instead.
        let ceiling = exp_ceiling(self.config.base, self.config.cap, self.exponent);
        self.jitter.upto(ceiling).max(self.config.floor)
    }

    /// Goes dormant instead when the budget of the window is spent.
    fn limit(&mut self, now: Instant, next: Next) -> Next {
        if self.recent.len() >= self.config.budget as usize {
            // The next attempt would exceed the budget unless the oldest
            // one has left the window by then.
            let oldest = self.recent[0];
            if next.instant() < oldest + self.config.window {
                return self.dormant_until(now);
            }
        }
        next
    }

    fn dormant_until(&mut self, now: Instant) -> Next {
        let j = self.jitter.upto(self.config.reprobe_jitter);
        Next::Dormant(now + self.config.reprobe_interval + j)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) >= self.config.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(c: ErrorCode, ms: Option<u64>) -> Failure {
        Failure::Code {
            code: c,
            retry_after: ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn permanent_errors_go_dormant_at_once() {
        let t0 = Instant::now();
        for f in [
            code(ErrorCode::UnknownMessage, None),
            code(ErrorCode::UnsupportedVersion, None),
            code(ErrorCode::AttestationFailed, None),
            code(ErrorCode::Unknown(999), Some(10)),
            Failure::Permanent,
        ] {
            let mut p = RetryPolicy::new(RetryConfig::default(), 7);
            assert!(p.attempt(t0));
            let next = p.failed(t0, f);
            assert!(matches!(next, Next::Dormant(_)), "{f:?}");
            assert!(next.instant() >= t0 + REPROBE_INTERVAL);
            assert!(next.instant() <= t0 + REPROBE_INTERVAL + REPROBE_JITTER);
            assert!(!p.attempt(t0 + Duration::from_secs(60)));
        }
    }

    #[test]
    fn an_orderly_close_needs_no_backoff_but_honours_retry_after_and_budget() {
        let t0 = Instant::now();
        let mut p = RetryPolicy::new(RetryConfig::default(), 3);
        assert!(p.attempt(t0));
        p.succeeded();
        assert_eq!(p.closed(t0, None), Next::At(t0));
        assert!(p.attempt(t0));
        let next = p.closed(t0, Some(Duration::from_secs(30))).instant();
        assert!(next >= t0 + Duration::from_secs(30));
        assert!(next <= t0 + Duration::from_secs(33));
        assert!(!p.attempt(t0 + Duration::from_secs(29)));
        // A host that ends every session at once cannot make the guest
        // exceed its budget: the budget's end is dormancy.
        let mut p = RetryPolicy::new(RetryConfig::default(), 4);
        let mut t = t0;
        let mut attempts = 0u64;
        let end = t0 + RETRY_WINDOW;
        while t < end {
            if p.attempt(t) {
                attempts += 1;
                p.succeeded();
                p.closed(t, None);
            }
            t = p
                .next_attempt(t)
                .instant()
                .max(t + Duration::from_millis(10));
        }
        assert!(attempts >= u64::from(RETRY_BUDGET), "{attempts}");
        assert!(
            attempts <= RetryConfig::default().max_attempts_per_window(),
            "{attempts}"
        );
    }

    #[test]
    fn retry_after_is_honoured_with_at_most_ten_percent_jitter() {
        let t0 = Instant::now();
        let mut p = RetryPolicy::new(RetryConfig::default(), 1);
        p.attempt(t0);
        let next = p.failed(t0, code(ErrorCode::Busy, Some(2500))).instant();
        assert!(next >= t0 + Duration::from_millis(2500));
        assert!(next <= t0 + Duration::from_millis(2750));
        // Missing hint: the default; huge hint: capped.
        p.attempt(next);
        let n2 = p
            .failed(next, code(ErrorCode::FeatureDisabled, None))
            .instant();
        assert!(n2 >= next + DEFAULT_RETRY_AFTER);
        p.attempt(n2);
        let n3 = p
            .failed(n2, code(ErrorCode::ShuttingDown, Some(u64::MAX / 4)))
            .instant();
        assert!(n3 <= n2 + MAX_RETRY_AFTER + MAX_RETRY_AFTER / 10);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter_and_success_resets() {
        let mut t = Instant::now();
        let mut p = RetryPolicy::new(RetryConfig::default(), 3);
        let mut max_seen = Duration::ZERO;
        // §13.2: after the n-th failure in a row, U[0, min(cap, base·2^n)].
        for n in 1..=20u32 {
            assert!(p.attempt(t));
            let next = p.failed(t, Failure::Transport);
            let Next::At(at) = next else { break };
            let d = at - t;
            let ceiling = (BACKOFF_BASE * 2u32.pow(n)).min(BACKOFF_CAP);
            assert!(
                d >= BACKOFF_FLOOR && d <= ceiling.max(BACKOFF_FLOOR),
                "n={n} d={d:?}"
            );
            max_seen = max_seen.max(d);
            t = at;
        }
        assert!(
            max_seen > Duration::from_secs(30),
            "jitter never reached high: {max_seen:?}"
        );
        p.succeeded();
        assert_eq!(p.consecutive_failures(), 0);
        assert_eq!(p.next_attempt(t), Next::At(t));
    }

    #[test]
    fn a_lost_session_reconnects_within_the_spread_and_backs_off_from_there() {
        let cfg = RetryConfig::default();
        assert_eq!(cfg.reconnect_exponent(), RECONNECT_N);
        let t = Instant::now();
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for seed in 0..2000 {
            let mut p = RetryPolicy::new(cfg, seed);
            assert!(p.attempt(t));
            p.succeeded();
            let Next::At(at) = p.lost(t, Failure::Transport) else {
                panic!("a lost session is not dormant")
            };
            let d = at - t;
            assert!(d >= BACKOFF_FLOOR && d <= RECONNECT_SPREAD, "{d:?}");
            lo = lo.min(d);
            hi = hi.max(d);
            assert_eq!(p.consecutive_failures(), 1);
            // The reconnection fails too: n = 8, up to 256 s.
            assert!(p.attempt(at));
            let Next::At(at2) = p.failed(at, Failure::Transport) else {
                panic!("dormant after two failures")
            };
            assert!(at2 - at <= Duration::from_secs(256));
            // It succeeds at last: back to the ordinary first backoff.
            assert!(p.attempt(at2));
            p.succeeded();
            let Next::At(at3) = p.failed(at2, Failure::Transport) else {
                panic!()
            };
            assert!(at3 - at2 <= Duration::from_secs(2));
        }
        // Full jitter: the draws cover the spread.
        assert!(lo < Duration::from_secs(2), "{lo:?}");
        assert!(hi > Duration::from_secs(126), "{hi:?}");
    }

    #[test]
    fn a_lost_session_still_honours_retry_after_and_permanent_errors() {
        let t = Instant::now();
        let mut p = RetryPolicy::new(RetryConfig::default(), 5);
        assert!(p.attempt(t));
        p.succeeded();
        let hint = Duration::from_secs(600);
        let at = p.lost(t, code(ErrorCode::Busy, Some(600_000))).instant();
        assert!(at >= t + hint && at <= t + hint + hint / 10, "{:?}", at - t);
        let mut p = RetryPolicy::new(RetryConfig::default(), 6);
        assert!(p.attempt(t));
        p.succeeded();
        assert!(matches!(
            p.lost(t, Failure::Permanent),
            Next::Dormant(d) if d >= t + REPROBE_INTERVAL
        ));
    }

    #[test]
    fn the_reconnect_spread_is_tunable_and_bounded_by_the_cap() {
        let mut cfg = RetryConfig {
            reconnect_spread: Duration::from_secs(20),
            ..RetryConfig::default()
        };
        // Rounded up to base * 2^n: 32 s.
        assert_eq!(cfg.reconnect_exponent(), 5);
        cfg.reconnect_spread = Duration::ZERO;
        assert_eq!(cfg.reconnect_exponent(), 0);
        cfg.reconnect_spread = BACKOFF_CAP + Duration::from_secs(1);
        assert!(cfg.validate().is_err());
    }

    /// The herd of chaos case c in virtual time: `guests` policies lose
    /// their session at the same instant, the host is back after `outage`;
    /// returns every attempt's offset from the loss.
    fn herd(guests: u64, outage: Duration, seed: u64) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for g in 0..guests {
            let mut p = RetryPolicy::new(RetryConfig::default(), seed ^ (g << 20));
            assert!(p.attempt(t0));
            p.succeeded();
            let mut t = p.lost(t0, Failure::Transport).instant();
            loop {
                assert!(p.attempt(t));
                starts.push(t - t0);
                if t - t0 >= outage {
                    break;
                }
                t = p.failed(t, Failure::Transport).instant();
            }
        }
        starts.sort();
        starts
    }

    /// Most attempts in any 1-s window (sliding, half-open).
    fn busiest_second(starts: &[Duration]) -> usize {
        let mut lo = 0;
        let mut most = 0;
        for hi in 0..starts.len() {
            while starts[hi] - starts[lo] >= Duration::from_secs(1) {
                lo += 1;
            }
            most = most.max(hi - lo + 1);
        }
        most
    }

    #[test]
    fn a_herd_of_1024_reconnects_with_at_most_3_percent_in_any_second() {
        // §13.10: whatever the outage, no 1-s window holds more than 3 % of
        // the herd's attempts, nor more than 3 % of its guests.
        for outage_s in [0, 5, 30, 120, 600] {
            for seed in 0..4 {
                let starts = herd(1024, Duration::from_secs(outage_s), seed);
                let most = busiest_second(&starts);
                assert!(
                    most * 100 <= starts.len() * 3 && most * 100 <= 1024 * 3,
                    "outage {outage_s} s, seed {seed}: {most} of {} attempts in one second",
                    starts.len()
                );
            }
        }
    }

    #[test]
    fn host_unreachable_for_an_hour_stays_within_the_budget() {
        let t0 = Instant::now();
        let mut p = RetryPolicy::new(RetryConfig::default(), 11);
        let mut t = t0;
        let mut attempts = 0;
        // Each loop starts one attempt or moves time forward.
        while t < t0 + Duration::from_secs(3600) {
            if p.attempt(t) {
                attempts += 1;
                p.failed(t, Failure::Transport);
            }
            t = p
                .next_attempt(t)
                .instant()
                .max(t + Duration::from_millis(1));
        }
        println!("host unreachable for 1 h: {attempts} attempts");
        assert!(attempts <= RetryConfig::default().max_attempts_per_window());
        assert!(attempts >= 10, "{attempts}");
    }

    #[derive(Debug, Clone)]
    enum Step {
        Fail(Failure),
        /// An established session breaks.
        Lost(Failure),
        Succeed,
        /// The driver wakes early and tries anyway.
        Early(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let codes =
            (1u16..=20).prop_map(|v| ErrorCode::from_value(v).unwrap_or(ErrorCode::Internal));
        prop_oneof![
            4 => Just(Step::Fail(Failure::Transport)),
            3 => (codes, proptest::option::of(0u64..200_000))
                .prop_map(|(c, ms)| Step::Fail(code(c, ms))),
            1 => Just(Step::Fail(Failure::Permanent)),
            1 => Just(Step::Lost(Failure::Transport)),
            1 => Just(Step::Succeed),
            1 => (0u64..10_000).prop_map(Step::Early),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn attempts_in_any_window_stay_under_the_bound(
            seed in any::<u64>(),
            steps in proptest::collection::vec(step(), 1..400),
        ) {
            let cfg = RetryConfig::default();
            let t0 = Instant::now();
            let mut p = RetryPolicy::new(cfg, seed);
            let mut t = t0;
            let mut starts: Vec<Instant> = Vec::new();
            for s in steps {
                if let Step::Early(ms) = s {
                    let early = t + Duration::from_millis(ms);
                    if early < p.next_attempt(t).instant() {
                        prop_assert!(!p.attempt(early), "attempt allowed before its time");
                    }
                    continue;
                }
                t = p.next_attempt(t).instant().max(t);
                if !p.attempt(t) {
                    continue;
                }
                starts.push(t);
                match s {
                    Step::Fail(f) => {
                        let next = p.failed(t, f);
                        prop_assert!(next.instant() >= t + cfg.floor.min(Duration::from_millis(100)));
                        if matches!(f, Failure::Permanent)
                            || matches!(f, Failure::Code { code, .. } if code.class() == RetryClass::Permanent)
                        {
                            prop_assert!(matches!(next, Next::Dormant(_)));
                            prop_assert!(next.instant() >= t + cfg.reprobe_interval);
                        }
                    }
                    Step::Lost(f) => {
                        p.succeeded();
                        let next = p.lost(t, f);
                        prop_assert!(next.instant() >= t + cfg.floor);
                    }
                    Step::Succeed => p.succeeded(),
                    Step::Early(_) => unreachable!(),
                }
            }
            // Sliding window over the attempt start times.
            let bound = cfg.max_attempts_per_window();
            let mut lo = 0;
            for hi in 0..starts.len() {
                while starts[hi].duration_since(starts[lo]) >= cfg.window {
                    lo += 1;
                }
                prop_assert!((hi - lo + 1) as u64 <= bound, "{} attempts in one window", hi - lo + 1);
            }
        }
    }
}
