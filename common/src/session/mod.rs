//! The protocol sessions of PROTOCOL.md §11 as plain state machines.
//!
//! A session starts once the TLS handshake is done (the driver owns the
//! transport and TLS, and passes the exporter value in). It is fed decoded
//! frame payloads, timer expiries and the results of local work (a TPM
//! quote, a verification verdict, a key lookup) together with the current
//! time, and answers with an [`Output`]: payloads to send, events for the
//! driver, and whether to close. It never does I/O, never reads a clock and
//! never asks the system for random numbers: nonces and ids are passed in
//! (the guest seeds its jitter from its nonce).
//!
//! Each protocol state is its own type holding only what that state needs;
//! a transition consumes the state. Out-of-order or unknown messages are
//! answered with the registry's error and a close, never a panic.
//!
//! [`pump`] is the loop between a byte stream and either session (frames,
//! rounds of events, frames to write) that both agents drive.

pub mod guest;
pub mod host;
pub mod pump;

use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::errors::{ErrorCode, code_for_decode_error, code_for_frame_error};
use crate::retry::Failure;
use crate::wire::{ErrorMessage, FrameError, Goodbye, GoodbyeReason, Message, VersionRange};

/// The `error` message type: never answered, even when malformed.
pub(crate) const ERROR_TYPE: u64 = 13;

/// §2 transport constants, shared by the agents' drivers (the
/// hybrid-vsock preamble's are in [`crate::hybrid`]).
pub mod transport {
    use std::time::Duration;

    /// Default vsock port of the host agent (configurable, >= 1024).
    pub const VKX_PORT: u32 = 7861;
    /// Guest: opening the transport connection.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Both sides: the TLS handshake.
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Why a session closed, in the terms the retry policy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Orderly end with no failure (goodbye received or sent, re-attestation,
    /// one-shot work finished). `retry_after` is the peer's hint, if any.
    Orderly { retry_after: Option<Duration> },
    /// The session failed; the retry policy classifies it.
    Failed(Failure),
}

/// What a session asks its driver to do after one input.
#[derive(Debug)]
pub struct Output<E> {
    /// Frame payloads to send, in order.
    pub send: Vec<Zeroizing<Vec<u8>>>,
    /// Things the driver must act on.
    pub events: Vec<E>,
    /// Close the connection after sending `send`.
    pub close: Option<CloseReason>,
    /// The code of each `error` message in `send`, with its index there,
    /// in order: what a driver counts as sent, without decoding its own
    /// payloads again. Kept by [`Output::absorb`]; a driver that takes
    /// payloads out of `send` by hand loses the pairing.
    errors: Vec<(usize, ErrorCode)>,
}

impl<E> Default for Output<E> {
    fn default() -> Self {
        Self {
            send: Vec::new(),
            events: Vec::new(),
            close: None,
            errors: Vec::new(),
        }
    }
}

impl<E> Output<E> {
    /// Appends what `later` asks for; the first close reason wins.
    pub fn absorb(&mut self, later: Output<E>) {
        let base = self.send.len();
        self.errors
            .extend(later.errors.into_iter().map(|(i, code)| (base + i, code)));
        self.send.extend(later.send);
        self.events.extend(later.events);
        if self.close.is_none() {
            self.close = later.close;
        }
    }

    /// The codes of the `error` messages in `send`, in order.
    pub fn error_codes(&self) -> impl Iterator<Item = ErrorCode> + '_ {
        self.errors.iter().map(|(_, code)| *code)
    }

