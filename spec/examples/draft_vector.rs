//! Fills in `cbor` and `diag` of positive message vectors from their
//! `message` and `decoded` fields, for review by a person:
//!
//!     cargo run -p vkx-spec --example draft_vector -- spec/vectors/messages/hello.json
//!
//! The diagnostic notation comes from an independent CBOR implementation
//! (cbor-diag), so reading it is a check on our encoder, not a copy of it.
//! The test suite then pins all three fields against each other.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)]

use serde_json::{Map, Value};
use vkx_common::wire::Message;

fn main() {
    for path in std::env::args().skip(1) {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let v: Map<String, Value> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        let name = v["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no message"));
        let msg = Message::from_json(name, v["decoded"].clone())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let bytes = msg.encode().unwrap_or_else(|e| panic!("{path}: {e}"));
        let diag = cbor_diag::parse_bytes(bytes.as_slice())
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .to_diag();
        let mut out = Map::new();
        out.insert("description".into(), v["description"].clone());
        out.insert("message".into(), Value::from(name));
        out.insert("cbor".into(), Value::from(hex::encode(bytes.as_slice())));
        out.insert("diag".into(), Value::from(diag));
        out.insert("decoded".into(), msg.to_json());
        let json = serde_json::to_string_pretty(&Value::Object(out)).unwrap_or_default();
        std::fs::write(&path, json + "\n").unwrap_or_else(|e| panic!("{path}: {e}"));
        println!("{path}: {} bytes", bytes.len());
    }
}
