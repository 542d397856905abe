//! The node's identity: `vkx-host init` creates the host's TLS key and
//! certificate (the key guests pin, PROTOCOL.md §4.3) and the node's vTPM
//! CA, in one directory with private permissions. Refuses to overwrite an
//! existing identity: replacing the key would lock every guest out.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::registry::{create_private_dir, create_private_file};

/// The node's TLS private key (PKCS#8 DER, mode 0600).
pub const NODE_KEY_FILE: &str = "node-key.pk8";
/// The node's self-signed TLS certificate (DER).
pub const NODE_CERT_FILE: &str = "node-cert.der";
/// The vTPM CA's subdirectory.
pub const CA_DIR: &str = "ca";
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
    if dir.join(NODE_KEY_FILE).exists() {
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
    for (name, bytes) in [
        (NODE_KEY_FILE, key.serialize_der()),
        (NODE_CERT_FILE, cert.der().to_vec()),
    ] {
        let path = dir.join(name);
        let mut f = create_private_file(&path).map_err(io(&path))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io(&path))?;
    }
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
}
