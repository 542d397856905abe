//! The signed envelope a source carries and the host persists
//! (spec/ROLLOUT.md §7): `{"document": {...}, "signature": {"key_id",
//! "ed25519"}}`, the signature optional. Ed25519 (ring) over
//! [`SIGNING_CONTEXT`] followed by the document's canonical bytes, which
//! a verifier recomputes from the parsed document, never taking the
//! sender's bytes as they are.
//!
//! What it trusts: host.toml's [`TrustedKeys`] and the operator's private
//! key file (refused if group or others may read it). What it bounds: the
//! envelope's size before parsing, key ids, the number of trusted keys.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::document::{Document, DocumentError, DocumentWire, check_size, from_json, to_json};
use super::shown;

/// The domain-separation prefix of every rollout signature.
pub const SIGNING_CONTEXT: &[u8] = b"vkx-rollout-v1\0";
/// Longest key id: a short label such as `release-2026`.
pub const MAX_KEY_ID: usize = 64;
/// Trusted keys in host.toml: a current and a next key per signer, for a
/// handful of signers.
pub const MAX_TRUSTED_KEYS: usize = 16;
/// Largest private key file read: an Ed25519 PKCS#8 document is 83 or 85
/// bytes.
pub const MAX_PRIVATE_KEY_BYTES: u64 = 1024;
/// Ed25519 signature and public key lengths.
const SIGNATURE_LEN: usize = 64;
const PUBLIC_KEY_LEN: usize = 32;

/// Why a key, key file or trusted-key list was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "rollout signing key {shown} has mode {mode:04o}: group or others may read it, so it is \
         refused. If anyone else could have read it, generate a new key and remove the old one \
         from every host.toml; otherwise restrict it with `chmod 600 {shown}`",
        shown = .path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "rollout signing key {}: not an Ed25519 PKCS#8 (DER) private key of at most \
         {MAX_PRIVATE_KEY_BYTES} bytes ({reason})",
        path.display()
    )]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error("key generation failed")]
    Generate,
    #[error("key id \"{id}\": 1..={MAX_KEY_ID} characters of [A-Za-z0-9._-]")]
    BadKeyId { id: String },
    #[error("trusted key \"{id}\": public_key must be {PUBLIC_KEY_LEN} bytes in hex")]
    BadPublicKey { id: String },
    #[error("trusted key \"{id}\" is listed twice")]
    DuplicateKeyId { id: String },
    #[error("{count} trusted rollout keys; at most {MAX_TRUSTED_KEYS}")]
    TooManyKeys { count: usize },
}

// ------------------------------------------------------------- envelope

/// A parsed envelope: a valid document and, maybe, a signature (not yet
/// verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub document: Document,
    pub signature: Option<Signature>,
}

/// A signature as carried: who claims to have signed, and the 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key_id: String,
    pub ed25519: [u8; SIGNATURE_LEN],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeWire {
    document: DocumentWire,
    #[serde(default)]
    signature: Option<SignatureWire>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SignatureWire {
    key_id: String,
    ed25519: String,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    document: &'a Document,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<SignatureWire>,
}

impl Envelope {
    /// Parses and validates envelope bytes (at most
    /// [`super::document::MAX_DOCUMENT_BYTES`]). Does not verify the
    /// signature: see [`TrustedKeys::verify`].
    pub fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        check_size(bytes)?;
        let wire: EnvelopeWire = from_json(bytes)?;
        let document = wire.document.validate()?;
        let signature = wire.signature.map(SignatureWire::validate).transpose()?;
        Ok(Self {
            document,
            signature,
        })
    }
}

impl SignatureWire {
    fn validate(self) -> Result<Signature, DocumentError> {
        check_key_id(&self.key_id).map_err(|_| {
            DocumentError::Signature(format!(
                "key_id \"{}\" is not 1..={MAX_KEY_ID} characters of [A-Za-z0-9._-]",
                shown(&self.key_id)
            ))
        })?;
        let mut ed25519 = [0u8; SIGNATURE_LEN];
        hex::decode_to_slice(&self.ed25519, &mut ed25519).map_err(|_| {
            DocumentError::Signature(format!(
                "ed25519 must be {SIGNATURE_LEN} bytes in hex ({} hex digits)",
                SIGNATURE_LEN * 2
            ))
        })?;
        Ok(Signature {
            key_id: self.key_id,
            ed25519,
        })
    }
}

/// The bytes an Ed25519 signature covers: [`SIGNING_CONTEXT`] then the
/// document's canonical bytes.
pub fn signed_message(document: &Document) -> Vec<u8> {
    let mut message = SIGNING_CONTEXT.to_vec();
    message.extend_from_slice(&document.canonical_bytes());
    message
}

