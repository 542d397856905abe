//! The node's identity: `vkx-host init` creates the host's TLS key and
//! certificate (the key guests pin, PROTOCOL.md §4.3), the node's vTPM
//! CA and the master key that seals the key store ([`crate::keystore`]),
//! in one directory with private permissions. Refuses to overwrite an
//! existing identity: replacing the TLS key would lock every guest out,
//! replacing the master key would make every stored key unreadable.
//!
//! The master key is 32 random bytes in `master.key` (mode 0600).
//! [`load_master_key`] refuses a master key file that group or others may
//! read: such a key may have leaked, and with it every stored key.
//! [`load`] refuses the TLS private key likewise.
//!
//! Both secret files are also refused when they are a symbolic link (a link
//! may point at a file someone else controls) or are not owned by the
//! process's effective uid (another user who owns the file can read it,
//! or may have put it there): `open_private_file`. The effective uid is
//! read from `/proc/self/status` (`effective_uid`), so no unsafe FFI is
//! needed; where that file is missing, loading fails closed.

use std::fs::{File, Metadata};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::fsutil::{create_private_dirs, effective_uid};
use crate::keystore::{MASTER_KEY_LEN, MasterKey};

/// The node's TLS private key (PKCS#8 DER, mode 0600).
pub const NODE_KEY_FILE: &str = "node-key.pk8";
/// The node's self-signed TLS certificate (DER).
pub const NODE_CERT_FILE: &str = "node-cert.der";
/// The vTPM CA's subdirectory.
pub const CA_DIR: &str = "ca";
/// The master key of the key store: 32 raw bytes, mode 0600.
pub const MASTER_KEY_FILE: &str = "master.key";
/// Years the node certificate is valid; guests pin the key, not the
/// certificate, so renewing it does not touch them.
const NODE_CERT_VALIDITY_YEARS: i32 = 10;
/// Largest key or certificate file read back.
const MAX_IDENTITY_FILE: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("{} already holds a node identity: refusing to replace the key every guest pins", dir.display())]
    Exists { dir: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node identity in {}: {reason}", dir.display())]
    Invalid { dir: PathBuf, reason: String },
    #[error("vTPM CA: {0}")]
    Ca(#[from] crate::vtpm::VtpmError),
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
    #[error(
        "master key {shown} has mode {mode:04o}: group or others may read it, so it is refused. \
         If anyone else could have read it, treat every stored key as exposed; otherwise \
         restrict it with `chmod 600 {shown}`",
        shown = .path.display()
    )]
    MasterKeyExposed { path: PathBuf, mode: u32 },
    #[error(
        "node TLS key {shown} has mode {mode:04o}: group or others may read it, so it is refused. \
         If anyone else could have read it, treat the node identity as exposed (every guest \
         pins it: re-initialise the node and re-pin the guests); otherwise restrict it with \
         `chmod 600 {shown}`",
        shown = .path.display()
    )]
    NodeKeyExposed { path: PathBuf, mode: u32 },
    #[error(
        "{shown} is owned by uid {owner}, but vkx-host runs as uid {expected}: a secret file \
         another user owns may have been read or planted by that user, so it is refused. If the \
         file is genuine, give it to this user with `chown {expected} {shown}` (or run vkx-host \
         as uid {owner})",
        shown = .path.display()
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error(
        "{} is a symbolic link: a secret file must be the regular file itself (a link may point \
         at a file another user controls), so it is refused. Replace the link with the file it \
         points to",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error(
        "cannot learn this process's effective uid from /proc/self/status ({source}), so the \
         owner of {} cannot be checked: mount /proc",
        path.display()
    )]
    UnknownUid {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("master key: {0}")]
    MasterKey(#[from] crate::keystore::KeyStoreError),
}

/// What `init` made: the pin guests configure.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub host_key_sha256: [u8; 32],
}

