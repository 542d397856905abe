//! Quote verification figures for `make bench`: the host's full
//! `verify_quote` per quote (parsing, checks, PCR digest, signature) on
//! real swtpm quotes, beside the bare ring signature verification it
//! contains (the floor) and the parsing alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use vkx_common::tpm::{
    AkParent, Attest, Public, PublicKey, QuoteExpectations, Signature, verify_quote,
};
use vkx_common::wire::{HashAlg, PcrBankSelection, PcrBankValues};

struct Case {
    attest: Vec<u8>,
    sig: Vec<u8>,
    ak: Public,
    parent_qname: Vec<u8>,
    nonce: Vec<u8>,
    selection: Vec<PcrBankSelection>,
    values: Vec<PcrBankValues>,
}

/// One fixture case; `pcrs.txt` holds `<alg> <index> <hex>` lines of one
/// SHA-256 bank (the cases benched here).
fn load(name: &str) -> Case {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tpm")
        .join(name);
    let read = |f: &str| std::fs::read(dir.join(f)).expect(f);
    let mut values = BTreeMap::new();
    for line in String::from_utf8(read("pcrs.txt")).unwrap().lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[0], "sha256");
        values.insert(f[1].parse::<u8>().unwrap(), hex::decode(f[2]).unwrap());
    }
    Case {
        attest: read("attest.bin"),
        sig: read("sig.bin"),
        ak: Public::parse(&read("ak.pub")).unwrap(),
        parent_qname: read("parent.qname"),
        nonce: read("nonce.bin"),
        selection: vec![PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: values.keys().copied().collect(),
        }],
        values: vec![PcrBankValues {
            hash_alg: HashAlg::Sha256,
            values,
        }],
    }
}

/// The bare ring verification inside `verify_quote`, with its inputs
/// prepared outside the timed loop.
fn ring_floor(c: &Case) -> Box<dyn Fn() -> bool> {
    let sig = Signature::parse(&c.sig).unwrap();
    let attest = c.attest.clone();
    match (c.ak.key().clone(), sig) {
        (PublicKey::EccP256 { x, y }, Signature::Ecdsa(e)) => {
            let point = [&[4u8][..], &x, &y].concat();
            let rs = [e.r(), e.s()].concat();
            assert_eq!((point.len(), rs.len()), (65, 64), "fixture is padded");
            Box::new(move || {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
                    .verify(black_box(&attest), &rs)
                    .is_ok()
            })
        }
        (PublicKey::Rsa { modulus, .. }, sig) => {
            let (alg, s): (&'static signature::RsaParameters, Vec<u8>) = match sig {
                Signature::RsaSsa(s) => (&signature::RSA_PKCS1_2048_8192_SHA256, s.sig().to_vec()),
                Signature::RsaPss(s) => (&signature::RSA_PSS_2048_8192_SHA256, s.sig().to_vec()),
                _ => unreachable!(),
            };
            Box::new(move || {
                RsaPublicKeyComponents {
                    n: modulus.as_slice(),
                    e: &[1u8, 0, 1][..],
                }
                .verify(alg, black_box(&attest), &s)
                .is_ok()
            })
        }
        _ => unreachable!(),
    }
}

fn verify(c: &mut Criterion) {
    for name in ["ecc-p256-ecdsa", "rsa2048-rsassa", "rsa2048-rsapss"] {
        let case = load(name);
        let expect = QuoteExpectations {
            ak_parent: AkParent::Key {
                qualified_name: &case.parent_qname,
            },
            qualifying_data: &case.nonce,
            pcr_selection: &case.selection,
            pcr_values: &case.values,
        };
        assert!(verify_quote(&case.attest, &case.sig, &case.ak, &expect).is_ok());
        let floor = ring_floor(&case);
        assert!(floor());

        let mut g = c.benchmark_group(name);
        g.bench_function("verify_quote", |b| {
            b.iter(|| verify_quote(black_box(&case.attest), &case.sig, &case.ak, &expect))
        });
        g.bench_function("ring signature only (floor)", |b| b.iter(&floor));
        g.bench_function("parse attest + signature", |b| {
            b.iter(|| {
                (
                    Attest::parse(black_box(&case.attest)).is_ok(),
                    Signature::parse(black_box(&case.sig)).is_ok(),
                )
            })
        });
        g.finish();
    }
}

criterion_group!(benches, verify);
criterion_main!(benches);
