//! Secret-derived values are compared with `subtle` only: a source scan
//! for the hand-written comparisons `subtle::ConstantTimeEq` replaced (an
//! XOR fold, which an optimiser may turn into an early exit, having no
//! barrier). A new secret comparison should call `transcript::tags_equal`
//! or `ct_eq`; ring's `hmac::verify` (the key store's record MACs) is
//! constant-time itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_hand_written_constant_time_comparison_is_left() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for crate_dir in ["common/src", "host/src", "guest/src"] {
        sources(&root.join(crate_dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} source files", files.len());
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, line) in text.lines().enumerate() {
            // `.fold(0u8, |acc, (a, b)| acc | (a ^ b))`, however spelt.
            let squeezed: String = line.chars().filter(|c| !c.is_whitespace()).collect();
            if squeezed.contains("acc|(a^b)") || squeezed.contains("|acc,(a,b)|") {
                found.push(format!("{}:{}", file.display(), i + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "compare secret-derived bytes with subtle::ConstantTimeEq (transcript::tags_equal): {found:#?}"
    );
}
