//! The etcd lock (a lease) and the record (a transaction).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::source::lease::{keep_alive, timed};

use super::RunError;
use crate::rollout::controller::{MAX_PROGRESS_BYTES, Progress};
use crate::source::EtcdConfig;

pub(super) struct EtcdStore {
    client: Client,
    timeout: Duration,
    ttl: Duration,
    lease: i64,
    lock_key: String,
    progress_key: String,
    /// The record's mod revision as last read or written (0: none).
    revision: i64,
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

/// `<dir>/controller/<feature>`, `<dir>` the document key's parent.
pub(super) fn lock_key(document_key: &str, feature: &str) -> String {
    let dir = document_key.rsplit_once('/').map_or("", |(d, _)| d);
    format!("{dir}/controller/{feature}")
}

impl EtcdStore {
    pub(super) async fn acquire(
        config: &EtcdConfig,
        feature: &str,
        ttl: Duration,
    ) -> Result<Self, RunError> {
        let t = config.timeout();
        let store = |e: String| RunError::Store(e);
        let mut client = timed(t, Client::connect(&config.endpoints, None))
            .await
            .map_err(store)?;
        let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = timed(t, client.lease_grant(ttl_s, None))
            .await
            .map_err(store)?
            .id();
        let lock_key = lock_key(&config.key, feature);
        let progress_key = format!("{lock_key}/progress");
        let txn = Txn::new()
            .when([Compare::create_revision(
                lock_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                lock_key.as_str(),
                super::holder(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(lock_key.as_str(), None)]);
        let resp = timed(t, client.txn(txn)).await.map_err(store)?;
        if !resp.succeeded() {
            let holder = resp
                .op_responses()
                .into_iter()
                .find_map(|r| match r {
                    TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| crate::rollout::shown(&String::from_utf8_lossy(kv.value()))),
                    _ => None,
                })
                .unwrap_or_default();
            let _ = timed(t, client.lease_revoke(lease)).await;
            return Err(RunError::LockHeld {
                feature: feature.to_owned(),
                holder: format!("{holder} (etcd key {lock_key})"),
            });
        }
        let lost = Arc::new(AtomicBool::new(false));
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl, t, lost.clone()));
        Ok(Self {
            client,
            timeout: t,
            ttl,
            lease,
            lock_key,
            progress_key,
            revision: 0,
            lost,
            keeper,
        })
    }

    pub(super) async fn load(&mut self) -> Result<Option<Progress>, RunError> {
        let resp = timed(
            self.timeout,
            self.client.get(self.progress_key.as_str(), None),
        )
        .await
        .map_err(RunError::Store)?;
        let Some(kv) = resp.kvs().first() else {
            self.revision = 0;
            return Ok(None);
        };
        self.revision = kv.mod_revision();
        if kv.value().len() > MAX_PROGRESS_BYTES {
            return Err(crate::rollout::controller::ProgressError::TooLarge {
                len: kv.value().len(),
            }
            .into());
        }
        Ok(Some(Progress::parse(kv.value())?))
    }

    pub(super) async fn save(&mut self, p: &Progress) -> Result<(), RunError> {
        self.check_alive()?;
        let txn = Txn::new()
            .when([
                Compare::lease(self.lock_key.as_str(), CompareOp::Equal, self.lease),
                Compare::mod_revision(self.progress_key.as_str(), CompareOp::Equal, self.revision),
            ])
            .and_then([TxnOp::put(self.progress_key.as_str(), p.to_json(), None)]);
        let resp = timed(self.timeout, self.client.txn(txn))
            .await
            .map_err(RunError::Store)?;
        if !resp.succeeded() {
            self.lost.store(true, Ordering::Relaxed);
            return Err(RunError::LockLost(
                "the lock key or the progress record changed under this controller".into(),
            ));
        }
        self.revision = resp.header().map_or(self.revision, |h| h.revision());
        Ok(())
    }

    /// See `Store::recheck`.
    pub(super) async fn recheck(&mut self, expected: &Progress) -> Result<(), RunError> {
        let t = self.timeout;
        if self.lost.load(Ordering::Relaxed) {
            // The lease lapsed (or may have): give it up, and take the
            // lock under a new one if the key is gone or still ours.
            self.keeper.abort();
            let _ = timed(t, self.client.lease_revoke(self.lease)).await;
            let ttl_s = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
            let lease = timed(t, self.client.lease_grant(ttl_s, None))
                .await
                .map_err(RunError::Store)?
                .id();
            let txn = Txn::new()
                .when([Compare::create_revision(
                    self.lock_key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    self.lock_key.as_str(),
                    super::holder(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(self.lock_key.as_str(), None)]);
            let resp = match timed(t, self.client.txn(txn)).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = timed(t, self.client.lease_revoke(lease)).await;
                    return Err(RunError::Store(e));
                }
            };
            if !resp.succeeded() {
                let _ = timed(t, self.client.lease_revoke(lease)).await;
                return Err(RunError::LockLost(format!(
                    "the lease lapsed in the store's outage and etcd key {} is held by \
                     another controller now",
                    self.lock_key
                )));
            }
            self.lease = lease;
            self.lost.store(false, Ordering::Relaxed);
            self.keeper = tokio::spawn(keep_alive(
                self.client.clone(),
                lease,
                self.ttl,
                t,
                self.lost.clone(),
            ));
            vkx_common::rl_warn!(
                key = %self.lock_key,
                "rollout run: the controller lock lapsed in the store's outage; taken again"
            );
        }
        // The record: the revision this controller last wrote, or
        // (a save whose answer was lost) the progress it holds.
        let resp = timed(t, self.client.get(self.progress_key.as_str(), None))
            .await
            .map_err(RunError::Store)?;
        let (revision, found) = match resp.kvs().first() {
            Some(kv) => (kv.mod_revision(), Progress::parse(kv.value()).ok()),
            None => (0, None),
        };
        if revision == self.revision || found.as_ref() == Some(expected) {
            self.revision = revision;
            return Ok(());
        }
        self.lost.store(true, Ordering::Relaxed);
        Err(RunError::LockLost(
            "the progress record was changed by someone else during the store's outage".into(),
        ))
    }

    pub(super) fn fence(&self) -> crate::source::Fence {
        crate::source::Fence {
            key: self.lock_key.clone(),
            lease: self.lease,
        }
    }

    pub(super) fn mark_lost(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }

    pub(super) fn check_alive(&self) -> Result<(), RunError> {
        if self.lost.load(Ordering::Relaxed) {
            return Err(RunError::LockLost(
                "the lease could not be kept alive".into(),
            ));
        }
        Ok(())
    }

    pub(super) async fn release(mut self) {
        self.keeper.abort();
        let _ = timed(self.timeout, self.client.lease_revoke(self.lease)).await;
    }
}
