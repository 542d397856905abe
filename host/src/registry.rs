//! The host's VM registry: which AK belongs to which VM.
//!
//! A directory with one JSON file per VM, `<vm-id>.json`, written at
//! provisioning (`vkx-host vtpm provision`) and read when a guest presents
//! evidence. An entry is the host's own record of a vTPM it created, so it
//! is trusted; the directory itself is not: every file is size-checked
//! before it is read, parsed with unknown fields refused, and checked to
//! name the VM its file name says.
//!
//! Writes are atomic: a temporary file in the same directory is written,
//! fsynced and then linked (new entry: fails if another writer got there
//! first) or renamed (update) into place, and the directory is fsynced.
//! A crash leaves either the old entry or the new one, never half of one.
//!
//! The TPM clock state of each VM's last accepted quote (§15.8), written
//! on every attestation, lives beside the entry in `<vm-id>.clock`
//! ([`ClockFile`]): two fixed-size, checksummed slots overwritten in turn
//! in place and made durable with one `fdatasync`, so recording a quote
//! creates, renames and links nothing and takes no directory lock (the
//! whole-entry rewrite it replaces was over half of the host's CPU per
//! attestation in a storm, README "Where the host's CPU goes"). A torn
//! slot fails its checksum and the other slot, the previous record, is
//! read. Entries written by older versions keep their `last_quote`, which
//! is the baseline until the VM's first clock record.
//!
//! Bounds: at most [`MAX_REGISTRY_ENTRIES`] entries are scanned, and no
//! entry file larger than [`MAX_ENTRY_FILE`] is read; a clock file is
//! exactly [`CLOCK_FILE_LEN`] bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vkx_common::wire::VmId;

use crate::fsutil::{
    FsError, create_private_dirs, entries_bounded, read_capped, sync_dir, write_temp,
};

/// Entries a registry may hold: a node serves about 1,000 VMs; 64 Ki
/// leaves room for churn and bounds a full scan.
pub const MAX_REGISTRY_ENTRIES: usize = 65_536;

/// Largest entry file read: an RSA-2048 entry is about 1.5 KiB of JSON
/// (two hex TPM2B_PUBLICs); 16 KiB refuses junk without reading it.
pub const MAX_ENTRY_FILE: u64 = 16 * 1024;

/// Directory entries looked at in one scan, JSON or not: bounds the work a
/// directory full of stray files can cause.
const MAX_DIR_SCAN: usize = 2 * MAX_REGISTRY_ENTRIES;

const ENTRY_SUFFIX: &str = ".json";
const CLOCK_SUFFIX: &str = ".clock";
const TEMP_PREFIX: &str = ".tmp-";

/// One clock record: magic, format, kind, sequence number, the
/// observation, a checksum; 64 bytes keeps a slot inside one disk sector,
/// so a crash tears at most the slot being written.
const CLOCK_SLOT_LEN: usize = 64;
/// A clock file: two slots, written in turn.
pub const CLOCK_FILE_LEN: usize = 2 * CLOCK_SLOT_LEN;
const CLOCK_MAGIC: &[u8; 4] = b"vkxc";
const CLOCK_FORMAT: u8 = 1;
/// Bytes of a slot the checksum covers; the checksum (the first 8 bytes
/// of their SHA-256) fills the rest.
const CLOCK_SUMMED: usize = CLOCK_SLOT_LEN - 8;
const KIND_CLEARED: u8 = 0;
const KIND_OBSERVED: u8 = 1;

/// The endorsement key algorithm of a provisioned vTPM; it also fixes the
/// AK's algorithm (ECC P-256 with an ECC EK, RSA-2048 with an RSA EK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EkAlg {
    Ecc,
    Rsa,
}

impl EkAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ecc => "ecc",
            Self::Rsa => "rsa",
        }
    }
}

/// One provisioned VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub vm_id: String,
    pub ek_alg: EkAlg,
    /// Hex of the EK's TPM2B_PUBLIC.
    pub ek_public: String,
    /// Hex of the AK's TPM2B_PUBLIC.
    pub ak_public: String,
    /// Hex of the AK's TPM name (nameAlg || digest of TPMT_PUBLIC).
    pub ak_name: String,
    /// Hex SHA-256 of the DER AK certificate stored in the vTPM's NV.
    pub ak_cert_sha256: String,
    /// When the entry was first written (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The TPM clock state of the last accepted quote: a later quote whose
    /// state is older reveals a snapshot restore or a clone (§15.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_quote: Option<QuoteObservation>,
}

