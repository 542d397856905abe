//! Watch a source, publish on a [`tokio::sync::watch`]: the one shape
//! behind every "something outside the agent changed" input of `serve`
//! (the key store's current versions, the rollout document's sources, the
//! policy and CID map a SIGHUP reloads, `reload`, which looks on
//! request instead of per interval and publishes with
//! [`publish_if_changed`]).
//!
//! A poller is an async closure that looks at its source once and says
//! what it saw: `Some(value)` to publish (only a value that differs from
//! the current one wakes the receivers), `None` when the look failed (the
//! poller logs why, rate-limited; the last value stays published, which
//! is the fail-static rule of the rollout sources). One look per
//! interval, whatever the number of receivers; receivers see the latest
//! value, never a queue of them, so a slow receiver cannot build a
//! backlog.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// Shortest poll interval accepted: a poller is never a busy loop.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls every `interval` (at least [`MIN_POLL_INTERVAL`]) until `stop`
/// turns true or every receiver is gone, and publishes each changed
/// value on `tx`. The first look happens after one interval: the caller
/// publishes the initial value when it creates the channel.
pub async fn poll_and_publish<T, F, Fut>(
    interval: Duration,
    mut poll: F,
    tx: watch::Sender<T>,
    mut stop: watch::Receiver<bool>,
) where
    T: PartialEq,
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let interval = interval.max(MIN_POLL_INTERVAL);
    // One look per interval until stopped; each look is bounded by the
    // poller itself (a file read, a directory listing).
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if *stop.borrow() || tx.is_closed() {
            return;
        }
        if let Some(value) = poll().await {
            publish_if_changed(&tx, value);
        }
    }
}

/// Publishes `value` unless it equals the current one; true if it did.
pub fn publish_if_changed<T: PartialEq>(tx: &watch::Sender<T>, value: T) -> bool {
    tx.send_if_modified(|old| {
        if *old == value {
            false
        } else {
            *old = value;
            true
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn publishes_only_changes_and_keeps_the_last_value_on_failure() {
        let (tx, mut rx) = watch::channel(0u32);
        let (stop_tx, stop_rx) = watch::channel(false);
        let looks = Arc::new(AtomicU32::new(0));
        let l = looks.clone();
        // Looks: 1, 1, fail, 2, 2, ...
        let task = tokio::spawn(poll_and_publish(
            Duration::from_millis(100),
            move || {
                let n = l.fetch_add(1, Ordering::Relaxed);
                async move {
                    match n {
                        0 | 1 => Some(1),
                        2 => None,
                        _ => Some(2),
                    }
                }
            },
            tx,
            stop_rx,
        ));
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 1);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 2);
        assert_eq!(looks.load(Ordering::Relaxed), 4, "one change per look");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            !rx.has_changed().unwrap(),
            "an unchanged value wakes no one"
        );
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn ends_when_every_receiver_is_gone() {
        let (tx, rx) = watch::channel(0u32);
        let (_stop_tx, stop_rx) = watch::channel(false);
        drop(rx);
        let task = tokio::spawn(poll_and_publish(
            Duration::ZERO,
            || async { Some(1) },
            tx,
            stop_rx,
        ));
        task.await.unwrap();
    }
}
