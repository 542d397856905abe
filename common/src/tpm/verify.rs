//! Verification of a TPM2_Quote against an attestation key (AK) and what
//! the host expects.
//!
//! What it trusts: the AK public area given by the caller (the host's
//! policy pinned it, by name or certificate), and the caller's
//! expectations (its own qualifying data and PCR selection). Everything
//! else (TPMS_ATTEST, TPMT_SIGNATURE and the reported PCR values) comes
//! from the guest and is hostile.
//!
//! Why a quote means anything: a *restricted* signing key signs only
//! digests the TPM computed itself over structures that start with
//! TPM_GENERATED_VALUE; it refuses to sign outside data that starts with
//! that magic. So a valid signature by a restricted AK over a TPMS_ATTEST
//! that starts with the magic proves the TPM made it, and its fields
//! (qualifying data, PCR selection, PCR digest, clock) are the TPM's. An
//! unrestricted signing key would sign forged attestation structures for
//! anyone holding its authorisation, so it is refused before anything
//! else.
//!
//! The checks, in order; each failure is its own [`VerifyError`] variant
//! for the host's local log (the wire only ever says
//! "attestation-failed"):
//! 1. the AK is a restricted, non-decrypting signing key bound to its TPM
//!    (fixedTPM, fixedParent, sensitiveDataOrigin);
//! 2. the TPMT_SIGNATURE parses, its scheme matches the AK's key type (and
//!    the AK's own scheme, if it has one), and its hash is SHA-256;
//! 3. the signature verifies over the TPMS_ATTEST bytes (ring);
//! 4. the TPMS_ATTEST parses (magic, type, sizes; see [`super::attest`]);
//! 5. extraData equals the caller's qualifying data (freshness: a replayed
//!    quote carries an old transcript hash);
//! 6. qualifiedSigner is exactly the AK's qualified name under the parent
//!    the caller names (see below);
//! 7. the quoted PCR selection is exactly the requested one;
//! 8. the reported PCR values cover exactly that selection;
//! 9. pcrDigest equals H(reported values, in selection order), H being the
//!    signature's hash, as TPM2_Quote computes it.
//!
//! qualifiedSigner is the AK's *qualified* name, nameAlg ||
//! H_nameAlg(parent's qualified name || AK name), which the TPM copies
//! from its own bookkeeping. It depends on where the AK sits in the key
//! hierarchy, so the caller says ([`AkParent`]): a vkx AK is a primary of
//! the endorsement hierarchy (PROTOCOL.md §7.6), whose qualified name is
//! its handle 0x4000000B, so its qualified name follows from its public
//! area alone; an AK made by `tpm2_createak` is a child of the EK, and the
//! caller passes the EK's qualified name. The check adds no trust of its
//! own (that comes from the AK's provenance: pinned name, certificate),
//! but a quote signed by the right key that names another key, or the
//! same key under another parent, is not what the host provisioned and is
//! refused.
//!
//! What it bounds: the TPMS_ATTEST at [`crate::wire::MAX_TPM_ATTEST`]
//! bytes before it is hashed; everything else through the parsers. The
//! work is one signature verification and a few hashes over at most a
//! few KiB.

use ring::signature::{self, UnparsedPublicKey};
use thiserror::Error;

use super::alg::{HashAlg, TPM_ALG_ECC, TPM_ALG_RSA, ring_digest};
use super::attest::{Attest, ClockInfo, PcrSelection};
use super::marshal::TpmParseError;
use super::public::{KeyScheme, MAX_ECC_COORDINATE, Public, PublicKey, attributes, scheme_alg};
use super::signature::{MAX_ECC_PARAMETER, Signature};
use crate::wire::{MAX_PCR_BANKS, MAX_TPM_ATTEST, PcrBankSelection, PcrBankValues};

/// TPMA_OBJECT bits an AK must have: a signing key that only signs
/// TPM-made structures and whose private part was made in, and never
/// leaves, this TPM.
pub const AK_REQUIRED_ATTRIBUTES: u32 = attributes::RESTRICTED
    | attributes::SIGN_ENCRYPT
    | attributes::FIXED_TPM
    | attributes::FIXED_PARENT
    | attributes::SENSITIVE_DATA_ORIGIN;

/// TPMA_OBJECT bits an AK must not have: a key that also decrypts could be
/// used to unwrap secrets as well as to sign (TPM2_Create refuses a
/// restricted key with both).
pub const AK_FORBIDDEN_ATTRIBUTES: u32 = attributes::DECRYPT;

/// Where the AK sits in its TPM's key hierarchy: what its qualified name,
/// the quote's qualifiedSigner, is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AkParent<'a> {
    /// The AK is a primary key of the hierarchy with this handle; a vkx
    /// AK is a primary of [`super::TPM_RH_ENDORSEMENT`].
    Hierarchy(u32),
    /// The AK is a child of the key with this qualified name (an AK of
    /// `tpm2_createak` under the EK: `tpm2_readpublic -c ek.ctx -q`).
    Key { qualified_name: &'a [u8] },
}

