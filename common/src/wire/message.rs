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

use std::collections::BTreeMap;
use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::codec::{Fields, Reader, Writer, check_len};
use super::error_code::ErrorCode;
use super::{DecodeError, EncodeError, MAX_FRAME_PAYLOAD, scan};

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

// ------------------------------------------------------------------ names

/// The characters allowed in names (§5 rule 7): printable ASCII without
/// spaces, quotes or escapes, so a name can be logged as it is.
fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'+' | b'-')
}

fn check_name(field: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
    check_len(field, s.len(), 1, max)?;
    if !s.bytes().all(is_name_char) {
        return Err(DecodeError::InvalidValue {
            field,
            rule: "character outside [A-Za-z0-9._:+-]",
        });
    }
    Ok(())
}

macro_rules! wire_name {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        #[cfg_attr(feature = "serde", serde(try_from = "String", into = "String"))]
        pub struct $name(String);

        impl $name {
            pub const FIELD: &'static str = $field;
            pub const MAX_LEN: usize = $max;

            pub fn new(s: impl Into<String>) -> Result<Self, DecodeError> {
                let s = s.into();
                check_name($field, &s, $max)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Self::new(r.text($field, 1, $max)?)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = DecodeError;
            fn try_from(s: String) -> Result<Self, DecodeError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }
    };
}

wire_name!(
    /// The agent's program name, e.g. `vkx-guest`.
    AgentName, "agent-name", MAX_AGENT_NAME
);
wire_name!(
    /// The agent's version, e.g. `0.1.0`.
    AgentVersion, "agent-version", MAX_AGENT_VERSION
);
wire_name!(
    /// The host-observed identity of a VM.
    VmId, "vm-id", MAX_VM_ID
);
wire_name!(
    /// The name of a key in the host's store.
    KeyName, "key-name", MAX_KEY_NAME
);
wire_name!(
    /// The purpose label of a derived key.
    Purpose, "purpose", MAX_PURPOSE
);

/// A short diagnostic text in an error message: the name characters plus
/// space.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "String", into = "String"))]
pub struct ErrorDetail(String);

impl ErrorDetail {
    pub fn new(s: impl Into<String>) -> Result<Self, DecodeError> {
        let s = s.into();
        check_len("error-detail", s.len(), 1, MAX_ERROR_DETAIL)?;
        if !s.bytes().all(|c| c == b' ' || is_name_char(c)) {
            return Err(DecodeError::InvalidValue {
                field: "error-detail",
                rule: "character outside [A-Za-z0-9._:+- ]",
            });
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ErrorDetail {
    type Error = DecodeError;
    fn try_from(s: String) -> Result<Self, DecodeError> {
        Self::new(s)
    }
}

impl From<ErrorDetail> for String {
    fn from(d: ErrorDetail) -> String {
        d.0
    }
}

// ----------------------------------------------------------------- secrets

/// Key material in transit. Zeroized on drop; `Debug` shows only the
/// length; equality does not stop at the first difference.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial(Vec<u8>);

const _: () = crate::assert_zeroize_on_drop::<KeyMaterial>();

impl KeyMaterial {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial([REDACTED; {} bytes])", self.0.len())
    }
}

/// Constant time in the contents (`subtle`); lengths are public (the wire
/// shows them).
impl PartialEq for KeyMaterial {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        // ct_eq on slices of different lengths is false, without looking
        // at the contents.
        bool::from(self.0.as_slice().ct_eq(other.0.as_slice()))
    }
}

impl Eq for KeyMaterial {}

// ------------------------------------------------------------ small enums

/// TPM_ALG_ID of a PCR bank's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    pub fn tpm_alg_id(self) -> u16 {
        match self {
            Self::Sha1 => 0x0004,
            Self::Sha256 => 0x000B,
            Self::Sha384 => 0x000C,
            Self::Sha512 => 0x000D,
        }
    }

    pub fn from_tpm_alg_id(id: u64) -> Option<Self> {
        match id {
            0x0004 => Some(Self::Sha1),
            0x000B => Some(Self::Sha256),
            0x000C => Some(Self::Sha384),
            0x000D => Some(Self::Sha512),
            _ => None,
        }
    }

    /// The bank's name as tpm2-tools and the policy file write it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    /// The bank for a name (case-insensitive), e.g. `sha256`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Sha1, Self::Sha256, Self::Sha384, Self::Sha512]
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
    }

    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = r.uint("hash-alg")?;
        Self::from_tpm_alg_id(id).ok_or(DecodeError::InvalidValue {
            field: "hash-alg",
            rule: "not sha1, sha256, sha384 or sha512",
        })
    }
}

/// The rollout state of one feature for one VM (§12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum FeatureState {
    Enabled,
    /// Switched off by the kill switch.
    Disabled,
    /// The staged rollout has not reached this VM yet.
    NotYet,
}

