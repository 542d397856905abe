//! Consumes every file in `spec/vectors/` (the harness fails on a file or a
//! field that no check reads) and checks the implementation against it.
//!
//! Positive message vectors are checked three ways, each against an
//! independent party: our decoder against the JSON value, our encoder
//! against the hex, the hex against the diagnostic notation as parsed by
//! cbor-diag, and the bytes against the CDDL (cddl crate, through
//! `support::validate`) and a second CBOR implementation (ciborium). The
//! diagnostic notation must also be written exactly as PROTOCOL.md §16.1
//! says ([`diag_16_1`]).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use vkx_common::transcript::{ConfirmRole, confirm_tag, transcript_hash};
use vkx_common::wire::{FrameDecoder, Message, MessageType};
use vkx_spec::{Vector, VectorFiles};

mod support;

#[test]
fn every_vector_file_is_checked() {
    let files = VectorFiles::load();
    let positives = files.under("messages");
    let negatives = files.under("negative");
    for f in &positives {
        check_positive(&files.open(f));
    }
    for f in &negatives {
        check_negative(&files.open(f));
    }
    check_transcript(&files.open("transcript.json"));
    check_confirm_tags(&files.open("confirm-tags.json"));

    // The acceptance floor of the foundation issue: every message type has
    // a positive vector, and there are at least 11 negative ones.
    let mut covered: Vec<&str> = Vec::new();
    for f in &positives {
        let v = vkx_spec_peek_message(f);
        covered.push(
            MessageType::from_name(&v)
                .map(MessageType::name)
                .unwrap_or("?"),
        );
    }
    for t in MessageType::ALL {
        assert!(covered.contains(&t.name()), "no positive vector for {t}");
    }
    assert!(
        negatives.len() >= 11,
        "only {} negative vectors",
        negatives.len()
    );
    // `files` checks on drop that no vector file was left unread.
}

/// Reads the `message` field of a positive vector without going through
/// the consumption tracking (used only for the coverage count).
fn vkx_spec_peek_message(rel: &str) -> String {
    let text = std::fs::read_to_string(vkx_spec::vectors_dir().join(rel)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["message"].as_str().unwrap().to_owned()
}

fn check_positive(v: &Vector) {
    let name = v.name().to_owned();
    assert!(
        !v.str("description").is_empty(),
        "{name}: empty description"
    );
    let message = v.str("message");
    let cbor = v.hex("cbor");
    let expected = Message::from_json(message, v.value("decoded").clone())
        .unwrap_or_else(|e| panic!("{name}: decoded does not build a {message}: {e}"));

    let decoded = Message::decode(&cbor).unwrap_or_else(|e| panic!("{name}: decode failed: {e}"));
    assert_eq!(decoded, expected, "{name}: decoded value");
    assert_eq!(
        decoded.message_type().name(),
        message,
        "{name}: message type"
    );
    assert_eq!(
        expected.encode().unwrap().as_slice(),
        cbor.as_slice(),
        "{name}: encoding"
    );

    let diag = cbor_diag::parse_diag(v.str("diag"))
        .unwrap_or_else(|e| panic!("{name}: diag does not parse: {e}"));
    assert_eq!(diag.to_bytes(), cbor, "{name}: diag and cbor disagree");

    support::validate(&cbor).unwrap_or_else(|e| panic!("{name}: does not match vkx.cddl: {e}"));

    let value: ciborium::Value = ciborium::from_reader(cbor.as_slice())
        .unwrap_or_else(|e| panic!("{name}: ciborium cannot read it: {e}"));
    let mut again = Vec::new();
    ciborium::into_writer(&value, &mut again).unwrap();
    assert_eq!(again, cbor, "{name}: ciborium re-encodes differently");

    // One rule for every vector's diag (§16.1); the drafting tool
    // (examples/draft_vector.rs, cbor-diag) writes the same.
    let mut expected_diag = String::new();
    diag_16_1(&value, &mut expected_diag);
    assert_eq!(
        v.str("diag"),
        expected_diag,
        "{name}: diag is not written as §16.1 says"
    );
    assert_eq!(
        cbor_diag::parse_bytes(&cbor).unwrap().to_diag(),
        expected_diag,
        "{name}: cbor-diag no longer writes diag as §16.1 says"
    );
}

/// The diagnostic notation of §16.1 for a deterministically encoded item:
/// compact (no spaces), byte strings as `h'...'` in lowercase hex, and an
/// encoding indicator (RFC 8949 §8.1) on exactly the unsigned integers
/// whose head has a following argument: `_0` (24..=255), `_1` (..=65535),
/// `_2` (..=2^32-1), `_3` (above). No indicator on string, array or map
/// lengths, and no indefinite-length marker.
fn diag_16_1(value: &ciborium::Value, out: &mut String) {
    use ciborium::Value;
    match value {
        Value::Integer(i) => {
            let n = u64::try_from(*i).expect("§5.2 rule 4: unsigned integers only");
            let indicator = match n {
                0..=23 => "",
                24..=0xff => "_0",
                0x100..=0xffff => "_1",
                0x1_0000..=0xffff_ffff => "_2",
                _ => "_3",
            };
            out.push_str(&format!("{n}{indicator}"));
        }
        Value::Bytes(b) => out.push_str(&format!("h'{}'", hex::encode(b))),
        Value::Text(t) => {
            out.push('"');
            for c in t.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        Value::Array(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                diag_16_1(item, out);
            }
            out.push(']');
        }
        Value::Map(entries) => {
            out.push('{');
            for (n, (k, v)) in entries.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                diag_16_1(k, out);
                out.push(':');
                diag_16_1(v, out);
            }
            out.push('}');
        }
        other => panic!("§5.2 rule 4: no such item in a message: {other:?}"),
    }
}

