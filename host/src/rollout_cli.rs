//! `vkx-host rollout`: the operator CLI of the staged rollout and kill
//! switch (spec/ROLLOUT.md).
//!
//! ```sh
//! vkx-host rollout show      --config host.toml
//! vkx-host rollout explain   --config host.toml --vm VM_ID
//! vkx-host rollout kill      FEATURE --config host.toml [--local]
//! vkx-host rollout unkill    FEATURE --config host.toml (--key FILE --key-id ID | --local)
//! vkx-host rollout set-stage FEATURE (RING|none) --config host.toml [--key FILE --key-id ID]
//! vkx-host rollout push      --config host.toml --file ENVELOPE.json
//! vkx-host rollout sign      --key FILE --key-id ID --file DOCUMENT.json [--out FILE]
//! vkx-host rollout keygen    --out FILE [--key-id ID]
//! vkx-host rollout run       --plan PLAN.toml --config host.toml --key FILE --key-id ID
//! ```
//!
//! `run` is the rollout controller (`rollout_run`): it walks a
//! plan's rings with health gates, and halts with a kill.
//!
//! `kill` needs no key: it turns a feature towards off, which every host
//! accepts unsigned. It writes the next revision of the document to the
//! configured source (file or etcd) with a compare-and-swap on the
//! version it read, so two operators cannot overwrite each other's edit
//! unseen. `--local` writes this node's override file instead, which
//! works when the fleet store is what broke. Anything that can turn a
//! feature on for a VM (unkill, a higher stage) must be signed with a key
//! host.toml trusts; the CLI checks the edit against the rules before it
//! writes, so a refusal is reported here, not only in the hosts' logs.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::rollout::edit::MAX_EDIT_ATTEMPTS;
use crate::rollout::envelope::Envelope;
use crate::rollout::{
    Accepted, Document, Feature, Override, VmFacts, explain, ring_table, sign, state_name, unsigned,
};
use crate::rollout_node::{
    ConfigArgs, KeyArgs, Node, RolloutCliError, Signer, check, describe, expected,
    explain_source_error, signer,
};
use crate::source::{self, SourceConfig, SourceError, Version};

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// The document in the source, this node's accepted revision and
    /// override, and the feature states of each ring.
    Show(ConfigArgs),
    /// Why VM gets each feature's state on this node.
    Explain {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long = "vm", value_name = "VM_ID")]
        vm: String,
    },
    /// Turn FEATURE off for every VM (no key needed): the next revision,
    /// written to the source; with --local, this node's override file.
    Kill {
        feature: Feature,
        #[command(flatten)]
        config: ConfigArgs,
        /// Write this node's override file instead of the source.
        #[arg(long)]
        local: bool,
    },
    /// Undo a kill (signed: it turns the feature back on); with --local,
    /// remove it from this node's override file (no key).
    Unkill {
        feature: Feature,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long)]
        local: bool,
    },
    /// Set FEATURE's stage to RING (enabled in every ring up to it) or
    /// `none`. A higher stage must be signed; a lower one needs no key.
    SetStage {
        feature: Feature,
        /// A ring name of the document, or `none`.
        stage: String,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Write an envelope (signed or not) to the source, after checking it
    /// against the rules.
    Push {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Sign a document (or re-sign an envelope's document) with an
    /// offline key; prints the envelope or writes it to --out.
    Sign {
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Make a signing key (PKCS#8, mode 0600, never overwritten) and print
    /// its host.toml entry.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The key id to print in the host.toml entry.
        #[arg(long, default_value = "release")]
        key_id: String,
    },
    /// Walk a plan's rings: widen the stage (signed), bake, evaluate the
    /// health gates, then advance, pause or halt (an unsigned kill).
    /// Exit codes: 0 completed, 3 halted, 4 paused, 5 stopped by someone
    /// else's change, 6 refused (plan invalid, lock held, progress of
    /// another plan).
    Run(crate::rollout_run::RunArgs),
}

/// Why `vkx-host rollout ...` failed: one of [`run`]'s commands, or the
/// controller's `rollout run` (whose own errors name the node's).
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Command(Box<RolloutCliError>),
    #[error(transparent)]
    Run(Box<crate::rollout_run::RunCliError>),
}

impl From<RolloutCliError> for RolloutError {
    fn from(e: RolloutCliError) -> Self {
        Self::Command(Box::new(e))
    }
}

impl From<crate::rollout_run::RunCliError> for RolloutError {
    fn from(e: crate::rollout_run::RunCliError) -> Self {
        Self::Run(Box::new(e))
    }
}

/// Runs one command; its exit code (0 but for `run`, see
/// `rollout_run::cli`).
pub fn run_code(cmd: RolloutCommand, out: &mut dyn std::io::Write) -> Result<u8, RolloutError> {
    match cmd {
        RolloutCommand::Run(args) => Ok(crate::rollout_run::cli(args, out)?),
        cmd => Ok(run(cmd, out).map(|()| 0)?),
    }
}

/// Runs one command; what it prints goes to `out`.
pub fn run(cmd: RolloutCommand, out: &mut dyn std::io::Write) -> Result<(), RolloutCliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RolloutCliError::Runtime)?;
    rt.block_on(run_async(cmd, out))
}

