//! Provision → evidence → verification, end to end on a real swtpm per
//! test: the host provisions the vTPM (`vkx-host vtpm provision`), the
//! guest's evidence code quotes over a transcript hash, and the host's
//! verifier (`vkx_host::attestation`, and the `vkx-host evidence verify`
//! binary) decides with the registry and a policy. Each failure case is
//! asserted by its typed reason, the one the host logs locally.
//!
//! The last tests run `vkx-host evidence verify` on quotes made entirely by
//! tpm2-tools (`tpm2_createak`, `tpm2_quote`): an independent producer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::Output;

use vkx_common::tpm::VerifyError;
use vkx_common::wire::{Evidence, HashAlg, PcrBankSelection, VmId};
use vkx_e2e::node::Node;
use vkx_e2e::run;
use vkx_e2e::swtpm::Swtpm;
use vkx_host::attestation::{Rejection, Rewind, record_quote, verify_evidence};
use vkx_host::policy::{Policy, Refusal};
use vkx_host::registry::Registry;

/// Provisions `vm` into `node`'s registry, asserting success.
fn provision(node: &Node, tpm: &Swtpm, vm: &str) {
    let o = node.provision(tpm, vm, "ecc");
    assert!(o.status.success(), "provision {vm}: {o:?}");
}

fn registry(node: &Node) -> Registry {
    Registry::open(Path::new(&node.registry())).unwrap()
}

fn selection() -> Vec<PcrBankSelection> {
    vec![PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: vec![0, 7, 16],
    }]
}

/// The AK authValue provisioning wrote for `vm` (the guest's ak_auth_file).
fn ak_auth(node: &Node, vm: &str) -> vkx_guest::tpm::AkAuth {
    vkx_guest::tpm::AkAuth::load(Path::new(&node.ak_auth_file(vm))).unwrap()
}

/// `vm`'s evidence from its vTPM `tpm`, quoted as its agent quotes.
fn evidence(node: &Node, vm: &str, tpm: &Swtpm, th: &[u8; 32]) -> Evidence {
    vkx_guest::tpm::collect_evidence(&tpm.tcti(), &ak_auth(node, vm), &selection(), th).unwrap()
}

/// A policy for `vm` that accepts exactly the PCR values in `ev`.
fn policy_for(vm: &str, ev: &Evidence) -> Policy {
    let mut text = format!(
        "[[image]]\nname = \"img\"\nkeys = [\"disk\"]\n\n[[vm]]\nid = \"{vm}\"\nimage = \"img\"\n"
    );
    for bank in &ev.pcr_values {
        for (index, digest) in &bank.values {
            text += &format!(
                "\n[[vm.pcr]]\nbank = \"{}\"\nindex = {index}\nallowed = [\"{}\"]\n",
                bank.hash_alg.name(),
                hex::encode(digest)
            );
        }
    }
    Policy::from_toml(&text).unwrap()
}

fn extend_pcr16(tpm: &Swtpm) {
    let o = std::process::Command::new("tpm2_pcrextend")
        .args(["-T", &tpm.tcti(), &format!("16:sha256={}", "ab".repeat(32))])
        .output()
        .expect("tpm2_pcrextend (tpm2-tools) is installed by make test");
    assert!(o.status.success(), "{o:?}");
}

