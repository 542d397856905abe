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
//! Its errors are one [`RolloutCliError`] (the `rollout` commands'),
//! split by cause, worded for the operator who reads them.

use std::path::{Path, PathBuf};

use vkx_common::wire::DecodeError;

use crate::config::{ConfigError, ServeConfig};
use crate::rollout::edit::MAX_EDIT_ATTEMPTS;
use crate::rollout::{
    Accepted, Admitted, DocumentError, EditError, KeyError, Override, OverrideError, PersistError,
    Refusal, admit, load_signing_key,
};
use crate::rollout_service::{Settings, SettingsError};
use crate::source::{self, SourceConfig, SourceError, Version};

/// Why a `rollout` command (other than `run`'s controller, see
/// [`crate::rollout_run::RunError`]) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RolloutCliError {
    // ---- the command line and host.toml
    /// host.toml could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// host.toml's `[rollout]` table is invalid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// host.toml has no `[rollout]` table to write through.
    #[error(
        "host.toml has no [rollout] table, so no source to write to; \
         use --local for this node's override file"
    )]
    NoSource,
    /// `--key` without `--key-id`, or the reverse.
    #[error("--key and --key-id go together")]
    KeyWithoutId,
    /// `sign` without a key.
    #[error("sign needs --key and --key-id")]
    SignNeedsKey,
    /// `explain --vm`: not a VM id.
    #[error("--vm: {0}")]
    VmId(DecodeError),
    /// The signing key: loading, generating, writing it, or signing.
    #[error("{0}")]
    Key(KeyError),

    // ---- documents
    /// This node's accepted document could not be loaded.
    #[error("{0}")]
    Accepted(PersistError),
    /// The document in the source does not parse or verify.
    #[error(
        "the document in {place} is malformed ({reason}); push a corrected one with `rollout push`"
    )]
    Malformed {
        place: String,
        reason: DocumentError,
    },
    /// A document given on the command line does not parse.
    #[error("{0}")]
    Document(DocumentError),
    /// A document file does not parse.
    #[error("{}: {reason}", path.display())]
    DocumentFile {
        path: PathBuf,
        reason: DocumentError,
    },
    /// The edit does not apply to the current document.
    #[error("{0}")]
    Edit(EditError),
    /// The source already holds the document.
    #[error("the source already holds this document")]
    Unchanged,
    /// The document turns a feature on and is unsigned.
    #[error("{0}: pass --key and --key-id (a key host.toml trusts)")]
    UnsignedWidening(Refusal),
    /// The hosts would refuse the document.
    #[error("hosts would refuse this document: {0}")]
    Refused(Refusal),
    /// Other edits kept winning the compare-and-swap.
    #[error(
        "the document kept changing under this edit ({MAX_EDIT_ATTEMPTS} attempts); run it again"
    )]
    KeptChanging,

    // ---- the store and local files
    /// The document changed between the read and the write.
    #[error("{0}: the document changed since it was read; run the command again")]
    Conflict(SourceError),
    /// The source failed.
    #[error(
        "{0}\n(a kill still works on each node without the store: \
         `vkx-host rollout kill FEATURE --local --config host.toml`)"
    )]
    Store(SourceError),
    /// This node's override file is invalid.
    #[error(
        "{reason}; fix or remove {} first (until then every feature is killed on this node)",
        path.display()
    )]
    Override {
        path: PathBuf,
        reason: OverrideError,
    },
    /// A file over the source's size limit.
    #[error("{} is over {} bytes", path.display(), source::MAX_SOURCE_BYTES)]
    TooLarge { path: PathBuf },
    /// A local file operation (`what`: "open", "create", "write",
    /// "rename to") failed.
    #[error("{what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The runtime could not be started.
    #[error("start the runtime")]
    Runtime(#[source] std::io::Error),
    /// Writing the output, or another I/O step, failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// [`crate::rollout_cli::run`] was handed `rollout run`.
    #[error("rollout run goes through run_code")]
    RunNotHere,
}

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
    pub(crate) fn load(path: &Path) -> Result<Self, RolloutCliError> {
        let config = ServeConfig::load(path)?;
        let settings = config.rollout()?;
        Ok(Self { config, settings })
    }

    pub(crate) fn source(&self) -> Result<&SourceConfig, RolloutCliError> {
        self.settings
            .source
            .as_ref()
            .ok_or(RolloutCliError::NoSource)
    }

    /// The document this node accepted (its persisted state).
    pub(crate) fn accepted(&self) -> Result<Option<Accepted>, RolloutCliError> {
        crate::rollout::load(&self.settings.state_dir, &self.settings.trusted)
            .map_err(RolloutCliError::Accepted)
    }

    pub(crate) fn local(&self) -> Override {
        crate::rollout_service::read_override(&self.settings.override_file).0
    }

    /// The source's current document (as an accepted state, for the
    /// checks) and its version.
    pub(crate) async fn current(
        &self,
        source: &SourceConfig,
    ) -> Result<(Option<Accepted>, Version), RolloutCliError> {
        let read = source::read(source).await.map_err(explain_source_error)?;
        let Some((bytes, version)) = read else {
            return Ok((None, Version::None));
        };
        let accepted = Accepted::restore(bytes, &self.settings.trusted).map_err(|reason| {
            RolloutCliError::Malformed {
                place: describe(source),
                reason,
            }
        })?;
        Ok((Some(accepted), version))
    }
}

pub(crate) type Signer = Option<(ring::signature::Ed25519KeyPair, String)>;

pub(crate) fn signer(k: &KeyArgs) -> Result<Signer, RolloutCliError> {
    match (&k.key, &k.key_id) {
        (Some(path), Some(id)) => Ok(Some((
            load_signing_key(path).map_err(RolloutCliError::Key)?,
            id.clone(),
        ))),
        (None, None) => Ok(None),
        _ => Err(RolloutCliError::KeyWithoutId),
    }
}

/// What the hosts will decide, checked before writing.
pub(crate) fn check(
    bytes: &[u8],
    base: Option<&Accepted>,
    s: &Settings,
) -> Result<(), RolloutCliError> {
    match admit(bytes, base, &s.ga, &s.trusted) {
        Ok(Admitted::New(_)) => Ok(()),
        Ok(Admitted::Unchanged) => Err(RolloutCliError::Unchanged),
        Err(e @ Refusal::UnsignedWidening { .. }) => Err(RolloutCliError::UnsignedWidening(e)),
        Err(e) => Err(RolloutCliError::Refused(e)),
    }
}

/// The compare-and-swap condition for a document read at `version`.
pub(crate) fn expected(version: Version) -> Option<Version> {
    match version {
        Version::None => None,
        v => Some(v),
    }
}

pub(crate) fn explain_source_error(e: SourceError) -> RolloutCliError {
    match e {
        e @ SourceError::Conflict { .. } => RolloutCliError::Conflict(e),
        e => RolloutCliError::Store(e),
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
