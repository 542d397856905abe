//! The error registry of PROTOCOL.md §8 (CDDL `error-code`): each wire
//! code's value, name, sender and retry class, in one table.
//!
//! Each wire code has a retry class that tells a receiver what it may do:
//! never retry on its own ([`RetryClass::Permanent`]), wait for the peer's
//! `retry-after` hint ([`RetryClass::AfterHint`]), or back off with jitter
//! ([`RetryClass::Backoff`]). Codes this implementation does not know are
//! permanent: an unknown answer must never start a retry loop.
//!
//! A leaf of the wire module: the `error` message carries these codes.
//! Which local error becomes which code is decided above the wire layer
//! (the crate's `errors` module), which this module does not know.

/// A wire error code (CDDL `error-code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    Malformed,
    UnknownMessage,
    UnsupportedVersion,
    UnexpectedMessage,
    FrameTooLarge,
    AttestationFailed,
    NotPermitted,
    FeatureDisabled,
    FeatureNotEnabled,
    Busy,
    RateLimited,
    Timeout,
    Internal,
    ShuttingDown,
    /// A code from a later version, or garbage: treated as permanent.
    Unknown(u16),
}

/// What a receiver of an error may do about it (PROTOCOL.md §8, §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// No automatic retry. A guest goes dormant and re-probes at most once
    /// per re-probe interval.
    Permanent,
    /// Retry no earlier than the `retry-after` hint (or the default when the
    /// peer sent none).
    AfterHint,
    /// Retry with jittered exponential backoff.
    Backoff,
}

/// Which side may send a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Host,
    Guest,
    Both,
}

/// One row of the registry.
#[derive(Debug, Clone, Copy)]
pub struct Registration {
    pub code: ErrorCode,
    pub value: u16,
    pub name: &'static str,
    pub sender: Sender,
    pub class: RetryClass,
    pub meaning: &'static str,
}

const fn row(
    code: ErrorCode,
    value: u16,
    name: &'static str,
    sender: Sender,
    class: RetryClass,
    meaning: &'static str,
) -> Registration {
    Registration {
        code,
        value,
        name,
        sender,
        class,
        meaning,
    }
}

use RetryClass::{AfterHint, Backoff, Permanent};

/// The registry, in code order. PROTOCOL.md §8 and `spec/vkx.cddl` list the
/// same rows; `spec/tests/registry.rs` checks the CDDL against this table.
pub const REGISTRY: [Registration; 14] = [
    row(
        ErrorCode::Malformed,
        1,
        "malformed",
        Sender::Both,
        Permanent,
        "message or frame violates the encoding rules",
    ),
    row(
        ErrorCode::UnknownMessage,
        2,
        "unknown-message",
        Sender::Both,
        Permanent,
        "message type not defined in the negotiated version",
    ),
    row(
        ErrorCode::UnsupportedVersion,
        3,
        "unsupported-version",
        Sender::Both,
        Permanent,
        "no protocol version in common",
    ),
    row(
        ErrorCode::UnexpectedMessage,
        4,
        "unexpected-message",
        Sender::Both,
        Permanent,
        "message not valid in the current state",
    ),
    row(
        ErrorCode::FrameTooLarge,
        5,
        "frame-too-large",
        Sender::Both,
        Permanent,
        "frame length prefix above the limit",
    ),
    row(
        ErrorCode::AttestationFailed,
        6,
        "attestation-failed",
        Sender::Both,
        Permanent,
        "evidence not accepted (reason only in the local log)",
    ),
    row(
        ErrorCode::NotPermitted,
        7,
        "not-permitted",
        Sender::Host,
        Permanent,
        "key or purpose unknown or not allowed by policy",
    ),
    row(
        ErrorCode::FeatureDisabled,
        8,
        "feature-disabled",
        Sender::Host,
        AfterHint,
        "the feature is switched off (kill switch)",
    ),
    row(
        ErrorCode::FeatureNotEnabled,
        9,
        "feature-not-enabled",
        Sender::Host,
        AfterHint,
        "the staged rollout has not reached this VM",
    ),
    row(
        ErrorCode::Busy,
        10,
        "busy",
        Sender::Host,
        AfterHint,
        "admission control refused the connection",
    ),
    row(
        ErrorCode::RateLimited,
        11,
        "rate-limited",
        Sender::Host,
        AfterHint,
        "the peer exceeded its rate",
    ),
    row(
        ErrorCode::Timeout,
        12,
        "timeout",
        Sender::Both,
        Backoff,
        "a deadline expired waiting for the peer",
    ),
    row(
        ErrorCode::Internal,
        13,
        "internal",
        Sender::Both,
        Backoff,
        "the sender failed locally",
    ),
    row(
        ErrorCode::ShuttingDown,
        14,
        "shutting-down",
        Sender::Host,
        AfterHint,
        "the host agent is stopping",
    ),
];

impl ErrorCode {
    /// The wire value. Codes start at 1.
    pub fn value(self) -> u16 {
        match self {
            Self::Unknown(v) => v,
            known => REGISTRY
                .iter()
                .find(|r| r.code == known)
                .map_or(0, |r| r.value),
        }
    }

    /// The code for a wire value; 0 is not a code.
    pub fn from_value(value: u16) -> Option<Self> {
        if value == 0 {
            return None;
        }
        Some(
            REGISTRY
                .iter()
                .find(|r| r.value == value)
                .map_or(Self::Unknown(value), |r| r.code),
        )
    }

    pub fn registration(self) -> Option<&'static Registration> {
        REGISTRY.iter().find(|r| r.code == self)
    }

    /// The registry name, or "unknown" for codes of later versions.
    pub fn name(self) -> &'static str {
        self.registration().map_or("unknown", |r| r.name)
    }

    pub fn class(self) -> RetryClass {
        self.registration().map_or(Permanent, |r| r.class)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.value())
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.value())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u16::deserialize(d)?;
        Self::from_value(v).ok_or_else(|| serde::de::Error::custom("error code 0 is reserved"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_dense_ordered_and_round_trips() {
        for (i, r) in REGISTRY.iter().enumerate() {
            assert_eq!(usize::from(r.value), i + 1);
            assert_eq!(r.code.value(), r.value);
            assert_eq!(ErrorCode::from_value(r.value), Some(r.code));
            assert_eq!(r.code.name(), r.name);
        }
        assert_eq!(ErrorCode::from_value(0), None);
    }

    #[test]
    fn unknown_codes_are_permanent() {
        let c = ErrorCode::from_value(999).unwrap();
        assert_eq!(c, ErrorCode::Unknown(999));
        assert_eq!(c.class(), RetryClass::Permanent);
        assert_eq!(c.value(), 999);
        assert_eq!(c.name(), "unknown");
    }
}
