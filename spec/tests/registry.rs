//! The tables that live in code and in `spec/vkx.cddl` agree: the error
//! registry and the message type codes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use vkx_common::errors::REGISTRY;
use vkx_common::wire::MessageType;

#[test]
fn cddl_error_codes_match_the_registry() {
    let cddl = vkx_spec::CDDL;
    let start = cddl.find("known-error-code = &(").unwrap();
    let block = &cddl[start..start + cddl[start..].find(')').unwrap()];
    let mut rows = Vec::new();
    for line in block.lines().skip(1) {
        let line = line.trim().trim_end_matches(',');
        if let Some((name, value)) = line.split_once(':') {
            rows.push((name.trim().to_owned(), value.trim().parse::<u16>().unwrap()));
        }
    }
    let code: Vec<(String, u16)> = REGISTRY
        .iter()
        .map(|r| (r.name.to_owned(), r.value))
        .collect();
    assert_eq!(rows, code);
}

#[test]
fn cddl_message_types_match_the_code() {
    for t in MessageType::ALL {
        let rule = format!("{} = [{}, {{", t.name(), t.code());
        assert!(vkx_spec::CDDL.contains(&rule), "vkx.cddl lacks `{rule}`");
    }
}

#[test]
fn protocol_md_quotes_the_cddl_exactly() {
    let spec = std::fs::read_to_string(vkx_spec::vectors_dir().join("../PROTOCOL.md")).unwrap();
    let mut quoted = 0;
    for block in spec.split("```cddl\n").skip(1) {
        let block = &block[..block.find("```").unwrap()];
        // A quote may bring rules from several places of the file,
        // separated by blank lines: each part must be there verbatim.
        for part in block.split("\n\n") {
            assert!(
                vkx_spec::CDDL.contains(part.trim_end()),
                "PROTOCOL.md quotes CDDL that vkx.cddl does not have:\n{part}"
            );
        }
        quoted += 1;
    }
    assert!(
        quoted >= 14,
        "only {quoted} CDDL quotes: one per message section"
    );
}