impl AkParent<'static> {
    /// The parent of every vkx-provisioned AK (PROTOCOL.md §7.6).
    pub const VKX: Self = Self::Hierarchy(super::TPM_RH_ENDORSEMENT);
}

impl AkParent<'_> {
    /// The qualified name `ak` has under this parent.
    pub fn qualified_name_of(&self, ak: &Public) -> Vec<u8> {
        match self {
            Self::Hierarchy(handle) => ak.qualified_name(&super::hierarchy_qualified_name(*handle)),
            Self::Key { qualified_name } => ak.qualified_name(qualified_name),
        }
    }
}

/// What the host expects the quote to show.
#[derive(Debug, Clone, Copy)]
pub struct QuoteExpectations<'a> {
    /// Where the AK sits: its qualified name must be the quote's
    /// qualifiedSigner.
    pub ak_parent: AkParent<'a>,
    /// TPM2_Quote's qualifyingData: for vkx, the transcript hash.
    pub qualifying_data: &'a [u8],
    /// The PCRs the host asked for (Challenge.pcr_selection): banks in
    /// this order, PCR indices strictly ascending.
    pub pcr_selection: &'a [PcrBankSelection],
    /// The PCR values the guest reported (Evidence.pcr_values), one entry
    /// per requested bank, in the same order.
    pub pcr_values: &'a [PcrBankValues],
}

/// What a verified quote establishes, beyond "the PCRs had the reported
/// values when the TPM quoted them, for this qualifying data".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// The TPM's clock at the quote: reset and restart counts show reboots
    /// and resumes between two quotes.
    pub clock_info: ClockInfo,
    /// Vendor-defined firmware version of the TPM.
    pub firmware_version: u64,
    /// The AK's TPM name (nameAlg || digest).
    pub ak_name: Vec<u8>,
}

