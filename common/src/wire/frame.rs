//! Length-prefixed framing (PROTOCOL.md §3).
//!
//! A frame is a 4-byte big-endian payload length followed by the payload:
//! one CBOR message of 1 to [`MAX_FRAME_PAYLOAD`] bytes. [`FrameDecoder`] is
//! incremental and sans-I/O: feed it whatever bytes arrived; an incomplete
//! frame is a normal state, not an error. It checks the length prefix as
//! soon as its four bytes are in, before it buffers or allocates anything
//! for the payload, and it never holds more than one frame: its memory is
//! bounded by `FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD` per connection.
//!
//! After an error the decoder stays failed: a stream with a framing error
//! cannot be resynchronised and the connection must be closed.

use zeroize::Zeroizing;

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest payload: 64 KiB. The largest v1 message at its limits is a
/// key-release of 16 keys of 1 KiB (17,639 bytes; evidence at its limits is
/// under 13 KiB); 64 KiB leaves room for later versions and bounds each
/// connection's buffer.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;

/// Why the frame layer refused the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame with an empty payload")]
    Empty,
    #[error("frame length {len} exceeds the limit of {MAX_FRAME_PAYLOAD} bytes")]
    TooLarge { len: u64 },
    #[error("stream ended inside a frame ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
}

