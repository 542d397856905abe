//! The node's vTPM CA: its key and self-signed certificate in the CA
//! directory ([`ca_init`]), loaded to sign ([`NodeCa`]), and the AK
//! certificate it issues for a VM's AK (subject CN = vm-id, SAN URI
//! `urn:vkx:vm:<vm-id>`).
//!
//! What it trusts: the CA directory is the host's own. Still, a CA file is
//! read through [`crate::fsutil::read_capped`] (a regular file of at most
//! [`MAX_CA_FILE`] bytes), the key must be ECDSA P-256, and the
//! certificate must carry the key. Files are written owner-only and
//! fsynced, never over an existing CA.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::SecureRandom;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::Public;
use vkx_common::tpm::MAX_AK_CERT_NV;

use super::VtpmError;
use crate::fsutil::{self, FsError};

/// Largest CA file read (key or certificate); both are under 1 KiB.
pub const MAX_CA_FILE: u64 = 64 * 1024;

/// The CA's validity: long-lived, as a node's vTPM CA is replaced only by
/// re-provisioning every VM of the node.
const CA_VALIDITY_YEARS: i32 = 20;
/// An AK certificate lives as long as the vTPM state it names.
const AK_CERT_VALIDITY_YEARS: i32 = 10;
/// X.509 serial numbers: 16 random bytes (at most 20 allowed, RFC 5280).
const SERIAL_LEN: usize = 16;

/// File names in the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pk8";
pub const CA_CERT_PEM_FILE: &str = "ca-cert.pem";
pub const CA_CERT_DER_FILE: &str = "ca-cert.der";
/// Subject CN of the node's vTPM CA; the issuer of every AK certificate.
const CA_COMMON_NAME: &str = "vkx node vTPM CA";
const CA_ORGANIZATION: &str = "vkx";

/// Creates the node's vTPM CA in `dir`: an ECDSA P-256 key (PKCS#8 DER,
/// mode 0600) and a self-signed CA certificate (PEM and DER). Refuses to
/// overwrite an existing CA.
pub fn ca_init(dir: &Path) -> Result<(), VtpmError> {
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(VtpmError::CaExists {
            dir: dir.to_path_buf(),
        });
    }
    fsutil::create_private_dirs(dir).map_err(|source| {
        VtpmError::CaWrite(FsError::Io {
            path: dir.to_path_buf(),
            source,
        })
    })?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
        VtpmError::CaInvalid {
            dir: dir.to_path_buf(),
            reason: format!("key generation failed: {e}"),
        }
    })?;
    let cert = ca_params(dir)?
        .self_signed(&key)
        .map_err(|e| VtpmError::CaInvalid {
            dir: dir.to_path_buf(),
            reason: format!("self-signing failed: {e}"),
        })?;
    fsutil::write_new(&key_path, &key.serialize_der()).map_err(VtpmError::CaWrite)?;
    fsutil::write_new(&dir.join(CA_CERT_DER_FILE), cert.der()).map_err(VtpmError::CaWrite)?;
    fsutil::write_new(&dir.join(CA_CERT_PEM_FILE), cert.pem().as_bytes())
        .map_err(VtpmError::CaWrite)?;
    Ok(())
}

/// The CA's certificate parameters. Deterministic (apart from validity
/// and serial) so that provisioning can rebuild the issuer's name without
/// parsing the certificate.
fn ca_params(dir: &Path) -> Result<CertificateParams, VtpmError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut p, CA_VALIDITY_YEARS);
    p.serial_number = Some(random_serial().map_err(|reason| VtpmError::CaInvalid {
        dir: dir.to_path_buf(),
        reason,
    })?);
    Ok(p)
}

fn ca_name() -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    dn
}

