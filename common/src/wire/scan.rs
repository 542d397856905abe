//! Strict structural scan of one CBOR item (PROTOCOL.md §5).
//!
//! This is the first thing that touches peer bytes. It walks the item
//! without allocating and without recursion, and accepts only what §5
//! allows: one well-formed item and nothing after it, deterministic
//! encoding (shortest heads, definite lengths, map keys strictly ascending in
//! bytewise order, which also excludes duplicates), only the major types v1
//! uses (unsigned integers, byte and UTF-8 text strings, arrays, maps), map
//! keys that are unsigned integers or text strings, at most
//! [`MAX_NESTING`] nested containers and at
//! most [`MAX_CONTAINER_ITEMS`] entries per container.
//!
//! It trusts nothing: every length is checked against the bytes that remain
//! before it is used. Its work is linear in the input length, and its memory
//! is one fixed array of [`MAX_NESTING`] entries.
//!
//! What it does not know is the schema: which keys a message has and what
//! types their values take is checked afterwards by the typed decoder.

use super::DecodeError;

/// Most containers (arrays and maps) one item may nest. The deepest v1
/// message nests five (envelope, body, PCR bank list, bank, PCR map); eight
/// leaves room for v2 while keeping the scan's stack a fixed small array.
pub const MAX_NESTING: usize = 8;

/// Most entries one array or map may hold. The largest v1 container is the
/// features map (at most 64 entries); a tighter schema bound is checked by
/// the typed decoder.
pub const MAX_CONTAINER_ITEMS: u64 = 64;

/// CBOR major types (RFC 8949 §3.1).
const MAJOR_UINT: u8 = 0;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;

/// Additional-information value meaning "indefinite length" or "break".
const AI_INDEFINITE: u8 = 31;

#[derive(Clone, Copy, Default)]
struct Open {
    /// Offset of the container's head.
    start: usize,
    /// Items still to come (for a map: keys and values, counted apart).
    remaining: u64,
    is_map: bool,
    /// Span of the previous key of this map, to check strict ordering.
    prev_key: Option<(usize, usize)>,
}

/// Checks that `input` is exactly one item that satisfies the structural
/// rules of PROTOCOL.md §5.
pub fn scan(input: &[u8]) -> Result<(), DecodeError> {
    let mut stack = [Open::default(); MAX_NESTING];
    let mut depth = 0usize;
    let mut pos = 0usize;

    // Every iteration consumes at least one byte, so this loop runs at most
    // `input.len()` times.
    while pos < input.len() {
        let item_start = pos;
        let (major, arg) = read_head(input, &mut pos)?;

        let in_key_position = depth > 0 && {
            let top = &stack[depth - 1];
            top.is_map && top.remaining % 2 == 0
        };
        if in_key_position && major != MAJOR_UINT && major != MAJOR_TEXT {
            return Err(DecodeError::UnsupportedMapKey);
        }

        match major {
            MAJOR_UINT => {}
            MAJOR_BYTES | MAJOR_TEXT => {
                let len = usize::try_from(arg).map_err(|_| DecodeError::Truncated)?;
                let end = pos.checked_add(len).ok_or(DecodeError::Truncated)?;
                let body = input.get(pos..end).ok_or(DecodeError::Truncated)?;
                if major == MAJOR_TEXT && std::str::from_utf8(body).is_err() {
                    return Err(DecodeError::InvalidUtf8);
                }
                pos = end;
            }
            MAJOR_ARRAY | MAJOR_MAP => {
                if arg > MAX_CONTAINER_ITEMS {
                    return Err(DecodeError::ContainerTooLarge);
                }
                let items = if major == MAJOR_MAP { arg * 2 } else { arg };
                // Each item takes at least one byte: refuse early what cannot fit.
                if items > (input.len() - pos) as u64 {
                    return Err(DecodeError::Truncated);
                }
                if items > 0 {
                    if depth == MAX_NESTING {
                        return Err(DecodeError::NestingTooDeep);
                    }
                    stack[depth] = Open {
                        start: item_start,
                        remaining: items,
                        is_map: major == MAJOR_MAP,
                        prev_key: None,
                    };
                    depth += 1;
                    continue;
                }
                // An empty container is complete at once; it still counts
                // as one level of nesting.
                if depth == MAX_NESTING {
                    return Err(DecodeError::NestingTooDeep);
                }
            }
            _ => return Err(DecodeError::UnsupportedType),
        }

        // The item at `item_start..pos` is complete: account for it in its
        // parents, closing every container it completes.
        let mut done = (item_start, pos);
        loop {
            if depth == 0 {
                return if pos == input.len() {
                    Ok(())
                } else {
                    Err(DecodeError::TrailingBytes)
                };
            }
            let top = &mut stack[depth - 1];
            if top.is_map && top.remaining % 2 == 0 {
                let key = &input[done.0..done.1];
                if let Some((a, b)) = top.prev_key {
                    let prev = &input[a..b];
                    if key == prev {
                        return Err(DecodeError::DuplicateMapKey);
                    }
                    if key < prev {
                        return Err(DecodeError::UnsortedMapKeys);
                    }
                }
                top.prev_key = Some(done);
            }
            top.remaining -= 1;
            if top.remaining > 0 {
                break;
            }
            done = (top.start, pos);
            depth -= 1;
        }
    }
    Err(DecodeError::Truncated)
}