/// What the host remembers of a VM's last accepted quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteObservation {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
    pub at_unix: u64,
}

impl From<FsError> for RegistryError {
    fn from(e: FsError) -> Self {
        match e {
            FsError::Directory { path, source } => Self::Directory { path, source },
            FsError::TooLarge { path, .. } => Self::EntryTooLarge { path },
            FsError::TooManyEntries { path, .. } => Self::Full { path },
            FsError::NotAFile { path } => Self::Malformed {
                path,
                reason: "not a regular file".into(),
            },
            FsError::Io { path, source } => Self::Io { path, source },
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("invalid vm-id {vm_id:?}: {reason} (allowed: 1..64 characters of [A-Za-z0-9._:+-])")]
    InvalidVmId { vm_id: String, reason: String },
    #[error("registry directory {}: {source} (create it, or pass the right --registry)", path.display())]
    Directory { path: PathBuf, source: io::Error },
    #[error("registry entry {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("registry entry {} is larger than {MAX_ENTRY_FILE} bytes: not a vkx registry entry; move it away", path.display())]
    EntryTooLarge { path: PathBuf },
    #[error("registry entry {} is malformed: {reason}; restore it from backup or remove it and re-provision the VM", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("registry {} holds more than {MAX_REGISTRY_ENTRIES} entries: remove entries of deleted VMs", path.display())]
    Full { path: PathBuf },
    #[error(
        "registry entry for vm {vm_id} was created by another writer at the same time: re-run the command"
    )]
    ConcurrentWrite { vm_id: String },
    #[error("TPM clock record {} is unreadable: {reason}; remove it to start the VM's clock baseline afresh (a rewind before its next quote goes unseen)", path.display())]
    ClockCorrupt { path: PathBuf, reason: String },
}