impl FeatureState {
    fn value(self) -> u64 {
        match self {
            Self::Enabled => 0,
            Self::Disabled => 1,
            Self::NotYet => 2,
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.uint("feature-state")? {
            0 => Ok(Self::Enabled),
            1 => Ok(Self::Disabled),
            2 => Ok(Self::NotYet),
            _ => Err(DecodeError::InvalidValue {
                field: "feature-state",
                rule: "not 0, 1 or 2",
            }),
        }
    }
}

/// Feature ids of v1 (§12). Guests ignore ids they do not know.
pub mod feature {
    pub const KEY_RELEASE: u16 = 1;
    pub const KEY_DERIVATION: u16 = 2;
    pub const KEY_ROTATION: u16 = 3;
}

/// The rollout state of every feature for one VM. A feature absent from
/// the map is disabled.
pub type Features = BTreeMap<u16, FeatureState>;

/// Why a side closes the session in an orderly way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum GoodbyeReason {
    Normal,
    Shutdown,
    /// The guest must reconnect and attest again.
    Reattest,
    /// The session was idle too long.
    Idle,
}

impl GoodbyeReason {
    fn value(self) -> u64 {
        match self {
            Self::Normal => 0,
            Self::Shutdown => 1,
            Self::Reattest => 2,
            Self::Idle => 3,
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.uint("goodbye-reason")? {
            0 => Ok(Self::Normal),
            1 => Ok(Self::Shutdown),
            2 => Ok(Self::Reattest),
            3 => Ok(Self::Idle),
            _ => Err(DecodeError::InvalidValue {
                field: "goodbye-reason",
                rule: "not 0..3",
            }),
        }
    }
}

fn validate_error_code(code: ErrorCode) -> Result<(), DecodeError> {
    if code.value() == 0 {
        return Err(DecodeError::InvalidValue {
            field: "error-code",
            rule: "out of range",
        });
    }
    Ok(())
}

fn read_error_code(r: &mut Reader<'_>) -> Result<ErrorCode, DecodeError> {
    let v = r.uint_in("error-code", 1, u64::from(u16::MAX))?;
    // In range 1..=u16::MAX, so the conversion and lookup cannot fail.
    u16::try_from(v)
        .ok()
        .and_then(ErrorCode::from_value)
        .ok_or(DecodeError::InvalidValue {
            field: "error-code",
            rule: "out of range",
        })
}

fn read_u16(r: &mut Reader<'_>, field: &'static str, min: u16) -> Result<u16, DecodeError> {
    let v = r.uint_in(field, u64::from(min), u64::from(u16::MAX))?;
    u16::try_from(v).map_err(|_| DecodeError::InvalidValue {
        field,
        rule: "out of range",
    })
}

fn read_u32(
    r: &mut Reader<'_>,
    field: &'static str,
    min: u32,
    max: u32,
) -> Result<u32, DecodeError> {
    let v = r.uint_in(field, u64::from(min), u64::from(max))?;
    u32::try_from(v).map_err(|_| DecodeError::InvalidValue {
        field,
        rule: "out of range",
    })
}

fn strictly_ascending<T: Ord>(items: &[T], field: &'static str) -> Result<(), DecodeError> {
    if items.windows(2).all(|w| w[0] < w[1]) {
        Ok(())
    } else {
        Err(DecodeError::InvalidValue {
            field,
            rule: "not strictly ascending",
        })
    }
}

#[cfg(feature = "serde")]
mod hex_bytes {
    //! Byte strings as lowercase hex in JSON test vectors.
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<Vec<u8>>>(
        d: D,
    ) -> Result<T, D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        T::try_from(v).map_err(|_| serde::de::Error::custom("wrong length"))
    }
}

#[cfg(feature = "serde")]
mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(feature = "serde")]
mod hex_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        m: &BTreeMap<u8, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, hex::encode(v))))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u8, Vec<u8>>, D::Error> {
        BTreeMap::<u8, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| Ok((k, hex::decode(v).map_err(serde::de::Error::custom)?)))
            .collect()
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for KeyMaterial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for KeyMaterial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        hex::decode(s.as_str())
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

// ----------------------------------------------------------- body plumbing

trait Body: Sized {
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
fn entries(required: usize, optional: &[bool]) -> usize {
    required + optional.iter().filter(|p| **p).count()
}

// ------------------------------------------------------------------ hello

/// guest → host, first message of every connection (§6.3). Frozen layout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub agent_name: AgentName,
    pub agent_version: AgentVersion,
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub guest_nonce: [u8; NONCE_LEN],
}

impl Body for Hello {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "hello")?;
        let min_version = read_u16(f.required(0, "min-version")?, "min-version", 1)?;
        let max_version = read_u16(f.required(1, "max-version")?, "max-version", 1)?;
        let agent_name = AgentName::read(f.required(2, "agent-name")?)?;
        let agent_version = AgentVersion::read(f.required(3, "agent-version")?)?;
        let guest_nonce = f.required(4, "guest-nonce")?.byte_array("guest-nonce")?;
        f.finish()?;
        Ok(Self {
            min_version,
            max_version,
            agent_name,
            agent_version,
            guest_nonce,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(5);
        w.uint(0);
        w.uint(self.min_version.into());
        w.uint(1);
        w.uint(self.max_version.into());
        w.uint(2);
        w.text(self.agent_name.as_str());
        w.uint(3);
        w.text(self.agent_version.as_str());
        w.uint(4);
        w.bytes(&self.guest_nonce);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if self.min_version == 0 {
            return Err(DecodeError::InvalidValue {
                field: "min-version",
                rule: "out of range",
            });
        }
        if self.min_version > self.max_version {
            return Err(DecodeError::InvalidValue {
                field: "max-version",
                rule: "below min-version",
            });
        }
        Ok(())
    }
}

