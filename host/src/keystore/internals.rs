//! The directory store's internals: key state and records, the sealed
//! version files (AES-256-GCM under the master key), crash-safe writes
//! (temp, fsync, rename, fsync dir; a lock per key directory), pruning
//! and the clean-up of stale temporaries.

use super::*;

impl DirKeyStore {
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
    pub(super) fn state(&self, name: &KeyName) -> Result<Option<KeyState>, KeyStoreError> {
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
    pub(super) fn read_current(
        &self,
        name: &KeyName,
        state: &KeyState,
    ) -> Result<StoredKey, KeyStoreError> {
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
    pub(super) fn key_info(&self, name: &KeyName) -> Result<Option<KeyInfo>, KeyStoreError> {
        let Some(state) = self.state(name)? else {
            return Ok(None);
        };
        let current = self.read_current(name, &state)?;
        Ok(Some(KeyInfo::new(&current, state.versions)))
    }

    /// Checks a key's directory: `false` if it does not exist; refused if
    /// it is a symbolic link, not a directory, not owned by this process's
    /// effective uid, or open to group or others.
    pub(super) fn check_key_dir(&self, key_dir: &Path) -> Result<bool, KeyStoreError> {
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
    pub(super) fn lock_key_dir(
        &self,
        key_dir: &Path,
        name: &KeyName,
    ) -> Result<File, KeyStoreError> {
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
    pub(super) fn read_record(
        &self,
        key_dir: &Path,
        name: &KeyName,
    ) -> Result<Option<Record>, KeyStoreError> {
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
    pub(super) fn write_record(
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

    pub(super) fn key_dir(&self, name: &KeyName) -> Result<PathBuf, KeyStoreError> {
        check_dotless(name)?;
        Ok(self.dir.join(name.as_str()))
    }

    /// The names of the key directories that hold at least one version
    /// file or a record, sorted. Entries starting with `.`, non-directories (also
    /// symlinks) and names that are not key names are not keys.
    pub(super) fn key_dirs(&self) -> Result<Vec<KeyName>, KeyStoreError> {
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
    pub(super) fn versions(&self, key_dir: &Path) -> Result<Vec<u32>, KeyStoreError> {
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

    pub(super) fn read_version(
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
    pub(super) fn open_sealed(
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
    pub(super) fn seal(&self, key: &StoredKey) -> Result<Vec<u8>, KeyStoreError> {
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
    pub(super) fn write_new_file(
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
    pub(super) fn write_file(
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
    pub(super) fn prune(&self, key_dir: &Path, current: u32) -> Result<Vec<u32>, KeyStoreError> {
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
    pub(super) fn clean_store(&self) {
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
    pub(super) fn clean_temps(&self, key_dir: &Path) {
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

    pub(super) fn random_material(&self, len: usize) -> Result<KeyMaterial, KeyStoreError> {
        check_material_len(len).map_err(|reason| KeyStoreError::InvalidMaterial { reason })?;
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        self.rng
            .fill(&mut bytes)
            .map_err(|_| KeyStoreError::Crypto("random number generator failed"))?;
        // Moves the buffer, no copy of the bytes.
        Ok(KeyMaterial::new(std::mem::take(&mut *bytes)))
    }

    pub(super) fn random_hex(&self) -> Result<String, KeyStoreError> {
        let mut r = [0u8; 8];
        self.rng
            .fill(&mut r)
            .map_err(|_| KeyStoreError::Crypto("random number generator failed"))?;
        Ok(hex::encode(r))
    }

    pub(super) fn temp_name(&self) -> Result<String, KeyStoreError> {
        Ok(format!("{TEMP_PREFIX}{}", self.random_hex()?))
    }

    #[cfg(test)]
    pub(super) fn crash_point(&self, step: Step) -> Result<(), KeyStoreError> {
        if self.crash_at == Some(step) {
            return Err(KeyStoreError::InjectedCrash);
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(super) fn crash_point(&self, _step: Step) -> Result<(), KeyStoreError> {
        Ok(())
    }
}
