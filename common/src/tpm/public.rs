//! TPMT_PUBLIC and TPM2B_PUBLIC (TPM 2.0 Library Part 2 §12.2.4-5): the
//! public area of a TPM key, from which its TPM name is computed.
//!
//! What it trusts: nothing. An AK's public area comes from provisioning or
//! from the guest; the parser only establishes that it is a well-formed
//! key of a kind vkx can verify with. Whether it is the right key is the
//! policy's business (the name is what the host pins).
//!
//! What it accepts, deliberately narrow (every accepted shape is tested
//! against swtpm output):
//! - type RSA with keyBits 2048 only and exponent 0 (the TPM's "default",
//!   65537) or 65537; type ECC with curve NIST P-256 only and kdf NULL.
//!   RSA-3072/4096 and P-384 AKs exist, but no vkx vTPM makes them; adding
//!   one is a new limit here and a new fixture.
//! - nameAlg SHA-256, SHA-384 or SHA-512 (never SHA-1: the name is the
//!   key's identity);
//! - objectAttributes with no reserved bit set;
//! - authPolicy empty or exactly one nameAlg digest;
//! - symmetric NULL or AES-128/192/256-CFB (an EK's), schemes NULL,
//!   RSASSA, RSAPSS (RSA) or ECDSA (ECC), each with a SHA-2 hash.
//!
//! What it bounds: every sized field at its type's limit, and a
//! TPM2B_PUBLIC at [`MAX_TPMT_PUBLIC`] before the inner structure is read.

use super::alg::{
    HashAlg, TPM_ALG_AES, TPM_ALG_CFB, TPM_ALG_ECC, TPM_ALG_ECDSA, TPM_ALG_NULL, TPM_ALG_RSA,
    TPM_ALG_RSAPSS, TPM_ALG_RSASSA, TPM_ECC_NIST_P256, hash_id, ring_digest, strong_hash_from_id,
};
use super::marshal::{Reader, TpmParseError, Writer};

/// The largest TPMT_PUBLIC accepted: RSA-2048 with a SHA-512 policy and an
/// AES symmetric definition is 350 bytes; an ECC P-256 key at most 158.
pub const MAX_TPMT_PUBLIC: usize = 512;

/// authPolicy (TPM2B_DIGEST): one digest of the nameAlg, at most SHA-512.
pub const MAX_AUTH_POLICY: usize = 64;

/// RSA key size vkx accepts, in bits (see the module primer).
pub const RSA_KEY_BITS: u16 = 2048;

/// Bytes of an RSA-2048 modulus.
pub const RSA_MODULUS_LEN: usize = 256;

/// A NIST P-256 coordinate, at most 32 bytes.
pub const MAX_ECC_COORDINATE: usize = 32;

/// The RSA public exponent a TPM means by exponent 0.
pub const RSA_DEFAULT_EXPONENT: u32 = 65537;

/// TPMA_OBJECT bits (Part 2 §8.3).
pub mod attributes {
    /// The key cannot leave this TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// The key cannot be moved to another parent.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM made the private key itself.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const NO_DA: u32 = 1 << 10;
    /// The key only signs or decrypts TPM-made structures.
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
    /// Bits Part 2 reserves (0, 3, 8-9, 12-15, 20-31); a TPM refuses to
    /// create an object with any of them set.
    pub const RESERVED: u32 = 0xfff0_f309;
}

/// The symmetric definition of a key (TPMT_SYM_DEF_OBJECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SymmetricDef {
    /// TPM_ALG_NULL: what a signing key has.
    Null,
    /// AES in CFB mode: what a storage key or an EK has.
    AesCfb { key_bits: u16 },
}

/// The signing scheme a key is bound to (TPMT_RSA_SCHEME /
/// TPMT_ECC_SCHEME). A key with a scheme signs only with that scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyScheme {
    Null,
    RsaSsa(HashAlg),
    RsaPss(HashAlg),
    Ecdsa(HashAlg),
}

/// The key itself (TPMU_PUBLIC_ID).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublicKey {
    /// RSA-2048: `exponent` as marshalled (0 meaning 65537), `modulus`
    /// exactly [`RSA_MODULUS_LEN`] bytes, big-endian.
    Rsa { exponent: u32, modulus: Vec<u8> },
    /// A NIST P-256 point, coordinates big-endian, at most
    /// [`MAX_ECC_COORDINATE`] bytes each (not necessarily padded).
    EccP256 { x: Vec<u8>, y: Vec<u8> },
}