// -------------------------------------------------------------- challenge

/// The PCRs of one bank that the quote must cover.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct PcrBankSelection {
    pub hash_alg: HashAlg,
    /// PCR indices 0..=23, strictly ascending.
    pub pcrs: Vec<u8>,
}

fn read_pcr_index(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    let v = r.uint_in("pcr-index", 0, (MAX_PCRS_PER_BANK - 1) as u64)?;
    u8::try_from(v).map_err(|_| DecodeError::InvalidValue {
        field: "pcr-index",
        rule: "out of range",
    })
}

impl PcrBankSelection {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "pcr-bank-selection")?;
        let hash_alg = HashAlg::read(f.required(0, "hash-alg")?)?;
        let r = f.required(1, "pcrs")?;
        let n = r.array("pcrs", 1, MAX_PCRS_PER_BANK)?;
        let mut pcrs = Vec::with_capacity(n);
        for _ in 0..n {
            pcrs.push(read_pcr_index(r)?);
        }
        f.finish()?;
        Ok(Self { hash_alg, pcrs })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.uint(self.hash_alg.tpm_alg_id().into());
        w.uint(1);
        w.array(self.pcrs.len());
        for p in &self.pcrs {
            w.uint((*p).into());
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len("pcrs", self.pcrs.len(), 1, MAX_PCRS_PER_BANK)?;
        if self
            .pcrs
            .iter()
            .any(|p| usize::from(*p) >= MAX_PCRS_PER_BANK)
        {
            return Err(DecodeError::InvalidValue {
                field: "pcr-index",
                rule: "out of range",
            });
        }
        strictly_ascending(&self.pcrs, "pcrs")
    }
}

fn read_features(r: &mut Reader<'_>) -> Result<Features, DecodeError> {
    let n = r.map("features", 0, MAX_FEATURES)?;
    let mut features = Features::new();
    for _ in 0..n {
        let id = read_u16(r, "feature-id", 1)?;
        let state = FeatureState::read(r)?;
        // The scan has proven keys unique and ascending.
        features.insert(id, state);
    }
    Ok(features)
}

fn write_features(w: &mut Writer, features: &Features) {
    w.map(features.len());
    for (id, state) in features {
        w.uint((*id).into());
        w.uint(state.value());
    }
}

fn validate_features(features: &Features) -> Result<(), DecodeError> {
    check_len("features", features.len(), 0, MAX_FEATURES)?;
    if features.contains_key(&0) {
        return Err(DecodeError::InvalidValue {
            field: "feature-id",
            rule: "out of range",
        });
    }
    Ok(())
}

fn validate_banks<T>(
    banks: &[T],
    field: &'static str,
    alg: impl Fn(&T) -> HashAlg,
) -> Result<(), DecodeError> {
    check_len(field, banks.len(), 1, MAX_PCR_BANKS)?;
    let algs: Vec<HashAlg> = banks.iter().map(alg).collect();
    strictly_ascending(&algs, field)
}

/// host → guest (§6.4).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Challenge {
    pub version: u16,
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub host_nonce: [u8; NONCE_LEN],
    pub vm_id: VmId,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub cid: Option<u32>,
    pub pcr_selection: Vec<PcrBankSelection>,
    pub features: Features,
}

impl Body for Challenge {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "challenge")?;
        let version = read_u16(f.required(0, "version")?, "version", 1)?;
        let host_nonce = f.required(1, "host-nonce")?.byte_array("host-nonce")?;
        let vm_id = VmId::read(f.required(2, "vm-id")?)?;
        let cid = match f.optional(3)? {
            Some(r) => Some(read_u32(r, "cid", MIN_GUEST_CID, MAX_GUEST_CID)?),
            None => None,
        };
        let r = f.required(4, "pcr-selection")?;
        let n = r.array("pcr-selection", 1, MAX_PCR_BANKS)?;
        let mut pcr_selection = Vec::with_capacity(n);
        for _ in 0..n {
            pcr_selection.push(PcrBankSelection::read(r)?);
        }
        let features = read_features(f.required(5, "features")?)?;
        f.finish()?;
        Ok(Self {
            version,
            host_nonce,
            vm_id,
            cid,
            pcr_selection,
            features,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(5, &[self.cid.is_some()]));
        w.uint(0);
        w.uint(self.version.into());
        w.uint(1);
        w.bytes(&self.host_nonce);
        w.uint(2);
        w.text(self.vm_id.as_str());
        if let Some(cid) = self.cid {
            w.uint(3);
            w.uint(cid.into());
        }
        w.uint(4);
        w.array(self.pcr_selection.len());
        for bank in &self.pcr_selection {
            bank.write(w);
        }
        w.uint(5);
        write_features(w, &self.features);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if self.version == 0 {
            return Err(DecodeError::InvalidValue {
                field: "version",
                rule: "out of range",
            });
        }
        if let Some(cid) = self.cid
            && !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid)
        {
            return Err(DecodeError::InvalidValue {
                field: "cid",
                rule: "out of range",
            });
        }
        validate_banks(&self.pcr_selection, "pcr-selection", |b| b.hash_alg)?;
        for bank in &self.pcr_selection {
            bank.validate()?;
        }
        validate_features(&self.features)
    }
}

