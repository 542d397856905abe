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

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::keystore::{MASTER_KEY_LEN, MasterKey};
use crate::registry::{create_private_dir, create_private_file};

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
    #[error(
        "master key {shown} has mode {mode:04o}: group or others may read it, so it is refused. \
         If anyone else could have read it, treat every stored key as exposed; otherwise \
         restrict it with `chmod 600 {shown}`",
        shown = .path.display()
    )]
    MasterKeyExposed { path: PathBuf, mode: u32 },
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
    create_private_dir(dir).map_err(io(dir))?;
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
        let path = dir.join(name);
        // Fails if the file exists: never overwrites.
        let mut f = create_private_file(&path).map_err(io(&path))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(io(&path))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    crate::vtpm::ca_init(&dir.join(CA_DIR))?;
    let host_key_sha256 =
        vkx_common::tls::spki_sha256(cert.der()).map_err(|e| invalid(e.to_string()))?;
    Ok(NodeIdentity { host_key_sha256 })
}

/// Reads the node's TLS certificate and key.
pub fn load(dir: &Path) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), NodeError> {
    use std::io::Read as _;
    let read = |name: &str| -> Result<Vec<u8>, NodeError> {
        let path = dir.join(name);
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_IDENTITY_FILE).read_to_end(&mut buf))
            .map_err(|source| NodeError::Io { path, source })?;
        Ok(buf)
    };
    let cert = CertificateDer::from(read(NODE_CERT_FILE)?);
    let key = PrivateKeyDer::try_from(read(NODE_KEY_FILE)?).map_err(|e| NodeError::Invalid {
        dir: dir.to_path_buf(),
        reason: format!("{NODE_KEY_FILE}: {e}"),
    })?;
    Ok((cert, key))
}

/// Reads the node's master key from `dir`/`master.key`. Refuses a file
/// that is not exactly [`MASTER_KEY_LEN`] bytes, and one that group or
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
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "missing. `vkx-host init` creates it; a node initialised before the key store \
                 existed needs one made by hand: (umask 077; head -c {MASTER_KEY_LEN} \
                 /dev/urandom > {})",
                path.display()
            )));
        }
        Err(source) => return Err(io(source)),
    };
    // The metadata of the file opened, not of whatever the path names now.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(NodeError::MasterKeyExposed { path, mode });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