/// The envelope bytes of `document` signed with `key` under `key_id`.
pub fn sign(document: &Document, key: &Ed25519KeyPair, key_id: &str) -> Result<Vec<u8>, KeyError> {
    check_key_id(key_id)?;
    let signature = key.sign(&signed_message(document));
    Ok(to_json(&EnvelopeOut {
        document,
        signature: Some(SignatureWire {
            key_id: key_id.to_owned(),
            ed25519: hex::encode(signature.as_ref()),
        }),
    }))
}

/// The envelope bytes of `document` without a signature: admitted only
/// if the change narrows (spec/ROLLOUT.md §8).
pub fn unsigned(document: &Document) -> Vec<u8> {
    to_json(&EnvelopeOut {
        document,
        signature: None,
    })
}

fn check_key_id(id: &str) -> Result<(), KeyError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_KEY_ID
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadKeyId { id: shown(id) })
    }
}

// --------------------------------------------------------- trusted keys

/// One trusted signer as host.toml lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    pub id: String,
    /// The Ed25519 public key, 32 bytes in hex.
    pub public_key: String,
}

/// The keys whose signatures may widen a rollout. Deserialises from a
/// list of [`TrustedKey`] and validates it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<TrustedKey>")]
pub struct TrustedKeys {
    keys: BTreeMap<String, [u8; PUBLIC_KEY_LEN]>,
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    UnknownKey,
    BadSignature,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = TrustedKey>) -> Result<Self, KeyError> {
        let mut out = BTreeMap::new();
        for key in keys {
            if out.len() == MAX_TRUSTED_KEYS {
                return Err(KeyError::TooManyKeys {
                    count: MAX_TRUSTED_KEYS + 1,
                });
            }
            check_key_id(&key.id)?;
            let mut public = [0u8; PUBLIC_KEY_LEN];
            hex::decode_to_slice(&key.public_key, &mut public)
                .map_err(|_| KeyError::BadPublicKey { id: key.id.clone() })?;
            if out.insert(key.id.clone(), public).is_some() {
                return Err(KeyError::DuplicateKeyId { id: key.id });
            }
        }
        Ok(Self { keys: out })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The public key with id `id`.
    pub fn public_key(&self, id: &str) -> Option<&[u8; PUBLIC_KEY_LEN]> {
        self.keys.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Verifies `signature` over `document` (the canonical bytes, after
    /// [`SIGNING_CONTEXT`]).
    pub fn verify(&self, document: &Document, signature: &Signature) -> Result<(), VerifyError> {
        let public = self
            .public_key(&signature.key_id)
            .ok_or(VerifyError::UnknownKey)?;
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&signed_message(document), &signature.ed25519)
            .map_err(|_| VerifyError::BadSignature)
    }
}

impl TryFrom<Vec<TrustedKey>> for TrustedKeys {
    type Error = KeyError;
    fn try_from(keys: Vec<TrustedKey>) -> Result<Self, KeyError> {
        Self::new(keys)
    }
}

// ------------------------------------------------------------ key files

/// A new Ed25519 signing key: its PKCS#8 (DER) bytes and the public key
/// in hex (what host.toml's trusted key lists).
pub fn keygen() -> Result<(Zeroizing<Vec<u8>>, String), KeyError> {
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| KeyError::Generate)?;
    Ok((
        Zeroizing::new(pkcs8.as_ref().to_vec()),
        public_key_hex(&pair),
    ))
}

/// The public key of `pair` in hex.
pub fn public_key_hex(pair: &Ed25519KeyPair) -> String {
    hex::encode(pair.public_key().as_ref())
}

/// Writes a new private key file readable by its owner only; never
/// overwrites an existing file.
pub fn write_signing_key(path: &Path, pkcs8: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = crate::fsutil::create_private_file(path).map_err(io)?;
    file.write_all(pkcs8)
        .and_then(|()| file.sync_all())
        .map_err(io)
}

