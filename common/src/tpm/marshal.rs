//! Reading and writing TPM 2.0 marshalled bytes (TPM 2.0 Library, Part 1
//! §18 and Part 2): big-endian integers and `TPM2B_*` sized buffers.
//!
//! [`Reader`] is the only thing in [`crate::tpm`] that indexes peer bytes.
//! It trusts nothing: every read checks the bytes that remain, and every
//! sized buffer is checked against its field's limit before the caller can
//! copy it. It never allocates and never recurses; the structure parsers
//! built on it are straight-line code, so parsing is linear in the input
//! and bounded by the largest accepted structure. [`Reader::finish`]
//! refuses trailing bytes, so one structure has one accepted encoding.
//!
//! [`Writer`] is the inverse, used to re-marshal parsed structures (for the
//! TPM name, and to prove in tests and fuzzing that parsing is exact).

use thiserror::Error;

/// Why TPM bytes were refused. Malformed input is the peer's fault;
/// `Unsupported*` means well-formed TPM bytes that vkx does not accept
/// (an incompatibility, not necessarily an attack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TpmParseError {
    // Malformed.
    #[error("{field}: input ends early")]
    Truncated { field: &'static str },
    #[error("{structure}: {extra} bytes follow the structure")]
    TrailingBytes {
        structure: &'static str,
        extra: usize,
    },
    #[error("{field}: {len} bytes, limit {max}")]
    TooLarge {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field}: {rule}")]
    InvalidValue {
        field: &'static str,
        rule: &'static str,
    },
    /// TPMS_ATTEST.magic is not TPM_GENERATED_VALUE: the TPM did not make
    /// this structure.
    #[error("magic {found:#010x} is not TPM_GENERATED_VALUE")]
    BadMagic { found: u32 },
    /// TPMS_ATTEST.type is not TPM_ST_ATTEST_QUOTE.
    #[error("attestation type {found:#06x} is not a quote")]
    NotAQuote { found: u16 },

    // Incompatible.
    #[error("{field}: algorithm {alg:#06x} not supported")]
    UnsupportedAlgorithm { field: &'static str, alg: u16 },
    #[error("{field}: value {value} not supported")]
    Unsupported { field: &'static str, value: u32 },
}

/// A bounded big-endian cursor over one marshalled structure.
#[derive(Debug)]
pub struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self { input, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.input.len() - self.pos
    }

    /// The next `len` bytes, borrowed.
    pub fn bytes(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], TpmParseError> {
        let end = self
            .pos
            .checked_add(len)
            .ok_or(TpmParseError::Truncated { field })?;
        let out = self
            .input
            .get(self.pos..end)
            .ok_or(TpmParseError::Truncated { field })?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], TpmParseError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, field)?);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, TpmParseError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, TpmParseError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, TpmParseError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, TpmParseError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A `TPM2B_*`: a u16 size, checked against `max` before the buffer is
    /// touched, then that many bytes, borrowed.
    pub fn tpm2b(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], TpmParseError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(TpmParseError::TooLarge { field, len, max });
        }
        self.bytes(len, field)
    }

    /// Ends the structure: refuses bytes after it.
    pub fn finish(self, structure: &'static str) -> Result<(), TpmParseError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(TpmParseError::TrailingBytes { structure, extra }),
        }
    }
}

/// Marshals TPM structures (big-endian) into a growing buffer.
#[derive(Debug, Default)]
pub struct Writer {
    out: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }

    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn raw(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    /// A `TPM2B_*`. Every sized field of the parsed structures is bounded
    /// far below `u16::MAX` when parsed, so the size always fits; a buffer
    /// that does not is written with size `u16::MAX`, which no parser here
    /// accepts back, rather than panicking.
    pub fn tpm2b(&mut self, b: &[u8]) {
        self.u16(u16::try_from(b.len()).unwrap_or(u16::MAX));
        self.raw(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_big_endian_and_bounded() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4, 5]);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.u32("c"), Ok(3));
        assert_eq!(r.u64("d"), Ok(4));
        assert_eq!(r.u16("e"), Err(TpmParseError::Truncated { field: "e" }));
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 1);
        assert_eq!(
            r.finish("s"),
            Err(TpmParseError::TrailingBytes {
                structure: "s",
                extra: 1
            })
        );
    }

    #[test]
    fn tpm2b_checks_limit_before_length() {
        // Size 0xffff with no body: the limit fires, not truncation.
        let mut r = Reader::new(&[0xff, 0xff]);
        assert_eq!(
            r.tpm2b("f", 64),
            Err(TpmParseError::TooLarge {
                field: "f",
                len: 0xffff,
                max: 64
            })
        );
        let mut r = Reader::new(&[0, 3, 9, 9]);
        assert_eq!(
            r.tpm2b("f", 64),
            Err(TpmParseError::Truncated { field: "f" })
        );
        let mut r = Reader::new(&[0, 2, 9, 8]);
        assert_eq!(r.tpm2b("f", 2), Ok(&[9u8, 8][..]));
        assert_eq!(r.finish("s"), Ok(()));
    }

    #[test]
    fn writer_inverts_reader() {
        let mut w = Writer::new();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.tpm2b(b"xy");
        let b = w.into_bytes();
        let mut r = Reader::new(&b);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.u32("c"), Ok(3));
        assert_eq!(r.u64("d"), Ok(4));
        assert_eq!(r.tpm2b("e", 2), Ok(&b"xy"[..]));
        assert_eq!(r.finish("s"), Ok(()));
    }
}
