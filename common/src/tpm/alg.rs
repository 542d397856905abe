//! TPM_ALG_ID values (TPM 2.0 Library Part 2 §6.3, TCG Algorithm
//! Registry) for the algorithms the parsers know, and the mapping of TPM
//! hash algorithms to ring.
//!
//! Hash algorithms reuse [`HashAlg`] from the wire layer, so a PCR bank
//! means the same thing in a challenge, in evidence and in a quote. SHA-1
//! is here only because PCR banks may use it: the parsers never accept it
//! where it would protect a signature or a key's name.

use ring::digest;

pub use crate::wire::HashAlg;

use super::marshal::TpmParseError;

pub const TPM_ALG_RSA: u16 = 0x0001;
pub const TPM_ALG_AES: u16 = 0x0006;
pub const TPM_ALG_NULL: u16 = 0x0010;
pub const TPM_ALG_RSASSA: u16 = 0x0014;
pub const TPM_ALG_RSAPSS: u16 = 0x0016;
pub const TPM_ALG_ECDSA: u16 = 0x0018;
pub const TPM_ALG_ECC: u16 = 0x0023;
pub const TPM_ALG_CFB: u16 = 0x0043;

/// TPM_ECC_NIST_P256 (Part 2 §6.4, TPM_ECC_CURVE).
pub const TPM_ECC_NIST_P256: u16 = 0x0003;

/// Reads a TPMI_ALG_HASH that may be any of the four PCR bank hashes.
pub(crate) fn hash_from_id(field: &'static str, alg: u16) -> Result<HashAlg, TpmParseError> {
    HashAlg::from_tpm_alg_id(alg.into()).ok_or(TpmParseError::UnsupportedAlgorithm { field, alg })
}

/// Reads a TPMI_ALG_HASH that protects a key or a signature: SHA-1 is
/// refused.
pub(crate) fn strong_hash_from_id(field: &'static str, alg: u16) -> Result<HashAlg, TpmParseError> {
    match hash_from_id(field, alg)? {
        HashAlg::Sha1 => Err(TpmParseError::UnsupportedAlgorithm { field, alg }),
        h => Ok(h),
    }
}

/// The TPM_ALG_ID of `h`, as the u16 the TPM marshals.
pub(crate) fn hash_id(h: HashAlg) -> u16 {
    h.tpm_alg_id()
}

/// ring's implementation of `h`. SHA-1 maps to ring's legacy-only SHA-1,
/// which this crate uses for PCR bank digests and nothing else.
pub(crate) fn ring_digest(h: HashAlg) -> &'static digest::Algorithm {
    match h {
        HashAlg::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        HashAlg::Sha256 => &digest::SHA256,
        HashAlg::Sha384 => &digest::SHA384,
        HashAlg::Sha512 => &digest::SHA512,
    }
}
