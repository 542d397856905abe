//! The host's key store: the keys the host agent releases to attested VMs,
//! encrypted at rest under the node's master key.
//!
//! # Layout
//!
//! A directory (by default `<node-dir>/keys`, mode 0700) with one
//! subdirectory per key and one file per version of that key:
//!
//! ```text
//! keys/
//!   disk/
//!     00000003.key
//!     00000004.key
//!     current.json      <- sealed record: "the current version is 4"
//!   vm-17-config/
//!     00000001.key
//!     current.json
//! ```
//!
//! Versions are `u32` starting at 1, written as at least eight decimal
//! digits; a name that is not the canonical spelling of a version (`1.key`,
//! `000000001.key`) is not a version and is ignored. A rotation adds a
//! file and never rewrites an earlier one; after a successful rotation the
//! oldest versions are deleted so that at most [`MAX_VERSIONS_KEPT`]
//! remain (a guest may still hold data under a recent earlier version).
//!
//! The current version is the one the key's sealed record names (below),
//! not whichever file happens to be the highest present. If that file
//! cannot be read or authenticated, reads of the current version fail
//! with [`KeyStoreError::Corrupt`]: the store never falls back to an older
//! version on its own, because the older version may be the one the
//! operator rotated away from (for instance after a leak). Restore the
//! file from backup, or `keys remove` the key. For the same reason `list`
//! fails, naming the file, if a key's current version cannot be
//! authenticated; [`DirKeyStore::verify`] (`keys verify`) reports every
//! version of every key one by one. The agent's view ([`CachedKeys`])
//! leaves such a key out instead, with a warning: it is not served, the
//! other keys still are.
//!
//! # The sealed current-version record
//!
//! Version files are authenticated one by one, so on their own they cannot
//! say which one is current: someone who may delete files in the store
//! (but cannot read `master.key`) could delete the newest version and make
//! the host serve the previous one. Each key's directory therefore holds
//! `current.json`: the key's name, its current version and, while a
//! rotation is under way, the version being written (`pending`), with an
//! HMAC-SHA-256 over a domain-separated, length-prefixed encoding of those
//! fields. The HMAC key is derived from the master key with HKDF-SHA-256
//! and its own label, so it is never the AES key itself. A read refuses
//! the key (it is not served; other keys are) when:
//!
//! - the record is missing ([`KeyStoreError::Unsealed`]);
//! - it fails authentication or names another key
//!   ([`KeyStoreError::RecordInvalid`]);
//! - the version it names has no file ([`KeyStoreError::RecordedVersionMissing`]);
//! - a version file newer than the record's current one exists that is not
//!   the rotation in progress ([`KeyStoreError::Unrecorded`]): an old
//!   record put back, or an old file of a removed key restored.
//!
//! A store written before records existed has none, so every key in it is
//! refused until the operator runs `vkx-host keys seal --all`
//! ([`DirKeyStore::seal_current`]), which records each key's highest
//! authenticated version and prints it. The record is never created on
//! the fly: someone who deleted a record together with the newest version
//! would get exactly that roll-back. `keys seal` never moves a record to
//! an older version, nor replaces an invalid record, unless given
//! `--danger-accept-rollback`.
//!
//! What the record cannot stop: someone who can *read* the store and
//! saved an earlier record (and can write the store) may put it back and
//! delete the newer versions. Only a monotonic counter outside the disk
//! (a TPM NV index) would close that; file modes keep records unreadable
//! to anyone but the store's owner.
//!
//! # Ownership and permissions
//!
//! [`DirKeyStore::open`] refuses a store directory not owned by the
//! process's effective uid ([`KeyStoreError::NotOwned`]) or with any group
//! or other permission bit set ([`KeyStoreError::DirectoryExposed`]: read
//! lists the key names, execute reaches the files, write deletes them).
//! Each read refuses a key whose directory fails the same checks or is a
//! symbolic link ([`KeyStoreError::Symlink`]). vkx creates every
//! directory of the store 0700, so a store made by its own tools always
//! passes.
//!
//! # File format and encryption
//!
//! Each version file is a small JSON document (unknown fields refused):
//!
//! ```json
//! { "format": 1, "name": "disk", "version": 4, "created_unix": 1767225600,
//!   "allowed_vms": ["vm-17"], "allowed_images": ["debian-12-2026.11"],
//!   "nonce": "<24 hex>", "ciphertext": "<hex of AES-256-GCM output>" }
//! ```
//!
//! The material is sealed with AES-256-GCM (`ring::aead`) under the node's
//! 32-byte master key (`<node-dir>/master.key`, see
//! [`crate::node::load_master_key`]), with a fresh random 96-bit nonce per
//! file. A store writes a few versions per key per day, far below the 2^32
//! encryptions per key that random GCM nonces allow. The associated data is
//! a canonical, length-prefixed encoding of every header field (format,
//! name, version, creation time, both allow-lists, in file order), so
//! editing any metadata on disk, or copying a file to another key's or
//! version's place, makes it fail authentication
//! ([`KeyStoreError::Corrupt`]). The same error is what a store opened with
//! another node's master key reports.
//!
//! # Crash safety
//!
//! A version file is written to `.tmp-<random>` in the key's directory
//! (created exclusively, mode 0600), fsynced, hard-linked to its final
//! name, the temporary name is unlinked and the directory fsynced. A link,
//! unlike a rename, fails if the target exists: version files are never
//! replaced, and two concurrent rotations cannot both claim the same
//! version (the loser gets [`KeyStoreError::ConcurrentWrite`]). A record
//! is written the same way but renamed over the old one. Writers of one
//! key (rotate, seal, remove) hold an exclusive `flock` on its directory,
//! so no record is written from a stale read; readers take no lock.
//!
//! A rotation from version N records "current N, pending N+1", writes
//! version N+1, then records "current N+1". Until that last step the key
//! is served at N and version N+1 is not served at all; the next rotation
//! deletes such an uncommitted file and writes N+1 afresh. A new key is
//! built (first version and record) in a `.tmp-<random>` directory of the
//! store and renamed into place, so a key appears complete or not at all.
//! A crash at any point leaves the old state or the new one, never a
//! half-written key; at worst a `.tmp-*` file or directory stays behind.
//! Reads ignore those; write operations delete the ones older than
//! [`STALE_TEMP_AGE`] (younger ones may belong to a writer still at work).
//!
//! `remove` renames the key's directory to `.removed-<random>` (the key is
//! gone at that instant), then deletes it; write operations delete
//! leftovers of an interrupted removal. Deleting does not shred: the
//! ciphertext may stay on the disk until overwritten, readable only with
//! the master key.
//!
//! # Names and limits
//!
//! Key names are protocol key names ([`KeyName`]: 1 to 64 characters of
//! `[A-Za-z0-9._:+-]`, so no `/`) that do not start with `.` (which keeps
//! `.`, `..` and the store's own `.tmp-*` / `.removed-*` entries out of the
//! name space). Image names in allow-lists follow the same character rule.
//! Bounds: [`MAX_KEYS`] keys, 1 to [`MAX_KEY_MATERIAL`] bytes of material,
//! [`MAX_ALLOWED_ENTRIES`] entries per allow-list, no file larger than
//! [`MAX_KEY_FILE`] read, and bounded directory scans.
//!
//! # Entitlement
//!
//! Each key carries its own allow-lists of VMs and images. The host
//! releases a key only when the policy grants it to the VM *and* the key's
//! allow-list names the VM or its image ([`StoredKey::entitles`]): two
//! independent operator actions, so neither a policy edit nor a key import
//! alone hands a key out.
//!
//! # Interface
//!
//! The agent reads through the [`KeyStore`] trait (current version, a given
//! version, the list), so a KMS-backed store can stand in later; the write
//! operations (add, generate, rotate, remove) are on [`DirKeyStore`] and
//! used by the operator CLI (`vkx-host keys`). All calls do blocking file
//! I/O: call them from a blocking thread in async code. Material is only
//! ever held in zeroizing buffers, and no `Debug` output, error or log line
//! contains it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use serde::{Deserialize, Serialize};
use vkx_common::rl_warn;
use vkx_common::wire::{KeyMaterial, KeyName, MAX_KEY_MATERIAL, VmId};
use zeroize::Zeroizing;

use crate::fsutil::{
    self, FsError, create_private_dir, create_private_dirs, create_private_file, entries_bounded,
};

/// The version of the key file format this code reads and writes.
pub const FORMAT: u32 = 1;

/// Parses one of the store's JSON files (`what`: "key file", "record").
/// serde_json's messages may quote the input, so the reason says only
/// where the parse failed.
fn from_json<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(raw).map_err(|e| {
        format!(
            "not a {what} ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        )
    })
}

/// A file's `format` field: this vkx reads [`FORMAT`] only.
fn check_format(format: u32) -> Result<(), String> {
    if format == FORMAT {
        Ok(())
    } else {
        Err(format!("format {format} (this vkx reads format {FORMAT})"))
    }
}
/// The master key: an AES-256 key.
pub const MASTER_KEY_LEN: usize = 32;
/// Keys a store may hold: a node serves about 1,000 VMs with a handful of
/// keys each; 4 Ki bounds a full scan.
pub const MAX_KEYS: usize = 4096;
/// Versions kept per key: the current one and enough earlier ones for
/// guests that still hold data under a recent version.
pub const MAX_VERSIONS_KEPT: usize = 8;
/// Smallest key material accepted.
pub const MIN_KEY_MATERIAL: usize = 1;
/// Entries per allow-list (VMs, images): keys meant for more VMs belong to
/// an image.
pub const MAX_ALLOWED_ENTRIES: usize = 64;
/// Longest image name in an allow-list: the policy's.
pub use crate::policy::MAX_IMAGE_NAME;
/// Largest key file read. The largest valid file (1 KiB of material, two
/// full allow-lists of 64-character names, pretty-printed) is about
/// 12 KiB.
pub const MAX_KEY_FILE: u64 = 16 * 1024;
/// Material length `generate` uses unless told otherwise: an AES-256 or
/// HMAC-SHA-256 key.
pub const DEFAULT_GENERATED_LEN: usize = 32;
/// Age after which a write operation deletes a `.tmp-*` entry: a writer
/// holds one for milliseconds, so an older one was left by a crash.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(300);
/// The store's default directory, inside the node directory.
pub const DEFAULT_STORE_DIR: &str = "keys";

/// Entries looked at in one scan of the store's top directory, keys or
/// not: bounds the work a directory full of stray entries can cause.
const MAX_STORE_SCAN: usize = 2 * MAX_KEYS;
/// Entries looked at in one scan of a key's directory: a handful of
/// versions plus crash leftovers.
const MAX_KEY_DIR_SCAN: usize = 1024;
/// Digits of a version file name: `00000001.key`.
const VERSION_DIGITS: usize = 8;
const VERSION_SUFFIX: &str = ".key";
const TEMP_PREFIX: &str = ".tmp-";
const REMOVED_PREFIX: &str = ".removed-";
/// Domain separation for the associated data of a key file.
const AAD_DOMAIN: &[u8] = b"vkx key store\0";
/// A key's sealed current-version record, in the key's directory (not a
/// version file name, does not start with '.').
pub const RECORD_FILE: &str = "current.json";
/// Largest record file read: a valid one is under 250 bytes.
const MAX_RECORD_FILE: u64 = 1024;
/// Domain separation for the MAC of a record.
const RECORD_DOMAIN: &[u8] = b"vkx key store record\0";
/// HKDF label of the record MAC key: a key of its own, derived from the
/// master key, never the AES key itself.
const RECORD_KEY_LABEL: &[u8] = b"vkx key store record mac key v1";

