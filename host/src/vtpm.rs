//! vTPM provisioning: the node's vTPM CA, and the EK, AK and AK certificate
//! a VM's vTPM gets before the VM first boots.
//!
//! What it trusts: the TPM behind the TCTI is the vTPM this host just
//! created for the VM (swtpm state the host owns, before the guest runs),
//! with empty owner auth, and empty endorsement and lockout auth unless
//! this code set them (their values are then in [`crate::vtpm_auth`]). It
//! does not trust what it finds already in the vTPM: an existing AK or EK
//! must be exactly the key this code derives, and must not be recorded for
//! another VM.
//!
//! Who may use the AK (PROTOCOL.md §7.6, §15.7). The AK is created with a
//! random authValue that only the host and the guest agent know (the
//! agent's `ak_auth_file`), so a process in the guest that can open the
//! TPM but not that file cannot quote with it. Two more settings keep that
//! true: the endorsement hierarchy gets an authValue the host keeps (or
//! anyone could derive the same primary AK again, under an authValue of
//! their own), and the lockout hierarchy too, with `disableClear` set under
//! it (TPM2_Clear would reset the endorsement auth, and the counters rewind
//! detection compares, §15.8). The owner hierarchy stays open: the guest's
//! own TPM users need it, and the AK certificate's NV index is read under
//! it; what the owner can do to the AK (evict it, disable the endorsement
//! hierarchy until the next boot) denies service and proves nothing.
//! The AK has noDA: its authValue is 256 random bits, which no dictionary
//! attack guesses, and without noDA any process that can open the TPM
//! could lock the agent out (a few wrong tries put DA-protected objects in
//! lockout, on swtpm after 3). noDA is part of the template, so it changed
//! the AK (its name, the registry's `ak_public`/`ak_name`, the
//! certificate). A vTPM provisioned before (the AK without noDA and with an
//! empty authValue, hierarchies open) keeps working, with neither
//! protection, until provisioning runs again while the VM is stopped: the
//! run recognises the old AK (it derives the old template too), evicts
//! it, persists the new one, closes the hierarchies, and rewrites the
//! certificate and the registry entry ([`ProvisionAction::AkReplaced`]).
//!
//! AK design. The AK is a *primary* key in the endorsement hierarchy, made
//! from a fixed template (restricted, sign-only, fixedTPM, fixedParent,
//! sensitiveDataOrigin; ECC P-256/ECDSA-SHA256 or RSA-2048/RSASSA-SHA256).
//! Primaries are derived from the hierarchy seed (the EPS) and the
//! template, so re-deriving it on a re-run yields the same key: that is how
//! a re-run recognises "our" AK, also after a crash before the registry
//! write. Credential activation (TPM2_ActivateCredential against the EK)
//! proves to a *remote* verifier that an AK lives in the same TPM as a
//! certified EK; here the verifier is the host that created the vTPM and
//! talked to it over a channel it controls before any guest code ran, so
//! that proof adds nothing: the host records the AK it saw created, and the
//! restricted attribute guarantees the AK signs only TPM-generated
//! attestation data (quotes), never a digest a guest chose.
//!
//! NV layout: index [`AK_CERT_NV_INDEX`] (ordinary, owner read/write, size
//! = certificate length) holds the DER AK certificate; written in chunks of
//! at most [`MAX_NV_CHUNK`] bytes (or the TPM's NV buffer size, if less).
//!
//! Bounds: the certificate is at most [`MAX_AK_CERT_NV`] bytes; the CA key
//! file at most [`MAX_CA_FILE`] bytes is read.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::SecureRandom;
use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
use tss_esapi::abstraction::ek::create_ek_public_from_default_template_2;
use tss_esapi::attributes::{NvIndexAttributesBuilder, ObjectAttributesBuilder};
use tss_esapi::constants::PropertyTag;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{
    AuthHandle, KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle,
    TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, MaxNvBuffer,
    NvPublicBuilder, Public, PublicBuffer, PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa,
    PublicRsaParametersBuilder, RsaExponent, RsaScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, Error as TssError};
use vkx_common::tpm::{
    AK_CERT_NV_INDEX, AK_PERSISTENT_HANDLE, EK_ECC_PERSISTENT_HANDLE, EK_RSA_PERSISTENT_HANDLE,
    MAX_AK_CERT_NV,
};

use crate::registry::{self, EkAlg, Registry, RegistryEntry, RegistryError};
use crate::vtpm_auth::{AUTH_LEN, AuthStore, AuthStoreError, VtpmAuth};
use vkx_common::tss::{TssFault, classify, describe, handle_exists, retry_transient};

