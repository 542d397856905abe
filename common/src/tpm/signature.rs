//! TPMT_SIGNATURE (TPM 2.0 Library Part 2 §11.3.4) as TPM2_Quote returns
//! it, for the three schemes vkx verifies: ECDSA over NIST P-256, and
//! RSASSA-PKCS1-v1_5 and RSASSA-PSS with RSA-2048.
//!
//! What it trusts: nothing; the bytes come from the guest. What it bounds:
//! ECDSA r and s at [`MAX_ECC_PARAMETER`] bytes each (P-256), an RSA
//! signature at [`MAX_RSA_SIGNATURE`] bytes (RSA-2048), so the largest
//! accepted TPMT_SIGNATURE is 262 bytes. Any other sigAlg, including
//! TPM_ALG_NULL (an unsigned quote), is refused, as is SHA-1 as the
//! signature hash. Whether the signature is valid, and for which key, is
//! [`super::verify`]'s business.

use super::alg::{
    HashAlg, TPM_ALG_ECDSA, TPM_ALG_RSAPSS, TPM_ALG_RSASSA, hash_id, strong_hash_from_id,
};
use super::marshal::{Reader, TpmParseError, Writer};

/// TPM2B_ECC_PARAMETER for NIST P-256, the only curve vkx accepts: 32
/// bytes (a TPM may marshal a shorter, unpadded value).
pub const MAX_ECC_PARAMETER: usize = 32;

/// TPM2B_PUBLIC_KEY_RSA for RSA-2048, the only modulus size vkx accepts.
pub const MAX_RSA_SIGNATURE: usize = 256;

/// A parsed TPMT_SIGNATURE. Its fields were bounded when parsed;
/// [`Signature::to_bytes`] reproduces the input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signature {
    /// TPM_ALG_ECDSA.
    Ecdsa(EcdsaSignature),
    /// TPM_ALG_RSASSA (PKCS#1 v1.5).
    RsaSsa(RsaSignature),
    /// TPM_ALG_RSAPSS.
    RsaPss(RsaSignature),
}

/// TPMS_SIGNATURE_ECDSA: r and s as unsigned big-endian integers of at
/// most [`MAX_ECC_PARAMETER`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcdsaSignature {
    hash: HashAlg,
    r: Vec<u8>,
    s: Vec<u8>,
}

/// TPMS_SIGNATURE_RSA: the signature, at most [`MAX_RSA_SIGNATURE`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaSignature {
    hash: HashAlg,
    sig: Vec<u8>,
}

impl EcdsaSignature {
    pub fn hash(&self) -> HashAlg {
        self.hash
    }

    pub fn r(&self) -> &[u8] {
        &self.r
    }

    pub fn s(&self) -> &[u8] {
        &self.s
    }
}

impl RsaSignature {
    pub fn hash(&self) -> HashAlg {
        self.hash
    }

    pub fn sig(&self) -> &[u8] {
        &self.sig
    }
}

impl Signature {
    /// Parses one TPMT_SIGNATURE, nothing after it.
    pub fn parse(input: &[u8]) -> Result<Self, TpmParseError> {
        let mut r = Reader::new(input);
        let alg = r.u16("sigAlg")?;
        let out = match alg {
            TPM_ALG_ECDSA => {
                let hash = strong_hash_from_id("signature.hash", r.u16("signature.hash")?)?;
                let sr = r.tpm2b("signatureR", MAX_ECC_PARAMETER)?.to_vec();
                let ss = r.tpm2b("signatureS", MAX_ECC_PARAMETER)?.to_vec();
                Self::Ecdsa(EcdsaSignature { hash, r: sr, s: ss })
            }
            TPM_ALG_RSASSA | TPM_ALG_RSAPSS => {
                let hash = strong_hash_from_id("signature.hash", r.u16("signature.hash")?)?;
                let sig = r.tpm2b("signature.sig", MAX_RSA_SIGNATURE)?.to_vec();
                let s = RsaSignature { hash, sig };
                if alg == TPM_ALG_RSASSA {
                    Self::RsaSsa(s)
                } else {
                    Self::RsaPss(s)
                }
            }
            _ => {
                return Err(TpmParseError::UnsupportedAlgorithm {
                    field: "sigAlg",
                    alg,
                });
            }
        };
        r.finish("TPMT_SIGNATURE")?;
        Ok(out)
    }