// ----------------------------------------------------------------- errors

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    #[error(
        "invalid key name {name:?}: {reason} (allowed: 1..64 characters of [A-Za-z0-9._:+-], not starting with '.')"
    )]
    InvalidName { name: String, reason: String },
    #[error("invalid key material: {reason}")]
    InvalidMaterial { reason: String },
    #[error("invalid allow-list: {reason}")]
    InvalidAllowList { reason: String },
    #[error("key store directory {}: {source}", path.display())]
    Directory { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("key file {} is corrupt: {reason}; restore it from backup, or remove the key", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("key {name} already exists: rotate it for a new version, or remove it first")]
    Exists { name: KeyName },
    #[error("key {name} does not exist")]
    NotFound { name: KeyName },
    #[error("key store {} already holds {MAX_KEYS} keys (or more than {MAX_STORE_SCAN} entries): remove keys no longer used", path.display())]
    Full { path: PathBuf },
    #[error("{} holds more than {MAX_KEY_DIR_SCAN} entries: not a key directory as vkx writes it; clean it up", path.display())]
    TooManyFiles { path: PathBuf },
    #[error(
        "key {name} is at the last possible version ({}): add a new key instead",
        u32::MAX
    )]
    VersionsExhausted { name: KeyName },
    #[error("key {name} was changed by another writer at the same time: re-run the command")]
    ConcurrentWrite { name: KeyName },
    #[error("key {name} was removed from the store, but deleting {} failed: {source}; delete it by hand", path.display())]
    RemoveIncomplete {
        name: KeyName,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cryptography failed: {0}")]
    Crypto(&'static str),
    #[error(
        "key {name} has no sealed current-version record ({shown}), so it is refused: without one, \
         deleting its newest version file would roll it back unnoticed. A store written by vkx \
         before records existed has none: check the versions with `vkx-host keys verify`, then \
         record the newest as current with `vkx-host keys seal {name}` (or `--all`)",
        shown = .path.display()
    )]
    Unsealed { name: KeyName, path: PathBuf },
    #[error(
        "the sealed record {shown} of key {name} is invalid: {reason}. It was modified or damaged, \
         or sealed with another master key, so the key is refused. Restore the record from \
         backup; or, if the newest version present is the one to serve, \
         `vkx-host keys seal --danger-accept-rollback {name}`",
        shown = .path.display()
    )]
    RecordInvalid {
        name: KeyName,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "key {name}: its sealed record names version {version} as current, but {shown} is \
         missing: it was deleted (possibly to roll the key back) or lost. The key is refused \
         rather than served at an older version. Restore the file from backup, or `keys remove` \
         the key; to serve the newest version left instead, \
         `vkx-host keys seal --danger-accept-rollback {name}`",
        shown = .path.display()
    )]
    RecordedVersionMissing {
        name: KeyName,
        version: u32,
        path: PathBuf,
    },
    #[error(
        "key {name}: {shown} (version {version}) is newer than the current version {current} its \
         sealed record names, and no rotation recorded it: an earlier record was put back, or a \
         file of a removed key restored. The key is refused. If version {version} is the newest \
         version you wrote, `vkx-host keys seal {name}` records it; otherwise delete the file",
        shown = .path.display()
    )]
    Unrecorded {
        name: KeyName,
        version: u32,
        current: u32,
        path: PathBuf,
    },
    #[error(
        "{shown} has mode {mode:04o}: group or others may list, enter or change it, so the key \
         store refuses it. Restrict it with `chmod 700 {shown}`",
        shown = .path.display()
    )]
    DirectoryExposed { path: PathBuf, mode: u32 },
    #[error(
        "{shown} is owned by uid {owner}, but vkx-host runs as uid {expected}: that user could \
         read or replace the keys, so it is refused. If it is genuine, \
         `chown -R {expected} {shown}` (or run vkx-host as uid {owner})",
        shown = .path.display()
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error(
        "{} is a symbolic link: vkx makes key directories itself and never links them, so it is \
         refused. Replace the link with the directory, or remove the key",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error(
        "cannot learn this process's effective uid from /proc/self/status ({source}), so the \
         owner of the key store {} cannot be checked: mount /proc",
        path.display()
    )]
    UnknownUid { path: PathBuf, source: io::Error },
    /// A fault injected by the crash-safety tests: the "process" stops
    /// where it is, without cleaning up.
    #[cfg(test)]
    #[error("injected crash")]
    InjectedCrash,
}

impl From<FsError> for KeyStoreError {
    fn from(e: FsError) -> Self {
        match e {
            FsError::Io { path, source } => Self::Io { path, source },
            FsError::Directory { path, source } => Self::Directory { path, source },
            FsError::NotAFile { path } => Self::Corrupt {
                path,
                reason: "not a regular file".into(),
            },
            FsError::TooLarge { path, limit } => Self::Corrupt {
                path,
                reason: format!("larger than {limit} bytes"),
            },
            FsError::TooManyEntries { path, .. } => Self::Full { path },
        }
    }
}

// ------------------------------------------------------------- master key

/// The node's master key, which seals every stored key. Zeroized on drop;
/// `Debug` shows nothing of it.
pub struct MasterKey(Zeroizing<[u8; MASTER_KEY_LEN]>);

impl MasterKey {
    pub fn new(bytes: Zeroizing<[u8; MASTER_KEY_LEN]>) -> Self {
        Self(bytes)
    }

    /// A fresh random master key (ring's `SystemRandom`).
    pub fn generate() -> Result<Self, KeyStoreError> {
        let mut bytes = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| KeyStoreError::Crypto("random number generator failed"))?;
        Ok(Self(bytes))
    }

    /// The key bytes, to write them to `master.key`.
    pub(crate) fn expose(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.0
    }

    fn aead_key(&self) -> Result<LessSafeKey, KeyStoreError> {
        UnboundKey::new(&AES_256_GCM, &self.0[..])
            .map(LessSafeKey::new)
            .map_err(|_| KeyStoreError::Crypto("AES-256-GCM key setup"))
    }

    /// The HMAC-SHA-256 key of the current-version records: HKDF-SHA-256
    /// of the master key (no salt) expanded with [`RECORD_KEY_LABEL`].
    fn record_key(&self) -> Result<hmac::Key, KeyStoreError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&self.0[..]);
        let okm = prk
            .expand(&[RECORD_KEY_LABEL], hmac::HMAC_SHA256)
            .map_err(|_| KeyStoreError::Crypto("HKDF expansion of the record key"))?;
        Ok(hmac::Key::from(okm))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

// ------------------------------------------------------------ value types

/// Checks a key name: a protocol [`KeyName`] that does not start with `.`
/// (so it is a safe directory name that cannot clash with `.`, `..` or the
/// store's temporary entries).
pub fn validate_key_name(name: &str) -> Result<KeyName, KeyStoreError> {
    let invalid = |reason: String| KeyStoreError::InvalidName {
        name: name.chars().take(KeyName::MAX_LEN + 8).collect(),
        reason,
    };
    let key = KeyName::new(name).map_err(|e| invalid(e.to_string()))?;
    check_dotless(&key)?;
    Ok(key)
}

fn check_dotless(name: &KeyName) -> Result<(), KeyStoreError> {
    if name.as_str().starts_with('.') {
        return Err(KeyStoreError::InvalidName {
            name: name.as_str().to_owned(),
            reason: "starts with '.'".into(),
        });
    }
    Ok(())
}

fn check_material_len(len: usize) -> Result<(), String> {
    if (MIN_KEY_MATERIAL..=MAX_KEY_MATERIAL).contains(&len) {
        Ok(())
    } else {
        Err(format!(
            "{len} bytes; a key has {MIN_KEY_MATERIAL}..={MAX_KEY_MATERIAL} bytes"
        ))
    }
}

/// Which VMs and images a key may be released to (in addition to the
/// policy's grant, see [`StoredKey::entitles`]). Sorted, without
/// duplicates, at most [`MAX_ALLOWED_ENTRIES`] of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    vms: BTreeSet<VmId>,
    images: BTreeSet<String>,
}

impl AllowList {
    /// Validates the VM ids (protocol [`VmId`]s) and image names.
    /// Duplicates are merged.
    pub fn new<V: AsRef<str>, I: AsRef<str>>(
        vms: &[V],
        images: &[I],
    ) -> Result<Self, KeyStoreError> {
        let invalid = |reason: String| KeyStoreError::InvalidAllowList { reason };
        for (what, n) in [("VMs", vms.len()), ("images", images.len())] {
            if n > MAX_ALLOWED_ENTRIES {
                return Err(invalid(format!(
                    "{n} {what}; at most {MAX_ALLOWED_ENTRIES} per key"
                )));
            }
        }
        let vms = vms
            .iter()
            .map(|v| {
                VmId::new(v.as_ref()).map_err(|e| {
                    invalid(format!(
                        "vm-id {:?}: {e}",
                        v.as_ref()
                            .chars()
                            .take(VmId::MAX_LEN + 8)
                            .collect::<String>()
                    ))
                })
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        let images = images
            .iter()
            .map(|i| {
                let i = i.as_ref();
                crate::policy::check_image_name(i).map_err(|e| {
                    invalid(format!(
                        "{:?}: {e}",
                        i.chars().take(MAX_IMAGE_NAME + 8).collect::<String>()
                    ))
                })?;
                Ok::<_, KeyStoreError>(i.to_owned())
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        Ok(Self { vms, images })
    }

    pub fn vms(&self) -> &BTreeSet<VmId> {
        &self.vms
    }

    pub fn images(&self) -> &BTreeSet<String> {
        &self.images
    }

    /// True if the key may go to no VM at all.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.images.is_empty()
    }
}

/// One version of a key, decrypted. `Debug` shows the material's length
/// only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub name: KeyName,
    pub version: u32,
    /// When this version was written (seconds since the Unix epoch).
    pub created_unix: u64,
    pub allowed_vms: BTreeSet<VmId>,
    pub allowed_images: BTreeSet<String>,
    pub material: KeyMaterial,
}

impl StoredKey {
    /// Whether the key's own allow-list names the VM or its image. The
    /// host releases a key only when this holds *and* the policy grants the
    /// key to the VM.
    pub fn entitles(&self, vm_id: &VmId, image: Option<&str>) -> bool {
        self.allowed_vms.contains(vm_id)
            || image.is_some_and(|image| self.allowed_images.contains(image))
    }

    fn allow_list(&self) -> AllowList {
        AllowList {
            vms: self.allowed_vms.clone(),
            images: self.allowed_images.clone(),
        }
    }
}

/// What `list` shows of a key: never its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub name: KeyName,
    pub current_version: u32,
    /// Every version kept, ascending (the last is the current one).
    pub versions: Vec<u32>,
    /// When the current version was written (seconds since the Unix
    /// epoch).
    pub created_unix: u64,
    /// Length of the current version's material in bytes.
    pub material_len: usize,
    pub allowed_vms: BTreeSet<VmId>,
    pub allowed_images: BTreeSet<String>,
}

impl KeyInfo {
    fn new(current: &StoredKey, versions: Vec<u32>) -> Self {
        Self {
            name: current.name.clone(),
            current_version: current.version,
            versions,
            created_unix: current.created_unix,
            material_len: current.material.expose().len(),
            allowed_vms: current.allowed_vms.clone(),
            allowed_images: current.allowed_images.clone(),
        }
    }
}

/// The outcome of checking one version file ([`DirKeyStore::verify`]).
#[derive(Debug)]
pub struct VersionCheck {
    pub name: KeyName,
    pub version: u32,
    pub result: Result<(), KeyStoreError>,
}

// ------------------------------------------------------------- the trait

/// The read side of a key store: what the host agent needs to release
/// keys. Calls may block on I/O.
pub trait KeyStore: Send + Sync {
    /// The current version of `name` (the one its sealed record names),
    /// or `None` if there is no such key. An error refuses the key.
    fn current(&self, name: &KeyName) -> Result<Option<StoredKey>, KeyStoreError>;
    /// Version `version` of `name`, or `None` if it does not exist (never
    /// written, pruned, or newer than the current version).
    fn version(&self, name: &KeyName, version: u32) -> Result<Option<StoredKey>, KeyStoreError>;
    /// Every key, sorted by name, without material.
    fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError>;
}

// ------------------------------------------------------------- the cache

/// The store with each key's current version decrypted once per version:
/// `serve`'s sessions read keys on the runtime thread, and a rotation
/// wakes every session that holds the key, so without it a thousand
/// sessions would each read and decrypt the same new version. Which
/// version is current is looked up every time (a directory listing and
/// the key's sealed record, checked; no key file read), so a rotation,
/// removal or roll-back attempt on disk is seen at once; only the
/// decrypted version is cached. Its `list` leaves refused keys out (with
/// a rate-limited warning) instead of failing: the agent still starts and
/// serves every other key. The key-version watcher calls
/// [`CachedKeys::refresh`] (on the blocking pool) before it publishes a
/// new version map, so the sessions it wakes find the new versions
/// decrypted; versions no longer current leave the cache then. Bounded
/// by the keys in the store (one version each).
pub struct CachedKeys {
    inner: Arc<DirKeyStore>,
    cache: std::sync::RwLock<BTreeMap<KeyName, StoredKey>>,
    decrypts: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for CachedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.cache.read().map_or(0, |c| c.len());
        write!(f, "CachedKeys({n} current versions cached)")
    }
}

impl CachedKeys {
    pub fn new(inner: Arc<DirKeyStore>) -> Self {
        Self {
            inner,
            cache: std::sync::RwLock::new(BTreeMap::new()),
            decrypts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<DirKeyStore> {
        &self.inner
    }

    /// Reads and decrypts done (not answered from the cache).
    pub fn decrypts(&self) -> u64 {
        self.decrypts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Brings the cache to `versions` (each key's current version): drops
    /// what is no longer current and decrypts what is. Blocking.
    pub fn refresh(&self, versions: &BTreeMap<KeyName, u32>) {
        if let Ok(mut c) = self.cache.write() {
            c.retain(|name, k| versions.get(name) == Some(&k.version));
        }
        for (name, version) in versions {
            let cached = self
                .cache
                .read()
                .is_ok_and(|c| c.get(name).is_some_and(|k| k.version == *version));
            if !cached {
                let _ = self.current(name);
            }
        }
    }
}

impl KeyStore for CachedKeys {
    fn current(&self, name: &KeyName) -> Result<Option<StoredKey>, KeyStoreError> {
        let Some(version) = self.inner.current_version(name)? else {
            return Ok(None);
        };
        if let Some(k) = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.get(name).filter(|k| k.version == version).cloned())
        {
            return Ok(Some(k));
        }
        self.decrypts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let k = self.inner.current(name)?;
        if let (Some(k), Ok(mut c)) = (&k, self.cache.write()) {
            // A newer version cached meanwhile stays.
            if c.get(name).is_none_or(|old| old.version < k.version) {
                c.insert(name.clone(), k.clone());
            }
        }
        Ok(k)
    }

    fn version(&self, name: &KeyName, version: u32) -> Result<Option<StoredKey>, KeyStoreError> {
        self.inner.version(name, version)
    }

    /// The keys that can be served. A refused key (corrupt current
    /// version, missing or invalid record, ...) is left out with a warning:
    /// it is not served, and the failure of one key stops neither the
    /// agent's start nor the rotations of the others.
    fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        let survey = self.inner.survey()?;
        for (name, error) in &survey.refused {
            rl_warn!(key = %name, error = %error, "key refused, not served");
        }
        Ok(survey.keys)
    }
}

// ------------------------------------------------------------- the store

/// The on-disk document of one version.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: u32,
    name: String,
    version: u32,
    created_unix: u64,
    allowed_vms: Vec<String>,
    allowed_images: Vec<String>,
    nonce: String,
    ciphertext: String,
}

/// The on-disk document of a key's current-version record.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    format: u32,
    name: String,
    current: u32,
    pending: Option<u32>,
    /// HMAC-SHA-256 of [`record_message`], hex.
    mac: String,
}

