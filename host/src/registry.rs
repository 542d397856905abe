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
//! Bounds: at most [`MAX_REGISTRY_ENTRIES`] entries are scanned, and no
//! entry file larger than [`MAX_ENTRY_FILE`] is read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vkx_common::wire::VmId;

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
const TEMP_PREFIX: &str = ".tmp-";

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
            create_private_dir(dir).map_err(err)?;
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
        let dir_err = |source| RegistryError::Directory {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for (seen, item) in fs::read_dir(&self.dir).map_err(dir_err)?.enumerate() {
            if seen >= MAX_DIR_SCAN {
                return Err(RegistryError::Full {
                    path: self.dir.clone(),
                });
            }
            let item = item.map_err(dir_err)?;
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

    fn entry_path(&self, vm_id: &VmId) -> PathBuf {
        self.dir.join(format!("{}{ENTRY_SUFFIX}", vm_id.as_str()))
    }

    fn write_temp(&self, entry: &RegistryEntry) -> Result<PathBuf, RegistryError> {
        let mut json = serde_json::to_vec_pretty(entry).map_err(|e| RegistryError::Malformed {
            path: self.dir.clone(),
            reason: format!("cannot serialise entry: {e}"),
        })?;
        json.push(b'\n');
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{nanos}",
            entry.vm_id,
            std::process::id()
        ));
        let io_err = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        let mut file = private_file_options().open(&path).map_err(io_err)?;
        let written = file.write_all(&json).and_then(|()| file.sync_all());
        if let Err(source) = written {
            let _ = fs::remove_file(&path);
            return Err(RegistryError::Io { path, source });
        }
        Ok(path)
    }

    fn sync_dir(&self) -> Result<(), RegistryError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| RegistryError::Directory {
                path: self.dir.clone(),
                source,
            })
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
    let io_err = |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut raw = Vec::new();
    file.take(MAX_ENTRY_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    if raw.len() as u64 > MAX_ENTRY_FILE {
        return Err(RegistryError::EntryTooLarge {
            path: path.to_path_buf(),
        });
    }
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

#[cfg(unix)]
fn private_file_options() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.write(true).create_new(true).mode(0o600);
    o
}

#[cfg(not(unix))]
fn private_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    o
}

/// Creates `dir` (and parents) readable by its owner only.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Opens a new file for writing, readable by its owner only (0600); fails
/// if it exists.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    private_file_options().open(path)
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