/// NV writes go in chunks of at most this size: TPM2_NV_Write takes one
/// TPM2B_MAX_NV_BUFFER, which PC-client TPMs size at 512..1024 bytes.
pub const MAX_NV_CHUNK: usize = 512;

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

/// Errors of CA set-up and provisioning, by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VtpmError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("vTPM authorisation values: {0}")]
    AuthStore(#[from] AuthStoreError),
    #[error(
        "this vTPM's endorsement or lockout hierarchy has an authorisation value, but the host holds none for vm {vm_id} (in {}): it was set up by something else, or the host's copy was lost; provision a fresh vTPM",
        dir.display()
    )]
    HierarchyAuthUnknown { vm_id: String, dir: PathBuf },
    #[error("a vTPM CA already exists in {}: it signed every AK certificate of this node; remove it deliberately if you mean to start over", dir.display())]
    CaExists { dir: PathBuf },
    #[error("no vTPM CA in {}: {source} (create one with `vkx-host vtpm ca-init --dir {}`)", dir.display(), dir.display())]
    CaMissing { dir: PathBuf, source: io::Error },
    #[error("vTPM CA in {} is unusable: {reason}", dir.display())]
    CaInvalid { dir: PathBuf, reason: String },
    #[error("writing the vTPM CA to {}: {source}", path.display())]
    CaWrite { path: PathBuf, source: io::Error },
    #[error(
        "invalid TCTI {tcti:?}: {detail} (examples: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`)"
    )]
    InvalidTcti { tcti: String, detail: String },
    #[error(
        "cannot open the TPM at {tcti:?}: {detail} (is swtpm running / does the device exist?)"
    )]
    TpmUnavailable { tcti: String, detail: String },
    #[error("TPM command {op} failed: {detail}")]
    Tpm { op: &'static str, detail: String },
    #[error(
        "this vTPM's AK (persistent handle {AK_PERSISTENT_HANDLE:#010x}) is recorded for vm {other_vm}, not {vm_id}: provision a fresh vTPM for {vm_id}, never reuse another VM's vTPM state"
    )]
    AkOfOtherVm { vm_id: String, other_vm: String },
    #[error(
        "the registry already has vm {vm_id} with a different AK (name {recorded_ak_name}, ek {recorded_ek_alg}): this is another vTPM, or a re-run with a different --ek; remove the registry entry only if the VM's old vTPM was destroyed"
    )]
    VmOnOtherVtpm {
        vm_id: String,
        recorded_ak_name: String,
        recorded_ek_alg: &'static str,
    },
    #[error(
        "persistent handle {handle:#010x} holds a key that vkx provisioning did not make ({what}): this vTPM was set up by something else; evict it (`tpm2_evictcontrol -C o -c {handle:#010x}`) only if you are sure it is unused"
    )]
    ForeignObject { handle: u32, what: &'static str },
    #[error("AK certificate of {len} bytes is larger than the NV limit of {MAX_AK_CERT_NV} bytes")]
    CertTooLarge { len: usize },
    #[error("issuing the AK certificate failed: {reason}")]
    CertIssue { reason: String },
}

fn tpm_err(op: &'static str) -> impl FnOnce(TssError) -> VtpmError {
    move |e| VtpmError::Tpm {
        op,
        detail: describe(&e),
    }
}

