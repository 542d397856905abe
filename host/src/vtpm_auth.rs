//! The authorisation values provisioning gives a VM's vTPM, and where the
//! host keeps them (PROTOCOL.md §7.6, §15.7, §15.8).
//!
//! Three random 32-byte values per VM:
//! - the AK's authValue: only a process that knows it can quote with the
//!   AK. Provisioning writes it, hex, to `<vm-id>.ak-auth` for the operator
//!   to install in the guest, readable only by the agent's user;
//! - the endorsement hierarchy's authValue: without it nobody can derive
//!   the AK again (it is a primary of that hierarchy) under an authValue
//!   of their choosing;
//! - the lockout hierarchy's authValue: with `disableClear` set under it,
//!   the guest cannot `TPM2_Clear` the vTPM (which would reset the
//!   counters rewind detection compares, and the endorsement auth).
//!
//! The endorsement and lockout values never leave the host: they live in
//! `<vm-id>.secrets` (mode 0600) in the `vtpm-auth` directory (0700) of
//! the registry, so a re-run of provisioning can use the hierarchy it
//! hardened. Nothing here is logged; the values are zeroized on drop.
//!
//! What it trusts: files in its own directory, written by this module;
//! still, each is size-checked, refused when group or others can read it
//! or when it is a symlink, and parsed strictly.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::fsutil::create_private_dirs;

/// Bytes of each authorisation value: SHA-256's digest size, the most a
/// TPM accepts for an object whose nameAlg is SHA-256.
pub const AUTH_LEN: usize = 32;
/// Largest secrets or auth file read (both are under 300 bytes).
pub const MAX_AUTH_FILE: u64 = 4 * 1024;
/// The directory, inside the registry directory.
pub const AUTH_DIR: &str = "vtpm-auth";
const SECRETS_SUFFIX: &str = ".secrets";
const AK_AUTH_SUFFIX: &str = ".ak-auth";
const SECRETS_HEADER: &str = "vkx vtpm-auth v1";

/// A VM's vTPM authorisation values. `Debug` is redacted.
pub struct VtpmAuth {
    pub endorsement: Zeroizing<[u8; AUTH_LEN]>,
    pub lockout: Zeroizing<[u8; AUTH_LEN]>,
    pub ak: Zeroizing<[u8; AUTH_LEN]>,
}

impl std::fmt::Debug for VtpmAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VtpmAuth(<redacted>)")
    }
}

/// Errors of the auth store, by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthStoreError {
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is unusable: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("the system random generator failed")]
    Random,
}

impl VtpmAuth {
    /// Fresh random values.
    pub fn generate() -> Result<Self, AuthStoreError> {
        let rng = ring::rand::SystemRandom::new();
        let draw = || {
            let mut v = Zeroizing::new([0u8; AUTH_LEN]);
            rng.fill(v.as_mut()).map_err(|_| AuthStoreError::Random)?;
            Ok::<_, AuthStoreError>(v)
        };
        Ok(Self {
            endorsement: draw()?,
            lockout: draw()?,
            ak: draw()?,
        })
    }

    fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{SECRETS_HEADER}\nendorsement {}\nlockout {}\nak {}\n",
            hex::encode(self.endorsement.as_ref()),
            hex::encode(self.lockout.as_ref()),
            hex::encode(self.ak.as_ref()),
        ))
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(SECRETS_HEADER) {
            return Err(format!("the first line is not {SECRETS_HEADER:?}"));
        }
        let mut value = |name: &str| -> Result<Zeroizing<[u8; AUTH_LEN]>, String> {
            let line = lines.next().ok_or(format!("no {name} line"))?;
            let hex_value = line
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .ok_or(format!("expected a {name} line"))?;
            parse_hex_auth(hex_value).ok_or(format!("{name}: not {AUTH_LEN} bytes of hex"))
        };
        let auth = Self {
            endorsement: value("endorsement")?,
            lockout: value("lockout")?,
            ak: value("ak")?,
        };
        if lines.next().is_some() {
            return Err("trailing lines".into());
        }
        Ok(auth)
    }
}

/// `AUTH_LEN` bytes as exactly `2 * AUTH_LEN` hex digits.
fn parse_hex_auth(text: &str) -> Option<Zeroizing<[u8; AUTH_LEN]>> {
    if text.len() != 2 * AUTH_LEN {
        return None;
    }
    let mut out = Zeroizing::new([0u8; AUTH_LEN]);
    hex::decode_to_slice(text, out.as_mut()).ok()?;
    Some(out)
}

/// The `vtpm-auth` directory of a registry.
#[derive(Debug, Clone)]
pub struct AuthStore {
    dir: PathBuf,
}

