//! Quote verification on real quotes from swtpm
//! (`common/tests/fixtures/tpm/<case>/`, made by
//! `scripts/make-tpm-fixtures.sh`; its header describes every file), and
//! one refusal per way a quote can be wrong, each asserting the exact
//! reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use vkx_common::tpm::{
    AkParent, Public, QuoteExpectations, TpmParseError, VerifiedQuote, VerifyError, verify_quote,
};
use vkx_common::wire::{HashAlg, PcrBankSelection, PcrBankValues};

/// The cases that must verify.
const GOOD: [&str; 4] = [
    "ecc-p256-ecdsa",
    "ecc-p256-ecdsa-two-banks",
    "rsa2048-rsassa",
    "rsa2048-rsapss",
];

struct Case {
    name: String,
    attest: Vec<u8>,
    sig: Vec<u8>,
    ak: Public,
    ak_pub: Vec<u8>,
    ak_name: Vec<u8>,
    /// The AK's qualified name as tpm2-tools reports it.
    ak_qname: Vec<u8>,
    /// Its parent's (the EK's) qualified name.
    parent_qname: Vec<u8>,
    other_ak: Public,
    nonce: Vec<u8>,
    selection: Vec<PcrBankSelection>,
    values: Vec<PcrBankValues>,
}

impl Case {
    fn load(name: &str) -> Self {
        let dir = fixture_dir().join(name);
        let read =
            |f: &str| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{name}/{f}: {e}"));
        let text = |f: &str| String::from_utf8(read(f)).unwrap();
        let selection = parse_selection(text("selection.txt").trim());
        let values = parse_pcrs_txt(&text("pcrs.txt"));
        // The tpm2-tools "values" file must say the same as pcrs.txt.
        assert_eq!(
            parse_pcrs_values(&read("pcrs.bin"), &selection),
            values,
            "{name}: pcrs.bin and pcrs.txt disagree"
        );
        let ak_pub = read("ak.pub");
        Self {
            name: name.to_owned(),
            attest: read("attest.bin"),
            sig: read("sig.bin"),
            ak: Public::parse(&ak_pub).unwrap(),
            ak_pub,
            ak_name: read("ak.name"),
            ak_qname: read("ak.qname"),
            parent_qname: read("parent.qname"),
            other_ak: Public::parse(&read("other-ak.pub")).unwrap(),
            nonce: read("nonce.bin"),
            selection,
            values,
        }
    }

    fn expect(&self) -> QuoteExpectations<'_> {
        QuoteExpectations {
            ak_parent: AkParent::Key {
                qualified_name: &self.parent_qname,
            },
            qualifying_data: &self.nonce,
            pcr_selection: &self.selection,
            pcr_values: &self.values,
        }
    }

    fn verify(&self) -> Result<VerifiedQuote, VerifyError> {
        verify_quote(&self.attest, &self.sig, &self.ak, &self.expect())
    }

    fn with_values(&self, values: &[PcrBankValues]) -> Result<VerifiedQuote, VerifyError> {
        let e = QuoteExpectations {
            pcr_values: values,
            ..self.expect()
        };
        verify_quote(&self.attest, &self.sig, &self.ak, &e)
    }

    fn with_selection(&self, sel: &[PcrBankSelection]) -> Result<VerifiedQuote, VerifyError> {
        let e = QuoteExpectations {
            pcr_selection: sel,
            ..self.expect()
        };
        verify_quote(&self.attest, &self.sig, &self.ak, &e)
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tpm")
}

fn alg(name: &str) -> HashAlg {
    match name {
        "sha1" => HashAlg::Sha1,
        "sha256" => HashAlg::Sha256,
        "sha384" => HashAlg::Sha384,
        "sha512" => HashAlg::Sha512,
        other => panic!("unknown bank {other}"),
    }
}

/// tpm2-tools' PCR list syntax: `sha1:0,2+sha256:0,1,2,7`.
fn parse_selection(s: &str) -> Vec<PcrBankSelection> {
    s.split('+')
        .map(|bank| {
            let (a, pcrs) = bank.split_once(':').unwrap();
            let mut pcrs: Vec<u8> = pcrs.split(',').map(|p| p.parse().unwrap()).collect();
            pcrs.sort_unstable();
            PcrBankSelection {
                hash_alg: alg(a),
                pcrs,
            }
        })
        .collect()
}

