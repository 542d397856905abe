//! The secure channel of PROTOCOL.md §4 as rustls configurations: TLS 1.3
//! only, ring as the only crypto provider, ALPN `vkx`, no session
//! resumption, no tickets, no early data; the guest authenticates the host
//! by a pinned SHA-256 of its SubjectPublicKeyInfo. The guest has no
//! client certificate: it proves itself with the attestation above TLS.
//!
//! Also the exporter values that bind everything above TLS to this
//! connection (§4.5, §9.1).
//!
//! Nothing here does I/O: the drivers run the handshakes.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, Error as TlsError, ServerConfig, SignatureScheme,
};

use crate::transcript::{TRANSCRIPT_EXPORTER_LABEL, TRANSCRIPT_EXPORTER_LEN};

/// The ALPN protocol id (§4.2): a peer that does not speak vkx fails the
/// handshake with `no_application_protocol`, permanently.
pub const ALPN_VKX: &[u8] = b"vkx";
/// The server name the guest sends and the host's certificate carries.
pub const HOST_SERVER_NAME: &str = "vkx-host";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] TlsError),
    #[error("the host certificate cannot be parsed: {0}")]
    Certificate(String),
}

/// ring, with the key exchange groups of §4.1 only (X25519, secp256r1;
/// ring's default also offers secp384r1).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    Arc::new(CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The TLS alert record a host sends, in plaintext, in answer to a
/// ClientHello that does not offer ALPN `vkx` (§4.2): content type alert
/// (21), record version 0x0303, length 2, level fatal (2),
/// `no_application_protocol` (120). rustls does not refuse a ClientHello
/// without the ALPN extension by itself, so the host looks first.
pub const NO_APPLICATION_PROTOCOL_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

/// Whether a ClientHello's ALPN list (`None`: no extension) offers `vkx`.
pub fn offers_vkx<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    alpn.is_some_and(|mut list| list.any(|p| p == ALPN_VKX))
}

/// After a handshake: the connection negotiated ALPN `vkx` (§4.2). A guest
/// whose host selected none treats it as a permanent failure.
pub fn negotiated_vkx<D>(conn: &rustls::ConnectionCommon<D>) -> bool {
    conn.alpn_protocol() == Some(ALPN_VKX)
}

/// Whether a failed handshake is permanent for the guest (§4.6): the
/// host's certificate or key not accepted (here, or by the host's alert),
/// or no common application protocol (detected here, or the host's
/// alert). Everything else is a transport failure.
pub fn handshake_failure_is_permanent(e: &TlsError) -> bool {
    use rustls::AlertDescription as A;
    match e {
        TlsError::InvalidCertificate(_) | TlsError::NoApplicationProtocol => true,
        TlsError::AlertReceived(a) => matches!(
            a,
            A::NoApplicationProtocol
                | A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
        ),
        _ => false,
    }
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo: what a guest pins.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], TlsConfigError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsConfigError::Certificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TlsConfigError::Certificate("trailing bytes".to_owned()));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, parsed.public_key().raw);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// The host's configuration: its node certificate and key.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    config.alpn_protocols = vec![ALPN_VKX.to_vec()];
    // Every connection gets a full handshake and fresh exporter values.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The guest's configuration: trust exactly the host key with this
/// SubjectPublicKeyInfo SHA-256.
pub fn client_config(host_key_sha256: [u8; 32]) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(PinnedHostKey {
        spki_sha256: host_key_sha256,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_VKX.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// The server name for [`client_config`] connections.
pub fn host_server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(HOST_SERVER_NAME)
            .unwrap_or_else(|_| unreachable!("a literal valid DNS name"))
            .to_owned(),
    )
}

