//! Names on the wire (§5 rule 7): agent names and versions, vm-ids, key
//! names, purposes, error details; checked on construction and decode.

use super::*;

// ------------------------------------------------------------------ names

/// The characters allowed in names (§5 rule 7): printable ASCII without
/// spaces, quotes or escapes, so a name can be logged as it is.
pub(super) fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'+' | b'-')
}

pub(super) fn check_name(field: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
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

            pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
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
