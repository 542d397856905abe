//! `vkx-host keys`: the operator CLI of the key store
//! ([`crate::keystore`]).
//!
//! ```sh
//! vkx-host keys add NAME --node-dir D (--from-file F | --from-stdin) [--allow-vm ID]... [--allow-image IMG]...
//! vkx-host keys generate NAME --node-dir D [--bytes 32] [--allow-vm ID]... [--allow-image IMG]...
//! vkx-host keys rotate NAME --node-dir D [--from-file F | --from-stdin]
//! vkx-host keys list --node-dir D [--json]
//! vkx-host keys verify --node-dir D
//! vkx-host keys remove NAME --node-dir D
//! vkx-host keys seal (NAME... | --all) --node-dir D [--danger-accept-rollback]
//! ```
//!
//! Every command takes the node directory made by `vkx-host init` (for
//! `master.key`) and optionally `--store DIR` (default `<node-dir>/keys`).
//!
//! Material given with `--from-file` or `--from-stdin` is taken as raw
//! bytes, exactly as they are (no newline is stripped: `printf`, not
//! `echo`), 1 to [`MAX_KEY_MATERIAL`] bytes; more is refused without being
//! read further. It is held in zeroizing buffers only. `rotate` without a
//! source generates random material of the current version's length and
//! keeps the key's allow-lists. A key whose allow-lists are both empty is
//! stored, with a warning: the host never releases it.
//!
//! Nothing prints material: not the results, not `list`, not an error.
//! `verify` reads and authenticates every version of every key (after a
//! restore from backup, say) and fails if any does not, and reports keys
//! refused as a whole (their sealed current-version record missing,
//! invalid or contradicted). `seal` records each named key's newest
//! authenticated version as current: once for a store written before
//! records existed, or to adopt a version written without one; it prints
//! the version and its creation time for the operator to check. Errors end
//! the command with a message and a non-zero exit status (the binary's);
//! they are a [`KeysCliError`], split by cause.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use vkx_common::wire::{KeyMaterial, MAX_KEY_MATERIAL};
use zeroize::Zeroizing;

use crate::keystore::{
    AllowList, DEFAULT_GENERATED_LEN, DEFAULT_STORE_DIR, DirKeyStore, KeyInfo, KeyStore,
    KeyStoreError, SealChange, Sealed, validate_key_name,
};
use crate::node::NodeError;