#[test]
fn provisioned_guest_is_accepted_and_every_failure_has_its_reason() {
    let node = Node::new();
    let tpm = Swtpm::start();
    provision(&node, &tpm, "vm-a");
    let vm = VmId::new("vm-a").unwrap();
    let th = [0x5a; 32];
    let ev = evidence(&node, "vm-a", &tpm, &th);
    let policy = policy_for("vm-a", &ev);
    let registry = registry(&node);

    // Accepted, with the grants and the TPM clock recorded.
    let ok = verify_evidence(&registry, &policy, &vm, &th, &selection(), &ev).unwrap();
    assert!(ok.grants.keys.iter().any(|k| k.as_str() == "disk"));
    assert!(ok.quote.clock_info.reset_count >= 1);
    assert_eq!(
        record_quote(&registry, &vm, &ok.quote, 1, true).unwrap(),
        None
    );
    let seen = registry.last_quote(&vm).unwrap().unwrap();
    assert_eq!(seen.reset_count, ok.quote.clock_info.reset_count);
    // A later quote of the same running vTPM is no rewind.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let later = verify_evidence(
        &registry,
        &policy,
        &vm,
        &th,
        &selection(),
        &evidence(&node, "vm-a", &tpm, &th),
    )
    .unwrap();
    assert_eq!(
        record_quote(&registry, &vm, &later.quote, 2, true).unwrap(),
        None
    );
    // Replaying the first (older) quote's state is one; refused, it is
    // not recorded, so it stays one (on_rewind = refuse).
    for at in [3, 4] {
        assert!(matches!(
            record_quote(&registry, &vm, &ok.quote, at, true).unwrap(),
            Some(Rewind::Clock { .. })
        ));
    }
    // Accepted by the operator: the older state is the new baseline.
    assert!(vkx_host::attestation::accept_rewind(&registry, &vm).unwrap());
    assert_eq!(
        record_quote(&registry, &vm, &ok.quote, 5, true).unwrap(),
        None
    );

    // Replayed: the same quote for another handshake's transcript.
    let err = verify_evidence(&registry, &policy, &vm, &[0x5b; 32], &selection(), &ev).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::QualifyingDataMismatch)),
        "{err}"
    );

    // The challenge asked for other PCRs than the quote covers.
    let other = vec![PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: vec![0, 7],
    }];
    let err = verify_evidence(&registry, &policy, &vm, &th, &other, &ev).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::PcrSelectionMismatch)),
        "{err}"
    );

    // The guest lies about a PCR value.
    let mut lied = ev.clone();
    lied.pcr_values[0].values.insert(16, vec![0xff; 32]);
    let err = verify_evidence(&registry, &policy, &vm, &th, &selection(), &lied).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::PcrDigestMismatch)),
        "{err}"
    );

    // The AK certificate: provisioning's, or none, is accepted; another
    // (a rewritten NV index, another vTPM's certificate) is refused.
    assert!(
        ev.ak_cert.is_some(),
        "a provisioned vTPM sends its certificate"
    );
    let mut t = ev.clone();
    t.ak_cert = None;
    verify_evidence(&registry, &policy, &vm, &th, &selection(), &t).unwrap();
    let mut t = ev.clone();
    if let Some(c) = t.ak_cert.as_mut() {
        let last = c.len() - 1;
        c[last] ^= 1;
    }
    let err = verify_evidence(&registry, &policy, &vm, &th, &selection(), &t).unwrap_err();
    assert!(matches!(err, Rejection::AkCertMismatch { .. }), "{err}");
    assert!(!err.is_local());

    // Tampered attest and signature bytes.
    let mut t = ev.clone();
    t.tpm_attest[20] ^= 1;
    let err = verify_evidence(&registry, &policy, &vm, &th, &selection(), &t).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::BadSignature)),
        "{err}"
    );
    let mut t = ev.clone();
    let last = t.tpm_signature.len() - 1;
    t.tpm_signature[last] ^= 1;
    let err = verify_evidence(&registry, &policy, &vm, &th, &selection(), &t).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::BadSignature)),
        "{err}"
    );

    // Truncated and oversized structures.
    let mut t = ev.clone();
    t.tpm_signature.truncate(10);
    let err = verify_evidence(&registry, &policy, &vm, &th, &selection(), &t).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::MalformedSignature(_))),
        "{err}"
    );
    let mut t = ev.clone();
    t.tpm_attest.resize(2000, 0);
    let err = verify_evidence(&registry, &policy, &vm, &th, &selection(), &t).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::MalformedAttest(_))),
        "{err}"
    );

    // A VM the host never provisioned.
    let err = verify_evidence(
        &registry,
        &policy,
        &VmId::new("vm-z").unwrap(),
        &th,
        &selection(),
        &ev,
    )
    .unwrap_err();
    assert!(matches!(err, Rejection::NotProvisioned(_)), "{err}");
    assert!(err.to_string().contains("vkx-host vtpm provision"));
    assert!(!err.is_local());
}

#[test]
fn a_pcr_changed_after_provisioning_fails_policy() {
    let node = Node::new();
    let tpm = Swtpm::start();
    provision(&node, &tpm, "vm-a");
    let vm = VmId::new("vm-a").unwrap();
    let th = [1; 32];
    let before = evidence(&node, "vm-a", &tpm, &th);
    let policy = policy_for("vm-a", &before);
    extend_pcr16(&tpm);
    let after = evidence(&node, "vm-a", &tpm, &th);
    // The quote itself is genuine; the boot state is not the approved one.
    let err =
        verify_evidence(&registry(&node), &policy, &vm, &th, &selection(), &after).unwrap_err();
    assert!(
        matches!(
            err,
            Rejection::Policy(Refusal::PcrMismatch { index: 16, .. })
        ),
        "{err}"
    );
}

