//! The key family: key material (zeroized, redacted), `key-request`,
//! `key-release`, `derive-request`, `derive-confirm`, `key-update`,
//! `key-update-ack` (PROTOCOL.md §6.5-§6.10).

use super::*;

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

pub(super) fn read_key_names(r: &mut Reader<'_>) -> Result<Vec<KeyName>, DecodeError> {
    read_array(r, "key-names", 1, MAX_KEYS_PER_REQUEST, KeyName::read)
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
        write_array(w, &self.names, |w, n| w.text(n.as_str()));
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
        let released = read_array(
            f.required(0, "released")?,
            "released",
            0,
            MAX_KEYS_PER_REQUEST,
            ReleasedKey::read,
        )?;
        let refused = read_array(
            f.required(1, "refused")?,
            "refused",
            0,
            MAX_KEYS_PER_REQUEST,
            KeyRefusal::read,
        )?;
        f.finish()?;
        Ok(Self { released, refused })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        write_array(w, &self.released, |w, k| k.write(w));
        w.uint(1);
        write_array(w, &self.refused, |w, k| k.write(w));
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