// --------------------------------------------------------------- evidence

/// The values of the selected PCRs of one bank.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct PcrBankValues {
    pub hash_alg: HashAlg,
    /// PCR index → digest, each exactly the bank's digest size.
    #[cfg_attr(feature = "serde", serde(with = "hex_map"))]
    #[cfg_attr(feature = "serde", serde(rename = "pcr-digests"))]
    pub values: BTreeMap<u8, Vec<u8>>,
}

impl PcrBankValues {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "pcr-bank-values")?;
        let hash_alg = HashAlg::read(f.required(0, "hash-alg")?)?;
        let r = f.required(1, "pcr-digests")?;
        let n = r.map("pcr-digests", 1, MAX_PCRS_PER_BANK)?;
        let len = hash_alg.digest_len();
        let mut values = BTreeMap::new();
        for _ in 0..n {
            let index = read_pcr_index(r)?;
            let digest = r.bytes("pcr-digest", len, len)?;
            values.insert(index, digest.to_vec());
        }
        f.finish()?;
        Ok(Self { hash_alg, values })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.uint(self.hash_alg.tpm_alg_id().into());
        w.uint(1);
        w.map(self.values.len());
        for (index, digest) in &self.values {
            w.uint((*index).into());
            w.bytes(digest);
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len("pcr-digests", self.values.len(), 1, MAX_PCRS_PER_BANK)?;
        let len = self.hash_alg.digest_len();
        for (index, digest) in &self.values {
            if usize::from(*index) >= MAX_PCRS_PER_BANK {
                return Err(DecodeError::InvalidValue {
                    field: "pcr-index",
                    rule: "out of range",
                });
            }
            check_len("pcr-digest", digest.len(), len, len)?;
        }
        Ok(())
    }
}

/// guest → host (§6.5).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Evidence {
    /// TPMS_ATTEST as marshalled by the TPM.
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub tpm_attest: Vec<u8>,
    /// TPMT_SIGNATURE as marshalled by the TPM.
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub tpm_signature: Vec<u8>,
    /// The AK's TPM name (nameAlg || digest).
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub ak_name: Vec<u8>,
    /// DER AK certificate issued at provisioning.
    #[cfg_attr(
        feature = "serde",
        serde(default, with = "hex_opt", skip_serializing_if = "Option::is_none")
    )]
    pub ak_cert: Option<Vec<u8>>,
    pub pcr_values: Vec<PcrBankValues>,
}

impl Body for Evidence {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "evidence")?;
        let tpm_attest = f
            .required(0, "tpm-attest")?
            .bytes("tpm-attest", 1, MAX_TPM_ATTEST)?
            .to_vec();
        let tpm_signature = f
            .required(1, "tpm-signature")?
            .bytes("tpm-signature", 1, MAX_TPM_SIGNATURE)?
            .to_vec();
        let ak_name = f
            .required(2, "ak-name")?
            .bytes("ak-name", MIN_AK_NAME, MAX_AK_NAME)?
            .to_vec();
        let ak_cert = match f.optional(3)? {
            Some(r) => Some(r.bytes("ak-cert", 1, MAX_AK_CERT)?.to_vec()),
            None => None,
        };
        let r = f.required(4, "pcr-values")?;
        let n = r.array("pcr-values", 1, MAX_PCR_BANKS)?;
        let mut pcr_values = Vec::with_capacity(n);
        for _ in 0..n {
            pcr_values.push(PcrBankValues::read(r)?);
        }
        f.finish()?;
        Ok(Self {
            tpm_attest,
            tpm_signature,
            ak_name,
            ak_cert,
            pcr_values,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(4, &[self.ak_cert.is_some()]));
        w.uint(0);
        w.bytes(&self.tpm_attest);
        w.uint(1);
        w.bytes(&self.tpm_signature);
        w.uint(2);
        w.bytes(&self.ak_name);
        if let Some(cert) = &self.ak_cert {
            w.uint(3);
            w.bytes(cert);
        }
        w.uint(4);
        w.array(self.pcr_values.len());
        for bank in &self.pcr_values {
            bank.write(w);
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len("tpm-attest", self.tpm_attest.len(), 1, MAX_TPM_ATTEST)?;
        check_len(
            "tpm-signature",
            self.tpm_signature.len(),
            1,
            MAX_TPM_SIGNATURE,
        )?;
        check_len("ak-name", self.ak_name.len(), MIN_AK_NAME, MAX_AK_NAME)?;
        if let Some(cert) = &self.ak_cert {
            check_len("ak-cert", cert.len(), 1, MAX_AK_CERT)?;
        }
        validate_banks(&self.pcr_values, "pcr-values", |b| b.hash_alg)?;
        for bank in &self.pcr_values {
            bank.validate()?;
        }
        Ok(())
    }

    fn capacity_hint(&self) -> usize {
        let pcrs: usize = self
            .pcr_values
            .iter()
            .map(|b| b.values.len() * (b.hash_alg.digest_len() + 4) + 8)
            .sum();
        64 + self.tpm_attest.len()
            + self.tpm_signature.len()
            + self.ak_name.len()
            + self.ak_cert.as_ref().map_or(0, Vec::len)
            + pcrs
    }
}

