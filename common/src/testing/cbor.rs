//! The strict decoder against an independent CBOR implementation
//! (ciborium), for the `message_decode` fuzz target and the regression
//! replay.
//!
//! Checked for every input:
//! - whatever vkx accepts, ciborium reads as one complete item, and
//!   ciborium's re-encoding of that value is the input byte for byte (the
//!   same value, in its one deterministic encoding);
//! - whatever vkx refuses for breaking a structural rule (PROTOCOL.md §5.2
//!   rules 1-5), ciborium's view confirms that rule is broken: the input
//!   is not ciborium's canonical encoding of its value, or the value holds
//!   a type, map key, key order, duplicate, nesting depth or container
//!   size that the rule names;
//! - an input ciborium reads as one complete, canonical item free of
//!   those breaches is refused by vkx, if at all, only by a schema or
//!   value rule (rules 6-7, §6) or the size limit of §3.2.
//!
//! Bounded: ciborium's own recursion limit (256) stops deep inputs before
//! this code walks them; the walk below visits each value once.

#![allow(clippy::expect_used)] // Test support: a panic is the failure report.

use ciborium::Value;

use crate::wire::scan::{MAX_CONTAINER_ITEMS, MAX_NESTING};
use crate::wire::selfcheck::check_message;
use crate::wire::{DecodeError, MAX_FRAME_PAYLOAD, Message};

/// The structural breaches of §5.2 rules 2-5 that a decoded value shows
/// (rule 2's encoding breaches show only in the bytes, not the value).
#[derive(Debug, Default, PartialEq, Eq)]
struct Breaches {
    /// Negative integer, tag, float or simple value (rule 4).
    unsupported_type: bool,
    /// A map key that is not an unsigned integer or text (rule 4).
    unsupported_key: bool,
    /// Map keys out of ascending order of their encodings (rule 2).
    unsorted: bool,
    /// Two equal keys in one map (rule 3).
    duplicate: bool,
    /// Deeper than `MAX_NESTING` containers (rule 5).
    too_deep: bool,
    /// A container of more than `MAX_CONTAINER_ITEMS` entries (rule 5).
    too_large: bool,
}

impl Breaches {
    fn any(&self) -> bool {
        *self != Self::default()
    }
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("a decoded value re-encodes");
    out
}

fn walk(v: &Value, depth: usize, b: &mut Breaches) {
    match v {
        Value::Integer(i) => b.unsupported_type |= i128::from(*i) < 0,
        Value::Bytes(_) | Value::Text(_) => {}
        Value::Array(items) => {
            b.too_deep |= depth + 1 > MAX_NESTING;
            b.too_large |= items.len() as u64 > MAX_CONTAINER_ITEMS;
            for i in items {
                walk(i, depth + 1, b);
            }
        }
        Value::Map(entries) => {
            b.too_deep |= depth + 1 > MAX_NESTING;
            b.too_large |= entries.len() as u64 > MAX_CONTAINER_ITEMS;
            let keys: Vec<Vec<u8>> = entries.iter().map(|(k, _)| encode(k)).collect();
            for w in keys.windows(2) {
                b.unsorted |= w[0] > w[1];
                b.duplicate |= w[0] == w[1];
            }
            for (k, _) in entries {
                let ok = matches!(k, Value::Text(_))
                    || matches!(k, Value::Integer(i) if i128::from(*i) >= 0);
                b.unsupported_key |= !ok;
            }
            for (k, val) in entries {
                walk(k, depth + 1, b);
                walk(val, depth + 1, b);
            }
        }
        // Tags, floats, booleans, null and other simple values.
        _ => b.unsupported_type = true,
    }
}

/// Runs [`check_message`] on `data` and compares vkx's verdict with
/// ciborium's reading; panics on a disagreement the spec does not name.
pub fn check_against_ciborium(data: &[u8]) {
    let ours = check_message(data);
    let mut rest = data;
    let theirs: Option<Value> = ciborium::from_reader(&mut rest)
        .ok()
        .filter(|_| rest.is_empty());
    if let Some(m) = ours {
        let v = theirs.expect("ciborium does not read an accepted message as one item");
        assert_eq!(
            encode(&v),
            data,
            "ciborium re-encodes an accepted message differently"
        );
        let mut b = Breaches::default();
        walk(&v, 0, &mut b);
        assert!(!b.any(), "an accepted message breaks {b:?}");
        // The type ciborium sees is the one vkx decoded.
        let Value::Array(envelope) = &v else {
            panic!("an accepted message is not an array")
        };
        let Some(Value::Integer(t)) = envelope.first() else {
            panic!("an accepted message has no integer type")
        };
        assert_eq!(i128::from(*t), i128::from(m.message_type().code()));
        return;
    }
    let err = Message::decode(data).expect_err("check_message refused it");
    let Some(v) = theirs else {
        // Not one complete CBOR item for ciborium either: vkx must have
        // refused it by structure (rules 1-5) or size.
        assert!(
            is_structural(&err) || matches!(err, DecodeError::MessageTooLarge { .. }),
            "ciborium cannot read it, vkx refused it for {err:?}"
        );
        return;
    };
    let canonical = encode(&v) == data;
    let mut b = Breaches::default();
    walk(&v, 0, &mut b);
    let confirmed = match err {
        DecodeError::NonShortestEncoding | DecodeError::IndefiniteLength => !canonical,
        // ciborium reads bignum tags (2, 3) as plain integers, so a tag
        // vkx refuses shows in its view only as a changed encoding.
        DecodeError::UnsupportedType => b.unsupported_type || !canonical,
        DecodeError::UnsupportedMapKey => b.unsupported_key || b.unsupported_type || !canonical,
        DecodeError::UnsortedMapKeys => b.unsorted,
        DecodeError::DuplicateMapKey => b.duplicate,
        DecodeError::NestingTooDeep => b.too_deep,
        DecodeError::ContainerTooLarge => b.too_large,
        // ciborium read one complete item: no structural excuse left.
        DecodeError::Truncated
        | DecodeError::TrailingBytes
        | DecodeError::ReservedEncoding
        | DecodeError::InvalidUtf8 => false,
        DecodeError::MessageTooLarge { .. } => data.len() > MAX_FRAME_PAYLOAD,
        // Schema and value rules (6, 7, §6): only once the structure is
        // clean, as §5.5 orders the checks.
        _ => canonical && !b.any(),
    };
    assert!(
        confirmed,
        "vkx refused for {err:?}; ciborium: canonical {canonical}, {b:?}"
    );
}

fn is_structural(e: &DecodeError) -> bool {
    matches!(
        e,
        DecodeError::Truncated
            | DecodeError::TrailingBytes
            | DecodeError::IndefiniteLength
            | DecodeError::NonShortestEncoding
            | DecodeError::ReservedEncoding
            | DecodeError::UnsupportedType
            | DecodeError::UnsupportedMapKey
            | DecodeError::NestingTooDeep
            | DecodeError::ContainerTooLarge
            | DecodeError::InvalidUtf8
            | DecodeError::UnsortedMapKeys
            | DecodeError::DuplicateMapKey
    )
}