/// A registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// Opens an existing registry directory, or creates it (mode 0700).
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        let err = |source| RegistryError::Directory {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            create_private_dirs(dir).map_err(err)?;
        }
        if !fs::metadata(dir).map_err(err)?.is_dir() {
            return Err(err(io::Error::other("not a directory")));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry of `vm_id`, if there is one.
    pub fn by_vm_id(&self, vm_id: &str) -> Result<Option<RegistryEntry>, RegistryError> {
        let vm_id = validate_vm_id(vm_id)?;
        let path = self.entry_path(&vm_id);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RegistryError::Io { path, source }),
            Ok(_) => read_entry(&path, Some(&vm_id)).map(Some),
        }
    }

    /// The entry whose AK has the TPM name `ak_name`, if any. Scans the
    /// directory (bounded): fine for a node's ~1,000 VMs.
    pub fn by_ak_name(&self, ak_name: &[u8]) -> Result<Option<RegistryEntry>, RegistryError> {
        let wanted = hex::encode(ak_name);
        for entry in self.entries()? {
            if entry.ak_name.eq_ignore_ascii_case(&wanted) {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Every entry, in no particular order (bounded by
    /// [`MAX_REGISTRY_ENTRIES`]).
    pub fn entries(&self) -> Result<Vec<RegistryEntry>, RegistryError> {
        let mut out = Vec::new();
        for item in entries_bounded(&self.dir, MAX_DIR_SCAN)? {
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(ENTRY_SUFFIX) else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            if out.len() >= MAX_REGISTRY_ENTRIES {
                return Err(RegistryError::Full {
                    path: self.dir.clone(),
                });
            }
            let vm_id = validate_vm_id(stem).map_err(|e| RegistryError::Malformed {
                path: item.path(),
                reason: format!("file name is not a vm-id: {e}"),
            })?;
            out.push(read_entry(&item.path(), Some(&vm_id))?);
        }
        Ok(out)
    }

    /// Writes a new entry; fails if one exists for the VM already (also
    /// when another writer created it meanwhile).
    pub fn insert(&self, entry: &RegistryEntry) -> Result<(), RegistryError> {
        let vm_id = validate_vm_id(&entry.vm_id)?;
        if self.entries()?.len() >= MAX_REGISTRY_ENTRIES {
            return Err(RegistryError::Full {
                path: self.dir.clone(),
            });
        }
        let path = self.entry_path(&vm_id);
        let temp = self.write_temp(entry)?;
        // A new VM starts without a clock baseline (a record left by an
        // entry removed by hand is not this VM's), and with its clock file,
        // so that its attestations only ever overwrite a slot.
        if !path.exists() {
            self.reset_clock(&vm_id, entry.last_quote.as_ref())?;
        }
        // A hard link fails if the target exists: create-if-absent,
        // atomically, without overwriting a concurrent writer's entry.
        let linked = fs::hard_link(&temp, &path);
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RegistryError::ConcurrentWrite {
                    vm_id: entry.vm_id.clone(),
                });
            }
            Err(source) => return Err(RegistryError::Io { path, source }),
        }
        self.sync_dir()
    }

    /// Replaces the entry of an existing VM.
    pub fn replace(&self, entry: &RegistryEntry) -> Result<(), RegistryError> {
        let vm_id = validate_vm_id(&entry.vm_id)?;
        let path = self.entry_path(&vm_id);
        let temp = self.write_temp(entry)?;
        if let Err(source) = fs::rename(&temp, &path) {
            let _ = fs::remove_file(&temp);
            return Err(RegistryError::Io { path, source });
        }
        self.sync_dir()
    }

    /// Gives `vm_id` a fresh clock file whose record is `baseline` (`None`:
    /// no baseline), replacing any: for a VM that starts afresh (a new
    /// entry). Durable once the directory is synced (the caller writes the
    /// entry next, which syncs it).
    pub fn reset_clock(
        &self,
        vm_id: &VmId,
        baseline: Option<&QuoteObservation>,
    ) -> Result<(), RegistryError> {
        let path = self.clock_path(vm_id);
        let (temp, _file) = self.write_clock_temp(vm_id, baseline)?;
        fs::rename(&temp, &path).map_err(|source| {
            let _ = fs::remove_file(&temp);
            RegistryError::Io { path, source }
        })
    }

    /// A complete clock file holding one record (`observation`, sequence
    /// number 0) under a temporary name, written, locked and synced.
    fn write_clock_temp(
        &self,
        vm_id: &VmId,
        observation: Option<&QuoteObservation>,
    ) -> Result<(PathBuf, File), RegistryError> {
        let mut raw = encode_slot(0, observation).to_vec();
        raw.resize(CLOCK_FILE_LEN, 0);
        // Locked before it is visible under its real name: no other
        // process reads or writes it before this one is done.
        let prefix = format!("{TEMP_PREFIX}{vm_id}-");
        Ok(write_temp(
            &self.dir,
            &prefix,
            CLOCK_SUFFIX,
            &raw,
            File::lock,
        )?)
    }

    /// Opens `vm_id`'s clock record, locked against other processes (an
    /// operator's `vtpm accept-rewind` beside `serve`) until dropped.
    pub fn clock(&self, vm_id: &VmId) -> Result<ClockFile, RegistryError> {
        ClockFile::open(self, vm_id)
    }

    /// The clock state of `vm_id`'s last accepted quote: its clock record,
    /// or (none yet) what an older version wrote into the entry.
    pub fn last_quote(&self, vm_id: &VmId) -> Result<Option<QuoteObservation>, RegistryError> {
        let clock = self.clock(vm_id)?;
        match clock.recorded() {
            Some(recorded) => Ok(recorded),
            None => Ok(self.by_vm_id(vm_id.as_str())?.and_then(|e| e.last_quote)),
        }
    }

    fn entry_path(&self, vm_id: &VmId) -> PathBuf {
        self.dir.join(format!("{}{ENTRY_SUFFIX}", vm_id.as_str()))
    }

    fn clock_path(&self, vm_id: &VmId) -> PathBuf {
        self.dir.join(format!("{}{CLOCK_SUFFIX}", vm_id.as_str()))
    }

    fn write_temp(&self, entry: &RegistryEntry) -> Result<PathBuf, RegistryError> {
        let mut json = serde_json::to_vec_pretty(entry).map_err(|e| RegistryError::Malformed {
            path: self.dir.clone(),
            reason: format!("cannot serialise entry: {e}"),
        })?;
        json.push(b'\n');
        let prefix = format!("{TEMP_PREFIX}{}-", entry.vm_id);
        Ok(write_temp(&self.dir, &prefix, "", &json, |_| Ok(()))?.0)
    }

    fn sync_dir(&self) -> Result<(), RegistryError> {
        Ok(sync_dir(&self.dir)?)
    }
}