/// Why a `keys` command failed. The messages are the operator's; none
/// holds material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysCliError {
    /// Misuse: both material sources given.
    #[error("give either --from-file or --from-stdin, not both")]
    BothSources,
    /// Misuse: `add` without a material source.
    #[error("give the material with --from-file FILE or --from-stdin")]
    NoSource,
    /// The material file could not be opened.
    #[error("open key material file {}", path.display())]
    OpenMaterial { path: PathBuf, source: io::Error },
    /// The material could not be read.
    #[error("read key material from {what}")]
    ReadMaterial { what: String, source: io::Error },
    /// The material given is empty.
    #[error("{what} is empty: a key has 1..={MAX_KEY_MATERIAL} bytes")]
    EmptyMaterial { what: String },
    /// The material given is over [`MAX_KEY_MATERIAL`] bytes.
    #[error(
        "{what} holds more than {MAX_KEY_MATERIAL} bytes: not a key (a key has 1..={MAX_KEY_MATERIAL} bytes)"
    )]
    MaterialTooLong { what: String },
    /// The node's master key could not be loaded.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The store refused (a name, an allow-list, a key) or failed.
    #[error(transparent)]
    Store(#[from] KeyStoreError),
    /// `verify`: some versions did not authenticate (each is printed).
    #[error("{failed} of {total} key versions failed verification")]
    VerifyFailed { failed: usize, total: usize },
    /// `seal`: some keys could not be sealed (each is printed).
    #[error("{failed} of {total} keys could not be sealed")]
    SealFailed { failed: usize, total: usize },
    /// Writing the results failed.
    #[error(transparent)]
    Output(#[from] io::Error),
    /// Writing `list --json` failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Where the store is.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// The node directory made by `vkx-host init` (holds master.key).
    #[arg(long, value_name = "DIR")]
    pub node_dir: PathBuf,
    /// The key store directory [default: NODE_DIR/keys].
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

/// To whom a new key may be released (besides the policy's grant).
#[derive(Debug, Clone, clap::Args)]
pub struct AllowArgs {
    /// A VM the key may be released to (repeatable).
    #[arg(long = "allow-vm", value_name = "VM_ID")]
    pub allow_vm: Vec<String>,
    /// An image whose VMs the key may be released to (repeatable).
    #[arg(long = "allow-image", value_name = "IMAGE")]
    pub allow_image: Vec<String>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Add a new key with material from a file or standard input (raw
    /// bytes, 1..=1024). Refuses a name that exists.
    Add {
        #[command(flatten)]
        store: StoreArgs,
        /// The key's name (1..64 of [A-Za-z0-9._:+-], not starting with
        /// '.').
        name: String,
        /// Read the material from this file.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "from_stdin",
            conflicts_with = "from_stdin"
        )]
        from_file: Option<PathBuf>,
        /// Read the material from standard input.
        #[arg(long)]
        from_stdin: bool,
        #[command(flatten)]
        allow: AllowArgs,
    },
    /// Add a new key with random material. Refuses a name that exists.
    Generate {
        #[command(flatten)]
        store: StoreArgs,
        /// The key's name.
        name: String,
        /// Length of the material in bytes (1..=1024).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_GENERATED_LEN)]
        bytes: usize,
        #[command(flatten)]
        allow: AllowArgs,
    },
    /// Write a new version of a key (random material of the current
    /// length unless given) with the same allow-lists; prints the new
    /// version. Keeps the 8 newest versions.
    Rotate {
        #[command(flatten)]
        store: StoreArgs,
        /// The key's name.
        name: String,
        /// Read the new material from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "from_stdin")]
        from_file: Option<PathBuf>,
        /// Read the new material from standard input.
        #[arg(long)]
        from_stdin: bool,
    },
    /// List the keys: name, current version, versions kept, length,
    /// creation time, allow-lists. Never material.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read and authenticate every version of every key; fails if any
    /// cannot be.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove a key and all its versions.
    Remove {
        #[command(flatten)]
        store: StoreArgs,
        /// The key's name.
        name: String,
    },
    /// Record each key's newest authenticated version as its current one,
    /// in its sealed record. Needed once for a store written before vkx
    /// kept records (every key of it is refused until then); also adopts
    /// a newer version written without a record. Check the versions it
    /// prints: they are served from now on.
    Seal {
        #[command(flatten)]
        store: StoreArgs,
        /// The keys to seal.
        #[arg(
            value_name = "NAME",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        names: Vec<String>,
        /// Seal every key of the store.
        #[arg(long)]
        all: bool,
        /// Also move a record back to the newest version left when the
        /// version it names is gone, and replace an invalid record. Either
        /// may undo a rotation (for instance one made after a leak): only
        /// after restoring from backup has failed.
        #[arg(long)]
        danger_accept_rollback: bool,
    },
}

/// Runs a `keys` command, printing its results on standard output and
/// warnings on standard error.
pub fn run(cmd: KeysCommand) -> Result<(), KeysCliError> {
    let mut out = io::stdout().lock();
    let mut err = io::stderr().lock();
    execute(cmd, &mut io::stdin(), &mut out, &mut err)
}

fn execute(
    cmd: KeysCommand,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), KeysCliError> {
    match cmd {
        KeysCommand::Add {
            store,
            name,
            from_file,
            from_stdin,
            allow,
        } => {
            let name = validate_key_name(&name)?;
            let allow = AllowList::new(&allow.allow_vm, &allow.allow_image)?;
            let store = open(&store)?;
            let material = read_source(from_file.as_deref(), from_stdin, stdin)?
                .ok_or(KeysCliError::NoSource)?;
            let info = store.add(&name, &material, &allow)?;
            drop(material);
            warn_if_never_released(&allow, err)?;
            writeln!(
                out,
                "added key {} version {} ({} bytes)",
                info.name, info.current_version, info.material_len
            )?;
        }
        KeysCommand::Generate {
            store,
            name,
            bytes,
            allow,
        } => {
            let name = validate_key_name(&name)?;
            let allow = AllowList::new(&allow.allow_vm, &allow.allow_image)?;
            let store = open(&store)?;
            let info = store.generate(&name, bytes, &allow)?;
            warn_if_never_released(&allow, err)?;
            writeln!(
                out,
                "generated key {} version {} ({} random bytes)",
                info.name, info.current_version, info.material_len
            )?;
        }
        KeysCommand::Rotate {
            store,
            name,
            from_file,
            from_stdin,
        } => {
            let name = validate_key_name(&name)?;
            let store = open(&store)?;
            let material = read_source(from_file.as_deref(), from_stdin, stdin)?;
            let info = store.rotate(&name, material.as_ref())?;
            drop(material);
            writeln!(
                out,
                "rotated key {} to version {} ({} versions kept)",
                info.name,
                info.current_version,
                info.versions.len()
            )?;
        }
        KeysCommand::List { store, json } => {
            let store = open(&store)?;
            let keys = store.list()?;
            if json {
                print_json(&keys, out)?;
            } else if keys.is_empty() {
                writeln!(out, "no keys in {}", store.dir().display())?;
            } else {
                print_table(&keys, out)?;
            }
        }
        KeysCommand::Verify { store } => {
            let store = open(&store)?;
            let checks = store.verify()?;
            let mut failed = 0usize;
            for check in &checks {
                match &check.result {
                    Ok(()) => writeln!(out, "ok    {} v{}", check.name, check.version)?,
                    Err(e) => {
                        failed += 1;
                        writeln!(out, "FAIL  {} v{}: {e}", check.name, check.version)?;
                    }
                }
            }
            if failed > 0 {
                return Err(KeysCliError::VerifyFailed {
                    failed,
                    total: checks.len(),
                });
            }
            writeln!(out, "{} key versions verified", checks.len())?;
        }
        KeysCommand::Remove { store, name } => {
            let name = validate_key_name(&name)?;
            let store = open(&store)?;
            let versions = store.remove(&name)?;
            writeln!(out, "removed key {name} ({versions} versions)")?;
        }
        KeysCommand::Seal {
            store,
            names,
            all,
            danger_accept_rollback,
        } => {
            let names = names
                .iter()
                .map(|n| validate_key_name(n))
                .collect::<Result<Vec<_>, _>>()?;
            let store = open(&store)?;
            let names = if all { store.names()? } else { names };
            let mut failed = 0usize;
            for name in &names {
                match store.seal_current(name, danger_accept_rollback) {
                    Ok(sealed) => print_sealed(&sealed, out)?,
                    Err(e) => {
                        failed += 1;
                        writeln!(err, "FAIL  {name}: {e}")?;
                    }
                }
            }
            if failed > 0 {
                return Err(KeysCliError::SealFailed {
                    failed,
                    total: names.len(),
                });
            }
            if names.is_empty() {
                writeln!(out, "no keys in {}", store.dir().display())?;
            }
        }
    }
    Ok(())
}

/// One line per sealed key: the version now current, and what changed.
fn print_sealed(sealed: &Sealed, out: &mut dyn Write) -> io::Result<()> {
    let (name, version) = (&sealed.name, sealed.version);
    let created = utc(sealed.created_unix);
    match sealed.change {
        SealChange::Unchanged => writeln!(
            out,
            "key {name} already sealed at version {version} (created {created})"
        ),
        SealChange::First => writeln!(
            out,
            "sealed key {name} at version {version} (created {created}); it had no record: \
             check that version {version} is the newest you wrote"
        ),
        SealChange::Forward { from } => writeln!(
            out,
            "sealed key {name} at version {version} (created {created}); the record named \
             version {from}"
        ),
        SealChange::Back { from } => writeln!(
            out,
            "sealed key {name} at version {version} (created {created}): ROLLED BACK from \
             version {from}, whose file is gone"
        ),
        SealChange::ReplacedInvalid => writeln!(
            out,
            "sealed key {name} at version {version} (created {created}): replaced an invalid \
             record"
        ),
    }
}

/// Opens the store with the node's master key.
fn open(args: &StoreArgs) -> Result<DirKeyStore, KeysCliError> {
    let master = crate::node::load_master_key(&args.node_dir)?;
    let dir = args
        .store
        .clone()
        .unwrap_or_else(|| args.node_dir.join(DEFAULT_STORE_DIR));
    Ok(DirKeyStore::open(&dir, master)?)
}

/// The material from `--from-file` or `--from-stdin`, if either was given.
fn read_source(
    file: Option<&Path>,
    from_stdin: bool,
    stdin: &mut dyn Read,
) -> Result<Option<KeyMaterial>, KeysCliError> {
    match (file, from_stdin) {
        (Some(_), true) => Err(KeysCliError::BothSources),
        (Some(path), false) => {
            let mut f = std::fs::File::open(path).map_err(|source| KeysCliError::OpenMaterial {
                path: path.to_path_buf(),
                source,
            })?;
            read_material(&mut f, &path.display().to_string()).map(Some)
        }
        (None, true) => read_material(stdin, "standard input").map(Some),
        (None, false) => Ok(None),
    }
}

/// Reads 1..=[`MAX_KEY_MATERIAL`] bytes into a zeroizing buffer; reads no
/// more than one byte past the limit.
fn read_material(source: &mut dyn Read, what: &str) -> Result<KeyMaterial, KeysCliError> {
    // Allocated once at its full size: growing it would leave copies of
    // the material in freed memory.
    let mut buf = Zeroizing::new(vec![0u8; MAX_KEY_MATERIAL + 1]);
    let mut len = 0;
    while len < buf.len() {
        match source.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(KeysCliError::ReadMaterial {
                    what: what.to_owned(),
                    source,
                });
            }
        }
    }
    if len == 0 {
        return Err(KeysCliError::EmptyMaterial {
            what: what.to_owned(),
        });
    }
    if len > MAX_KEY_MATERIAL {
        return Err(KeysCliError::MaterialTooLong {
            what: what.to_owned(),
        });
    }
    buf.truncate(len);
    // Moves the buffer into the zeroizing KeyMaterial, no copy.
    Ok(KeyMaterial::new(std::mem::take(&mut *buf)))
}

