//! The controller lock and the progress record, whichever store the
//! document lives in: [`Store`] dispatches to the etcd lease and
//! transaction ([`super::etcd`]) or the lock file and record file
//! ([`super::file`]); see the module primer of [`super`].

use std::time::Duration;

use super::RunError;
use super::etcd::EtcdStore;
use super::file::FileStore;
use crate::rollout::controller::Progress;
use crate::rollout_service::Settings;
use crate::source::{self, SourceConfig, SourceKind};

/// The controller lock and the progress record (see the module primer).
pub(super) enum Store {
    Etcd(Box<EtcdStore>),
    File(FileStore),
}

impl Store {
    pub(super) async fn acquire(
        source: &SourceConfig,
        settings: &Settings,
        feature: &str,
        ttl: Duration,
    ) -> Result<Self, RunError> {
        match source.source {
            SourceKind::Etcd => Ok(Self::Etcd(Box::new(
                EtcdStore::acquire(&source.etcd, feature, ttl).await?,
            ))),
            SourceKind::File => Ok(Self::File(FileStore::acquire(
                &settings.state_dir,
                feature,
            )?)),
        }
    }

    pub(super) async fn load(&mut self) -> Result<Option<Progress>, RunError> {
        match self {
            Self::Etcd(s) => s.load().await,
            Self::File(s) => s.load(),
        }
    }

    pub(super) async fn save(&mut self, p: &Progress) -> Result<(), RunError> {
        match self {
            Self::Etcd(s) => s.save(p).await,
            Self::File(s) => s.save(p),
        }
    }

    /// After an outage: the lock is this controller's again (taken anew
    /// if its lease lapsed and no one else holds it) and the record is
    /// the one it last saved (or `expected`).
    pub(super) async fn recheck(&mut self, expected: &Progress) -> Result<(), RunError> {
        match self {
            Self::Etcd(s) => s.recheck(expected).await,
            Self::File(s) => s.check_alive(),
        }
    }

    pub(super) fn check_alive(&mut self) -> Result<(), RunError> {
        match self {
            Self::Etcd(s) => s.check_alive(),
            Self::File(s) => s.check_alive(),
        }
    }

    /// What a document write is fenced by (etcd: the lock key under this
    /// controller's lease).
    pub(super) fn fence(&self) -> Option<source::Fence> {
        match self {
            Self::Etcd(s) => Some(s.fence()),
            Self::File(_) => None,
        }
    }

    /// A write found the lock no longer ours: take it again before
    /// anything else ([`Store::recheck`]).
    pub(super) fn mark_lost(&mut self) {
        if let Self::Etcd(s) = self {
            s.mark_lost();
        }
    }

    pub(super) async fn release(self) {
        match self {
            Self::Etcd(s) => s.release().await,
            Self::File(s) => s.release(),
        }
    }
}