// ---------------------------------------------------- attestation result

/// host → guest: the evidence was accepted (§6.6).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct AttestationResult {
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub session_id: [u8; SESSION_ID_LEN],
    /// Seconds until the guest must attest again.
    #[cfg_attr(feature = "serde", serde(rename = "reattest-after"))]
    pub reattest_after_s: u32,
}

impl Body for AttestationResult {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "attestation-result")?;
        let session_id = f.required(0, "session-id")?.byte_array("session-id")?;
        let reattest_after_s = read_u32(
            f.required(1, "reattest-after")?,
            "reattest-after",
            MIN_REATTEST_AFTER_S,
            MAX_REATTEST_AFTER_S,
        )?;
        f.finish()?;
        Ok(Self {
            session_id,
            reattest_after_s,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.bytes(&self.session_id);
        w.uint(1);
        w.uint(self.reattest_after_s.into());
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if !(MIN_REATTEST_AFTER_S..=MAX_REATTEST_AFTER_S).contains(&self.reattest_after_s) {
            return Err(DecodeError::InvalidValue {
                field: "reattest-after",
                rule: "out of range",
            });
        }
        Ok(())
    }
}

// ------------------------------------------------------------------- keys

/// guest → host (§6.7).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct KeyRequest {
    /// Strictly ascending, 1..=16 names.
    #[cfg_attr(feature = "serde", serde(rename = "key-names"))]
    pub names: Vec<KeyName>,
}

fn read_key_names(r: &mut Reader<'_>) -> Result<Vec<KeyName>, DecodeError> {
    let n = r.array("key-names", 1, MAX_KEYS_PER_REQUEST)?;
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        names.push(KeyName::read(r)?);
    }
    Ok(names)
}

impl Body for KeyRequest {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "key-request")?;
        let names = read_key_names(f.required(0, "key-names")?)?;
        f.finish()?;
        Ok(Self { names })
    }

    fn write(&self, w: &mut Writer) {
        w.map(1);
        w.uint(0);
        w.array(self.names.len());
        for n in &self.names {
            w.text(n.as_str());
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len("key-names", self.names.len(), 1, MAX_KEYS_PER_REQUEST)?;
        for n in &self.names {
            check_name(KeyName::FIELD, n.as_str(), MAX_KEY_NAME)?;
        }
        strictly_ascending(&self.names, "key-names")
    }
}

/// A key as released or pushed by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct ReleasedKey {
    #[cfg_attr(feature = "serde", serde(rename = "key-name"))]
    pub name: KeyName,
    #[cfg_attr(feature = "serde", serde(rename = "key-version"))]
    pub version: u32,
    #[cfg_attr(feature = "serde", serde(rename = "key-material"))]
    pub material: KeyMaterial,
}

impl ReleasedKey {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "released-key")?;
        let name = KeyName::read(f.required(0, "key-name")?)?;
        let version = read_u32(f.required(1, "key-version")?, "key-version", 1, u32::MAX)?;
        let material = KeyMaterial::new(
            f.required(2, "key-material")?
                .bytes("key-material", 1, MAX_KEY_MATERIAL)?
                .to_vec(),
        );
        f.finish()?;
        Ok(Self {
            name,
            version,
            material,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(3);
        w.uint(0);
        w.text(self.name.as_str());
        w.uint(1);
        w.uint(self.version.into());
        w.uint(2);
        w.bytes(self.material.expose());
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if self.version == 0 {
            return Err(DecodeError::InvalidValue {
                field: "key-version",
                rule: "out of range",
            });
        }
        check_len(
            "key-material",
            self.material.expose().len(),
            1,
            MAX_KEY_MATERIAL,
        )
    }

    fn capacity_hint(&self) -> usize {
        MAX_KEY_NAME + self.material.expose().len() + 32
    }
}

/// A key the host would not release, and why (a wire error code).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct KeyRefusal {
    #[cfg_attr(feature = "serde", serde(rename = "key-name"))]
    pub name: KeyName,
    #[cfg_attr(feature = "serde", serde(rename = "error-code"))]
    pub code: ErrorCode,
}

impl KeyRefusal {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "key-refusal")?;
        let name = KeyName::read(f.required(0, "key-name")?)?;
        let code = read_error_code(f.required(1, "error-code")?)?;
        f.finish()?;
        Ok(Self { name, code })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.text(self.name.as_str());
        w.uint(1);
        w.uint(self.code.value().into());
    }
}

/// host → guest: the answer to a key-request (§6.8).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct KeyRelease {
    /// Ascending by name.
    pub released: Vec<ReleasedKey>,
    /// Ascending by name.
    pub refused: Vec<KeyRefusal>,
}