fn warn_if_never_released(allow: &AllowList, err: &mut dyn Write) -> io::Result<()> {
    if allow.is_empty() {
        writeln!(
            err,
            "warning: no --allow-vm or --allow-image: the host will not release this key to any VM"
        )?;
    }
    Ok(())
}

fn join_or_dash<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let joined = items.collect::<Vec<_>>().join(",");
    if joined.is_empty() {
        "-".into()
    } else {
        joined
    }
}

fn print_table(keys: &[KeyInfo], out: &mut dyn Write) -> io::Result<()> {
    let header = [
        "NAME",
        "VERSION",
        "KEPT",
        "BYTES",
        "CREATED (UTC)",
        "ALLOWED VMS",
        "ALLOWED IMAGES",
    ];
    let rows: Vec<[String; 7]> = keys
        .iter()
        .map(|k| {
            [
                k.name.to_string(),
                k.current_version.to_string(),
                k.versions.len().to_string(),
                k.material_len.to_string(),
                utc(k.created_unix),
                join_or_dash(k.allowed_vms.iter().map(|v| v.as_str())),
                join_or_dash(k.allowed_images.iter().map(String::as_str)),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    writeln!(out, "{}", line(&header))?;
    for row in &rows {
        writeln!(out, "{}", line(&row.each_ref().map(String::as_str)))?;
    }
    Ok(())
}

fn print_json(keys: &[KeyInfo], out: &mut dyn Write) -> Result<(), KeysCliError> {
    let doc: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "name": k.name.as_str(),
                "current_version": k.current_version,
                "versions": k.versions,
                "created_unix": k.created_unix,
                "material_len": k.material_len,
                "allowed_vms": k.allowed_vms.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
                "allowed_images": k.allowed_images,
            })
        })
        .collect();
    serde_json::to_writer_pretty(&mut *out, &doc)?;
    writeln!(out)?;
    Ok(())
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic
/// Gregorian calendar, H. Hinnant's civil-from-days).
fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Shift the epoch to 0000-03-01: leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_dir() -> tempfile::TempDir {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path().join(crate::node::MASTER_KEY_FILE))
            .unwrap();
        f.write_all(&[0x42; 32]).unwrap();
        dir
    }

    fn store_args(dir: &tempfile::TempDir) -> StoreArgs {
        StoreArgs {
            node_dir: dir.path().to_path_buf(),
            store: None,
        }
    }

    fn exec(cmd: KeysCommand, stdin: &[u8]) -> (Result<(), KeysCliError>, String, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let r = execute(cmd, &mut &stdin[..], &mut out, &mut err);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_767_225_599), "2025-12-31T23:59:59Z");
        assert_eq!(utc(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn material_is_capped_and_not_empty() {
        let m = read_material(&mut &[7u8; MAX_KEY_MATERIAL][..], "t").unwrap();
        assert_eq!(m.expose().len(), MAX_KEY_MATERIAL);
        let e = read_material(&mut &[7u8; MAX_KEY_MATERIAL + 1][..], "t").unwrap_err();
        assert!(e.to_string().contains("more than 1024 bytes"), "{e}");
        // An endless source is not read to its end.
        let e = read_material(&mut io::repeat(7), "t").unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let e = read_material(&mut &[][..], "t").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn commands_work_and_never_print_material() {
        let dir = node_dir();
        let secret = b"s3cr3t-m4t3r14l-0123456789abcdef";
        let hex = ::hex::encode(secret);
        let (r, out, err) = exec(
            KeysCommand::Add {
                store: store_args(&dir),
                name: "disk".into(),
                from_file: None,
                from_stdin: true,
                allow: AllowArgs {
                    allow_vm: vec!["vm-1".into()],
                    allow_image: vec![],
                },
            },
            secret,
        );
        r.unwrap();
        assert!(out.contains("added key disk version 1 (32 bytes)"), "{out}");
        assert!(err.is_empty(), "{err}");
        let (r, out, _) = exec(
            KeysCommand::Rotate {
                store: store_args(&dir),
                name: "disk".into(),
                from_file: None,
                from_stdin: false,
            },
            b"",
        );
        r.unwrap();
        assert!(
            out.contains("rotated key disk to version 2 (2 versions kept)"),
            "{out}"
        );
        let (r, _, err) = exec(
            KeysCommand::Generate {
                store: store_args(&dir),
                name: "cfg".into(),
                bytes: 16,
                allow: AllowArgs {
                    allow_vm: vec![],
                    allow_image: vec![],
                },
            },
            b"",
        );
        r.unwrap();
        assert!(err.contains("will not release"), "{err}");
        for json in [false, true] {
            let (r, out, err) = exec(
                KeysCommand::List {
                    store: store_args(&dir),
                    json,
                },
                b"",
            );
            r.unwrap();
            assert!(out.contains("disk") && out.contains("cfg"), "{out}");
            assert!(out.contains("vm-1"), "{out}");
            for text in [&out, &err] {
                assert!(!text.contains("s3cr3t") && !text.contains(&hex), "{text}");
            }
        }
        let (r, out, _) = exec(
            KeysCommand::Verify {
                store: store_args(&dir),
            },
            b"",
        );
        r.unwrap();
        assert!(out.contains("3 key versions verified"), "{out}");
        let (r, out, _) = exec(
            KeysCommand::Remove {
                store: store_args(&dir),
                name: "disk".into(),
            },
            b"",
        );
        r.unwrap();
        assert!(out.contains("removed key disk (2 versions)"), "{out}");
        // Errors: existing name, unknown key, bad name, empty input.
        let add = |name: &str| KeysCommand::Add {
            store: store_args(&dir),
            name: name.into(),
            from_file: None,
            from_stdin: true,
            allow: AllowArgs {
                allow_vm: vec![],
                allow_image: vec![],
            },
        };
        let (r, _, _) = exec(add("cfg"), secret);
        assert!(r.unwrap_err().to_string().contains("already exists"));
        let (r, _, _) = exec(add(".."), secret);
        assert!(r.unwrap_err().to_string().contains("invalid key name"));
        let (r, _, _) = exec(add("new"), b"");
        assert!(r.unwrap_err().to_string().contains("empty"));
        let (r, _, _) = exec(
            KeysCommand::Remove {
                store: store_args(&dir),
                name: "disk".into(),
            },
            b"",
        );
        assert!(r.unwrap_err().to_string().contains("does not exist"));
    }
}
