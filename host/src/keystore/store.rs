//! The directory store ([`DirKeyStore`]): one directory per key, one
//! sealed file per version and a MACed record naming the current one;
//! its public operations (open, add, generate, rotate, seal, survey,
//! remove, verify) and the [`KeyStore`] trait it serves `serve` through.
//! Its internals (reading, sealing, crash-safe writes, pruning) are in
//! `internals.rs`.

use super::*;

// ------------------------------------------------------------- the store

/// The on-disk document of one version.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyFile {
    pub(super) format: u32,
    pub(super) name: String,
    pub(super) version: u32,
    pub(super) created_unix: u64,
    pub(super) allowed_vms: Vec<String>,
    pub(super) allowed_images: Vec<String>,
    pub(super) nonce: String,
    pub(super) ciphertext: String,
}

/// The on-disk document of a key's current-version record.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecordFile {
    pub(super) format: u32,
    pub(super) name: String,
    pub(super) current: u32,
    pub(super) pending: Option<u32>,
    /// HMAC-SHA-256 of [`record_message`], hex.
    pub(super) mac: String,
}

/// What a key's record says: the current version, and the version a
/// rotation is writing (always greater), if one is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) current: u32,
    pub(super) pending: Option<u32>,
}

/// A key as its record and directory listing show it, checked: the
/// record is authentic, its current version's file is there, and no
/// unrecorded newer version is.
#[derive(Debug)]
pub(super) struct KeyState {
    pub(super) current: u32,
    pub(super) pending: Option<u32>,
    /// The committed versions present, ascending; the last is `current`.
    pub(super) versions: Vec<u32>,
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
pub(super) enum Publish {
    /// A hard link: fails if the name exists (version files).
    New,
    /// A rename over the old file (records).
    Replace,
}

/// The points of a write where the crash-safety tests stop the "process".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
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
    pub(super) dir: PathBuf,
    pub(super) master: MasterKey,
    pub(super) rng: SystemRandom,
    /// This process's effective uid: the owner every directory of the
    /// store must have.
    pub(super) euid: u32,
    #[cfg(test)]
    pub(super) crash_at: Option<Step>,
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
        let euid = crate::fsutil::effective_uid().map_err(|source| KeyStoreError::UnknownUid {
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