async fn run_async(
    cmd: RolloutCommand,
    out: &mut dyn std::io::Write,
) -> Result<(), RolloutCliError> {
    match cmd {
        RolloutCommand::Run(_) => Err(RolloutCliError::RunNotHere),
        RolloutCommand::Show(c) => show(&Node::load(&c.config)?, out).await,
        RolloutCommand::Explain { config, vm } => {
            let node = Node::load(&config.config)?;
            let vm_id = vkx_common::wire::VmId::new(&vm).map_err(RolloutCliError::VmId)?;
            let accepted = node.accepted()?;
            let local = node.local();
            let image = crate::policy::Policy::load(&node.config.policy)
                .ok()
                .and_then(|p| p.vm(&vm_id).map(|v| v.image.clone()));
            let facts = VmFacts {
                vm_id,
                image,
                node: node.settings.node.clone(),
            };
            let e = explain(
                accepted.as_ref().map(Accepted::document),
                &local,
                &node.settings.ga,
                &facts,
            );
            writeln!(
                out,
                "{vm} on node {} (accepted revision {}; image {}):",
                node.settings.node,
                e.revision.map_or("none".to_owned(), |r| r.to_string()),
                facts.image.as_deref().unwrap_or("unknown"),
            )?;
            write!(out, "{e}")?;
            Ok(())
        }
        RolloutCommand::Kill {
            feature,
            config,
            local,
        } => {
            let node = Node::load(&config.config)?;
            if local {
                return edit_override(&node, feature, true, out);
            }
            let at = edit(&node, None, |doc, now| {
                crate::rollout::kill(doc, feature, now)
            })
            .await?;
            writeln!(
                out,
                "{feature} killed at revision {at} (unsigned; every host accepts a kill). \
                 Live sessions are told within a second of their host reading it."
            )?;
            Ok(())
        }
        RolloutCommand::Unkill {
            feature,
            config,
            key,
            local,
        } => {
            let node = Node::load(&config.config)?;
            if local {
                return edit_override(&node, feature, false, out);
            }
            let at = edit(&node, signer(&key)?, |doc, now| {
                crate::rollout::unkill(doc, feature, now)
            })
            .await?;
            writeln!(
                out,
                "{feature} unkilled at revision {at}; guests use it again after a random delay of up to 10 s."
            )?;
            Ok(())
        }
        RolloutCommand::SetStage {
            feature,
            stage,
            config,
            key,
        } => {
            let node = Node::load(&config.config)?;
            let ring = (stage != "none").then_some(stage.as_str());
            let at = edit(&node, signer(&key)?, |doc, now| {
                crate::rollout::set_stage(doc, feature, ring, now)
            })
            .await?;
            writeln!(out, "{feature} stage set to {stage} at revision {at}.")?;
            Ok(())
        }
        RolloutCommand::Push { config, file } => {
            let node = Node::load(&config.config)?;
            let source = node.source()?;
            let bytes = read_bounded(&file)?;
            let (current, version) = node.current(source).await?;
            check(&bytes, current.as_ref(), &node.settings)?;
            write_checked(source, &bytes, version).await?;
            let doc = Envelope::parse(&bytes).map_err(RolloutCliError::Document)?;
            writeln!(
                out,
                "pushed revision {} to {}",
                doc.document.revision(),
                describe(source)
            )?;
            Ok(())
        }
        RolloutCommand::Sign { key, file, out: to } => {
            let (pair, id) = signer(&key)?.ok_or(RolloutCliError::SignNeedsKey)?;
            let bytes = read_bounded(&file)?;
            // A bare document, or an envelope whose document is re-signed.
            let doc = match Envelope::parse(&bytes) {
                Ok(e) => e.document,
                Err(_) => {
                    Document::parse(&bytes).map_err(|reason| RolloutCliError::DocumentFile {
                        path: file.clone(),
                        reason,
                    })?
                }
            };
            let envelope = sign(&doc, &pair, &id).map_err(RolloutCliError::Key)?;
            match to {
                Some(p) => {
                    std::fs::write(&p, &envelope).map_err(|source| RolloutCliError::File {
                        what: "write",
                        path: p.clone(),
                        source,
                    })?
                }
                None => {
                    out.write_all(&envelope)?;
                    writeln!(out)?;
                }
            }
            Ok(())
        }
        RolloutCommand::Keygen { out: path, key_id } => {
            let (pkcs8, public) = crate::rollout::keygen().map_err(RolloutCliError::Key)?;
            crate::rollout::write_signing_key(&path, &pkcs8).map_err(RolloutCliError::Key)?;
            writeln!(
                out,
                "signing key written to {} (mode 0600; keep it offline).\n\
                 Trust it in each host's host.toml:\n\n\
                 [[rollout.trusted_key]]\nid = \"{key_id}\"\npublic_key = \"{public}\"",
                path.display()
            )?;
            Ok(())
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads the source's document, applies `change` to the later of it and
/// this node's accepted one, checks the result, and writes it with a
/// compare-and-swap; on a conflict starts again, at most
/// [`MAX_EDIT_ATTEMPTS`] times. Returns the revision written.
async fn edit(
    node: &Node,
    signer: Signer,
    change: impl Fn(Option<&Document>, u64) -> Result<Document, crate::rollout::EditError>,
) -> Result<u64, RolloutCliError> {
    let source = node.source()?;
    let local = node.accepted().ok().flatten();
    for _ in 0..MAX_EDIT_ATTEMPTS {
        let (current, version) = node.current(source).await?;
        // The base is whichever is later: a wiped store must not make the
        // next revision one the hosts refuse as a replay.
        let base = match (&current, &local) {
            (Some(c), Some(l)) if l.document().revision() > c.document().revision() => Some(l),
            (Some(c), _) => Some(c),
            (None, l) => l.as_ref(),
        };
        let next = change(base.map(Accepted::document), now()).map_err(RolloutCliError::Edit)?;
        let bytes = match &signer {
            Some((pair, id)) => sign(&next, pair, id).map_err(RolloutCliError::Key)?,
            None => unsigned(&next),
        };
        check(&bytes, base, &node.settings)?;
        match source::write_if(source, &bytes, expected(version)).await {
            Ok(_) => return Ok(next.revision()),
            Err(SourceError::Conflict { .. }) => continue,
            Err(e) => return Err(explain_source_error(e)),
        }
    }
    Err(RolloutCliError::KeptChanging)
}

async fn write_checked(
    source: &SourceConfig,
    bytes: &[u8],
    version: Version,
) -> Result<(), RolloutCliError> {
    source::write_if(source, bytes, expected(version))
        .await
        .map(|_| ())
        .map_err(explain_source_error)
}

/// Adds (`kill`) or removes `feature` in this node's override file,
/// crash-safely.
fn edit_override(
    node: &Node,
    feature: Feature,
    kill: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), RolloutCliError> {
    let path = &node.settings.override_file;
    let current = Override::read(path).map_err(|reason| RolloutCliError::Override {
        path: path.clone(),
        reason,
    })?;
    let mut killed: BTreeSet<Feature> = current.killed().collect();
    if kill {
        killed.insert(feature);
    } else {
        killed.remove(&feature);
    }
    let list: Vec<String> = killed.iter().map(|f| format!("\"{}\"", f.name())).collect();
    let text = format!(
        "# vkx local rollout override: these features are off on this node whatever the\n\
         # rollout document says. Written by `vkx-host rollout kill|unkill --local`.\n\
         killed = [{}]\n",
        list.join(", ")
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| RolloutCliError::File {
            what: "create",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    write_atomic(path, text.as_bytes())?;
    writeln!(
        out,
        "{feature} {} in {} (this node only; read within a second).",
        if kill { "killed" } else { "no longer killed" },
        path.display()
    )?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RolloutCliError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|source| RolloutCliError::File {
        what: "create",
        path: tmp.clone(),
        source,
    })?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|source| RolloutCliError::File {
        what: "rename to",
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, RolloutCliError> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|source| RolloutCliError::File {
        what: "open",
        path: path.to_path_buf(),
        source,
    })?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(source::MAX_SOURCE_BYTES + 1).unwrap_or(u64::MAX);
    f.take(limit).read_to_end(&mut bytes)?;
    if bytes.len() > source::MAX_SOURCE_BYTES {
        return Err(RolloutCliError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

async fn show(node: &Node, out: &mut dyn std::io::Write) -> Result<(), RolloutCliError> {
    let s = &node.settings;
    let accepted = node.accepted()?;
    let local = node.local();
    writeln!(out, "node            {}", s.node)?;
    match &s.source {
        None => writeln!(out, "source          none (no [rollout] table)")?,
        Some(src) => {
            let read = source::read(src).await;
            let what = match &read {
                Ok(Some((bytes, _))) => match Envelope::parse(bytes) {
                    Ok(e) => format!(
                        "revision {}, issued {} s ago, {}",
                        e.document.revision(),
                        now().saturating_sub(e.document.issued_at()),
                        if e.signature.is_some() {
                            "signed"
                        } else {
                            "unsigned"
                        }
                    ),
                    Err(err) => format!("MALFORMED ({err})"),
                },
                Ok(None) => "no document".to_owned(),
                Err(e) => format!("UNREACHABLE ({e}); hosts serve their last accepted document"),
            };
            writeln!(out, "source          {}: {what}", describe(src))?;
        }
    }
    match &accepted {
        Some(a) => writeln!(
            out,
            "accepted        revision {}, issued {} s ago, {} (this node, {})",
            a.document().revision(),
            now().saturating_sub(a.document().issued_at()),
            a.signed_by()
                .map_or("unsigned".to_owned(), |k| format!("signed by {k}")),
            s.state_dir.join(crate::rollout::ACCEPTED_FILE).display()
        )?,
        None => writeln!(
            out,
            "accepted        none: generally available features only"
        )?,
    }
    let killed: Vec<&str> = local.killed().map(Feature::name).collect();
    writeln!(
        out,
        "local override  {} ({})",
        if killed.is_empty() {
            "none".to_owned()
        } else {
            format!("killed: {}", killed.join(", "))
        },
        s.override_file.display()
    )?;
    let ga: Vec<&str> = Feature::ALL
        .iter()
        .filter(|f| s.ga.contains(&f.id()))
        .map(|f| f.name())
        .collect();
    writeln!(out, "generally avail {}", ga.join(", "))?;
    writeln!(out)?;
    write!(out, "{:<16}", "ring")?;
    for f in Feature::ALL {
        write!(out, " {:<15}", f.name())?;
    }
    writeln!(out)?;
    let doc = accepted.as_ref().map(Accepted::document);
    for row in ring_table(doc, &local, &s.ga) {
        let name = row
            .ring
            .map_or("(no ring)".to_owned(), |(i, n)| format!("{i} {n}"));
        write!(out, "{name:<16}")?;
        for f in Feature::ALL {
            let state = row
                .features
                .get(&f.id())
                .copied()
                .unwrap_or(vkx_common::wire::FeatureState::Disabled);
            write!(out, " {:<15}", state_name(state))?;
        }
        writeln!(out)?;
    }
    Ok(())
}