/// What a key's record says: the current version, and the version a
/// rotation is writing (always greater), if one is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    current: u32,
    pending: Option<u32>,
}

/// A key as its record and directory listing show it, checked: the
/// record is authentic, its current version's file is there, and no
/// unrecorded newer version is.
#[derive(Debug)]
struct KeyState {
    current: u32,
    pending: Option<u32>,
    /// The committed versions present, ascending; the last is `current`.
    versions: Vec<u32>,
}

/// Every key of the store, split into those that can be served and those
/// refused ([`DirKeyStore::survey`]).
#[derive(Debug, Default)]
pub struct Survey {
    pub keys: Vec<KeyInfo>,
    pub refused: Vec<(KeyName, KeyStoreError)>,
}

/// What `keys seal` did to one key's record ([`DirKeyStore::seal_current`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealChange {
    /// The record already named this version.
    Unchanged,
    /// There was no record (a store written before records existed).
    First,
    /// The record named an older version.
    Forward { from: u32 },
    /// The record named a newer version whose file is gone; done only with
    /// `accept_rollback`.
    Back { from: u32 },
    /// The record was invalid; replaced only with `accept_rollback`.
    ReplacedInvalid,
}

/// The outcome of [`DirKeyStore::seal_current`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub name: KeyName,
    /// The version now recorded as current.
    pub version: u32,
    /// When that version was written (seconds since the Unix epoch).
    pub created_unix: u64,
    pub change: SealChange,
}

/// How [`DirKeyStore::write_file`] puts a finished temporary file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// A hard link: fails if the name exists (version files).
    New,
    /// A rename over the old file (records).
    Replace,
}

/// The points of a write where the crash-safety tests stop the "process".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Half the temporary file written.
    TempPartlyWritten,
    /// The temporary file written, not fsynced.
    TempWritten,
    /// The temporary file fsynced, not linked.
    TempSynced,
    /// Linked to its final name; temporary name not unlinked, directory
    /// not fsynced.
    Linked,
    /// A new key's directory complete under its temporary name.
    StagingReady,
    /// A new key's directory renamed into place, store not fsynced.
    Published,
    /// A record's temporary file fsynced, not renamed over the record.
    RecordSynced,
    /// A rotation's "pending" record in place, the new version not yet
    /// written.
    PendingRecorded,
    /// A rotation's final record in place, old versions not yet pruned.
    Committed,
}

/// A key store in a directory, sealed with the node's master key.
#[derive(Debug)]
pub struct DirKeyStore {
    dir: PathBuf,
    master: MasterKey,
    rng: SystemRandom,
    /// This process's effective uid: the owner every directory of the
    /// store must have.
    euid: u32,
    #[cfg(test)]
    crash_at: Option<Step>,
}

