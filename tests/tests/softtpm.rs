//! The insecure soft vTPM of load generation (`vkx_e2e::softtpm`): its
//! quotes must be what a real TPM's are, or the connect storm measures
//! a host doing other work than it does for real VMs.
//!
//! Three judges: the host's own verifier (`vkx_common::tpm::verify_quote`),
//! tpm2-tools' `tpm2_checkquote` (independent: OpenSSL, and the TSS's
//! unmarshalling), and a real vTPM (swtpm provisioned by `vkx-host vtpm
//! provision`), whose AK and EK public areas and quote must have the
//! soft ones' layout byte for byte, except for key material, nonces,
//! clock and digests.
//!
//! Run with `cargo test -p vkx-e2e --features insecure-soft-tpm --test softtpm`.

#![cfg(feature = "insecure-soft-tpm")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::Path;
use std::process::{Command, Output};

use vkx_common::tpm::signature::Signature;
use vkx_common::tpm::{AkParent, Attest, Public, QuoteExpectations, verify_quote};
use vkx_common::wire::{HashAlg, PcrBankSelection, PcrBankValues};
use vkx_e2e::node::Node;
use vkx_e2e::softtpm::{Seed, SoftQuote, SoftTpm, TPM_RH_ENDORSEMENT};
use vkx_e2e::swtpm::Swtpm;

const NONCE: [u8; 32] = [0x5a; 32];

/// The soft TPMs' seed: fresh per call, as a sandbox's.
fn seed() -> Seed {
    Seed::generate().unwrap()
}

fn sel(hash_alg: HashAlg, pcrs: &[u8]) -> PcrBankSelection {
    PcrBankSelection {
        hash_alg,
        pcrs: pcrs.to_vec(),
    }
}

/// What vkx hosts ask for, and a two-bank selection (banks in request
/// order, sha1 after sha256) with the tpm2-tools spelling of each.
fn selections() -> Vec<(Vec<PcrBankSelection>, &'static str)> {
    vec![
        (vec![sel(HashAlg::Sha256, &[0, 7])], "sha256:0,7"),
        (
            vec![
                sel(HashAlg::Sha256, &[0, 1, 2, 7, 16]),
                sel(HashAlg::Sha1, &[0]),
            ],
            "sha256:0,1,2,7,16+sha1:0",
        ),
    ]
}

