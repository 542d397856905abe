//! The messages of protocol v1 (PROTOCOL.md §6, `spec/vkx.cddl`).
//!
//! Every message is `[type, {body}]`. Each body type knows how to read
//! itself from a [`Reader`], write itself to a [`Writer`], and check the
//! value rules of §5 rule 7 that CDDL cannot say (`validate`). Decoding and
//! encoding run the same `validate`, so a value this side cannot encode is
//! also a value it would refuse to receive.
//!
//! Limits are named constants with the reason for their size; the typed
//! decoder checks each one before it copies anything.
//!
//! One file per message family, as rustls' `msgs/`: [`names`] (the
//! checked name types), [`enums`] (small enums and shared field readers),
//! [`handshake`], [`keys`], [`control`], [`summary`] (log lines); this
//! file holds the limits and the plumbing every body shares (the
//! [`MessageType`] table and [`Message`]).

use std::collections::BTreeMap;
use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::codec::{Fields, Reader, Writer, check_len};
use super::error_code::ErrorCode;
use super::{DecodeError, EncodeError, MAX_FRAME_PAYLOAD, scan};

mod control;
mod enums;
mod handshake;
mod keys;
mod names;
mod summary;

pub use control::*;
pub use enums::*;
pub use handshake::*;
pub use keys::*;
pub use names::*;
pub use summary::*;
#[allow(unused_imports)]
use {control::*, enums::*, handshake::*, keys::*, names::*};

/// Protocol version 1, the only version this implementation speaks.
pub const PROTOCOL_VERSION_1: u16 = 1;
/// Nonces are 256-bit: collision-free for any number of sessions.
pub const NONCE_LEN: usize = 32;
/// Session ids only need to be unique in logs of one node.
pub const SESSION_ID_LEN: usize = 16;
/// Key-confirmation tags: 128 bits, truncated HMAC-SHA-256.
pub const CONFIRM_TAG_LEN: usize = 16;
/// Agent names like "vkx-guest"; short so they are cheap to log.
pub const MAX_AGENT_NAME: usize = 32;
/// Semantic versions like "1.12.3-rc.1+abc".
pub const MAX_AGENT_VERSION: usize = 32;
/// VM identities: UUIDs (36) or libvirt-style names.
pub const MAX_VM_ID: usize = 64;
/// Key names as configured by operators.
pub const MAX_KEY_NAME: usize = 64;
/// Derivation purposes, e.g. "disk-unlock:v1".
pub const MAX_PURPOSE: usize = 64;
/// Error details are for logs: one short line.
pub const MAX_ERROR_DETAIL: usize = 128;
/// Keys per request; a VM needs a handful (disk, config, identity).
pub const MAX_KEYS_PER_REQUEST: usize = 16;
/// Key material: symmetric keys are 32 bytes and EC private keys in PKCS#8
/// under 200; 1 KiB bounds one key. Bulk secrets belong in storage that a
/// released key unlocks.
pub const MAX_KEY_MATERIAL: usize = 1024;
/// TPMS_ATTEST of a quote is ~150 bytes; the TPM's own bound
/// (sizeof TPMS_ATTEST) is under 1 KiB.
pub const MAX_TPM_ATTEST: usize = 1024;
/// TPMT_SIGNATURE: 72 bytes for ECDSA P-256, 262 for RSA-2048, 518 for
/// RSA-4096.
pub const MAX_TPM_SIGNATURE: usize = 1024;
/// DER AK certificate made at provisioning: typically 500-900 bytes.
pub const MAX_AK_CERT: usize = 4096;
/// TPM name: 2-byte nameAlg plus a digest of at most 64 bytes (SHA-512).
pub const MAX_AK_NAME: usize = 66;
/// An AK's TPM name is nameAlg || digest: at least 22 bytes (SHA-1).
pub const MIN_AK_NAME: usize = 22;
/// PCR banks: SHA-1, SHA-256, SHA-384, SHA-512.
pub const MAX_PCR_BANKS: usize = 4;
/// PCRs per bank in a PC-client TPM.
pub const MAX_PCRS_PER_BANK: usize = 24;
/// Features in the rollout map; v1 defines three.
pub const MAX_FEATURES: usize = 64;
/// Shortest derived key: 128 bits.
pub const MIN_DERIVE_LEN: u8 = 16;
/// Longest derived key: 512 bits.
pub const MAX_DERIVE_LEN: u8 = 64;
/// Re-attestation interval bounds: 5 minutes to 7 days. Every
/// re-attestation is a connection attempt under the guest's retry budget
/// (30 per hour, §13.3), so shorter intervals would exhaust it.
pub const MIN_REATTEST_AFTER_S: u32 = 300;
pub const MAX_REATTEST_AFTER_S: u32 = 604_800;
/// Longest retry-after hint: 24 hours, in milliseconds.
pub const MAX_RETRY_AFTER_MS: u32 = 86_400_000;
/// vsock CIDs 0-2 are reserved (hypervisor, loopback, host); u32::MAX is
/// VMADDR_CID_ANY.
pub const MIN_GUEST_CID: u32 = 3;
pub const MAX_GUEST_CID: u32 = u32::MAX - 1;