impl FrameError {
    /// A stable snake_case name, as used by the negative test vectors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty_frame",
            Self::TooLarge { .. } => "frame_too_large",
            Self::Truncated { .. } => "truncated_frame",
        }
    }
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l as usize <= MAX_FRAME_PAYLOAD)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
        })?;
    out.reserve(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Incremental decoder of a stream of frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload length once the header is complete.
    expected: Option<usize>,
    /// Payload bytes received so far. Zeroized whenever it is cleared: it
    /// may hold key material.
    payload: Zeroizing<Vec<u8>>,
    /// A frame was returned by the previous call and must be dropped
    /// before the next one starts.
    delivered: bool,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes bytes from the front of `input` until one frame is
    /// complete, and returns its payload; the bytes after it stay in
    /// `input`. Returns `Ok(None)` when `input` ran out first (everything
    /// was consumed and buffered).
    pub fn decode<'s>(&'s mut self, input: &mut &[u8]) -> Result<Option<&'s [u8]>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.delivered {
            self.reset();
        }
        let expected = match self.expected {
            Some(n) => n,
            None => {
                let take = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&input[..take]);
                self.header_len += take;
                *input = &input[take..];
                if self.header_len < FRAME_HEADER_LEN {
                    return Ok(None);
                }
                let len = u32::from_be_bytes(self.header);
                let n = self.check_length(len)?;
                self.payload.reserve_exact(n);
                self.expected = Some(n);
                n
            }
        };
        let take = (expected - self.payload.len()).min(input.len());
        self.payload.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.payload.len() < expected {
            return Ok(None);
        }
        self.delivered = true;
        Ok(Some(&self.payload))
    }

    fn check_length(&mut self, len: u32) -> Result<usize, FrameError> {
        let err = if len == 0 {
            FrameError::Empty
        } else if len as usize > MAX_FRAME_PAYLOAD {
            FrameError::TooLarge { len: len.into() }
        } else {
            return Ok(len as usize);
        };
        self.failed = Some(err);
        Err(err)
    }

    /// Call at end of stream: fails if the stream stopped inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.delivered || (self.header_len == 0 && self.expected.is_none()) {
            return Ok(());
        }
        Err(match self.expected {
            None => FrameError::Truncated {
                have: self.header_len,
                need: FRAME_HEADER_LEN,
            },
            Some(n) => FrameError::Truncated {
                have: FRAME_HEADER_LEN + self.payload.len(),
                need: FRAME_HEADER_LEN + n,
            },
        })
    }

    /// Bytes of the current, incomplete frame held in memory.
    pub fn buffered(&self) -> usize {
        if self.delivered {
            0
        } else {
            self.header_len + self.payload.len()
        }
    }

    fn reset(&mut self) {
        self.header = [0; FRAME_HEADER_LEN];
        self.header_len = 0;
        self.expected = None;
        zeroize::Zeroize::zeroize(&mut *self.payload);
        self.delivered = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(payload, &mut out).unwrap();
        out
    }

    #[test]
    fn whole_frames_back_to_back() {
        let mut stream = frame(b"one");
        stream.extend(frame(b"two"));
        let mut d = FrameDecoder::new();
        let mut input = &stream[..];
        assert_eq!(d.decode(&mut input).unwrap(), Some(&b"one"[..]));
        assert_eq!(d.decode(&mut input).unwrap(), Some(&b"two"[..]));
        assert_eq!(d.decode(&mut input).unwrap(), None);
        assert!(input.is_empty());
        d.finish().unwrap();
    }

    #[test]
    fn one_byte_at_a_time() {
        let stream = frame(&[7u8; 300]);
        let mut d = FrameDecoder::new();
        for (i, b) in stream.iter().enumerate() {
            let mut input = std::slice::from_ref(b);
            let got = d.decode(&mut input).unwrap().map(<[u8]>::to_vec);
            assert!(input.is_empty());
            if i + 1 < stream.len() {
                assert_eq!(got, None);
                assert_eq!(d.buffered(), i + 1);
                assert!(d.finish().is_err());
            } else {
                assert_eq!(got, Some(vec![7u8; 300]));
            }
        }
        d.finish().unwrap();
    }

    #[test]
    fn oversize_prefix_fails_before_any_payload_and_stays_failed() {
        let mut d = FrameDecoder::new();
        let mut input = &[0x00, 0x01, 0x00, 0x01, 0xAA][..];
        let e = d.decode(&mut input).unwrap_err();
        assert_eq!(e, FrameError::TooLarge { len: 65537 });
        assert_eq!(input, &[0xAA]);
        assert_eq!(d.payload.capacity(), 0);
        assert_eq!(d.decode(&mut &[0u8][..]).unwrap_err(), e);
        assert_eq!(d.finish().unwrap_err(), e);
    }

    #[test]
    fn largest_frame_is_accepted() {
        let stream = frame(&vec![1u8; MAX_FRAME_PAYLOAD]);
        let mut d = FrameDecoder::new();
        let mut input = &stream[..];
        assert_eq!(
            d.decode(&mut input).unwrap().map(<[u8]>::len),
            Some(MAX_FRAME_PAYLOAD)
        );
        let mut out = Vec::new();
        assert_eq!(
            encode_frame(&vec![1u8; MAX_FRAME_PAYLOAD + 1], &mut out),
            Err(FrameError::TooLarge {
                len: MAX_FRAME_PAYLOAD as u64 + 1
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn empty_frame_is_refused() {
        let mut d = FrameDecoder::new();
        assert_eq!(d.decode(&mut &[0u8, 0, 0, 0][..]), Err(FrameError::Empty));
        assert_eq!(encode_frame(b"", &mut Vec::new()), Err(FrameError::Empty));
    }

    /// The payload buffer holds key-release frames: it is a zeroizing
    /// type (checked at compile time), and it is wiped when the next
    /// decode call starts, not kept until the next frame arrives.
    #[test]
    fn a_delivered_payload_is_wiped_by_the_next_call() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let mut d = FrameDecoder::new();
        zeroize_on_drop(&d.payload);
        let stream = frame(&[0xAB; 100]);
        let mut input = &stream[..];
        assert_eq!(d.decode(&mut input).unwrap().map(<[u8]>::len), Some(100));
        assert_eq!(d.decode(&mut &[][..]).unwrap(), None);
        assert!(d.payload.is_empty());
        assert_eq!(d.buffered(), 0);
        d.finish().unwrap();
    }

    #[test]
    fn truncation_is_reported_with_counts() {
        let mut d = FrameDecoder::new();
        d.decode(&mut &[0u8, 0][..]).unwrap();
        assert_eq!(d.finish(), Err(FrameError::Truncated { have: 2, need: 4 }));
        d.decode(&mut &[0u8, 5, 1, 2][..]).unwrap();
        assert_eq!(d.finish(), Err(FrameError::Truncated { have: 6, need: 9 }));
    }
}