impl DirKeyStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) if it
    /// does not exist. Refuses a directory not owned by this process's
    /// effective uid, or that group or others have any permission on
    /// (a symbolic link to the store is followed; the directory it names
    /// is checked).
    pub fn open(dir: &Path, master: MasterKey) -> Result<Self, KeyStoreError> {
        let err = |source| KeyStoreError::Directory {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            create_private_dirs(dir).map_err(err)?;
        }
        let meta = fs::metadata(dir).map_err(err)?;
        if !meta.is_dir() {
            return Err(err(io::Error::other("not a directory")));
        }
        let euid = crate::node::effective_uid().map_err(|source| KeyStoreError::UnknownUid {
            path: dir.to_path_buf(),
            source,
        })?;
        check_private_dir(dir, &meta, euid)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            master,
            rng: SystemRandom::new(),
            euid,
            #[cfg(test)]
            crash_at: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds a new key with `material` as version 1. Fails if the key
    /// exists.
    pub fn add(
        &self,
        name: &KeyName,
        material: &KeyMaterial,
        allow: &AllowList,
    ) -> Result<KeyInfo, KeyStoreError> {
        check_material_len(material.expose().len())
            .map_err(|reason| KeyStoreError::InvalidMaterial { reason })?;
        let key_dir = self.key_dir(name)?;
        self.clean_store();
        if !self.versions(&key_dir)?.is_empty()
            || fs::symlink_metadata(key_dir.join(RECORD_FILE)).is_ok()
        {
            return Err(KeyStoreError::Exists { name: name.clone() });
        }
        if self.key_dirs()?.len() >= MAX_KEYS {
            return Err(KeyStoreError::Full {
                path: self.dir.clone(),
            });
        }
        let key = StoredKey {
            name: name.clone(),
            version: 1,
            created_unix: now_unix(),
            allowed_vms: allow.vms.clone(),
            allowed_images: allow.images.clone(),
            material: material.clone(),
        };
        let bytes = self.seal(&key)?;
        // Build the key's directory under a temporary name, then rename it
        // into place: the key appears complete or not at all.
        let staging = self.dir.join(self.temp_name()?);
        create_private_dir(&staging).map_err(|source| KeyStoreError::Io {
            path: staging.clone(),
            source,
        })?;
        let first = Record {
            current: 1,
            pending: None,
        };
        let published = self
            .write_new_file(&staging, &version_file_name(1), &bytes, name)
            .and_then(|()| self.write_record(&staging, name, first))
            .and_then(|()| self.crash_point(Step::StagingReady))
            .and_then(|()| match fs::rename(&staging, &key_dir) {
                Ok(()) => Ok(()),
                // The target is a non-empty directory: another writer
                // added the key meanwhile.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty
                    ) =>
                {
                    Err(KeyStoreError::Exists { name: name.clone() })
                }
                Err(source) => Err(KeyStoreError::Io {
                    path: key_dir.clone(),
                    source,
                }),
            });
        if let Err(e) = published {
            if !is_injected_crash(&e) {
                let _ = fs::remove_dir_all(&staging);
            }
            return Err(e);
        }
        self.crash_point(Step::Published)?;
        sync_dir(&self.dir)?;
        Ok(KeyInfo::new(&key, vec![1]))
    }

    /// Adds a new key with `len` random bytes as version 1.
    pub fn generate(
        &self,
        name: &KeyName,
        len: usize,
        allow: &AllowList,
    ) -> Result<KeyInfo, KeyStoreError> {
        let material = self.random_material(len)?;
        self.add(name, &material, allow)
    }

    /// Writes a new version of `name` with `material`, or random material
    /// of the current version's length if `None`; keeps the allow-lists.
    /// Records it as current (see the module's crash-safety notes), then
    /// deletes the oldest versions beyond [`MAX_VERSIONS_KEPT`]. Refuses a
    /// key that reads refuse.
    pub fn rotate(
        &self,
        name: &KeyName,
        material: Option<&KeyMaterial>,
    ) -> Result<KeyInfo, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        let _lock = self.lock_key_dir(&key_dir, name)?;
        let state = self
            .state(name)?
            .ok_or_else(|| KeyStoreError::NotFound { name: name.clone() })?;
        let current = self.read_current(name, &state)?;
        let version = current
            .version
            .checked_add(1)
            .ok_or_else(|| KeyStoreError::VersionsExhausted { name: name.clone() })?;
        let material = match material {
            Some(m) => {
                check_material_len(m.expose().len())
                    .map_err(|reason| KeyStoreError::InvalidMaterial { reason })?;
                m.clone()
            }
            None => self.random_material(current.material.expose().len())?,
        };
        let allow = current.allow_list();
        let key = StoredKey {
            name: name.clone(),
            version,
            created_unix: now_unix(),
            allowed_vms: allow.vms,
            allowed_images: allow.images,
            material,
        };
        let bytes = self.seal(&key)?;
        self.clean_temps(&key_dir);
        // An earlier rotation stopped before its commit: its version was
        // never served, and its number is taken again.
        if let Some(pending) = state.pending {
            let path = key_dir.join(version_file_name(pending));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(KeyStoreError::Io { path, source }),
            }
        }
        self.write_record(
            &key_dir,
            name,
            Record {
                current: current.version,
                pending: Some(version),
            },
        )?;
        self.crash_point(Step::PendingRecorded)?;
        self.write_new_file(&key_dir, &version_file_name(version), &bytes, name)?;
        self.write_record(
            &key_dir,
            name,
            Record {
                current: version,
                pending: None,
            },
        )?;
        self.crash_point(Step::Committed)?;
        let versions = self.prune(&key_dir, version)?;
        Ok(KeyInfo::new(&key, versions))
    }

    /// Records the highest version of `name` present as its current
    /// version (`keys seal`), after authenticating that version: for a
    /// store written before records existed, or to adopt a newer version
    /// written without one. Refuses to move the record to an older version
    /// (the file of the recorded one is gone) or to replace an invalid
    /// record unless `accept_rollback`: either may be a roll-back attempt.
    pub fn seal_current(
        &self,
        name: &KeyName,
        accept_rollback: bool,
    ) -> Result<Sealed, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        let _lock = self.lock_key_dir(&key_dir, name)?;
        if !self.check_key_dir(&key_dir)? {
            return Err(KeyStoreError::NotFound { name: name.clone() });
        }
        let Some(&newest) = self.versions(&key_dir)?.last() else {
            return Err(KeyStoreError::NotFound { name: name.clone() });
        };
        // Never an older version in its place if it does not authenticate.
        let key = self.read_version(name, &key_dir, newest)?;
        let change = match self.read_record(&key_dir, name) {
            Ok(None) => SealChange::First,
            Ok(Some(r)) if r.current == newest => SealChange::Unchanged,
            Ok(Some(r)) if r.current < newest => SealChange::Forward { from: r.current },
            Ok(Some(r)) if accept_rollback => SealChange::Back { from: r.current },
            Ok(Some(r)) => {
                return Err(KeyStoreError::RecordedVersionMissing {
                    name: name.clone(),
                    version: r.current,
                    path: key_dir.join(version_file_name(r.current)),
                });
            }
            Err(KeyStoreError::RecordInvalid { .. }) if accept_rollback => {
                SealChange::ReplacedInvalid
            }
            Err(e) => return Err(e),
        };
        let record = Record {
            current: newest,
            pending: None,
        };
        if change != SealChange::Unchanged || self.read_record(&key_dir, name)? != Some(record) {
            self.write_record(&key_dir, name, record)?;
        }
        Ok(Sealed {
            name: name.clone(),
            version: newest,
            created_unix: key.created_unix,
            change,
        })
    }

    /// The names of the keys in the store (directories holding a version
    /// or a record), sorted; nothing is read or checked.
    pub fn names(&self) -> Result<Vec<KeyName>, KeyStoreError> {
        self.key_dirs()
    }

    /// Every key, split into those that can be served ([`KeyInfo`]) and
    /// those refused, with why. Fails only if the store cannot be scanned.
    pub fn survey(&self) -> Result<Survey, KeyStoreError> {
        let mut survey = Survey::default();
        for name in self.key_dirs()? {
            match self.key_info(&name) {
                Ok(Some(info)) => survey.keys.push(info),
                // Removed meanwhile: not a key any more.
                Ok(None) => {}
                Err(e) => survey.refused.push((name, e)),
            }
        }
        Ok(survey)
    }

    /// Removes a key with all its versions. Returns how many versions it
    /// had.
    pub fn remove(&self, name: &KeyName) -> Result<usize, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        match fs::symlink_metadata(&key_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(KeyStoreError::Corrupt {
                    path: key_dir,
                    reason: "not a directory".into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyStoreError::NotFound { name: name.clone() });
            }
            Err(source) => {
                return Err(KeyStoreError::Io {
                    path: key_dir,
                    source,
                });
            }
        }
        // A rotation of the key under way finishes first.
        let _lock = self.lock_key_dir(&key_dir, name)?;
        self.clean_store();
        let versions = self.versions(&key_dir)?.len();
        let removed = self
            .dir
            .join(format!("{REMOVED_PREFIX}{}", self.random_hex()?));
        fs::rename(&key_dir, &removed).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => KeyStoreError::NotFound { name: name.clone() },
            _ => KeyStoreError::Io {
                path: key_dir.clone(),
                source,
            },
        })?;
        sync_dir(&self.dir)?;
        match fs::remove_dir_all(&removed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeyStoreError::RemoveIncomplete {
                    name: name.clone(),
                    path: removed,
                    source,
                });
            }
        }
        sync_dir(&self.dir)?;
        Ok(versions)
    }

    /// Reads and authenticates every version of every key (for
    /// `keys verify`, e.g. after restoring a backup). Fails only if the
    /// store cannot be scanned; each version's outcome is in its
    /// [`VersionCheck`].
    ///
    /// A key refused as a whole (its record missing, invalid or
    /// contradicted, its directory exposed) fails on the line of the
    /// version concerned: the recorded version whose file is missing, the
    /// unrecorded newer version, or else the newest version present.
    pub fn verify(&self) -> Result<Vec<VersionCheck>, KeyStoreError> {
        let mut out = Vec::new();
        for name in self.key_dirs()? {
            let key_dir = self.key_dir(&name)?;
            let versions = self.versions(&key_dir)?;
            let mut checks: Vec<VersionCheck> = versions
                .iter()
                .map(|&version| VersionCheck {
                    name: name.clone(),
                    version,
                    result: self.read_version(&name, &key_dir, version).map(|_| ()),
                })
                .collect();
            if let Err(e) = self.state(&name) {
                let at = match &e {
                    KeyStoreError::RecordedVersionMissing { version, .. }
                    | KeyStoreError::Unrecorded { version, .. } => *version,
                    _ => versions.last().copied().unwrap_or(0),
                };
                match checks.iter_mut().find(|c| c.version == at) {
                    Some(c) if c.result.is_ok() => c.result = Err(e),
                    // Already failing on its own.
                    Some(_) => {}
                    None => checks.push(VersionCheck {
                        name: name.clone(),
                        version: at,
                        result: Err(e),
                    }),
                }
                checks.sort_by_key(|c| c.version);
            }
            out.extend(checks);
        }
        Ok(out)
    }

    // ------------------------------------------------------ internals

    /// The current version of `name` as its sealed record names it,
    /// checked like every read (the record authentic, the version's file
    /// present, no unrecorded newer one), but without reading or
    /// decrypting a key file; `None` if there is no such key.
    pub fn current_version(&self, name: &KeyName) -> Result<Option<u32>, KeyStoreError> {
        Ok(self.state(name)?.map(|s| s.current))
    }

    /// The checked state of a key ([`KeyState`]), or `None` if there is no
    /// such key (no directory, or one without versions and record).
    fn state(&self, name: &KeyName) -> Result<Option<KeyState>, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        if !self.check_key_dir(&key_dir)? {
            return Ok(None);
        }
        // Listed before the record is read: a rotation writes the record
        // that allows a version ("pending") before it links the version,
        // so every version listed here is allowed by the record read next.
        let listed = self.versions(&key_dir)?;
        let record = match self.read_record(&key_dir, name)? {
            Some(record) => record,
            // An empty directory, or the key removed since the listing.
            None if self.versions(&key_dir)?.is_empty() => return Ok(None),
            None => {
                return Err(KeyStoreError::Unsealed {
                    name: name.clone(),
                    path: key_dir.join(RECORD_FILE),
                });
            }
        };
        if let Some(version) = listed
            .iter()
            .rev()
            .copied()
            .find(|&v| v > record.current && Some(v) != record.pending)
        {
            return Err(KeyStoreError::Unrecorded {
                name: name.clone(),
                version,
                current: record.current,
                path: key_dir.join(version_file_name(version)),
            });
        }
        let current_path = key_dir.join(version_file_name(record.current));
        match fs::symlink_metadata(&current_path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyStoreError::RecordedVersionMissing {
                    name: name.clone(),
                    version: record.current,
                    path: current_path,
                });
            }
            Err(source) => {
                return Err(KeyStoreError::Io {
                    path: current_path,
                    source,
                });
            }
        }
        let mut versions: Vec<u32> = listed.into_iter().filter(|&v| v < record.current).collect();
        versions.push(record.current);
        Ok(Some(KeyState {
            current: record.current,
            pending: record.pending,
            versions,
        }))
    }

    /// Reads and authenticates the current version of a checked key.
    fn read_current(&self, name: &KeyName, state: &KeyState) -> Result<StoredKey, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        match self.read_version(name, &key_dir, state.current) {
            Err(KeyStoreError::Io { path, source }) if source.kind() == io::ErrorKind::NotFound => {
                Err(KeyStoreError::RecordedVersionMissing {
                    name: name.clone(),
                    version: state.current,
                    path,
                })
            }
            other => other,
        }
    }

    /// What `list` shows of one key, or `None` if it does not exist.
    fn key_info(&self, name: &KeyName) -> Result<Option<KeyInfo>, KeyStoreError> {
        let Some(state) = self.state(name)? else {
            return Ok(None);
        };
        let current = self.read_current(name, &state)?;
        Ok(Some(KeyInfo::new(&current, state.versions)))
    }

    /// Checks a key's directory: `false` if it does not exist; refused if
    /// it is a symbolic link, not a directory, not owned by this process's
    /// effective uid, or open to group or others.
    fn check_key_dir(&self, key_dir: &Path) -> Result<bool, KeyStoreError> {
        let meta = match fs::symlink_metadata(key_dir) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(KeyStoreError::Io {
                    path: key_dir.to_path_buf(),
                    source,
                });
            }
        };
        if meta.file_type().is_symlink() {
            return Err(KeyStoreError::Symlink {
                path: key_dir.to_path_buf(),
            });
        }
        if !meta.is_dir() {
            return Err(KeyStoreError::Corrupt {
                path: key_dir.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        check_private_dir(key_dir, &meta, self.euid)?;
        Ok(true)
    }

    /// Takes an exclusive `flock` on a key's directory, held until the
    /// returned handle is dropped: writers of one key take turns.
    fn lock_key_dir(&self, key_dir: &Path, name: &KeyName) -> Result<File, KeyStoreError> {
        let dir = File::open(key_dir).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => KeyStoreError::NotFound { name: name.clone() },
            _ => KeyStoreError::Io {
                path: key_dir.to_path_buf(),
                source,
            },
        })?;
        dir.lock().map_err(|source| KeyStoreError::Io {
            path: key_dir.to_path_buf(),
            source,
        })?;
        Ok(dir)
    }

    /// Reads and authenticates a key's record; `None` if there is none.
    fn read_record(&self, key_dir: &Path, name: &KeyName) -> Result<Option<Record>, KeyStoreError> {
        let path = key_dir.join(RECORD_FILE);
        let invalid = |reason: String| KeyStoreError::RecordInvalid {
            name: name.clone(),
            path: path.clone(),
            reason,
        };
        let raw = match read_capped(&path, MAX_RECORD_FILE) {
            Ok(raw) => raw,
            Err(KeyStoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(KeyStoreError::Corrupt { reason, .. }) => return Err(invalid(reason)),
            Err(e) => return Err(e),
        };
        let file: RecordFile = from_json(&raw, "record").map_err(invalid)?;
        check_format(file.format).map_err(invalid)?;
        let mac = hex::decode(&file.mac).map_err(|_| invalid("the MAC is not hex".into()))?;
        let record = Record {
            current: file.current,
            pending: file.pending,
        };
        // The name is covered by the MAC as the directory spells it: a
        // record copied from another key fails here. ring compares the
        // tags in constant time.
        hmac::verify(
            &self.master.record_key()?,
            &record_message(name, record),
            &mac,
        )
        .map_err(|_| {
            invalid(
                "authentication failed (edited, copied from another key, or sealed with \
                 another master key)"
                    .into(),
            )
        })?;
        if file.name != name.as_str() {
            return Err(invalid("names another key".into()));
        }
        if record.current == 0 || record.pending.is_some_and(|p| p <= record.current) {
            return Err(invalid("impossible versions".into()));
        }
        Ok(Some(record))
    }

    /// Writes a key's record atomically and durably, replacing the old
    /// one.
    fn write_record(
        &self,
        key_dir: &Path,
        name: &KeyName,
        record: Record,
    ) -> Result<(), KeyStoreError> {
        let mac = hmac::sign(&self.master.record_key()?, &record_message(name, record));
        let file = RecordFile {
            format: FORMAT,
            name: name.as_str().to_owned(),
            current: record.current,
            pending: record.pending,
            mac: hex::encode(mac.as_ref()),
        };
        let mut json = serde_json::to_vec_pretty(&file)
            .map_err(|_| KeyStoreError::Crypto("record serialisation"))?;
        json.push(b'\n');
        self.write_file(key_dir, RECORD_FILE, &json, name, Publish::Replace)
    }

    fn key_dir(&self, name: &KeyName) -> Result<PathBuf, KeyStoreError> {
        check_dotless(name)?;
        Ok(self.dir.join(name.as_str()))
    }

    /// The names of the key directories that hold at least one version
    /// file or a record, sorted. Entries starting with `.`, non-directories (also
    /// symlinks) and names that are not key names are not keys.
    fn key_dirs(&self) -> Result<Vec<KeyName>, KeyStoreError> {
        let dir_err = |source| KeyStoreError::Directory {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for item in entries_bounded(&self.dir, MAX_STORE_SCAN)? {
            let file_name = item.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.starts_with('.') || !item.file_type().map_err(dir_err)?.is_dir() {
                continue;
            }
            let Ok(name) = validate_key_name(file_name) else {
                continue;
            };
            if self.versions(&item.path())?.is_empty()
                && fs::symlink_metadata(item.path().join(RECORD_FILE)).is_err()
            {
                continue;
            }
            if out.len() >= MAX_KEYS {
                return Err(KeyStoreError::Full {
                    path: self.dir.clone(),
                });
            }
            out.push(name);
        }
        out.sort();
        Ok(out)
    }

    /// The versions present in a key's directory, ascending; empty if the
    /// directory does not exist.
    fn versions(&self, key_dir: &Path) -> Result<Vec<u32>, KeyStoreError> {
        let io_err = |source| KeyStoreError::Io {
            path: key_dir.to_path_buf(),
            source,
        };
        let entries = match fs::read_dir(key_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io_err(source)),
        };
        let mut out = Vec::new();
        for (seen, item) in entries.enumerate() {
            if seen >= MAX_KEY_DIR_SCAN {
                return Err(KeyStoreError::TooManyFiles {
                    path: key_dir.to_path_buf(),
                });
            }
            let item = item.map_err(io_err)?;
            if let Some(version) = item.file_name().to_str().and_then(parse_version_file_name) {
                out.push(version);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn read_version(
        &self,
        name: &KeyName,
        key_dir: &Path,
        version: u32,
    ) -> Result<StoredKey, KeyStoreError> {
        let path = key_dir.join(version_file_name(version));
        let raw = read_capped(&path, MAX_KEY_FILE)?;
        self.open_sealed(&path, &raw, name, version)
    }

    /// Parses and authenticates a key file that should hold `version` of
    /// `name`.
    fn open_sealed(
        &self,
        path: &Path,
        raw: &[u8],
        name: &KeyName,
        version: u32,
    ) -> Result<StoredKey, KeyStoreError> {
        let corrupt = |reason: String| KeyStoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file: KeyFile = from_json(raw, "key file").map_err(corrupt)?;
        check_format(file.format).map_err(corrupt)?;
        if file.name != name.as_str() || file.version != version {
            return Err(corrupt(format!(
                "holds key {:?} version {}, but its place is {name} version {version}",
                file.name
                    .chars()
                    .take(KeyName::MAX_LEN + 8)
                    .collect::<String>(),
                file.version
            )));
        }
        if file.allowed_vms.len() > MAX_ALLOWED_ENTRIES
            || file.allowed_images.len() > MAX_ALLOWED_ENTRIES
        {
            return Err(corrupt(format!(
                "an allow-list has more than {MAX_ALLOWED_ENTRIES} entries"
            )));
        }
        let nonce = hex::decode(&file.nonce)
            .ok()
            .and_then(|n| <[u8; NONCE_LEN]>::try_from(n).ok())
            .ok_or_else(|| corrupt(format!("nonce is not {NONCE_LEN} bytes of hex")))?;
        let mut sealed = Zeroizing::new(
            hex::decode(&file.ciphertext).map_err(|_| corrupt("ciphertext is not hex".into()))?,
        );
        let tag_len = AES_256_GCM.tag_len();
        if sealed.len() < MIN_KEY_MATERIAL + tag_len || sealed.len() > MAX_KEY_MATERIAL + tag_len {
            return Err(corrupt("ciphertext has an impossible length".into()));
        }
        let aad = header_aad(&file);
        let plain = self
            .master
            .aead_key()?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut sealed[..],
            )
            .map_err(|_| {
                corrupt(
                    "authentication failed: the file was modified or damaged, or the store \
                     was sealed with another master key"
                        .into(),
                )
            })?;
        let material = KeyMaterial::new(plain.to_vec());
        // Authenticated, so written by vkx; checked all the same.
        let allow = AllowList::new(&file.allowed_vms, &file.allowed_images)
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(StoredKey {
            name: name.clone(),
            version,
            created_unix: file.created_unix,
            allowed_vms: allow.vms,
            allowed_images: allow.images,
            material,
        })
    }

    /// The file bytes of a key version: JSON with the sealed material.
    fn seal(&self, key: &StoredKey) -> Result<Vec<u8>, KeyStoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| KeyStoreError::Crypto("random number generator failed"))?;
        let mut file = KeyFile {
            format: FORMAT,
            name: key.name.as_str().to_owned(),
            version: key.version,
            created_unix: key.created_unix,
            allowed_vms: key
                .allowed_vms
                .iter()
                .map(|v| v.as_str().to_owned())
                .collect(),
            allowed_images: key.allowed_images.iter().cloned().collect(),
            nonce: hex::encode(nonce),
            ciphertext: String::new(),
        };
        let aad = header_aad(&file);
        let plain = key.material.expose();
        // Room for the tag up front: growing the buffer would leave a copy
        // of the plaintext behind in freed memory.
        let mut buf = Zeroizing::new(Vec::with_capacity(plain.len() + AES_256_GCM.tag_len()));
        buf.extend_from_slice(plain);
        self.master
            .aead_key()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut *buf,
            )
            .map_err(|_| KeyStoreError::Crypto("AES-256-GCM seal"))?;
        file.ciphertext = hex::encode(&*buf);
        let mut json = serde_json::to_vec_pretty(&file)
            .map_err(|_| KeyStoreError::Crypto("key file serialisation"))?;
        json.push(b'\n');
        Ok(json)
    }

    /// Writes `bytes` as the new file `dir/file_name`, atomically and
    /// durably, never replacing an existing file.
    fn write_new_file(
        &self,
        dir: &Path,
        file_name: &str,
        bytes: &[u8],
        name: &KeyName,
    ) -> Result<(), KeyStoreError> {
        self.write_file(dir, file_name, bytes, name, Publish::New)
    }

    /// Writes `bytes` as `dir/file_name`, atomically and durably:
    /// temporary file (O_EXCL, 0600), write, fsync, then a hard link to the
    /// final name and unlink of the temporary one ([`Publish::New`], fails
    /// if the name exists), or a rename over it ([`Publish::Replace`]);
    /// then fsync the directory.
    fn write_file(
        &self,
        dir: &Path,
        file_name: &str,
        bytes: &[u8],
        name: &KeyName,
        publish: Publish,
    ) -> Result<(), KeyStoreError> {
        // The version files' crash points; a record has its own.
        let step = |step: Step| match publish {
            Publish::New => self.crash_point(step),
            Publish::Replace => Ok(()),
        };
        let temp = dir.join(self.temp_name()?);
        let target = dir.join(file_name);
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyStoreError::Io { path, source }
        };
        let mut file = create_private_file(&temp).map_err(io_err(&temp))?;
        let (first, second) = bytes.split_at(bytes.len() / 2);
        let written = (|| {
            file.write_all(first).map_err(io_err(&temp))?;
            step(Step::TempPartlyWritten)?;
            file.write_all(second).map_err(io_err(&temp))?;
            step(Step::TempWritten)?;
            file.sync_all().map_err(io_err(&temp))?;
            step(Step::TempSynced)?;
            match publish {
                // Unlike rename, a link fails if the target exists.
                Publish::New => match fs::hard_link(&temp, &target) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        Err(KeyStoreError::ConcurrentWrite { name: name.clone() })
                    }
                    Err(source) => Err(KeyStoreError::Io {
                        path: target.clone(),
                        source,
                    }),
                },
                Publish::Replace => {
                    self.crash_point(Step::RecordSynced)?;
                    fs::rename(&temp, &target).map_err(io_err(&target))
                }
            }
        })();
        drop(file);
        if let Err(e) = written {
            if !is_injected_crash(&e) {
                let _ = fs::remove_file(&temp);
            }
            return Err(e);
        }
        if publish == Publish::New {
            self.crash_point(Step::Linked)?;
            fs::remove_file(&temp).map_err(io_err(&temp))?;
        }
        sync_dir(dir)
    }

    /// Deletes the oldest versions beyond [`MAX_VERSIONS_KEPT`] (counting
    /// from `current` down); returns the versions left up to `current`.
    fn prune(&self, key_dir: &Path, current: u32) -> Result<Vec<u32>, KeyStoreError> {
        let mut versions = self.versions(key_dir)?;
        versions.retain(|&v| v <= current);
        let excess = versions.len().saturating_sub(MAX_VERSIONS_KEPT);
        if excess == 0 {
            return Ok(versions);
        }
        for version in versions.drain(..excess) {
            let path = key_dir.join(version_file_name(version));
            match fs::remove_file(&path) {
                Ok(()) => {}
                // A concurrent rotation pruned it already.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(KeyStoreError::Io { path, source }),
            }
        }
        sync_dir(key_dir)?;
        Ok(versions)
    }

    /// Best effort: deletes stale `.tmp-*` entries and leftovers of
    /// interrupted removals from the store's top directory.
    fn clean_store(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for item in entries.take(MAX_STORE_SCAN).flatten() {
            let file_name = item.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let removed = file_name.starts_with(REMOVED_PREFIX);
            if removed || (file_name.starts_with(TEMP_PREFIX) && is_stale(&item)) {
                remove_entry(&item);
            }
        }
    }

    /// Best effort: deletes stale `.tmp-*` files from a key's directory.
    fn clean_temps(&self, key_dir: &Path) {
        let Ok(entries) = fs::read_dir(key_dir) else {
            return;
        };
        for item in entries.take(MAX_KEY_DIR_SCAN).flatten() {
            let is_temp = item
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TEMP_PREFIX));
            if is_temp && is_stale(&item) {
                remove_entry(&item);
            }
        }
    }

    fn random_material(&self, len: usize) -> Result<KeyMaterial, KeyStoreError> {
        check_material_len(len).map_err(|reason| KeyStoreError::InvalidMaterial { reason })?;
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        self.rng
            .fill(&mut bytes)
            .map_err(|_| KeyStoreError::Crypto("random number generator failed"))?;
        // Moves the buffer, no copy of the bytes.
        Ok(KeyMaterial::new(std::mem::take(&mut *bytes)))
    }

    fn random_hex(&self) -> Result<String, KeyStoreError> {
        let mut r = [0u8; 8];
        self.rng
            .fill(&mut r)
            .map_err(|_| KeyStoreError::Crypto("random number generator failed"))?;
        Ok(hex::encode(r))
    }

    fn temp_name(&self) -> Result<String, KeyStoreError> {
        Ok(format!("{TEMP_PREFIX}{}", self.random_hex()?))
    }

    #[cfg(test)]
    fn crash_point(&self, step: Step) -> Result<(), KeyStoreError> {
        if self.crash_at == Some(step) {
            return Err(KeyStoreError::InjectedCrash);
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn crash_point(&self, _step: Step) -> Result<(), KeyStoreError> {
        Ok(())
    }
}

impl KeyStore for DirKeyStore {
    fn current(&self, name: &KeyName) -> Result<Option<StoredKey>, KeyStoreError> {
        match self.state(name)? {
            None => Ok(None),
            Some(state) => self.read_current(name, &state).map(Some),
        }
    }

    /// A version newer than the current one is never returned: it is an
    /// uncommitted rotation, or not this key's.
    fn version(&self, name: &KeyName, version: u32) -> Result<Option<StoredKey>, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        if version == 0 {
            return Ok(None);
        }
        let Some(state) = self.state(name)? else {
            return Ok(None);
        };
        if version > state.current {
            return Ok(None);
        }
        match self.read_version(name, &key_dir, version) {
            Err(KeyStoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// Fails on the first key refused (in name order); see
    /// [`DirKeyStore::survey`] for every key's outcome.
    fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        let survey = self.survey()?;
        match survey.refused.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(survey.keys),
        }
    }
}

// ---------------------------------------------------------------- helpers

/// `00000001.key` for version 1.
fn version_file_name(version: u32) -> String {
    format!("{version:0width$}{VERSION_SUFFIX}", width = VERSION_DIGITS)
}

/// The version a file name spells, if it is the canonical spelling of a
/// version (at least 8 digits, no extra leading zeros, not 0).
fn parse_version_file_name(file_name: &str) -> Option<u32> {
    let digits = file_name.strip_suffix(VERSION_SUFFIX)?;
    if !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let version: u32 = digits.parse().ok()?;
    (version >= 1 && version_file_name(version) == file_name).then_some(version)
}

/// The associated data of a key file: every header field, length-prefixed,
/// in file order, so that no two headers encode alike.
fn header_aad(file: &KeyFile) -> Vec<u8> {
    fn put_len(out: &mut Vec<u8>, n: usize) {
        out.extend_from_slice(&u64::try_from(n).unwrap_or(u64::MAX).to_be_bytes());
    }
    fn put_str(out: &mut Vec<u8>, s: &str) {
        put_len(out, s.len());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(AAD_DOMAIN);
    out.extend_from_slice(&file.format.to_be_bytes());
    put_str(&mut out, &file.name);
    out.extend_from_slice(&file.version.to_be_bytes());
    out.extend_from_slice(&file.created_unix.to_be_bytes());
    for list in [&file.allowed_vms, &file.allowed_images] {
        put_len(&mut out, list.len());
        for item in list {
            put_str(&mut out, item);
        }
    }
    out
}

/// What a record's MAC covers: a domain tag, the format, the key's name
/// (length-prefixed), the current version and the pending one (tagged),
/// so that no two records encode alike.
fn record_message(name: &KeyName, record: Record) -> Vec<u8> {
    let name = name.as_str().as_bytes();
    let mut out = Vec::with_capacity(RECORD_DOMAIN.len() + name.len() + 32);
    out.extend_from_slice(RECORD_DOMAIN);
    out.extend_from_slice(&FORMAT.to_be_bytes());
    out.extend_from_slice(&u64::try_from(name.len()).unwrap_or(u64::MAX).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&record.current.to_be_bytes());
    match record.pending {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            out.extend_from_slice(&p.to_be_bytes());
        }
    }
    out
}

/// Refuses a directory of the store not owned by `euid`, or with any
/// group or other permission bit: read lists it, execute reaches its
/// files, write deletes or replaces them.
fn check_private_dir(path: &Path, meta: &fs::Metadata, euid: u32) -> Result<(), KeyStoreError> {
    if meta.uid() != euid {
        return Err(KeyStoreError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: euid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyStoreError::DirectoryExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// [`fsutil::read_capped`], in the store's errors.
fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, KeyStoreError> {
    Ok(fsutil::read_capped(path, limit)?)
}

/// [`fsutil::sync_dir`], in the store's errors.
fn sync_dir(dir: &Path) -> Result<(), KeyStoreError> {
    Ok(fsutil::sync_dir(dir)?)
}

fn is_stale(item: &fs::DirEntry) -> bool {
    item.metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= STALE_TEMP_AGE)
}

fn remove_entry(item: &fs::DirEntry) {
    let path = item.path();
    let _ = match item.file_type() {
        Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
        _ => fs::remove_file(&path),
    };
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
fn is_injected_crash(e: &KeyStoreError) -> bool {
    matches!(e, KeyStoreError::InjectedCrash)
}

#[cfg(not(test))]
fn is_injected_crash(_e: &KeyStoreError) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8; 32] = b"0123456789abcdef-key-material-!!";

    fn master(byte: u8) -> MasterKey {
        MasterKey::new(Zeroizing::new([byte; MASTER_KEY_LEN]))
    }

    fn store(dir: &Path) -> DirKeyStore {
        DirKeyStore::open(&dir.join("keys"), master(1)).unwrap()
    }

    fn name(s: &str) -> KeyName {
        validate_key_name(s).unwrap()
    }

    fn material(bytes: &[u8]) -> KeyMaterial {
        KeyMaterial::new(bytes.to_vec())
    }

    fn allow(vms: &[&str], images: &[&str]) -> AllowList {
        AllowList::new(vms, images).unwrap()
    }

    #[test]
    fn the_cache_decrypts_each_current_version_once_and_follows_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(store(dir.path()));
        let disk = name("disk");
        inner
            .add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let keys = CachedKeys::new(inner.clone());
        let versions = |s: &DirKeyStore| -> BTreeMap<KeyName, u32> {
            s.list()
                .unwrap()
                .into_iter()
                .map(|k| (k.name, k.current_version))
                .collect()
        };
        keys.refresh(&versions(&inner));
        assert_eq!(keys.decrypts(), 1);
        // A thousand sessions asking: no more reads or decrypts.
        for _ in 0..1000 {
            assert_eq!(keys.current(&disk).unwrap().unwrap().version, 1);
        }
        assert_eq!(keys.decrypts(), 1);
        // A rotation: seen once the watcher refreshes, decrypted once.
        inner.rotate(&disk, None).unwrap();
        assert_eq!(
            keys.current(&disk).unwrap().unwrap().version,
            2,
            "served at once"
        );
        keys.refresh(&versions(&inner));
        for _ in 0..1000 {
            assert_eq!(keys.current(&disk).unwrap().unwrap().version, 2);
        }
        assert_eq!(keys.decrypts(), 2);
        // A removed key leaves the cache with the refresh.
        inner.remove(&disk).unwrap();
        keys.refresh(&versions(&inner));
        assert!(keys.current(&disk).is_err() || keys.current(&disk).unwrap().is_none());
        assert!(format!("{keys:?}").contains("0 current versions"));
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn key_path(s: &DirKeyStore, key: &str, version: u32) -> PathBuf {
        s.dir().join(key).join(version_file_name(version))
    }

    /// Edits one field of a key file's JSON in place.
    fn edit(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        f(&mut v);
        fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    fn assert_corrupt<T: fmt::Debug>(r: Result<T, KeyStoreError>, what: &str) {
        assert!(
            matches!(r, Err(KeyStoreError::Corrupt { .. })),
            "{what}: {r:?}"
        );
    }

    #[test]
    fn round_trip_through_add_current_version_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(s.list().unwrap().is_empty());
        assert!(s.current(&name("disk")).unwrap().is_none());
        let info = s
            .add(
                &name("disk"),
                &material(SECRET),
                &allow(&["vm-2", "vm-1", "vm-1"], &["debian-12"]),
            )
            .unwrap();
        assert_eq!(info.current_version, 1);
        assert_eq!(info.versions, vec![1]);
        assert_eq!(info.material_len, 32);
        let key = s.current(&name("disk")).unwrap().unwrap();
        assert_eq!(key.material.expose(), SECRET);
        assert_eq!(key.version, 1);
        assert_eq!(
            key.allowed_vms.iter().map(VmId::as_str).collect::<Vec<_>>(),
            ["vm-1", "vm-2"]
        );
        assert!(key.created_unix > 1_700_000_000);
        assert_eq!(s.version(&name("disk"), 1).unwrap(), Some(key.clone()));
        assert_eq!(s.version(&name("disk"), 2).unwrap(), None);
        assert_eq!(s.version(&name("disk"), 0).unwrap(), None);
        assert_eq!(s.version(&name("other"), 1).unwrap(), None);
        s.generate(&name("cfg"), 48, &AllowList::default()).unwrap();
        let list = s.list().unwrap();
        assert_eq!(
            list.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["cfg", "disk"]
        );
        assert_eq!(list[0].material_len, 48);
        assert_eq!(list[1], info);
        // Reopening (a restart) reads the same.
        let again = store(dir.path());
        assert_eq!(again.current(&name("disk")).unwrap(), Some(key));
        // Private files and directories, no temporary entries left.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(s.dir()), 0o700);
        assert_eq!(mode(&s.dir().join("disk")), 0o700);
        assert_eq!(mode(&key_path(&s, "disk", 1)), 0o600);
        assert_eq!(mode(&s.dir().join("disk").join(RECORD_FILE)), 0o600);
        assert_eq!(file_names(s.dir()), ["cfg", "disk"]);
        assert_eq!(
            file_names(&s.dir().join("disk")),
            ["00000001.key", RECORD_FILE]
        );
        // The file holds no plaintext.
        let raw = fs::read(key_path(&s, "disk", 1)).unwrap();
        let text = String::from_utf8(raw).unwrap();
        assert!(!text.contains("key-material") && !text.contains(&hex::encode(SECRET)));
    }

    #[test]
    fn another_master_key_cannot_read_the_store() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path())
            .add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let other = DirKeyStore::open(&dir.path().join("keys"), master(2)).unwrap();
        // The record is checked first, and fails first.
        let err = other.current(&name("disk")).unwrap_err();
        assert!(
            matches!(err, KeyStoreError::RecordInvalid { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("another master key"), "{err}");
        assert!(matches!(
            other.list(),
            Err(KeyStoreError::RecordInvalid { .. })
        ));
        // The version file itself fails too.
        let key_dir = other.dir().join("disk");
        assert_corrupt(other.read_version(&name("disk"), &key_dir, 1), "file");
        // And `seal` cannot paper over it: the version does not authenticate.
        assert_corrupt(other.seal_current(&name("disk"), true), "seal");
    }

    #[test]
    fn edited_metadata_fails_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(
            &name("disk"),
            &material(SECRET),
            &allow(&["vm-1"], &["img"]),
        )
        .unwrap();
        let path = key_path(&s, "disk", 1);
        let pristine = fs::read(&path).unwrap();
        type Edit = (&'static str, fn(&mut serde_json::Value));
        let edits: [Edit; 7] = [
            ("created", |v| v["created_unix"] = 1.into()),
            ("vm added", |v| {
                v["allowed_vms"] = serde_json::json!(["vm-1", "vm-666"]);
            }),
            ("vm replaced", |v| {
                v["allowed_vms"] = serde_json::json!(["vm-666"])
            }),
            ("vms emptied", |v| v["allowed_vms"] = serde_json::json!([])),
            ("image added", |v| {
                v["allowed_images"] = serde_json::json!(["evil", "img"]);
            }),
            // A VM moved to the image list: same strings, other fields.
            ("list swap", |v| {
                v["allowed_vms"] = serde_json::json!([]);
                v["allowed_images"] = serde_json::json!(["img", "vm-1"]);
            }),
            ("format", |v| v["format"] = 2.into()),
        ];
        for (what, f) in edits {
            fs::write(&path, &pristine).unwrap();
            edit(&path, f);
            assert_corrupt(s.current(&name("disk")), what);
        }
        // The version, consistently with the file name and a record naming
        // it: authentication still fails.
        let record = |key: &str, current: u32| {
            s.write_record(
                &s.dir().join(key),
                &name(key),
                Record {
                    current,
                    pending: None,
                },
            )
            .unwrap();
        };
        fs::write(&path, &pristine).unwrap();
        edit(&path, |v| v["version"] = 5.into());
        fs::rename(&path, key_path(&s, "disk", 5)).unwrap();
        record("disk", 5);
        assert_corrupt(s.current(&name("disk")), "version");
        fs::remove_file(key_path(&s, "disk", 5)).unwrap();
        // The name, consistently with the directory.
        create_private_dir(&s.dir().join("other")).unwrap();
        fs::write(key_path(&s, "other", 1), &pristine).unwrap();
        edit(&key_path(&s, "other", 1), |v| v["name"] = "other".into());
        record("other", 1);
        assert_corrupt(s.current(&name("other")), "name");
        // A file copied unchanged to another key's or version's place.
        fs::write(key_path(&s, "other", 1), &pristine).unwrap();
        assert_corrupt(s.current(&name("other")), "copied to another key");
        fs::write(key_path(&s, "disk", 2), &pristine).unwrap();
        record("disk", 2);
        assert_corrupt(s.current(&name("disk")), "copied to another version");
        fs::remove_file(key_path(&s, "disk", 2)).unwrap();
        record("disk", 1);
        // Untouched, it still reads.
        fs::write(&path, &pristine).unwrap();
        assert_eq!(
            s.current(&name("disk")).unwrap().unwrap().material.expose(),
            SECRET
        );
    }

    #[test]
    fn damaged_ciphertext_nonce_or_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let path = key_path(&s, "disk", 1);
        let pristine = fs::read(&path).unwrap();
        let field = |k: &str| {
            let v: serde_json::Value = serde_json::from_slice(&pristine).unwrap();
            v[k].as_str().unwrap().to_owned()
        };
        let flip_first = |h: String| {
            let mut b = hex::decode(h).unwrap();
            b[0] ^= 1;
            hex::encode(b)
        };
        let flip_last = |h: String| {
            let mut b = hex::decode(h).unwrap();
            let n = b.len() - 1;
            b[n] ^= 0x80;
            hex::encode(b)
        };
        let ct = field("ciphertext");
        let nonce = field("nonce");
        let cases: Vec<(&str, &str, serde_json::Value)> = vec![
            (
                "ciphertext bit",
                "ciphertext",
                flip_first(ct.clone()).into(),
            ),
            ("tag bit", "ciphertext", flip_last(ct.clone()).into()),
            ("ciphertext cut", "ciphertext", ct[..ct.len() - 2].into()),
            ("tag only", "ciphertext", ct[ct.len() - 32..].into()),
            ("ciphertext not hex", "ciphertext", "zz".into()),
            ("nonce bit", "nonce", flip_first(nonce.clone()).into()),
            ("nonce short", "nonce", nonce[2..].into()),
            ("nonce type", "nonce", 7.into()),
        ];
        for (what, key, value) in cases {
            fs::write(&path, &pristine).unwrap();
            edit(&path, |v| v[key] = value);
            assert_corrupt(s.current(&name("disk")), what);
        }
        // Truncated at every length (the final newline aside), unknown
        // fields, junk, oversized.
        for len in 0..pristine.trim_ascii_end().len() {
            fs::write(&path, &pristine[..len]).unwrap();
            assert_corrupt(s.current(&name("disk")), &format!("truncated to {len}"));
        }
        fs::write(&path, &pristine).unwrap();
        edit(&path, |v| v["extra"] = 1.into());
        assert_corrupt(s.current(&name("disk")), "unknown field");
        fs::write(&path, b"\x00\xff not json").unwrap();
        assert_corrupt(s.current(&name("disk")), "junk");
        let mut big = pristine.clone();
        big.resize(usize::try_from(MAX_KEY_FILE).unwrap() + 1, b' ');
        fs::write(&path, &big).unwrap();
        let err = s.current(&name("disk")).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        // A corrupt file's error names the file but quotes none of it.
        fs::write(&path, &pristine).unwrap();
        edit(&path, |v| v["ciphertext"] = flip_first(ct.clone()).into());
        let err = s.current(&name("disk")).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains(&ct[..16]), "{err}");
    }

    #[test]
    fn newest_version_corrupt_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        s.rotate(&name("disk"), None).unwrap();
        fs::write(key_path(&s, "disk", 2), b"{}").unwrap();
        // No silent fall-back to version 1.
        assert_corrupt(s.current(&name("disk")), "current");
        assert_corrupt(s.rotate(&name("disk"), None), "rotate");
        assert!(s.version(&name("disk"), 1).unwrap().is_some());
        let checks = s.verify().unwrap();
        assert_eq!(checks.len(), 2);
        assert!(checks[0].result.is_ok());
        assert!(matches!(
            checks[1].result,
            Err(KeyStoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn limits_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let none = AllowList::default();
        // Names.
        for bad in [
            "",
            ".",
            "..",
            ".tmp-x",
            ".removed-x",
            ".hidden",
            "a/b",
            "a b",
            "é",
        ] {
            assert!(
                matches!(
                    validate_key_name(bad),
                    Err(KeyStoreError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(validate_key_name(&"k".repeat(64)).is_ok());
        assert!(validate_key_name(&"k".repeat(65)).is_err());
        // A KeyName that passes the protocol's rule but not the store's.
        let dots = KeyName::new("..").unwrap();
        assert!(matches!(
            s.current(&dots),
            Err(KeyStoreError::InvalidName { .. })
        ));
        assert!(s.add(&dots, &material(SECRET), &none).is_err());
        // Material length.
        for bad in [0, MAX_KEY_MATERIAL + 1] {
            assert!(matches!(
                s.add(&name("m"), &material(&vec![1; bad]), &none),
                Err(KeyStoreError::InvalidMaterial { .. })
            ));
            assert!(matches!(
                s.generate(&name("m"), bad, &none),
                Err(KeyStoreError::InvalidMaterial { .. })
            ));
        }
        // Allow-lists: count and syntax.
        let many: Vec<String> = (0..=MAX_ALLOWED_ENTRIES)
            .map(|i| format!("vm-{i}"))
            .collect();
        let empty: [&str; 0] = [];
        assert!(AllowList::new(&many, &empty).is_err());
        assert!(AllowList::new(&empty, &many).is_err());
        assert!(AllowList::new(&many[..MAX_ALLOWED_ENTRIES], &many[..MAX_ALLOWED_ENTRIES]).is_ok());
        for bad in ["", "a b", "a/b", &"i".repeat(MAX_IMAGE_NAME + 1)] {
            assert!(AllowList::new(&empty, &[bad]).is_err(), "{bad:?}");
            assert!(AllowList::new(&[bad], &empty).is_err(), "{bad:?}");
        }
        // The largest key fits in a file of at most MAX_KEY_FILE bytes.
        let vms: Vec<String> = (0..MAX_ALLOWED_ENTRIES)
            .map(|i| format!("{i:0>64}"))
            .collect();
        let big = AllowList::new(&vms, &vms).unwrap();
        let m = material(&[0xee; MAX_KEY_MATERIAL]);
        s.add(&name(&"k".repeat(64)), &m, &big).unwrap();
        let key = s.current(&name(&"k".repeat(64))).unwrap().unwrap();
        assert_eq!(key.material, m);
        assert_eq!(key.allowed_images.len(), MAX_ALLOWED_ENTRIES);
        let len = fs::metadata(key_path(&s, &"k".repeat(64), 1))
            .unwrap()
            .len();
        assert!(len <= MAX_KEY_FILE, "{len}");
    }

    #[test]
    fn the_store_holds_at_most_max_keys() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        // Key directories as `add` counts them (a version file each); their
        // contents are not read.
        for i in 0..MAX_KEYS {
            let d = s.dir().join(format!("k{i}"));
            fs::create_dir(&d).unwrap();
            fs::write(d.join(version_file_name(1)), b"").unwrap();
        }
        assert!(matches!(
            s.generate(&name("one-more"), 32, &AllowList::default()),
            Err(KeyStoreError::Full { .. })
        ));
        assert!(!s.dir().join("one-more").exists());
    }

    #[test]
    fn add_refuses_an_existing_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        assert!(matches!(
            s.add(&name("disk"), &material(b"other"), &AllowList::default()),
            Err(KeyStoreError::Exists { .. })
        ));
        assert_eq!(
            s.current(&name("disk")).unwrap().unwrap().material.expose(),
            SECRET
        );
        // An empty directory is not a key: add takes its place.
        fs::create_dir(s.dir().join("empty")).unwrap();
        assert!(s.list().unwrap().iter().all(|k| k.name.as_str() != "empty"));
        s.add(&name("empty"), &material(b"x"), &AllowList::default())
            .unwrap();
        assert_eq!(s.list().unwrap().len(), 2);
        assert!(file_names(s.dir()).iter().all(|n| !n.starts_with('.')));
    }

    #[test]
    fn rotate_keeps_allow_lists_and_prunes_to_the_newest_eight() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let allowed = allow(&["vm-1"], &["img"]);
        s.add(&name("disk"), &material(SECRET), &allowed).unwrap();
        let mut seen = vec![SECRET.to_vec()];
        for v in 2..=11u32 {
            let info = if v == 5 {
                s.rotate(&name("disk"), Some(&material(b"given")))
            } else {
                s.rotate(&name("disk"), None)
            }
            .unwrap();
            assert_eq!(info.current_version, v);
            let key = s.current(&name("disk")).unwrap().unwrap();
            assert_eq!(key.version, v);
            assert_eq!(key.allowed_vms, *allowed.vms());
            assert_eq!(key.allowed_images, *allowed.images());
            let expected_len = if v == 5 {
                5
            } else if v < 5 {
                32
            } else {
                5
            };
            assert_eq!(key.material.expose().len(), expected_len, "v{v}");
            assert!(
                !seen.contains(&key.material.expose().to_vec()),
                "v{v} repeats"
            );
            seen.push(key.material.expose().to_vec());
        }
        let info = &s.list().unwrap()[0];
        assert_eq!(info.versions, (4..=11).collect::<Vec<_>>());
        assert_eq!(info.versions.len(), MAX_VERSIONS_KEPT);
        assert!(s.version(&name("disk"), 3).unwrap().is_none());
        assert!(s.version(&name("disk"), 1).unwrap().is_none());
        assert_eq!(
            s.version(&name("disk"), 5)
                .unwrap()
                .unwrap()
                .material
                .expose(),
            b"given"
        );
        assert!(matches!(
            s.rotate(&name("nope"), None),
            Err(KeyStoreError::NotFound { .. })
        ));
        assert!(matches!(
            s.rotate(&name("disk"), Some(&material(&[]))),
            Err(KeyStoreError::InvalidMaterial { .. })
        ));
    }

    #[test]
    fn rotate_stops_at_the_last_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let key = StoredKey {
            name: name("disk"),
            version: u32::MAX,
            created_unix: 1,
            allowed_vms: BTreeSet::new(),
            allowed_images: BTreeSet::new(),
            material: material(SECRET),
        };
        create_private_dir(&s.dir().join("disk")).unwrap();
        fs::write(key_path(&s, "disk", u32::MAX), s.seal(&key).unwrap()).unwrap();
        s.write_record(
            &s.dir().join("disk"),
            &name("disk"),
            Record {
                current: u32::MAX,
                pending: None,
            },
        )
        .unwrap();
        assert_eq!(s.current(&name("disk")).unwrap().unwrap(), key);
        assert!(matches!(
            s.rotate(&name("disk"), None),
            Err(KeyStoreError::VersionsExhausted { .. })
        ));
    }

    #[test]
    fn version_files_must_be_spelt_canonically() {
        assert_eq!(version_file_name(1), "00000001.key");
        assert_eq!(version_file_name(u32::MAX), "4294967295.key");
        assert_eq!(parse_version_file_name("00000001.key"), Some(1));
        assert_eq!(parse_version_file_name("123456789.key"), Some(123_456_789));
        for bad in [
            "1.key",
            "000000001.key",
            "00000000.key",
            "0000000a.key",
            "+0000001.key",
            "00000001.key.bak",
            "4294967296.key",
            ".tmp-00000001.key",
        ] {
            assert_eq!(parse_version_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn temp_and_removed_leftovers_are_ignored_then_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let key_dir = s.dir().join("disk");
        let old = SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(60);
        let make_file = |path: &Path, stale: bool| {
            fs::write(path, b"{\"half\":").unwrap();
            if stale {
                File::options()
                    .write(true)
                    .open(path)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        };
        make_file(&key_dir.join(".tmp-stale"), true);
        make_file(&key_dir.join(".tmp-fresh"), false);
        // A stale half-built key directory and an interrupted removal.
        fs::create_dir(s.dir().join(".tmp-stale-dir")).unwrap();
        make_file(&s.dir().join(".tmp-stale-dir").join("00000001.key"), false);
        File::open(s.dir().join(".tmp-stale-dir"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        fs::create_dir(s.dir().join(".tmp-fresh-dir")).unwrap();
        fs::create_dir(s.dir().join(".removed-x")).unwrap();
        make_file(&s.dir().join(".removed-x").join("00000001.key"), false);
        // Reads ignore them.
        assert_eq!(s.list().unwrap().len(), 1);
        assert_eq!(s.verify().unwrap().len(), 1);
        assert!(s.current(&name("disk")).unwrap().is_some());
        // Writes delete the stale ones, and only those.
        s.rotate(&name("disk"), None).unwrap();
        assert_eq!(
            file_names(&key_dir),
            [".tmp-fresh", "00000001.key", "00000002.key", RECORD_FILE]
        );
        s.generate(&name("cfg"), 32, &AllowList::default()).unwrap();
        assert_eq!(file_names(s.dir()), [".tmp-fresh-dir", "cfg", "disk"]);
    }

    #[test]
    fn remove_deletes_the_key_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        s.rotate(&name("disk"), None).unwrap();
        s.generate(&name("cfg"), 32, &AllowList::default()).unwrap();
        assert_eq!(s.remove(&name("disk")).unwrap(), 2);
        assert!(s.current(&name("disk")).unwrap().is_none());
        assert_eq!(file_names(s.dir()), ["cfg"]);
        assert!(matches!(
            s.remove(&name("disk")),
            Err(KeyStoreError::NotFound { .. })
        ));
        // The name can be used again, from version 1.
        s.add(&name("disk"), &material(b"new"), &AllowList::default())
            .unwrap();
        assert_eq!(s.current(&name("disk")).unwrap().unwrap().version, 1);
    }

    #[test]
    fn entitlement_needs_the_vm_or_its_image_on_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(
            &name("disk"),
            &material(SECRET),
            &allow(&["vm-1"], &["debian-12"]),
        )
        .unwrap();
        let key = s.current(&name("disk")).unwrap().unwrap();
        let vm = |v: &str| VmId::new(v).unwrap();
        assert!(key.entitles(&vm("vm-1"), None));
        assert!(key.entitles(&vm("vm-1"), Some("other")));
        assert!(key.entitles(&vm("vm-2"), Some("debian-12")));
        assert!(!key.entitles(&vm("vm-2"), None));
        assert!(!key.entitles(&vm("vm-2"), Some("debian-11")));
        assert!(!key.entitles(&vm("vm-2"), Some("")));
    }

    #[test]
    fn debug_output_shows_no_material() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let key = s.current(&name("disk")).unwrap().unwrap();
        let master_bytes = [0xa5u8; MASTER_KEY_LEN];
        let m = MasterKey::new(Zeroizing::new(master_bytes));
        let store_dbg = format!("{:?}", DirKeyStore::open(s.dir(), m).unwrap());
        let m = MasterKey::new(Zeroizing::new(master_bytes));
        assert_eq!(format!("{m:?}"), "MasterKey(..)");
        for text in [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{:?}", s.list().unwrap()),
            store_dbg,
        ] {
            for needle in [
                hex::encode(SECRET),
                hex::encode(master_bytes),
                "key-material".to_owned(),
                "165, 165".to_owned(),   // a5 as a decimal byte list
                "48, 49, 50".to_owned(), // SECRET as a decimal byte list
            ] {
                assert!(!text.contains(&needle), "{needle} in {text}");
            }
        }
        assert!(format!("{key:?}").contains("REDACTED"));
    }

    #[test]
    fn concurrent_writers_never_replace_a_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let key_dir = s.dir().join("disk");
        let before = fs::read(key_path(&s, "disk", 1)).unwrap();
        assert!(matches!(
            s.write_new_file(&key_dir, &version_file_name(1), b"other", &name("disk")),
            Err(KeyStoreError::ConcurrentWrite { .. })
        ));
        assert_eq!(fs::read(key_path(&s, "disk", 1)).unwrap(), before);
        assert_eq!(file_names(&key_dir), ["00000001.key", RECORD_FILE]);
        // Two threads rotating at once: each rotation either succeeds with
        // its own version or reports the race; the store stays readable.
        let s = std::sync::Arc::new(s);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = std::sync::Arc::clone(&s);
                std::thread::spawn(move || {
                    (0..10)
                        .filter(|_| match s.rotate(&name("disk"), None) {
                            Ok(_) => true,
                            Err(KeyStoreError::ConcurrentWrite { .. }) => false,
                            Err(e) => panic!("{e}"),
                        })
                        .count()
                })
            })
            .collect();
        let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let current = s.current(&name("disk")).unwrap().unwrap();
        assert_eq!(current.version as usize, 1 + ok);
        assert!(s.verify().unwrap().iter().all(|c| c.result.is_ok()));
    }

    /// Every point where a write can stop: afterwards the store reads the
    /// old state or the new one, and the next write succeeds.
    #[test]
    fn a_crash_during_rotate_leaves_the_old_or_the_new_version() {
        for step in [
            Step::RecordSynced,
            Step::PendingRecorded,
            Step::TempPartlyWritten,
            Step::TempWritten,
            Step::TempSynced,
            Step::Linked,
            Step::Committed,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = store(dir.path());
            s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
                .unwrap();
            s.crash_at = Some(step);
            let new = material(b"the new version");
            assert!(
                matches!(
                    s.rotate(&name("disk"), Some(&new)),
                    Err(KeyStoreError::InjectedCrash)
                ),
                "{step:?}"
            );
            // "Restart": a fresh store on the same directory.
            let s = store(dir.path());
            let current = s.current(&name("disk")).unwrap().unwrap();
            match step {
                // Only the final record commits the new version.
                Step::Committed => {
                    assert_eq!((current.version, &current.material), (2, &new), "{step:?}");
                }
                _ => assert_eq!(
                    (current.version, current.material.expose()),
                    (1, &SECRET[..]),
                    "{step:?}"
                ),
            }
            assert_eq!(current.allowed_vms.len(), 1);
            assert!(
                s.verify().unwrap().iter().all(|c| c.result.is_ok()),
                "{step:?}"
            );
            assert_eq!(s.list().unwrap().len(), 1);
            // The uncommitted version is never served, not even by number.
            if step == Step::Linked {
                assert!(key_path(&s, "disk", 2).exists());
                assert_eq!(s.version(&name("disk"), 2).unwrap(), None);
                assert_eq!(s.list().unwrap()[0].versions, [1]);
            }
            // A temporary file may stay behind, and does not get in the way.
            let temp_left = file_names(&s.dir().join("disk"))
                .iter()
                .any(|n| n.starts_with(TEMP_PREFIX));
            assert_eq!(
                temp_left,
                !matches!(step, Step::PendingRecorded | Step::Committed),
                "{step:?}"
            );
            let info = s.rotate(&name("disk"), None).unwrap();
            assert_eq!(info.current_version, current.version + 1, "{step:?}");
            let key = s.current(&name("disk")).unwrap().unwrap();
            assert_eq!(key.version, current.version + 1, "{step:?}");
            assert_ne!(key.material, new, "{step:?}");
            assert!(s.verify().unwrap().iter().all(|c| c.result.is_ok()));
        }
    }

    #[test]
    fn a_crash_during_add_leaves_no_key_or_the_whole_key() {
        for step in [
            Step::TempPartlyWritten,
            Step::TempWritten,
            Step::TempSynced,
            Step::Linked,
            Step::RecordSynced,
            Step::StagingReady,
            Step::Published,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = store(dir.path());
            s.crash_at = Some(step);
            assert!(
                matches!(
                    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[])),
                    Err(KeyStoreError::InjectedCrash)
                ),
                "{step:?}"
            );
            let s = store(dir.path());
            let current = s.current(&name("disk")).unwrap();
            if step == Step::Published {
                let key = current.unwrap();
                assert_eq!((key.version, key.material.expose()), (1, &SECRET[..]));
                assert_eq!(s.list().unwrap().len(), 1);
            } else {
                assert!(current.is_none(), "{step:?}");
                assert!(s.list().unwrap().is_empty(), "{step:?}");
                assert!(!s.dir().join("disk").exists(), "{step:?}");
                // The name is free: the key can be added now.
                s.add(&name("disk"), &material(SECRET), &AllowList::default())
                    .unwrap();
            }
            assert!(s.verify().unwrap().iter().all(|c| c.result.is_ok()));
        }
    }

    // ------------------------------------------- records and permissions

    /// The record on disk, as JSON.
    fn record_json(s: &DirKeyStore, key: &str) -> serde_json::Value {
        serde_json::from_slice(&fs::read(s.dir().join(key).join(RECORD_FILE)).unwrap()).unwrap()
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn rotate_moves_the_sealed_record_with_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let r = record_json(&s, "disk");
        assert_eq!(
            (r["name"].as_str(), r["current"].as_u64()),
            (Some("disk"), Some(1))
        );
        assert!(r["pending"].is_null(), "{r}");
        for v in 2..=12u32 {
            s.rotate(&name("disk"), None).unwrap();
            let r = record_json(&s, "disk");
            assert_eq!(r["current"].as_u64(), Some(u64::from(v)), "{r}");
            assert!(r["pending"].is_null(), "{r}");
            assert_eq!(s.current_version(&name("disk")).unwrap(), Some(v));
        }
        // The MAC is bound to the master key: the same record does not
        // verify under another.
        let other = DirKeyStore::open(s.dir(), master(2)).unwrap();
        assert!(matches!(
            other.current_version(&name("disk")),
            Err(KeyStoreError::RecordInvalid { .. })
        ));
        // The record key is not the AES key, and depends on the master key.
        let msg = record_message(
            &name("disk"),
            Record {
                current: 1,
                pending: None,
            },
        );
        let tag = |k: &MasterKey| hmac::sign(&k.record_key().unwrap(), &msg).as_ref().to_vec();
        let plain = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]), &msg);
        assert_ne!(tag(&master(1)), plain.as_ref());
        assert_ne!(tag(&master(1)), tag(&master(2)));
        assert_eq!(tag(&master(1)), tag(&master(1)));
    }

    #[test]
    fn deleting_the_newest_version_refuses_the_key_instead_of_rolling_back() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(store(dir.path()));
        let disk = name("disk");
        inner
            .add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        inner.rotate(&disk, None).unwrap();
        inner.rotate(&disk, None).unwrap();
        inner
            .add(&name("cfg"), &material(b"cfg"), &allow(&["vm-1"], &[]))
            .unwrap();
        let keys = CachedKeys::new(inner.clone());
        // Served and cached at version 3.
        assert_eq!(keys.current(&disk).unwrap().unwrap().version, 3);
        fs::remove_file(key_path(&inner, "disk", 3)).unwrap();
        for (what, r) in [
            ("store", inner.current(&disk).map(|_| ())),
            ("cache", keys.current(&disk).map(|_| ())),
            ("version 2", inner.version(&disk, 2).map(|_| ())),
            ("current version", inner.current_version(&disk).map(|_| ())),
        ] {
            let err = r.unwrap_err();
            assert!(
                matches!(
                    err,
                    KeyStoreError::RecordedVersionMissing { version: 3, .. }
                ),
                "{what}: {err:?}"
            );
        }
        let err = inner.current(&disk).unwrap_err().to_string();
        assert!(
            err.contains("00000003.key") && err.contains("refused"),
            "{err}"
        );
        // The operator's listing fails; the agent's leaves the key out and
        // serves the other one.
        assert!(inner.list().is_err());
        let served: Vec<_> = keys.list().unwrap().into_iter().map(|k| k.name).collect();
        assert_eq!(served, [name("cfg")]);
        assert!(keys.current(&name("cfg")).unwrap().is_some());
        keys.refresh(&BTreeMap::from([(name("cfg"), 1)]));
        assert!(keys.current(&disk).is_err());
        // `verify` names the missing version; rotating is refused.
        let checks = inner.verify().unwrap();
        let failed: Vec<_> = checks
            .iter()
            .filter(|c| c.result.is_err())
            .map(|c| (c.name.as_str(), c.version))
            .collect();
        assert_eq!(failed, [("disk", 3)]);
        assert!(matches!(
            inner.rotate(&disk, None),
            Err(KeyStoreError::RecordedVersionMissing { .. })
        ));
        // `seal` does not roll back unless told to.
        assert!(matches!(
            inner.seal_current(&disk, false),
            Err(KeyStoreError::RecordedVersionMissing { .. })
        ));
        assert!(inner.current(&disk).is_err());
        let sealed = inner.seal_current(&disk, true).unwrap();
        assert_eq!(
            (sealed.version, sealed.change),
            (2, SealChange::Back { from: 3 })
        );
        assert_eq!(keys.current(&disk).unwrap().unwrap().version, 2);
        // Deleting every version leaves the record: still refused.
        inner.rotate(&disk, None).unwrap();
        for v in 1..=3 {
            let _ = fs::remove_file(key_path(&inner, "disk", v));
        }
        assert!(matches!(
            inner.current(&disk),
            Err(KeyStoreError::RecordedVersionMissing { version: 3, .. })
        ));
        assert!(inner.names().unwrap().contains(&disk));
    }

    #[test]
    fn a_tampered_missing_or_replayed_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let disk = name("disk");
        s.add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        s.add(&name("cfg"), &material(b"cfg"), &AllowList::default())
            .unwrap();
        let record_path = s.dir().join("disk").join(RECORD_FILE);
        let at_v1 = fs::read(&record_path).unwrap();
        s.rotate(&disk, None).unwrap();
        let pristine = fs::read(&record_path).unwrap();
        let invalid = |what: &str| {
            let err = s.current(&disk).unwrap_err();
            assert!(
                matches!(err, KeyStoreError::RecordInvalid { .. }),
                "{what}: {err:?}"
            );
            assert!(err.to_string().contains("current.json"), "{what}: {err}");
        };
        type Edit = (&'static str, fn(&mut serde_json::Value));
        let edits: [Edit; 7] = [
            ("current lowered", |v| v["current"] = 1.into()),
            ("current raised", |v| v["current"] = 3.into()),
            ("pending added", |v| v["pending"] = 3.into()),
            ("mac bit", |v| {
                let mut m = hex::decode(v["mac"].as_str().unwrap()).unwrap();
                m[0] ^= 1;
                v["mac"] = hex::encode(m).into();
            }),
            ("mac not hex", |v| v["mac"] = "zz".into()),
            ("unknown field", |v| v["extra"] = 1.into()),
            ("format", |v| v["format"] = 2.into()),
        ];
        for (what, f) in edits {
            fs::write(&record_path, &pristine).unwrap();
            edit(&record_path, f);
            invalid(what);
        }
        for junk in [&b""[..], b"{", b"\x00\xff", &[b' '; 2048]] {
            fs::write(&record_path, junk).unwrap();
            invalid("junk");
        }
        // Another key's genuine record.
        fs::copy(s.dir().join("cfg").join(RECORD_FILE), &record_path).unwrap();
        invalid("copied from another key");
        // A genuine earlier record put back while the newer version is
        // there: the newer version is unrecorded.
        fs::write(&record_path, &at_v1).unwrap();
        let err = s.current(&disk).unwrap_err();
        assert!(
            matches!(
                err,
                KeyStoreError::Unrecorded {
                    version: 2,
                    current: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(s.version(&disk, 1).is_err());
        // Deleted: refused (never re-created on the fly, never the highest
        // file taken on trust).
        fs::remove_file(&record_path).unwrap();
        let err = s.current(&disk).unwrap_err();
        assert!(matches!(err, KeyStoreError::Unsealed { .. }), "{err:?}");
        assert!(err.to_string().contains("keys seal disk"), "{err}");
        assert!(!record_path.exists());
        // The other key is untouched throughout.
        assert!(s.current(&name("cfg")).unwrap().is_some());
        // Restored, it reads again.
        fs::write(&record_path, &pristine).unwrap();
        assert_eq!(s.current(&disk).unwrap().unwrap().version, 2);
        // An invalid record is replaced by `seal` only when told to.
        fs::write(&record_path, b"{}").unwrap();
        assert!(matches!(
            s.seal_current(&disk, false),
            Err(KeyStoreError::RecordInvalid { .. })
        ));
        assert_eq!(
            s.seal_current(&disk, true).unwrap().change,
            SealChange::ReplacedInvalid
        );
        assert_eq!(s.current(&disk).unwrap().unwrap().version, 2);
    }

    #[test]
    fn an_old_file_of_a_removed_key_put_back_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let disk = name("disk");
        s.add(&disk, &material(b"old"), &allow(&["vm-1"], &[]))
            .unwrap();
        s.rotate(&disk, None).unwrap();
        let old_v2 = fs::read(key_path(&s, "disk", 2)).unwrap();
        s.remove(&disk).unwrap();
        s.add(&disk, &material(b"new"), &allow(&["vm-1"], &[]))
            .unwrap();
        // Authentic (same name, version and master key), but not this key's.
        fs::write(key_path(&s, "disk", 2), &old_v2).unwrap();
        assert!(matches!(
            s.current(&disk),
            Err(KeyStoreError::Unrecorded { version: 2, .. })
        ));
        fs::remove_file(key_path(&s, "disk", 2)).unwrap();
        assert_eq!(s.current(&disk).unwrap().unwrap().material.expose(), b"new");
    }

    #[test]
    fn a_store_without_records_is_refused_until_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(store(dir.path()));
        let disk = name("disk");
        inner
            .add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        inner.rotate(&disk, None).unwrap();
        inner
            .generate(&name("cfg"), 16, &AllowList::default())
            .unwrap();
        // As the previous vkx left it: no records.
        for key in ["disk", "cfg"] {
            fs::remove_file(inner.dir().join(key).join(RECORD_FILE)).unwrap();
        }
        for key in [&disk, &name("cfg")] {
            assert!(matches!(
                inner.current(key),
                Err(KeyStoreError::Unsealed { .. })
            ));
        }
        // A single version is no exception: it may be what is left after
        // deleting the newer ones.
        assert!(matches!(
            inner.rotate(&name("cfg"), None),
            Err(KeyStoreError::Unsealed { .. })
        ));
        assert!(matches!(inner.list(), Err(KeyStoreError::Unsealed { .. })));
        let keys = CachedKeys::new(inner.clone());
        assert!(keys.list().unwrap().is_empty());
        let checks = inner.verify().unwrap();
        assert_eq!(checks.iter().filter(|c| c.result.is_err()).count(), 2);
        assert_eq!(inner.names().unwrap(), [name("cfg"), disk.clone()]);
        // The explicit migration.
        let sealed = inner.seal_current(&disk, false).unwrap();
        assert_eq!((sealed.version, sealed.change), (2, SealChange::First));
        assert!(sealed.created_unix > 1_700_000_000);
        assert_eq!(inner.seal_current(&name("cfg"), false).unwrap().version, 1);
        assert_eq!(keys.list().unwrap().len(), 2);
        assert_eq!(keys.current(&disk).unwrap().unwrap().version, 2);
        assert_eq!(
            inner.seal_current(&disk, false).unwrap().change,
            SealChange::Unchanged
        );
        assert!(matches!(
            inner.seal_current(&name("nope"), false),
            Err(KeyStoreError::NotFound { .. })
        ));
        // `seal` adopts a newer authentic version (a record older than its
        // files, e.g. restored from a backup taken mid-rotation).
        let at_v2 = fs::read(inner.dir().join("disk").join(RECORD_FILE)).unwrap();
        inner.rotate(&disk, None).unwrap();
        fs::write(inner.dir().join("disk").join(RECORD_FILE), at_v2).unwrap();
        assert!(inner.current(&disk).is_err());
        assert_eq!(
            inner.seal_current(&disk, false).unwrap().change,
            SealChange::Forward { from: 2 }
        );
        assert_eq!(inner.current(&disk).unwrap().unwrap().version, 3);
    }

    #[test]
    fn store_and_key_directories_open_to_group_or_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        s.add(&name("cfg"), &material(b"cfg"), &allow(&["vm-1"], &[]))
            .unwrap();
        let top = s.dir().to_path_buf();
        for mode in [
            0o750, 0o705, 0o710, 0o701, 0o740, 0o704, 0o720, 0o702, 0o777,
        ] {
            set_mode(&top, mode);
            let err = DirKeyStore::open(&top, master(1)).unwrap_err();
            assert!(
                matches!(err, KeyStoreError::DirectoryExposed { mode: m, ref path } if m == mode && *path == top),
                "{mode:o}: {err:?}"
            );
            assert!(err.to_string().contains("chmod 700"), "{err}");
        }
        set_mode(&top, 0o700);
        let s = DirKeyStore::open(&top, master(1)).unwrap();
        // A key's directory: that key is refused, the other still served.
        let key_dir = top.join("disk");
        for mode in [0o750, 0o705, 0o711, 0o770] {
            set_mode(&key_dir, mode);
            let err = s.current(&name("disk")).unwrap_err();
            assert!(
                matches!(err, KeyStoreError::DirectoryExposed { mode: m, .. } if m == mode),
                "{mode:o}: {err:?}"
            );
            assert!(s.current(&name("cfg")).unwrap().is_some());
            assert!(s.rotate(&name("disk"), None).is_err());
        }
        set_mode(&key_dir, 0o700);
        assert!(s.current(&name("disk")).unwrap().is_some());
        // A store created by the store itself passes, whatever the umask
        // let through (DirBuilder's 0700 only loses bits to it).
        let fresh = DirKeyStore::open(&dir.path().join("a/b/keys"), master(1)).unwrap();
        fresh
            .generate(&name("k"), 32, &AllowList::default())
            .unwrap();
        for p in [
            dir.path().join("a"),
            dir.path().join("a/b"),
            fresh.dir().to_path_buf(),
            fresh.dir().join("k"),
        ] {
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o700,
                "{}",
                p.display()
            );
        }
    }

    #[test]
    fn store_and_key_directories_of_another_uid_are_refused() {
        if !crate::node::tests::running_as_root(
            "store_and_key_directories_of_another_uid_are_refused",
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let top = s.dir().to_path_buf();
        std::os::unix::fs::chown(&top, Some(65534), None).unwrap();
        let err = DirKeyStore::open(&top, master(1)).unwrap_err();
        assert!(
            matches!(
                err,
                KeyStoreError::NotOwned { owner: 65534, expected: 0, ref path } if *path == top
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("chown -R 0 ") && text.contains("uid 65534"),
            "{text}"
        );
        std::os::unix::fs::chown(&top, Some(0), None).unwrap();
        let s = DirKeyStore::open(&top, master(1)).unwrap();
        std::os::unix::fs::chown(top.join("disk"), Some(65534), None).unwrap();
        assert!(matches!(
            s.current(&name("disk")),
            Err(KeyStoreError::NotOwned { owner: 65534, .. })
        ));
        std::os::unix::fs::chown(top.join("disk"), Some(0), None).unwrap();
        assert!(s.current(&name("disk")).unwrap().is_some());
    }

    #[test]
    fn a_symlinked_key_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::rename(s.dir().join("disk"), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, s.dir().join("disk")).unwrap();
        let err = s.current(&name("disk")).unwrap_err();
        assert!(matches!(err, KeyStoreError::Symlink { .. }), "{err:?}");
        assert!(matches!(
            s.rotate(&name("disk"), None),
            Err(KeyStoreError::Symlink { .. })
        ));
    }
}
