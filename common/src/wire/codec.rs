//! Typed reading and writing of the CBOR subset the protocol uses.
//!
//! [`Reader`] runs only over input that [`super::scan`] accepted, so the
//! structure is known to be sound and canonical; what it adds is the schema:
//! the type of each value and its size limits, checked before anything is
//! copied out of the input. [`Fields`] walks a map whose keys are small
//! unsigned integers in ascending order, which is every map body of v1: it
//! turns a skipped key into "unknown key" and an absent one into "missing".
//!
//! [`Writer`] emits the deterministic encoding directly (shortest heads,
//! definite lengths); callers write map keys in ascending order.

use minicbor::Decoder;
use minicbor::data::Type;
use zeroize::Zeroizing;

use super::DecodeError;

pub(crate) struct Reader<'b> {
    d: Decoder<'b>,
}

impl<'b> Reader<'b> {
    pub(crate) fn new(input: &'b [u8]) -> Self {
        Self {
            d: Decoder::new(input),
        }
    }

    pub(crate) fn uint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        match self.d.datatype() {
            Ok(Type::U8 | Type::U16 | Type::U32 | Type::U64) => {
                self.d.u64().map_err(|_| DecodeError::WrongType { field })
            }
            _ => Err(DecodeError::WrongType { field }),
        }
    }

    /// Whether the next item is a map (without consuming it).
    pub(crate) fn at_map(&mut self) -> bool {
        matches!(self.d.datatype(), Ok(Type::Map))
    }

    /// An unsigned integer within `min..=max`.
    pub(crate) fn uint_in(
        &mut self,
        field: &'static str,
        min: u64,
        max: u64,
    ) -> Result<u64, DecodeError> {
        let v = self.uint(field)?;
        if v < min || v > max {
            return Err(DecodeError::InvalidValue {
                field,
                rule: "out of range",
            });
        }
        Ok(v)
    }

    pub(crate) fn bytes(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'b [u8], DecodeError> {
        match self.d.datatype() {
            Ok(Type::Bytes) => {}
            _ => return Err(DecodeError::WrongType { field }),
        }
        let b = self
            .d
            .bytes()
            .map_err(|_| DecodeError::WrongType { field })?;
        check_len(field, b.len(), min, max)?;
        Ok(b)
    }

    pub(crate) fn text(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'b str, DecodeError> {
        match self.d.datatype() {
            Ok(Type::String) => {}
            _ => return Err(DecodeError::WrongType { field }),
        }
        let s = self.d.str().map_err(|_| DecodeError::WrongType { field })?;
        check_len(field, s.len(), min, max)?;
        Ok(s)
    }

    /// An array header with `min..=max` entries.
    pub(crate) fn array(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<usize, DecodeError> {
        match self.d.datatype() {
            Ok(Type::Array) => {}
            _ => return Err(DecodeError::WrongType { field }),
        }
        let n = self
            .d
            .array()
            .map_err(|_| DecodeError::WrongType { field })?
            .ok_or(DecodeError::IndefiniteLength)?;
        let n = usize::try_from(n).map_err(|_| DecodeError::WrongType { field })?;
        check_len(field, n, min, max)?;
        Ok(n)
    }

    /// A map header with `min..=max` entries.
    pub(crate) fn map(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<usize, DecodeError> {
        match self.d.datatype() {
            Ok(Type::Map) => {}
            _ => return Err(DecodeError::WrongType { field }),
        }
        let n = self
            .d
            .map()
            .map_err(|_| DecodeError::WrongType { field })?
            .ok_or(DecodeError::IndefiniteLength)?;
        let n = usize::try_from(n).map_err(|_| DecodeError::WrongType { field })?;
        check_len(field, n, min, max)?;
        Ok(n)
    }

    /// A fixed-size byte string.
    pub(crate) fn byte_array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(field, N, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }
}

pub(crate) fn check_len(
    field: &'static str,
    len: usize,
    min: usize,
    max: usize,
) -> Result<(), DecodeError> {
    if len < min || len > max {
        return Err(DecodeError::BadLength {
            field,
            len,
            min,
            max,
        });
    }
    Ok(())
}

/// The fields of one map with unsigned integer keys, read in ascending key
/// order. The scan has already proven the keys strictly ascending.
pub(crate) struct Fields<'r, 'b> {
    r: &'r mut Reader<'b>,
    context: &'static str,
    left: usize,
    next_key: Option<u64>,
}

impl<'r, 'b> Fields<'r, 'b> {
    pub(crate) fn open(r: &'r mut Reader<'b>, context: &'static str) -> Result<Self, DecodeError> {
        let left = r.map(context, 0, usize::MAX)?;
        Ok(Self {
            r,
            context,
            left,
            next_key: None,
        })
    }

    fn peek(&mut self) -> Result<Option<u64>, DecodeError> {
        if self.next_key.is_none() && self.left > 0 {
            let key = match self.r.d.datatype() {
                Ok(Type::U8 | Type::U16 | Type::U32 | Type::U64) => self.r.uint(self.context)?,
                // Text keys sort after every integer key: none is known.
                _ => {
                    return Err(DecodeError::UnknownKey {
                        context: self.context,
                    });
                }
            };
            self.left -= 1;
            self.next_key = Some(key);
        }
        Ok(self.next_key)
    }

    /// Positions the reader on the value of `key` if the map has it.
    pub(crate) fn optional(&mut self, key: u64) -> Result<Option<&mut Reader<'b>>, DecodeError> {
        match self.peek()? {
            Some(k) if k == key => {
                self.next_key = None;
                Ok(Some(&mut *self.r))
            }
            Some(k) if k < key => Err(DecodeError::UnknownKey {
                context: self.context,
            }),
            _ => Ok(None),
        }
    }

    pub(crate) fn required(
        &mut self,
        key: u64,
        field: &'static str,
    ) -> Result<&mut Reader<'b>, DecodeError> {
        self.optional(key)?
            .ok_or(DecodeError::MissingField { field })
    }

    /// Fails if the map holds a key that was not asked for.
    pub(crate) fn finish(mut self) -> Result<(), DecodeError> {
        match self.peek()? {
            None => Ok(()),
            Some(_) => Err(DecodeError::UnknownKey {
                context: self.context,
            }),
        }
    }
}