/// `pcrs.txt`: one `<alg> <index> <hex>` line per PCR, banks in selection
/// order.
fn parse_pcrs_txt(s: &str) -> Vec<PcrBankValues> {
    let mut out: Vec<PcrBankValues> = Vec::new();
    for line in s.lines() {
        let mut f = line.split(' ');
        let (a, i, v) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let a = alg(a);
        if out.last().map(|b| b.hash_alg) != Some(a) {
            out.push(PcrBankValues {
                hash_alg: a,
                values: BTreeMap::new(),
            });
        }
        out.last_mut()
            .unwrap()
            .values
            .insert(i.parse().unwrap(), hex::decode(v).unwrap());
    }
    out
}

/// tpm2-tools 5.4 `tpm2_quote -o FILE -F values`: the selected PCR digests
/// concatenated, no header, banks in selection order and indices
/// ascending, each the bank's digest size. It cannot be read without the
/// selection, which is why it is parsed here and not in the library.
fn parse_pcrs_values(data: &[u8], selection: &[PcrBankSelection]) -> Vec<PcrBankValues> {
    let mut rest = data;
    let out = selection
        .iter()
        .map(|s| {
            let n = s.hash_alg.digest_len();
            let values = s
                .pcrs
                .iter()
                .map(|&i| {
                    let (v, r) = rest.split_at(n);
                    rest = r;
                    (i, v.to_vec())
                })
                .collect();
            PcrBankValues {
                hash_alg: s.hash_alg,
                values,
            }
        })
        .collect();
    assert!(rest.is_empty(), "values file longer than the selection");
    out
}

fn good() -> Vec<Case> {
    GOOD.iter().map(|n| Case::load(n)).collect()
}

// ---------------------------------------------------------------- accepts

#[test]
fn every_fixture_verifies() {
    for c in good() {
        let v = c.verify().unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(v.ak_name, c.ak_name, "{}: AK name", c.name);
        assert_eq!(v.ak_name, c.ak.name());
        assert!(v.clock_info.safe, "{}: swtpm clock is safe", c.name);
        assert!(v.clock_info.clock > 0);
        assert_ne!(v.firmware_version, 0);
        // The AK file is an exact TPM2B_PUBLIC.
        assert_eq!(c.ak.to_bytes(), c.ak_pub);
    }
}

#[test]
fn every_fixture_directory_is_used() {
    let mut dirs: Vec<String> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut known: Vec<&str> = GOOD.to_vec();
    known.push("ecc-unrestricted");
    known.sort_unstable();
    assert_eq!(dirs, known);
}

#[test]
fn fixtures_quote_non_zero_pcrs() {
    for c in good() {
        for bank in &c.values {
            for (i, v) in &bank.values {
                assert!(v.iter().any(|b| *b != 0), "{} PCR {i} is zero", c.name);
            }
        }
    }
}

#[test]
fn qualified_names_are_computed_as_the_tpm_reports_them() {
    // tpm2-tools' qualified names (tpm2_readpublic -q) are the TPM's own
    // bookkeeping: the computation must give them, and the quote carries
    // the AK's as qualifiedSigner.
    for c in good() {
        let qn = c.ak.qualified_name(&c.parent_qname);
        assert_eq!(qn, c.ak_qname, "{}: AK qualified name", c.name);
        let attest = vkx_common::tpm::Attest::parse(&c.attest).unwrap();
        assert_eq!(attest.qualified_signer(), qn, "{}: qualifiedSigner", c.name);
    }
    // The parent (an EK, a primary of the endorsement hierarchy) under its
    // hierarchy: the EK's public area is not in the fixtures, but a
    // hierarchy's qualified name is its handle, so the vkx AK's rule is
    // the same computation one level up (checked live in
    // tests/tests/softtpm.rs against a provisioned swtpm AK).
    assert_eq!(
        vkx_common::tpm::hierarchy_qualified_name(vkx_common::tpm::TPM_RH_ENDORSEMENT),
        [0x40, 0, 0, 0x0b]
    );
}

// --------------------------------------------------------------- refusals

#[test]
fn a_quote_naming_another_signer_is_refused() {
    for c in good() {
        // The AK taken for a vkx AK (a primary of the endorsement
        // hierarchy), or under the storage hierarchy, or under another
        // parent key: the quote's qualifiedSigner names another object.
        let mut other_parent = c.parent_qname.clone();
        other_parent[2] ^= 1;
        for parent in [
            AkParent::VKX,
            AkParent::Hierarchy(vkx_common::tpm::TPM_RH_OWNER),
            AkParent::Key {
                qualified_name: &other_parent,
            },
            AkParent::Key {
                qualified_name: &c.ak_qname,
            },
        ] {
            let e = QuoteExpectations {
                ak_parent: parent,
                ..c.expect()
            };
            assert_eq!(
                verify_quote(&c.attest, &c.sig, &c.ak, &e),
                Err(VerifyError::QualifiedSignerMismatch),
                "{}: {parent:?}",
                c.name
            );
        }
    }
}