impl Body for KeyRelease {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "key-release")?;
        let r0 = f.required(0, "released")?;
        let n = r0.array("released", 0, MAX_KEYS_PER_REQUEST)?;
        let mut released = Vec::with_capacity(n);
        for _ in 0..n {
            released.push(ReleasedKey::read(r0)?);
        }
        let r1 = f.required(1, "refused")?;
        let n = r1.array("refused", 0, MAX_KEYS_PER_REQUEST)?;
        let mut refused = Vec::with_capacity(n);
        for _ in 0..n {
            refused.push(KeyRefusal::read(r1)?);
        }
        f.finish()?;
        Ok(Self { released, refused })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.array(self.released.len());
        for k in &self.released {
            k.write(w);
        }
        w.uint(1);
        w.array(self.refused.len());
        for k in &self.refused {
            k.write(w);
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len(
            "key-release",
            self.released.len() + self.refused.len(),
            1,
            MAX_KEYS_PER_REQUEST,
        )?;
        for k in &self.released {
            k.validate()?;
        }
        for k in &self.refused {
            validate_error_code(k.code)?;
        }
        let released: Vec<&KeyName> = self.released.iter().map(|k| &k.name).collect();
        let refused: Vec<&KeyName> = self.refused.iter().map(|k| &k.name).collect();
        strictly_ascending(&released, "released")?;
        strictly_ascending(&refused, "refused")?;
        if released.iter().any(|n| refused.binary_search(n).is_ok()) {
            return Err(DecodeError::InvalidValue {
                field: "refused",
                rule: "name also in released",
            });
        }
        Ok(())
    }

    fn capacity_hint(&self) -> usize {
        64 + self
            .released
            .iter()
            .map(ReleasedKey::capacity_hint)
            .sum::<usize>()
            + self.refused.len() * (MAX_KEY_NAME + 16)
    }
}

/// guest → host: derive a shared key (§6.9, §9).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct DeriveRequest {
    pub purpose: Purpose,
    /// Bytes of key to derive, 16..=64.
    #[cfg_attr(feature = "serde", serde(rename = "derive-length"))]
    pub length: u8,
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub confirm_tag: [u8; CONFIRM_TAG_LEN],
}

impl Body for DeriveRequest {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "derive-request")?;
        let purpose = Purpose::read(f.required(0, "purpose")?)?;
        let length = f.required(1, "derive-length")?.uint_in(
            "derive-length",
            MIN_DERIVE_LEN.into(),
            MAX_DERIVE_LEN.into(),
        )?;
        let confirm_tag = f.required(2, "confirm-tag")?.byte_array("confirm-tag")?;
        f.finish()?;
        Ok(Self {
            purpose,
            // In MIN_DERIVE_LEN..=MAX_DERIVE_LEN, so it fits.
            length: u8::try_from(length).unwrap_or(MAX_DERIVE_LEN),
            confirm_tag,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(3);
        w.uint(0);
        w.text(self.purpose.as_str());
        w.uint(1);
        w.uint(self.length.into());
        w.uint(2);
        w.bytes(&self.confirm_tag);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if !(MIN_DERIVE_LEN..=MAX_DERIVE_LEN).contains(&self.length) {
            return Err(DecodeError::InvalidValue {
                field: "derive-length",
                rule: "out of range",
            });
        }
        Ok(())
    }
}

/// host → guest: the host derived the same key (§6.10, §9).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct DeriveConfirm {
    pub purpose: Purpose,
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub confirm_tag: [u8; CONFIRM_TAG_LEN],
}

impl Body for DeriveConfirm {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "derive-confirm")?;
        let purpose = Purpose::read(f.required(0, "purpose")?)?;
        let confirm_tag = f.required(1, "confirm-tag")?.byte_array("confirm-tag")?;
        f.finish()?;
        Ok(Self {
            purpose,
            confirm_tag,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.text(self.purpose.as_str());
        w.uint(1);
        w.bytes(&self.confirm_tag);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }
}

/// host → guest: rotation push (§6.11).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct KeyUpdate {
    pub update_id: u64,
    #[cfg_attr(feature = "serde", serde(rename = "released-key"))]
    pub key: ReleasedKey,
}

impl Body for KeyUpdate {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "key-update")?;
        let update_id = f.required(0, "update-id")?.uint("update-id")?;
        let key = ReleasedKey::read(f.required(1, "released-key")?)?;
        f.finish()?;
        Ok(Self { update_id, key })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.uint(self.update_id);
        w.uint(1);
        self.key.write(w);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        self.key.validate()
    }

    fn capacity_hint(&self) -> usize {
        32 + self.key.capacity_hint()
    }
}

/// guest → host (§6.12).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct KeyUpdateAck {
    pub update_id: u64,
    #[cfg_attr(feature = "serde", serde(rename = "key-name"))]
    pub name: KeyName,
    #[cfg_attr(feature = "serde", serde(rename = "key-version"))]
    pub version: u32,
    /// Present when the guest could not install the key.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "serde", serde(rename = "error-code"))]
    pub error: Option<ErrorCode>,
}

