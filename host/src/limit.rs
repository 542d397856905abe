//! Generic limits on caller-supplied time, shared by every listener of
//! `vkx-host serve`: a token bucket ([`TokenBucket`]), a counted pool of
//! slots ([`Slots`]) and a per-key cap ([`PerKey`]), each released by an
//! RAII guard on every path a task can take, panics included.
//!
//! What it trusts: its callers' sizes (named limits of the modules that
//! use it: `admission`, `metrics`). What it bounds: everything it counts,
//! by the `max` or `capacity` it is built with; [`PerKey`] holds only the
//! keys with slots in use. No I/O, no clock reads: time is passed in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A token bucket on caller-supplied time: `capacity` at once, then one
/// token per `refill`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    capacity: u32,
    refill: Duration,
    tokens: u32,
    /// When the last whole token was earned (or the bucket was last full).
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(capacity: u32, refill: Duration, now: Instant) -> Self {
        Self {
            capacity,
            refill,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.tokens >= self.capacity || self.refill.is_zero() {
            self.tokens = self.capacity;
            self.last = now;
            return;
        }
        let earned = now.saturating_duration_since(self.last).as_nanos() / self.refill.as_nanos();
        let missing = self.capacity - self.tokens;
        if earned >= u128::from(missing) {
            self.tokens = self.capacity;
            self.last = now;
        } else if let Ok(earned) = u32::try_from(earned)
            && earned > 0
        {
            // earned < missing: it fits. Keep the remainder, so a steady
            // drip still earns its tokens.
            self.tokens += earned;
            self.last += self.refill * earned;
        }
    }

    /// Takes one token, or says how long until the next one.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens == 0 {
            let next = self.last.checked_add(self.refill).unwrap_or(self.last);
            return Err(next
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)));
        }
        self.tokens -= 1;
        Ok(())
    }

    /// Whether the bucket is full at `now` (forgetting it loses nothing).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }

    /// Tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.tokens
    }
}

/// A counted pool of slots; [`Slot`] gives one back when dropped.
#[derive(Debug)]
pub struct Slots {
    in_use: AtomicUsize,
    max: usize,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            in_use: AtomicUsize::new(0),
            max,
        })
    }

    /// One slot, if any is free. Never waits.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }
}

/// At most `max` held at once per key (a uid, an address), for a handful
/// of keys: the map holds only keys with slots in use.
#[derive(Debug)]
pub struct PerKey {
    in_use: Mutex<BTreeMap<u64, usize>>,
    max: usize,
}

impl PerKey {
    pub fn new(max: usize) -> Self {
        Self {
            in_use: Mutex::new(BTreeMap::new()),
            max,
        }
    }

    /// One slot of `key`, if it holds fewer than `max`. Never waits.
    pub fn try_acquire(self: &Arc<Self>, key: u64) -> Option<KeySlot> {
        let mut m = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(key).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeySlot(self.clone(), key))
    }
}

/// One held slot of a [`PerKey`].
#[derive(Debug)]
pub struct KeySlot(Arc<PerKey>, u64);

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut m = self.0.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// One held slot.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(10, 6 * S, t0);
        for _ in 0..10 {
            assert!(b.try_take(t0).is_ok());
        }
        // Empty: the next token is a whole refill away.
        assert_eq!(b.try_take(t0), Err(6 * S));
        assert_eq!(b.try_take(t0 + 2 * S), Err(4 * S));
        // One token per 6 s, the remainder kept across calls.
        assert!(b.try_take(t0 + 6 * S).is_ok());
        assert_eq!(b.try_take(t0 + 6 * S), Err(6 * S));
        assert!(b.try_take(t0 + 12 * S).is_ok());
        // Over an hour of one attempt per second, at most burst + 3600/6.
        let mut b = TokenBucket::full(10, 6 * S, t0);
        let admitted = (0..3600u32)
            .filter(|i| b.try_take(t0 + S * *i).is_ok())
            .count();
        assert!((600..=611).contains(&admitted), "{admitted}");
        // Idle long enough: full again, never above capacity.
        assert!(b.is_full(t0 + 10_000 * S));
        assert_eq!(b.available(t0 + 10_000 * S), 10);
    }
}
