//! The one place where local error types map to wire codes, over the
//! error registry of PROTOCOL.md §8 ([`crate::wire::error_code`],
//! re-exported here: value, name, sender and retry class of each code).
//!
//! Codes this implementation does not know are permanent: an unknown
//! answer must never start a retry loop.

pub use crate::wire::error_code::{ErrorCode, REGISTRY, Registration, RetryClass, Sender};
use crate::wire::{DecodeError, FrameError};

/// The code to send when a received message fails to decode.
pub fn code_for_decode_error(e: &DecodeError) -> ErrorCode {
    match e {
        DecodeError::UnknownMessage { .. } => ErrorCode::UnknownMessage,
        DecodeError::MessageTooLarge { .. } => ErrorCode::FrameTooLarge,
        _ => ErrorCode::Malformed,
    }
}

/// The code to send when the frame layer refuses input, if any can be sent:
/// a truncated frame means the stream has ended and nothing can be.
pub fn code_for_frame_error(e: &FrameError) -> Option<ErrorCode> {
    match e {
        FrameError::TooLarge { .. } => Some(ErrorCode::FrameTooLarge),
        FrameError::Empty => Some(ErrorCode::Malformed),
        FrameError::Truncated { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_message_and_version_are_permanent() {
        assert_eq!(ErrorCode::UnknownMessage.class(), RetryClass::Permanent);
        assert_eq!(ErrorCode::UnsupportedVersion.class(), RetryClass::Permanent);
        assert_eq!(
            code_for_decode_error(&DecodeError::UnknownMessage { message_type: 99 }),
            ErrorCode::UnknownMessage
        );
        assert_eq!(
            code_for_decode_error(&DecodeError::TrailingBytes),
            ErrorCode::Malformed
        );
    }
}