impl Body for KeyUpdateAck {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "key-update-ack")?;
        let update_id = f.required(0, "update-id")?.uint("update-id")?;
        let name = KeyName::read(f.required(1, "key-name")?)?;
        let version = read_u32(f.required(2, "key-version")?, "key-version", 1, u32::MAX)?;
        let error = match f.optional(3)? {
            Some(r) => Some(read_error_code(r)?),
            None => None,
        };
        f.finish()?;
        Ok(Self {
            update_id,
            name,
            version,
            error,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(3, &[self.error.is_some()]));
        w.uint(0);
        w.uint(self.update_id);
        w.uint(1);
        w.text(self.name.as_str());
        w.uint(2);
        w.uint(self.version.into());
        if let Some(code) = self.error {
            w.uint(3);
            w.uint(code.value().into());
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if let Some(code) = self.error {
            validate_error_code(code)?;
        }
        if self.version == 0 {
            return Err(DecodeError::InvalidValue {
                field: "key-version",
                rule: "out of range",
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- control

/// Either direction (§6.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Ping {
    pub sequence: u64,
}

/// Either direction, echoing a ping's sequence (§6.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Pong {
    pub sequence: u64,
}

macro_rules! sequence_body {
    ($body:ident, $context:literal) => {
        impl Body for $body {
            fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                let mut f = Fields::open(r, $context)?;
                let sequence = f.required(0, "sequence")?.uint("sequence")?;
                f.finish()?;
                Ok(Self { sequence })
            }

            fn write(&self, w: &mut Writer) {
                w.map(1);
                w.uint(0);
                w.uint(self.sequence);
            }

            fn validate(&self) -> Result<(), DecodeError> {
                Ok(())
            }
        }
    };
}

sequence_body!(Ping, "ping");
sequence_body!(Pong, "pong");

/// A protocol version range `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

/// Either direction (§6.14). After an error of a permanent class the
/// sender closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct ErrorMessage {
    #[cfg_attr(feature = "serde", serde(rename = "error-code"))]
    pub code: ErrorCode,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "serde", serde(rename = "retry-after"))]
    pub retry_after_ms: Option<u32>,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "serde", serde(rename = "error-detail"))]
    pub detail: Option<ErrorDetail>,
    /// Only with `unsupported-version`: the sender's supported range.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub supported: Option<VersionRange>,
}

impl ErrorMessage {
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            retry_after_ms: None,
            detail: None,
            supported: None,
        }
    }
}

impl Body for ErrorMessage {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "error")?;
        let code = read_error_code(f.required(0, "error-code")?)?;
        let retry_after_ms = match f.optional(1)? {
            Some(r) => Some(read_u32(r, "retry-after", 1, MAX_RETRY_AFTER_MS)?),
            None => None,
        };
        let detail = match f.optional(2)? {
            Some(r) => Some(ErrorDetail::new(r.text(
                "error-detail",
                1,
                MAX_ERROR_DETAIL,
            )?)?),
            None => None,
        };
        let supported = match f.optional(3)? {
            Some(r) => {
                r.array("supported", 2, 2)?;
                let min = read_u16(r, "supported", 1)?;
                let max = read_u16(r, "supported", 1)?;
                Some(VersionRange { min, max })
            }
            None => None,
        };
        f.finish()?;
        Ok(Self {
            code,
            retry_after_ms,
            detail,
            supported,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(
            1,
            &[
                self.retry_after_ms.is_some(),
                self.detail.is_some(),
                self.supported.is_some(),
            ],
        ));
        w.uint(0);
        w.uint(self.code.value().into());
        if let Some(ms) = self.retry_after_ms {
            w.uint(1);
            w.uint(ms.into());
        }
        if let Some(d) = &self.detail {
            w.uint(2);
            w.text(d.as_str());
        }
        if let Some(v) = self.supported {
            w.uint(3);
            w.array(2);
            w.uint(v.min.into());
            w.uint(v.max.into());
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        validate_error_code(self.code)?;
        validate_retry_after(self.retry_after_ms)?;
        if let Some(v) = self.supported {
            if self.code != ErrorCode::UnsupportedVersion {
                return Err(DecodeError::InvalidValue {
                    field: "supported",
                    rule: "only with unsupported-version",
                });
            }
            if v.min == 0 || v.min > v.max {
                return Err(DecodeError::InvalidValue {
                    field: "supported",
                    rule: "not a version range",
                });
            }
        }
        Ok(())
    }
}

fn validate_retry_after(ms: Option<u32>) -> Result<(), DecodeError> {
    match ms {
        Some(ms) if ms == 0 || ms > MAX_RETRY_AFTER_MS => Err(DecodeError::InvalidValue {
            field: "retry-after",
            rule: "out of range",
        }),
        _ => Ok(()),
    }
}

/// Either direction: orderly close (§6.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Goodbye {
    #[cfg_attr(feature = "serde", serde(rename = "goodbye-reason"))]
    pub reason: GoodbyeReason,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "serde", serde(rename = "retry-after"))]
    pub retry_after_ms: Option<u32>,
}