    /// Takes the payloads to send, each with the code it carries if it is
    /// an `error` message; `send` is left empty.
    pub fn take_sends(&mut self) -> Vec<(Zeroizing<Vec<u8>>, Option<ErrorCode>)> {
        let mut errors = std::mem::take(&mut self.errors).into_iter().peekable();
        std::mem::take(&mut self.send)
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                let code = errors.next_if(|(at, _)| *at == i).map(|(_, code)| code);
                (payload, code)
            })
            .collect()
    }

    pub(crate) fn send(&mut self, m: impl Into<Message>) {
        let m = m.into();
        let code = match &m {
            Message::Error(e) => Some(e.code),
            _ => None,
        };
        match m.encode() {
            Ok(bytes) => {
                if let Some(code) = code {
                    self.errors.push((self.send.len(), code));
                }
                self.send.push(bytes);
            }
            // A message this side builds always encodes; if it ever did not,
            // closing is the only safe answer.
            Err(_) => {
                self.close
                    .get_or_insert(CloseReason::Failed(Failure::Permanent));
            }
        }
    }

    pub(crate) fn event(&mut self, e: E) {
        self.events.push(e);
    }

    pub(crate) fn close(&mut self, reason: CloseReason) {
        self.close.get_or_insert(reason);
    }

    /// Sends an error and closes with the local view of the failure.
    pub(crate) fn fail(&mut self, code: ErrorCode, reason: CloseReason) {
        self.send(ErrorMessage::new(code));
        self.close(reason);
    }

    /// Sends an error and closes, failed by that code (the retry policy
    /// classifies it).
    pub(crate) fn fail_code(&mut self, code: ErrorCode) {
        self.fail(
            code,
            CloseReason::Failed(Failure::Code {
                code,
                retry_after: None,
            }),
        );
    }

    /// The frame layer refused the stream (§3.3): answer with its code, if
    /// one can still be sent, and close.
    pub fn frame_error(&mut self, e: &FrameError) {
        match code_for_frame_error(e) {
            Some(code) => self.fail(code, CloseReason::Failed(Failure::Permanent)),
            None => self.close(CloseReason::Failed(Failure::Transport)),
        }
    }

    pub(crate) fn goodbye(&mut self, reason: GoodbyeReason, retry_after_ms: Option<u32>) {
        self.send(Goodbye {
            reason,
            retry_after_ms,
        });
    }
}

/// Decodes a received payload, or records in `out` how the session ends:
/// a payload that breaks the encoding rules is answered with its code
/// (§5.5) and never echoed; an `error` that fails to decode is not
/// answered at all (§8.3).
pub(crate) fn decode_or_close<E>(payload: &[u8], out: &mut Output<E>) -> Option<Message> {
    match Message::decode(payload) {
        Ok(m) => Some(m),
        Err(_) if Message::envelope_type(payload) == Some(ERROR_TYPE) => {
            out.close(CloseReason::Failed(Failure::Permanent));
            None
        }
        Err(e) => {
            out.fail(
                code_for_decode_error(&e),
                CloseReason::Failed(Failure::Permanent),
            );
            None
        }
    }
}

/// Picks the highest version in both ranges (§10.2).
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Option<u16> {
    let hi = ours.max.min(theirs.max);
    let lo = ours.min.max(theirs.min);
    (lo <= hi).then_some(hi)
}

/// A deadline `d` after `now`, saturating.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_errors_are_answered_when_they_can_be() {
        let mut out: Output<()> = Output::default();
        out.frame_error(&FrameError::TooLarge { len: 70_000 });
        assert_eq!(out.close, Some(CloseReason::Failed(Failure::Permanent)));
        let [sent] = &out.send[..] else {
            panic!("{:?}", out.send)
        };
        assert!(matches!(
            Message::decode(sent),
            Ok(Message::Error(e)) if e.code == ErrorCode::FrameTooLarge
        ));
        let mut out: Output<()> = Output::default();
        out.frame_error(&FrameError::Truncated { have: 2, need: 4 });
        assert!(out.send.is_empty());
        assert_eq!(out.close, Some(CloseReason::Failed(Failure::Transport)));
    }

    #[test]
    fn the_codes_of_errors_sent_follow_their_payloads_through_absorb() {
        let mut out: Output<()> = Output::default();
        out.goodbye(GoodbyeReason::Normal, None);
        let mut later: Output<()> = Output::default();
        later.send(ErrorMessage::new(ErrorCode::Busy));
        later.goodbye(GoodbyeReason::Normal, None);
        later.fail_code(ErrorCode::Timeout);
        out.absorb(later);
        assert_eq!(
            out.error_codes().collect::<Vec<_>>(),
            [ErrorCode::Busy, ErrorCode::Timeout]
        );
        let sends = out.take_sends();
        let codes: Vec<Option<ErrorCode>> = sends.iter().map(|(_, c)| *c).collect();
        assert_eq!(
            codes,
            [None, Some(ErrorCode::Busy), None, Some(ErrorCode::Timeout)]
        );
        for (payload, code) in &sends {
            let decoded = match Message::decode(payload) {
                Ok(Message::Error(e)) => Some(e.code),
                _ => None,
            };
            assert_eq!(decoded, *code);
        }
        assert!(out.send.is_empty() && out.error_codes().next().is_none());
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        let r = |min, max| VersionRange { min, max };
        assert_eq!(negotiate(r(1, 1), r(1, 3)), Some(1));
        assert_eq!(negotiate(r(1, 4), r(2, 3)), Some(3));
        assert_eq!(negotiate(r(2, 2), r(1, 1)), None);
        assert_eq!(negotiate(r(1, 1), r(2, 9)), None);
    }
}