/// Creates the node identity in `dir`.
pub fn init(dir: &Path) -> Result<NodeIdentity, NodeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NodeError::Io { path, source }
    };
    // Checked before anything is written, so a refusal leaves no partial
    // identity behind.
    if dir.join(NODE_KEY_FILE).exists() || dir.join(MASTER_KEY_FILE).exists() {
        return Err(NodeError::Exists {
            dir: dir.to_path_buf(),
        });
    }
    create_private_dirs(dir).map_err(io(dir))?;
    let invalid = |reason: String| NodeError::Invalid {
        dir: dir.to_path_buf(),
        reason,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| invalid(format!("key generation: {e}")))?;
    let mut params = CertificateParams::new(vec![vkx_common::tls::HOST_SERVER_NAME.to_owned()])
        .map_err(|e| invalid(format!("certificate parameters: {e}")))?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    crate::vtpm::set_validity(&mut params, NODE_CERT_VALIDITY_YEARS);
    params.serial_number = Some(crate::vtpm::random_serial().map_err(invalid)?);
    let cert = params
        .self_signed(&key)
        .map_err(|e| invalid(format!("self-signing: {e}")))?;
    let master = MasterKey::generate()?;
    for (name, bytes) in [
        (NODE_KEY_FILE, &key.serialize_der()[..]),
        (NODE_CERT_FILE, cert.der()),
        (MASTER_KEY_FILE, &master.expose()[..]),
    ] {
        // Fails if the file exists: never overwrites.
        crate::fsutil::write_new(&dir.join(name), bytes)?;
    }
    crate::fsutil::sync_dir(dir)?;
    crate::vtpm::ca_init(&dir.join(CA_DIR))?;
    let host_key_sha256 =
        vkx_common::tls::spki_sha256(cert.der()).map_err(|e| invalid(e.to_string()))?;
    Ok(NodeIdentity { host_key_sha256 })
}

/// Reads the node's TLS certificate and key. Refuses a key file that is a
/// symbolic link, is not owned by this process's effective uid, or that
/// group or others may read (mode & 0o077 != 0). The certificate is
/// public and not checked.
pub fn load(dir: &Path) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), NodeError> {
    use std::io::Read as _;
    let read = |file: File, path: PathBuf| -> Result<Vec<u8>, NodeError> {
        let mut buf = Vec::new();
        file.take(MAX_IDENTITY_FILE)
            .read_to_end(&mut buf)
            .map_err(|source| NodeError::Io { path, source })?;
        Ok(buf)
    };
    let cert_path = dir.join(NODE_CERT_FILE);
    let cert_file = File::open(&cert_path).map_err(|source| NodeError::Io {
        path: cert_path.clone(),
        source,
    })?;
    let cert = CertificateDer::from(read(cert_file, cert_path)?);
    let key_path = dir.join(NODE_KEY_FILE);
    let (key_file, meta) = open_private_file(&key_path)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(NodeError::NodeKeyExposed {
            path: key_path,
            mode,
        });
    }
    let key =
        PrivateKeyDer::try_from(read(key_file, key_path)?).map_err(|e| NodeError::Invalid {
            dir: dir.to_path_buf(),
            reason: format!("{NODE_KEY_FILE}: {e}"),
        })?;
    Ok((cert, key))
}

/// Reads the node's master key from `dir`/`master.key`. Refuses a file
/// that is not exactly [`MASTER_KEY_LEN`] bytes, a symbolic link, a file
/// not owned by this process's effective uid, and one that group or
/// others may read (mode & 0o077 != 0).
pub fn load_master_key(dir: &Path) -> Result<MasterKey, NodeError> {
    use std::io::Read as _;
    let path = dir.join(MASTER_KEY_FILE);
    let io = |source| NodeError::Io {
        path: path.clone(),
        source,
    };
    let invalid = |reason: String| NodeError::Invalid {
        dir: dir.to_path_buf(),
        reason: format!("{MASTER_KEY_FILE}: {reason}"),
    };
    let (mut file, meta) = match open_private_file(&path) {
        Ok(opened) => opened,
        Err(NodeError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "missing. `vkx-host init` creates it; a node initialised before the key store \
                 existed needs one made by hand: (umask 077; head -c {MASTER_KEY_LEN} \
                 /dev/urandom > {})",
                path.display()
            )));
        }
        Err(e) => return Err(e),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(NodeError::MasterKeyExposed { path, mode });
    }
    if meta.len() != MASTER_KEY_LEN as u64 {
        return Err(invalid(format!(
            "{} bytes; a master key has {MASTER_KEY_LEN}",
            meta.len()
        )));
    }
    let mut bytes = zeroize::Zeroizing::new([0u8; MASTER_KEY_LEN]);
    file.read_exact(&mut bytes[..]).map_err(io)?;
    Ok(MasterKey::new(bytes))
}