fn ours(
    tpm: &SoftTpm,
    q: &SoftQuote,
    selection: &[PcrBankSelection],
    values: &[PcrBankValues],
) -> Result<(), String> {
    let ak = Public::parse(tpm.ak_public()).map_err(|e| e.to_string())?;
    verify_quote(
        &q.attest,
        &q.signature,
        &ak,
        &QuoteExpectations {
            ak_parent: AkParent::VKX,
            qualifying_data: &NONCE,
            pcr_selection: selection,
            pcr_values: values,
        },
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// tpm2_checkquote on the files tpm2-tools would have written.
fn checkquote(dir: &Path, tpm: &SoftTpm, q: &SoftQuote, spelling: &str) -> Output {
    let pcrs: Vec<u8> = q
        .pcr_values
        .iter()
        .flat_map(|b| b.values.values().flatten().copied())
        .collect();
    for (name, bytes) in [
        ("ak.pub", tpm.ak_public()),
        ("attest.bin", &q.attest[..]),
        ("sig.bin", &q.signature[..]),
        ("pcrs.bin", &pcrs[..]),
    ] {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let p = |f: &str| dir.join(f).display().to_string();
    Command::new("tpm2_checkquote")
        .args([
            "-u",
            &p("ak.pub"),
            "-m",
            &p("attest.bin"),
            "-s",
            &p("sig.bin"),
        ])
        .args(["-f", &p("pcrs.bin"), "-l", spelling, "-g", "sha256"])
        .args(["-q", &hex::encode(NONCE)])
        .output()
        .unwrap_or_else(|e| {
            panic!("tpm2_checkquote (tpm2-tools) not runnable: {e}; run `make test`")
        })
}

#[test]
fn the_hosts_verifier_accepts_soft_quotes() {
    let tpm = SoftTpm::new(&seed(), 3);
    for (selection, _) in selections() {
        let q = tpm.quote_raw(&selection, &NONCE).unwrap();
        assert_eq!(q.pcr_values, SoftTpm::pcr_values(&selection));
        ours(&tpm, &q, &selection, &q.pcr_values).unwrap();
        // Someone else's nonce, or another VM's AK: refused.
        let other = tpm.quote_raw(&selection, &[0x11; 32]).unwrap();
        assert!(ours(&tpm, &other, &selection, &other.pcr_values).is_err());
        assert!(ours(&SoftTpm::new(&seed(), 4), &q, &selection, &q.pcr_values).is_err());
    }
    // Through the guest agent's Quote trait: the evidence it sends.
    let selection = &selections()[0].0;
    let ev = vkx_guest::agent::Quote::quote(&tpm, selection, &NONCE).unwrap();
    assert_eq!(ev.ak_name, tpm.ak_name());
    assert_eq!(
        ev.ak_name,
        Public::parse(tpm.ak_public()).unwrap().name(),
        "the AK name is nameAlg || SHA-256(TPMT_PUBLIC)"
    );
    let q = SoftQuote {
        attest: ev.tpm_attest,
        signature: ev.tpm_signature,
        pcr_values: ev.pcr_values,
    };
    ours(&tpm, &q, selection, &q.pcr_values).unwrap();
    // The clock moves forward from quote to quote.
    let a = Attest::parse(&q.attest).unwrap().clock_info();
    let b = tpm.quote_raw(selection, &NONCE).unwrap();
    let b = Attest::parse(&b.attest).unwrap().clock_info();
    assert!(b.clock > a.clock && b.safe && b.reset_count == a.reset_count);
}

#[test]
fn tpm2_checkquote_accepts_soft_quotes() {
    let tpm = SoftTpm::new(&seed(), 5);
    let dir = tempfile::tempdir().unwrap();
    for (selection, spelling) in selections() {
        let q = tpm.quote_raw(&selection, &NONCE).unwrap();
        let o = checkquote(dir.path(), &tpm, &q, spelling);
        assert!(
            o.status.success(),
            "tpm2_checkquote refused a soft quote ({spelling}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn a_flipped_byte_is_refused_by_both() {
    let tpm = SoftTpm::new(&seed(), 6);
    let dir = tempfile::tempdir().unwrap();
    let (selection, spelling) = selections().remove(0);
    let q = tpm.quote_raw(&selection, &NONCE).unwrap();
    let attest_len = q.attest.len();
    let sig_len = q.signature.len();
    // Attest: in qualifiedSigner, extraData, clock, firmwareVersion, the
    // selection bitmap, pcrDigest. Signature: in r and in s.
    let cases: Vec<(&str, usize)> = vec![
        ("attest", 10),
        ("attest", 45),
        ("attest", 80),
        ("attest", 96),
        ("attest", attest_len - 36),
        ("attest", attest_len - 1),
        ("signature", 10),
        ("signature", sig_len - 1),
    ];
    for (what, at) in cases {
        let mut bad = q.clone();
        let target = if what == "attest" {
            &mut bad.attest
        } else {
            &mut bad.signature
        };
        target[at] ^= 0x01;
        assert!(
            ours(&tpm, &bad, &selection, &bad.pcr_values).is_err(),
            "vkx accepted a flip in {what} at {at}"
        );
        let o = checkquote(dir.path(), &tpm, &bad, spelling);
        assert!(
            !o.status.success(),
            "tpm2_checkquote accepted a flip in {what} at {at}"
        );
    }
    // A reported PCR value that is not what was quoted.
    let mut bad = q.clone();
    bad.pcr_values[0].values.get_mut(&7).unwrap()[0] ^= 0x01;
    assert!(ours(&tpm, &bad, &selection, &bad.pcr_values).is_err());
    assert!(
        !checkquote(dir.path(), &tpm, &bad, spelling)
            .status
            .success()
    );
}

/// `public` with its unique (the last two 32-byte ECC coordinates and
/// their sizes) zeroed: what stays is the template.
fn template_of(public: &[u8]) -> Vec<u8> {
    let mut t = public.to_vec();
    let n = t.len();
    assert!(n > 68);
    t[n - 66..n - 34].fill(0);
    t[n - 32..].fill(0);
    t
}

#[test]
fn soft_structures_have_a_real_vtpms_layout() {
    // A real vTPM, provisioned as the host provisions a VM's.
    let node = Node::new();
    let mut swtpm = Swtpm::start();
    let o = node.provision(&swtpm, "vm-real", "ecc");
    assert!(o.status.success(), "provision: {o:?}");
    swtpm.restart();
    let entry = node.entry("vm-real");
    let real_ak = hex::decode(entry["ak_public"].as_str().unwrap()).unwrap();
    let real_ek = hex::decode(entry["ek_public"].as_str().unwrap()).unwrap();
    let soft = SoftTpm::new(&seed(), 9);

    // The public areas: the same template, byte for byte; only the key
    // differs.
    assert_eq!(template_of(soft.ak_public()), template_of(&real_ak));
    assert_eq!(template_of(soft.ek_public()), template_of(&real_ek));
    let real_name = Public::parse(&real_ak).unwrap().name();
    assert_eq!(hex::encode(&real_name), entry["ak_name"].as_str().unwrap());

    // A quote of the real vTPM, as the guest agent takes it.
    let auth =
        vkx_guest::tpm::AkAuth::load(std::path::Path::new(&node.ak_auth_file("vm-real"))).unwrap();
    for (selection, _) in selections() {
        let ev =
            vkx_guest::tpm::collect_evidence(&swtpm.tcti(), &auth, &selection, &NONCE).unwrap();
        let real = Attest::parse(&ev.tpm_attest).unwrap();
        let soft_q = soft.quote_raw(&selection, &NONCE).unwrap();
        let mine = Attest::parse(&soft_q.attest).unwrap();
        assert_eq!(soft_q.attest.len(), ev.tpm_attest.len());
        // qualifiedSigner: the AK is a primary of the endorsement
        // hierarchy, so nameAlg || SHA-256(TPM_RH_ENDORSEMENT || name).
        let mut qn = ring::digest::Context::new(&ring::digest::SHA256);
        qn.update(&TPM_RH_ENDORSEMENT.to_be_bytes());
        qn.update(&real_name);
        let mut expected = vec![0x00, 0x0b];
        expected.extend_from_slice(qn.finish().as_ref());
        assert_eq!(
            real.qualified_signer(),
            expected,
            "the real AK's qualified name"
        );
        assert_eq!(mine.qualified_signer(), soft.qualified_signer());
        // The host's verifier computes the same, and accepts the real
        // quote of the persisted AK (after a vTPM restart) with it.
        let ak = Public::parse(&real_ak).unwrap();
        assert_eq!(AkParent::VKX.qualified_name_of(&ak), expected);
        verify_quote(
            &ev.tpm_attest,
            &ev.tpm_signature,
            &ak,
            &QuoteExpectations {
                ak_parent: AkParent::VKX,
                qualifying_data: &NONCE,
                pcr_selection: &selection,
                pcr_values: &ev.pcr_values,
            },
        )
        .unwrap();
        assert_eq!(real.extra_data(), mine.extra_data());
        assert_eq!(real.pcr_select(), mine.pcr_select());
        assert_eq!(real.pcr_digest().len(), mine.pcr_digest().len());
        // Clock values differ by nature (a real vTPM clears `safe` for a
        // while after a restart); firmwareVersion is swtpm's build.
        eprintln!(
            "clockInfo: swtpm {:?}, soft {:?}; firmwareVersion: swtpm {:#018x}, soft {:#018x}",
            real.clock_info(),
            mine.clock_info(),
            real.firmware_version(),
            mine.firmware_version()
        );
        // The signatures: ECDSA, SHA-256, r and s of 32 bytes each.
        let (Signature::Ecdsa(r), Signature::Ecdsa(s)) = (
            Signature::parse(&ev.tpm_signature).unwrap(),
            Signature::parse(&soft_q.signature).unwrap(),
        ) else {
            panic!("not ECDSA signatures");
        };
        assert_eq!(
            (r.hash(), r.r().len(), r.s().len()),
            (HashAlg::Sha256, 32, 32)
        );
        assert_eq!(
            (s.hash(), s.r().len(), s.s().len()),
            (HashAlg::Sha256, 32, 32)
        );
        assert_eq!(ev.tpm_signature.len(), soft_q.signature.len());
    }
}