/// Loads an Ed25519 PKCS#8 (DER) private key. Refuses a file that group
/// or others may read, that is not a regular file, or that is too large.
pub fn load_signing_key(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: &str| KeyError::BadPrivateKey {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // The metadata of the file opened, not of whatever the path names now.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(bad("not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    if meta.len() > MAX_PRIVATE_KEY_BYTES {
        return Err(bad("too large"));
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_PRIVATE_KEY_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&bytes).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::document::EXAMPLE;

    fn pair(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn trusted(pairs: &[(&str, &Ed25519KeyPair)]) -> TrustedKeys {
        TrustedKeys::new(pairs.iter().map(|(id, p)| TrustedKey {
            id: (*id).to_owned(),
            public_key: public_key_hex(p),
        }))
        .unwrap()
    }

    #[test]
    fn sign_then_verify_and_forgeries_fail() {
        let doc = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let key = pair(1);
        let bytes = sign(&doc, &key, "release-2026").unwrap();
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.document, doc);
        let sig = env.signature.unwrap();
        let keys = trusted(&[("release-2026", &key)]);
        assert_eq!(keys.verify(&doc, &sig), Ok(()));
        let mut flipped = sig.clone();
        flipped.ed25519[10] ^= 0x01;
        assert_eq!(keys.verify(&doc, &flipped), Err(VerifyError::BadSignature));
        let other = trusted(&[("release-2026", &pair(2))]);
        assert_eq!(other.verify(&doc, &sig), Err(VerifyError::BadSignature));
        let renamed = Signature {
            key_id: "nobody".into(),
            ..sig
        };
        assert_eq!(keys.verify(&doc, &renamed), Err(VerifyError::UnknownKey));
        assert!(
            Envelope::parse(&unsigned(&doc))
                .unwrap()
                .signature
                .is_none()
        );
    }

    #[test]
    fn verification_uses_canonical_bytes_not_the_senders() {
        // The same document with other whitespace and key order verifies.
        let doc = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let key = pair(1);
        let sig = key.sign(&signed_message(&doc));
        let text = format!(
            r#"{{ "signature": {{"ed25519": "{}", "key_id": "k"}}, "document": {EXAMPLE} }}"#,
            hex::encode(sig.as_ref())
        );
        let env = Envelope::parse(text.as_bytes()).unwrap();
        let keys = trusted(&[("k", &key)]);
        assert_eq!(keys.verify(&env.document, &env.signature.unwrap()), Ok(()));
    }

    #[test]
    fn envelope_is_strict() {
        let doc = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let body = String::from_utf8(unsigned(&doc)).unwrap();
        let cases = [
            body.replacen('{', r#"{"extra":1,"#, 1),
            format!(r#"{{"document":{EXAMPLE},"signature":{{"key_id":"k","ed25519":"00"}}}}"#),
            format!(r#"{{"document":{EXAMPLE},"document":{EXAMPLE}}}"#),
            format!(
                r#"{{"document":{EXAMPLE},"signature":{{"key_id":"k","ed25519":"{}","x":1}}}}"#,
                "00".repeat(64)
            ),
            format!(
                r#"{{"document":{EXAMPLE},"signature":{{"key_id":"k k","ed25519":"{}"}}}}"#,
                "00".repeat(64)
            ),
        ];
        for case in cases {
            assert!(Envelope::parse(case.as_bytes()).is_err(), "{case}");
        }
    }

    #[test]
    fn trusted_keys_are_strict() {
        let k = |id: &str, pk: &str| TrustedKey {
            id: id.into(),
            public_key: pk.into(),
        };
        let good = hex::encode([7u8; 32]);
        assert!(TrustedKeys::new([k("a", &good)]).is_ok());
        assert!(matches!(
            TrustedKeys::new([k("a", &good), k("a", &good)]),
            Err(KeyError::DuplicateKeyId { .. })
        ));
        assert!(matches!(
            TrustedKeys::new([k("a", "abcd")]),
            Err(KeyError::BadPublicKey { .. })
        ));
        assert!(matches!(
            TrustedKeys::new([k("", &good)]),
            Err(KeyError::BadKeyId { .. })
        ));
        let many = (0..=MAX_TRUSTED_KEYS).map(|i| k(&format!("k{i}"), &good));
        assert!(matches!(
            TrustedKeys::new(many),
            Err(KeyError::TooManyKeys { .. })
        ));
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Config {
            trusted_key: TrustedKeys,
        }
        let c: Config = toml::from_str(&format!(
            "[[trusted_key]]\nid = \"release-2026\"\npublic_key = \"{good}\"\n"
        ))
        .unwrap();
        assert!(c.trusted_key.public_key("release-2026").is_some());
        let e = toml::from_str::<Config>(&format!(
            "[[trusted_key]]\nid = \"a\"\npublic_key = \"{good}\"\nextra = 1\n"
        ));
        assert!(e.is_err());
    }

    #[test]
    fn key_files_round_trip_and_exposed_keys_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollout-signing.pk8");
        let (pkcs8, public) = keygen().unwrap();
        write_signing_key(&path, &pkcs8).unwrap();
        assert!(
            write_signing_key(&path, &pkcs8).is_err(),
            "never overwrites"
        );
        let pair = load_signing_key(&path).unwrap();
        assert_eq!(public_key_hex(&pair), public);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_signing_key(&path).unwrap_err();
        assert!(matches!(e, KeyError::Exposed { mode: 0o640, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not a key").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_signing_key(&junk),
            Err(KeyError::BadPrivateKey { .. })
        ));
    }
}
