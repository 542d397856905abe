//! The vkx wire format: frames (PROTOCOL.md §3) carrying one strictly
//! encoded CBOR message each (§5, §6).
//!
//! Decoding peer bytes goes through three gates, in this order:
//! 1. [`scan`]: structure and deterministic encoding, no allocation;
//! 2. the typed decoder: the schema of each message (keys, types, sizes,
//!    value rules), checking every size before it allocates;
//! 3. re-encoding the decoded message and comparing it with the input, so
//!    that every accepted input is the one encoding of its value.
//!
//! Gate 3 should never fire when gates 1 and 2 are right; it is kept as
//! defence in depth, and the fuzz targets assert it never does.

mod codec;
pub mod error_code;
pub mod frame;
mod message;
pub mod scan;
#[doc(hidden)]
pub mod selfcheck;

pub use frame::{FRAME_HEADER_LEN, FrameDecoder, FrameError, MAX_FRAME_PAYLOAD, encode_frame};
pub use message::*;

/// Why a message was refused. Every variant is the peer's fault (malformed
/// input) except where noted; the mapping to wire codes is above this
/// layer (the crate's `errors` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    // Structure (§5 rules 1-5), found by the scan.
    #[error("input ends inside an item")]
    Truncated,
    #[error("bytes follow the message")]
    TrailingBytes,
    #[error("indefinite-length item")]
    IndefiniteLength,
    #[error("integer or length not in shortest form")]
    NonShortestEncoding,
    #[error("reserved additional-information value")]
    ReservedEncoding,
    #[error("CBOR type not used by the protocol (negative integer, tag, float or simple value)")]
    UnsupportedType,
    #[error("map key that is not an unsigned integer or text")]
    UnsupportedMapKey,
    #[error("containers nested deeper than {}", scan::MAX_NESTING)]
    NestingTooDeep,
    #[error("container with more than {} entries", scan::MAX_CONTAINER_ITEMS)]
    ContainerTooLarge,
    #[error("text string is not valid UTF-8")]
    InvalidUtf8,
    #[error("map keys not in ascending order")]
    UnsortedMapKeys,
    #[error("duplicate map key")]
    DuplicateMapKey,

    // Schema (§5 rules 6-7, §6), found by the typed decoder.
    #[error("message larger than {max} bytes")]
    MessageTooLarge { max: usize },
    #[error("unknown message type {message_type}")]
    UnknownMessage { message_type: u64 },
    #[error("{field}: wrong type")]
    WrongType { field: &'static str },
    #[error("{field}: missing")]
    MissingField { field: &'static str },
    #[error("{context}: unknown key")]
    UnknownKey { context: &'static str },
    #[error("{field}: {len} entries or bytes, limit {min}..={max}")]
    BadLength {
        field: &'static str,
        len: usize,
        min: usize,
        max: usize,
    },
    #[error("{field}: {rule}")]
    InvalidValue {
        field: &'static str,
        rule: &'static str,
    },

    /// The input passed gates 1 and 2 but is not the encoding of its own
    /// value. Unreachable unless this implementation has a bug.
    #[error("input is not the canonical encoding of its value")]
    NonCanonical,
}

impl DecodeError {
    /// A stable snake_case name for the kind of error, as used by the
    /// negative test vectors (`spec/vectors/negative`) and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::TrailingBytes => "trailing_bytes",
            Self::IndefiniteLength => "indefinite_length",
            Self::NonShortestEncoding => "non_shortest_encoding",
            Self::ReservedEncoding => "reserved_encoding",
            Self::UnsupportedType => "unsupported_type",
            Self::UnsupportedMapKey => "unsupported_map_key",
            Self::NestingTooDeep => "nesting_too_deep",
            Self::ContainerTooLarge => "container_too_large",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::UnsortedMapKeys => "unsorted_map_keys",
            Self::DuplicateMapKey => "duplicate_map_key",
            Self::MessageTooLarge { .. } => "message_too_large",
            Self::UnknownMessage { .. } => "unknown_message",
            Self::WrongType { .. } => "wrong_type",
            Self::MissingField { .. } => "missing_field",
            Self::UnknownKey { .. } => "unknown_key",
            Self::BadLength { .. } => "bad_length",
            Self::InvalidValue { .. } => "invalid_value",
            Self::NonCanonical => "non_canonical",
        }
    }
}

/// Why a message could not be encoded. Always the local caller's fault: it
/// built a value that the wire rules do not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("message breaks a wire rule: {0}")]
    Invalid(DecodeError),
    #[error("encoded message is {len} bytes, the frame limit is {MAX_FRAME_PAYLOAD}")]
    TooLarge { len: usize },
}
