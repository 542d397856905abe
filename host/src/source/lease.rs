//! An etcd lease held for as long as a holder lives: granted, kept alive
//! every third of its TTL by a task of its own, and revoked when done. A
//! holder that dies without revoking it loses what it put under it when
//! the TTL runs out (the rollout controller's lock, a live drill's
//! overlay).
//!
//! What it bounds: every call (the configured timeout), and how long the
//! keep-alive may fail before the lease counts as lost (its TTL: etcd has
//! let it lapse by then, or is about to).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::Client;

/// One etcd call, bounded by `after`; errors as text.
pub async fn timed<T>(
    after: Duration,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(after, call).await {
        Ok(r) => r.map_err(|e| format!("etcd: {e}")),
        Err(_) => Err(format!("etcd: timed out after {after:?}")),
    }
}

/// A granted lease and its keep-alive task.
pub struct Lease {
    /// Boxed: an etcd client is a few KiB.
    client: Box<Client>,
    id: i64,
    timeout: Duration,
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Grants a lease of `ttl` (whole seconds) and starts keeping it
    /// alive.
    pub async fn grant(client: &Client, ttl: Duration, timeout: Duration) -> Result<Self, String> {
        let mut c = client.clone();
        let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let id = timed(timeout, c.lease_grant(ttl_s, None)).await?.id();
        let lost = Arc::new(AtomicBool::new(false));
        let keeper = tokio::spawn(keep_alive(c.clone(), id, ttl, timeout, lost.clone()));
        Ok(Self {
            client: Box::new(c),
            id,
            timeout,
            lost,
            keeper,
        })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// Whether the keep-alive failed for a whole TTL, or etcd said the
    /// lease is gone.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Stops keeping it alive and revokes it (what was put under it goes
    /// at once). Best effort: if etcd does not answer, the TTL does it.
    pub async fn revoke(mut self) -> Result<(), String> {
        self.keeper.abort();
        timed(self.timeout, self.client.lease_revoke(self.id))
            .await
            .map(|_| ())
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Keeps lease `lease` alive every third of its TTL; sets `lost` when a
/// keep-alive fails for longer than the TTL or the lease is gone. Ends
/// then, or when aborted.
pub async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    timeout: Duration,
    lost: Arc<AtomicBool>,
) {
    let every = ttl / 3;
    let mut last_ok = std::time::Instant::now();
    let mut stream = None;
    // Until aborted, or the lease is lost.
    loop {
        tokio::time::sleep(every).await;
        if stream.is_none() {
            stream = timed(timeout, client.lease_keep_alive(lease)).await.ok();
        }
        // Some(true): renewed; Some(false): the lease is gone for good;
        // None: no answer this time.
        let ok = match &mut stream {
            Some((keeper, acks)) => {
                if timed(timeout, keeper.keep_alive()).await.is_err() {
                    None
                } else {
                    match tokio::time::timeout(timeout, acks.message()).await {
                        Ok(Ok(Some(r))) => Some(r.ttl() > 0),
                        _ => None,
                    }
                }
            }
            None => None,
        };
        match ok {
            Some(true) => last_ok = std::time::Instant::now(),
            Some(false) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
            None => {
                stream = None;
                if last_ok.elapsed() >= ttl {
                    lost.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}