/// A parsed TPMT_PUBLIC. Only [`Public::parse`] and
/// [`Public::parse_tpmt`] make one, so every value meets the module's
/// rules; [`Public::to_tpmt_bytes`] reproduces the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    name_alg: HashAlg,
    attributes: u32,
    auth_policy: Vec<u8>,
    symmetric: SymmetricDef,
    scheme: KeyScheme,
    key: PublicKey,
}

impl Public {
    /// Parses a TPM2B_PUBLIC (the size-prefixed form `tpm2_createak -u`
    /// and TPM2_ReadPublic produce), nothing after it.
    pub fn parse(input: &[u8]) -> Result<Self, TpmParseError> {
        let mut r = Reader::new(input);
        let inner = r.tpm2b("TPM2B_PUBLIC.size", MAX_TPMT_PUBLIC)?;
        r.finish("TPM2B_PUBLIC")?;
        Self::parse_tpmt(inner)
    }

    /// Parses a bare TPMT_PUBLIC, nothing after it.
    pub fn parse_tpmt(input: &[u8]) -> Result<Self, TpmParseError> {
        if input.len() > MAX_TPMT_PUBLIC {
            return Err(TpmParseError::TooLarge {
                field: "TPMT_PUBLIC",
                len: input.len(),
                max: MAX_TPMT_PUBLIC,
            });
        }
        let mut r = Reader::new(input);
        let ty = r.u16("type")?;
        if ty != TPM_ALG_RSA && ty != TPM_ALG_ECC {
            return Err(TpmParseError::UnsupportedAlgorithm {
                field: "type",
                alg: ty,
            });
        }
        let name_alg = strong_hash_from_id("nameAlg", r.u16("nameAlg")?)?;
        let attributes = r.u32("objectAttributes")?;
        if attributes & attributes::RESERVED != 0 {
            return Err(TpmParseError::InvalidValue {
                field: "objectAttributes",
                rule: "reserved bit set",
            });
        }
        let auth_policy = r.tpm2b("authPolicy", MAX_AUTH_POLICY)?;
        if !auth_policy.is_empty() && auth_policy.len() != name_alg.digest_len() {
            return Err(TpmParseError::InvalidValue {
                field: "authPolicy",
                rule: "neither empty nor one nameAlg digest",
            });
        }
        let auth_policy = auth_policy.to_vec();
        let symmetric = read_symmetric(&mut r)?;
        let (scheme, key) = if ty == TPM_ALG_RSA {
            let scheme = read_scheme(&mut r, "rsaScheme", &[TPM_ALG_RSASSA, TPM_ALG_RSAPSS])?;
            let bits = r.u16("keyBits")?;
            if bits != RSA_KEY_BITS {
                return Err(TpmParseError::Unsupported {
                    field: "keyBits",
                    value: bits.into(),
                });
            }
            let exponent = r.u32("exponent")?;
            if exponent != 0 && exponent != RSA_DEFAULT_EXPONENT {
                return Err(TpmParseError::Unsupported {
                    field: "exponent",
                    value: exponent,
                });
            }
            let modulus = r.tpm2b("unique.rsa", RSA_MODULUS_LEN)?;
            if modulus.len() != RSA_MODULUS_LEN {
                return Err(TpmParseError::InvalidValue {
                    field: "unique.rsa",
                    rule: "an RSA-2048 modulus is 256 bytes",
                });
            }
            let modulus = modulus.to_vec();
            (scheme, PublicKey::Rsa { exponent, modulus })
        } else {
            let scheme = read_scheme(&mut r, "eccScheme", &[TPM_ALG_ECDSA])?;
            let curve = r.u16("curveID")?;
            if curve != TPM_ECC_NIST_P256 {
                return Err(TpmParseError::Unsupported {
                    field: "curveID",
                    value: curve.into(),
                });
            }
            let kdf = r.u16("kdf")?;
            if kdf != TPM_ALG_NULL {
                return Err(TpmParseError::UnsupportedAlgorithm {
                    field: "kdf",
                    alg: kdf,
                });
            }
            let x = r.tpm2b("unique.x", MAX_ECC_COORDINATE)?.to_vec();
            let y = r.tpm2b("unique.y", MAX_ECC_COORDINATE)?.to_vec();
            (scheme, PublicKey::EccP256 { x, y })
        };
        r.finish("TPMT_PUBLIC")?;
        Ok(Self {
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            key,
        })
    }