// ------------------------------------------------------------------ CA

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
    crate::fsutil::create_private_dirs(dir).map_err(|source| VtpmError::CaWrite {
        path: dir.to_path_buf(),
        source,
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
    write_new(&key_path, &key.serialize_der())?;
    write_new(&dir.join(CA_CERT_DER_FILE), cert.der())?;
    write_new(&dir.join(CA_CERT_PEM_FILE), cert.pem().as_bytes())?;
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), VtpmError> {
    let err = |source| VtpmError::CaWrite {
        path: path.to_path_buf(),
        source,
    };
    let mut f = crate::fsutil::create_private_file(path).map_err(err)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(err)
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
struct NodeCa {
    key: KeyPair,
}

impl NodeCa {
    fn load(dir: &Path) -> Result<Self, VtpmError> {
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
    fn issue_ak_cert(&self, vm_id: &str, ak: &Public) -> Result<Vec<u8>, VtpmError> {
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

fn read_ca_file(dir: &Path, name: &str) -> Result<Vec<u8>, VtpmError> {
    let path = dir.join(name);
    let file = fs::File::open(&path).map_err(|source| VtpmError::CaMissing {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    file.take(MAX_CA_FILE + 1)
        .read_to_end(&mut out)
        .map_err(|source| VtpmError::CaMissing {
            dir: dir.to_path_buf(),
            source,
        })?;
    if out.len() as u64 > MAX_CA_FILE {
        return Err(VtpmError::CaInvalid {
            dir: dir.to_path_buf(),
            reason: format!("{name} is larger than {MAX_CA_FILE} bytes"),
        });
    }
    Ok(out)
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
fn der_rsa_public_key(modulus: &[u8], exponent: u32) -> Vec<u8> {
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

// ------------------------------------------------------------ provision

/// What `provision` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionAction {
    /// EK, AK, certificate and registry entry were created.
    Created,
    /// Everything was already in place and matched the registry.
    AlreadyProvisioned,
    /// The AK matched the registry but the NV certificate was missing or
    /// different: a fresh certificate was written.
    CertificateRewritten,
    /// The vTPM held the AK of the old template (no noDA, no authValue):
    /// it was replaced, with a new certificate and registry entry.
    AkReplaced,
}

/// The result of `provision`, with timings of the TPM work.
#[derive(Debug, Clone)]
pub struct ProvisionOutcome {
    pub action: ProvisionAction,
    /// The AK authValue, hex, for the guest's `ak_auth_file` (mode 0600).
    pub ak_auth_file: PathBuf,
    /// This run set the AK's authValue, the endorsement and lockout auth
    /// or disableClear (a new vTPM, or one provisioned before they were).
    pub hardened_now: bool,
    pub ak_name: Vec<u8>,
    pub ek_create: Duration,
    pub ak_create: Duration,
}

/// Provisions the vTPM at `tcti` for `vm_id`: EK and AK persistent, AK
/// certificate in NV, registry entry written. Idempotent; see the module
/// documentation for what it refuses.
pub fn provision(
    tcti: &str,
    vm_id: &str,
    registry_dir: &Path,
    ca_dir: &Path,
    ek_alg: EkAlg,
) -> Result<ProvisionOutcome, VtpmError> {
    let vm = registry::validate_vm_id(vm_id)?;
    let vm_id = vm.as_str();
    let registry = Registry::open(registry_dir)?;
    let ca = NodeCa::load(ca_dir)?;
    let store = AuthStore::new(registry_dir);
    let mut ctx = open_context(tcti)?;

    // The authorisation values: the host's, or new ones for a vTPM whose
    // hierarchies are still open.
    let hardening = Hardening::read(&mut ctx)?;
    let (auth, auth_is_new) = match store.load(vm_id)? {
        Some(auth) => (auth, false),
        None if hardening.endorsement_auth || hardening.lockout_auth => {
            // Most likely another VM's vTPM: say so if the registry knows.
            if let Some(name) = read_persistent_name(&mut ctx, AK_PERSISTENT_HANDLE)?
                && let Some(other) = registry.by_ak_name(&name)?
                && other.vm_id != vm_id
            {
                return Err(VtpmError::AkOfOtherVm {
                    vm_id: vm_id.into(),
                    other_vm: other.vm_id,
                });
            }
            return Err(VtpmError::HierarchyAuthUnknown {
                vm_id: vm_id.into(),
                dir: store.dir().to_path_buf(),
            });
        }
        None => (VtpmAuth::generate()?, true),
    };
    if hardening.endorsement_auth {
        set_hierarchy_auth(&mut ctx, ObjectHandle::Endorsement, &auth.endorsement)?;
    }
    if hardening.lockout_auth {
        set_hierarchy_auth(&mut ctx, ObjectHandle::Lockout, &auth.lockout)?;
    }

    // Derive both keys; nothing is changed in the TPM before every check
    // has passed.
    let started = Instant::now();
    let ek = create_primary(&mut ctx, ek_template(ek_alg)?, None, "CreatePrimary (EK)")?;
    let ek_create = started.elapsed();
    let started = Instant::now();
    let ak = create_primary(
        &mut ctx,
        ak_template(ek_alg)?,
        Some(auth_value(&auth.ak)?),
        "CreatePrimary (AK)",
    )?;
    let ak_create = started.elapsed();
    let keys = Keys {
        ek_alg,
        ek: &ek,
        ak: &ak,
    };
    let auth = NewAuth {
        store: &store,
        auth: &auth,
        is_new: auth_is_new,
        hardening,
    };
    let result = provision_with_keys(&mut ctx, &registry, &ca, vm_id, &keys, &auth);
    // Persisting made copies; the transient objects go either way.
    let _ = ctx.flush_context(ObjectHandle::from(ek.handle));
    let _ = ctx.flush_context(ObjectHandle::from(ak.handle));
    let (action, ak_auth_file) = result?;
    Ok(ProvisionOutcome {
        action,
        ak_auth_file,
        hardened_now: !hardening.complete(),
        ak_name: ak.name,
        ek_create,
        ak_create,
    })
}

/// TPMA_PERMANENT bits (TPM 2.0 Part 2, 8.6), read with TPM_PT_PERMANENT.
const PERMANENT_ENDORSEMENT_AUTH_SET: u32 = 1 << 1;
const PERMANENT_LOCKOUT_AUTH_SET: u32 = 1 << 2;
const PERMANENT_DISABLE_CLEAR: u32 = 1 << 8;

/// What of the hardening a vTPM already has.
#[derive(Debug, Clone, Copy)]
struct Hardening {
    endorsement_auth: bool,
    lockout_auth: bool,
    disable_clear: bool,
}

impl Hardening {
    fn read(ctx: &mut Context) -> Result<Self, VtpmError> {
        let bits = retry_transient(|| ctx.get_tpm_property(PropertyTag::Permanent))
            .map_err(tpm_err("GetCapability (TPM_PT_PERMANENT)"))?
            .ok_or_else(|| VtpmError::Tpm {
                op: "GetCapability (TPM_PT_PERMANENT)",
                detail: "the TPM did not report TPM_PT_PERMANENT".into(),
            })?;
        Ok(Self {
            endorsement_auth: bits & PERMANENT_ENDORSEMENT_AUTH_SET != 0,
            lockout_auth: bits & PERMANENT_LOCKOUT_AUTH_SET != 0,
            disable_clear: bits & PERMANENT_DISABLE_CLEAR != 0,
        })
    }

    /// Set in the order [`harden`] sets them, after the AK was persisted
    /// with its authValue: all three set means the AK has it too.
    fn complete(self) -> bool {
        self.endorsement_auth && self.lockout_auth && self.disable_clear
    }
}

fn auth_value(value: &[u8; AUTH_LEN]) -> Result<Auth, VtpmError> {
    Auth::try_from(value.to_vec()).map_err(tpm_err("authValue"))
}

fn set_hierarchy_auth(
    ctx: &mut Context,
    hierarchy: ObjectHandle,
    value: &[u8; AUTH_LEN],
) -> Result<(), VtpmError> {
    let auth = auth_value(value)?;
    ctx.tr_set_auth(hierarchy, auth)
        .map_err(tpm_err("Esys_TR_SetAuth"))
}

/// Sets what is missing, in this order: endorsement auth, lockout auth,
/// disableClear (under the lockout auth).
fn harden(ctx: &mut Context, auth: &VtpmAuth, was: Hardening) -> Result<(), VtpmError> {
    if !was.endorsement_auth {
        let new = auth_value(&auth.endorsement)?;
        authorized(ctx, |ctx| {
            ctx.hierarchy_change_auth(AuthHandle::Endorsement, new.clone())
        })
        .map_err(tpm_err("HierarchyChangeAuth (endorsement)"))?;
        set_hierarchy_auth(ctx, ObjectHandle::Endorsement, &auth.endorsement)?;
    }
    if !was.lockout_auth {
        let new = auth_value(&auth.lockout)?;
        authorized(ctx, |ctx| {
            ctx.hierarchy_change_auth(AuthHandle::Lockout, new.clone())
        })
        .map_err(tpm_err("HierarchyChangeAuth (lockout)"))?;
        set_hierarchy_auth(ctx, ObjectHandle::Lockout, &auth.lockout)?;
    }
    if !was.disable_clear {
        authorized(ctx, |ctx| ctx.clear_control(AuthHandle::Lockout, true))
            .map_err(tpm_err("ClearControl (disableClear)"))?;
    }
    Ok(())
}

/// The keys derived for this run.
struct Keys<'a> {
    ek_alg: EkAlg,
    ek: &'a DerivedKey,
    ak: &'a DerivedKey,
}

/// The authorisation values of this run and what the vTPM already has.
struct NewAuth<'a> {
    store: &'a AuthStore,
    auth: &'a VtpmAuth,
    /// Generated by this run: not yet in the store.
    is_new: bool,
    hardening: Hardening,
}

struct DerivedKey {
    handle: KeyHandle,
    public: Public,
    name: Vec<u8>,
}

fn provision_with_keys(
    ctx: &mut Context,
    registry: &Registry,
    ca: &NodeCa,
    vm_id: &str,
    keys: &Keys<'_>,
    auth: &NewAuth<'_>,
) -> Result<(ProvisionAction, PathBuf), VtpmError> {
    let Keys { ek_alg, ek, ak } = *keys;
    let ak_name_hex = hex::encode(&ak.name);
    // 1. The registry: this AK must not be another VM's, and this VM must
    //    not already have another AK.
    if let Some(other) = registry.by_ak_name(&ak.name)?
        && other.vm_id != vm_id
    {
        return Err(VtpmError::AkOfOtherVm {
            vm_id: vm_id.into(),
            other_vm: other.vm_id,
        });
    }
    let recorded = registry.by_vm_id(vm_id)?;
    // The old template's AK of this vTPM, derived only when needed.
    let mut legacy = None;
    if let Some(r) = &recorded
        && !r.ak_name.eq_ignore_ascii_case(&ak_name_hex)
        && !r
            .ak_name
            .eq_ignore_ascii_case(&hex::encode(legacy_ak_name(ctx, ek_alg, &mut legacy)?))
    {
        return Err(VtpmError::VmOnOtherVtpm {
            vm_id: vm_id.into(),
            recorded_ak_name: r.ak_name.clone(),
            recorded_ek_alg: r.ek_alg.as_str(),
        });
    }
    // 2. What the vTPM already holds at the persistent handles.
    let persisted_ak = read_persistent_name(ctx, AK_PERSISTENT_HANDLE)?;
    if let Some(name) = &persisted_ak
        && *name != ak.name
        && *name == legacy_ak_name(ctx, ek_alg, &mut legacy)?
    {
        // The old template's AK: replaced below, unless another VM's.
        if let Some(other) = registry.by_ak_name(name)?
            && other.vm_id != vm_id
        {
            return Err(VtpmError::AkOfOtherVm {
                vm_id: vm_id.into(),
                other_vm: other.vm_id,
            });
        }
    } else if let Some(name) = &persisted_ak
        && *name != ak.name
    {
        // Maybe a vkx AK of the other algorithm, recorded for a VM.
        if let Some(other) = registry.by_ak_name(name)? {
            if other.vm_id != vm_id {
                return Err(VtpmError::AkOfOtherVm {
                    vm_id: vm_id.into(),
                    other_vm: other.vm_id,
                });
            }
            return Err(VtpmError::VmOnOtherVtpm {
                vm_id: vm_id.into(),
                recorded_ak_name: other.ak_name,
                recorded_ek_alg: other.ek_alg.as_str(),
            });
        }
        return Err(VtpmError::ForeignObject {
            handle: AK_PERSISTENT_HANDLE,
            what: "not the vkx AK of this vTPM",
        });
    }
    let ek_handle = ek_persistent_handle(ek_alg);
    let persisted_ek = read_persistent_name(ctx, ek_handle)?;
    if let Some(name) = &persisted_ek
        && *name != ek.name
    {
        return Err(VtpmError::ForeignObject {
            handle: ek_handle,
            what: "not the TCG default-template EK of this vTPM",
        });
    }
    // 3. The authorisation values are on disk before the TPM holds them.
    if auth.is_new {
        auth.store.create(vm_id, auth.auth)?;
    }
    let ak_auth_file = auth.store.write_ak_auth(vm_id, auth.auth)?;
    // 4. Make keys persistent where missing. Until the hardening is
    //    complete, a persisted AK may be the old template's, or lack its
    //    authValue (an interrupted run): persist it again from the
    //    transient copy, made with the authValue.
    if persisted_ek.is_none() {
        persist(ctx, ek.handle, ek_handle, "EvictControl (EK)")?;
    }
    let ak_in_place =
        persisted_ak.as_deref() == Some(ak.name.as_slice()) && auth.hardening.complete();
    if persisted_ak.is_some() && !ak_in_place {
        evict_persistent(ctx, AK_PERSISTENT_HANDLE, "EvictControl (evict old AK)")?;
    }
    if !ak_in_place {
        persist(ctx, ak.handle, AK_PERSISTENT_HANDLE, "EvictControl (AK)")?;
    }
    harden(ctx, auth.auth, auth.hardening)?;
    let action = certificate_and_entry(ctx, ca, registry, recorded, vm_id, keys)?;
    Ok((action, ak_auth_file))
}

/// Step 5 of provisioning: the certificate in NV, and the registry entry.
fn certificate_and_entry(
    ctx: &mut Context,
    ca: &NodeCa,
    registry: &Registry,
    recorded: Option<RegistryEntry>,
    vm_id: &str,
    keys: &Keys<'_>,
) -> Result<ProvisionAction, VtpmError> {
    let Keys { ek_alg, ek, ak } = *keys;
    let ak_name_hex = hex::encode(&ak.name);
    // 5. The certificate in NV, and the registry entry.
    let stored_cert = read_nv_cert(ctx)?;
    if let Some(r) = &recorded
        && !r.ak_name.eq_ignore_ascii_case(&ak_name_hex)
    {
        // Recorded with the old template's AK (step 1 checked it is this
        // vTPM's): the new AK, its certificate, the same VM.
        let cert = ca.issue_ak_cert(vm_id, &ak.public)?;
        write_nv_cert(ctx, &cert, stored_cert.is_some())?;
        let entry = RegistryEntry {
            ak_public: hex::encode(marshal_tpm2b_public(&ak.public)?),
            ak_name: ak_name_hex,
            ak_cert_sha256: sha256_hex(&cert),
            ..r.clone()
        };
        registry.replace(&entry)?;
        return Ok(ProvisionAction::AkReplaced);
    }
    if let Some(r) = recorded {
        let matches = stored_cert.as_deref().is_some_and(|c| {
            hex::encode(ring::digest::digest(&ring::digest::SHA256, c)) == r.ak_cert_sha256
        });
        if matches {
            return Ok(ProvisionAction::AlreadyProvisioned);
        }
        let cert = ca.issue_ak_cert(vm_id, &ak.public)?;
        write_nv_cert(ctx, &cert, stored_cert.is_some())?;
        let entry = RegistryEntry {
            ak_cert_sha256: sha256_hex(&cert),
            ..r
        };
        registry.replace(&entry)?;
        return Ok(ProvisionAction::CertificateRewritten);
    }
    let cert = ca.issue_ak_cert(vm_id, &ak.public)?;
    write_nv_cert(ctx, &cert, stored_cert.is_some())?;
    let entry = RegistryEntry {
        vm_id: vm_id.into(),
        ek_alg,
        ek_public: hex::encode(marshal_tpm2b_public(&ek.public)?),
        ak_public: hex::encode(marshal_tpm2b_public(&ak.public)?),
        ak_name: ak_name_hex,
        ak_cert_sha256: sha256_hex(&cert),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        last_quote: None,
    };
    registry.insert(&entry)?;
    Ok(ProvisionAction::Created)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

pub fn ek_persistent_handle(alg: EkAlg) -> u32 {
    match alg {
        EkAlg::Ecc => EK_ECC_PERSISTENT_HANDLE,
        EkAlg::Rsa => EK_RSA_PERSISTENT_HANDLE,
    }
}

/// Opens a TPM context for a TCTI string such as `device:/dev/tpmrm0` or
/// `swtpm:host=127.0.0.1,port=2321`.
pub fn open_context(tcti: &str) -> Result<Context, VtpmError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|e| VtpmError::InvalidTcti {
        tcti: tcti.into(),
        detail: e.to_string(),
    })?;
    Context::new(conf).map_err(|e| VtpmError::TpmUnavailable {
        tcti: tcti.into(),
        detail: describe(&e),
    })
}

/// The TCG EK Credential Profile default template (low range: RSA-2048
/// or ECC P-256), as `tpm2_createek` uses it.
fn ek_template(alg: EkAlg) -> Result<Public, VtpmError> {
    let selection = match alg {
        EkAlg::Ecc => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        EkAlg::Rsa => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
    };
    create_ek_public_from_default_template_2(selection, None).map_err(tpm_err("EK template"))
}

/// The AK template: a restricted signing key that can only sign
/// TPM-generated data, bound to this TPM, exempt from dictionary-attack
/// lockout (see the module documentation).
pub fn ak_template(alg: EkAlg) -> Result<Public, VtpmError> {
    ak_template_with(alg, true)
}

/// The AK template of vTPMs provisioned before the AK had an authValue:
/// the same without noDA. Provisioning derives it only to recognise such
/// an AK and replace it.
pub fn legacy_ak_template(alg: EkAlg) -> Result<Public, VtpmError> {
    ak_template_with(alg, false)
}

fn ak_template_with(alg: EkAlg, no_da: bool) -> Result<Public, VtpmError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(no_da)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .build()
        .map_err(tpm_err("AK template"))?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes);
    let public = match alg {
        EkAlg::Ecc => builder
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(true)
                    .with_is_decryption_key(false)
                    .with_restricted(true)
                    .build()
                    .map_err(tpm_err("AK template"))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build(),
        EkAlg::Rsa => builder
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_scheme(RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_key_bits(RsaKeyBits::Rsa2048)
                    .with_exponent(RsaExponent::default())
                    .with_is_signing_key(true)
                    .with_is_decryption_key(false)
                    .with_restricted(true)
                    .build()
                    .map_err(tpm_err("AK template"))?,
            )
            .with_rsa_unique_identifier(PublicKeyRsa::default())
            .build(),
    };
    public.map_err(tpm_err("AK template"))
}

fn create_primary(
    ctx: &mut Context,
    template: Public,
    auth_value: Option<Auth>,
    op: &'static str,
) -> Result<DerivedKey, VtpmError> {
    let created = authorized(ctx, |ctx| {
        ctx.create_primary(
            Hierarchy::Endorsement,
            template.clone(),
            auth_value.clone(),
            None,
            None,
            None,
        )
    })
    .map_err(tpm_err(op))?;
    let (public, name, _) =
        retry_transient(|| ctx.read_public(created.key_handle)).map_err(tpm_err("ReadPublic"))?;
    Ok(DerivedKey {
        handle: created.key_handle,
        public,
        name: name.value().to_vec(),
    })
}

/// The name of the AK the old template (no noDA) gives in this vTPM,
/// derived once per run and kept in `cache`.
fn legacy_ak_name<'a>(
    ctx: &mut Context,
    alg: EkAlg,
    cache: &'a mut Option<Vec<u8>>,
) -> Result<&'a [u8], VtpmError> {
    if cache.is_none() {
        let old = create_primary(
            ctx,
            legacy_ak_template(alg)?,
            None,
            "CreatePrimary (old AK template)",
        )?;
        let _ = ctx.flush_context(ObjectHandle::from(old.handle));
        *cache = Some(old.name);
    }
    Ok(cache.as_deref().unwrap_or_default())
}

/// The TPM name of the object at a persistent handle, or `None` if the
/// handle is empty.
fn read_persistent_name(ctx: &mut Context, handle: u32) -> Result<Option<Vec<u8>>, VtpmError> {
    let tpm_handle = PersistentTpmHandle::new(handle).map_err(tpm_err("persistent handle"))?;
    if !handle_exists(ctx, handle).map_err(tpm_err("GetCapability (handles)"))? {
        return Ok(None);
    }
    let object = match retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)))
    {
        Ok(o) => o,
        Err(e) if is_absent(&e) => return Ok(None),
        Err(e) => return Err(tpm_err("ReadPublic (persistent)")(e)),
    };
    let read = retry_transient(|| ctx.read_public(KeyHandle::from(object)));
    let mut object = object;
    let _ = ctx.tr_close(&mut object);
    let (_, name, _) = read.map_err(tpm_err("ReadPublic (persistent)"))?;
    Ok(Some(name.value().to_vec()))
}