#[test]
fn old_or_wrong_qualifying_data_is_a_replay() {
    let cases = good();
    for (i, c) in cases.iter().enumerate() {
        // Another session's nonce: a replayed quote.
        let old = &cases[(i + 1) % cases.len()].nonce;
        let e = QuoteExpectations {
            qualifying_data: old,
            ..c.expect()
        };
        assert_eq!(
            verify_quote(&c.attest, &c.sig, &c.ak, &e),
            Err(VerifyError::QualifyingDataMismatch),
            "{}",
            c.name
        );
        let mut flipped = c.nonce.clone();
        flipped[31] ^= 1;
        let short = &c.nonce[..31];
        for q in [&flipped[..], short, &[][..]] {
            let e = QuoteExpectations {
                qualifying_data: q,
                ..c.expect()
            };
            assert_eq!(
                verify_quote(&c.attest, &c.sig, &c.ak, &e),
                Err(VerifyError::QualifyingDataMismatch)
            );
        }
    }
}

#[test]
fn a_pcr_value_changed_after_the_quote_is_caught() {
    for c in good() {
        for b in 0..c.values.len() {
            for i in c.values[b].values.keys().copied().collect::<Vec<_>>() {
                let mut values = c.values.clone();
                values[b].values.get_mut(&i).unwrap()[0] ^= 0x80;
                assert_eq!(
                    c.with_values(&values),
                    Err(VerifyError::PcrDigestMismatch),
                    "{} bank {b} PCR {i}",
                    c.name
                );
            }
        }
        // Two values swapped: same multiset, different order.
        let mut values = c.values.clone();
        let keys: Vec<u8> = values[0].values.keys().copied().collect();
        let a = values[0].values[&keys[0]].clone();
        let b = values[0].values.insert(keys[1], a).unwrap();
        values[0].values.insert(keys[0], b);
        assert_eq!(c.with_values(&values), Err(VerifyError::PcrDigestMismatch));
    }
}

#[test]
fn another_tpms_ak_does_not_verify() {
    for c in good() {
        // Same key type (and, for RSA, the other scheme's AK: a scheme
        // mismatch).
        let got = verify_quote(&c.attest, &c.sig, &c.other_ak, &c.expect());
        match c.ak.scheme() == c.other_ak.scheme() {
            true => assert_eq!(got, Err(VerifyError::BadSignature), "{}", c.name),
            false => assert!(
                matches!(got, Err(VerifyError::SchemeMismatch { .. })),
                "{}: {got:?}",
                c.name
            ),
        }
    }
    // An ECDSA quote against an RSA AK and the other way round.
    let ecc = Case::load("ecc-p256-ecdsa");
    let rsa = Case::load("rsa2048-rsassa");
    assert_eq!(
        verify_quote(&ecc.attest, &ecc.sig, &rsa.ak, &ecc.expect()),
        Err(VerifyError::SchemeMismatch {
            signature: 0x0018,
            key_type: 0x0001,
            key_scheme: 0x0014
        })
    );
    assert_eq!(
        verify_quote(&rsa.attest, &rsa.sig, &ecc.ak, &rsa.expect()),
        Err(VerifyError::SchemeMismatch {
            signature: 0x0014,
            key_type: 0x0023,
            key_scheme: 0x0018
        })
    );
}