/// Why a quote was refused. Logged locally by the host; on the wire every
/// variant is "attestation-failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    // The AK (local configuration: what provisioning or policy supplied).
    #[error(
        "AK is not a restricted signing key bound to its TPM (objectAttributes {attributes:#010x})"
    )]
    AkNotRestrictedSigning { attributes: u32 },

    // Malformed evidence (the guest's fault).
    #[error("TPMT_SIGNATURE: {0}")]
    MalformedSignature(TpmParseError),
    #[error("TPMS_ATTEST: {0}")]
    MalformedAttest(TpmParseError),

    // Evidence that does not fit the AK or what vkx supports.
    #[error(
        "signature scheme {signature:#06x} does not fit the AK (type {key_type:#06x}, scheme {key_scheme:#06x})"
    )]
    SchemeMismatch {
        signature: u16,
        key_type: u16,
        key_scheme: u16,
    },
    #[error("signature hash {hash:?} not supported (SHA-256 only)")]
    UnsupportedSignatureHash { hash: HashAlg },

    // The evidence is not what it claims.
    #[error("signature does not verify with the AK")]
    BadSignature,
    #[error("extraData is not the expected qualifying data (stale or replayed quote)")]
    QualifyingDataMismatch,
    #[error("qualifiedSigner is not the AK's qualified name under the expected parent")]
    QualifiedSignerMismatch,
    #[error("quoted PCR selection differs from the requested one")]
    PcrSelectionMismatch,
    #[error("reported PCR values do not cover exactly the selection: {reason}")]
    PcrValuesMismatch { reason: &'static str },
    #[error("pcrDigest does not match the reported PCR values")]
    PcrDigestMismatch,

    // API misuse (the caller's fault).
    #[error("invalid expectations: {rule}")]
    InvalidExpectations { rule: &'static str },
}

/// Verifies a quote: `attest` (TPMS_ATTEST) and `signature`
/// (TPMT_SIGNATURE) as the TPM marshalled them, against the AK `ak` and
/// what the host expects. See the module documentation for the checks.
pub fn verify_quote(
    attest: &[u8],
    signature: &[u8],
    ak: &Public,
    expect: &QuoteExpectations<'_>,
) -> Result<VerifiedQuote, VerifyError> {
    // Caller's input first: a bad expectation is a local bug, and must not
    // read as the guest's fault.
    let expected = expected_selection(expect.pcr_selection)?;

    // 1. The AK.
    let attrs = ak.attributes();
    if attrs & AK_REQUIRED_ATTRIBUTES != AK_REQUIRED_ATTRIBUTES
        || attrs & AK_FORBIDDEN_ATTRIBUTES != 0
    {
        return Err(VerifyError::AkNotRestrictedSigning { attributes: attrs });
    }

    // 2. The signature's form.
    if attest.len() > MAX_TPM_ATTEST {
        return Err(VerifyError::MalformedAttest(TpmParseError::TooLarge {
            field: "TPMS_ATTEST",
            len: attest.len(),
            max: MAX_TPM_ATTEST,
        }));
    }
    let sig = Signature::parse(signature).map_err(VerifyError::MalformedSignature)?;
    check_scheme(&sig, ak)?;
    if sig.hash() != HashAlg::Sha256 {
        return Err(VerifyError::UnsupportedSignatureHash { hash: sig.hash() });
    }

    // 3. The signature.
    verify_signature(&sig, ak, attest)?;

    // 4. From here on the TPM made these bytes.
    let quote = Attest::parse(attest).map_err(VerifyError::MalformedAttest)?;

    // 5. Freshness.
    if quote.extra_data() != expect.qualifying_data {
        return Err(VerifyError::QualifyingDataMismatch);
    }

    // 6. The signer, exactly (public values: no constant time needed).
    if quote.qualified_signer() != expect.ak_parent.qualified_name_of(ak).as_slice() {
        return Err(VerifyError::QualifiedSignerMismatch);
    }

    // 7. Selection.
    if quote.pcr_select() != expected.as_slice() {
        return Err(VerifyError::PcrSelectionMismatch);
    }

    // 8 and 9. Values and digest.
    let digest = reported_digest(sig.hash(), expect.pcr_selection, expect.pcr_values)?;
    if quote.pcr_digest() != digest.as_ref() {
        return Err(VerifyError::PcrDigestMismatch);
    }

    Ok(VerifiedQuote {
        clock_info: quote.clock_info(),
        firmware_version: quote.firmware_version(),
        ak_name: ak.name(),
    })
}

/// The TPM's form of the requested selection, refusing a request that
/// could never match a quote.
fn expected_selection(banks: &[PcrBankSelection]) -> Result<Vec<PcrSelection>, VerifyError> {
    let bad = |rule| Err(VerifyError::InvalidExpectations { rule });
    if banks.is_empty() {
        return bad("no PCR bank selected");
    }
    if banks.len() > MAX_PCR_BANKS {
        return bad("more PCR banks than a TPM has");
    }
    let mut out = Vec::with_capacity(banks.len());
    for (i, bank) in banks.iter().enumerate() {
        if banks[..i].iter().any(|b| b.hash_alg == bank.hash_alg) {
            return bad("a PCR bank selected twice");
        }
        if bank.pcrs.is_empty() {
            return bad("a PCR bank with no PCR");
        }
        if !bank.pcrs.windows(2).all(|w| w[0] < w[1]) {
            return bad("PCR indices not strictly ascending");
        }
        match PcrSelection::new(bank.hash_alg, &bank.pcrs) {
            Some(s) => out.push(s),
            None => return bad("PCR index beyond 23"),
        }
    }
    Ok(out)
}

/// Checks that the reported values cover exactly `selection` (validated by
/// [`expected_selection`]) and hashes them as TPM2_Quote does: banks in
/// selection order, PCRs ascending within each bank.
fn reported_digest(
    hash: HashAlg,
    selection: &[PcrBankSelection],
    values: &[PcrBankValues],
) -> Result<ring::digest::Digest, VerifyError> {
    let bad = |reason| Err(VerifyError::PcrValuesMismatch { reason });
    if values.len() != selection.len() {
        return bad("number of banks differs from the selection");
    }
    let mut ctx = ring::digest::Context::new(ring_digest(hash));
    for (sel, bank) in selection.iter().zip(values) {
        if bank.hash_alg != sel.hash_alg {
            return bad("bank differs from the selection");
        }
        // Both are ascending (the selection was checked, the map is
        // ordered), so equal key sequences mean the same set.
        if !bank.values.keys().eq(sel.pcrs.iter()) {
            return bad("PCR indices differ from the selection");
        }
        for digest in bank.values.values() {
            if digest.len() != bank.hash_alg.digest_len() {
                return bad("PCR value of the wrong size for its bank");
            }
            ctx.update(digest);
        }
    }
    Ok(ctx.finish())
}

fn check_scheme(sig: &Signature, ak: &Public) -> Result<(), VerifyError> {
    let (key_type, fits_type) = match (ak.key(), sig) {
        (PublicKey::EccP256 { .. }, Signature::Ecdsa(_)) => (TPM_ALG_ECC, true),
        (PublicKey::EccP256 { .. }, _) => (TPM_ALG_ECC, false),
        (PublicKey::Rsa { .. }, Signature::RsaSsa(_) | Signature::RsaPss(_)) => (TPM_ALG_RSA, true),
        (PublicKey::Rsa { .. }, _) => (TPM_ALG_RSA, false),
    };
    // A key bound to a scheme signs only with it (and its hash).
    let fits_scheme = match ak.scheme() {
        KeyScheme::Null => true,
        s => scheme_alg(s) == sig.alg() && scheme_hash(s) == Some(sig.hash()),
    };
    if fits_type && fits_scheme {
        Ok(())
    } else {
        Err(VerifyError::SchemeMismatch {
            signature: sig.alg(),
            key_type,
            key_scheme: scheme_alg(ak.scheme()),
        })
    }
}

fn scheme_hash(s: KeyScheme) -> Option<HashAlg> {
    match s {
        KeyScheme::Null => None,
        KeyScheme::RsaSsa(h) | KeyScheme::RsaPss(h) | KeyScheme::Ecdsa(h) => Some(h),
    }
}

/// Verifies `sig` (already matched to the key type, hash SHA-256) over
/// `message` with ring.
fn verify_signature(sig: &Signature, ak: &Public, message: &[u8]) -> Result<(), VerifyError> {
    let ok = match (ak.key(), sig) {
        (PublicKey::EccP256 { x, y }, Signature::Ecdsa(e)) => {
            // Uncompressed SEC1 point, coordinates left-padded to 32 bytes.
            let mut point = [0u8; 1 + 2 * MAX_ECC_COORDINATE];
            point[0] = 0x04;
            left_pad(&mut point[1..1 + MAX_ECC_COORDINATE], x);
            left_pad(&mut point[1 + MAX_ECC_COORDINATE..], y);
            let mut rs = [0u8; 2 * MAX_ECC_PARAMETER];
            left_pad(&mut rs[..MAX_ECC_PARAMETER], e.r());
            left_pad(&mut rs[MAX_ECC_PARAMETER..], e.s());
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, &rs)
                .is_ok()
        }
        (PublicKey::Rsa { exponent, modulus }, Signature::RsaSsa(s) | Signature::RsaPss(s)) => {
            let e = if *exponent == 0 {
                super::public::RSA_DEFAULT_EXPONENT
            } else {
                *exponent
            }
            .to_be_bytes();
            // ring wants the exponent without leading zeros.
            let skip = e.iter().take_while(|b| **b == 0).count();
            let params = if matches!(sig, Signature::RsaSsa(_)) {
                &signature::RSA_PKCS1_2048_8192_SHA256
            } else {
                &signature::RSA_PSS_2048_8192_SHA256
            };
            signature::RsaPublicKeyComponents {
                n: modulus.as_slice(),
                e: &e[skip..],
            }
            .verify(params, message, s.sig())
            .is_ok()
        }
        // check_scheme has refused every other pairing.
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(VerifyError::BadSignature)
    }
}