/// TPM_RC_HANDLE (or TPM_RC_VALUE for an NV index): nothing is there.
fn is_absent(e: &TssError) -> bool {
    matches!(
        classify(e),
        TssFault::Tpm(Tss2ResponseCodeKind::Handle | Tss2ResponseCodeKind::Value)
    )
}

/// Runs a command that needs hierarchy authorization (a password session
/// with the value set on the hierarchy's ESYS_TR: empty for the owner),
/// with the bounded retry of transient TPM refusals.
fn authorized<T>(
    ctx: &mut Context,
    mut command: impl FnMut(&mut Context) -> tss_esapi::Result<T>,
) -> tss_esapi::Result<T> {
    retry_transient(|| ctx.execute_with_session(Some(AuthSession::Password), &mut command))
}

fn persist(
    ctx: &mut Context,
    key: KeyHandle,
    handle: u32,
    op: &'static str,
) -> Result<(), VtpmError> {
    let persistent = PersistentTpmHandle::new(handle).map_err(tpm_err(op))?;
    authorized(ctx, |ctx| {
        ctx.evict_control(
            Provision::Owner,
            ObjectHandle::from(key),
            Persistent::Persistent(persistent),
        )
    })
    .map_err(tpm_err(op))?;
    Ok(())
}

/// Removes the persistent object at `handle` (owner authorization).
fn evict_persistent(ctx: &mut Context, handle: u32, op: &'static str) -> Result<(), VtpmError> {
    let persistent = PersistentTpmHandle::new(handle).map_err(tpm_err(op))?;
    let object = retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
        .map_err(tpm_err(op))?;
    authorized(ctx, |ctx| {
        ctx.evict_control(Provision::Owner, object, Persistent::Persistent(persistent))
    })
    .map_err(tpm_err(op))?;
    Ok(())
}