/// Opens a secret file of the node for reading, with the metadata of the
/// file actually opened. Refuses a symbolic link ([`NodeError::Symlink`]),
/// anything but a regular file, and a file not owned by this process's
/// effective uid ([`NodeError::NotOwned`]). The mode is the caller's to
/// check (its error says what the file protects).
///
/// The path is looked at without following links, then opened, and the
/// two must be the same inode: a link swapped in between is caught too.
pub(crate) fn open_private_file(path: &Path) -> Result<(File, Metadata), NodeError> {
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |reason: &str| NodeError::Invalid {
        dir: path.parent().unwrap_or(path).to_path_buf(),
        reason: format!("{}: {reason}", path.display()),
    };
    let link = std::fs::symlink_metadata(path).map_err(io)?;
    if link.file_type().is_symlink() {
        return Err(NodeError::Symlink {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if (meta.dev(), meta.ino()) != (link.dev(), link.ino()) {
        return Err(invalid("replaced while being opened"));
    }
    if !meta.is_file() {
        return Err(invalid("not a regular file"));
    }
    let expected = effective_uid().map_err(|source| NodeError::UnknownUid {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.uid() != expected {
        return Err(NodeError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected,
        });
    }
    Ok((file, meta))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fsutil::parse_effective_uid;

    #[test]
    fn init_makes_a_pinnable_identity_once() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node");
        let id = init(&node).unwrap();
        let (cert, key) = load(&node).unwrap();
        assert_eq!(
            vkx_common::tls::spki_sha256(&cert).unwrap(),
            id.host_key_sha256
        );
        assert!(vkx_common::tls::server_config(cert, key).is_ok());
        assert!(node.join(CA_DIR).join(crate::vtpm::CA_KEY_FILE).exists());
        assert!(matches!(init(&node), Err(NodeError::Exists { .. })));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node.join(NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn init_makes_a_private_master_key_that_loads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node");
        init(&node).unwrap();
        let path = node.join(MASTER_KEY_FILE);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), MASTER_KEY_LEN as u64);
        let before = std::fs::read(&path).unwrap();
        assert!(format!("{:?}", load_master_key(&node).unwrap()) == "MasterKey(..)");
        // A second init refuses and leaves the master key alone.
        assert!(matches!(init(&node), Err(NodeError::Exists { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before);

        for mode in [0o640, 0o604, 0o644, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_master_key(&node).unwrap_err();
            assert!(
                matches!(err, NodeError::MasterKeyExposed { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_master_key(&node).is_ok());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [7u8; 31]).unwrap();
        assert!(matches!(
            load_master_key(&node),
            Err(NodeError::Invalid { .. })
        ));
        std::fs::write(&path, [7u8; 33]).unwrap();
        assert!(matches!(
            load_master_key(&node),
            Err(NodeError::Invalid { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        let err = load_master_key(&node).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn the_effective_uid_is_the_owner_of_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probe");
        std::fs::write(&path, b"").unwrap();
        let owner = std::fs::metadata(&path).unwrap().uid();
        assert_eq!(effective_uid().unwrap(), owner);
        let status = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_effective_uid(status), Some(1001));
        for bad in ["", "Uid:\t1000\n", "Uid:\t1000\tx\t1\t1\n", "Gid:\t1\t2\n"] {
            assert_eq!(parse_effective_uid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn secret_files_owned_by_another_uid_are_refused() {
        if !crate::fsutil::running_as_root("secret_files_owned_by_another_uid_are_refused") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node");
        init(&node).unwrap();
        for file in [MASTER_KEY_FILE, NODE_KEY_FILE] {
            let path = node.join(file);
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let err = if file == MASTER_KEY_FILE {
                load_master_key(&node).map(|_| ()).unwrap_err()
            } else {
                load(&node).map(|_| ()).unwrap_err()
            };
            assert!(
                matches!(
                    err,
                    NodeError::NotOwned { owner: 65534, expected: 0, path: ref p } if *p == path
                ),
                "{file}: {err:?}"
            );
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(
                text.contains("uid 65534") && text.contains("uid 0"),
                "{text}"
            );
            assert!(text.contains("chown 0 "), "{text}");
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        }
        assert!(load_master_key(&node).is_ok());
        assert!(load(&node).is_ok());
    }

    #[test]
    fn secret_files_that_are_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node");
        init(&node).unwrap();
        for file in [MASTER_KEY_FILE, NODE_KEY_FILE] {
            let path = node.join(file);
            // The genuine file, moved aside and linked to: still refused.
            let real = dir.path().join(format!("{file}.real"));
            std::fs::rename(&path, &real).unwrap();
            std::os::unix::fs::symlink(&real, &path).unwrap();
            let err = if file == MASTER_KEY_FILE {
                load_master_key(&node).map(|_| ()).unwrap_err()
            } else {
                load(&node).map(|_| ()).unwrap_err()
            };
            assert!(matches!(err, NodeError::Symlink { .. }), "{file}: {err:?}");
            assert!(err.to_string().contains("symbolic link"), "{err}");
            std::fs::remove_file(&path).unwrap();
            std::fs::rename(&real, &path).unwrap();
        }
        assert!(load_master_key(&node).is_ok());
        assert!(load(&node).is_ok());
    }

    #[test]
    fn a_node_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node");
        init(&node).unwrap();
        let path = node.join(NODE_KEY_FILE);
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load(&node).map(|_| ()).unwrap_err();
            assert!(
                matches!(err, NodeError::NodeKeyExposed { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load(&node).is_ok());
    }
}