// ----------------------------------------------------------- body plumbing

pub(super) trait Body: Sized {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
    fn write(&self, w: &mut Writer);
    /// §5 rule 7 and the size limits, for both directions.
    fn validate(&self) -> Result<(), DecodeError>;
    /// A capacity that holds the whole encoding (see [`Writer::with_capacity`]).
    fn capacity_hint(&self) -> usize {
        256
    }
}

/// The message types of v1, with their wire codes (PROTOCOL.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageType {
    Hello,
    Challenge,
    Evidence,
    AttestationResult,
    KeyRequest,
    KeyRelease,
    DeriveRequest,
    DeriveConfirm,
    KeyUpdate,
    KeyUpdateAck,
    Ping,
    Pong,
    Error,
    Goodbye,
    FeatureUpdate,
}

impl MessageType {
    /// Every v1 type, in code order (code = index + 1).
    pub const ALL: [MessageType; 15] = [
        Self::Hello,
        Self::Challenge,
        Self::Evidence,
        Self::AttestationResult,
        Self::KeyRequest,
        Self::KeyRelease,
        Self::DeriveRequest,
        Self::DeriveConfirm,
        Self::KeyUpdate,
        Self::KeyUpdateAck,
        Self::Ping,
        Self::Pong,
        Self::Error,
        Self::Goodbye,
        Self::FeatureUpdate,
    ];

    pub fn code(self) -> u8 {
        match self {
            Self::Hello => 1,
            Self::Challenge => 2,
            Self::Evidence => 3,
            Self::AttestationResult => 4,
            Self::KeyRequest => 5,
            Self::KeyRelease => 6,
            Self::DeriveRequest => 7,
            Self::DeriveConfirm => 8,
            Self::KeyUpdate => 9,
            Self::KeyUpdateAck => 10,
            Self::Ping => 11,
            Self::Pong => 12,
            Self::Error => 13,
            Self::Goodbye => 14,
            Self::FeatureUpdate => 15,
        }
    }

    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| u64::from(t.code()) == code)
    }

    /// The CDDL rule name, e.g. `key-request`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::Challenge => "challenge",
            Self::Evidence => "evidence",
            Self::AttestationResult => "attestation-result",
            Self::KeyRequest => "key-request",
            Self::KeyRelease => "key-release",
            Self::DeriveRequest => "derive-request",
            Self::DeriveConfirm => "derive-confirm",
            Self::KeyUpdate => "key-update",
            Self::KeyUpdateAck => "key-update-ack",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Error => "error",
            Self::Goodbye => "goodbye",
            Self::FeatureUpdate => "feature-update",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.name() == name)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