impl Body for Goodbye {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "goodbye")?;
        let reason = GoodbyeReason::read(f.required(0, "goodbye-reason")?)?;
        let retry_after_ms = match f.optional(1)? {
            Some(r) => Some(read_u32(r, "retry-after", 1, MAX_RETRY_AFTER_MS)?),
            None => None,
        };
        f.finish()?;
        Ok(Self {
            reason,
            retry_after_ms,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(1, &[self.retry_after_ms.is_some()]));
        w.uint(0);
        w.uint(self.reason.value());
        if let Some(ms) = self.retry_after_ms {
            w.uint(1);
            w.uint(ms.into());
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        validate_retry_after(self.retry_after_ms)
    }
}

/// host → guest: the rollout state changed (§6.16, §12).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct FeatureUpdate {
    pub features: Features,
}

impl Body for FeatureUpdate {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "feature-update")?;
        let features = read_features(f.required(0, "features")?)?;
        f.finish()?;
        Ok(Self { features })
    }

    fn write(&self, w: &mut Writer) {
        w.map(1);
        w.uint(0);
        write_features(w, &self.features);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        validate_features(&self.features)
    }
}

// ---------------------------------------------------------------- summary

/// A one-line description of a message that is safe to log: names (which
/// the decoder restricted to a harmless character set), numbers, lengths
/// and states; never key material, nonces, evidence bytes or other raw
/// peer data.
#[derive(Debug, Clone, Copy)]
pub struct Summary<'a>(&'a Message);

impl Message {
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

fn write_features_summary(f: &mut fmt::Formatter<'_>, features: &Features) -> fmt::Result {
    write!(f, "features={{")?;
    for (i, (id, state)) in features.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        write!(f, "{sep}{id}:{state:?}")?;
    }
    write!(f, "}}")
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.message_type())?;
        match self.0 {
            Message::Hello(m) => write!(
                f,
                " versions={}..={} agent={}/{}",
                m.min_version, m.max_version, m.agent_name, m.agent_version
            ),
            Message::Challenge(m) => {
                write!(f, " version={} vm-id={}", m.version, m.vm_id)?;
                if let Some(cid) = m.cid {
                    write!(f, " cid={cid}")?;
                }
                for bank in &m.pcr_selection {
                    write!(f, " pcrs[{:?}]={:?}", bank.hash_alg, bank.pcrs)?;
                }
                f.write_str(" ")?;
                write_features_summary(f, &m.features)
            }
            Message::Evidence(m) => {
                write!(
                    f,
                    " attest={}B signature={}B ak-name={}B ak-cert={}",
                    m.tpm_attest.len(),
                    m.tpm_signature.len(),
                    m.ak_name.len(),
                    m.ak_cert
                        .as_ref()
                        .map_or("none".to_owned(), |c| format!("{}B", c.len()))
                )?;
                for bank in &m.pcr_values {
                    write!(
                        f,
                        " pcrs[{:?}]={:?}",
                        bank.hash_alg,
                        bank.values.keys().collect::<Vec<_>>()
                    )?;
                }
                Ok(())
            }
            Message::AttestationResult(m) => write!(f, " reattest-after={}s", m.reattest_after_s),
            Message::KeyRequest(m) => {
                let names: Vec<&str> = m.names.iter().map(KeyName::as_str).collect();
                write!(f, " names={names:?}")
            }
            Message::KeyRelease(m) => {
                for k in &m.released {
                    write!(
                        f,
                        " released={}@v{}({}B)",
                        k.name,
                        k.version,
                        k.material.expose().len()
                    )?;
                }
                for k in &m.refused {
                    write!(f, " refused={}:{}", k.name, k.code.name())?;
                }
                Ok(())
            }
            Message::DeriveRequest(m) => write!(f, " purpose={} length={}", m.purpose, m.length),
            Message::DeriveConfirm(m) => write!(f, " purpose={}", m.purpose),
            Message::KeyUpdate(m) => write!(
                f,
                " update-id={} key={}@v{}({}B)",
                m.update_id,
                m.key.name,
                m.key.version,
                m.key.material.expose().len()
            ),
            Message::KeyUpdateAck(m) => {
                write!(
                    f,
                    " update-id={} key={}@v{}",
                    m.update_id, m.name, m.version
                )?;
                match m.error {
                    Some(code) => write!(f, " error={code}"),
                    None => Ok(()),
                }
            }
            Message::Ping(m) => write!(f, " sequence={}", m.sequence),
            Message::Pong(m) => write!(f, " sequence={}", m.sequence),
            Message::Error(m) => {
                write!(f, " code={}", m.code)?;
                if let Some(ms) = m.retry_after_ms {
                    write!(f, " retry-after={ms}ms")?;
                }
                if let Some(v) = m.supported {
                    write!(f, " supported={}..={}", v.min, v.max)?;
                }
                if let Some(d) = &m.detail {
                    write!(f, " detail={:?}", d.as_str())?;
                }
                Ok(())
            }
            Message::Goodbye(m) => {
                write!(f, " reason={:?}", m.reason)?;
                match m.retry_after_ms {
                    Some(ms) => write!(f, " retry-after={ms}ms"),
                    None => Ok(()),
                }
            }
            Message::FeatureUpdate(m) => {
                f.write_str(" ")?;
                write_features_summary(f, &m.features)
            }
        }
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
