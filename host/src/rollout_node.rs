//! The node context the rollout CLIs share (`rollout_cli`, the
//! operator's edits; `rollout_run`, the controller): host.toml's
//! `[rollout]` table and node directory ([`Node`]), the `--config` and
//! `--key` arguments, the signing key, the check of a document against
//! what the hosts will decide before it is written, and the source's
//! errors explained to an operator.
//!
//! What it trusts: host.toml (checked whole at load) and the operator's
//! key file; a document read from the source is admitted by the same
//! rules as the hosts apply (`rollout::admit`). What it bounds: nothing
//! of its own; the source's reads and writes are bounded by `source`.
//! Its errors are `anyhow`, for the CLI edge that prints them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::ServeConfig;
use crate::rollout::{Accepted, Admitted, Override, admit, load_signing_key};
use crate::rollout_service::Settings;
use crate::source::{self, SourceConfig, SourceError, Version};

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The host's host.toml (its [rollout] table and node_dir).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// The signing key file (`rollout keygen`).
    #[arg(long, value_name = "FILE", requires = "key_id")]
    pub key: Option<PathBuf>,
    /// The key's id, as host.toml's trusted_key lists it.
    #[arg(long, value_name = "ID")]
    pub key_id: Option<String>,
}

/// host.toml, read for its `[rollout]` table and node directory.
pub(crate) struct Node {
    pub(crate) config: ServeConfig,
    pub(crate) settings: Settings,
}

impl Node {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let config = ServeConfig::load(path)?;
        let settings = config.rollout()?;
        Ok(Self { config, settings })
    }

    pub(crate) fn source(&self) -> anyhow::Result<&SourceConfig> {
        self.settings.source.as_ref().context(
            "host.toml has no [rollout] table, so no source to write to; \
             use --local for this node's override file",
        )
    }

    /// The document this node accepted (its persisted state).
    pub(crate) fn accepted(&self) -> anyhow::Result<Option<Accepted>> {
        crate::rollout::load(&self.settings.state_dir, &self.settings.trusted)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub(crate) fn local(&self) -> Override {
        crate::rollout_service::read_override(&self.settings.override_file).0
    }

    /// The source's current document (as an accepted state, for the
    /// checks) and its version.
    pub(crate) async fn current(
        &self,
        source: &SourceConfig,
    ) -> anyhow::Result<(Option<Accepted>, Version)> {
        let read = source::read(source).await.map_err(explain_source_error)?;
        let Some((bytes, version)) = read else {
            return Ok((None, Version::None));
        };
        let accepted = Accepted::restore(bytes, &self.settings.trusted).map_err(|e| {
            anyhow::anyhow!(
                "the document in {} is malformed ({e}); push a corrected one with `rollout push`",
                describe(source)
            )
        })?;
        Ok((Some(accepted), version))
    }
}

pub(crate) type Signer = Option<(ring::signature::Ed25519KeyPair, String)>;

pub(crate) fn signer(k: &KeyArgs) -> anyhow::Result<Signer> {
    match (&k.key, &k.key_id) {
        (Some(path), Some(id)) => Ok(Some((
            load_signing_key(path).map_err(|e| anyhow::anyhow!("{e}"))?,
            id.clone(),
        ))),
        (None, None) => Ok(None),
        _ => bail!("--key and --key-id go together"),
    }
}

/// What the hosts will decide, checked before writing.
pub(crate) fn check(bytes: &[u8], base: Option<&Accepted>, s: &Settings) -> anyhow::Result<()> {
    match admit(bytes, base, &s.ga, &s.trusted) {
        Ok(Admitted::New(_)) => Ok(()),
        Ok(Admitted::Unchanged) => bail!("the source already holds this document"),
        Err(e @ crate::rollout::Refusal::UnsignedWidening { .. }) => {
            bail!("{e}: pass --key and --key-id (a key host.toml trusts)")
        }
        Err(e) => bail!("hosts would refuse this document: {e}"),
    }
}

/// The compare-and-swap condition for a document read at `version`.
pub(crate) fn expected(version: Version) -> Option<Version> {
    match version {
        Version::None => None,
        v => Some(v),
    }
}

pub(crate) fn explain_source_error(e: SourceError) -> anyhow::Error {
    match e {
        SourceError::Conflict { .. } => {
            anyhow::anyhow!("{e}: the document changed since it was read; run the command again")
        }
        e => anyhow::anyhow!(
            "{e}\n(a kill still works on each node without the store: \
             `vkx-host rollout kill FEATURE --local --config host.toml`)"
        ),
    }
}

pub(crate) fn describe(s: &SourceConfig) -> String {
    match s.source {
        source::SourceKind::File => format!("file {}", s.file.display()),
        source::SourceKind::Etcd => {
            format!("etcd key {} at {}", s.etcd.key, s.etcd.endpoints.join(","))
        }
    }
}
