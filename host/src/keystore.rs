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
//!     00000004.key      <- current: the highest version
//!   vm-17-config/
//!     00000001.key
//! ```
//!
//! Versions are `u32` starting at 1, written as at least eight decimal
//! digits; a name that is not the canonical spelling of a version (`1.key`,
//! `000000001.key`) is not a version and is ignored. A rotation adds a
//! file and never rewrites an earlier one; after a successful rotation the
//! oldest versions are deleted so that at most [`MAX_VERSIONS_KEPT`]
//! remain (a guest may still hold data under a recent earlier version).
//!
//! The current version is the highest version file present. If that file
//! cannot be read or authenticated, reads of the current version fail
//! with [`KeyStoreError::Corrupt`]: the store never falls back to an older
//! version on its own, because the older version may be the one the
//! operator rotated away from (for instance after a leak). Restore the
//! file from backup, or `keys remove` the key. For the same reason `list`
//! fails, naming the file, if a key's current version cannot be
//! authenticated; [`DirKeyStore::verify`] (`keys verify`) reports every
//! version of every key one by one.
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
//! version (the loser gets [`KeyStoreError::ConcurrentWrite`]). A new key
//! is built in a `.tmp-<random>` directory of the store and renamed into
//! place, so a key appears with its first version or not at all. A crash at
//! any point leaves the old state or the new one, never a half-written key;
//! at worst a `.tmp-*` file or directory stays behind. Reads ignore those;
//! write operations delete the ones older than [`STALE_TEMP_AGE`] (younger
//! ones may belong to a writer still at work).
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
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use vkx_common::wire::{KeyMaterial, KeyName, MAX_KEY_MATERIAL, VmId};
use zeroize::Zeroizing;

use crate::registry::{create_private_dir, create_private_file};

/// The version of the key file format this code reads and writes.
pub const FORMAT: u32 = 1;
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
pub use vkx_common::policy::MAX_IMAGE_NAME;
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
    /// A fault injected by the crash-safety tests: the "process" stops
    /// where it is, without cleaning up.
    #[cfg(test)]
    #[error("injected crash")]
    InjectedCrash,
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
                vkx_common::policy::check_image_name(i).map_err(|e| {
                    invalid(format!(
                        "{:?}: {e}",
                        i.chars().take(MAX_IMAGE_NAME + 8).collect::<String>()
                    ))
                })?;
                Ok(i.to_owned())
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
    /// The current (highest) version of `name`, or `None` if there is no
    /// such key.
    fn current(&self, name: &KeyName) -> Result<Option<StoredKey>, KeyStoreError>;
    /// Version `version` of `name`, or `None` if it does not exist (never
    /// written, or pruned).
    fn version(&self, name: &KeyName, version: u32) -> Result<Option<StoredKey>, KeyStoreError>;
    /// Every key, sorted by name, without material.
    fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError>;
}

// ------------------------------------------------------------- the cache

/// The store with each key's current version decrypted once per version:
/// `serve`'s sessions read keys on the runtime thread, and a rotation
/// wakes every session that holds the key, so without it a thousand
/// sessions would each read and decrypt the same new version. Which
/// version is current is looked up every time (a directory listing, no
/// key file read), so a rotation or removal on disk is served at once;
/// only the decrypted version is cached. The key-version watcher calls
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

    fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        self.inner.list()
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
}

/// A key store in a directory, sealed with the node's master key.
#[derive(Debug)]
pub struct DirKeyStore {
    dir: PathBuf,
    master: MasterKey,
    rng: SystemRandom,
    #[cfg(test)]
    crash_at: Option<Step>,
}