    /// The marshalled TPMT_SIGNATURE; equal to the bytes it was parsed
    /// from.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(self.alg());
        match self {
            Self::Ecdsa(e) => {
                w.u16(hash_id(e.hash));
                w.tpm2b(&e.r);
                w.tpm2b(&e.s);
            }
            Self::RsaSsa(s) | Self::RsaPss(s) => {
                w.u16(hash_id(s.hash));
                w.tpm2b(&s.sig);
            }
        }
        w.into_bytes()
    }

    /// The TPM_ALG_ID of the signature scheme.
    pub fn alg(&self) -> u16 {
        match self {
            Self::Ecdsa(_) => TPM_ALG_ECDSA,
            Self::RsaSsa(_) => TPM_ALG_RSASSA,
            Self::RsaPss(_) => TPM_ALG_RSAPSS,
        }
    }

    /// The scheme's hash: what the TPM hashed the attestation with, and
    /// the hash of a quote's pcrDigest.
    pub fn hash(&self) -> HashAlg {
        match self {
            Self::Ecdsa(e) => e.hash,
            Self::RsaSsa(s) | Self::RsaPss(s) => s.hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ecdsa() -> Vec<u8> {
        let mut b = vec![0x00, 0x18, 0x00, 0x0b, 0x00, 0x20];
        b.extend([0x11; 32]);
        b.extend([0x00, 0x20]);
        b.extend([0x22; 32]);
        b
    }

    fn rsa(alg: u8) -> Vec<u8> {
        let mut b = vec![0x00, alg, 0x00, 0x0b, 0x01, 0x00];
        b.extend([0x33; 256]);
        b
    }

    #[test]
    fn parses_and_round_trips_each_scheme() {
        for b in [ecdsa(), rsa(0x14), rsa(0x16)] {
            let s = Signature::parse(&b).unwrap();
            assert_eq!(s.hash(), HashAlg::Sha256);
            assert_eq!(s.to_bytes(), b);
        }
        assert!(matches!(
            Signature::parse(&rsa(0x16)),
            Ok(Signature::RsaPss(_))
        ));
    }

    #[test]
    fn truncation_and_trailing_bytes() {
        for b in [ecdsa(), rsa(0x14), rsa(0x16)] {
            for n in 0..b.len() {
                assert!(matches!(
                    Signature::parse(&b[..n]),
                    Err(TpmParseError::Truncated { .. })
                ));
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(
                Signature::parse(&long),
                Err(TpmParseError::TrailingBytes {
                    structure: "TPMT_SIGNATURE",
                    extra: 1
                })
            );
        }
    }

    #[test]
    fn refuses_unsupported_and_oversized() {
        // TPM_ALG_NULL: an unsigned quote.
        assert_eq!(
            Signature::parse(&[0x00, 0x10]),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "sigAlg",
                alg: 0x10
            })
        );
        // ECDAA
        assert!(matches!(
            Signature::parse(&[0x00, 0x1a, 0x00, 0x0b]),
            Err(TpmParseError::UnsupportedAlgorithm { alg: 0x1a, .. })
        ));
        // SHA-1 as the signature hash.
        let mut b = ecdsa();
        b[3] = 0x04;
        assert_eq!(
            Signature::parse(&b),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "signature.hash",
                alg: 0x04
            })
        );
        // r of 33 bytes (P-384 size would be 48).
        let mut b = ecdsa();
        b[5] = 33;
        assert!(matches!(
            Signature::parse(&b),
            Err(TpmParseError::TooLarge {
                field: "signatureR",
                len: 33,
                max: 32
            })
        ));
        // RSA-3072 signature.
        let mut b = rsa(0x14);
        b[4..6].copy_from_slice(&384u16.to_be_bytes());
        b.extend([0; 128]);
        assert!(matches!(
            Signature::parse(&b),
            Err(TpmParseError::TooLarge {
                field: "signature.sig",
                len: 384,
                max: 256
            })
        ));
    }
}