/// Copies `src` (at most `dst.len()` bytes, guaranteed by the parsers)
/// right-aligned into `dst`, which is zeroed.
fn left_pad(dst: &mut [u8], src: &[u8]) {
    let start = dst.len().saturating_sub(src.len());
    let src = &src[src.len().saturating_sub(dst.len())..];
    dst[start..].copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_pad_right_aligns() {
        let mut d = [0u8; 4];
        left_pad(&mut d, &[1, 2]);
        assert_eq!(d, [0, 0, 1, 2]);
        let mut d = [0u8; 2];
        left_pad(&mut d, &[]);
        assert_eq!(d, [0, 0]);
    }

    fn sel(hash_alg: HashAlg, pcrs: &[u8]) -> PcrBankSelection {
        PcrBankSelection {
            hash_alg,
            pcrs: pcrs.to_vec(),
        }
    }

    #[test]
    fn expectations_that_cannot_match_are_the_callers_fault() {
        let rule = |banks: &[PcrBankSelection]| match expected_selection(banks) {
            Err(VerifyError::InvalidExpectations { rule }) => rule,
            other => panic!("{other:?}"),
        };
        assert_eq!(rule(&[]), "no PCR bank selected");
        assert_eq!(
            rule(&[sel(HashAlg::Sha256, &[0]), sel(HashAlg::Sha256, &[1])]),
            "a PCR bank selected twice"
        );
        assert_eq!(rule(&[sel(HashAlg::Sha256, &[])]), "a PCR bank with no PCR");
        assert_eq!(
            rule(&[sel(HashAlg::Sha256, &[1, 1])]),
            "PCR indices not strictly ascending"
        );
        assert_eq!(rule(&[sel(HashAlg::Sha256, &[24])]), "PCR index beyond 23");
        let ok = expected_selection(&[sel(HashAlg::Sha1, &[0, 7]), sel(HashAlg::Sha256, &[23])])
            .unwrap();
        assert_eq!(ok[0].bitmap(), [0x81, 0, 0]);
        assert_eq!(ok[1].bitmap(), [0, 0, 0x80]);
    }
}