fn check_negative(v: &Vector) {
    let name = v.name().to_owned();
    assert!(
        !v.str("description").is_empty(),
        "{name}: empty description"
    );
    let input = v.hex("input");
    let want = v.str("error");
    let got = match v.str("layer") {
        "message" => match Message::decode(&input) {
            Ok(m) => panic!("{name}: accepted as {m:?}"),
            Err(e) => e.kind(),
        },
        "frame" => {
            let mut d = FrameDecoder::new();
            let mut rest = &input[..];
            let mut result = Ok(());
            // A frame vector holds at most one frame's worth of input;
            // each successful call consumes at least one byte.
            for _ in 0..=input.len() {
                match d.decode(&mut rest) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            match result.and_then(|()| d.finish()) {
                Ok(()) => panic!("{name}: frame layer accepted it"),
                Err(e) => e.kind(),
            }
        }
        other => panic!("{name}: unknown layer {other}"),
    };
    assert_eq!(got, want, "{name}: wrong error");
}

fn check_transcript(v: &Vector) {
    assert!(!v.str("description").is_empty());
    let exporter: [u8; 32] = v.hex("exporter").try_into().expect("exporter is 32 bytes");
    let hello = v.hex("hello");
    let challenge = v.hex("challenge");
    assert!(matches!(Message::decode(&hello), Ok(Message::Hello(_))));
    assert!(matches!(
        Message::decode(&challenge),
        Ok(Message::Challenge(_))
    ));
    assert_eq!(
        transcript_hash(&exporter, &hello, &challenge).to_vec(),
        v.hex("transcript_hash")
    );
}

fn check_confirm_tags(v: &Vector) {
    assert!(!v.str("description").is_empty());
    let key = v.hex("derived_key");
    let purpose = v.str("purpose");
    assert_eq!(
        confirm_tag(&key, ConfirmRole::Guest, purpose).to_vec(),
        v.hex("guest_tag")
    );
    assert_eq!(
        confirm_tag(&key, ConfirmRole::Host, purpose).to_vec(),
        v.hex("host_tag")
    );
}