#[test]
fn a_quote_from_another_vtpm_is_refused() {
    let node = Node::new();
    let (a, b) = (Swtpm::start(), Swtpm::start());
    provision(&node, &a, "vm-a");
    provision(&node, &b, "vm-b");
    let th = [2; 32];
    let from_b = evidence(&node, "vm-b", &b, &th);
    let policy = policy_for("vm-a", &from_b);
    // vm-b's vTPM answering for vm-a's connection: its AK is not vm-a's.
    let vm_a = VmId::new("vm-a").unwrap();
    let err =
        verify_evidence(&registry(&node), &policy, &vm_a, &th, &selection(), &from_b).unwrap_err();
    assert!(matches!(err, Rejection::AkNameMismatch { .. }), "{err}");
    // Even if it claims vm-a's AK name, the signature gives it away.
    let from_a = evidence(&node, "vm-a", &a, &th);
    let mut forged = from_b.clone();
    forged.ak_name = from_a.ak_name;
    // With its own AK certificate it is caught by that first.
    let err =
        verify_evidence(&registry(&node), &policy, &vm_a, &th, &selection(), &forged).unwrap_err();
    assert!(matches!(err, Rejection::AkCertMismatch { .. }), "{err}");
    forged.ak_cert = from_a.ak_cert;
    let err =
        verify_evidence(&registry(&node), &policy, &vm_a, &th, &selection(), &forged).unwrap_err();
    assert!(
        matches!(err, Rejection::Quote(VerifyError::BadSignature)),
        "{err}"
    );
}

fn verify_cli(args: &[&str]) -> Output {
    let mut all = vec!["evidence", "verify"];
    all.extend_from_slice(args);
    run("vkx-host", &all, b"")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_cli_verifies_guest_evidence_with_registry_and_policy() {
    let node = Node::new();
    let tpm = Swtpm::start();
    provision(&node, &tpm, "vm-a");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("ev");
    let nonce = "11".repeat(32);
    let o = run(
        "vkx-guest",
        &[
            "evidence",
            "--tcti",
            &tpm.tcti(),
            "--ak-auth-file",
            &node.ak_auth_file("vm-a"),
            "--nonce",
            &nonce,
            "--pcrs",
            "sha256:0,7,16",
            "--out-dir",
            &out.display().to_string(),
        ],
        b"",
    );
    assert!(o.status.success(), "{o:?}");
    // The "values" file from the guest's pcrs.json.
    let pcrs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pcrs.json")).unwrap()).unwrap();
    let mut values = Vec::new();
    for i in ["0", "7", "16"] {
        values.extend(hex::decode(pcrs["sha256"][i].as_str().unwrap()).unwrap());
    }
    std::fs::write(out.join("pcrs.bin"), &values).unwrap();
    let ev = evidence(&node, "vm-a", &tpm, &[0; 32]);
    let policy = work.path().join("policy.toml");
    let mut text =
        "[[image]]\nname = \"img\"\n\n[[vm]]\nid = \"vm-a\"\nimage = \"img\"\n".to_owned();
    for (index, digest) in &ev.pcr_values[0].values {
        text += &format!(
            "\n[[vm.pcr]]\nbank = \"sha256\"\nindex = {index}\nallowed = [\"{}\"]\n",
            hex::encode(digest)
        );
    }
    std::fs::write(&policy, text).unwrap();

    let f = |n: &str| out.join(n).display().to_string();
    let (attest, sig, pcrs_bin) = (f("attest.bin"), f("signature.bin"), f("pcrs.bin"));
    let registry = node.registry();
    let policy = policy.display().to_string();
    let base = |nonce: &str| {
        vec![
            "--attest".to_owned(),
            attest.clone(),
            "--signature".to_owned(),
            sig.clone(),
            "--registry".to_owned(),
            registry.clone(),
            "--vm-id".to_owned(),
            "vm-a".to_owned(),
            "--pcrs".to_owned(),
            pcrs_bin.clone(),
            "--pcr-list".to_owned(),
            "sha256:0,7,16".to_owned(),
            "--nonce".to_owned(),
            nonce.to_owned(),
            "--policy".to_owned(),
            policy.clone(),
        ]
    };
    let args = base(&nonce);
    let o = verify_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("VERIFIED") && stdout(&o).contains("policy satisfied"));

    let args = base(&"22".repeat(32));
    let o = verify_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("REFUSED: extraData"), "{}", stdout(&o));
}

fn fixture(case: &str, file: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../common/tests/fixtures/tpm")
        .join(case)
        .join(file)
        .display()
        .to_string()
}