    /// The marshalled TPMT_PUBLIC; equal to the bytes it was parsed from.
    pub fn to_tpmt_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(match self.key {
            PublicKey::Rsa { .. } => TPM_ALG_RSA,
            PublicKey::EccP256 { .. } => TPM_ALG_ECC,
        });
        w.u16(hash_id(self.name_alg));
        w.u32(self.attributes);
        w.tpm2b(&self.auth_policy);
        match self.symmetric {
            SymmetricDef::Null => w.u16(TPM_ALG_NULL),
            SymmetricDef::AesCfb { key_bits } => {
                w.u16(TPM_ALG_AES);
                w.u16(key_bits);
                w.u16(TPM_ALG_CFB);
            }
        }
        match self.scheme {
            KeyScheme::Null => w.u16(TPM_ALG_NULL),
            KeyScheme::RsaSsa(h) | KeyScheme::RsaPss(h) | KeyScheme::Ecdsa(h) => {
                w.u16(scheme_alg(self.scheme));
                w.u16(hash_id(h));
            }
        }
        match &self.key {
            PublicKey::Rsa { exponent, modulus } => {
                w.u16(RSA_KEY_BITS);
                w.u32(*exponent);
                w.tpm2b(modulus);
            }
            PublicKey::EccP256 { x, y } => {
                w.u16(TPM_ECC_NIST_P256);
                w.u16(TPM_ALG_NULL);
                w.tpm2b(x);
                w.tpm2b(y);
            }
        }
        w.into_bytes()
    }

    /// The marshalled TPM2B_PUBLIC; equal to the bytes it was parsed from.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.tpm2b(&self.to_tpmt_bytes());
        w.into_bytes()
    }

    /// The key's TPM name (Part 1 §16): nameAlg as 2 big-endian bytes, then
    /// H_nameAlg(marshalled TPMT_PUBLIC). It is what a quote's
    /// qualifiedSigner is derived from, and what the host pins.
    pub fn name(&self) -> Vec<u8> {
        let d = ring::digest::digest(ring_digest(self.name_alg), &self.to_tpmt_bytes());
        let mut out = Vec::with_capacity(2 + d.as_ref().len());
        out.extend_from_slice(&hash_id(self.name_alg).to_be_bytes());
        out.extend_from_slice(d.as_ref());
        out
    }

    /// The key's qualified name (Part 1 §16.5) under a parent whose
    /// qualified name is `parent_qualified_name`: nameAlg as 2 big-endian
    /// bytes, then H_nameAlg(parent's qualified name || [`Public::name`]).
    /// A hierarchy's qualified name is its handle, 4 bytes big-endian
    /// ([`super::hierarchy_qualified_name`]). A TPM2_Quote carries the
    /// signing key's qualified name as qualifiedSigner.
    pub fn qualified_name(&self, parent_qualified_name: &[u8]) -> Vec<u8> {
        let mut ctx = ring::digest::Context::new(ring_digest(self.name_alg));
        ctx.update(parent_qualified_name);
        ctx.update(&self.name());
        let d = ctx.finish();
        let mut out = Vec::with_capacity(2 + d.as_ref().len());
        out.extend_from_slice(&hash_id(self.name_alg).to_be_bytes());
        out.extend_from_slice(d.as_ref());
        out
    }

    pub fn name_alg(&self) -> HashAlg {
        self.name_alg
    }

    /// TPMA_OBJECT; see [`attributes`].
    pub fn attributes(&self) -> u32 {
        self.attributes
    }

    pub fn auth_policy(&self) -> &[u8] {
        &self.auth_policy
    }

    pub fn symmetric(&self) -> SymmetricDef {
        self.symmetric
    }

    pub fn scheme(&self) -> KeyScheme {
        self.scheme
    }

    pub fn key(&self) -> &PublicKey {
        &self.key
    }
}

