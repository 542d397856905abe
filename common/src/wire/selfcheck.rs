//! Invariants of the wire layer, asserted by the fuzz targets and by the
//! regression test that replays saved fuzz inputs. Each function panics
//! when an invariant breaks; that is their purpose, so they are not for
//! the agents' own code paths.

#![allow(clippy::expect_used)] // Panicking on a broken invariant is the point here.

use super::scan::scan;
use super::{DecodeError, FRAME_HEADER_LEN, FrameDecoder, MAX_FRAME_PAYLOAD, Message};

/// Decodes `data` as one message and checks:
/// - gate 3 (re-encode and compare) never fires: gates 1 and 2 are strict;
/// - whatever gates 1 and 2 accept re-encodes to exactly `data`;
/// - the full decoder accepts exactly what gates 1 and 2 accept.
///
/// Returns the message when it was accepted.
pub fn check_message(data: &[u8]) -> Option<Message> {
    let full = Message::decode(data);
    assert!(
        !matches!(full, Err(DecodeError::NonCanonical)),
        "gates 1 and 2 accepted a non-canonical encoding"
    );
    let gated = if data.len() <= MAX_FRAME_PAYLOAD && scan(data).is_ok() {
        Message::decode_scanned(data).ok()
    } else {
        None
    };
    if let Some(m) = &gated {
        let again = m.encode().expect("an accepted message re-encodes");
        assert_eq!(
            again.as_slice(),
            data,
            "accepted input is not its own encoding"
        );
    }
    assert_eq!(full.as_ref().ok(), gated.as_ref(), "gates disagree");
    full.ok()
}

/// Feeds `data` to a frame decoder in chunks whose sizes come from
/// `chunk_sizes` (cycled; 0 is read as 1) and checks every frame's payload
/// with [`check_message`]. Checks that the decoder never buffers more than
/// one frame, consumes all input unless it failed, and stays failed after
/// an error.
pub fn check_frame_stream(chunk_sizes: &[u8], data: &[u8]) {
    let mut d = FrameDecoder::new();
    let mut rest = data;
    let mut i = 0usize;
    let mut failed = None;
    // Each iteration consumes at least one byte or ends the loop.
    while !rest.is_empty() {
        let size = chunk_sizes
            .get(i % chunk_sizes.len().max(1))
            .map_or(rest.len(), |s| usize::from(*s).max(1))
            .min(rest.len());
        i += 1;
        let mut chunk = &rest[..size];
        rest = &rest[size..];
        // A chunk can hold several frames; each completed frame consumes
        // at least one byte of it.
        loop {
            match d.decode(&mut chunk) {
                Ok(Some(payload)) => {
                    assert!(!payload.is_empty() && payload.len() <= MAX_FRAME_PAYLOAD);
                    let payload = payload.to_vec();
                    check_message(&payload);
                }
                Ok(None) => {
                    assert!(
                        chunk.is_empty(),
                        "decoder left input while waiting for more"
                    );
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            assert!(d.buffered() <= FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD);
        }
        if let Some(e) = failed {
            assert_eq!(
                d.decode(&mut &b"\0"[..]),
                Err(e),
                "decoder recovered after an error"
            );
            assert_eq!(d.finish(), Err(e));
            return;
        }
    }
    let _ = d.finish();
}