#[test]
fn the_cli_accepts_tpm2_tools_quotes_and_refuses_a_wrong_nonce() {
    for case in [
        "ecc-p256-ecdsa",
        "ecc-p256-ecdsa-two-banks",
        "rsa2048-rsassa",
        "rsa2048-rsapss",
    ] {
        let nonce = hex::encode(std::fs::read(fixture(case, "nonce.bin")).unwrap());
        let list = std::fs::read_to_string(fixture(case, "selection.txt")).unwrap();
        let (attest, sig, ak, pcrs) = (
            fixture(case, "attest.bin"),
            fixture(case, "sig.bin"),
            fixture(case, "ak.pub"),
            fixture(case, "pcrs.bin"),
        );
        let parent = hex::encode(std::fs::read(fixture(case, "parent.qname")).unwrap());
        let args = |nonce: &str, ak: &str| {
            verify_cli(&[
                "--attest",
                &attest,
                "--signature",
                &sig,
                "--ak-public",
                ak,
                "--ak-parent-qname",
                &parent,
                "--pcrs",
                &pcrs,
                "--pcr-list",
                list.trim(),
                "--nonce",
                nonce,
            ])
        };
        let o = args(&nonce, &ak);
        assert_eq!(o.status.code(), Some(0), "{case}: {}", stdout(&o));
        let mut wrong = hex::decode(&nonce).unwrap();
        wrong[0] ^= 1;
        let o = args(&hex::encode(wrong), &ak);
        assert_eq!(o.status.code(), Some(1), "{case}: {}", stdout(&o));
        assert!(stdout(&o).contains("REFUSED"), "{case}");
        let o = args(&nonce, &fixture(case, "other-ak.pub"));
        assert_eq!(o.status.code(), Some(1), "{case}: {}", stdout(&o));
        // Without the parent, the AK is taken for a vkx AK (a primary of
        // the endorsement hierarchy): a tpm2_createak AK is not one.
        let o = verify_cli(&[
            "--attest",
            &attest,
            "--signature",
            &sig,
            "--ak-public",
            &ak,
            "--pcrs",
            &pcrs,
            "--pcr-list",
            list.trim(),
            "--nonce",
            &nonce,
        ]);
        assert_eq!(o.status.code(), Some(1), "{case}: {}", stdout(&o));
        assert!(
            stdout(&o).contains("REFUSED: qualifiedSigner"),
            "{case}: {}",
            stdout(&o)
        );
    }
    let o = run(
        "vkx-host",
        &[
            "evidence",
            "inspect",
            "--attest",
            &fixture("ecc-p256-ecdsa", "attest.bin"),
        ],
        b"",
    );
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("pcr selection     sha256:0,1,2,7"),
        "{}",
        stdout(&o)
    );
}

/// Runs a tpm2-tools command in `dir`.
fn tpm2(dir: &Path, tool: &str, args: &[&str]) {
    let o = std::process::Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (tpm2-tools) not runnable: {e}; run `make test`"));
    assert!(
        o.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_cli_verifies_a_quote_made_live_by_tpm2_tools() {
    // An independent producer: EK, AK and quote by tpm2-tools on swtpm.
    let tpm = Swtpm::start();
    let tcti = tpm.tcti();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let nonce = "c3".repeat(32);
    // swtpm has no resource manager: flush transient objects between tools.
    let flush = || tpm2(dir, "tpm2_flushcontext", &["-T", &tcti, "-t"]);
    tpm2(
        dir,
        "tpm2_createek",
        &["-T", &tcti, "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub"],
    );
    tpm2(
        dir,
        "tpm2_readpublic",
        &["-T", &tcti, "-c", "ek.ctx", "-q", "ek.qname"],
    );
    flush();
    tpm2(
        dir,
        "tpm2_createak",
        &[
            "-T", &tcti, "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s",
            "ecdsa", "-u", "ak.pub",
        ],
    );
    flush();
    tpm2(
        dir,
        "tpm2_quote",
        &[
            "-T",
            &tcti,
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0,1,7",
            "-q",
            &nonce,
            "-g",
            "sha256",
            "-m",
            "attest.bin",
            "-s",
            "sig.bin",
            "-o",
            "pcrs.bin",
            "-F",
            "values",
        ],
    );
    let f = |n: &str| dir.join(n).display().to_string();
    let ek_qname = hex::encode(std::fs::read(dir.join("ek.qname")).unwrap());
    let verify = |nonce: &str| {
        verify_cli(&[
            "--attest",
            &f("attest.bin"),
            "--signature",
            &f("sig.bin"),
            "--ak-public",
            &f("ak.pub"),
            "--ak-parent-qname",
            &ek_qname,
            "--pcrs",
            &f("pcrs.bin"),
            "--pcr-list",
            "sha256:0,1,7",
            "--nonce",
            nonce,
        ])
    };
    let o = verify(&nonce);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("VERIFIED"));
    let o = verify(&"c4".repeat(32));
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("REFUSED: extraData"), "{}", stdout(&o));
}