/// The TPM_ALG_ID of a non-NULL scheme.
pub(crate) fn scheme_alg(s: KeyScheme) -> u16 {
    match s {
        KeyScheme::Null => TPM_ALG_NULL,
        KeyScheme::RsaSsa(_) => TPM_ALG_RSASSA,
        KeyScheme::RsaPss(_) => TPM_ALG_RSAPSS,
        KeyScheme::Ecdsa(_) => TPM_ALG_ECDSA,
    }
}

fn read_symmetric(r: &mut Reader<'_>) -> Result<SymmetricDef, TpmParseError> {
    match r.u16("symmetric.algorithm")? {
        TPM_ALG_NULL => Ok(SymmetricDef::Null),
        TPM_ALG_AES => {
            let key_bits = r.u16("symmetric.keyBits")?;
            if !matches!(key_bits, 128 | 192 | 256) {
                return Err(TpmParseError::Unsupported {
                    field: "symmetric.keyBits",
                    value: key_bits.into(),
                });
            }
            let mode = r.u16("symmetric.mode")?;
            if mode != TPM_ALG_CFB {
                return Err(TpmParseError::UnsupportedAlgorithm {
                    field: "symmetric.mode",
                    alg: mode,
                });
            }
            Ok(SymmetricDef::AesCfb { key_bits })
        }
        alg => Err(TpmParseError::UnsupportedAlgorithm {
            field: "symmetric.algorithm",
            alg,
        }),
    }
}