fn marshal_tpm2b_public(public: &Public) -> Result<Vec<u8>, VtpmError> {
    PublicBuffer::try_from(public.clone())
        .and_then(|b| b.marshall())
        .map_err(tpm_err("marshal TPM2B_PUBLIC"))
}

fn nv_chunk_size(ctx: &mut Context) -> usize {
    ctx.get_tpm_property(PropertyTag::NvBufferMax)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0)
        .map_or(MAX_NV_CHUNK, |v| v.min(MAX_NV_CHUNK))
}

fn open_nv(ctx: &mut Context) -> Result<Option<NvIndexHandle>, VtpmError> {
    let index = NvIndexTpmHandle::new(AK_CERT_NV_INDEX).map_err(tpm_err("NV index"))?;
    if !handle_exists(ctx, AK_CERT_NV_INDEX).map_err(tpm_err("GetCapability (handles)"))? {
        return Ok(None);
    }
    match retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::NvIndex(index))) {
        Ok(o) => Ok(Some(NvIndexHandle::from(o))),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(tpm_err("NV_ReadPublic")(e)),
    }
}

/// The certificate in NV, if the index exists (and is not over the limit).
fn read_nv_cert(ctx: &mut Context) -> Result<Option<Vec<u8>>, VtpmError> {
    let Some(handle) = open_nv(ctx)? else {
        return Ok(None);
    };
    let (public, _) =
        retry_transient(|| ctx.nv_read_public(handle)).map_err(tpm_err("NV_ReadPublic"))?;
    let size = public.data_size();
    if size > MAX_AK_CERT_NV {
        // Not ours: it will be rewritten.
        return Ok(Some(Vec::new()));
    }
    let chunk = nv_chunk_size(ctx);
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let len = chunk.min(size - out.len());
        let (len16, off16) = (to_u16(len)?, to_u16(out.len())?);
        let data = authorized(ctx, |ctx| ctx.nv_read(NvAuth::Owner, handle, len16, off16))
            .map_err(tpm_err("NV_Read"))?;
        if data.is_empty() {
            break;
        }
        out.extend_from_slice(data.value());
    }
    Ok(Some(out))
}