macro_rules! messages {
    ($($variant:ident($body:ident)),+ $(,)?) => {
        /// One protocol message.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Message {
            $($variant($body),)+
        }

        impl Message {
            pub fn message_type(&self) -> MessageType {
                match self {
                    $(Self::$variant(_) => MessageType::$variant,)+
                }
            }

            fn read_body(t: MessageType, r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                match t {
                    $(MessageType::$variant => {
                        let b = $body::read(r)?;
                        b.validate()?;
                        Ok(Self::$variant(b))
                    })+
                }
            }

            fn validate(&self) -> Result<(), DecodeError> {
                match self {
                    $(Self::$variant(b) => b.validate(),)+
                }
            }

            fn write_body(&self, w: &mut Writer) {
                match self {
                    $(Self::$variant(b) => b.write(w),)+
                }
            }

            fn capacity_hint(&self) -> usize {
                match self {
                    $(Self::$variant(b) => b.capacity_hint(),)+
                }
            }

            /// Builds a message from its JSON body, as written in the test
            /// vectors (`decoded`), given the message's CDDL name.
            #[cfg(feature = "serde")]
            pub fn from_json(name: &str, body: serde_json::Value) -> Result<Self, String> {
                let t = MessageType::from_name(name).ok_or_else(|| format!("unknown message name {name}"))?;
                match t {
                    $(MessageType::$variant => serde_json::from_value::<$body>(body)
                        .map(Self::$variant)
                        .map_err(|e| e.to_string()),)+
                }
            }

            /// The JSON body of this message, as in the test vectors.
            #[cfg(feature = "serde")]
            pub fn to_json(&self) -> serde_json::Value {
                match self {
                    // Serialising plain data structures to a Value cannot fail.
                    $(Self::$variant(b) => serde_json::to_value(b).unwrap_or_default(),)+
                }
            }
        }

        $(
            impl From<$body> for Message {
                fn from(b: $body) -> Self {
                    Self::$variant(b)
                }
            }
        )+
    };
}

messages! {
    Hello(Hello),
    Challenge(Challenge),
    Evidence(Evidence),
    AttestationResult(AttestationResult),
    KeyRequest(KeyRequest),
    KeyRelease(KeyRelease),
    DeriveRequest(DeriveRequest),
    DeriveConfirm(DeriveConfirm),
    KeyUpdate(KeyUpdate),
    KeyUpdateAck(KeyUpdateAck),
    Ping(Ping),
    Pong(Pong),
    Error(ErrorMessage),
    Goodbye(Goodbye),
    FeatureUpdate(FeatureUpdate),
}

impl Message {
    /// Decodes one v1 message from a frame payload, accepting exactly what
    /// PROTOCOL.md §5 and §6 allow.
    pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        if input.len() > MAX_FRAME_PAYLOAD {
            return Err(DecodeError::MessageTooLarge {
                max: MAX_FRAME_PAYLOAD,
            });
        }
        scan::scan(input)?;
        let msg = Self::decode_scanned(input)?;
        // Gate 3: the input must be the one encoding of its value. Where
        // both carry key material, compared in constant time.
        let again = msg.encode_unchecked();
        let same = if msg.carries_key_material() {
            bool::from(subtle::ConstantTimeEq::ct_eq(again.as_slice(), input))
        } else {
            again.as_slice() == input
        };
        if !same {
            return Err(DecodeError::NonCanonical);
        }
        Ok(msg)
    }

    /// Whether the message holds [`KeyMaterial`] (key-release,
    /// key-update).
    pub fn carries_key_material(&self) -> bool {
        matches!(self, Self::KeyRelease(_) | Self::KeyUpdate(_))
    }

    /// Gate 2 alone: the typed decode of input that passed the scan. Public
    /// for the fuzz targets, which check that gate 3 is never needed.
    #[doc(hidden)]
    pub fn decode_scanned(input: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        r.array("message", 2, 2)?;
        let code = r.uint("message type")?;
        if !r.at_map() {
            return Err(DecodeError::WrongType {
                field: "message body",
            });
        }
        let t = MessageType::from_code(code)
            .ok_or(DecodeError::UnknownMessage { message_type: code })?;
        Self::read_body(t, &mut r)
    }

    /// The message type of a payload whose envelope is intact (§5.5 steps
    /// 1-2), whether or not its body is valid: the sessions use it so that
    /// a malformed `error` is never answered (§8.3).
    pub fn envelope_type(input: &[u8]) -> Option<u64> {
        if input.len() > MAX_FRAME_PAYLOAD || scan::scan(input).is_err() {
            return None;
        }
        let mut r = Reader::new(input);
        r.array("message", 2, 2).ok()?;
        let code = r.uint("message type").ok()?;
        r.at_map().then_some(code)
    }

    /// Encodes the message. Fails if the value breaks a wire rule (a local
    /// bug: the same check refuses such a value when it is received).
    /// The buffer is zeroized on drop: some messages carry key material.
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>, EncodeError> {
        self.validate().map_err(EncodeError::Invalid)?;
        let out = self.encode_unchecked();
        if out.len() > MAX_FRAME_PAYLOAD {
            return Err(EncodeError::TooLarge { len: out.len() });
        }
        Ok(out)
    }

    fn encode_unchecked(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(self.capacity_hint());
        w.array(2);
        w.uint(u64::from(self.message_type().code()));
        self.write_body(&mut w);
        w.into_bytes()
    }
}

