//! The small enums of the wire (hash algorithms, feature states, goodbye
//! reasons), error-code reading, and the shared field readers and JSON
//! helpers of the message bodies.

use super::*;

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

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
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
    pub(super) fn value(self) -> u64 {
        match self {
            Self::Enabled => 0,
            Self::Disabled => 1,
            Self::NotYet => 2,
        }
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
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
    pub(super) fn value(self) -> u64 {
        match self {
            Self::Normal => 0,
            Self::Shutdown => 1,
            Self::Reattest => 2,
            Self::Idle => 3,
        }
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
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

pub(super) fn validate_error_code(code: ErrorCode) -> Result<(), DecodeError> {
    if code.value() == 0 {
        return Err(DecodeError::InvalidValue {
            field: "error-code",
            rule: "out of range",
        });
    }
    Ok(())
}

pub(super) fn read_error_code(r: &mut Reader<'_>) -> Result<ErrorCode, DecodeError> {
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

pub(super) fn read_u16(
    r: &mut Reader<'_>,
    field: &'static str,
    min: u16,
) -> Result<u16, DecodeError> {
    let v = r.uint_in(field, u64::from(min), u64::from(u16::MAX))?;
    u16::try_from(v).map_err(|_| DecodeError::InvalidValue {
        field,
        rule: "out of range",
    })
}

pub(super) fn read_u32(
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

pub(super) fn strictly_ascending<T: Ord>(
    items: &[T],
    field: &'static str,
) -> Result<(), DecodeError> {
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
pub(crate) mod hex_bytes {
    //! Byte strings as lowercase hex in JSON test vectors.
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<Vec<u8>>>(
        d: D,
    ) -> Result<T, D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        T::try_from(v).map_err(|_| serde::de::Error::custom("wrong length"))
    }
}

#[cfg(feature = "serde")]
pub(crate) mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(feature = "serde")]
pub(crate) mod hex_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        m: &BTreeMap<u8, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, hex::encode(v))))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u8, Vec<u8>>, D::Error> {
        BTreeMap::<u8, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| Ok((k, hex::decode(v).map_err(serde::de::Error::custom)?)))
            .collect()
    }
}
