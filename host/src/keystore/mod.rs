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
//! `node::load_master_key`), with a fresh random 96-bit nonce per
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

mod internals;
mod store;

pub use store::*;

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
mod tests;