/// Valid from 1 January of last year (no clock-skew surprises at new year)
/// for `years` years.
pub(crate) fn set_validity(p: &mut CertificateParams, years: i32) {
    // Average Gregorian year: exact enough for a date that is then moved
    // back a whole year.
    const SECS_PER_YEAR: u64 = 31_556_952;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let year = 1970 + i32::try_from(secs / SECS_PER_YEAR).unwrap_or(0);
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

pub(crate) fn random_serial() -> Result<SerialNumber, String> {
    let mut serial = [0u8; SERIAL_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| "the system random generator failed".to_string())?;
    // Positive and without a leading zero byte: a canonical DER INTEGER
    // of exactly SERIAL_LEN bytes.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&serial))
}

/// The node CA, loaded for signing.
pub(super) struct NodeCa {
    key: KeyPair,
}

impl NodeCa {
    pub(super) fn load(dir: &Path) -> Result<Self, VtpmError> {
        let key_der = read_ca_file(dir, CA_KEY_FILE)?;
        let cert_der = read_ca_file(dir, CA_CERT_DER_FILE)?;
        let key = KeyPair::try_from(key_der.as_slice()).map_err(|e| VtpmError::CaInvalid {
            dir: dir.to_path_buf(),
            reason: format!("{CA_KEY_FILE} is not a PKCS#8 key: {e}"),
        })?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(VtpmError::CaInvalid {
                dir: dir.to_path_buf(),
                reason: format!("{CA_KEY_FILE} is not an ECDSA P-256 key"),
            });
        }
        // The certificate must carry this key (its SPKI): a cheap check that
        // key and certificate belong together without an X.509 parser.
        let spki = key.subject_public_key_info();
        if !cert_der.windows(spki.len()).any(|w| w == spki.as_slice()) {
            return Err(VtpmError::CaInvalid {
                dir: dir.to_path_buf(),
                reason: format!("{CA_CERT_DER_FILE} does not hold the public key of {CA_KEY_FILE}"),
            });
        }
        Ok(Self { key })
    }

    /// Issues the AK certificate of `vm_id`: subject CN = vm-id, SAN URI
    /// `urn:vkx:vm:<vm-id>`, the AK as SubjectPublicKeyInfo.
    pub(super) fn issue_ak_cert(&self, vm_id: &str, ak: &Public) -> Result<Vec<u8>, VtpmError> {
        let issue = |reason: String| VtpmError::CertIssue { reason };
        let ak_key = TpmPublicKey::from_public(ak).map_err(issue)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, vm_id);
        p.distinguished_name = dn;
        let uri = format!("urn:vkx:vm:{vm_id}");
        p.subject_alt_names = vec![SanType::URI(
            uri.try_into().map_err(|e| issue(format!("SAN URI: {e}")))?,
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        set_validity(&mut p, AK_CERT_VALIDITY_YEARS);
        p.serial_number = Some(random_serial().map_err(issue)?);
        let mut ca = CertificateParams::default();
        ca.distinguished_name = ca_name();
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = Issuer::new(ca, &self.key);
        let cert = p
            .signed_by(&ak_key, &issuer)
            .map_err(|e| issue(e.to_string()))?;
        let der = cert.der().to_vec();
        if der.len() > MAX_AK_CERT_NV {
            return Err(VtpmError::CertTooLarge { len: der.len() });
        }
        Ok(der)
    }
}

/// Reads a file of the CA directory: at most [`MAX_CA_FILE`] bytes of a
/// regular file. One that cannot be read is missing; one too large, or
/// not a regular file, is unusable.
fn read_ca_file(dir: &Path, name: &str) -> Result<Vec<u8>, VtpmError> {
    fsutil::read_capped(&dir.join(name), MAX_CA_FILE).map_err(|e| match e {
        FsError::TooLarge { .. } | FsError::NotAFile { .. } => VtpmError::CaInvalid {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        },
        source => VtpmError::CaMissing {
            dir: dir.to_path_buf(),
            source,
        },
    })
}

/// A TPM public key as rcgen's subject key.
struct TpmPublicKey {
    /// EC: the uncompressed point; RSA: DER RSAPublicKey (PKCS#1).
    key_bytes: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl TpmPublicKey {
    fn from_public(public: &Public) -> Result<Self, String> {
        match public {
            Public::Ecc {
                parameters, unique, ..
            } => {
                if parameters.ecc_curve() != EccCurve::NistP256 {
                    return Err("AK is not on curve P-256".into());
                }
                let (x, y) = (unique.x().value(), unique.y().value());
                if x.len() != 32 || y.len() != 32 {
                    return Err("AK point coordinates are not 32 bytes".into());
                }
                let mut key_bytes = Vec::with_capacity(65);
                key_bytes.push(0x04);
                key_bytes.extend_from_slice(x);
                key_bytes.extend_from_slice(y);
                Ok(Self {
                    key_bytes,
                    alg: &rcgen::PKCS_ECDSA_P256_SHA256,
                })
            }
            Public::Rsa {
                parameters, unique, ..
            } => {
                let exponent = match parameters.exponent().value() {
                    0 => 65_537,
                    e => e,
                };
                Ok(Self {
                    key_bytes: der_rsa_public_key(unique.value(), exponent),
                    alg: &rcgen::PKCS_RSA_SHA256,
                })
            }
            _ => Err("AK is neither ECC nor RSA".into()),
        }
    }
}

impl PublicKeyData for TpmPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key_bytes
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// DER of PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER,
/// publicExponent INTEGER }`.
pub(super) fn der_rsa_public_key(modulus: &[u8], exponent: u32) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, be: &[u8]) {
        let trimmed = match be.iter().position(|&b| b != 0) {
            Some(i) => &be[i..],
            None => &[0u8][..],
        };
        let pad = trimmed[0] & 0x80 != 0;
        out.push(0x02);
        length(out, trimmed.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(trimmed);
    }
    fn length(out: &mut Vec<u8>, len: usize) {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        match u8::try_from(len) {
            Ok(short) if short < 0x80 => out.push(short),
            _ => {
                // A usize has at most 16 bytes, so the count fits in 7 bits.
                let count = u8::try_from(bytes.len() - skip).unwrap_or(0x7f);
                out.push(0x80 | count);
                out.extend_from_slice(&bytes[skip..]);
            }
        }
    }
    let mut body = Vec::with_capacity(modulus.len() + 16);
    integer(&mut body, modulus);
    integer(&mut body, &exponent.to_be_bytes());
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(0x30);
    length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}
