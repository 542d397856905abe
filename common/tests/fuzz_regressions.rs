//! Replays every saved fuzz input (`fuzz/regressions/<target>/*`) through
//! the same checks as the fuzz targets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::Path;

use vkx_common::testing::cbor::check_against_ciborium;
use vkx_common::testing::sessions::{check_guest_session, check_host_session, check_pair};
use vkx_common::testing::tpm::check_against_tss;
use vkx_common::tpm::selfcheck::check_parsers;
use vkx_common::wire::selfcheck::{check_frame_stream, check_message};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no regression inputs for {target}");
    out
}

#[test]
fn message_decode_regressions() {
    for (name, data) in inputs("message_decode") {
        // None of the saved inputs is a valid message.
        assert!(check_message(&data).is_none(), "{name} was accepted");
        check_against_ciborium(&data);
    }
}

#[test]
fn frame_decoder_regressions() {
    for (_name, data) in inputs("frame_decoder") {
        let Some((&n, rest)) = data.split_first() else {
            continue;
        };
        let n = usize::from(n % 16).min(rest.len());
        let (sizes, stream) = rest.split_at(n);
        check_frame_stream(sizes, stream);
    }
}

#[test]
fn tpm_parse_regressions() {
    for (_name, data) in inputs("tpm_parse") {
        check_parsers(&data);
        check_against_tss(&data);
    }
}

#[test]
fn host_session_regressions() {
    for (_name, data) in inputs("host_session") {
        check_host_session(&data);
    }
}

#[test]
fn guest_session_regressions() {
    for (_name, data) in inputs("guest_session") {
        check_guest_session(&data);
    }
}

#[test]
fn session_pair_regressions() {
    for (_name, data) in inputs("session_pair") {
        check_pair(&data);
    }
}