/// A TPMT_RSA_SCHEME or TPMT_ECC_SCHEME whose scheme is NULL or one of
/// `allowed` (each carrying a TPMS_SCHEME_HASH).
fn read_scheme(
    r: &mut Reader<'_>,
    field: &'static str,
    allowed: &[u16],
) -> Result<KeyScheme, TpmParseError> {
    let alg = r.u16(field)?;
    if alg == TPM_ALG_NULL {
        return Ok(KeyScheme::Null);
    }
    if !allowed.contains(&alg) {
        return Err(TpmParseError::UnsupportedAlgorithm { field, alg });
    }
    let hash = strong_hash_from_id("scheme.hashAlg", r.u16("scheme.hashAlg")?)?;
    Ok(match alg {
        TPM_ALG_RSASSA => KeyScheme::RsaSsa(hash),
        TPM_ALG_RSAPSS => KeyScheme::RsaPss(hash),
        _ => KeyScheme::Ecdsa(hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ECC AK from swtpm (common/tests/fixtures/tpm/ecc-p256-ecdsa/ak.pub).
    fn ecc_ak() -> Vec<u8> {
        let mut b = vec![
            0x00, 0x58, 0x00, 0x23, 0x00, 0x0b, 0x00, 0x05, 0x00, 0x72, 0x00, 0x00, 0x00, 0x10,
            0x00, 0x18, 0x00, 0x0b, 0x00, 0x03, 0x00, 0x10, 0x00, 0x20,
        ];
        b.extend([0x15; 32]);
        b.extend([0x00, 0x20]);
        b.extend([0x40; 32]);
        b
    }

    fn rsa_ak() -> Vec<u8> {
        let mut b = vec![
            0x01, 0x18, 0x00, 0x01, 0x00, 0x0b, 0x00, 0x05, 0x00, 0x72, 0x00, 0x00, 0x00, 0x10,
            0x00, 0x14, 0x00, 0x0b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
        ];
        b.extend([0xc5; 256]);
        b
    }

    #[test]
    fn parses_and_round_trips() {
        for b in [ecc_ak(), rsa_ak()] {
            let p = Public::parse(&b).unwrap();
            assert_eq!(p.to_bytes(), b);
            assert_eq!(Public::parse_tpmt(&b[2..]).unwrap(), p);
            assert_eq!(p.name_alg(), HashAlg::Sha256);
            assert_eq!(p.attributes(), 0x0005_0072);
            let name = p.name();
            assert_eq!(&name[..2], &[0x00, 0x0b]);
            assert_eq!(
                &name[2..],
                ring::digest::digest(&ring::digest::SHA256, &b[2..]).as_ref()
            );
        }
        assert_eq!(
            Public::parse(&rsa_ak()).unwrap().scheme(),
            KeyScheme::RsaSsa(HashAlg::Sha256)
        );
    }

    #[test]
    fn truncation_and_trailing_bytes() {
        for b in [ecc_ak(), rsa_ak()] {
            for n in 0..b.len() {
                assert!(matches!(
                    Public::parse(&b[..n]),
                    Err(TpmParseError::Truncated { .. })
                ));
            }
            // Trailing after the TPM2B, and inside it (size grown by one).
            let mut long = b.clone();
            long.push(0);
            assert_eq!(
                Public::parse(&long),
                Err(TpmParseError::TrailingBytes {
                    structure: "TPM2B_PUBLIC",
                    extra: 1
                })
            );
            let size = u16::from_be_bytes([b[0], b[1]]) + 1;
            long[..2].copy_from_slice(&size.to_be_bytes());
            assert_eq!(
                Public::parse(&long),
                Err(TpmParseError::TrailingBytes {
                    structure: "TPMT_PUBLIC",
                    extra: 1
                })
            );
        }
        let huge = [0x02, 0x01];
        assert!(matches!(
            Public::parse(&huge),
            Err(TpmParseError::TooLarge {
                field: "TPM2B_PUBLIC.size",
                len: 513,
                max: 512
            })
        ));
    }

    #[test]
    fn refuses_what_vkx_does_not_verify_with() {
        let with = |mut b: Vec<u8>, at: usize, v: &[u8]| {
            b[at..at + v.len()].copy_from_slice(v);
            Public::parse(&b)
        };
        // KEYEDHASH object.
        assert!(matches!(
            with(ecc_ak(), 2, &[0x00, 0x08]),
            Err(TpmParseError::UnsupportedAlgorithm { field: "type", .. })
        ));
        // SHA-1 nameAlg.
        assert!(matches!(
            with(ecc_ak(), 4, &[0x00, 0x04]),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "nameAlg",
                ..
            })
        ));
        // Reserved attribute bit 31.
        assert!(matches!(
            with(ecc_ak(), 6, &[0x80]),
            Err(TpmParseError::InvalidValue {
                field: "objectAttributes",
                ..
            })
        ));
        // authPolicy larger than 64.
        assert!(matches!(
            with(ecc_ak(), 10, &[0x00, 0x41]),
            Err(TpmParseError::TooLarge {
                field: "authPolicy",
                ..
            })
        ));
        // SM4 symmetric.
        assert!(matches!(
            with(ecc_ak(), 12, &[0x00, 0x13]),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "symmetric.algorithm",
                ..
            })
        ));
        // ECDAA scheme on an ECC key; RSAES on an RSA key; ECDSA on RSA.
        assert!(matches!(
            with(ecc_ak(), 14, &[0x00, 0x1a]),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "eccScheme",
                ..
            })
        ));
        assert!(matches!(
            with(rsa_ak(), 14, &[0x00, 0x15]),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "rsaScheme",
                ..
            })
        ));
        assert!(matches!(
            with(rsa_ak(), 14, &[0x00, 0x18]),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "rsaScheme",
                ..
            })
        ));
        // P-384.
        assert_eq!(
            with(ecc_ak(), 18, &[0x00, 0x04]),
            Err(TpmParseError::Unsupported {
                field: "curveID",
                value: 4
            })
        );
        // A KDF.
        assert!(matches!(
            with(ecc_ak(), 20, &[0x00, 0x20]),
            Err(TpmParseError::UnsupportedAlgorithm { field: "kdf", .. })
        ));
        // x of 33 bytes.
        assert!(matches!(
            with(ecc_ak(), 22, &[0x00, 0x21]),
            Err(TpmParseError::TooLarge {
                field: "unique.x",
                ..
            })
        ));
        // RSA-3072, exponent 3, short modulus.
        assert_eq!(
            with(rsa_ak(), 18, &[0x0c, 0x00]),
            Err(TpmParseError::Unsupported {
                field: "keyBits",
                value: 3072
            })
        );
        assert_eq!(
            with(rsa_ak(), 20, &[0, 0, 0, 3]),
            Err(TpmParseError::Unsupported {
                field: "exponent",
                value: 3
            })
        );
        let mut short = rsa_ak();
        short.truncate(short.len() - 1);
        short[24..26].copy_from_slice(&255u16.to_be_bytes());
        short[..2].copy_from_slice(&(0x0118u16 - 1).to_be_bytes());
        assert!(matches!(
            Public::parse(&short),
            Err(TpmParseError::InvalidValue {
                field: "unique.rsa",
                ..
            })
        ));
    }
}