/// A VM's clock record, open and locked (`flock`, exclusive) until
/// dropped. Two slots of [`CLOCK_SLOT_LEN`] bytes; the valid one with the
/// higher sequence number is the record. [`ClockFile::record`] writes the
/// other slot in place and syncs its data: no directory operation, and no
/// journal commit for metadata, as the file's size never changes.
#[derive(Debug)]
pub struct ClockFile {
    path: PathBuf,
    dir: PathBuf,
    vm_id: VmId,
    /// `None` until the file exists (created by the first record).
    file: Option<File>,
    /// The sequence number and content of the current record.
    current: Option<(u64, Option<QuoteObservation>)>,
}

impl ClockFile {
    fn open(registry: &Registry, vm_id: &VmId) -> Result<Self, RegistryError> {
        let path = registry.clock_path(vm_id);
        let mut clock = Self {
            path: path.clone(),
            dir: registry.dir.clone(),
            vm_id: vm_id.clone(),
            file: None,
            current: None,
        };
        let io_err = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(clock),
            Err(e) => return Err(io_err(e)),
            Ok(f) => f,
        };
        file.lock().map_err(io_err)?;
        let mut raw = Vec::with_capacity(CLOCK_FILE_LEN);
        (&file)
            .take(CLOCK_FILE_LEN as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(io_err)?;
        clock.current = Some(
            parse_clock(&raw).map_err(|reason| RegistryError::ClockCorrupt {
                path: path.clone(),
                reason,
            })?,
        );
        clock.file = Some(file);
        Ok(clock)
    }

    /// The recorded clock state: `None` if there is no record yet,
    /// `Some(None)` if the baseline was cleared (`accept-rewind`).
    pub fn recorded(&self) -> Option<Option<QuoteObservation>> {
        self.current.map(|(_, o)| o)
    }