impl AuthStore {
    pub fn new(registry_dir: &Path) -> Self {
        Self {
            dir: registry_dir.join(AUTH_DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn secrets_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}{SECRETS_SUFFIX}"))
    }

    /// The file the operator installs in the guest (`ak_auth_file`).
    pub fn ak_auth_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}{AK_AUTH_SUFFIX}"))
    }

    /// The VM's values, if the host holds any. `vm_id` is validated.
    pub fn load(&self, vm_id: &str) -> Result<Option<VtpmAuth>, AuthStoreError> {
        let path = self.secrets_path(vm_id);
        let Some(text) = read_private(&path)? else {
            return Ok(None);
        };
        VtpmAuth::parse(&text)
            .map(Some)
            .map_err(|reason| AuthStoreError::Invalid { path, reason })
    }

    /// Records new values for `vm_id`; fails if the VM already has some
    /// (a second writer, or a caller that did not `load` first).
    pub fn create(&self, vm_id: &str, auth: &VtpmAuth) -> Result<(), AuthStoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuthStoreError::Io { path, source }
        };
        create_private_dirs(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.secrets_path(vm_id);
        let tmp = self.dir.join(format!(".tmp-{vm_id}{SECRETS_SUFFIX}"));
        write_private(&tmp, auth.to_text().as_bytes())?;
        // A link fails if the name exists: never replace held values.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        linked.map_err(io_err(&path))?;
        self.sync_dir()
    }

    /// Writes (or rewrites, if it differs) the guest's AK auth file.
    pub fn write_ak_auth(&self, vm_id: &str, auth: &VtpmAuth) -> Result<PathBuf, AuthStoreError> {
        let path = self.ak_auth_path(vm_id);
        let text = Zeroizing::new(format!("{}\n", hex::encode(auth.ak.as_ref())));
        if read_private(&path)?.is_some_and(|t| t.as_str() == text.as_str()) {
            return Ok(path);
        }
        let tmp = self.dir.join(format!(".tmp-{vm_id}{AK_AUTH_SUFFIX}"));
        write_private(&tmp, text.as_bytes())?;
        fs::rename(&tmp, &path).map_err(|source| AuthStoreError::Io {
            path: path.clone(),
            source,
        })?;
        self.sync_dir()?;
        Ok(path)
    }

    fn sync_dir(&self) -> Result<(), AuthStoreError> {
        Ok(crate::fsutil::sync_dir(&self.dir)?)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AuthStoreError> {
    let err = |source| AuthStoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    Ok(crate::fsutil::write_new(path, bytes)?)
}

/// Reads a file of this store: `None` if absent; refused if it is a
/// symlink, not a regular file, readable by group or others, or too large.
fn read_private(path: &Path) -> Result<Option<Zeroizing<String>>, AuthStoreError> {
    use std::os::unix::fs::MetadataExt;
    let invalid = |reason: &str| AuthStoreError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let io_err = |source| AuthStoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The directory is 0700 and the host's own: checking the link before
    // opening leaves no window another user could use.
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(invalid("a symlink; refused")),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    }
    let file = File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(invalid("not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(invalid(
            "group or others may access it (it must be mode 0600)",
        ));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_AUTH_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io_err)?;
    if text.len() as u64 > MAX_AUTH_FILE {
        return Err(invalid("too large"));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuthStore::new(dir.path());
        assert!(store.load("vm-1").unwrap().is_none());
        let a = VtpmAuth::generate().unwrap();
        store.create("vm-1", &a).unwrap();
        let b = store.load("vm-1").unwrap().unwrap();
        assert_eq!(*a.endorsement, *b.endorsement);
        assert_eq!(*a.lockout, *b.lockout);
        assert_eq!(*a.ak, *b.ak);
        assert_ne!(*a.ak, *a.lockout);
        assert!(
            store
                .create("vm-1", &VtpmAuth::generate().unwrap())
                .is_err()
        );
        assert_eq!(*store.load("vm-1").unwrap().unwrap().ak, *a.ak);
        assert_eq!(format!("{b:?}"), "VtpmAuth(<redacted>)");

        let path = store.write_ak_auth("vm-1", &a).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", hex::encode(*a.ak))
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A readable secrets file is refused.
        let secrets = store.secrets_path("vm-1");
        fs::set_permissions(&secrets, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            store.load("vm-1"),
            Err(AuthStoreError::Invalid { .. })
        ));
    }

    #[test]
    fn parses_strictly() {
        let a = VtpmAuth::generate().unwrap();
        let text = a.to_text();
        assert!(VtpmAuth::parse(&text).is_ok());
        assert!(VtpmAuth::parse(&format!("{}x\n", text.as_str())).is_err());
        assert!(VtpmAuth::parse(&text.replace("lockout ", "lockout  ")).is_err());
        assert!(VtpmAuth::parse(&text.replacen("vkx vtpm-auth v1", "v2", 1)).is_err());
        assert!(parse_hex_auth(&"0".repeat(62)).is_none());
        assert!(parse_hex_auth(&"g".repeat(64)).is_none());
    }
}