impl DirKeyStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) if it
    /// does not exist.
    pub fn open(dir: &Path, master: MasterKey) -> Result<Self, KeyStoreError> {
        let err = |source| KeyStoreError::Directory {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            create_private_dir(dir).map_err(err)?;
        }
        if !fs::metadata(dir).map_err(err)?.is_dir() {
            return Err(err(io::Error::other("not a directory")));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            master,
            rng: SystemRandom::new(),
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
        if !self.versions(&key_dir)?.is_empty() {
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
        create_new_private_dir(&staging).map_err(|source| KeyStoreError::Io {
            path: staging.clone(),
            source,
        })?;
        let published = self
            .write_new_file(&staging, &version_file_name(1), &bytes, name)
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
    /// Then deletes the oldest versions beyond [`MAX_VERSIONS_KEPT`].
    pub fn rotate(
        &self,
        name: &KeyName,
        material: Option<&KeyMaterial>,
    ) -> Result<KeyInfo, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        let current = self
            .current(name)?
            .ok_or_else(|| KeyStoreError::NotFound { name: name.clone() })?;
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
        self.write_new_file(&key_dir, &version_file_name(version), &bytes, name)?;
        let versions = self.prune(&key_dir)?;
        Ok(KeyInfo::new(&key, versions))
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
    pub fn verify(&self) -> Result<Vec<VersionCheck>, KeyStoreError> {
        let mut out = Vec::new();
        for name in self.key_dirs()? {
            let key_dir = self.key_dir(&name)?;
            for version in self.versions(&key_dir)? {
                let result = self.read_version(&name, &key_dir, version).map(|_| ());
                out.push(VersionCheck {
                    name: name.clone(),
                    version,
                    result,
                });
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------ internals

    /// The current version of `name` (a directory listing, no read of a
    /// key file), or `None`.
    pub fn current_version(&self, name: &KeyName) -> Result<Option<u32>, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        Ok(self.versions(&key_dir)?.last().copied())
    }

    fn key_dir(&self, name: &KeyName) -> Result<PathBuf, KeyStoreError> {
        check_dotless(name)?;
        Ok(self.dir.join(name.as_str()))
    }

    /// The names of the key directories that hold at least one version
    /// file, sorted. Entries starting with `.`, non-directories (also
    /// symlinks) and names that are not key names are not keys.
    fn key_dirs(&self) -> Result<Vec<KeyName>, KeyStoreError> {
        let dir_err = |source| KeyStoreError::Directory {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for (seen, item) in fs::read_dir(&self.dir).map_err(dir_err)?.enumerate() {
            if seen >= MAX_STORE_SCAN {
                return Err(KeyStoreError::Full {
                    path: self.dir.clone(),
                });
            }
            let item = item.map_err(dir_err)?;
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
            if self.versions(&item.path())?.is_empty() {
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
        let raw = read_capped(&path)?;
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
        // serde_json's messages may quote the input; report only where.
        let file: KeyFile = serde_json::from_slice(raw).map_err(|e| {
            corrupt(format!(
                "not a key file ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if file.format != FORMAT {
            return Err(corrupt(format!(
                "format {} (this vkx reads format {FORMAT})",
                file.format
            )));
        }
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
    /// durably, never replacing an existing file: temporary file (O_EXCL,
    /// 0600), write, fsync, hard link to the final name, unlink the
    /// temporary name, fsync the directory.
    fn write_new_file(
        &self,
        dir: &Path,
        file_name: &str,
        bytes: &[u8],
        name: &KeyName,
    ) -> Result<(), KeyStoreError> {
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
            self.crash_point(Step::TempPartlyWritten)?;
            file.write_all(second).map_err(io_err(&temp))?;
            self.crash_point(Step::TempWritten)?;
            file.sync_all().map_err(io_err(&temp))?;
            self.crash_point(Step::TempSynced)?;
            // Unlike rename, a link fails if the target exists.
            match fs::hard_link(&temp, &target) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(KeyStoreError::ConcurrentWrite { name: name.clone() })
                }
                Err(source) => Err(KeyStoreError::Io {
                    path: target.clone(),
                    source,
                }),
            }
        })();
        drop(file);
        if let Err(e) = written {
            if !is_injected_crash(&e) {
                let _ = fs::remove_file(&temp);
            }
            return Err(e);
        }
        self.crash_point(Step::Linked)?;
        fs::remove_file(&temp).map_err(io_err(&temp))?;
        sync_dir(dir)
    }

    /// Deletes the oldest versions beyond [`MAX_VERSIONS_KEPT`]; returns
    /// the versions left.
    fn prune(&self, key_dir: &Path) -> Result<Vec<u32>, KeyStoreError> {
        let mut versions = self.versions(key_dir)?;
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
        let key_dir = self.key_dir(name)?;
        match self.versions(&key_dir)?.last() {
            None => Ok(None),
            Some(&version) => self.read_version(name, &key_dir, version).map(Some),
        }
    }

    fn version(&self, name: &KeyName, version: u32) -> Result<Option<StoredKey>, KeyStoreError> {
        let key_dir = self.key_dir(name)?;
        if version == 0 {
            return Ok(None);
        }
        match self.read_version(name, &key_dir, version) {
            Err(KeyStoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        let mut out = Vec::new();
        for name in self.key_dirs()? {
            let key_dir = self.key_dir(&name)?;
            let versions = self.versions(&key_dir)?;
            // Removed meanwhile: not a key any more.
            let Some(&version) = versions.last() else {
                continue;
            };
            let current = match self.read_version(&name, &key_dir, version) {
                Err(KeyStoreError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    continue;
                }
                other => other?,
            };
            out.push(KeyInfo::new(&current, versions));
        }
        Ok(out)
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

fn read_capped(path: &Path) -> Result<Vec<u8>, KeyStoreError> {
    let io_err = |source| KeyStoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    if !file.metadata().map_err(io_err)?.is_file() {
        return Err(KeyStoreError::Corrupt {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mut raw = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    if raw.len() as u64 > MAX_KEY_FILE {
        return Err(KeyStoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_KEY_FILE} bytes"),
        });
    }
    Ok(raw)
}

fn sync_dir(dir: &Path) -> Result<(), KeyStoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| KeyStoreError::Directory {
            path: dir.to_path_buf(),
            source,
        })
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

/// Creates the directory `path` (not its parents) for its owner only
/// (0700); fails if it exists.
fn create_new_private_dir(path: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path)
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
        assert_eq!(file_names(s.dir()), ["cfg", "disk"]);
        assert_eq!(file_names(&s.dir().join("disk")), ["00000001.key"]);
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
        let err = other.current(&name("disk")).unwrap_err();
        assert!(matches!(err, KeyStoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("another master key"), "{err}");
        assert_corrupt(other.list(), "list");
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
        // The version, consistently with the file name: authentication
        // still fails.
        fs::write(&path, &pristine).unwrap();
        edit(&path, |v| v["version"] = 5.into());
        fs::rename(&path, key_path(&s, "disk", 5)).unwrap();
        assert_corrupt(s.current(&name("disk")), "version");
        fs::remove_file(key_path(&s, "disk", 5)).unwrap();
        // The name, consistently with the directory.
        fs::create_dir(s.dir().join("other")).unwrap();
        fs::write(key_path(&s, "other", 1), &pristine).unwrap();
        edit(&key_path(&s, "other", 1), |v| v["name"] = "other".into());
        assert_corrupt(s.current(&name("other")), "name");
        // A file copied unchanged to another key's or version's place.
        fs::write(key_path(&s, "other", 1), &pristine).unwrap();
        assert_corrupt(s.current(&name("other")), "copied to another key");
        fs::write(key_path(&s, "disk", 2), &pristine).unwrap();
        assert_corrupt(s.current(&name("disk")), "copied to another version");
        fs::remove_file(key_path(&s, "disk", 2)).unwrap();
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
        fs::create_dir(s.dir().join("disk")).unwrap();
        fs::write(key_path(&s, "disk", u32::MAX), s.seal(&key).unwrap()).unwrap();
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
            [".tmp-fresh", "00000001.key", "00000002.key"]
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
        assert_eq!(file_names(&key_dir), ["00000001.key"]);
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
            Step::TempPartlyWritten,
            Step::TempWritten,
            Step::TempSynced,
            Step::Linked,
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
                Step::Linked => {
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
            // A temporary file stays behind, and does not get in the way.
            assert!(
                file_names(&s.dir().join("disk"))
                    .iter()
                    .any(|n| n.starts_with(TEMP_PREFIX)),
                "{step:?}"
            );
            let info = s.rotate(&name("disk"), None).unwrap();
            assert_eq!(info.current_version, current.version + 1, "{step:?}");
        }
    }

    #[test]
    fn a_crash_during_add_leaves_no_key_or_the_whole_key() {
        for step in [
            Step::TempPartlyWritten,
            Step::TempWritten,
            Step::TempSynced,
            Step::Linked,
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
}