/// Reads one item head at `*pos`, returning its major type and argument,
/// and enforcing shortest-form encoding and definite lengths.
fn read_head(input: &[u8], pos: &mut usize) -> Result<(u8, u64), DecodeError> {
    let initial = *input.get(*pos).ok_or(DecodeError::Truncated)?;
    *pos += 1;
    let major = initial >> 5;
    let info = initial & 0x1f;
    let (extra, min) = match info {
        0..=23 => return Ok((major, u64::from(info))),
        24 => (1usize, 24u64),
        25 => (2, 0x100),
        26 => (4, 0x1_0000),
        27 => (8, 0x1_0000_0000),
        AI_INDEFINITE => {
            return Err(match major {
                MAJOR_BYTES | MAJOR_TEXT | MAJOR_ARRAY | MAJOR_MAP => DecodeError::IndefiniteLength,
                _ => DecodeError::UnsupportedType,
            });
        }
        _ => return Err(DecodeError::ReservedEncoding),
    };
    let bytes = input
        .get(*pos..*pos + extra)
        .ok_or(DecodeError::Truncated)?;
    *pos += extra;
    let arg = bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    if major == 7 {
        // Floats and simple values are not used by v1, whatever their form.
        return Err(DecodeError::UnsupportedType);
    }
    if arg < min {
        return Err(DecodeError::NonShortestEncoding);
    }
    Ok((major, arg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_hex(h: &str) -> Result<(), DecodeError> {
        scan(&hex::decode(h.replace(' ', "")).unwrap())
    }

    #[test]
    fn accepts_canonical_items() {
        for h in [
            "00",
            "17",
            "1818",
            "190100",
            "1a00010000",
            "1b0000000100000000",
            "40",
            "4401020304",
            "60",
            "6161",
            "80",
            "a0",
            "820102",
            "a20102 0304",
            "a1 00 a1 00 80",
            "a2 61 61 00 61 62 00",
            "a2 17 00 18 18 00",
        ] {
            assert_eq!(scan_hex(h), Ok(()), "{h}");
        }
    }

    #[test]
    fn rejects_every_rule() {
        let cases = [
            ("", DecodeError::Truncated),
            ("0000", DecodeError::TrailingBytes),
            ("1817", DecodeError::NonShortestEncoding),
            ("1900ff", DecodeError::NonShortestEncoding),
            ("1a0000ffff", DecodeError::NonShortestEncoding),
            ("1b00000000ffffffff", DecodeError::NonShortestEncoding),
            ("5801 00", DecodeError::NonShortestEncoding),
            ("1c", DecodeError::ReservedEncoding),
            ("1f", DecodeError::UnsupportedType),
            ("5f4100ff", DecodeError::IndefiniteLength),
            ("9f00ff", DecodeError::IndefiniteLength),
            ("bf0000ff", DecodeError::IndefiniteLength),
            ("20", DecodeError::UnsupportedType),
            ("c000", DecodeError::UnsupportedType),
            ("f4", DecodeError::UnsupportedType),
            ("f6", DecodeError::UnsupportedType),
            ("f93c00", DecodeError::UnsupportedType),
            ("ff", DecodeError::UnsupportedType),
            ("62ff00", DecodeError::InvalidUtf8),
            ("a2 00 00 00 01", DecodeError::DuplicateMapKey),
            ("a2 01 00 00 01", DecodeError::UnsortedMapKeys),
            ("a2 18 18 00 17 00", DecodeError::UnsortedMapKeys),
            ("a1 80 00", DecodeError::UnsupportedMapKey),
            ("a1 40 00", DecodeError::UnsupportedMapKey),
            ("44 0102", DecodeError::Truncated),
            ("83 01 02", DecodeError::Truncated),
            ("98 41", DecodeError::ContainerTooLarge),
            ("9b ffffffffffffffff", DecodeError::ContainerTooLarge),
            ("5b ffffffffffffffff", DecodeError::Truncated),
        ];
        for (h, want) in cases {
            assert_eq!(scan_hex(h), Err(want), "{h}");
        }
    }

    #[test]
    fn nesting_limit_is_exact() {
        let ok = format!("{}00", "81".repeat(MAX_NESTING));
        assert_eq!(scan_hex(&ok), Ok(()));
        let empty_innermost = format!("{}80", "81".repeat(MAX_NESTING - 1));
        assert_eq!(scan_hex(&empty_innermost), Ok(()));
        let deep = format!("{}00", "81".repeat(MAX_NESTING + 1));
        assert_eq!(scan_hex(&deep), Err(DecodeError::NestingTooDeep));
        let deep_empty = format!("{}80", "81".repeat(MAX_NESTING));
        assert_eq!(scan_hex(&deep_empty), Err(DecodeError::NestingTooDeep));
    }

    #[test]
    fn huge_nesting_fails_fast_without_recursion() {
        let input = vec![0x81u8; 1 << 20];
        assert_eq!(scan(&input), Err(DecodeError::NestingTooDeep));
    }
}