    /// Records `observation` (`None`: clears the baseline) durably: the
    /// slot not holding the current record is overwritten and synced.
    pub fn record(&mut self, observation: Option<QuoteObservation>) -> Result<(), RegistryError> {
        let io_err = |source| RegistryError::Io {
            path: self.path.clone(),
            source,
        };
        let Some((seq, _)) = self.current else {
            return self.create(observation);
        };
        let seq = seq.wrapping_add(1);
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io_err(io::Error::other("not open")))?;
        let slot = encode_slot(seq, observation.as_ref());
        let offset = if seq % 2 == 0 {
            0
        } else {
            CLOCK_SLOT_LEN as u64
        };
        write_at(file, &slot, offset)
            .and_then(|()| file.sync_data())
            .map_err(io_err)?;
        self.current = Some((seq, observation));
        Ok(())
    }

    /// The first record of a VM whose entry predates clock files: the
    /// whole file written aside and linked into place (once per VM; new
    /// entries get theirs with [`Registry::reset_clock`]).
    fn create(&mut self, observation: Option<QuoteObservation>) -> Result<(), RegistryError> {
        let registry = Registry {
            dir: self.dir.clone(),
        };
        let (temp, file) = registry.write_clock_temp(&self.vm_id, observation.as_ref())?;
        let linked = fs::hard_link(&temp, &self.path);
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            // Another process recorded first: its record is the current
            // one; write after it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                drop(file);
                let vm_id = self.vm_id.clone();
                *self = Self::open(&registry, &vm_id)?;
                if self.current.is_none() {
                    return Err(RegistryError::Io {
                        path: self.path.clone(),
                        source: e,
                    });
                }
                return self.record(observation);
            }
            Err(source) => {
                return Err(RegistryError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        registry.sync_dir()?;
        self.file = Some(file);
        self.current = Some((0, observation));
        Ok(())
    }
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

#[cfg(not(unix))]
fn write_at(mut file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(buf)
}

fn encode_slot(seq: u64, o: Option<&QuoteObservation>) -> [u8; CLOCK_SLOT_LEN] {
    let mut b = [0u8; CLOCK_SLOT_LEN];
    b[0..4].copy_from_slice(CLOCK_MAGIC);
    b[4] = CLOCK_FORMAT;
    b[8..16].copy_from_slice(&seq.to_be_bytes());
    if let Some(o) = o {
        b[5] = KIND_OBSERVED;
        b[16..24].copy_from_slice(&o.clock.to_be_bytes());
        b[24..28].copy_from_slice(&o.reset_count.to_be_bytes());
        b[28..32].copy_from_slice(&o.restart_count.to_be_bytes());
        b[32..40].copy_from_slice(&o.firmware_version.to_be_bytes());
        b[40..48].copy_from_slice(&o.at_unix.to_be_bytes());
    } else {
        b[5] = KIND_CLEARED;
    }
    let sum = ring::digest::digest(&ring::digest::SHA256, &b[..CLOCK_SUMMED]);
    b[CLOCK_SUMMED..].copy_from_slice(&sum.as_ref()[..CLOCK_SLOT_LEN - CLOCK_SUMMED]);
    b
}

/// One slot: `None` if it is not a valid record (never written, torn, or
/// not ours).
fn decode_slot(b: &[u8]) -> Option<(u64, Option<QuoteObservation>)> {
    let sum = ring::digest::digest(&ring::digest::SHA256, &b[..CLOCK_SUMMED]);
    if &b[..4] != CLOCK_MAGIC
        || b[4] != CLOCK_FORMAT
        || b[CLOCK_SUMMED..] != sum.as_ref()[..CLOCK_SLOT_LEN - CLOCK_SUMMED]
    {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap_or_default());
    let observation = match b[5] {
        KIND_CLEARED => None,
        KIND_OBSERVED => Some(QuoteObservation {
            clock: u64_at(16),
            reset_count: u32_at(24),
            restart_count: u32_at(28),
            firmware_version: u64_at(32),
            at_unix: u64_at(40),
        }),
        _ => return None,
    };
    Some((u64_at(8), observation))
}

/// The current record of a clock file: its valid slot with the higher
/// sequence number.
fn parse_clock(raw: &[u8]) -> Result<(u64, Option<QuoteObservation>), String> {
    if raw.len() != CLOCK_FILE_LEN {
        return Err(format!("{} bytes, not {CLOCK_FILE_LEN}", raw.len()));
    }
    let (a, b) = raw.split_at(CLOCK_SLOT_LEN);
    match (decode_slot(a), decode_slot(b)) {
        (Some(x), Some(y)) => Ok(if y.0 > x.0 { y } else { x }),
        (Some(x), None) | (None, Some(x)) => Ok(x),
        (None, None) => Err("neither slot holds a valid record".to_owned()),
    }
}

/// Checks a vm-id with the protocol's rule (also what makes it a safe file
/// name: no `/`, and `.`/`..` cannot occur as the name is suffixed).
pub fn validate_vm_id(vm_id: &str) -> Result<VmId, RegistryError> {
    VmId::new(vm_id).map_err(|e| RegistryError::InvalidVmId {
        vm_id: vm_id.chars().take(VmId::MAX_LEN + 8).collect(),
        reason: e.to_string(),
    })
}

fn read_entry(path: &Path, expected: Option<&VmId>) -> Result<RegistryEntry, RegistryError> {
    let raw = read_capped(path, MAX_ENTRY_FILE)?;
    let malformed = |reason: String| RegistryError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let entry: RegistryEntry =
        serde_json::from_slice(&raw).map_err(|e| malformed(e.to_string()))?;
    validate_vm_id(&entry.vm_id).map_err(|e| malformed(e.to_string()))?;
    if let Some(expected) = expected
        && entry.vm_id != expected.as_str()
    {
        return Err(malformed(format!(
            "names vm {:?}, but the file is for {expected}",
            entry.vm_id
        )));
    }
    for (field, value) in [
        ("ek_public", &entry.ek_public),
        ("ak_public", &entry.ak_public),
        ("ak_name", &entry.ak_name),
        ("ak_cert_sha256", &entry.ak_cert_sha256),
    ] {
        if value.is_empty() || hex::decode(value).is_err() {
            return Err(malformed(format!("{field} is not hex")));
        }
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vm_id: &str, ak_name: &str) -> RegistryEntry {
        RegistryEntry {
            vm_id: vm_id.into(),
            ek_alg: EkAlg::Ecc,
            ek_public: "00aa".into(),
            ak_public: "00bb".into(),
            ak_name: ak_name.into(),
            ak_cert_sha256: "cc".repeat(32),
            created_unix: 1,
            last_quote: None,
        }
    }

    #[test]
    fn insert_lookup_replace() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("reg")).unwrap();
        assert_eq!(reg.by_vm_id("vm-1").unwrap(), None);
        reg.insert(&entry("vm-1", "000b11")).unwrap();
        reg.insert(&entry("vm:2", "000b22")).unwrap();
        assert_eq!(reg.by_vm_id("vm-1").unwrap(), Some(entry("vm-1", "000b11")));
        assert_eq!(
            reg.by_ak_name(&[0x00, 0x0b, 0x22]).unwrap().unwrap().vm_id,
            "vm:2"
        );
        assert_eq!(reg.by_ak_name(&[1]).unwrap(), None);
        assert!(matches!(
            reg.insert(&entry("vm-1", "000b33")),
            Err(RegistryError::ConcurrentWrite { .. })
        ));
        reg.replace(&entry("vm-1", "000b33")).unwrap();
        assert_eq!(reg.by_vm_id("vm-1").unwrap().unwrap().ak_name, "000b33");
        assert_eq!(reg.entries().unwrap().len(), 2);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(reg.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(TEMP_PREFIX)),
            "{names:?}"
        );
    }

    fn observed(clock: u64) -> QuoteObservation {
        QuoteObservation {
            clock,
            reset_count: 3,
            restart_count: 1,
            firmware_version: 7,
            at_unix: 100 + clock,
        }
    }

    #[cfg(unix)]
    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().ino()
    }

    /// The per-attestation write is one slot of the VM's clock file: the
    /// entry is not rewritten (same inode) and, after the first record,
    /// nothing in the directory is created or renamed.
    #[cfg(unix)]
    #[test]
    fn recording_a_quote_overwrites_a_slot_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        reg.insert(&entry("vm-1", "000b11")).unwrap();
        let vm = VmId::new("vm-1").unwrap();
        let entry_inode = inode(&dir.path().join("vm-1.json"));
        reg.clock(&vm).unwrap().record(Some(observed(10))).unwrap();
        let clock_path = dir.path().join("vm-1.clock");
        let clock_inode = inode(&clock_path);
        for t in 11..15 {
            let mut c = reg.clock(&vm).unwrap();
            assert_eq!(c.recorded(), Some(Some(observed(t - 1))));
            c.record(Some(observed(t))).unwrap();
        }
        assert_eq!(inode(&dir.path().join("vm-1.json")), entry_inode);
        assert_eq!(inode(&clock_path), clock_inode);
        assert_eq!(
            fs::metadata(&clock_path).unwrap().len(),
            CLOCK_FILE_LEN as u64
        );
        assert_eq!(reg.last_quote(&vm).unwrap(), Some(observed(14)));
        // The entry still reads as it was written.
        assert_eq!(reg.by_vm_id("vm-1").unwrap(), Some(entry("vm-1", "000b11")));
        let names: Vec<_> = fs::read_dir(reg.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A crash tears at most the slot being written: the other slot, the
    /// previous record, is read; a cleared baseline is a record too.
    #[test]
    fn a_torn_slot_leaves_the_previous_record() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let vm = VmId::new("vm-1").unwrap();
        assert_eq!(reg.clock(&vm).unwrap().recorded(), None);
        let mut c = reg.clock(&vm).unwrap();
        c.record(Some(observed(1))).unwrap();
        c.record(Some(observed(2))).unwrap();
        c.record(None).unwrap();
        c.record(Some(observed(4))).unwrap();
        drop(c);
        let path = dir.path().join("vm-1.clock");
        let good = fs::read(&path).unwrap();
        // seq 3 (observed(4)) is in slot 1, seq 2 (cleared) in slot 0.
        for torn_at in [9, 20, 40, 60] {
            let mut raw = good.clone();
            raw[CLOCK_SLOT_LEN + torn_at] ^= 0x40;
            fs::write(&path, &raw).unwrap();
            assert_eq!(reg.clock(&vm).unwrap().recorded(), Some(None), "{torn_at}");
        }
        let mut raw = good.clone();
        raw[3] ^= 1;
        fs::write(&path, &raw).unwrap();
        assert_eq!(reg.clock(&vm).unwrap().recorded(), Some(Some(observed(4))));
        // The next record goes into the torn slot, not over the good one.
        reg.clock(&vm).unwrap().record(Some(observed(5))).unwrap();
        let raw = fs::read(&path).unwrap();
        assert_eq!(&raw[CLOCK_SLOT_LEN..], &good[CLOCK_SLOT_LEN..]);
        assert_eq!(reg.last_quote(&vm).unwrap(), Some(observed(5)));
        // Neither slot valid, or the wrong size: an error naming the file,
        // never a silently empty baseline.
        for bad in [vec![0u8; CLOCK_FILE_LEN], good[..CLOCK_SLOT_LEN].to_vec()] {
            fs::write(&path, &bad).unwrap();
            assert!(matches!(
                reg.clock(&vm),
                Err(RegistryError::ClockCorrupt { .. })
            ));
        }
    }

    /// A baseline an older version wrote into the entry counts until the
    /// first clock record; a new entry drops a record left behind.
    #[test]
    fn the_entry_baseline_until_the_first_record_and_new_entries_start_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let vm = VmId::new("vm-1").unwrap();
        // An entry as an older version wrote it: no clock file.
        let mut old = entry("vm-1", "000b11");
        old.last_quote = Some(observed(50));
        fs::write(
            dir.path().join("vm-1.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        assert_eq!(reg.clock(&vm).unwrap().recorded(), None);
        assert_eq!(reg.last_quote(&vm).unwrap(), Some(observed(50)));
        reg.clock(&vm).unwrap().record(None).unwrap();
        assert_eq!(reg.last_quote(&vm).unwrap(), None);
        reg.clock(&vm).unwrap().record(Some(observed(60))).unwrap();
        // The entry removed by hand, the VM provisioned again.
        fs::remove_file(dir.path().join("vm-1.json")).unwrap();
        reg.insert(&entry("vm-1", "000b22")).unwrap();
        assert_eq!(reg.last_quote(&vm).unwrap(), None);
        assert_eq!(reg.clock(&vm).unwrap().recorded(), Some(None));
        // A new entry that carries a baseline starts its clock file there.
        let mut with = entry("vm-2", "000b33");
        with.last_quote = Some(observed(70));
        reg.insert(&with).unwrap();
        let vm2 = VmId::new("vm-2").unwrap();
        assert_eq!(
            reg.clock(&vm2).unwrap().recorded(),
            Some(Some(observed(70)))
        );
    }

    #[test]
    fn refuses_bad_vm_ids_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(reg.by_vm_id(bad), Err(RegistryError::InvalidVmId { .. })),
                "{bad:?}"
            );
        }
        fs::write(dir.path().join("vm-1.json"), b"{\"vm_id\":\"vm-2\"}").unwrap();
        assert!(matches!(
            reg.by_vm_id("vm-1"),
            Err(RegistryError::Malformed { .. })
        ));
        fs::write(
            dir.path().join("vm-1.json"),
            vec![b' '; usize::try_from(MAX_ENTRY_FILE).unwrap() + 1],
        )
        .unwrap();
        assert!(matches!(
            reg.by_vm_id("vm-1"),
            Err(RegistryError::EntryTooLarge { .. })
        ));
        // A mismatched name inside the file is refused, too.
        let mut e = entry("vm-2", "00");
        e.vm_id = "vm-3".into();
        fs::write(
            dir.path().join("vm-2.json"),
            serde_json::to_vec(&e).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            reg.by_vm_id("vm-2"),
            Err(RegistryError::Malformed { .. })
        ));
    }
}