fn to_u16(v: usize) -> Result<u16, VtpmError> {
    u16::try_from(v).map_err(|_| VtpmError::CertTooLarge { len: v })
}

/// (Re)defines the AK certificate index with the certificate's size and
/// writes it in chunks.
fn write_nv_cert(ctx: &mut Context, cert: &[u8], exists: bool) -> Result<(), VtpmError> {
    if exists && let Some(handle) = open_nv(ctx)? {
        authorized(ctx, |ctx| ctx.nv_undefine_space(Provision::Owner, handle))
            .map_err(tpm_err("NV_UndefineSpace"))?;
    }
    let index = NvIndexTpmHandle::new(AK_CERT_NV_INDEX).map_err(tpm_err("NV index"))?;
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .build()
        .map_err(tpm_err("NV attributes"))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(cert.len())
        .build()
        .map_err(tpm_err("NV public"))?;
    let handle = authorized(ctx, |ctx| {
        ctx.nv_define_space(Provision::Owner, None, public.clone())
    })
    .map_err(tpm_err("NV_DefineSpace"))?;
    let chunk = nv_chunk_size(ctx);
    for (i, part) in cert.chunks(chunk).enumerate() {
        let offset = to_u16(i * chunk)?;
        let data = MaxNvBuffer::try_from(part.to_vec()).map_err(tpm_err("NV buffer"))?;
        authorized(ctx, |ctx| {
            ctx.nv_write(NvAuth::Owner, handle, data.clone(), offset)
        })
        .map_err(tpm_err("NV_Write"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_public_key_der() {
        // modulus 0x80 0x01 needs a sign byte; exponent 65537.
        let der = der_rsa_public_key(&[0x00, 0x80, 0x01], 65_537);
        assert_eq!(
            der,
            [
                0x30, 0x0a, 0x02, 0x03, 0x00, 0x80, 0x01, 0x02, 0x03, 0x01, 0x00, 0x01
            ]
        );
        // A 256-byte modulus needs a long-form length.
        let der = der_rsa_public_key(&[0xff; 256], 3);
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x08]);
        assert_eq!(&der[4..8], &[0x02, 0x82, 0x01, 0x01]);
    }

    #[test]
    fn ca_init_refuses_to_overwrite_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ca_init(&ca_dir).unwrap();
        assert!(matches!(ca_init(&ca_dir), Err(VtpmError::CaExists { .. })));
        NodeCa::load(&ca_dir).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A key that does not match the certificate is refused.
        let other = tempfile::tempdir().unwrap();
        ca_init(other.path()).unwrap();
        fs::copy(other.path().join(CA_KEY_FILE), ca_dir.join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            NodeCa::load(&ca_dir),
            Err(VtpmError::CaInvalid { .. })
        ));
    }

    #[test]
    fn templates_build() {
        for alg in [EkAlg::Ecc, EkAlg::Rsa] {
            let ak = ak_template(alg).unwrap();
            assert!(ak.object_attributes().restricted());
            assert!(ak.object_attributes().no_da());
            assert_eq!(
                u32::from(ak.object_attributes()),
                crate::drill::softtpm::AK_ATTRIBUTES
            );
            let old = legacy_ak_template(alg).unwrap();
            assert!(!old.object_attributes().no_da());
            assert_eq!(
                u32::from(old.object_attributes()) | 0x400,
                u32::from(ak.object_attributes())
            );
            ek_template(alg).unwrap();
        }
    }
}