/// Counts the entries of a map body: required ones plus present options.
pub(super) fn entries(required: usize, optional: &[bool]) -> usize {
    required + optional.iter().filter(|p| **p).count()
}

/// Reads an array of `min..=max` items named `field`, each with `item`.
/// The count is checked ([`Reader::array`]) before anything is allocated.
pub(super) fn read_array<T>(
    r: &mut Reader<'_>,
    field: &'static str,
    min: usize,
    max: usize,
    mut item: impl FnMut(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let n = r.array(field, min, max)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        items.push(item(r)?);
    }
    Ok(items)
}

/// Writes `items` as an array, each with `item`.
pub(super) fn write_array<T>(w: &mut Writer, items: &[T], mut item: impl FnMut(&mut Writer, &T)) {
    w.array(items.len());
    for x in items {
        item(w, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_never_shows_key_material() {
        let m = Message::KeyUpdate(KeyUpdate {
            update_id: 1,
            key: ReleasedKey {
                name: KeyName::new("disk").unwrap(),
                version: 2,
                material: KeyMaterial::new(vec![0xAB; 32]),
            },
        });
        let s = m.summary().to_string();
        assert_eq!(s, "key-update update-id=1 key=disk@v2(32B)");
        let dbg = format!("{m:?}");
        assert!(
            !dbg.to_lowercase().contains("ab, ab") && !dbg.contains("171"),
            "{dbg}"
        );
        assert!(dbg.contains("REDACTED"));
    }

    /// The writer's buffer is sized up front (`capacity_hint`): a
    /// reallocation would free a copy of the key material unzeroized.
    /// `Vec::with_capacity` gives exactly the capacity asked for, so a
    /// grown buffer would show a larger one.
    #[test]
    fn key_carrying_encodings_never_reallocate() {
        let key = |i: usize| ReleasedKey {
            name: KeyName::new(format!("{i:02}{}", "k".repeat(MAX_KEY_NAME - 2))).unwrap(),
            version: u32::MAX,
            material: KeyMaterial::new(vec![0xA5; MAX_KEY_MATERIAL]),
        };
        let release = Message::KeyRelease(KeyRelease {
            released: (0..MAX_KEYS_PER_REQUEST).map(key).collect(),
            refused: Vec::new(),
        });
        let update = Message::KeyUpdate(KeyUpdate {
            update_id: u64::MAX,
            key: key(0),
        });
        for m in [release, update] {
            assert!(m.carries_key_material());
            let out = m.encode().unwrap();
            assert_eq!(out.capacity(), m.capacity_hint(), "{}", m.summary());
            // And the decoder's re-encoding (gate 3) accepts it.
            assert!(Message::decode(&out).unwrap() == m);
        }
    }

    #[test]
    fn key_material_is_compared_by_content_and_length() {
        let a = KeyMaterial::new(vec![1, 2, 3]);
        assert!(a == KeyMaterial::new(vec![1, 2, 3]));
        assert!(a != KeyMaterial::new(vec![1, 2, 4]));
        assert!(a != KeyMaterial::new(vec![1, 2]));
        assert!(a != KeyMaterial::new(vec![1, 2, 3, 0]));
    }
}
