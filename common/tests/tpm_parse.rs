//! The TPM parsers on real swtpm structures (`common/tests/fixtures/tpm/`):
//! every fixture parses and re-marshals exactly; every truncation, every
//! trailing byte and every oversized size field is refused with its
//! reason; and, as properties, no input makes a parser panic or accept a
//! structure it would not reproduce byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::Path;

use proptest::prelude::*;
use vkx_common::tpm::selfcheck::check_parsers;
use vkx_common::tpm::{Attest, Public, Signature, TpmParseError};

/// (case, file) for every fixture structure.
fn fixtures(file: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tpm");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path().join(file);
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert_eq!(out.len(), 5, "fixture cases");
    out
}

type Parse = fn(&[u8]) -> Result<(), TpmParseError>;

fn parsers() -> [(&'static str, &'static str, Parse); 3] {
    [
        ("attest.bin", "TPMS_ATTEST", |b| Attest::parse(b).map(drop)),
        ("sig.bin", "TPMT_SIGNATURE", |b| {
            Signature::parse(b).map(drop)
        }),
        ("ak.pub", "TPM2B_PUBLIC", |b| Public::parse(b).map(drop)),
    ]
}

#[test]
fn fixtures_parse_and_round_trip() {
    for (name, b) in fixtures("attest.bin") {
        assert_eq!(Attest::parse(&b).unwrap().to_bytes(), b, "{name}");
    }
    for (name, b) in fixtures("sig.bin") {
        assert_eq!(Signature::parse(&b).unwrap().to_bytes(), b, "{name}");
    }
    for file in ["ak.pub", "other-ak.pub"] {
        for (name, b) in fixtures(file) {
            let p = Public::parse(&b).unwrap();
            assert_eq!(p.to_bytes(), b, "{name}");
            assert_eq!(Public::parse_tpmt(&b[2..]).unwrap(), p);
        }
    }
    // The name tpm2-tools computed is ours.
    for ((name, pubb), (_, nameb)) in fixtures("ak.pub").into_iter().zip(fixtures("ak.name")) {
        assert_eq!(Public::parse(&pubb).unwrap().name(), nameb, "{name}");
    }
}

#[test]
fn every_truncation_is_refused() {
    for (file, _, parse) in parsers() {
        for (name, b) in fixtures(file) {
            for n in 0..b.len() {
                let got = parse(&b[..n]);
                assert!(
                    matches!(got, Err(TpmParseError::Truncated { .. })),
                    "{name} cut at {n}: {got:?}"
                );
            }
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for (file, structure, parse) in parsers() {
        for (name, b) in fixtures(file) {
            for extra in [1usize, 2, 1000] {
                let mut long = b.clone();
                long.resize(b.len() + extra, 0);
                assert_eq!(
                    parse(&long),
                    Err(TpmParseError::TrailingBytes { structure, extra }),
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn oversized_size_fields_are_refused_before_reading() {
    // Each TPM2B size field of each structure set to 0xffff: refused for
    // its size (not for running out of input), so the limit is checked
    // before the bytes are touched.
    let cases: [(&str, &[(usize, &str)]); 3] = [
        (
            "ecc-p256-ecdsa/attest.bin",
            &[
                (6, "qualifiedSigner"),
                (42, "extraData"),
                (111, "pcrDigest"),
            ],
        ),
        (
            "ecc-p256-ecdsa/sig.bin",
            &[(4, "signatureR"), (38, "signatureS")],
        ),
        (
            "ecc-p256-ecdsa/ak.pub",
            &[
                (0, "TPM2B_PUBLIC.size"),
                (10, "authPolicy"),
                (22, "unique.x"),
                (56, "unique.y"),
            ],
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tpm");
    for (file, fields) in cases {
        let b = std::fs::read(dir.join(file)).unwrap();
        for &(at, field) in fields {
            let mut m = b.clone();
            m[at..at + 2].copy_from_slice(&[0xff, 0xff]);
            let got = if file.ends_with("attest.bin") {
                Attest::parse(&m).map(drop)
            } else if file.ends_with("sig.bin") {
                Signature::parse(&m).map(drop)
            } else {
                Public::parse(&m).map(drop)
            };
            assert!(
                matches!(got, Err(TpmParseError::TooLarge { field: f, len: 0xffff, .. }) if f == field),
                "{file} at {at}: {got:?}"
            );
        }
    }
    // The RSA modulus and signature.
    let b = std::fs::read(dir.join("rsa2048-rsassa/ak.pub")).unwrap();
    let mut m = b.clone();
    m[24..26].copy_from_slice(&257u16.to_be_bytes());
    assert!(matches!(
        Public::parse(&m),
        Err(TpmParseError::TooLarge {
            field: "unique.rsa",
            len: 257,
            max: 256
        })
    ));
    let b = std::fs::read(dir.join("rsa2048-rsassa/sig.bin")).unwrap();
    let mut m = b.clone();
    m[4..6].copy_from_slice(&257u16.to_be_bytes());
    assert!(matches!(
        Signature::parse(&m),
        Err(TpmParseError::TooLarge {
            field: "signature.sig",
            len: 257,
            max: 256
        })
    ));
}

#[test]
fn fixtures_pass_the_fuzz_invariants() {
    for (file, _, _) in parsers() {
        for (name, b) in fixtures(file) {
            assert!(check_parsers(&b) >= 1, "{name}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Arbitrary bytes: no parser panics, and whatever one accepts it
    /// re-marshals to the same bytes.
    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        check_parsers(&data);
    }

    /// Mutated real structures: the same, near the accepted region. A
    /// mutation the parser accepts is a different structure (round trip),
    /// so it cannot pass for the original.
    #[test]
    fn mutated_fixtures(
        which in 0..3usize,
        case in 0..5usize,
        at in any::<prop::sample::Index>(),
        xor in 1..=255u8,
        cut in any::<prop::sample::Index>(),
    ) {
        let (file, _, _) = parsers()[which];
        let (_, mut b) = fixtures(file).swap_remove(case);
        let original = b.clone();
        let i = at.index(b.len());
        b[i] ^= xor;
        check_parsers(&b);
        let n = cut.index(b.len() + 1);
        check_parsers(&b[..n]);
        // A mutated attest that still parses never equals the original.
        if let (Ok(m), Ok(o)) = (Attest::parse(&b), Attest::parse(&original)) {
            prop_assert_ne!(m, o);
        }
        if let (Ok(m), Ok(o)) = (Public::parse(&b), Public::parse(&original)) {
            prop_assert_ne!(m.name(), o.name());
        }
    }
}