#[test]
fn same_ecc_ak_other_quote_does_not_verify() {
    // The two ECC cases share their AK: swap their signatures.
    let a = Case::load("ecc-p256-ecdsa");
    let b = Case::load("ecc-p256-ecdsa-two-banks");
    assert_eq!(a.ak, b.ak);
    assert_eq!(
        verify_quote(&a.attest, &b.sig, &a.ak, &a.expect()),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn every_flipped_attest_byte_breaks_the_signature() {
    for c in good() {
        for at in 0..c.attest.len() {
            let mut m = c.attest.clone();
            m[at] ^= 0x01;
            assert_eq!(
                verify_quote(&m, &c.sig, &c.ak, &c.expect()),
                Err(VerifyError::BadSignature),
                "{} byte {at}",
                c.name
            );
        }
        // Truncated and extended: still the signature that fails first.
        let short = &c.attest[..c.attest.len() - 1];
        assert_eq!(
            verify_quote(short, &c.sig, &c.ak, &c.expect()),
            Err(VerifyError::BadSignature)
        );
        let mut long = c.attest.clone();
        long.push(0);
        assert_eq!(
            verify_quote(&long, &c.sig, &c.ak, &c.expect()),
            Err(VerifyError::BadSignature)
        );
    }
}

#[test]
fn tampered_signatures_are_refused() {
    for c in good() {
        // Signature bodies: after sigAlg, hash and the first size field.
        let body_start = 6;
        for at in (body_start..c.sig.len()).step_by(5) {
            let mut m = c.sig.clone();
            m[at] ^= 0x40;
            let got = verify_quote(&c.attest, &m, &c.ak, &c.expect());
            // For ECDSA, bytes 38-39 are the size of s: changing it makes
            // the structure malformed rather than the signature wrong.
            if c.name.starts_with("ecc") && (at == 38 || at == 39) {
                assert!(
                    matches!(got, Err(VerifyError::MalformedSignature(_))),
                    "{} byte {at}: {got:?}",
                    c.name
                );
            } else {
                assert_eq!(got, Err(VerifyError::BadSignature), "{} byte {at}", c.name);
            }
        }
        // Trailing byte and truncation.
        let mut long = c.sig.clone();
        long.push(0);
        assert_eq!(
            verify_quote(&c.attest, &long, &c.ak, &c.expect()),
            Err(VerifyError::MalformedSignature(
                TpmParseError::TrailingBytes {
                    structure: "TPMT_SIGNATURE",
                    extra: 1
                }
            ))
        );
        assert!(matches!(
            verify_quote(&c.attest, &c.sig[..c.sig.len() - 1], &c.ak, &c.expect()),
            Err(VerifyError::MalformedSignature(
                TpmParseError::Truncated { .. }
            ))
        ));
        // The signature hash changed to SHA-384: unsupported, whether or
        // not the key allows it.
        let mut m = c.sig.clone();
        m[3] = 0x0c;
        let got = verify_quote(&c.attest, &m, &c.ak, &c.expect());
        assert!(
            matches!(
                got,
                Err(VerifyError::SchemeMismatch { .. }
                    | VerifyError::UnsupportedSignatureHash {
                        hash: HashAlg::Sha384
                    })
            ),
            "{got:?}"
        );
    }
    // RSASSA bytes labelled RSAPSS (and v.v.) for a key bound to a scheme.
    for name in ["rsa2048-rsassa", "rsa2048-rsapss"] {
        let c = Case::load(name);
        let mut m = c.sig.clone();
        m[1] ^= 0x14 ^ 0x16;
        assert!(matches!(
            verify_quote(&c.attest, &m, &c.ak, &c.expect()),
            Err(VerifyError::SchemeMismatch { .. })
        ));
    }
    // ECDSA with r = 0 and s = 0.
    let c = Case::load("ecc-p256-ecdsa");
    let zero = [0x00, 0x18, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00];
    assert_eq!(
        verify_quote(&c.attest, &zero, &c.ak, &c.expect()),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn selection_must_be_exactly_the_requested_one() {
    let c = Case::load("ecc-p256-ecdsa");
    let quoted = c.selection.clone();
    let mut fewer = quoted.clone();
    fewer[0].pcrs.pop();
    let mut more = quoted.clone();
    more[0].pcrs.push(8);
    let mut other_bank = quoted.clone();
    other_bank[0].hash_alg = HashAlg::Sha1;
    let mut extra_bank = vec![PcrBankSelection {
        hash_alg: HashAlg::Sha1,
        pcrs: vec![0],
    }];
    extra_bank.extend(quoted.iter().cloned());
    for sel in [fewer, more, other_bank, extra_bank] {
        assert_eq!(
            c.with_selection(&sel),
            Err(VerifyError::PcrSelectionMismatch),
            "{sel:?}"
        );
    }
    // Same banks, other order.
    let two = Case::load("ecc-p256-ecdsa-two-banks");
    let mut swapped = two.selection.clone();
    swapped.reverse();
    assert_eq!(
        two.with_selection(&swapped),
        Err(VerifyError::PcrSelectionMismatch)
    );
    // A request no quote can satisfy is the caller's error.
    assert!(matches!(
        c.with_selection(&[]),
        Err(VerifyError::InvalidExpectations { .. })
    ));
}

#[test]
fn reported_values_must_cover_exactly_the_selection() {
    let c = Case::load("ecc-p256-ecdsa-two-banks");
    let reason = |values: &[PcrBankValues]| match c.with_values(values) {
        Err(VerifyError::PcrValuesMismatch { reason }) => reason,
        other => panic!("{other:?}"),
    };
    // One PCR missing.
    let mut v = c.values.clone();
    v[1].values.remove(&7);
    assert_eq!(reason(&v), "PCR indices differ from the selection");
    // One PCR too many.
    let mut v = c.values.clone();
    v[1].values.insert(9, vec![0; 32]);
    assert_eq!(reason(&v), "PCR indices differ from the selection");
    // One PCR under another index.
    let mut v = c.values.clone();
    let x = v[1].values.remove(&7).unwrap();
    v[1].values.insert(8, x);
    assert_eq!(reason(&v), "PCR indices differ from the selection");
    // A bank missing, banks swapped, a value of the wrong length.
    assert_eq!(
        reason(&c.values[..1]),
        "number of banks differs from the selection"
    );
    let mut v = c.values.clone();
    v.reverse();
    assert_eq!(reason(&v), "bank differs from the selection");
    let mut v = c.values.clone();
    v[0].values.get_mut(&0).unwrap().push(0);
    assert_eq!(reason(&v), "PCR value of the wrong size for its bank");
    assert_eq!(reason(&[]), "number of banks differs from the selection");
}

#[test]
fn non_restricted_aks_are_refused() {
    // A real unrestricted signing key: its quote's signature is valid, but
    // it would sign a forged TPMS_ATTEST just as well.
    let dir = fixture_dir().join("ecc-unrestricted");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let ak = Public::parse(&read("ak.pub")).unwrap();
    let c = Case::load("ecc-p256-ecdsa");
    let nonce = read("nonce.bin");
    let e = QuoteExpectations {
        qualifying_data: &nonce,
        ..c.expect()
    };
    let got = verify_quote(&read("attest.bin"), &read("sig.bin"), &ak, &e);
    assert_eq!(
        got,
        Err(VerifyError::AkNotRestrictedSigning {
            attributes: ak.attributes()
        })
    );
    assert_eq!(ak.attributes() & (1 << 16), 0);

    // The real AKs with one required bit cleared or decrypt set.
    for c in good() {
        for (bit, set) in [
            (16, false),
            (18, false),
            (1, false),
            (4, false),
            (5, false),
            (17, true),
        ] {
            let mut b = c.ak_pub.clone();
            // objectAttributes are bytes 6..10 of a TPM2B_PUBLIC.
            let mut attrs = u32::from_be_bytes(b[6..10].try_into().unwrap());
            if set {
                attrs |= 1 << bit;
            } else {
                attrs &= !(1 << bit);
            }
            b[6..10].copy_from_slice(&attrs.to_be_bytes());
            let ak = Public::parse(&b).unwrap();
            assert_eq!(
                verify_quote(&c.attest, &c.sig, &ak, &c.expect()),
                Err(VerifyError::AkNotRestrictedSigning { attributes: attrs }),
                "{} bit {bit}",
                c.name
            );
        }
    }
}

#[test]
fn oversized_attest_is_refused_before_hashing() {
    let c = Case::load("ecc-p256-ecdsa");
    let big = vec![0u8; vkx_common::wire::MAX_TPM_ATTEST + 1];
    assert!(matches!(
        verify_quote(&big, &c.sig, &c.ak, &c.expect()),
        Err(VerifyError::MalformedAttest(TpmParseError::TooLarge { .. }))
    ));
}

// ------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any change to a signed quote, its signature or the reported values
    /// is refused, whatever the position and the new value, and nothing
    /// panics.
    #[test]
    fn no_mutation_verifies(
        case in 0..GOOD.len(),
        which in 0..3u8,
        at in any::<prop::sample::Index>(),
        xor in 1..=255u8,
    ) {
        let c = Case::load(GOOD[case]);
        let (mut attest, mut sig, mut values) = (c.attest.clone(), c.sig.clone(), c.values.clone());
        match which {
            0 => { let i = at.index(attest.len()); attest[i] ^= xor; }
            1 => { let i = at.index(sig.len()); sig[i] ^= xor; }
            _ => {
                let bank = at.index(values.len());
                let v = values[bank].values.values_mut().next().unwrap();
                let i = at.index(v.len());
                v[i] ^= xor;
            }
        }
        let e = QuoteExpectations { pcr_values: &values, ..c.expect() };
        prop_assert!(verify_quote(&attest, &sig, &c.ak, &e).is_err());
    }
}