/// Writes the deterministic encoding of the subset v1 uses. The buffer is
/// zeroized on drop because some messages carry key material.
pub(crate) struct Writer {
    buf: Zeroizing<Vec<u8>>,
}

impl Writer {
    /// `capacity` should cover the whole message so the buffer never
    /// reallocates (a reallocation would leave an unzeroized copy behind).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::with_capacity(capacity)),
        }
    }

    pub(crate) fn into_bytes(self) -> Zeroizing<Vec<u8>> {
        self.buf
    }

    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        // The casts below are exact: each arm has checked the range.
        #[allow(clippy::cast_possible_truncation)]
        match arg {
            0..=23 => self.buf.push(m | arg as u8),
            24..=0xff => self.buf.extend_from_slice(&[m | 24, arg as u8]),
            0x100..=0xffff => {
                self.buf.push(m | 25);
                self.buf.extend_from_slice(&(arg as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.buf.push(m | 26);
                self.buf.extend_from_slice(&(arg as u32).to_be_bytes());
            }
            _ => {
                self.buf.push(m | 27);
                self.buf.extend_from_slice(&arg.to_be_bytes());
            }
        }
    }

    pub(crate) fn uint(&mut self, v: u64) {
        self.head(0, v);
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.head(2, b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub(crate) fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn array(&mut self, n: usize) {
        self.head(4, n as u64);
    }

    pub(crate) fn map(&mut self, n: usize) {
        self.head(5, n as u64);
    }
}