/// Accepts the host's certificate if its key is the pinned one. Validity
/// dates and names are not checked: the pin is the trust anchor, and a VM
/// at early boot may not know the time.
#[derive(Debug)]
struct PinnedHostKey {
    spki_sha256: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedHostKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let got = spki_sha256(end_entity)
            .map_err(|_| TlsError::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        // A public key's digest, not a secret; constant time all the same,
        // as every digest comparison in the crate.
        let same: bool = subtle::ConstantTimeEq::ct_eq(&got[..], &self.spki_sha256[..]).into();
        if same {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(TlsError::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        // TLS 1.2 is never negotiated (§4.1).
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The transcript's exporter value (§4.5) of an established connection.
pub fn transcript_exporter<D>(
    conn: &rustls::ConnectionCommon<D>,
) -> Result<[u8; TRANSCRIPT_EXPORTER_LEN], TlsError> {
    let mut out = [0u8; TRANSCRIPT_EXPORTER_LEN];
    conn.export_keying_material(&mut out, TRANSCRIPT_EXPORTER_LABEL, None)?;
    Ok(out)
}

/// K of a derived shared key (PROTOCOL.md §9.1): `TLS-Exporter(
/// "EXPORTER-vkx-v1-derive", purpose, length)` of this connection. The
/// same on both ends of one connection, different on any other.
pub fn derive_exporter<D>(
    conn: &rustls::ConnectionCommon<D>,
    purpose: &str,
    length: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, TlsError> {
    let mut key = zeroize::Zeroizing::new(vec![0u8; length]);
    conn.export_keying_material(
        key.as_mut_slice(),
        crate::transcript::DERIVE_EXPORTER_LABEL,
        Some(purpose.as_bytes()),
    )?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    fn node_cert() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![HOST_SERVER_NAME.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
    }

    /// Runs a handshake in memory; returns both connections.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(ClientConnection, ServerConnection), TlsError> {
        let mut c = ClientConnection::new(client, host_server_name())?;
        let mut s = ServerConnection::new(server)?;
        // A TLS 1.3 handshake needs a handful of flights.
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn pinned_host_key_gives_both_sides_the_same_exporter() {
        let (cert, key) = node_cert();
        let pin = spki_sha256(&cert).unwrap();
        let (c, s) = handshake(
            client_config(pin).unwrap(),
            server_config(cert, key).unwrap(),
        )
        .unwrap();
        assert_eq!(c.alpn_protocol(), Some(ALPN_VKX));
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(
            transcript_exporter(&c).unwrap(),
            transcript_exporter(&s).unwrap()
        );
    }

    #[test]
    fn each_connection_has_its_own_exporter() {
        let (cert, key) = node_cert();
        let pin = spki_sha256(&cert).unwrap();
        let server = server_config(cert, key).unwrap();
        let (c1, _) = handshake(client_config(pin).unwrap(), server.clone()).unwrap();
        let (c2, _) = handshake(client_config(pin).unwrap(), server).unwrap();
        assert_ne!(
            transcript_exporter(&c1).unwrap(),
            transcript_exporter(&c2).unwrap()
        );
    }

    #[test]
    fn another_host_key_is_refused() {
        let (cert, key) = node_cert();
        let (other, _) = node_cert();
        let wrong_pin = spki_sha256(&other).unwrap();
        let err = handshake(
            client_config(wrong_pin).unwrap(),
            server_config(cert, key).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::InvalidCertificate(_)), "{err:?}");
    }

    #[test]
    fn only_x25519_and_secp256r1_are_offered_and_accepted() {
        use rustls::crypto::ring::kx_group;
        let (cert, key) = node_cert();
        let pin = spki_sha256(&cert).unwrap();
        let client = client_config(pin).unwrap();
        let server = server_config(cert.clone(), key.clone_key()).unwrap();
        for provider in [client.crypto_provider(), server.crypto_provider()] {
            let groups: Vec<_> = provider.kx_groups.iter().map(|g| g.name()).collect();
            assert_eq!(
                groups,
                [rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1]
            );
        }
        // A client that offers only secp384r1 gets no handshake.
        let p384_only = Arc::new(CryptoProvider {
            kx_groups: vec![kx_group::SECP384R1],
            ..rustls::crypto::ring::default_provider()
        });
        let mut client = ClientConfig::builder_with_provider(p384_only.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedHostKey {
                spki_sha256: pin,
                algorithms: p384_only.signature_verification_algorithms,
            }))
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN_VKX.to_vec()];
        let err = handshake(
            Arc::new(client),
            server_config(cert.clone(), key.clone_key()).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::PeerIncompatible(_)), "{err:?}");
        // A server that offers only secp384r1: the guest gets none either.
        let mut server = ServerConfig::builder_with_provider(p384_only)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        server.alpn_protocols = vec![ALPN_VKX.to_vec()];
        assert!(handshake(client_config(pin).unwrap(), Arc::new(server)).is_err());
    }

    #[test]
    fn a_host_that_selects_no_alpn_is_a_permanent_failure_for_the_guest() {
        let (cert, key) = node_cert();
        let pin = spki_sha256(&cert).unwrap();
        let mut server = (*server_config(cert, key).unwrap()).clone();
        server.alpn_protocols = Vec::new();
        let (c, _) = handshake(client_config(pin).unwrap(), Arc::new(server)).unwrap();
        assert!(
            !negotiated_vkx(&c),
            "rustls lets it through: the guest checks"
        );
        assert!(handshake_failure_is_permanent(&TlsError::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        )));
        assert!(handshake_failure_is_permanent(&TlsError::AlertReceived(
            rustls::AlertDescription::BadCertificate
        )));
        assert!(!handshake_failure_is_permanent(&TlsError::AlertReceived(
            rustls::AlertDescription::HandshakeFailure
        )));
        assert!(offers_vkx(Some([&b"h2"[..], b"vkx"].into_iter())));
        assert!(!offers_vkx(Some([&b"h2"[..]].into_iter())));
        assert!(!offers_vkx(None::<std::iter::Empty<&[u8]>>));
    }

    #[test]
    fn a_peer_without_vkx_alpn_is_refused() {
        let (cert, key) = node_cert();
        let pin = spki_sha256(&cert).unwrap();
        let mut client = (*client_config(pin).unwrap()).clone();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let err = handshake(Arc::new(client), server_config(cert, key).unwrap()).unwrap_err();
        assert!(matches!(err, TlsError::NoApplicationProtocol), "{err:?}");
    }
}
